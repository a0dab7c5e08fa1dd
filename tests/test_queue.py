"""The durable queue (RELAY_QUEUE): a message no channel can take now is kept on disk
before its 250, retried with backoff, and ends delivered exactly once, refused, or
failed at its max age with the undelivered part refunded (docs/queue.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_adminapi import admin_for  # noqa: F401 - a fixture
from test_channels import MESSAGE_ID, RCPT, balance, mail, resend_env, send, wrap_hook

from relay.store.deliveries import Query
from tests.fake_upstreams import FakeResend

QUEUED = f"250 2.0.0 Queued as {MESSAGE_ID}; delivery will be retried"
pytestmark = pytest.mark.backends


@pytest.fixture
def resend() -> Iterator[FakeResend]:
    with FakeResend() as fake:
        yield fake


def until(check: Any, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def queue_empty(relay: Any) -> bool:
    return relay.store.queue_list() == []


def records(relay: Any) -> list[Any]:
    return relay.store.find_deliveries(Query(message_id=MESSAGE_ID))


def test_every_channel_down_is_queued_then_delivered_once(relay_factory, resend, sink):
    relay = relay_factory(
        **resend_env(resend),
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="0.2",
    )
    resend.fail(500, "internal_server_error")
    resend.fail(500, "internal_server_error")
    down = [2]  # the sink defers MAIL twice: in session, and on the first retry

    def defer(server: Any) -> str | None:
        if down[0]:
            down[0] -= 1
            return "421 4.3.2 service not available"
        return None

    wrap_hook(sink, "MAIL", defer)

    assert send(relay) == QUEUED
    assert balance(relay) == 9  # reserved, owned by the queue
    [item] = relay.store.queue_list()
    assert item["state"] == "queued" and item["recipients"] == [RCPT]
    assert [a[0] for a in item["attempts"]] == ["resend", "smtp"]

    until(lambda: queue_empty(relay))

    total = len(resend.sent) + len(sink.messages)
    assert total == 1  # exactly once, whichever channel came back first
    assert balance(relay) == 9
    [record] = records(relay)
    assert record.outcome == "delivered" and record.charged == 1
    assert len(record.attempts) >= 3
    assert relay.store.pending_count() == 0


def test_always_queues_after_the_charge_and_delivers_in_the_background(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", RELAY_QUEUE="always"
    )
    assert send(relay) == QUEUED
    until(lambda: queue_empty(relay) and len(sink.messages) == 1)
    assert balance(relay) == 9
    assert relay.store.pending_count() == 0
    [record] = records(relay)
    assert (record.channel, record.outcome, record.charged) == ("smtp", "delivered", 1)


def test_past_its_max_age_a_message_fails_and_is_refunded(relay_factory, resend):
    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="0.2",
        RELAY_QUEUE_MAX_AGE="1.5",
    )
    for _ in range(50):
        resend.fail(503, "internal_server_error")

    assert send(relay) == QUEUED
    until(lambda: queue_empty(relay))

    assert resend.sent == []
    assert balance(relay) == 10
    assert relay.store.pending_count() == 0
    [record] = records(relay)
    assert record.outcome == "refused" and record.charged == 0
    assert (record.reply.code, record.reply.enhanced) == (550, "5.4.7")
    assert len(record.attempts) >= 2


def test_a_full_queue_answers_in_session(relay_factory, resend):
    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",
        RELAY_QUEUE_MAX_MESSAGES="1",
    )
    resend.fail(500, "internal_server_error")
    resend.fail(500, "internal_server_error")
    assert send(relay) == QUEUED

    assert send(relay, mail("<two@example.com>")) == "451 4.3.0 resend: upstream error (HTTP 500)"
    assert balance(relay) == 9  # the queued one stays reserved; the other refunded
    assert len(relay.store.queue_list()) == 1


def test_a_permanent_refusal_is_never_queued(relay_factory, resend):
    relay = relay_factory(**resend_env(resend), DEFAULT_SEND_BALANCE="10", RELAY_QUEUE="on-failure")
    resend.fail(422, "invalid_parameter", "Invalid `to` field.")
    assert send(relay).startswith("550 5.1.")
    assert queue_empty(relay)
    assert balance(relay) == 10


def test_the_stale_sweep_never_refunds_a_queued_charge(relay_factory, resend):
    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",
    )
    resend.fail(500, "internal_server_error")
    assert send(relay) == QUEUED
    assert relay.store.settle_stale(older_than=-10, dead_after=-10) == []
    assert balance(relay) == 9
    assert len(relay.store.queue_list()) == 1


def test_operators_hold_release_retry_and_cancel_from_the_cli(relay_factory, resend):
    from test_cli import ok, relay_cli

    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",
    )
    env = {"RELAY_DATABASE": str(relay.relay.settings.database)}
    resend.fail(500, "internal_server_error")
    resend.fail(500, "internal_server_error")
    assert send(relay) == QUEUED
    assert send(relay, mail("<two@example.com>")) == (
        "250 2.0.0 Queued as <two@example.com>; delivery will be retried"
    )
    first, second = (r["id"] for r in relay.store.queue_list())
    assert balance(relay) == 8

    assert "1 message(s) held" in ok(relay_cli("queue", "hold", str(first), env=env))
    listed = [
        json.loads(line) for line in ok(relay_cli("queue", "list", "--json", env=env)).splitlines()
    ]
    assert [(r["id"], r["state"]) for r in listed] == [(first, "held"), (second, "queued")]
    assert "1 message(s) due now" in ok(relay_cli("queue", "retry", str(first), env=env))
    time.sleep(1.5)  # held: even due, the worker does not touch it
    assert resend.sent == []
    shown = ok(relay_cli("queue", "show", str(first), env=env))
    assert "state       held" in shown and "1. resend  451 4.3.0" in shown

    ok(relay_cli("queue", "release", str(first), env=env))
    until(lambda: [r["id"] for r in relay.store.queue_list()] == [second])
    assert len(resend.sent) == 1
    assert balance(relay) == 8

    assert "refunded 1" in ok(relay_cli("queue", "cancel", str(second), env=env))
    assert queue_empty(relay)
    assert balance(relay) == 9
    [cancelled] = relay.store.find_deliveries(Query(message_id="<two@example.com>"))
    assert (cancelled.reply.code, cancelled.reply.enhanced) == (550, "5.0.0")
    assert cancelled.charged == 0
    assert relay.store.pending_count() == 0
    missing = relay_cli("queue", "cancel", str(second), env=env)
    assert missing.returncode == 1 and "no queued message" in missing.stderr


@pytest.mark.sqlite_only
def test_kill_9_right_after_the_queued_250_loses_nothing(tmp_path, cert_dir, sink, client_tls):
    import signal
    import smtplib

    from support import SENDER, free_port, message, onboarded, serve, serve_env

    database = tmp_path / "relay.db"
    store, token = onboarded(database)
    port = free_port()
    env = serve_env(
        database,
        cert_dir,
        port,
        **{
            "SMTP_CONFIG": sink.smtp_config(),
            "RELAY_QUEUE": "always",
            "RELAY_QUEUE_BACKOFF": "0.2",
            # A charge pending 4 s after its process is gone would be any start's to
            # refund, were it not the queue's.
            "RELAY_UPSTREAM_TIMEOUT": "1",
            "RELAY_HEARTBEAT_INTERVAL": "1",
            "RELAY_OWNER_DEAD_AFTER": "2",
        },
    )
    down = [True]
    wrap_hook(sink, "MAIL", lambda server: "421 4.3.2 down" if down[0] else None)
    proc, _ = serve(env)
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=30) as client:
            client.login("api_token", token)
            client.mail(SENDER)
            client.rcpt("a@dest.test")
            code, text = client.data(message(extra=f"Message-ID: {MESSAGE_ID}\r\n"))
            proc.send_signal(signal.SIGKILL)  # right after the 250
        assert f"{code} {text.decode()}" == QUEUED
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert store.show_sender(SENDER)["balance"] == 4
    down[0] = False
    proc, _ = serve(env)  # a lease the killed process held is free once its heartbeat is stale
    try:
        until(lambda: store.queue_list() == [] and len(sink.messages) >= 1, 30)
        assert len(sink.messages) == 1
        assert store.show_sender(SENDER)["balance"] == 4  # charged once, not refunded
        assert store.pending_count() == 0
        [record] = store.find_deliveries(Query(message_id=MESSAGE_ID))
        assert (record.outcome, record.charged) == ("delivered", 1)
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()


def test_operators_through_the_api_metrics_and_readyz(relay_factory, resend):
    import httpx

    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
        RELAY_HEARTBEAT_INTERVAL="1",
        RELAY_OWNER_DEAD_AFTER="2",
    )
    base = f"http://127.0.0.1:{relay.relay.admin_port}"
    token = relay.store.create_admin_token(name="tests")["token"]
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def api(method: str, path: str, status: int = 200) -> Any:
        response = http.request(method, "/api/v1/queue" + path)
        assert response.status_code == status, response.text
        return response.json()

    resend.fail(500, "internal_server_error")
    resend.fail(500, "internal_server_error")
    assert send(relay) == QUEUED
    assert send(relay, mail("<two@example.com>")) == (
        "250 2.0.0 Queued as <two@example.com>; delivery will be retried"
    )
    first, _ = (r["id"] for r in api("GET", "")["messages"])
    assert balance(relay) == 8

    assert api("POST", f"/{first}/hold") == {"action": "hold", "changed": 1}
    listed = api("GET", "?state=held")["messages"]
    assert [r["id"] for r in listed] == [first]
    assert api("GET", "?account=nobody")["messages"] == []
    assert api("GET", "?state=gone", 422)["error"]["code"] == "bad_query"
    shown = api("GET", f"/{first}")
    assert shown["state"] == "held" and shown["next_try"] > time.time() + 60
    assert [(a[0], a[1]) for a in shown["attempts"]] == [("resend", 451)]
    assert api("GET", "/999999", 404)["error"]["code"] == "no_such_message"
    assert api("GET", "/nope", 422)["error"]["code"] == "bad_id"
    assert api("POST", "/999999/retry", 404)["error"]["code"] == "no_such_message"

    # /readyz stays ready and says what waits; the gauges say the same.
    def state() -> Any:
        return httpx.get(f"{base}/readyz").json()

    until(lambda: state()["queue"]["held"] == 1, 10)
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200
    assert ready.json()["queue"] == {
        "mode": "on-failure",
        "queued": 1,
        "held": 1,
        "oldest_seconds": ready.json()["queue"]["oldest_seconds"],
    }
    exposed = httpx.get(f"{base}/metrics").text
    assert 'relay_queue_messages{state="held"} 1.0' in exposed
    assert 'relay_queue_messages{state="queued"} 1.0' in exposed
    assert "relay_queue_oldest_seconds " in exposed

    assert api("POST", "/all/retry")["changed"] == 2
    time.sleep(1.5)  # held: even due, the worker does not touch it
    assert [r["id"] for r in api("GET", "")["messages"]] == [first]  # the second went out
    assert len(resend.sent) == 1
    assert api("POST", "/all/release")["changed"] == 1
    until(lambda: api("GET", "")["messages"] == [])
    assert len(resend.sent) == 2 and balance(relay) == 8

    resend.fail(500, "internal_server_error")
    assert send(relay, mail("<three@example.com>")).startswith("250 2.0.0 Queued as")
    [third] = api("GET", "")["messages"]
    assert api("POST", f"/{third['id']}/cancel") == {
        "id": third["id"],
        "cancelled": True,
        "refunded": 1,
    }
    assert balance(relay) == 8
    assert api("POST", f"/{third['id']}/cancel", 404)["error"]["code"] == "no_such_message"
    [cancelled] = relay.store.find_deliveries(Query(message_id="<three@example.com>"))
    assert (cancelled.reply.code, cancelled.reply.enhanced, cancelled.charged) == (550, "5.0.0", 0)
    actions = [r["action"] for r in relay.store.list_audit()]
    assert actions[:4] == ["queue.cancel", "queue.release", "queue.retry", "queue.hold"]
    http.close()


def test_an_accounts_own_queue_mode_overrides_the_relays(relay_factory, resend, admin_for):  # noqa: F811
    from test_cli import ok, relay_cli

    relay = relay_factory(
        **resend_env(resend),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="off",
        RELAY_QUEUE_BACKOFF="3600",
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
    )
    env = {"RELAY_DATABASE": str(relay.relay.settings.database)}
    token = relay.token()  # the account acme
    admin = admin_for(relay, f"http://127.0.0.1:{relay.relay.admin_port}")

    resend.fail(500, "internal_server_error")
    assert send(relay, token=token).startswith("451 ")  # off: answered in session

    assert "queue on-failure" in ok(
        relay_cli("account", "set", "acme", "--queue", "on-failure", env=env)
    )
    resend.fail(500, "internal_server_error")
    assert send(relay, mail("<two@example.com>"), token=token).startswith("250 2.0.0 Queued as")
    assert len(relay.store.queue_list()) == 1

    answer = admin.ok("PATCH", "/accounts/acme", json={"queue": "always"})
    assert answer["name"] == "acme" and answer["queue"] == "always"
    assert send(relay, mail("<three@example.com>"), token=token).startswith(
        "250 2.0.0 Queued as"
    )  # queued even though Resend answers now, and delivered in the background
    until(lambda: [r["message_id"] for r in relay.store.queue_list()] == ["<two@example.com>"])
    assert len(resend.sent) == 1

    assert admin.ok("PATCH", "/accounts/acme", json={"queue": "default"})["queue"] is None
    assert send(relay, mail("<four@example.com>"), token=token).startswith("250 2.0.0 Ok")
    admin.fails("PATCH", "/accounts/acme", 422, "bad_queue", json={"queue": "sometimes"})
    admin.fails("PATCH", "/accounts/nobody", 404, "no_such_account", json={"queue": "off"})
    listed = ok(relay_cli("account", "list", env=env))
    assert "default" in listed.splitlines()[1]
    actions = [(r["action"], r["detail"]) for r in relay.store.list_audit()]
    assert ("account.set", {"queue": "always"}) in actions


def _killable_relay(
    tmp_path: Any, cert_dir: Any, sink: Any
) -> tuple[Any, str, int, dict[str, str]]:
    """A relay process's store, token, port and environment (RELAY_QUEUE=always: the
    worker makes every attempt), for tests that kill -9 it."""

    from support import free_port, onboarded, serve_env

    database = tmp_path / "relay.db"
    store, token = onboarded(database)
    port = free_port()
    env = serve_env(
        database,
        cert_dir,
        port,
        **{
            "SMTP_CONFIG": sink.smtp_config(),
            "RELAY_QUEUE": "always",
            "RELAY_QUEUE_BACKOFF": "0.2",
            "RELAY_UPSTREAM_TIMEOUT": "1",
            "RELAY_HEARTBEAT_INTERVAL": "1",
            "RELAY_OWNER_DEAD_AFTER": "2",
        },
    )
    return store, token, port, env


def _submit(port: int, token: str, client_tls: Any) -> str:
    import smtplib

    from support import SENDER, message

    with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=30) as client:
        client.login("api_token", token)
        client.mail(SENDER)
        client.rcpt("a@dest.test")
        code, text = client.data(message(extra=f"Message-ID: {MESSAGE_ID}\r\n"))
    return f"{code} {text.decode()}"


def _stop(proc: Any, how: Any) -> None:
    if proc.poll() is None:
        proc.send_signal(how)
        proc.wait(30)
    proc.stderr.close()


def _delivered_once_charged_once(store: Any, sink: Any, env: dict[str, str]) -> None:
    """The next start ends the message: on the sink at most twice (SMTP has no
    idempotency key), charged exactly once, nothing pending, one delivered record."""
    import signal

    from support import SENDER
    from test_settle_journal import serve

    proc, _ = serve(env)
    try:
        until(lambda: store.queue_list() == [] and len(sink.messages) >= 1, 30)
        assert 1 <= len(sink.messages) <= 2
        assert store.show_sender(SENDER)["balance"] == 4  # charged once, not refunded
        assert store.pending_count() == 0
        [record] = store.find_deliveries(Query(message_id=MESSAGE_ID))
        assert (record.outcome, record.charged) == ("delivered", 1)
    finally:
        _stop(proc, signal.SIGTERM)


@pytest.mark.sqlite_only
def test_kill_9_while_an_attempt_is_in_flight_loses_nothing(tmp_path, cert_dir, sink, client_tls):
    import signal

    from support import SENDER
    from test_observe import HeldData
    from test_settle_journal import serve

    store, token, port, env = _killable_relay(tmp_path, cert_dir, sink)
    held = HeldData(sink)
    proc, _ = serve(env)
    try:
        assert _submit(port, token, client_tls) == QUEUED
        assert held.arrived.wait(10)  # the worker's attempt: the sink holds its DATA
        [item] = store.queue_list()
        assert item["lease_owner"] is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        held.release.set()  # the sink may still take the copy it was sent: a duplicate
        _stop(proc, signal.SIGKILL)
    assert store.show_sender(SENDER)["balance"] == 4
    assert store.pending_count() == 1  # the queue's reservation, never swept
    _delivered_once_charged_once(store, sink, env)


@pytest.mark.sqlite_only
def test_kill_9_after_the_upstream_accepted_before_the_settle(tmp_path, cert_dir, sink, client_tls):
    import signal
    import sqlite3

    from support import SENDER
    from test_observe import HeldData
    from test_settle_journal import serve

    store, token, port, env = _killable_relay(tmp_path, cert_dir, sink)
    held = HeldData(sink)
    proc, _ = serve(env)
    locker = sqlite3.connect(tmp_path / "relay.db", isolation_level=None, timeout=30)
    try:
        assert _submit(port, token, client_tls) == QUEUED
        assert held.arrived.wait(10)
        locker.execute("BEGIN EXCLUSIVE")  # the end of the attempt cannot be written
        held.release.set()  # the upstream accepts
        until(lambda: len(sink.messages) == 1, 10)
        proc.send_signal(signal.SIGKILL)  # before the settle could commit
        proc.wait(30)
    finally:
        locker.close()
        _stop(proc, signal.SIGKILL)
    assert store.show_sender(SENDER)["balance"] == 4  # neither refunded nor settled yet
    assert store.queue_list() != []
    _delivered_once_charged_once(store, sink, env)
