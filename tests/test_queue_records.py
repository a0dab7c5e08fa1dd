"""What a queued message's end writes: its final record names the port it came in on;
an end the store refuses at first is written later, never paid for with a second
send; and with the delivery log off no message event is written (docs/events.md:
"with the log off no message event is written")."""

from __future__ import annotations

import asyncio
import smtplib
import time
from typing import Any

import pytest
from support import SENDER, message
from test_channels import MESSAGE_ID, RCPT, balance, send, wrap_hook
from test_events import WEBHOOK_ENV
from test_queue import QUEUED, queue_empty, records, until

from relay.errors import StoreError
from relay.store.deliveries import Query

pytestmark = pytest.mark.backends


def test_a_queued_message_keeps_the_port_it_came_in_on(relay_factory, sink, client_tls):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="always",
        RELAY_STARTTLS_LISTEN="127.0.0.1:0",
    )
    token = relay.token()
    with smtplib.SMTP("127.0.0.1", relay.relay.starttls_port, timeout=10) as client:
        client.starttls(context=client_tls)
        client.login("api_token", token)
        client.mail(SENDER)
        client.rcpt(RCPT)
        code, text = client.data(message(extra=f"Message-ID: {MESSAGE_ID}\r\n"))
    assert f"{code} {text.decode()}" == QUEUED
    until(lambda: queue_empty(relay) and len(records(relay)) == 1)
    [record] = records(relay)
    assert (record.outcome, record.listener) == ("delivered", "submission")
    # The queue's totals (its bounds' count) follow it back to empty.
    [totals] = relay.store._read("SELECT messages, bytes FROM queue_totals", ())
    assert (totals["messages"], totals["bytes"]) == (0, 0)


def test_an_end_the_store_refuses_is_written_later_never_sent_again(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", RELAY_QUEUE="always"
    )
    worker = relay.relay.queue
    # A lease that runs out at once: were the message attempted again after its
    # end failed to be written, it would be now.
    worker.lease_seconds = 1
    real = worker.store.finish_many
    calls: list[int] = []

    async def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= 3:
            raise StoreError("database is locked")
        return await real(*args, **kwargs)

    worker.store.finish_many = failing  # the worker writes its ends in groups
    assert send(relay, token=relay.token()) == QUEUED
    until(lambda: queue_empty(relay) and len(records(relay)) == 1)
    assert len(calls) == 4
    assert len(sink.messages) == 1  # one send: the SMTP upstream has no idempotency key
    [record] = records(relay)
    assert (record.outcome, record.charged) == ("delivered", 1)
    assert balance(relay) == 9 and relay.store.pending_count() == 0


def test_messages_that_end_meanwhile_are_written_in_one_transaction(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="10", RELAY_QUEUE="always"
    )
    worker = relay.relay.queue
    real, real_write = worker.store.finish_many, worker._ends.write
    groups: list[int] = []
    asked: list[int] = []
    all_asked = asyncio.Event()

    async def counted(end: Any) -> Any:
        asked.append(1)
        if len(asked) == 4:
            all_asked.set()
        return await real_write(end)

    async def held(ends: Any) -> Any:
        # The first end is written once the next three wait for it (four messages:
        # claimed together or apart, never more claims than the worker keeps out).
        if not groups:
            await asyncio.wait_for(all_asked.wait(), 10)
        groups.append(len(ends))
        return await real(ends)

    worker._ends.write = counted
    worker.store.finish_many = held
    token = relay.token()
    for _ in range(4):
        assert send(relay, token=token) == QUEUED
    until(lambda: queue_empty(relay) and len(records(relay)) == 4)
    assert groups == [1, 3]
    assert len(sink.messages) == 4
    assert {r.outcome for r in records(relay)} == {"delivered"}
    assert balance(relay) == 6 and relay.store.pending_count() == 0


def test_with_the_delivery_log_off_the_queue_writes_no_message_event(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="10",
        RELAY_QUEUE="always",
        RELAY_QUEUE_BACKOFF="0.2",
        RELAY_LOG_RETENTION_DAYS="0",
        **WEBHOOK_ENV,
    )
    token = relay.token()
    relay.store.add_webhook("acme", "http://127.0.0.1:9/hook", None)
    down = [True]
    wrap_hook(sink, "MAIL", lambda server: "421 4.3.2 down" if down[0] else None)
    assert send(relay, token=token) == QUEUED  # message.queued, were the log on
    until(lambda: relay.store.queue_list()[0]["tries"] >= 1)  # message.deferred, likewise
    down[0] = False
    until(lambda: queue_empty(relay) and len(sink.messages) == 1)
    [row] = relay.store._read("SELECT count(*) AS n FROM webhook_outbox", ())
    assert int(row["n"]) == 0
    assert records(relay) == [] and balance(relay) == 9


@pytest.mark.parametrize("unreadable", [False, True], ids=["read", "unreadable-once"])
def test_a_kept_resend_batch_is_sent_again_as_it_was(relay_factory, unreadable):
    """A batch kept by a relay that died (its lease holder gone) is claimed whole and
    sent again: the same key, the same body; each message ends with its answer. A
    batch that cannot be read at first leaves its messages waiting, never sent alone."""
    import json

    from test_channels import resend_env

    from tests.fake_upstreams import FakeResend

    with FakeResend() as resend:
        relay = relay_factory(
            **resend_env(resend),
            DEFAULT_SEND_BALANCE="10",
            RELAY_QUEUE="on-failure",
            RELAY_QUEUE_BACKOFF="3600",
        )
        token = relay.token()
        ids = [f"<k{n}@example.com>" for n in range(3)]
        for message_id in ids:
            resend.fail(500, "internal_server_error")
            reply = send(relay, message(extra=f"Message-ID: {message_id}\r\n"), token=token)
            assert reply.startswith("250 2.0.0 Queued")
        store = relay.store
        # Another relay, alive while it leases them and keeps its batch, then gone.
        now = int(time.time())
        with store._write() as db:
            db.execute("INSERT INTO processes (id, pid, heartbeat) VALUES ('gone-1', 1, ?)", (now,))
            db.execute("UPDATE queue SET next_try = 0")
        rows = store.claim("gone-1", 60, 10)
        assert len(rows) == 3
        items = [
            {"from": SENDER, "to": [RCPT], "subject": "Hi", "text": n, "headers": {"Message-ID": n}}
            for n in ids
        ]
        body = json.dumps(items, ensure_ascii=False)
        queue_ids = [int(r["id"]) for r in sorted(rows, key=lambda r: r["message_id"])]
        assert store.mark_batch("gone-1", "relay-batch-kept", "example.com", queue_ids, body)
        assert store.queue_batch("relay-batch-kept").members == queue_ids
        worker = relay.relay.queue.store
        real = worker.queue_batch
        failures = [1] if unreadable else []

        async def flaky(key: str) -> Any:
            if failures:
                failures.pop()
                raise StoreError("database is locked")
            return await real(key)

        worker.queue_batch = flaky
        resend.requests.clear()
        with store._write() as db:
            db.execute("UPDATE processes SET heartbeat = 0 WHERE id = 'gone-1'")
        if unreadable:
            until(lambda: all(m["tries"] == 2 for m in store.queue_list()))  # they waited
            assert resend.requests == []
            store.queue_set(None, due_now=True)
        until(lambda: queue_empty(relay))
        assert [r.path for r in resend.requests] == ["/emails/batch"]
        [batch] = resend.batches
        assert batch.headers["idempotency-key"] == "relay-batch-kept"
        assert batch.body == body.encode()
        assert [e.json["text"] for e in resend.sent] == ids
        for message_id, email in zip(ids, resend.sent, strict=True):
            [record] = relay.store.find_deliveries(Query(message_id=message_id))
            assert (record.outcome, record.upstream_id) == ("delivered", email.id)
        assert store.queue_batch("relay-batch-kept") is None
        assert balance(relay) == 7
