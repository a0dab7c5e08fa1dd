"""The processes a benchmark run starts on loopback: the sink, the ceiling and the relay.

Each is a child process with a bounded start and a bounded stop, and each is
stopped by whoever started it (`async with`), whatever happens in between:

    async with sink() as upstream, ceiling(setup) as bare:
        async with Relay.start(setup, upstream.port, workers=1, max_connections=10_000) as relay:
            ...

The relay is configured only through its documented admin CLI and environment,
as an operator would, in a temporary directory: certificates, a database with
one account, its sender domain, a token, and the sender on the no-limit list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bench import proc

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DOMAIN = "bench.test"
SENDER = f"bench@{DOMAIN}"
ACCOUNT = "bench"
START_TIMEOUT = 30.0  # a relay start: migrate, bind, fork workers
STOP_TIMEOUT = 15.0  # SIGTERM to exit; the relay is told to drain for at most DRAIN below
DRAIN = "5"  # RELAY_DRAIN_TIMEOUT, seconds: nothing is in flight when the bench stops it
CONTROL_TIMEOUT = 10.0  # one stats exchange with a reference server
ADMIN_TIMEOUT = 60.0  # one admin CLI command (it opens and migrates the database)
FLOOR_TIMEOUT = 180.0  # the floor client's whole run, as long as a load phase may take
# Settings a caller's environment might carry and which would change the relay
# under test: it gets only what the bench gives it.
RELAY_PREFIXES = ("RELAY_", "SMTP_CONFIG", "RESEND_", "CLOUDFLARE_", "DEFAULT_SEND_", "NO_LIMIT_")


class BenchError(Exception):
    """The bench could not set up or run what it measures; the message says what and why."""


@dataclass(frozen=True)
class Setup:
    directory: Path
    cert: Path
    key: Path
    database: Path | str  # a SQLite file, or a postgresql:// URL
    token: str
    sender: str = SENDER

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def child_env(extra: dict[str, str] | None = None, *, repo: Path = REPO) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(RELAY_PREFIXES)}
    # The children import `relay` and `bench` from this checkout (or `repo`, an
    # earlier relay's source: bench.baseline), whatever the cwd.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


async def _run(*args: str, env: dict[str, str], repo: Path = REPO) -> str:
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=repo,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(ADMIN_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise BenchError(f"{' '.join(args[1:])}: no answer in {ADMIN_TIMEOUT:g}s") from None
    if process.returncode != 0:
        raise BenchError(f"{' '.join(args[1:])} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


async def configure(
    directory: Path, database: Path | str | None = None, *, repo: Path = REPO
) -> Setup:
    """A fresh relay configuration in `directory`, made with the relay's own admin CLI
    (the one in `repo`); its database there, or `database` (an empty PostgreSQL
    database's URL, say)."""
    database = database or directory / "relay.db"
    env = child_env({"RELAY_DATABASE": str(database)}, repo=repo)
    relay = (sys.executable, "-m", "relay")
    certs = directory / "certs"

    async def cli(*args: str) -> str:
        return await _run(*relay, *args, env=env, repo=repo)

    await cli("certs", "generate", "--dir", str(certs), "--hostname", "localhost")
    await cli("db", "init")
    await cli("account", "create", ACCOUNT)
    await cli("domain", "add", ACCOUNT, DOMAIN)
    token = json.loads(await cli("token", "create", ACCOUNT, "--json"))["token"]
    # No balance to run out mid-benchmark: the sender sends without limit.
    await cli("nolimit", "add", SENDER)
    return Setup(directory, certs / "relay.crt", certs / "relay.key", database, token)


async def run_cli(setup: Setup, *args: str) -> str:
    """`python -m relay ARGS` on `setup`'s database; its output."""
    env = child_env({"RELAY_DATABASE": str(setup.database)})
    return await _run(sys.executable, "-m", "relay", *args, env=env)


def free_port() -> int:
    # The relay must be told its port up front: at log level WARNING it never prints it.
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def stop_process(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


class ReferenceServer:
    """A `python -m bench.servers` child: the sink or the ceiling."""

    def __init__(self, kind: str, process: asyncio.subprocess.Process, port: int) -> None:
        self.kind = kind
        self.process = process
        self.port = port

    @classmethod
    async def start(cls, kind: str, *args: str) -> ReferenceServer:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.servers",
            kind,
            *args,
            cwd=REPO,
            env=child_env(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await process.stdout.readline()
            port = int(json.loads(line)["port"])
        except (TimeoutError, ValueError, KeyError) as exc:
            await stop_process(process, signal.SIGKILL)
            raise BenchError(f"the {kind} did not start ({exc!r})") from None
        return cls(kind, process, port)

    @property
    def pids(self) -> list[int]:
        return [self.process.pid]

    async def stats(self) -> dict[str, int]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"stats\n")
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT):
                await self.process.stdin.drain()
                line = await self.process.stdout.readline()
            stats: dict[str, int] = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            raise BenchError(f"the {self.kind} stopped answering ({exc!r})") from None
        return stats

    async def stop(self) -> None:
        assert self.process.stdin is not None
        # End of stdin is the server's signal to stop.
        self.process.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.process.wait()
        await stop_process(self.process, signal.SIGKILL)


@contextlib.asynccontextmanager
async def reference(kind: str, *args: str) -> AsyncIterator[ReferenceServer]:
    server = await ReferenceServer.start(kind, *args)
    try:
        yield server
    finally:
        await server.stop()


def sink(*, pipelining: bool = False) -> contextlib.AbstractAsyncContextManager[ReferenceServer]:
    return reference("sink", *(["--pipelining"] if pipelining else []))


async def floor_client(
    sink_port: int, size: int, sessions: int, messages: int, sender: str = SENDER
) -> dict[str, float | int]:
    """`python -m bench.floor` against the sink: the bare aiosmtplib forward's CPU."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.floor",
        *("--port", str(sink_port), "--size", str(size), "--sender", sender),
        *("--sessions", str(sessions), "--messages", str(messages)),
        cwd=REPO,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(FLOOR_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise BenchError("the floor client did not finish") from None
    if process.returncode != 0:
        raise BenchError(f"the floor client failed: {err.decode(errors='replace').strip()}")
    figures: dict[str, float | int] = json.loads(out)
    return figures


def ceiling(setup: Setup) -> contextlib.AbstractAsyncContextManager[ReferenceServer]:
    return reference(
        "ceiling", "--cert", str(setup.cert), "--key", str(setup.key), "--token", setup.token
    )


class Relay:
    """`python -m relay serve` as a child process, forwarding to the sink."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    @property
    def pids(self) -> list[int]:
        return proc.tree(self.process.pid)

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        setup: Setup,
        sink_port: int,
        *,
        workers: int,
        max_connections: int,
        extra_env: dict[str, str] | None = None,
        repo: Path = REPO,
    ) -> AsyncIterator[Relay]:
        port = free_port()
        upstream = {DOMAIN: {"host": HOST, "port": sink_port, "secure": False, "startTls": False}}
        env = child_env(
            {
                "RELAY_LISTEN": f"{HOST}:{port}",
                "RELAY_HOSTNAME": "localhost",
                "RELAY_TLS_CERT": str(setup.cert),
                "RELAY_TLS_KEY": str(setup.key),
                "RELAY_DATABASE": str(setup.database),
                # Beside the bench's files, whatever the database (PostgreSQL has no directory).
                "RELAY_SPOOL_DIR": str(setup.directory / "spool"),
                "RELAY_MAX_CONNECTIONS": str(max_connections),
                "RELAY_MAX_CONNECTIONS_PER_IP": str(max_connections),  # every client is loopback
                "RELAY_DRAIN_TIMEOUT": DRAIN,
                # INFO logs a line per message: the bench would measure logging.
                "RELAY_LOG_LEVEL": "WARNING",
                "SMTP_CONFIG": json.dumps(upstream),
                **(extra_env or {}),
            },
            repo=repo,
        )
        log = setup.directory / f"relay-{workers}w-{port}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relay",
                "serve",
                "--workers",
                str(workers),
                cwd=repo,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        relay = cls(process, port, log)
        try:
            await relay._wait_ready(setup.client_tls(), workers)
            yield relay
        finally:
            await stop_process(process)

    async def _wait_ready(self, tls: ssl.SSLContext, workers: int) -> None:
        """Until every worker listens and one answers a TLS connection with its 220 greeting."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise BenchError(f"the relay exited with {self.process.returncode}: {self.tail()}")
            if proc.listeners(self.port) >= workers and await self._greets(tls):
                return
            await asyncio.sleep(0.05)
        raise BenchError(f"the relay did not answer on {HOST}:{self.port}: {self.tail()}")

    async def _greets(self, tls: ssl.SSLContext) -> bool:
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection(HOST, self.port, ssl=tls)
                try:
                    return (await reader.readline()).startswith(b"220")
                finally:
                    writer.close()
        except (OSError, TimeoutError, ssl.SSLError):
            return False

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
