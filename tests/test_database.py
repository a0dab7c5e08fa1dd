"""The database and the files the relay writes, under attack and fault (issue #10).

Private files whatever the umask; the write-ahead log bounded; no database made
silently; a read-only or vanished database; reads that never wait behind a
blocked write; a settle that survives a failing store.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import attempt

ROOT = Path(__file__).resolve().parent.parent


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


# --- item 3: private files ------------------------------------------------------------


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


# --- item 19: no database made silently -------------------------------------------------


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
    assert relay_cli("account", "list", env=env).stdout.split()[-1] == "acme"
