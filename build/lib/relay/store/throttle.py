"""Failed AUTH attempts per client (`relay.smtp.admission.client_key`), across sessions and relays.

Each session allows a few failures (`Limits.max_auth_failures`); this bounds
guessing across sessions: after `limit` failures from one client within the
window, its new connections get `421 4.7.0` at the greeting, and so does any
AUTH its open sessions try, until the oldest failure leaves the window. A
success never resets the count (behind one NAT address, a legitimate user must
not wipe out an attacker's failures).

The rows live in the shared database, so every `--workers` process on the
host (and, on a shared database, every relay) sees the same count. Only a
failure writes; a connection, and an AUTH, each read one indexed count.

`record_auth_failure` counts and adds in one transaction, one client at a time
(SQLite's write lock; on PostgreSQL, whose READ COMMITTED transactions would
not see each other's new rows, an advisory lock per client): of many
concurrent failures each sees its own count, so however many sessions guess at
once, at most `limit` of them are told the guess was wrong; the rest are told
to go away. Past the limit nothing is written: a client over it adds no rows.
"""

from __future__ import annotations

import zlib

from relay.store.db import Database, read_only

# RELAY_AUTH_FAILURE_LIMIT counts within this window.
AUTH_FAILURE_WINDOW = 15 * 60
# The first key of PostgreSQL's two-key advisory locks this module takes (the
# second is the client's hash); arbitrary, fixed forever.
AUTH_FAILURE_LOCK = 0x61757468  # "auth"


class Throttle(Database):
    def record_auth_failure(
        self, address: str, limit: int | None = None, window: int = AUTH_FAILURE_WINDOW
    ) -> int:
        """Count a failed AUTH from `address`: the failures within the window, this one
        included. Not written when `limit` failures are there already."""
        now = self._now()
        with self._write() as db:
            if self.is_postgres:
                # Signed 32 bits, as pg_advisory_xact_lock(int, int) takes.
                client = zlib.crc32(address.encode()) - (1 << 31)
                db.execute("SELECT pg_advisory_xact_lock(?, ?)", (AUTH_FAILURE_LOCK, client))
            row = db.execute(
                "SELECT count(*) AS n FROM auth_failures WHERE address = ? AND created > ?",
                (address, now - window),
            ).fetchone()
            failures = int(row["n"]) + 1
            if limit is None or failures <= limit:
                db.execute(
                    "INSERT INTO auth_failures (address, created) VALUES (?, ?)", (address, now)
                )
        return failures

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
