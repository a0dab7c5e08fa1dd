"""Group commit: the writes sessions ask for during a few turns of the loop, in one
transaction, each in a savepoint of its own (`relay.store.loop.AsyncStore` gathers
them; docs/balances.md, "Group commit").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from relay.errors import StoreBusy, StoreError
from relay.store.facade import Store

# The most writes one group commit takes (`AsyncStore`); the rest wait for the next.
GROUP_MAX = 64
# A group gathers writes for this many turns of the event loop. Idle, a turn
# takes microseconds, so a lone write waits for nothing; under load each turn
# serves many sessions, and three turns gather about ten writes (measured: 2 KiB
# messages, 50 sessions), a commit then costing each a fraction of what one
# turn's group did (docs/performance.md).
GROUP_TURNS = 3


class Write:
    """A write waiting for the next group commit."""

    __slots__ = ("args", "durable", "fn", "future", "kwargs")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Any,
        kwargs: dict[str, Any],
        future: asyncio.Future[Any],
        durable: bool = False,
    ) -> None:
        self.fn, self.args, self.kwargs, self.future = fn, args, kwargs, future
        # Its commit must be on disk before its caller answers (a queued message's
        # 250): the group commits with SQLite's synchronous=FULL (the WAL fsync'd).
        self.durable = durable


def commit_group(store: Store, group: list[Write]) -> list[tuple[bool, Any]]:
    """Run `group`'s writes on `store` in one transaction: (True, result) or
    (False, the exception) for each.

    A write that raises is rolled back alone (`Database.batch`). If the
    transaction fails as a whole (its commit, or SQLite ending it), nothing of
    it was written: each write that had succeeded gets that failure instead.
    Raises `StoreBusy`, having run nothing, when the lock is held elsewhere.
    """
    outcomes: list[tuple[bool, Any]] = []
    durable = any(write.durable for write in group)
    if durable:
        store.db.execute("PRAGMA synchronous = FULL")
    try:
        with store.batch():
            for write in group:
                try:
                    result = write.fn(store, *write.args, **write.kwargs)
                except Exception as exc:
                    outcomes.append((False, exc))
                else:
                    outcomes.append((True, result))
    except StoreBusy:
        if not outcomes:
            raise  # the lock was held: nothing ran
        return [(False, StoreBusy("the group's commit found the database locked"))] * len(group)
    except StoreError as exc:
        outcomes += [(True, None)] * (len(group) - len(outcomes))
        return [(False, exc) if ok else (ok, value) for ok, value in outcomes]
    finally:
        if durable:
            store.db.execute("PRAGMA synchronous = NORMAL")
    return outcomes


def answer(group: list[Write], outcomes: list[tuple[bool, Any]] | BaseException) -> None:
    """Give each write of a group its result, its own exception, or the group's."""
    for index, write in enumerate(group):
        if write.future.done():
            continue
        if isinstance(outcomes, BaseException):
            write.future.set_exception(outcomes)
            continue
        ok, value = outcomes[index]
        if ok:
            write.future.set_result(value)
        else:
            write.future.set_exception(value)
