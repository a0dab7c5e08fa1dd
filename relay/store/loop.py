"""The store for the event loop: `AsyncStore`, each call typed and awaited.

The loop calls `await store.check_mail(...)`, `await store.reserve(...)`: one
method per call the relay makes while it serves, with the signature of the
`Store` method it runs. Which connection and which thread run it, and the
group commit of writes, stay inside this module.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from relay import metrics
from relay.errors import RelayError, StoreBusy, StoreError
from relay.store.db import expected_failure, is_read_only
from relay.store.deliveries import DeliveryRecord
from relay.store.facade import Store
from relay.store.group import GROUP_MAX, GROUP_TURNS, Write, answer, commit_group
from relay.store.journal import PendingSettle, SettleJournal
from relay.store.ledger import MailCheck, Reservation
from relay.store.outbox import DueEvent
from relay.store.queue import End, Keep, QueueBatch, QueuedMessage, QueueStats
from relay.store.suppressions import Suppression
from relay.store.tokens import Principal

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger("relay.store")
# A settle the store refused is tried again after this, doubling up to the cap.
SETTLE_RETRY_FIRST = 0.5
SETTLE_RETRY_MAX = 30.0
# While the database is unavailable (a full disk, PostgreSQL down or away), the
# failing calls are logged at most this often; every message still gets 451.
OUTAGE_LOG_INTERVAL = 60.0

# At most this many queued messages commit together (one transaction, one fsync).
KEEP_GROUP = 200


class AsyncStore:
    """The store for the event loop, which it must never stall noticeably.

    Decide, then act: on SQLite the calls run inline, on a second connection
    that never waits for a lock (busy timeout 0) and never checkpoints;
    uncontended, a WAL transaction costs tens of microseconds, less than a hop
    to a thread.

    Writes are committed in groups: the writes that sessions ask for during a
    few turns of the event loop (GROUP_TURNS) run in one transaction, each in a
    savepoint of its own, so a refused charge rolls back alone. A group runs
    inline when nothing is queued on the store's thread; if another process
    holds the write lock, the inline attempt fails at once and the group goes
    to the store's one thread, which waits for the lock there. Groups keep
    their order: none runs inline while the thread has work. Each caller gets
    its answer once the group has committed. A commit writes every
    page it changed to the write-ahead log, and the messages of a group share
    most of their pages (the sender, the send-limit windows, the last pages of
    the pending and delivery-log tables), so the log grows, and the disk is
    written, several times less than with a commit per write. A group is at
    most GROUP_MAX writes, so it holds the lock briefly.

    Reads (methods marked `read_only`: AUTH's token check, MAIL FROM's) never
    wait for SQLite's write lock in WAL mode, so they run inline even while
    writes wait on the thread: a lock another process holds stalls sending,
    never AUTH. The rare read that finds the database busy goes to a read
    thread of its own, not behind the writes.

    On PostgreSQL, every call is a round trip to another host and a write may
    wait for a row lock another relay holds: nothing runs inline. Reads go to
    the read thread, writes to the store's thread, each with its own pooled
    connection, so AUTH and MAIL FROM still never queue behind a charge.
    Writes are grouped there too: one group at a time runs on the store's
    thread while the next gathers every write asked for meanwhile (up to
    GROUP_MAX), so a busy relay commits many writes per transaction and an
    idle one commits each at once (`relay.store.group` for the lock order).

    Each process has an owner id (pid and a random instance id) recorded on its
    reservations; `start()` writes its heartbeat, the upkeep refreshes it.

    A settle the store refuses is written to the settle journal in `journal`
    (a directory; `relay.store.journal` states what that guarantees) before the
    caller answers the client, then retried in the background until it works.
    """

    def __init__(self, store: Store, journal: Path | None = None) -> None:
        self.sync = store
        self.owner = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.journal = SettleJournal(journal, self.owner) if journal is not None else None
        self.settle_failures = 0  # settle attempts the store refused, retries included
        where = store.location
        self._inline = Store(where, clock=store.clock, busy_timeout_ms=0, autocheckpoint=False)
        self._inlines = store.inline_writes  # reads and writes inline, when nothing is queued
        self._postgres = store.is_postgres  # writes grouped on the store's thread
        self._committing = False  # a PostgreSQL group is on the store's thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-store")
        self._queued = 0
        self._reader = Store(where, clock=store.clock, autocheckpoint=False)
        self._reader_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-reads")
        # Checkpoints sync the disk and the stale sweep scans: on a thread and
        # connection of their own, so no session call ever queues behind them.
        self._upkeep = Store(where, clock=store.clock)
        self._upkeep_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-upkeep")
        for each in (self.sync, self._inline, self._reader, self._upkeep):
            each.owner = self.owner
        # `enqueue`s waiting for the next group commit, and the task committing them.
        self._keeps: list[tuple[Keep, asyncio.Future[int | None]]] = []
        self._keeping: asyncio.Task[None] | None = None
        self._settling: dict[int, asyncio.Task[None]] = {}
        self._deferred: set[int] = set()  # settles deferred and not taken yet
        self._group: list[Write] = []  # writes for the next group commit
        self._restarting = False  # while `restart_log` runs, groups wait
        self._outage_since: float | None = None
        self._outage_logged_at = 0.0
        self._outage_logged = False  # this outage's line was written

    @property
    def queued(self) -> int:
        """Calls waiting on (or running on) the store's write thread."""
        return self._queued

    async def _call(
        self, fn: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn`, a `Store` method, on the connection that suits it: inline when it can,
        else on a thread (the class docstring). Every typed call below comes here."""
        started = time.perf_counter()
        try:
            result = await self._run(fn, *args, **kwargs)
        except StoreError as exc:
            if expected_failure(exc):
                self._unavailable(exc)
            raise
        finally:
            metrics.store_call(_label(fn), time.perf_counter() - started)
        if self._outage_since is not None:
            if self._outage_logged:
                log.warning(
                    "the database answers again after %.0f s",
                    time.monotonic() - self._outage_since,
                )
            self._outage_since, self._outage_logged = None, False
        return result

    def _unavailable(self, exc: StoreError) -> None:
        """Log an outage once a minute, not once per message (callers answer 451),
        and its end once. The store's connections come back one by one, so an
        outage can seem to end and begin again within seconds: that is not
        logged again within the minute."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        if self._outage_logged_at and now - self._outage_logged_at < OUTAGE_LOG_INTERVAL:
            return
        self._outage_logged_at, self._outage_logged = now, True
        log.error(
            "the database is unavailable, sessions get 451 4.3.0: %s"
            " (logged at most once a minute)",
            exc,
        )

    @staticmethod
    def logged(exc: StoreError) -> bool:
        """Whether `run` logged this failure already (an outage), so a caller need not."""
        return expected_failure(exc)

    async def _run(
        self, fn: Callable[Concatenate[Store, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        read = is_read_only(fn)
        if self._postgres and not read:
            return cast(T, await self._grouped(fn, args, kwargs))
        if self._inlines:
            if not read:
                return cast(T, await self._grouped(fn, args, kwargs))
            try:
                return fn(self._inline, *args, **kwargs)
            except StoreBusy:
                pass
        if read:
            loop = asyncio.get_running_loop()
            reader = self._reader
            return await loop.run_in_executor(
                self._reader_thread, lambda: fn(reader, *args, **kwargs)
            )
        return await self.in_thread(fn, self.sync, *args, **kwargs)

    def _grouped(
        self, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any], durable: bool = False
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._group.append(Write(fn, args, kwargs, future, durable))
        if len(self._group) == 1:
            loop.call_soon(self._gather, GROUP_TURNS)
        return future

    def _gather(self, turns: int) -> None:
        """Wait `turns` turns of the loop (fewer if the group fills), then commit."""
        if turns > 1 and len(self._group) < GROUP_MAX:
            asyncio.get_running_loop().call_soon(self._gather, turns - 1)
        else:
            self._commit_group()

    def _commit_group(self) -> None:
        """Commit the waiting writes: inline when the thread is idle and the lock is
        free, else on the store's thread (after what is queued there, in order).
        While `restart_log` runs they wait, and it commits them after."""
        if self._restarting or self._committing:
            return  # the group in flight commits this one when it ends
        group, self._group = self._group[:GROUP_MAX], self._group[GROUP_MAX:]
        loop = asyncio.get_running_loop()
        if self._group:
            loop.call_soon(self._commit_group)
        group = [write for write in group if not write.future.done()]  # a caller gone
        if not group:
            return
        if self._postgres:
            self._committing = True
        # A durable group's fsync is the thread's wait, never the loop's.
        elif self._queued == 0 and not any(write.durable for write in group):
            try:
                outcomes = commit_group(self._inline, group)
            except StoreBusy:
                pass  # another process holds the lock: nothing was written; wait on the thread
            except StoreError as exc:
                answer(group, exc)
                return
            else:
                answer(group, outcomes)
                return
        self._queued += 1
        done = self._thread.submit(commit_group, self.sync, group)
        asyncio.wrap_future(done, loop=loop).add_done_callback(
            lambda future: self._group_done(group, future)
        )

    def _group_done(self, group: list[Write], future: asyncio.Future[Any]) -> None:
        self._queued -= 1
        if self._committing:
            self._committing = False
            if self._group:
                self._commit_group()
        exc = future.exception()
        if exc is None:
            answer(group, future.result())
        elif isinstance(exc, self.sync.driver_errors):  # anything the store's wrapping missed
            answer(group, StoreError(f"database failed: {exc}"))
        else:
            answer(group, exc)

    # --- the calls the loop makes, typed -------------------------------------------

    async def authenticate(self, token: str) -> Principal | None:
        return await self._call(Store.authenticate, token)

    async def authenticate_admin(self, token: str) -> str | None:
        return await self._call(Store.authenticate_admin, token)

    async def auth_failures(self, key: str) -> int:
        return await self._call(Store.auth_failures, key)

    async def record_auth_failure(self, key: str, limit: int | None = None) -> int:
        return await self._call(Store.record_auth_failure, key, limit)

    async def check_mail(
        self,
        address: str,
        domain: str,
        account_id: int,
        default_balance: int,
        unlimited: bool,
        token_id: str = "",
        refusal_limit: int = 0,
    ) -> MailCheck:
        return await self._call(
            Store.check_mail,
            address,
            domain,
            account_id,
            default_balance,
            unlimited,
            token_id,
            refusal_limit,
        )

    async def verified_among(self, addresses: tuple[str, ...]) -> frozenset[str]:
        return await self._call(Store.verified_among, addresses)

    async def owned_domains(self, account_id: int, domains: tuple[str, ...]) -> frozenset[str]:
        return await self._call(Store.owned_domains, account_id, domains)

    async def suppression_for(self, account_id: int, address: str) -> Suppression | None:
        return await self._call(Store.suppression_for, account_id, address)

    async def suppressed_rcpt_event(self, account_id: int, address: str, reason: str) -> None:
        return await self._call(Store.suppressed_rcpt_event, account_id, address, reason)

    async def due_webhook_events(self, limit: int = 50) -> list[DueEvent]:
        return await self._call(Store.due_webhook_events, limit)

    async def claim_webhook_events(self, due: list[DueEvent]) -> list[DueEvent]:
        return await self._call(Store.claim_webhook_events, due)

    async def record_webhook_attempt(
        self,
        outbox_id: int,
        endpoint_id: str,
        *,
        status: int | None,
        duration_ms: int,
        answer: str,
        next_attempt: int | None,
    ) -> bool:
        return await self._call(
            Store.record_webhook_attempt,
            outbox_id,
            endpoint_id,
            status=status,
            duration_ms=duration_ms,
            answer=answer,
            next_attempt=next_attempt,
        )

    async def reserve(
        self,
        sender: str,
        *,
        account_id: int,
        recipients: int,
        unit: int,
        default_balance: int,
        idempotency_key: str | None = None,
        domain: str | None = None,
        token_id: str | None = None,
    ) -> Reservation:
        return await self._call(
            Store.reserve,
            sender,
            account_id=account_id,
            recipients=recipients,
            unit=unit,
            default_balance=default_balance,
            idempotency_key=idempotency_key,
            domain=domain,
            token_id=token_id,
        )

    async def record_delivery(self, record: DeliveryRecord) -> int:
        return await self._call(Store.record_delivery, record)

    async def record_refused(self, record: DeliveryRecord | None, token_id: str | None) -> None:
        return await self._call(Store.record_refused, record, token_id)

    # --- the durable queue (relay.store.queue): `enqueue` in the sessions' group
    # commit on SQLite (a durable one: synchronous=FULL), in groups of its own on
    # the upkeep thread on PostgreSQL; the worker's calls on the upkeep thread.

    async def enqueue(
        self,
        message: QueuedMessage,
        *,
        next_try: int,
        attempts: str,
        last_code: int | None,
        last_text: str,
        max_messages: int,
        max_bytes: int,
    ) -> int | None:
        """Queue `message` durably; its id, or None. Messages queued while a commit runs
        go in the next one together (a group commit: one fsync for all of them)."""
        keep = Keep(message, next_try, attempts, last_code, last_text, max_messages, max_bytes)
        if self._inlines:
            # SQLite: in the sessions' group commit, which commits durably when a
            # write asks for it: one fsync for the queued messages of a group.
            kept = self._grouped(Store.enqueue_many, ([keep],), {"durable": False}, durable=True)
            return cast(list[int | None], await kept)[0]
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._keeps.append((keep, future))
        if self._keeping is None:
            self._keeping = asyncio.get_running_loop().create_task(self._keep_all())
        return await future

    async def _keep_all(self) -> None:
        """Commit the waiting `enqueue`s, a group at a time, until none waits."""
        try:
            while self._keeps:
                group, self._keeps = self._keeps[:KEEP_GROUP], self._keeps[KEEP_GROUP:]
                keeps = [k for k, _ in group]
                try:
                    ids = await self.upkeep(functools.partial(Store.enqueue_many, keeps=keeps))
                except Exception as exc:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), kept in zip(group, ids, strict=True):
                    if not future.done():
                        future.set_result(kept)
        finally:
            self._keeping = None
            # Cancelled (the relay stops): nothing waiting is left without an answer.
            for _, future in self._keeps:
                if not future.done():
                    future.set_exception(StoreError("the store is closing"))
            self._keeps = []

    async def queue_due(self, dead_after: float) -> bool:
        return await self.upkeep(lambda store: store.queue_due(dead_after))

    async def claim(self, lease_seconds: int, limit: int, dead_after: float) -> list[Any]:
        owner = self.owner
        return await self.upkeep(lambda store: store.claim(owner, lease_seconds, limit, dead_after))

    async def requeue(
        self,
        queue_id: int,
        *,
        done: str,
        attempts: str,
        next_try: int,
        last_code: int,
        last_text: str,
        events: bool = True,
    ) -> bool:
        owner = self.owner
        return await self.upkeep(
            lambda store: store.requeue(
                queue_id,
                owner,
                done=done,
                attempts=attempts,
                next_try=next_try,
                last_code=last_code,
                last_text=last_text,
                events=events,
            )
        )

    async def mark_batch(self, key: str, domain: str, ids: list[int], body: str) -> bool:
        owner = self.owner
        return await self.upkeep(lambda store: store.mark_batch(owner, key, domain, ids, body))

    async def queue_batch(self, key: str) -> QueueBatch | None:
        return await self.upkeep(lambda store: store.queue_batch(key))

    async def end_batch(self, key: str, members: list[int] | None = None) -> None:
        return await self.upkeep(lambda store: store.end_batch(key, members or ()))

    async def finish(
        self,
        queue_id: int,
        delivered: int,
        idempotency_key: str | None,
        record: DeliveryRecord | None,
    ) -> int | None:
        owner = self.owner
        return await self.upkeep(
            lambda store: store.finish(queue_id, owner, delivered, idempotency_key, record)
        )

    async def finish_many(self, ends: list[End]) -> list[int | None]:
        owner = self.owner
        return await self.upkeep(lambda store: store.finish_many(owner, ends))

    async def release_leases(self) -> int:
        owner = self.owner
        return await self.upkeep(lambda store: store.release_leases(owner))

    async def queue_stats(self) -> QueueStats:
        return await self.upkeep(lambda store: store.queue_stats())

    async def ping(self) -> None:
        return await self._call(Store.ping)

    def now(self) -> int:
        """The store's clock, in seconds (a test may freeze it)."""
        return int(self.sync.clock().timestamp())

    async def in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))
        except self.sync.driver_errors as exc:  # anything the store's own wrapping missed
            raise StoreError(f"database failed: {exc}") from exc
        finally:
            self._queued -= 1

    async def checkpoint(self) -> None:
        """The upkeep's checkpoint: PASSIVE on the upkeep thread, which waits for no
        one; when the log must start over (`Database.checkpoint` says when),
        `restart_log`. PostgreSQL checkpoints by itself."""
        mode = await self.upkeep(Store.checkpoint)
        if mode is not None:
            await self.restart_log(mode)

    async def restart_log(self, mode: str) -> None:
        """RESTART or TRUNCATE the write-ahead log on the upkeep thread while this
        process's group commits wait on the loop. An inline group runs whole
        within one callback, so none is midway and the checkpoint never waits
        for this process's writes (a group on the store's thread, sent there by
        another process's lock, it waits for as for that process); they resume
        the moment it ends. One that finds the log in use elsewhere is tried
        again at the next checkpoint.
        """
        self._restarting = True
        try:
            await self.upkeep(lambda store: store.restart_wal(mode))
        except StoreBusy as exc:
            log.debug("%s", exc)
        finally:
            self._restarting = False
            if self._group:
                asyncio.get_running_loop().call_soon(self._commit_group)

    async def upkeep(self, fn: Callable[[Store], T]) -> T:
        """Run maintenance (`fn(store)`) on the upkeep thread's own connection."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._upkeep_thread, fn, self._upkeep)
        except self.sync.driver_errors as exc:
            raise StoreError(f"database failed: {exc}") from exc

    async def settle(
        self,
        reservation_id: int,
        delivered: int,
        idempotency_key: str | None = None,
        record: DeliveryRecord | None = None,
        created: int | None = None,
    ) -> int:
        """`Store.settle`, and if the store fails, again in the background until it works.

        Returns the refund, or -1 when the settle is deferred. The upstream may
        have taken the message: the pending row must not be refunded whole by a
        sweep while this process lives to settle it (see `Ledger.settle_stale`),
        nor after it stopped: a deferred settle is in the journal before this
        returns, so before the client gets its 250. The delivery-log `record`
        goes with the settle, retries and journal included.
        """
        entry = PendingSettle(reservation_id, delivered, idempotency_key, record, created)
        try:
            return await self._call(
                Store.settle, reservation_id, delivered, idempotency_key, record, created
            )
        except StoreError as exc:
            self.settle_failures += 1
            log.warning(
                "settling reservation %s failed (%s); retrying in the background",
                reservation_id,
                exc,
                exc_info=not expected_failure(exc),
            )
        self._deferred.add(reservation_id)  # before the journal's write: no `clear` meanwhile
        await self._journal(entry)
        task = asyncio.get_running_loop().create_task(self._settle_later(entry))
        self._settling[reservation_id] = task
        task.add_done_callback(lambda _: self._settling.pop(reservation_id, None))
        return -1

    async def _journal(self, entry: PendingSettle) -> None:
        if self.journal is None:
            return
        try:
            await asyncio.to_thread(self.journal.append, entry)
        except OSError as exc:
            log.error(
                "could not write reservation %s to the settle journal (%s): if this process"
                " stops before the database takes the settle, a sweep refunds it",
                entry.reservation_id,
                exc,
            )

    async def _settle_later(self, entry: PendingSettle) -> None:
        delay = SETTLE_RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                refund = await self._call(
                    Store.settle,
                    entry.reservation_id,
                    entry.delivered,
                    entry.idempotency_key,
                    entry.record,
                    entry.created,
                )
            except StoreError:
                self.settle_failures += 1
                delay = min(delay * 2, SETTLE_RETRY_MAX)
                continue
            log.info("settled reservation %s on a retry; refunded %d", entry.reservation_id, refund)
            self._deferred.discard(entry.reservation_id)
            if not self._deferred and self.journal is not None:
                # Nothing of this process is pending: what the journal holds is settled.
                self.journal.clear()
            return

    def open_journal(self) -> None:
        """Open this process's settle journal; raises OSError when it cannot be written."""
        if self.journal is not None:
            self.journal.open()

    def apply_journals(self, store: Store) -> int:
        """Apply the journals of stopped processes (`relay.store.journal`) on `store`; returns
        the settles applied. Raises `StoreError` when the store cannot take them: then
        no sweep may run."""
        if self.journal is None:
            return 0
        applied = 0
        try:
            for path, entries in self.journal.orphans():
                done = store.apply_settles(entries)
                applied += done
                log.warning(
                    "applied %d settle(s) of %d a stopped process left in %s",
                    done,
                    len(entries),
                    path,
                )
        except OSError as exc:
            raise RelayError(f"settle journal {self.journal.directory}: {exc}") from exc
        return applied

    @property
    def settling(self) -> int:
        """Settles still being retried in the background."""
        return len(self._settling)

    async def aclose(self) -> None:
        tasks = list(self._settling.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks and self.journal is not None:
            log.warning(
                "%d reservation(s) still unsettled at stop; kept in %s, the next start"
                " (or another relay's sweep on this host) settles them",
                len(tasks),
                self.journal.path,
            )
        elif tasks:
            log.warning(
                "%d reservation(s) still unsettled at stop, and no settle journal: once this"
                " process is gone the stale sweep refunds them in full",
                len(tasks),
            )
        try:
            await self.in_thread(self.sync.retire)
        except StoreError as exc:
            log.warning("could not retire this process's heartbeat: %s", exc)
        await self.in_thread(self.sync.close)
        await self.upkeep(Store.close)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._reader_thread, self._reader.close)
        for pool in (self._thread, self._upkeep_thread, self._reader_thread):
            pool.shutdown(wait=True)
        self._inline.close()
        if self.journal is not None:
            self.journal.close()


def _label(fn: Callable[..., Any]) -> str:
    """The call's name in `relay_store_call_seconds` (a label, not a dispatch)."""
    return fn.__qualname__.rpartition(".")[2]
