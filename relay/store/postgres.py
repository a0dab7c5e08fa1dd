"""The PostgreSQL backend: a store shared by many relays (`RELAY_DATABASE=postgresql://...`).

psycopg 3 (sync) with psycopg_pool's `ConnectionPool`: the store's methods stay
synchronous and run where the SQLite ones do (on the store's threads), and the
pool replaces a connection that broke, so a database that went away and came
back is used again without a restart. Each `Store` has its own small pool.

The concept modules write their SQL once, for both backends: `?` placeholders
(rewritten to psycopg's `%s` here), rows read by name or position (`PgRow`),
`INSERT ... ON CONFLICT`, `RETURNING`. What only the schema differs in is
translated at migration time (`translate_schema`).

Transactions are READ COMMITTED, PostgreSQL's default: every guarantee the
store states is kept by the statement that needs it (a conditional UPDATE
that locks the row it checks, a conditional upsert per window, a `DELETE ...
RETURNING` that one transaction alone can win), not by a table-wide lock.

A group commit (`batch`, `relay.store.group`) is one transaction in psycopg's
pipeline mode: statements whose results nobody reads yet (a savepoint, its
release, an INSERT) go out with the next one that must be answered, so a
write costs the round trips its reads need, and the group one COMMIT.
"""

from __future__ import annotations

import logging
import re
import select
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import RowMaker

from relay.config import PostgresUrl
from relay.errors import StoreError

log = logging.getLogger("relay.store")

# A session waits at most this long for a connection (the pool's, or a new one
# while the database is away) before its command is deferred with 451 4.3.0.
CONNECTION_WAIT = 3.0
# ... and while the last call found it unavailable: a connection the pool made
# again in the background is taken at once.
DOWN_WAIT = 0.1
# How long the pool keeps reconnecting by itself before it waits for a caller.
RECONNECT_FOR = 10.0
# Seconds a TCP connect to the database may take (libpq's connect_timeout).
CONNECT_TIMEOUT = 3
# Migrations (and `relay db copy`) hold this advisory lock: relays starting
# together apply each migration once. The number is arbitrary, fixed forever.
MIGRATION_LOCK = 0x72656C6179  # "relay"
# A statement that runs this long is cancelled: nothing the relay does on the
# hot path comes near it, and a stuck lock must not hold a session for ever.
STATEMENT_TIMEOUT_MS = 30_000


class PgRow(dict[str, Any]):
    """A row by column name (a dict, so `dict(row)` works) or by position, as sqlite3.Row."""

    __slots__ = ("_values",)
    _values: Sequence[Any]

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, int):
            return self._values[key]
        return dict.__getitem__(self, key)


def pg_row(cursor: psycopg.Cursor[Any]) -> RowMaker[PgRow]:
    names = [c.name for c in cursor.description or ()]

    def make(values: Sequence[Any]) -> PgRow:
        row = PgRow(zip(names, values, strict=True))
        row._values = values
        return row

    return make


@lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (and a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


# Deadlock detected, serialization failure: the transaction was rolled back by
# the server and may simply be run again (PostgreSQL's documentation, "Serialization
# Failure Handling").
RETRYABLE = ("40P01", "40001")


class GroupAborted(Exception):
    """A statement of a group commit failed: the whole transaction is rolled back and
    nothing of it was written. `retry`: a deadlock or serialization failure, worth
    running the group again."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.retry = getattr(exc, "sqlstate", None) in RETRYABLE
        # The connection broke (not a conflict, which psycopg also calls operational).
        self.unavailable = not self.retry and unavailable(exc)


class PgConnection:
    """A psycopg connection that speaks the concept modules' dialect
    (`relay.store.db.Connection`). In a pipeline (`Postgres.batch`, `Postgres.pipelined`),
    a statement is sent when a result is read, with all those queued before it."""

    __slots__ = ("conn", "pipeline")
    # The concept modules' test for a statement only PostgreSQL speaks.
    is_postgres = True

    def __init__(
        self, conn: psycopg.Connection[PgRow], pipeline: psycopg.Pipeline | None = None
    ) -> None:
        self.conn = conn
        self.pipeline = pipeline

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        if not parameters:
            cursor = self.conn.execute(sql.encode())
        else:
            cursor = self.conn.execute(pg_sql(sql).encode(), parameters)
        if self.pipeline is None:
            return cursor
        return _Pipelined(cursor, self.pipeline)

    @contextmanager
    def savepoint(self) -> Iterator[PgConnection]:
        """One write of a group: rolled back alone when its body raises (a refusal); a
        failed statement aborts the whole group (`GroupAborted`), since in a pipeline
        its error may surface in a later write's statement. The savepoint's own
        statements are queued, not waited for (psycopg's nested `transaction()`
        would send the pipeline at its start and its end)."""
        conn = self.conn
        try:
            conn.execute(b"SAVEPOINT w")
        except psycopg.Error as exc:
            raise GroupAborted(exc) from exc
        try:
            yield self
        except psycopg.Error as exc:
            raise GroupAborted(exc) from exc
        except BaseException:
            try:
                conn.execute(b"ROLLBACK TO SAVEPOINT w")
                conn.execute(b"RELEASE SAVEPOINT w")
            except psycopg.Error as exc:
                raise GroupAborted(exc) from exc
            raise
        try:
            conn.execute(b"RELEASE SAVEPOINT w")
        except psycopg.Error as exc:
            raise GroupAborted(exc) from exc

    @contextmanager
    def bare(self) -> Iterator[PgConnection]:
        """One write of a group that is not expected to raise (a settle, a log
        record): no savepoint; if it raises after all, the whole group is aborted
        (`GroupAborted`) and `relay.store.group` runs its writes one at a time."""
        try:
            yield self
        except Exception as exc:
            raise GroupAborted(exc) from exc

    def executemany(self, sql: str, parameters: Any, /) -> psycopg.Cursor[PgRow]:
        cursor = self.conn.cursor()
        cursor.executemany(pg_sql(sql).encode(), parameters)
        return cursor


class _Pipelined:
    """A cursor whose statement may not have been sent yet: reading it sends the pipeline."""

    __slots__ = ("cursor", "pipeline")

    def __init__(self, cursor: psycopg.Cursor[PgRow], pipeline: psycopg.Pipeline) -> None:
        self.cursor, self.pipeline = cursor, pipeline

    @property
    def rowcount(self) -> int:
        if self.cursor.pgresult is None:
            self.pipeline.sync()
        return self.cursor.rowcount

    def fetchone(self) -> Any:
        return self.cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self.cursor.fetchall()


class Autocommit:
    """`Database.db` for PostgreSQL: each statement on a pooled connection, committed."""

    def __init__(self, pg: Postgres) -> None:
        self.pg = pg

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        with self.pg.connection() as conn:
            cursor = conn.execute(sql, parameters)
            return _Fetched(cursor.fetchall() if cursor.description else [], cursor.rowcount)


class _Fetched:
    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows, self.rowcount = rows, rowcount

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows


def still_open(conn: psycopg.Connection[Any]) -> None:
    """The pool's check before it lends a connection: one the server closed while it
    was idle (a restart, a failover, an idle timeout) has its socket readable (the
    server's goodbye, or the end of the stream) and is replaced, so no call fails
    on it. A poll of the socket: no round trip to the server."""
    if conn.closed or select.select([conn.fileno()], [], [], 0)[0]:
        conn.close()  # closed, so the pool replaces it rather than lend it again
        raise psycopg.OperationalError("the server closed this connection while it was idle")


def unavailable(exc: BaseException) -> bool:
    """The database is down, unreachable or restarting: an expected, outside cause."""
    return isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout)


def translate(exc: Exception) -> StoreError:
    if unavailable(exc):
        return StoreError(f"database unavailable: {exc}")
    return StoreError(f"database failed: {exc}")


class Postgres:
    """One relay store's pool of connections to PostgreSQL, opened on first use."""

    errors: tuple[type[Exception], ...] = (psycopg.Error, psycopg_pool.PoolTimeout)
    integrity_errors: tuple[type[Exception], ...] = (psycopg.IntegrityError,)

    def __init__(self, url: PostgresUrl, *, size: int = 1) -> None:
        self.url = url
        self.size = size
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[PgRow]] | None = None
        self._down = False  # the last call found the database unavailable

    @property
    def pool(self) -> psycopg_pool.ConnectionPool[psycopg.Connection[PgRow]]:
        if self._pool is None:
            self._pool = psycopg_pool.ConnectionPool(
                self.url.url,
                min_size=self.size,
                max_size=self.size,
                timeout=CONNECTION_WAIT,
                kwargs={
                    "autocommit": True,
                    "row_factory": pg_row,
                    "connect_timeout": CONNECT_TIMEOUT,
                    "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                },
                # Reconnects go on in the background while the database is away
                # (a session meanwhile gets 451 after CONNECTION_WAIT), backing off
                # 1, 2, 4 s; then the pool gives up until the next call asks again,
                # so the wait between attempts never grows past RECONNECT_FOR.
                reconnect_timeout=RECONNECT_FOR,
                check=still_open,
                open=False,
                name=f"relay-{id(self):x}",
            )
            self._pool.open(wait=False)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @contextmanager
    def connection(self) -> Iterator[PgConnection]:
        """A pooled connection in autocommit; a broken one goes back to be replaced."""
        try:
            with self.pool.connection(timeout=self._wait()) as conn:
                yield PgConnection(conn)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise self._failed(exc) from exc
        self._down = False

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        """One READ COMMITTED transaction; rolled back when the body raises."""
        try:
            with self.pool.connection(timeout=self._wait()) as conn, conn.transaction():
                yield PgConnection(conn)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise self._failed(exc) from exc
        self._down = False

    @contextmanager
    def pipelined(self) -> Iterator[PgConnection]:
        """A pooled connection in autocommit and pipeline mode: several reads whose
        statements are all sent before the first result is read cost one round trip."""
        try:
            with self.pool.connection(timeout=self._wait()) as conn, conn.pipeline() as pipe:
                yield PgConnection(conn, pipe)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise self._failed(exc) from exc
        self._down = False

    @contextmanager
    def batch(self) -> Iterator[PgConnection]:
        """One transaction in pipeline mode for a group commit; each write in it a
        savepoint (`PgConnection.savepoint`). COMMIT goes with the last writes'
        queued statements: one round trip.

        A deadlock or serialization failure raised there is a statement's (READ
        COMMITTED's COMMIT raises neither): the transaction was rolled back,
        `GroupAborted`, worth running again. Any other failure of the commit
        fails the whole group (`StoreError`)."""
        try:
            with self.pool.connection(timeout=self._wait()) as conn, conn.pipeline() as pipe:
                with conn.transaction():
                    yield PgConnection(conn, pipe)
        except GroupAborted:
            raise
        except psycopg.Error as exc:
            if getattr(exc, "sqlstate", None) in RETRYABLE:
                raise GroupAborted(exc) from exc
            raise self._failed(exc) from exc
        except psycopg_pool.PoolTimeout as exc:
            raise self._failed(exc) from exc
        self._down = False

    def _wait(self) -> float:
        """How long to wait for a connection: briefly while the database is known
        down (the pool reconnects in the background), so sessions get their 451 at
        once instead of queueing on the store's thread behind each other's waits."""
        return DOWN_WAIT if self._down else CONNECTION_WAIT

    def _failed(self, exc: Exception) -> StoreError:
        if unavailable(exc):
            self._down = True
        return translate(exc)

    def read(self, sql: str, args: Sequence[Any]) -> list[Any]:
        with self.connection() as conn:
            rows: list[Any] = conn.execute(sql, args).fetchall()
            return rows

    def autocommit(self) -> Autocommit:
        return Autocommit(self)

    # --- the schema ------------------------------------------------------------------

    def schema_version(self) -> int:
        with self.connection() as conn:
            found = conn.execute("SELECT to_regclass('relay_schema') AS t").fetchone()
            if found is None or found["t"] is None:
                return 0
            row = conn.execute("SELECT version FROM relay_schema").fetchone()
            return 0 if row is None else int(row["version"])

    def migrate(self, migrations: Sequence[str]) -> int:
        """Apply the migrations not applied yet, in one transaction under an advisory lock.

        `pg_advisory_xact_lock` makes a second relay starting at the same moment
        wait, then find the schema current; the lock goes with the transaction,
        so a relay that dies mid-migration leaves neither lock nor half a schema
        (PostgreSQL's DDL is transactional).
        """
        with self.transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS relay_schema (version BIGINT NOT NULL)")
            row = db.execute("SELECT version FROM relay_schema").fetchone()
            if row is None:
                db.execute("INSERT INTO relay_schema (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            for number, script in enumerate(migrations[version:], start=version + 1):
                for statement in translate_schema(script):
                    db.execute(statement)
                db.execute("UPDATE relay_schema SET version = ?", (number,))
                log.info("applied schema migration %d", number)
        return len(migrations)

    def check_writable(self) -> None:
        with self.transaction() as db:
            db.execute("UPDATE relay_schema SET version = version")


_COMMENT = re.compile(r"--[^\n]*")
_SCHEMA_RULES = (
    # SQLite's rowid alias: an identity column; BY DEFAULT, so `relay db copy` can
    # keep the ids it copies.
    (
        re.compile(r"\bINTEGER PRIMARY KEY\b"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    # SQLite's INTEGER is 64-bit; PostgreSQL's is 32 (unix seconds end in 2038).
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\)\s*WITHOUT ROWID"), ")"),
    # SQLite's byte strings (a queued message's content).
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


def translate_schema(script: str) -> list[str]:
    """One migration's statements in PostgreSQL's dialect.

    >>> translate_schema("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER) WITHOUT ROWID;")
    ['CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT)']
    """
    script = _COMMENT.sub("", script)
    for pattern, replacement in _SCHEMA_RULES:
        script = pattern.sub(replacement, script)
    return [s.strip() for s in script.split(";") if s.strip()]
