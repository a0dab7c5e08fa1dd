"""The queue worker's ends of messages, written a group at a time.

Each message's end (deleted, settled, its final record: `Store.finish`) is
one transaction alone; messages that end while the last group is written go
in the next one together (`Store.finish_many`): one commit, and one hold of
the write lock the sessions' group commits need, per group, not per message.
"""

from __future__ import annotations

import asyncio

from relay.errors import StoreError
from relay.store.loop import AsyncStore
from relay.store.queue import End


class Ends:
    """Writes ends in groups of at most `most`, one group at a time."""

    def __init__(self, store: AsyncStore, most: int) -> None:
        self.store = store
        self.most = most
        self._ends: list[tuple[End, asyncio.Future[int | None]]] = []
        self._ending: asyncio.Task[None] | None = None

    async def flush(self) -> None:
        """Wait until every end asked for is written, even those whose caller was
        cancelled meanwhile (the relay stops): a message delivered and ended is
        not left to be attempted again."""
        if self._ending is not None:
            await asyncio.wait([self._ending])

    async def write(self, end: End) -> int | None:
        """Write one message's end with the others that end meanwhile: one transaction
        (`Store.finish_many`) while the last one is written, not one per message.
        Its refund, or None when the message was no longer this relay's; raises
        the store's error (for this end and every end written with it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int | None] = loop.create_future()
        self._ends.append((end, future))
        if self._ending is None:
            self._ending = loop.create_task(self._write_all(), name="relay-queue-ends")
        return await future

    async def _write_all(self) -> None:
        try:
            while self._ends:
                group, self._ends = self._ends[: self.most], self._ends[self.most :]
                try:
                    refunds = await self.store.finish_many([end for end, _ in group])
                except Exception as exc:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), refund in zip(group, refunds, strict=True):
                    if not future.done():
                        future.set_result(refund)
        finally:
            self._ending = None
            for _, future in self._ends:
                if not future.done():
                    future.set_exception(StoreError("the queue worker is stopping"))
            self._ends = []
