"""A delivered message stays charged when the database cannot take its settle.

The settle is retried in the background while the relay runs, and journaled
(fsync'd beside the database) before the client gets its 250, so a SIGTERM or
a SIGKILL during a database outage loses nothing: the next start applies the
journal before its stale-charge sweep, which then finds nothing to refund.
"""

from __future__ import annotations

import signal
import sqlite3
import threading

import pytest
from support import SENDER, attempt, free_port, message, onboarded, serve, serve_env
from test_database import allow_settles, fail_settles, wait_for
from test_lifecycle import HeldData

from relay.store.deliveries import Query
from relay.store.facade import Store

pytestmark = pytest.mark.backends


def records(store: Store) -> list:
    return store.find_deliveries(Query(limit=10))


def test_a_settle_that_keeps_failing_is_retried_until_the_store_takes_it(relay, sink):
    relay.store.set_sender(SENDER, balance=5)
    fail_settles(relay.store)
    raw = relay.raw()
    raw.login(relay.token())
    assert attempt(raw).startswith("250 2.0.0 Ok <")
    # The first attempt and two background retries (0.5 s, then 1 s later) fail.
    wait_for(lambda: relay.relay.store.settle_failures >= 3)
    assert relay.store.pending_count() == 1
    allow_settles(relay.store)
    wait_for(lambda: relay.store.pending_count() == 0)
    assert relay.store.show_sender(SENDER)["balance"] == 4
    [record] = records(relay.store)
    assert (record.outcome, record.charged) == ("delivered", 1)
    # The retry's task leaves the settling set once its commit returned on the loop,
    # a moment after the commit is visible here.
    wait_for(lambda: relay.relay.store.settling == 0)


def test_a_settle_pending_at_stop_is_applied_by_the_next_start(relay_factory, sink, database_url):
    first = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_DATABASE=database_url)
    first.store.set_sender(SENDER, balance=5)
    fail_settles(first.store)
    raw = first.raw()
    raw.login(first.token())
    assert attempt(raw).startswith("250 2.0.0 Ok <")
    first.call(first.relay.stop())
    allow_settles(first.store)
    assert first.store.pending_count() == 1
    # The stopped process retired its heartbeat: without the journal, this
    # start's sweep would refund the row in full.
    second = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), RELAY_DATABASE=database_url, RELAY_OWNER_DEAD_AFTER="20"
    )
    assert second.store.pending_count() == 0
    assert second.store.show_sender(SENDER)["balance"] == 4
    [record] = records(second.store)
    assert (record.outcome, record.charged) == ("delivered", 1)
    assert len(sink.messages) == 1


# --- a real relay process, a real lock held by another connection --------------------------


@pytest.mark.sqlite_only
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_relay_stopped_during_a_database_lock_keeps_the_charge(
    stop, tmp_path, cert_dir, sink, client_tls
):
    database = tmp_path / "relay.db"
    store, token = onboarded(database)
    port = free_port()
    env = serve_env(
        database,
        cert_dir,
        port,
        **{
            "SMTP_CONFIG": sink.smtp_config(),
            # A charge pending 6 s after its process is gone is any start's to refund
            # (stale_after: twice the 2 s forward budget plus the owner's 2 s).
            "RELAY_UPSTREAM_TIMEOUT": "1",
            "RELAY_HEARTBEAT_INTERVAL": "1",
            "RELAY_OWNER_DEAD_AFTER": "2",
        },
    )
    held = HeldData(sink)
    proc, log = serve(env)
    replies: list[tuple[int, bytes]] = []

    def send() -> None:
        import smtplib

        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=60) as client:
            client.login("api_token", token)
            client.mail(SENDER)
            client.rcpt("a@dest.test")
            replies.append(client.data(message()))

    sender = threading.Thread(target=send)
    locker = sqlite3.connect(database, isolation_level=None, timeout=30)
    try:
        sender.start()
        assert held.arrived.wait(10)  # charged; the upstream holds the message
        locker.execute("BEGIN EXCLUSIVE")
        held.release.set()  # the upstream accepts; the settle finds the database locked
        sender.join(60)
        assert replies and replies[0][0] == 250, replies
        assert len(sink.messages) == 1
        proc.send_signal(stop)
        proc.wait(60)
    finally:
        locker.close()  # the outage ends: the transaction rolls back, the lock goes
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    first_log = log.text()
    proc.stderr.close()
    if stop == signal.SIGTERM:
        assert "1 reservation(s) still unsettled at stop; kept in" in first_log, first_log
    assert store.pending_count() == 1
    assert store.show_sender(SENDER)["balance"] == 4
    proc, log = serve(env)  # the sweep at start would refund the row: it is stale, its owner gone
    try:
        assert store.pending_count() == 0
        assert store.show_sender(SENDER)["balance"] == 4  # charged once, not refunded
        [record] = records(store)
        assert (record.outcome, record.charged, record.reply.code) == ("delivered", 1, 250)
        assert "refunded a charge" not in "".join(log.lines)
        assert list((tmp_path / "relay.db-settles").glob("*.jsonl")) != []  # the new process's
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    log.text()
    proc.stderr.close()
    assert list((tmp_path / "relay.db-settles").glob("*.jsonl")) == []  # applied, then removed
    store.close()
