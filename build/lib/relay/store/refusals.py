"""Messages refused at the end of DATA, per token, across sessions and relay processes.

A refused message costs its sender nothing but still writes a delivery record.
This bounds how much one token can write that way: after
`RELAY_REFUSAL_LIMIT` refusals within the window, the token's next MAIL gets
`421 4.7.0` until the oldest refusal leaves the window (`Ledger.check_mail`
reads the count in MAIL FROM's one statement, stopping at the limit).

Counted: a permanent refusal (5xx) made at the end of DATA before any charge,
the client's doing (a header defect, a header sender on another account's
domain, no route, a balance that cannot pay). Not counted: a 4xx (a send-limit
window, the relay's own trouble), which the client is right to retry.

The rows live in the shared database, like the failed-AUTH throttle's
(`relay.store.throttle`): every process on the host, and every relay on a shared
PostgreSQL database, sees one count. The refusal and its record are one write.
"""

from __future__ import annotations

from relay.store.db import Database
from relay.store.deliveries import DeliveryRecord, insert

# RELAY_REFUSAL_LIMIT counts within this window.
REFUSAL_WINDOW = 15 * 60


class Refusals(Database):
    def record_refused(self, record: DeliveryRecord | None, token_id: str | None) -> None:
        """In one write: the delivery `record` (None: the log is off) and, with a
        `token_id`, one refusal counted against that token."""
        with self._write() as db:
            if token_id is not None:
                db.execute(
                    "INSERT INTO refusals (token_id, created) VALUES (?, ?)",
                    (token_id, self._now()),
                )
            if record is not None:
                insert(db, record)

    def prune_refusals(self, window: int = REFUSAL_WINDOW, batch: int = 1000) -> int:
        """Forget refusals older than the window, a batch at a time (short write locks)."""
        rowid = self.rowid  # the table has no key: SQLite's rowid, PostgreSQL's ctid
        with self._write() as db:
            cur = db.execute(
                f"DELETE FROM refusals WHERE {rowid} IN (SELECT {rowid} FROM refusals"  # noqa: S608 - fixed names
                " WHERE created <= ? LIMIT ?)",
                (self._now() - window, batch),
            )
        return cur.rowcount
