"""The queue's worker at rest and at work: what an idle queue costs each process, the
events the queue sends (docs/events.md), and Resend's batch sending (docs/queue.md)."""

from __future__ import annotations

from typing import Any

import pytest
from test_channels import balance, send
from test_queue import QUEUED, queue_empty, records, until

pytestmark = pytest.mark.backends


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
