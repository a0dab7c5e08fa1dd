"""The audit log: every change an operator made, through the admin API or the CLI.

Each record says who (an admin token's id, or `cli`), from which address, what
(an action such as `sender.topup`, its target and its arguments) and when.
Guarantees:
- Secrets never enter it: the operations record a token's id, never the token.
- A record is written right after the change it describes commits, by the
  same operation (`relay.admin.operations`), in a transaction of its own. A process
  that dies between the two leaves the change unrecorded; the store modules
  keep one transaction per change, and the audit does not reach into them.
- Records are read newest first, a page at a time, by id (`before`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay.store.db import Database, read_only
from relay.store.rows import AuditRow

# The most records one page returns.
MAX_AUDIT_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: `who` is an admin token's id or `cli`; `address` where from."""

    who: str
    address: str


CLI_ACTOR = Actor("cli", "local")


class Audit(Database):
    def record_audit(
        self, actor: Actor, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO audit (created, actor, address, action, target, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    self._now(),
                    actor.who,
                    actor.address,
                    action,
                    target,
                    json.dumps(detail or {}, sort_keys=True),
                ),
            )

    @read_only
    def list_audit(self, *, limit: int = 100, before: int | None = None) -> list[AuditRow]:
        """Records newest first; `before`: only records with a smaller id (the next page)."""
        limit = max(1, min(limit, MAX_AUDIT_PAGE))
        columns = "SELECT id, created, actor, address, action, target, detail FROM audit"
        if before is None:
            rows = self._read(f"{columns} ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._read(f"{columns} WHERE id < ? ORDER BY id DESC LIMIT ?", (before, limit))
        return [
            AuditRow(
                id=int(r["id"]),
                created=int(r["created"]),
                time=datetime.fromtimestamp(r["created"], UTC).isoformat(),
                actor=r["actor"],
                address=r["address"],
                action=r["action"],
                target=r["target"],
                detail=json.loads(r["detail"]),
            )
            for r in rows
        ]
