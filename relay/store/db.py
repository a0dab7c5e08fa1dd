"""The database connection: opening, write transactions, schema migrations, checkpoints.

Every concept module (accounts, tokens, ledger) builds on `Database`, so they
share one connection and one way to write. Two backends speak the same SQL
(`?` placeholders, `INSERT ... ON CONFLICT`, `RETURNING`, `CHECK`):

- SQLite (a path): one connection; a write transaction is `BEGIN IMMEDIATE`,
  which takes SQLite's one write lock across processes, so writers run one
  at a time on the host.
- PostgreSQL (`postgresql://...`, `relay.store.postgres`): a small connection pool
  that reconnects by itself; a write transaction is READ COMMITTED, and each
  guarantee is kept by the statement that needs it (a conditional UPDATE, a
  conditional upsert, a `DELETE ... RETURNING`), as each module says.

sqlite3 and psycopg errors are translated here into `StoreError` (or
`StoreBusy` for a held SQLite lock) and never leave the store.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from relay.config import PostgresUrl
from relay.errors import BatchBroken, StoreBusy, StoreError
from relay.store.schema import MIGRATIONS

if TYPE_CHECKING:
    from relay.store.postgres import PgConnection, Postgres

# The write-ahead log is copied back into the database file by `checkpoint`, on
# the upkeep thread, once a second, without waiting for anyone (PASSIVE). Under
# constant writes that never lets the log start over (SQLite restarts it only
# once every frame is copied and no reader needs it), so it would grow without
# bound (210 MB in 15 s at 1,150 msg/s). So once it is past WAL_SIZE_LIMIT,
# `restart_wal` copies the little the PASSIVE left and makes the next write
# start the log from its beginning (RESTART): the file stops growing at about a
# second of writes. Once writes stop, it empties the file (TRUNCATE). Both wait
# for writers; `AsyncStore.checkpoint` holds the process's own writes back on
# the event loop meanwhile, so none of them waits in SQLite's busy handler,
# whose sleeps (1, 2, 5, 10, 15, 20, 25 ms...) would stretch a checkpoint of a
# few milliseconds into a stall of tens.
WAL_SIZE_LIMIT = 4 * 1024 * 1024
# How long a restarting checkpoint waits for readers and for another process's
# writer; this process's writes wait behind it meanwhile, so it gives up soon
# and tries again a tick later.
CATCH_UP_BUSY_MS = 100

# Failures that a full disk, a read-only file or a lock explain: worth one line
# in the log, not a traceback.
_EXPECTED = ("readonly", "disk i/o error", "disk is full", "unable to open", "locked")

F = TypeVar("F", bound=Callable[..., Any])
_READS: set[Callable[..., Any]] = set()


def read_only(fn: F) -> F:
    """Mark a store method that only reads: in WAL mode it never waits for the write lock."""
    _READS.add(fn)
    return fn


def is_read_only(method: Callable[..., Any]) -> bool:
    return getattr(method, "__func__", method) in _READS


def expected_failure(exc: BaseException) -> bool:
    """A database failure with a known outside cause (disk, permissions, a lock, a
    database server that is down or unreachable)."""
    cause = exc.__cause__ if isinstance(exc, StoreError) else exc
    if isinstance(cause, sqlite3.OperationalError):
        return any(word in str(cause).lower() for word in _EXPECTED)
    return getattr(cause, "relay_expected", False) or _postgres_unavailable(cause)


def _postgres_unavailable(exc: BaseException | None) -> bool:
    if exc is None or not type(exc).__module__.startswith("psycopg"):
        return False
    from relay.store.postgres import unavailable

    return unavailable(exc)


class Cursor(Protocol):
    """What the concept modules use of a cursor (sqlite3's, or `relay.store.postgres`'s)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the concept modules use of a connection: `?` placeholders, rows by name or index."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Any, /) -> Cursor: ...


class Row(Protocol):
    """A result row: by column name or by position (sqlite3.Row, `relay.store.postgres.PgRow`)."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> Any: ...


class Database:
    """One connection to the relay's database (or, for PostgreSQL, a pool), opened on first use.

    `location` is a SQLite file's path, or a `PostgresUrl` (a string starting
    `postgresql://` is taken as one).
    """

    def __init__(
        self,
        location: Path | str | PostgresUrl,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout_ms: int = 10_000,
        autocheckpoint: bool = True,
        create: bool = True,
    ) -> None:
        if isinstance(location, str) and location.startswith(("postgresql://", "postgres://")):
            location = PostgresUrl(location)
        self._pg: Postgres | None = None
        if isinstance(location, PostgresUrl):
            from relay.store.postgres import Postgres

            self._pg = Postgres(location)
            self.location: Path | PostgresUrl = location
            self.path = Path()  # SQLite only: the database file
        else:
            self.path = self.location = Path(location)
        self.create = create
        self.clock = clock or (lambda: datetime.now(UTC))
        self.busy_timeout_ms = busy_timeout_ms
        self.autocheckpoint = autocheckpoint
        self._db: sqlite3.Connection | None = None
        self._frames_seen = 0  # the log's frame count at the last checkpoint
        self._page = 0  # the database's page size, read once
        self._batch = False  # inside `batch()`: each `_write` is a savepoint
        self._pg_batch: PgConnection | None = None  # PostgreSQL's group transaction
        # In a PostgreSQL group: the next write gets a savepoint of its own (one that
        # may refuse, a charge); without, a write that raises aborts the group.
        self.savepoint = True

    @property
    def is_postgres(self) -> bool:
        return self._pg is not None

    @property
    def inline_writes(self) -> bool:
        """Whether a write may run on the event loop: a SQLite write fails at once on a
        held lock (busy timeout 0), a PostgreSQL one would wait for a row lock."""
        return self._pg is None

    @property
    def driver_errors(self) -> tuple[type[Exception], ...]:
        """The driver's own exceptions, which the store translates (for a last net)."""
        return (sqlite3.Error,) if self._pg is None else self._pg.errors

    @property
    def integrity_errors(self) -> tuple[type[Exception], ...]:
        """A unique or CHECK constraint refused a write."""
        return (sqlite3.IntegrityError,) if self._pg is None else self._pg.integrity_errors

    @property
    def db(self) -> Any:
        """The SQLite connection; for PostgreSQL, a connection that runs each statement
        on a pooled connection in autocommit (admin steps and tests)."""
        if self._pg is not None:
            return self._pg.autocommit()
        if self._db is None:
            self._db = self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        if not self.create and not self.path.exists():
            raise StoreError(
                f"RELAY_DATABASE: {self.path} does not exist"
                " (create it with `relay db init`, or start `relay serve`)"
            )
        try:
            create_private(self.path)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            db.execute("PRAGMA journal_mode = WAL")
            # WAL with synchronous=NORMAL survives a process crash; only a power
            # loss can drop the last commits.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            if not self.autocheckpoint:
                # A checkpoint writes and syncs the database file: leave it to
                # `checkpoint()`, called off the event loop.
                db.execute("PRAGMA wal_autocheckpoint = 0")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"RELAY_DATABASE: cannot open {self.path}: {exc}") from exc
        return db

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction: SQLite's write lock across processes (`BEGIN
        IMMEDIATE`), or a PostgreSQL READ COMMITTED transaction on one pooled
        connection. Rolled back when the body raises."""
        if self._pg is not None:
            if self._pg_batch is not None:
                if not self.savepoint:
                    with self._pg_batch.bare() as conn:
                        yield conn
                    return
                with self._pg_batch.savepoint() as conn:
                    yield conn
                return
            with self._pg.transaction() as conn:
                yield conn
            return
        if self._batch:
            with self._savepoint() as db:
                yield db
            return
        db = self.db
        _begin(db)
        try:
            yield db
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise translate(exc) from exc
            raise
        else:
            _commit(db)

    @property
    def in_batch(self) -> bool:
        """Inside `batch()`: a write's statements may be pipelined (PostgreSQL)."""
        return self._pg_batch is not None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One write transaction around several writes (a group commit).

        PostgreSQL: one READ COMMITTED transaction in pipeline mode, each write a
        savepoint; a statement that fails aborts the whole batch
        (`relay.store.postgres.GroupAborted`: nothing written; `relay.store.group`
        runs it again or one write at a time). SQLite:

        Each `_write` inside it is a savepoint: a write that raises is rolled
        back alone, and the others commit together at the end. A batch costs
        one commit, and the pages the writes share (a sender's row, the
        send-limit windows, the delivery log's last pages) go to the
        write-ahead log once, not once per write. Raises `StoreBusy` at once,
        having done nothing, when another connection holds the write lock and
        this one does not wait (busy timeout 0). If SQLite ends the
        transaction by itself (a full disk or an I/O error can), the writes
        still to come raise `BatchBroken`, and so does the end of the batch:
        nothing of it was committed.
        """
        if self._pg is not None:
            with self._pg.batch() as conn:
                self._pg_batch = conn
                try:
                    yield
                finally:
                    self._pg_batch = None
            return
        db = self.db
        _begin(db)
        self._batch = True
        try:
            yield
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            self._batch = False
        if not db.in_transaction:
            raise BatchBroken("the database ended the transaction: nothing of it was committed")
        _commit(db)

    @contextmanager
    def _savepoint(self) -> Iterator[Connection]:
        db = self.db
        if not db.in_transaction:
            raise BatchBroken("the database ended the transaction: nothing of it was committed")
        db.execute("SAVEPOINT write")
        try:
            yield db
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK TO write")
                db.execute("RELEASE write")
            if isinstance(exc, sqlite3.Error):
                raise translate(exc) from exc
            raise
        else:
            try:
                db.execute("RELEASE write")
            except sqlite3.Error as exc:
                raise translate(exc) from exc

    @contextmanager
    def _connection(self, pipelined: bool = False) -> Iterator[Connection]:
        """A connection for a few reads in autocommit, each statement its own snapshot.
        `pipelined` (PostgreSQL): the statements executed before the first result is
        read go in one round trip."""
        if self._pg is not None:
            with self._pg.pipelined() if pipelined else self._pg.connection() as conn:
                yield conn
            return
        try:
            yield self.db
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Row]:
        if self._pg is not None:
            return self._pg.read(sql, args)
        try:
            rows: list[Row] = self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        return rows

    @read_only
    def ping(self) -> None:
        """A read that proves the database answers (the admin listener's `/readyz`)."""
        self._read("SELECT count(*) FROM sqlite_master" if self._pg is None else "SELECT 1")

    def schema_version(self) -> int:
        """The migrations applied so far (`relay db status`); 0 for an empty database."""
        if self._pg is not None:
            return self._pg.schema_version()
        return int(self._read("PRAGMA user_version")[0][0])

    def migrate(self) -> int:
        """Apply the schema migrations not applied yet; returns the schema version.

        PostgreSQL: in one transaction under an advisory lock, so relays that
        start together apply each migration once (`relay.store.postgres`).
        """
        if self._pg is not None:
            return self._pg.migrate(MIGRATIONS)
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
        return len(MIGRATIONS)

    def check_writable(self) -> None:
        """Raise `StoreError` unless this connection can write (a read-only file, say).

        Rewrites the schema version in place: a real write that changes nothing.
        """
        if self._pg is not None:
            self._pg.check_writable()
            return
        with self._write() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            db.execute(f"PRAGMA user_version = {version}")

    def checkpoint(self) -> str | None:
        """Copy the write-ahead log into the database file as far as it can without
        waiting for anyone (PASSIVE). Returns what `restart_wal` should do now:
        "RESTART" when the log is past WAL_SIZE_LIMIT, "TRUNCATE" when writes
        stopped since the last checkpoint and the file is not empty, else None.
        PostgreSQL checkpoints by itself: None.
        """
        if self._pg is not None:
            return None
        frames = int(self._read("PRAGMA wal_checkpoint(PASSIVE)")[0][1])
        # The log's frame count changes with every write (and starts again at a
        # restart); the file's size does not shrink when the log starts over.
        idle, self._frames_seen = frames == self._frames_seen, frames
        if idle and self.wal_size() > 0:
            return "TRUNCATE"
        return "RESTART" if frames * self._page_size() > WAL_SIZE_LIMIT else None

    def _page_size(self) -> int:
        if not self._page:
            self._page = int(self._read("PRAGMA page_size")[0][0])
        return self._page

    def restart_wal(self, mode: str) -> None:
        """Copy what is left of the write-ahead log and start it over: RESTART (the
        next write starts at the beginning of the file) or TRUNCATE (the file is
        emptied too).

        Writers wait meanwhile; it waits for readers and for another process's
        writer up to CATCH_UP_BUSY_MS, then fails (`StoreBusy`) and is tried again
        at the next checkpoint.
        """
        if self._pg is not None:
            return
        assert mode in ("RESTART", "TRUNCATE")
        db = self.db
        try:
            db.execute(f"PRAGMA busy_timeout = {CATCH_UP_BUSY_MS}")
            busy = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        if busy:
            raise StoreBusy(f"the write-ahead log could not be started over ({mode}): in use")

    def wal_size(self) -> int:
        if self._pg is not None:
            return 0
        try:
            return self.path.with_name(self.path.name + "-wal").stat().st_size
        except FileNotFoundError:
            return 0

    def _now(self) -> int:
        return int(self.clock().timestamp())

    @property
    def rowid(self) -> str:
        """The column naming a row physically, for batched deletes on tables without a key."""
        return "rowid" if self._pg is None else "ctid"


def create_private(path: Path) -> None:
    """Create the database file, and its directory, readable by the relay's user only.

    Whatever the umask: the modes given only ever lose bits to it. SQLite gives
    the -wal and -shm files it creates the database file's mode.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _begin(db: sqlite3.Connection) -> None:
    """Take SQLite's write lock (`StoreBusy` at once if held and the busy timeout is 0)."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise translate(exc) from exc


def _commit(db: sqlite3.Connection) -> None:
    try:
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise translate(exc) from exc


def translate(exc: sqlite3.Error) -> StoreError:
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StoreBusy(f"database is locked by another writer: {exc}")
    return StoreError(f"database failed: {exc}")
