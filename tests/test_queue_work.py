"""The queue's worker at rest and at work: what an idle queue costs each process, the
events the queue sends (docs/events.md), and Resend's batch sending (docs/queue.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import standardwebhooks
from test_channels import MESSAGE_ID, RCPT, balance, resend_env, send
from test_events import WEBHOOK_ENV, Receiver
from test_queue import QUEUED, queue_empty, records, until

from relay.store.deliveries import Query
from tests.fake_upstreams import FakeResend

pytestmark = pytest.mark.backends


@pytest.fixture
def resend() -> Iterator[FakeResend]:
    with FakeResend() as fake:
        yield fake


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def events(receiver: Receiver, secret: str, *types: str) -> list[dict[str, Any]]:
    """The events of `types` the receiver got, each verified once, in that order (the
    sender sends due events together: they may come in any order)."""
    until(lambda: len(receiver.requests) >= len(types))
    verifier = standardwebhooks.Webhook(secret)
    got = {}
    for headers, body in receiver.requests:
        event = verifier.verify(body, headers)
        assert event["type"] not in got, event["type"]
        got[event["type"]] = event
    return [got[t] for t in types]


def count_calls(relay: Any, *names: str) -> dict[str, int]:
    """Count the worker's calls of the store's methods `names` from now on."""
    store = relay.relay.queue.store
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(store, name)

        async def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            counts[_name] += 1
            return await _real(*args, **kw)

        setattr(store, name, counted)
    return counts


def test_an_idle_queue_takes_no_write_lock_and_still_finds_others_messages(
    relay_factory, sink, database_url
):
    # B: an idle relay with the queue off. A: another process on the same database
    # that queues a message and leaves it (its own worker stopped).
    idle = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_QUEUE="off")
    counts = count_calls(idle, "claim", "queue_due")
    until(lambda: counts["queue_due"] >= 1)
    counts["claim"] = 0
    start = counts["queue_due"]
    until(lambda: counts["queue_due"] >= start + 3)
    assert counts["claim"] == 0  # three idle looks, no write transaction

    other = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="always",
        RELAY_DATABASE=database_url,
    )
    other.call(other.relay.queue.stop())
    token = idle.token()
    assert send(other, token=token) == QUEUED
    until(lambda: queue_empty(idle) and len(sink.messages) == 1)
    assert counts["claim"] >= 1
    assert balance(idle) == 9
    [record] = records(idle)
    assert (record.outcome, record.charged) == ("delivered", 1)
    assert idle.store.pending_count() == 0


def test_a_queued_message_is_told_queued_then_delivered(relay_factory, sink, receiver):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="always",
        **WEBHOOK_ENV,
    )
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, None)
    assert send(relay, token=token) == QUEUED
    queued, delivered = events(receiver, hook["secret"], "message.queued", "message.delivered")
    data = queued["data"]
    assert (data["message_id"], data["account"], data["outcome"]) == (MESSAGE_ID, "acme", "queued")
    assert data["recipients"] == [{"address": RCPT, "outcome": "queued", "reply": ""}]
    assert data["attempts"] == 0 and data["reply"] == QUEUED
    assert delivered["type"] == "message.delivered"
    assert delivered["data"]["attempts"] == 1
    assert delivered["data"]["recipients"][0]["outcome"] == "delivered"
    assert len(receiver.requests) == 2


def test_a_queued_message_past_its_max_age_is_told_failed(relay_factory, resend, receiver):
    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="0.2",
        RELAY_QUEUE_MAX_AGE="1.5",
        **WEBHOOK_ENV,
    )
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, "message.queued,message.failed")
    for _ in range(50):
        resend.fail(503, "internal_server_error")
    assert send(relay, token=token) == QUEUED
    until(lambda: queue_empty(relay))
    queued, failed = events(receiver, hook["secret"], "message.queued", "message.failed")
    assert queued["type"] == "message.queued"
    [rcpt] = queued["data"]["recipients"]
    assert rcpt["outcome"] == "queued" and rcpt["reply"].startswith("451 resend: ")
    assert queued["data"]["attempts"] == 1  # the in-session attempt
    assert failed["type"] == "message.failed"
    [record] = records(relay)
    data = failed["data"]
    assert data["attempts"] == len(record.attempts) >= 2
    assert data["outcome"] == "refused" and data["delivery_id"] is not None
    [rcpt] = data["recipients"]
    assert rcpt["outcome"] == "refused" and rcpt["reply"].startswith("550 5.4.7")
    assert balance(relay) == 10
    assert len(receiver.requests) == 2  # no message.refused beside it


def test_a_cancelled_message_is_told_failed(relay_factory, resend, receiver):
    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",
        **WEBHOOK_ENV,
    )
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, "message.failed")
    resend.fail(500, "internal_server_error")
    assert send(relay, token=token) == QUEUED
    [item] = relay.store.queue_list()
    assert relay.store.cancel(item["id"]) == 1
    [failed] = events(receiver, hook["secret"], "message.failed")
    assert failed["type"] == "message.failed"
    assert failed["data"]["recipients"][0]["outcome"] == "refused"
    assert balance(relay) == 10


def test_a_full_queue_tells_no_queued_event(relay_factory, resend, receiver):
    from test_channels import mail

    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",
        RELAY_QUEUE_MAX_MESSAGES="1",
        **WEBHOOK_ENV,
    )
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, None)
    resend.fail(500, "internal_server_error")
    resend.fail(500, "internal_server_error")
    assert send(relay, token=token) == QUEUED
    assert send(relay, mail("<two@example.com>"), token=token).startswith("451 4.3.0")
    queued, deferred = events(receiver, hook["secret"], "message.queued", "message.deferred")
    assert queued["data"]["message_id"] == MESSAGE_ID
    assert deferred["data"]["message_id"] == "<two@example.com>"
    assert len(receiver.requests) == 2


def test_messages_queued_for_resend_go_out_in_one_batch(relay_factory, resend, receiver):
    from test_channels import mail

    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="100",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",
        **WEBHOOK_ENV,
    )
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, "message.failed")
    resend.invalid_to = {"bad@dest.test"}
    ids = [f"<m{n}@example.com>" for n in range(50)]
    for n, message_id in enumerate(ids):
        resend.fail(500, "internal_server_error")  # the outage: each in-session try
        to = "bad@dest.test" if n == 7 else RCPT
        assert send(relay, mail(message_id, to=to), (to,), token=token).startswith("250 2.0.0 Q")
    assert len(relay.store.queue_list()) == 50 and balance(relay) == 50
    # The outage ends: every message is due at once.
    relay.store.queue_set(None, due_now=True)
    until(lambda: queue_empty(relay), 30)

    [batch] = resend.batches
    assert batch.headers["x-batch-validation"] == "permissive"
    assert batch.headers["idempotency-key"].startswith("relay-batch-")
    assert len(batch.json) == 50
    sent = sorted(e.json["headers"]["Message-ID"] for e in resend.sent)
    assert len(resend.sent) == 49 and sent == sorted(set(sent))  # each once
    assert ids[7] not in sent
    assert balance(relay) == 51  # 49 charged, the refused one refunded
    assert relay.store.pending_count() == 0
    by_id = {e.json["headers"]["Message-ID"]: e.id for e in resend.sent}
    for message_id in ids:
        [record] = relay.store.find_deliveries(Query(message_id=message_id))
        if message_id == ids[7]:
            assert record.outcome == "refused" and record.charged == 0
            assert record.reply.code == 550
        else:
            assert (record.outcome, record.charged) == ("delivered", 1)
            assert record.upstream_id == by_id[message_id]
    [failed] = events(receiver, hook["secret"], "message.failed")
    assert failed["data"]["message_id"] == ids[7]


def test_each_retry_scheduled_is_told_deferred(relay_factory, resend, receiver):
    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="0.2",
        **WEBHOOK_ENV,
    )
    token = relay.token()
    hook = relay.store.add_webhook("acme", receiver.url, None)
    resend.fail(500, "internal_server_error")  # in session
    resend.fail(503, "internal_server_error")  # the first retry
    assert send(relay, token=token) == QUEUED
    until(lambda: queue_empty(relay))
    queued, deferred, delivered = events(
        receiver, hook["secret"], "message.queued", "message.deferred", "message.delivered"
    )
    assert queued["data"]["attempts"] == 1
    data = deferred["data"]
    assert data["message_id"] == MESSAGE_ID and data["outcome"] == "deferred"
    assert data["attempts"] == 2 and data["next_try"].endswith("Z")
    [rcpt] = data["recipients"]
    assert rcpt["outcome"] == "deferred" and rcpt["reply"].startswith("451 ")
    assert delivered["data"]["attempts"] == 3
    assert len(receiver.requests) == 3 and balance(relay) == 9
