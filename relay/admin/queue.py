"""What an operator does with the durable queue (docs/queue.md), once for the CLI and
the admin API: list, show, retry, hold, release and cancel queued messages."""

from __future__ import annotations

from typing import Any

from relay.config import SQLITE_MAX_INT
from relay.errors import Conflict, Invalid, NotFound
from relay.store.audit import Actor
from relay.store.facade import Store
from relay.store.queue import STATES as QUEUE_STATES
from relay.store.queue import QueueItem

QUEUE_ALL = "all"


def _queue_id(value: int | str) -> int:
    """A queued message's id (a positive integer, as `relay queue list` shows it)."""
    text = str(value).strip()
    if not text.isdigit() or not 0 < int(text) <= SQLITE_MAX_INT:
        raise Invalid(f"not a queued message's id: {value!r}", code="bad_id")
    return int(text)


def queue_list(
    store: Store, *, state: str | None = None, account: str | None = None
) -> list[QueueItem]:
    """Queued messages, oldest first, with their attempts, next try and recipients done."""
    if state is not None and state not in QUEUE_STATES:
        raise Invalid(f"state: one of {', '.join(QUEUE_STATES)}", code="bad_state")
    return store.queue_list(state, account)


def queue_show(store: Store, queue_id: int | str) -> QueueItem:
    row = store.queue_get(_queue_id(queue_id))
    if row is None:
        raise NotFound(f"no queued message {queue_id}", code="no_such_message")
    return row


def queue_set(store: Store, actor: Actor, target: int | str | None, action: str) -> dict[str, Any]:
    """`retry` (due now), `hold` or `release` one queued message, or all (`target` None
    or "all"); the count changed. One id that matches nothing is `NotFound`."""
    ids = None if target is None or target == QUEUE_ALL else [_queue_id(target)]
    if action == "retry":
        changed = store.queue_set(ids, due_now=True)
    else:
        changed = store.queue_set(ids, state="held" if action == "hold" else "queued")
    if ids is not None and not changed:
        raise NotFound(f"no queued message {ids[0]}", code="no_such_message")
    store.record_audit(actor, f"queue.{action}", QUEUE_ALL if ids is None else str(ids[0]))
    return {"action": action, "changed": changed}


def queue_cancel(store: Store, actor: Actor, queue_id: int | str) -> dict[str, Any]:
    """End a queued message: what was delivered stays charged, the rest is refunded, a
    final record says `550 5.0.0`. Refused (`Conflict`) while an attempt holds it."""
    number = _queue_id(queue_id)
    refund = store.cancel(number)
    if refund is None:
        if store.queue_get(number) is None:
            raise NotFound(f"no queued message {number}", code="no_such_message")
        raise Conflict(
            f"queued message {number} is being attempted; try again when it is done",
            code="attempt_running",
        )
    store.record_audit(actor, "queue.cancel", str(number), {"refunded": refund})
    return {"id": number, "cancelled": True, "refunded": refund}
