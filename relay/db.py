"""The SQLite connection: opening, write transactions, schema migrations, checkpoints.

Every concept module (accounts, tokens, ledger) builds on `Database`, so they
share one connection and one way to take SQLite's write lock. sqlite3 errors are
translated here into `StoreError` (or `StoreBusy` for a held lock) and never
leave the store.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relay.errors import StoreError
from relay.schema import MIGRATIONS


class StoreBusy(StoreError):
    """Another connection holds SQLite's write lock (only seen without a busy timeout)."""


class Database:
    """One connection to the relay's database, opened on first use."""

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout_ms: int = 10_000,
        autocheckpoint: bool = True,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self.create = create
        self.clock = clock or (lambda: datetime.now(UTC))
        self.busy_timeout_ms = busy_timeout_ms
        self.autocheckpoint = autocheckpoint
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
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
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock across processes."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        try:
            yield db
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise translate(exc) from exc
            raise
        else:
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise translate(exc) from exc

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def migrate(self) -> int:
        """Apply the schema migrations not applied yet; returns the schema version."""
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
        return len(MIGRATIONS)

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file (PASSIVE: never waits)."""
        self._read("PRAGMA wal_checkpoint(PASSIVE)")

    def _now(self) -> int:
        return int(self.clock().timestamp())


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


def translate(exc: sqlite3.Error) -> StoreError:
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StoreBusy(f"database is locked by another writer: {exc}")
    return StoreError(f"database failed: {exc}")
