"""Failed AUTH attempts per client address, across sessions and relay processes.

Each session allows a few failures (`Limits.max_auth_failures`); this bounds
guessing across sessions: after `limit` failures from one address within the
window, that address's new connections get `421 4.7.0` at the greeting until
the oldest failure leaves the window. A success never resets the count (behind
one NAT address, a legitimate user must not wipe out an attacker's failures).

The rows live in the shared database, so every `--workers` process on the
host (and, on a shared database, every relay) sees the same count. Only a
failure writes; a connection reads one indexed count.
"""

from __future__ import annotations

from relay.db import Database, read_only

# RELAY_AUTH_FAILURE_LIMIT counts within this window.
AUTH_FAILURE_WINDOW = 15 * 60


class Throttle(Database):
    def record_auth_failure(self, address: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO auth_failures (address, created) VALUES (?, ?)",
                (address, self._now()),
            )

    @read_only
    def auth_failures(self, address: str, window: int = AUTH_FAILURE_WINDOW) -> int:
        """Failures from `address` within the last `window` seconds."""
        rows = self._read(
            "SELECT count(*) AS n FROM auth_failures WHERE address = ? AND created > ?",
            (address, self._now() - window),
        )
        return int(rows[0]["n"])

    def prune_auth_failures(self, window: int = AUTH_FAILURE_WINDOW, batch: int = 1000) -> int:
        """Forget failures older than the window, a batch at a time (short write locks)."""
        rowid = self.rowid  # the table has no key: SQLite's rowid, PostgreSQL's ctid
        with self._write() as db:
            cur = db.execute(
                f"DELETE FROM auth_failures WHERE {rowid} IN (SELECT {rowid} FROM auth_failures"  # noqa: S608 - fixed names
                " WHERE created <= ? LIMIT ?)",
                (self._now() - window, batch),
            )
        return cur.rowcount
