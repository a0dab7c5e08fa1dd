"""Failover: a message a channel provably did not take goes to the next channel of its
route chain, within the one forward budget; never after a permanent refusal, never
when the outcome is unknown (docs/channels.md, "Failover")."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from support import SENDER, free_port
from test_channels import (
    DELIVERED,
    MESSAGE_ID,
    RCPT,
    balance,
    cloudflare_env,
    resend_env,
    send,
    wrap_hook,
)

from relay import metrics, policy, replies
from relay.channels.base import Delivery, Outbound
from relay.cli.log import _record_text
from relay.delivery.chain import walk
from relay.errors import PermanentDelivery, TransientDelivery
from relay.store.deliveries import Query
from tests.fake_upstreams import FakeCloudflare, FakeResend


@pytest.fixture
def resend() -> Iterator[FakeResend]:
    with FakeResend() as fake:
        yield fake


@pytest.fixture
def cloudflare() -> Iterator[FakeCloudflare]:
    with FakeCloudflare() as fake:
        yield fake


def failovers(origin: str, to: str) -> float:
    text = metrics.exposition()[0].decode()
    prefix = f'relay_failovers_total{{from="{origin}",to="{to}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def record_of(relay: Any, message_id: str = MESSAGE_ID) -> Any:
    [record] = relay.store.find_deliveries(Query(message_id=message_id))
    return record


def test_resend_500_fails_over_to_smtp_once_and_charges_once(relay_factory, resend, sink):
    relay = relay_factory(
        **resend_env(resend), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10"
    )
    resend.fail(500, "internal_server_error")
    before = failovers("resend", "smtp")

    assert send(relay) == DELIVERED

    assert len(resend.requests) == 1
    assert resend.sent == []
    [received] = sink.messages
    assert received.rcpt_tos == [RCPT]
    assert balance(relay) == 9
    assert failovers("resend", "smtp") == before + 1
    record = record_of(relay)
    assert (record.channel, record.rule, record.charged) == ("smtp", 3, 1)
    assert [(a.channel, a.code, a.enhanced, a.accepted) for a in record.attempts] == [
        ("resend", 451, "4.3.0", 0),
        ("smtp", 250, "2.0.0", 1),
    ]
    assert record.attempts[0].text == "resend: upstream error (HTTP 500)"
    shown = _record_text(record)
    assert "attempts\n  1. resend  451 4.3.0 resend: upstream error (HTTP 500)" in shown
    assert "\n  2. smtp  250 2.0.0" in shown
    assert [a["channel"] for a in record.as_json()["attempts"]] == ["resend", "smtp"]


@pytest.mark.parametrize(
    ("status", "name"),
    [(429, "daily_quota_exceeded"), (403, "invalid_api_key"), (503, "internal_server_error")],
)
def test_resend_refusing_the_request_as_a_whole_fails_over(
    relay_factory, resend, sink, status, name
):
    relay = relay_factory(
        **resend_env(resend), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10"
    )
    resend.fail(status, name)

    assert send(relay) == DELIVERED
    assert len(sink.messages) == 1
    assert balance(relay) == 9


def test_permanent_recipient_refusal_is_never_failed_over(relay_factory, sink, cloudflare):
    relay = relay_factory(
        **cloudflare_env(cloudflare), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10"
    )
    wrap_hook(sink, "RCPT", lambda server: "550 5.1.1 <rcpt@dest.test>: no such user")

    reply = send(relay)

    assert reply.startswith("550 5.1.1 "), reply
    assert cloudflare.requests == []
    assert balance(relay) == 10
    record = record_of(relay)
    assert record.attempts == ()  # one channel tried
    assert [(a.channel, a.code) for a in record.tries] == [("smtp", 550)]


def test_permanent_resend_refusal_is_never_failed_over(relay_factory, resend, sink):
    relay = relay_factory(
        **resend_env(resend), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10"
    )
    resend.fail(422, "invalid_parameter", "Invalid `to` field.")

    assert send(relay).startswith("550 5.1.")
    assert sink.recorder.connections == 0
    assert balance(relay) == 10


def test_timeout_after_the_request_is_not_failed_over(relay_factory, resend, sink):
    relay = relay_factory(
        **resend_env(resend),
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_UPSTREAM_TIMEOUT="0.5",
    )
    resend.fail(500, "internal_server_error", delay=3)  # answered too late: unknown

    assert send(relay) == "451 4.3.0 resend: upstream timed out"

    assert sink.recorder.connections == 0
    assert balance(relay) == 10


def test_smtp_upstream_refusing_connections_fails_over_to_cloudflare(relay_factory, cloudflare):
    smtp = f'{{"example.com": {{"host": "127.0.0.1", "port": {free_port()}, "startTls": false}}}}'
    relay = relay_factory(**cloudflare_env(cloudflare), SMTP_CONFIG=smtp, DEFAULT_SEND_BALANCE="10")

    assert send(relay) == DELIVERED

    assert len(cloudflare.requests) == 1
    assert balance(relay) == 9
    record = record_of(relay)
    assert [(a.channel, a.code) for a in record.attempts] == [("smtp", 451), ("cloudflare", 250)]
    assert record.attempts[0].text == "smtp: upstream refused the connection"
    assert (record.channel, record.rule) == ("cloudflare", 4)


def test_smtp_deferring_a_recipient_before_data_fails_over(relay_factory, sink, cloudflare):
    relay = relay_factory(
        **cloudflare_env(cloudflare), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10"
    )
    wrap_hook(sink, "RCPT", lambda server: "450 4.2.1 mailbox busy")

    assert send(relay) == DELIVERED
    assert sink.messages == []
    assert len(cloudflare.requests) == 1
    assert balance(relay) == 9


def test_smtp_losing_the_connection_after_the_data_is_not_failed_over(
    relay_factory, sink, cloudflare
):
    relay = relay_factory(
        **cloudflare_env(cloudflare), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10"
    )
    original = sink.recorder.handle_DATA

    async def drop(server, session, envelope):
        await original(server, session, envelope)  # the sink has it
        server.transport.abort()  # and no reply comes
        return "250 never sent"

    sink.recorder.handle_DATA = drop

    assert send(relay) == "451 4.3.0 smtp: upstream closed the connection"
    assert cloudflare.requests == []
    assert balance(relay) == 10


def test_free_cloudflare_is_not_failed_over_to_a_charging_channel(
    relay_factory, cloudflare, resend, sink
):
    """A metered sender's verified-address message is reserved at 0: no follower that charges."""
    relay = relay_factory(
        **cloudflare_env(cloudflare),
        **resend_env(resend),
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
    )
    relay.store.add_verified(RCPT)
    cloudflare.fail(503, 10100, "Service unavailable")

    assert send(relay) == "451 4.3.0 cloudflare: authentication service unavailable"
    assert resend.requests == []
    assert sink.recorder.connections == 0


def test_chain_follows_the_priority():
    from relay.config import load_settings

    settings = load_settings(
        {
            "RELAY_TLS_CERT": "x",
            "RELAY_TLS_KEY": "x",
            "RESEND_TOKEN": "re_x",
            "SMTP_CONFIG": '{"example.com": {"host": "h", "port": 25}}',
            "CLOUDFLARE_ACCOUNT_ID": "a",
            "CLOUDFLARE_API_TOKEN": "t",
        }
    )
    plan = policy.plan_message(
        settings, domain="example.com", recipients=["r@x"], verified=[], unlimited=False
    )
    assert isinstance(plan, policy.MessagePlan)
    assert [(r.channel, r.rule) for r in plan.routes] == [
        ("resend", 2),
        ("smtp", 3),
        ("cloudflare", 4),
    ]
    free = policy.plan_message(
        settings, domain="example.com", recipients=["r@x"], verified=["r@x"], unlimited=False
    )
    assert isinstance(free, policy.MessagePlan)
    assert [r.rule for r in free.routes] == [1]
    unlimited = policy.plan_message(
        settings, domain="example.com", recipients=["r@x"], verified=["r@x"], unlimited=True
    )
    assert isinstance(unlimited, policy.MessagePlan)
    assert [r.rule for r in unlimited.routes] == [1, 2, 3]  # every one free for this sender


# --- the walk alone, with scripted channels ---------------------------------------


class Scripted:
    idempotent = False

    def __init__(self, name: str, outcome: Any) -> None:
        self.name = name
        self.outcome = outcome
        self.seen: list[tuple[str, ...]] = []

    async def deliver(self, message: Outbound) -> Delivery:
        self.seen.append(message.recipients)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return Delivery(accepted=message.recipients)

    async def aclose(self) -> None:
        return None


OUT = Outbound(SENDER, ("a@x.test", "b@x.test"), b"", "<m@x>", "k")
ROUTES = (policy.Route(policy.Channel.RESEND, True, 2), policy.Route(policy.Channel.SMTP, True, 3))


def test_recipients_taken_stay_taken_and_only_the_rest_go_on():
    first = Scripted(
        "resend",
        TransientDelivery(
            "resend",
            replies.upstream_unavailable("resend", "x"),
            not_taken=True,
            taken=("a@x.test",),
        ),
    )
    second = Scripted("smtp", None)
    channels = {policy.Channel.RESEND: first, policy.Channel.SMTP: second}

    done = asyncio.run(walk(channels, ROUTES, OUT, 5))  # type: ignore[arg-type]

    assert second.seen == [("b@x.test",)]
    assert done.accepted == ["a@x.test", "b@x.test"]
    assert done.takers == ["resend", "smtp"]
    assert done.reply.code == 250
    assert [a.accepted for a in done.attempts] == [1, 1]


def test_a_permanent_refusal_after_a_partial_take_is_a_partial_delivery():
    first = Scripted(
        "resend",
        TransientDelivery(
            "resend",
            replies.upstream_unavailable("resend", "x"),
            not_taken=True,
            taken=("a@x.test",),
        ),
    )
    refusal = replies.upstream_refused_as("smtp", 550, "5.1.1", "no such user")
    second = Scripted("smtp", PermanentDelivery("smtp", refusal))
    channels = {policy.Channel.RESEND: first, policy.Channel.SMTP: second}

    done = asyncio.run(walk(channels, ROUTES, OUT, 5))  # type: ignore[arg-type]

    assert done.reply.code == 250
    assert done.accepted == ["a@x.test"]
    assert done.refused == {"b@x.test": refusal}


def test_not_taken_is_never_kept_for_a_permanent_reply():
    refusal = replies.upstream_refused_as("smtp", 550, "5.1.1", "no such user")
    assert PermanentDelivery("smtp", refusal).not_taken is False
    assert not TransientDelivery("smtp", replies.upstream_unavailable("smtp", "x")).not_taken


def test_a_walk_that_runs_out_of_budget_stops_as_unknown():
    class Slow(Scripted):
        async def deliver(self, message: Outbound) -> Delivery:
            await asyncio.sleep(10)
            raise AssertionError

    second = Scripted("smtp", None)
    channels = {policy.Channel.RESEND: Slow("resend", None), policy.Channel.SMTP: second}

    done = asyncio.run(walk(channels, ROUTES, OUT, 0.05))  # type: ignore[arg-type]

    assert done.timed_out and second.seen == []
    assert done.reply == replies.upstream_unavailable("resend", "upstream timed out")


def test_a_concurrent_idempotent_request_is_not_failed_over(relay_factory, resend, sink):
    """Resend's 409 for a key another request holds: that request may yet send it."""
    relay = relay_factory(
        **resend_env(resend), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10"
    )
    resend.fail(409, "concurrent_idempotent_requests")

    assert send(relay) == "451 4.3.0 resend: idempotent request conflict"
    assert sink.recorder.connections == 0
    assert balance(relay) == 10
