"""The store: one `Store` over the relay's database, and `AsyncStore` for the event loop.

Each concept has its own module, which states its guarantees:

- `relay.db`: the connection, write transactions, migrations, checkpoints
- `relay.accounts`: accounts, their domains, the verified and no-limit lists
- `relay.tokens`: API tokens, stored only as SHA-256 hashes
- `relay.ledger`: balances and send-limit windows; the atomic, never-negative
  charge (`reserve`), its `settle`, and the sweep of charges a dead process left
- `relay.idempotency`: messages an idempotent upstream took, so a retry is not
  charged twice

`Store` combines them, so admin commands and tests use one object. The runtime
calls go through `AsyncStore`, so a slow disk or a lock held by another
process never stalls the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from relay.accounts import Accounts
from relay.db import StoreBusy
from relay.errors import StoreError
from relay.idempotency import IDEMPOTENCY_WINDOW
from relay.ledger import RELAY_SCOPE, Ledger, MailCheck, Refused, Reservation
from relay.tokens import TOKEN_PREFIX, Principal, Tokens, hash_token

__all__ = [
    "IDEMPOTENCY_WINDOW",
    "RELAY_SCOPE",
    "TOKEN_PREFIX",
    "AsyncStore",
    "MailCheck",
    "Principal",
    "Refused",
    "Reservation",
    "Store",
    "StoreBusy",
    "hash_token",
]


class Store(Accounts, Tokens, Ledger):
    """The synchronous store. Admin commands use it directly; the server via `AsyncStore`."""


P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """The store for the event loop, which it must never stall noticeably.

    Decide, then act: when nothing is queued on the store's thread, a call first
    runs inline on a second connection that never waits for a lock (busy
    timeout 0) and never checkpoints; uncontended, a WAL transaction costs tens
    of microseconds, less than a hop to a thread. If another process holds the
    write lock, the inline attempt fails at once and the call goes to the
    store's one thread, which waits for the lock there. Calls keep their order:
    nothing runs inline while the thread has work.
    """

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._inline = Store(store.path, clock=store.clock, busy_timeout_ms=0, autocheckpoint=False)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-store")
        self._queued = 0
        # Checkpoints sync the disk and the stale sweep scans: on a thread and
        # connection of their own, so no session call ever queues behind them.
        self._upkeep = Store(store.path, clock=store.clock)
        self._upkeep_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-upkeep")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn`, a method of `self.sync`, inline when possible, else on the thread."""
        if self._queued == 0:
            inline: Callable[P, T] = getattr(self._inline, fn.__name__)
            try:
                return inline(*args, **kwargs)
            except StoreBusy:
                pass
        return await self.in_thread(fn, *args, **kwargs)

    async def in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))
        except sqlite3.Error as exc:  # anything the store's own wrapping missed
            raise StoreError(f"database failed: {exc}") from exc
        finally:
            self._queued -= 1

    async def upkeep(self, fn: Callable[[Store], T]) -> T:
        """Run maintenance (`fn(store)`) on the upkeep thread's own connection."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._upkeep_thread, fn, self._upkeep)
        except sqlite3.Error as exc:
            raise StoreError(f"database failed: {exc}") from exc

    async def aclose(self) -> None:
        await self.in_thread(self.sync.close)
        await self.upkeep(Store.close)
        self._thread.shutdown(wait=True)
        self._upkeep_thread.shutdown(wait=True)
        self._inline.close()
