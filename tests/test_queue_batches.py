"""kill -9 of a relay sending queued messages to Resend in one batch (`POST /emails/batch`):
the batch (its key, its members in order, its body) is kept before the request goes
out, so the next start sends exactly that request again and Resend, which keeps a
key 24 hours and answers the same key and body with its first answer
(resend.com/docs/dashboard/emails/idempotency-keys), sends nothing twice. The fake
Resend (tests/fake_upstreams.py) answers a different body under a known key 409
`invalid_idempotent_request` and a key still in progress 409
`concurrent_idempotent_requests`, as Resend documents."""

from __future__ import annotations

import signal
import smtplib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import SENDER, free_port, message, onboarded, serve, serve_env
from test_channels import RCPT, resend_env

from relay.store.deliveries import Query
from tests.fake_upstreams import FakeResend

pytestmark = pytest.mark.sqlite_only
MESSAGES = 5
LATE = "<late@example.com>"
QUEUED = "2.0.0 Queued as {}; delivery will be retried"
BALANCE = 20


@pytest.fixture
def resend() -> Iterator[FakeResend]:
    with FakeResend() as fake:
        yield fake


def until(check: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def ids() -> list[str]:
    return [f"<b{n}@example.com>" for n in range(MESSAGES)]


def relay_env(tmp_path: Path, cert_dir: Path, resend: FakeResend) -> tuple[Any, str, int, dict]:
    """A relay process's store, token, port and environment: Resend its only channel,
    RELAY_QUEUE=on-failure with an hour's backoff (a message waits until the test
    makes it due), its owner dead 2 s after it stops beating."""
    database = tmp_path / "relay.db"
    store, token = onboarded(database, balance=BALANCE)
    port = free_port()
    env = serve_env(
        database,
        cert_dir,
        port,
        **resend_env(resend),
        RELAY_QUEUE="on-failure",
        RELAY_QUEUE_BACKOFF="3600",
        RELAY_UPSTREAM_TIMEOUT="1",
        RELAY_HEARTBEAT_INTERVAL="1",
        RELAY_OWNER_DEAD_AFTER="2",
    )
    return store, token, port, env


def queue(port: int, token: str, client_tls: Any, resend: FakeResend, *message_ids: str) -> None:
    """Messages queued during a Resend outage (each in-session try answered 500)."""
    with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=30) as client:
        client.login("api_token", token)
        for message_id in message_ids:
            resend.fail(500, "internal_server_error")
            client.mail(SENDER)
            client.rcpt(RCPT)
            code, text = client.data(message(to=RCPT, extra=f"Message-ID: {message_id}\r\n"))
            assert (code, text.decode()) == (250, QUEUED.format(message_id))


def queue_all(store: Any, port: int, token: str, client_tls: Any, resend: FakeResend) -> None:
    """MESSAGES messages queued during a Resend outage, then all due at once: the
    worker's next claim takes them together, one batch."""
    queue(port, token, client_tls, resend, *ids())
    assert len(store.queue_list()) == MESSAGES
    assert store.show_sender(SENDER)["balance"] == BALANCE - MESSAGES
    resend.requests.clear()
    store.queue_set(None, due_now=True)


def wait_dead(env: dict[str, str]) -> None:
    """Until the killed relay counts as dead (RELAY_OWNER_DEAD_AFTER): its leases are
    free, so the next start's first claim finds every message due at once."""

    def dead() -> bool:
        with sqlite3.connect(env["RELAY_DATABASE"]) as db:
            (last,) = db.execute("SELECT max(heartbeat) FROM processes").fetchone()
        return last is None or last < time.time() - 3

    until(dead)


def stop(proc: Any, how: signal.Signals) -> None:
    if proc.poll() is None:
        proc.send_signal(how)
        proc.wait(30)
    assert proc.stderr is not None
    proc.stderr.close()


def exactly_once(store: Any, resend: FakeResend, env: dict[str, str]) -> None:
    """A new start ends every message: each reached Resend once, each charged once,
    nothing pending, nothing left in the queue or its batches. LATE, queued while
    the batch was in flight, is due with it: a batch formed anew would take it in
    (another key: the batch's messages sent twice)."""
    store.queue_set(None, due_now=True)
    wait_dead(env)
    proc, _ = serve(env)
    try:
        until(lambda: store.queue_list() == [])
    finally:
        stop(proc, signal.SIGTERM)
    sent = sorted(e.json["headers"]["Message-ID"] for e in resend.sent)
    assert sent == sorted([*ids(), LATE])  # each once: no duplicate, none lost
    assert store.show_sender(SENDER)["balance"] == BALANCE - MESSAGES - 1
    assert store.pending_count() == 0
    for message_id in [*ids(), LATE]:
        [record] = store.find_deliveries(Query(message_id=message_id))
        assert (record.outcome, record.charged) == ("delivered", 1)
    with sqlite3.connect(env["RELAY_DATABASE"]) as db:
        assert db.execute("SELECT count(*) FROM queue_batches").fetchone() == (0,)
    # Every batch request the relay made was this one: the same key, the same body.
    batches = {(r.headers["idempotency-key"], r.body) for r in resend.batches}
    assert len(batches) == 1
    assert len(resend.sent) == MESSAGES + 1


def test_kill_9_after_resend_answered_a_batch_before_the_settle(
    tmp_path, cert_dir, client_tls, resend
):
    store, token, port, env = relay_env(tmp_path, cert_dir, resend)
    proc, log = serve(env)
    locker = sqlite3.connect(env["RELAY_DATABASE"], isolation_level=None, timeout=30)
    try:
        resend.hold = threading.Event()
        queue_all(store, port, token, client_tls, resend)
        until(lambda: len(resend.batches) == 1)  # in flight; the batch is on disk
        queue(port, token, client_tls, resend, LATE)
        locker.execute("BEGIN EXCLUSIVE")  # the end of each message cannot be written
        hold, resend.hold = resend.hold, None
        hold.set()  # Resend sends and answers
        assert log.wait_for(lambda lines: any("batch of 5 sent" in x for x in lines), 10)
        proc.send_signal(signal.SIGKILL)  # before the settle could commit
        proc.wait(30)
    finally:
        locker.close()
        stop(proc, signal.SIGKILL)
    assert len(resend.sent) == MESSAGES
    assert len(store.queue_list()) == MESSAGES + 1  # not settled, not refunded
    assert store.show_sender(SENDER)["balance"] == BALANCE - MESSAGES - 1
    exactly_once(store, resend, env)
    assert len(resend.batches) == 2  # the first, and the same request again


def test_kill_9_while_the_batch_request_is_in_flight(tmp_path, cert_dir, client_tls, resend):
    store, token, port, env = relay_env(tmp_path, cert_dir, resend)
    proc, _ = serve(env)
    hold = resend.hold = threading.Event()
    try:
        queue_all(store, port, token, client_tls, resend)
        until(lambda: len(resend.batches) == 1)  # Resend has it, still in progress
        queue(port, token, client_tls, resend, LATE)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc, signal.SIGKILL)
    resend.hold = None
    assert len(resend.sent) == MESSAGES  # Resend took them; the relay never heard
    # The next start sends the batch again while Resend is still on the first
    # request: 409 concurrent_idempotent_requests, a short wait (the backoff),
    # again; once the first request is done, its answer.
    store.queue_set(None, due_now=True)
    wait_dead(env)
    proc, _ = serve({**env, "RELAY_QUEUE_BACKOFF": "0.2"})
    try:
        until(lambda: len(resend.batches) >= 3)  # the first, and two 409s at least
        assert store.show_sender(SENDER)["balance"] == BALANCE - MESSAGES - 1
        hold.set()
        until(lambda: store.queue_list() == [])
    finally:
        hold.set()
        stop(proc, signal.SIGTERM)
    exactly_once(store, resend, env)
