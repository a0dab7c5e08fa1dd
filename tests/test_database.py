"""The database and the files the relay writes, under attack and fault.

Private files whatever the umask; the write-ahead log bounded; no database made
silently; a read-only or vanished database; reads that never wait behind a
blocked write; a settle that survives a failing store. Each test that is not
about SQLite's own files and locks runs on PostgreSQL too.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import is_postgres
from support import SENDER, FrozenClock, attempt, message

from relay.store.db import WAL_SIZE_LIMIT
from relay.store.facade import Store
from relay.store.ledger import OWNER_DEAD_AFTER

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.backends


def wait_for(condition: Callable[[], bool], seconds: float = 15) -> None:
    """Poll `condition` until it holds; fail after `seconds` (a bound, not a sync)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def relay_cli(*args: str, env: dict[str, str], umask: int = -1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        umask=umask,
    )


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


# --- private files ------------------------------------------------------------


@pytest.mark.sqlite_only
def test_database_and_outbox_files_are_private_whatever_the_umask(relay_factory, tmp_path, umask):
    data, outbox = tmp_path / "data", tmp_path / "data" / "outbox"
    relay = relay_factory(RELAY_DATABASE=str(data / "relay.db"), RELAY_DEV_OUTBOX=str(outbox))
    raw = relay.raw()
    raw.login(relay.token())
    assert attempt(raw).startswith("250 2.0.0 Ok <")
    files = [data / "relay.db", data / "relay.db-wal", data / "relay.db-shm"]
    files += list(outbox.glob("*.eml"))
    assert len(files) == 4
    assert {str(f): mode(f) for f in files} == {str(f): 0o600 for f in files}
    assert (mode(data), mode(outbox)) == (0o700, 0o700)


def test_certs_generate_writes_a_private_key_and_never_overwrites(tmp_path):
    directory = tmp_path / "certs"
    first = relay_cli("certs", "generate", "--dir", str(directory), env={}, umask=0)
    assert first.returncode == 0, first.stderr
    key, crt = directory / "relay.key", directory / "relay.crt"
    assert (mode(key), mode(crt), mode(directory)) == (0o600, 0o644, 0o700)
    before = key.read_bytes()

    again = relay_cli("certs", "generate", "--dir", str(directory), env={}, umask=0)
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr == f"relay: {crt} exists already; use --force to replace it\n"
    assert key.read_bytes() == before

    key.chmod(0o644)  # a key someone loosened is not kept loose by --force
    forced = relay_cli("certs", "generate", "--dir", str(directory), "--force", env={}, umask=0)
    assert forced.returncode == 0, forced.stderr
    assert key.read_bytes() != before
    assert mode(key) == 0o600
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


# --- no database made silently -------------------------------------------------


def test_admin_commands_never_create_a_missing_database(tmp_path):
    database = tmp_path / "data" / "relay.db"
    env = {"RELAY_DATABASE": str(database)}
    for args in (("account", "create", "acme"), ("sender", "list"), ("limits", "show")):
        result = relay_cli(*args, env=env)
        assert result.returncode == 1
        assert result.stderr == (
            f"relay: RELAY_DATABASE: {database} does not exist"
            " (create it with `relay db init`, or start `relay serve`)\n"
        )
        assert not database.exists()
    created = relay_cli("db", "init", env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith(f"created {database} (schema version ")
    assert relay_cli("account", "create", "acme", env=env).returncode == 0
    again = relay_cli("db", "init", env=env)
    assert again.stdout.startswith(f"migrated {database} (schema version ")
    assert relay_cli("account", "list", env=env).stdout.splitlines()[-1].split()[1] == "acme"


# --- the write-ahead log stays bounded ------------------------------------------


def grow_wal(path: Path, rows: int) -> None:
    """Write `rows` rows of a kilobyte (and their index) into the log, from a connection
    that never checkpoints (as the relay's inline one) and keeps no snapshot open."""
    writer = Store(path, autocheckpoint=False)
    row = "x" * 1000
    with writer._write() as db:
        db.executemany(
            "INSERT INTO delivered_keys (key, created) VALUES (?, 0)",
            ((f"{i}{row}",) for i in range(rows)),
        )
    writer.close()


@pytest.mark.sqlite_only
def test_a_wal_past_the_limit_starts_over_and_is_emptied_once_writes_stop(relay):
    database = relay.relay.settings.database
    wal = Path(f"{database}-wal")
    grow_wal(database, 4096)
    size = wal.stat().st_size
    assert size > WAL_SIZE_LIMIT
    # Past the limit: RESTART. The file keeps its size, and the next writes go
    # to its beginning instead of its end.
    relay.call(relay.relay.upkeep())
    raw = relay.raw()
    raw.login(relay.token())
    assert attempt(raw).startswith("250 2.0.0 Ok <")
    assert wal.stat().st_size == size
    # The next tick sees that message's writes; the one after, none: TRUNCATE.
    relay.call(relay.relay.upkeep())
    assert wal.stat().st_size == size
    relay.call(relay.relay.upkeep())
    assert wal.stat().st_size == 0


@pytest.mark.sqlite_only
def test_a_small_wal_is_emptied_once_writes_stop(relay):
    database = relay.relay.settings.database
    wal = Path(f"{database}-wal")
    grow_wal(database, 256)
    assert 0 < wal.stat().st_size < WAL_SIZE_LIMIT
    # The first tick sees the log grow (PASSIVE only); the next sees it still: TRUNCATE.
    relay.call(relay.relay.upkeep())
    assert 0 < wal.stat().st_size < WAL_SIZE_LIMIT
    relay.call(relay.relay.upkeep())
    assert wal.stat().st_size == 0
    # Every message still lands.
    raw = relay.raw()
    raw.login(relay.token())
    assert attempt(raw).startswith("250 2.0.0 Ok <")


# --- a read-only or vanished database -------------------------------------------


@contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """Make `path` unwritable, for root too (the immutable flag), or skip."""
    if os.geteuid() != 0:
        path.chmod(0o400)
        try:
            yield
        finally:
            path.chmod(0o600)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode
    ):
        pytest.skip("cannot make a file read-only for root here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_database_stops_the_start_with_one_line(tmp_path, cert_dir):
    database = tmp_path / "relay.db"
    assert relay_cli("db", "init", env={"RELAY_DATABASE": str(database)}).returncode == 0
    env = {
        "RELAY_DATABASE": str(database),
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
        "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
    }
    with read_only_file(database):
        result = relay_cli("serve", env=env)
    assert result.returncode == 2
    assert result.stderr == (
        f"relay: RELAY_DATABASE: cannot write {database}: attempt to write a readonly database\n"
    )


@pytest.mark.sqlite_only  # PostgreSQL's: test_cluster.py, the database stopped under load
def test_a_failing_database_is_logged_once_a_minute_without_a_traceback(relay, caplog):
    database = relay.relay.settings.database
    relay.call(relay.relay.store.upkeep(Store.close))  # reopened by the next tick
    caplog.set_level(logging.ERROR, logger="relay.server")
    with read_only_file(database):
        for _ in range(3):
            relay.call(relay.relay.upkeep())
        relay.call(relay.relay.store.upkeep(Store.close))
    failures = [r for r in caplog.records if r.name == "relay.server"]
    assert len(failures) == 1  # three failing ticks, one line
    assert failures[0].getMessage().startswith("WAL checkpoint failed: database failed: ")
    assert failures[0].getMessage().endswith(" (logged at most once a minute)")
    assert not failures[0].exc_info  # an expected condition: no traceback


@pytest.mark.sqlite_only
def test_a_database_deleted_under_the_relay_is_detected(relay, caplog):
    database = relay.relay.settings.database
    caplog.set_level(logging.ERROR, logger="relay.server")
    relay.call(relay.relay.upkeep())
    assert [r for r in caplog.records if r.name == "relay.server"] == []
    database.unlink()
    for _ in range(3):
        relay.call(relay.relay.upkeep())
    failures = [r.getMessage() for r in caplog.records if r.name == "relay.server"]
    assert failures == [
        f"database file check failed: RELAY_DATABASE: {database} was deleted or replaced"
        " while the relay runs; what it records now is lost at the next start: restore"
        " the file and restart the relay (logged at most once a minute)"
    ]


# --- AUTH never waits behind a blocked write ------------------------------------


@contextmanager
def writes_blocked(database: str) -> Iterator[None]:
    """Another process holds what a charge must write: SQLite's write lock, or on
    PostgreSQL the tables a charge writes (EXCLUSIVE: reads go on, writes wait)."""
    if is_postgres(database):
        import psycopg

        with psycopg.connect(database) as locker:
            locker.execute("LOCK TABLE pending, counters IN EXCLUSIVE MODE")
            yield
            locker.rollback()
        return
    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_auth_answers_while_another_process_holds_the_write_lock(relay, sink, database_url):
    token = relay.token()
    sending = relay.raw()
    sending.login(token)
    assert sending.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert sending.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert sending.cmd("DATA").startswith("354 ")
    with writes_blocked(database_url):
        sending.send(message() + b".")
        wait_for(lambda: relay.relay.store.queued == 1)  # the charge waits for the lock
        other = relay.raw()
        assert other.login(token) == "235 2.7.0 Authentication successful"
        assert other.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert other.cmd("RCPT TO:<b@dest.test>") == "250 2.1.5 Ok"
        assert relay.relay.store.queued == 1
        assert sink.messages == []
    assert sending.read().startswith("250 2.0.0 Ok <")
    assert len(sink.messages) == 1


# --- a delivered message stays charged when settle fails -------------------------


def fail_settles(store: Store) -> None:
    """Every settle fails (it deletes the pending row) until `allow_settles`."""
    if store.is_postgres:
        store.db.execute(
            "CREATE FUNCTION fail_settle() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'disk I/O error'; END $$"
        )
        store.db.execute(
            "CREATE TRIGGER fail_settle BEFORE DELETE ON pending"
            " FOR EACH ROW EXECUTE FUNCTION fail_settle()"
        )
        return
    store.db.execute(
        "CREATE TRIGGER fail_settle BEFORE DELETE ON pending"
        " BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
    )


def allow_settles(store: Store) -> None:
    store.db.execute("DROP TRIGGER fail_settle" + (" ON pending" if store.is_postgres else ""))


def test_a_failed_settle_is_retried_and_never_refunded_by_a_sweep(relay, sink):
    relay.store.set_sender(SENDER, balance=5)
    fail_settles(relay.store)
    raw = relay.raw()
    raw.login(relay.token())
    assert attempt(raw).startswith("250 2.0.0 Ok <")
    assert len(sink.messages) == 1
    assert relay.relay.store.settling == 1
    assert relay.store.pending_count() == 1
    # Another process's sweep, however old it judges the row: its owner lives.
    assert relay.store.settle_stale(older_than=0) == []
    relay.call(relay.relay.upkeep())
    allow_settles(relay.store)
    wait_for(lambda: relay.relay.store.settling == 0)
    assert relay.store.pending_count() == 0
    assert relay.store.show_sender(SENDER)["balance"] == 4  # charged, not refunded


def test_the_sweep_refunds_only_rows_of_processes_without_a_heartbeat(database_url):
    clock = FrozenClock(datetime(2026, 11, 21, 12, tzinfo=UTC))
    path = database_url
    admin = Store(path, clock=clock)
    admin.migrate()
    admin.create_account("acme")
    admin.set_sender(SENDER, balance=10)
    live, dead = Store(path, clock=clock), Store(path, clock=clock)
    live.owner, dead.owner = "1-live", "2-dead"
    for store in (live, dead):
        store.heartbeat()
        store.reserve(SENDER, account_id=1, recipients=1, unit=1, default_balance=0)
    clock.advance(seconds=OWNER_DEAD_AFTER)
    live.heartbeat()
    swept = admin.settle_stale(older_than=30)
    assert [r["owner"] for r in swept] == ["2-dead"]
    assert admin.show_sender(SENDER)["balance"] == 9
    assert admin.pending_count() == 1
