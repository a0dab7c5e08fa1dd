"""A throwaway PostgreSQL cluster for the tests and the benchmark.

Debian's `postgresql` package (`apt-get install postgresql`, as .ci/run does)
provides `initdb` and `pg_ctl`; the cluster lives in a temporary directory,
listens on 127.0.0.1 at an ephemeral port and on a unix socket in that
directory, trusts local connections, and is removed on `stop()`. PostgreSQL
refuses to run as root: as root, the server runs as the `postgres` user
(`runuser`), which owns the directory.

Each test gets a database of its own, copied from a migrated template
(`CREATE DATABASE ... TEMPLATE`), which takes milliseconds.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from itertools import count
from pathlib import Path

import psycopg

START_TIMEOUT = 60  # seconds pg_ctl may take to start or stop the server


class Unavailable(Exception):
    """No PostgreSQL server binaries here (or no user to run them as)."""


def binaries() -> Path:
    """The directory holding initdb and pg_ctl (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise Unavailable("PostgreSQL is not installed (apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One PostgreSQL server: `start()`, `new_database()`, `stop()`, `kill()` (for tests)."""

    def __init__(self) -> None:
        self.bin = binaries()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and there is no postgres user") from None
            self.user = "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._names = count(1)
        if self.user is not None:
            shutil.chown(self.root, self.user)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=START_TIMEOUT, check=False
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            done = self._run(
                str(self.bin / "initdb"),
                "-D", str(self.data), "-U", "postgres", "-A", "trust",
                "--locale=C", "-E", "UTF8", "--no-sync",
            )  # fmt: skip
            if done.returncode:
                raise Unavailable(f"initdb failed: {done.stderr.strip()}")
        # Durability is not under test: fsync off makes CREATE DATABASE and
        # commits cheap on a shared machine. 300 connections: relays under load,
        # each with a few pools, plus the tests' own.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        done = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
            "-o", options, "-w", "-t", str(START_TIMEOUT), "start",
        )  # fmt: skip
        if done.returncode:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise Unavailable(f"pg_ctl start failed: {done.stderr.strip()} {log[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.encode())

    def new_database(self, template: str = "template0") -> str:
        """A fresh database (a copy of `template`), by URL."""
        name = f"t{next(self._names)}_{int(time.time() * 1000) % 100000}"
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def make_template(self, name: str, migrate: object) -> None:
        """A database `name`, migrated by `migrate(url)`, that `new_database` can copy."""
        self.execute(f'CREATE DATABASE "{name}"')
        assert callable(migrate)
        migrate(self.url(name))
        # No connection may be open to a template while it is copied.
        self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
