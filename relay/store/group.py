"""Group commit: the writes sessions ask for during a few turns of the loop, in one
transaction, each in a savepoint of its own (`relay.store.loop.AsyncStore` gathers
them; docs/balances.md, "Group commit"; docs/postgres.md for PostgreSQL).

On PostgreSQL a group holds the row locks of all its writes until it commits,
and relays on other hosts run groups of their own: so a group first locks the
shared rows its writes will change, in one global order (`Ledger.lock_rows`:
senders, then token rate windows, then send-limit windows, the relay-wide ones
last), and the writes then find them held. A row that could not be known
beforehand can still close a cycle (a sender's first row, a sweep's refund);
PostgreSQL then aborts one transaction (deadlock detected), and the group runs
again from the start: nothing of the aborted attempt was written, and no caller
was answered before the commit, so a charge is made once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from relay.errors import StoreBusy, StoreError
from relay.store.facade import Store

log = logging.getLogger("relay.store")

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


# A PostgreSQL group aborted by a deadlock or serialization failure runs again this
# many times, then one write per transaction.
GROUP_RETRIES = 3


def commit_group(store: Store, group: list[Write]) -> list[tuple[bool, Any]]:
    """`_commit_group` on SQLite; on PostgreSQL with its locks taken first and its
    retries (the module docstring)."""
    if not store.is_postgres:
        return _commit_group(store, group)
    from relay.store.postgres import GroupAborted

    for attempt in range(1, GROUP_RETRIES + 1):
        try:
            return _commit_group(store, group, prelock=True)
        except GroupAborted as exc:
            if exc.unavailable:
                failure = StoreError(f"database unavailable: {exc}")
                failure.__cause__ = exc.__cause__  # an outage, logged as one
                return [(False, failure)] * len(group)
            if not exc.retry:
                log.warning("a group commit failed (%s); its writes run one at a time", exc)
                break
            log.info("a group commit was aborted (%s), attempt %d; running it again", exc, attempt)
    # Alone, each write gets its own outcome (a statement's failure is its own).
    return [_alone(store, write) for write in group]


def _alone(store: Store, write: Write) -> tuple[bool, Any]:
    try:
        return True, write.fn(store, *write.args, **write.kwargs)
    except Exception as exc:
        return False, exc


def _lock_keys(
    group: list[Write],
) -> tuple[list[tuple[str, int, str | None]], list[tuple[int, int]]]:
    """The charges' (sender, account, token), the settles' (reservation id, delivered)."""
    charges: list[tuple[str, int, str | None]] = []
    settles: list[tuple[int, int]] = []
    for write in group:
        if write.fn is Store.reserve:
            kwargs = write.kwargs
            charges.append((write.args[0], kwargs["account_id"], kwargs.get("token_id")))
        elif write.fn is Store.settle:
            settles.append((int(write.args[0]), int(write.args[1])))
    return charges, settles


def _commit_group(
    store: Store, group: list[Write], prelock: bool = False
) -> list[tuple[bool, Any]]:
    """Run `group`'s writes on `store` in one transaction: (True, result) or
    (False, the exception) for each.

    A write that raises is rolled back alone (`Database.batch`). If the
    transaction fails as a whole (its commit, or SQLite ending it), nothing of
    it was written: each write that had succeeded gets that failure instead.
    Raises `StoreBusy`, having run nothing, when the lock is held elsewhere.
    """
    outcomes: list[tuple[bool, Any]] = []
    aborted: tuple[type[BaseException], ...] = ()
    if store.is_postgres:
        from relay.store.postgres import GroupAborted

        aborted = (GroupAborted,)
    # SQLite's fsync of the log for a group holding a durable write (PostgreSQL's
    # commit is always durable).
    durable = not store.is_postgres and any(write.durable for write in group)
    if durable:
        store.db.execute("PRAGMA synchronous = FULL")
    try:
        with store.batch():
            if prelock:
                store.savepoint = False  # reads and locks: nothing to roll back alone
                store.lock_rows(*_lock_keys(group))
                store.prefetch_charges(
                    [write.kwargs for write in group if write.fn is Store.reserve]
                )
            for write in group:
                # A charge may refuse after its first statements: its own savepoint.
                store.savepoint = not prelock or write.fn is Store.reserve
                try:
                    result = write.fn(store, *write.args, **write.kwargs)
                except aborted:
                    raise  # the whole transaction is rolled back: the caller runs it again
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
        store.savepoint = True
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
