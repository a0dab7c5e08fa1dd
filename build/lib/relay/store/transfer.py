"""`relay db copy --to postgresql://...`: move a SQLite install into an empty PostgreSQL database.

Guarantees:
- Everything the relay keeps is copied: every table the migrations made, in
  the order they made them (a table is made after the tables it references),
  so accounts, domains, token hashes, senders, the lists, limits and counts,
  pending charges, the delivery log and the failed-AUTH rows all arrive, and
  so would a table a later migration adds.
- The target is migrated first and must then hold no row at all: a copy
  never merges into, or overwrites, a database that is in use.
- One transaction on the target, under the migration lock: a failed copy
  leaves it empty. The source is only read (stop the relay first, so nothing
  is written after the copy began).
- Ids are kept (foreign keys and the delivery log's references stay true), and
  each identity column's sequence is moved past the largest id copied.
"""

from __future__ import annotations

from relay.errors import RelayError
from relay.store.db import Database
from relay.store.postgres import MIGRATION_LOCK

BATCH = 1000  # rows per INSERT batch


def tables(source: Database) -> list[str]:
    """The relay's tables in the SQLite source, in the order they were created."""
    rows = source._read(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY rowid"
    )
    return [str(r["name"]) for r in rows]


def copy(source: Database, target: Database) -> dict[str, int]:
    """Copy every row of `source` (SQLite) into `target` (empty PostgreSQL); rows per table."""
    if source.is_postgres or not target.is_postgres:
        raise RelayError("relay db copy: copies a SQLite database into a PostgreSQL one")
    source.migrate()
    target.migrate()
    names = tables(source)
    copied: dict[str, int] = {}
    with target._write() as db:
        db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        for name in names:
            row = db.execute(f"SELECT 1 FROM {name} LIMIT 1").fetchone()  # noqa: S608 - the schema's names
            if row is not None:
                raise RelayError(
                    f"relay db copy: the target database is not empty ({name} has rows);"
                    " copy into a new, empty database"
                )
        for name in names:
            columns = [str(c["name"]) for c in source._read(f"PRAGMA table_info({name})")]
            select = f"SELECT {', '.join(columns)} FROM {name}"  # noqa: S608
            insert = (
                f"INSERT INTO {name} ({', '.join(columns)})"  # noqa: S608
                f" VALUES ({', '.join('?' * len(columns))})"
            )
            rows = [tuple(r[i] for i in range(len(columns))) for r in source._read(select)]
            for start in range(0, len(rows), BATCH):
                db.executemany(insert, rows[start : start + BATCH])
            copied[name] = len(rows)
        identities = db.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND is_identity = 'YES'"
        ).fetchall()
        for row in identities:
            table, column = row["table_name"], row["column_name"]
            db.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"  # noqa: S608
                f" COALESCE((SELECT max({column}) FROM {table}), 0) + 1, false)"
            )
    return copied
