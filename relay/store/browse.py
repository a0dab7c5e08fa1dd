"""Paged reads for the admin API and console: senders by prefix, the delivery log by page.

A page is ordered by a unique key and continues after the last key the caller
saw (the `cursor`), so rows written meanwhile never shift a page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.store.db import Database, read_only
from relay.store.deliveries import Query
from relay.store.senders import SenderRow, sender_row

# The most rows one page returns.
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class LogPage(Query):
    """A delivery-log query that continues below the record id `before` (newest first),
    optionally of one channel (`''`: the records no channel was chosen for).

    Each filter alone is a range of an index, newest first: the time index, or
    `(account, id)`, `(channel, id)`, `(sender, id)` (migrations 5, 17), so a page
    costs its rows, not the log's. The outcome has no index of its own (an index on
    it would also be what the overview's refusal count picks over the time index,
    relay.store.stats): alone, it reads the log newest first until the page is full,
    and every outcome but `partial` is a large share of the traffic."""

    before: int | None = None
    channel: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        # Query.where by name: a slotted dataclass has no `super()` cell.
        where, args = Query.where(self)
        clauses: list[str] = []
        extra: list[Any] = []
        if self.channel is not None:
            clauses.append("d.channel = ?")
            extra.append(self.channel)
        if self.before is not None:
            clauses.append("d.id < ?")
            extra.append(self.before)
        if not clauses:
            return where, args
        clause = " AND ".join(clauses)
        return (f"{where} AND {clause}" if where else f" WHERE {clause}"), [*args, *extra]


class Browse(Database):
    @read_only
    def page_senders(
        self, *, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[SenderRow]:
        """Sender rows whose address starts with `prefix`, by address, after `after`."""
        limit = max(1, min(limit, MAX_PAGE))
        rows = self._read(
            "SELECT address, balance, enabled, created, updated FROM senders"
            " WHERE substr(address, 1, ?) = ? AND address > ? ORDER BY address LIMIT ?",
            (len(prefix), prefix, after or "", limit),
        )
        return [sender_row(r) for r in rows]
