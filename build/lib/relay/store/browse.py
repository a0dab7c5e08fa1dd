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
    """A delivery-log query that continues below the record id `before` (newest first)."""

    before: int | None = None

    def where(self) -> tuple[str, list[Any]]:
        # Query.where by name: a slotted dataclass has no `super()` cell.
        where, args = Query.where(self)
        if self.before is None:
            return where, args
        clause = "d.id < ?"
        return (f"{where} AND {clause}" if where else f" WHERE {clause}"), [*args, self.before]


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
