"""Shared fixtures: the real relay over real TLS on an ephemeral port, and real upstreams.

`relay_factory(limits=None, **env)` starts a `Relay` on its own event loop thread (uvloop, as in
production) with settings built from `env` only, never from this process's
environment. `sink_factory(...)` starts an aiosmtpd server that records what
reached it: plain, STARTTLS, or implicit TLS, with or without AUTH.

`database_url` is the test's own empty database, and the one switch between
backends: SQLite (a file in the test's directory) by default; in a module
marked `pytestmark = pytest.mark.backends`, each test runs twice, on SQLite
and on PostgreSQL (a database of its own on a throwaway cluster the session
starts, `pg_cluster.py`). The relay and store fixtures all take their
database from it. Where PostgreSQL cannot run, its half skips and the run's
last lines say so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import smtplib
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from support import DOMAIN, MISSING_TOOL, Raw

from relay import certs
from relay.config import Limits, Upkeep, load_settings
from relay.server import Relay
from relay.store.facade import Store

# --- the database: SQLite, or PostgreSQL -------------------------------------------------

BACKENDS = ("sqlite", "postgres")
TEMPLATE = "relay_template"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a module marked `backends` run once per backend (`database_url`)."""
    if "database_url" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("backends") is None:
        return
    if metafunc.definition.get_closest_marker("sqlite_only") is not None:
        return
    if metafunc.definition.get_closest_marker("postgres_only") is not None:
        metafunc.parametrize("database_url", ["postgres"], indirect=True)
        return
    metafunc.parametrize("database_url", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster with a migrated template, or why there is none."""
    from pg_cluster import Cluster, Unavailable

    try:
        cluster = Cluster()
        cluster.start()
    except Unavailable as exc:
        yield f"{MISSING_TOOL}PostgreSQL ({exc}); its half of the store tests did not run"
        return

    def migrate(url: str) -> None:
        store = Store(url)
        store.migrate()
        store.close()

    try:
        cluster.make_template(TEMPLATE, migrate)
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """This test's own database: a SQLite path, or a fresh PostgreSQL database's URL."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        return str(tmp_path / "relay.db")
    cluster = request.getfixturevalue("pg_cluster")
    if isinstance(cluster, str):
        pytest.skip(cluster)
    return str(cluster.new_database(TEMPLATE))


@pytest.fixture
def new_database(
    database_url: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], str]:
    """Another empty database of the test's backend (a second relay's, say)."""
    made = [0]

    def make() -> str:
        made[0] += 1
        if database_url.startswith("postgresql://"):
            return str(request.getfixturevalue("pg_cluster").new_database(TEMPLATE))
        return str(tmp_path / f"relay{made[0]}.db")

    return make


def is_postgres(database_url: str) -> bool:
    return database_url.startswith("postgresql://")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name, last, each test skipped because an outside tool is missing."""
    skipped = [
        (report.nodeid, str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else "")
        for report in terminalreporter.stats.get("skipped", [])
    ]
    missing = [(nodeid, why) for nodeid, why in skipped if MISSING_TOOL in why]
    if missing:
        terminalreporter.section("NOT TESTED: outside tools missing", sep="!", red=True)
        for nodeid, why in missing:
            reason = why[why.index(MISSING_TOOL) :]
            terminalreporter.write_line(f"SKIPPED {nodeid or '(module)'}: {reason}", red=True)


@pytest.fixture(scope="session")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    certs.generate(directory, "localhost")
    return directory


@pytest.fixture(scope="session")
def client_tls(cert_dir: Path) -> ssl.SSLContext:
    """What a client that trusts the relay's self-signed certificate uses."""
    return ssl.create_default_context(cafile=str(cert_dir / "relay.crt"))


# --- upstream sinks --------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


class Recorder:
    """An aiosmtpd handler that records each message, or answers as scripted."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}  # recipient -> reply line
        self.mail_reply: str | None = None
        self.mail_options: list[list[str]] = []
        self.data_reply: str | None = None
        self.connections = 0
        self.auth_logins: list[bytes] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        self.mail_options.append(list(options))
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return f"250 2.0.0 Ok: queued as up{len(self.messages)}"


async def _cancel_the_rest() -> None:
    """Cancel and await what is left on a loop, so closing it leaves no task pending."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class LoopThread:
    """An event loop on its own thread, for servers the tests run beside the relay."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(_cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Sink:
    recorder: Recorder
    server: asyncio.AbstractServer
    port: int
    mode: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    @property
    def messages(self) -> list[Received]:
        return self.recorder.messages

    def smtp_config(self, domain: str = DOMAIN, **extra: Any) -> str:
        entry: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "secure": self.mode == "tls",
            "startTls": self.mode == "starttls",
        }
        if self.username:
            entry["authType"] = ["plain", "login"]
            entry["credentials"] = {"username": self.username, "password": self.password}
        if self.ca_file:
            entry["tls"] = {"ca": self.ca_file}
        entry.update(extra)
        return json.dumps({domain: entry})


@pytest.fixture
def sink_factory(cert_dir: Path) -> Iterator[Callable[..., Sink]]:
    """Real aiosmtpd upstreams on ephemeral ports: plain, STARTTLS or implicit TLS."""
    loops = LoopThread()
    started: list[asyncio.AbstractServer] = []
    protocols: list[SMTP] = []

    def start(
        mode: str = "plain", username: str | None = None, password: str | None = None
    ) -> Sink:
        recorder = Recorder()
        kwargs: dict[str, Any] = {"hostname": "sink.test", "loop": loops.loop}
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert_dir / "relay.crt", cert_dir / "relay.key")
        if mode == "starttls":
            kwargs["tls_context"] = tls
            kwargs["require_starttls"] = True
        if username:

            def authenticator(
                server: Any, session: Any, envelope: Any, mechanism: str, data: Any
            ) -> AuthResult:
                assert isinstance(data, LoginPassword)
                ok = data.login == username.encode() and data.password == (password or "").encode()
                if ok:
                    recorder.auth_logins.append(data.login)
                return AuthResult(success=ok, handled=False)

            kwargs["authenticator"] = authenticator
            kwargs["auth_required"] = True
            kwargs["auth_require_tls"] = mode == "starttls"

        def factory() -> SMTP:
            recorder.connections += 1
            with warnings.catch_warnings():
                # AUTH over plaintext, wanted here: a test upstream on loopback.
                warnings.simplefilter("ignore", UserWarning)
                protocol = SMTP(recorder, **kwargs)
            protocols.append(protocol)
            return protocol

        async def serve() -> asyncio.AbstractServer:
            return await loops.loop.create_server(
                factory, "127.0.0.1", 0, ssl=tls if mode == "tls" else None
            )

        server = loops.call(serve())
        started.append(server)
        port = server.sockets[0].getsockname()[1]
        ca = str(cert_dir / "relay.crt") if mode != "plain" else None
        return Sink(recorder, server, port, mode, username, password, ca)

    yield start

    async def shut() -> None:
        for server in started:
            server.close()
        for protocol in protocols:
            if protocol.transport is not None:
                protocol.transport.abort()

    loops.call(shut())
    loops.close()


# --- the relay ----------------------------------------------------------------------


@dataclass
class RunningRelay:
    relay: Relay
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    store: Store  # a second connection to the same database, for admin steps
    client_tls: ssl.SSLContext
    clients: list[Any] = field(default_factory=list)  # closed at teardown

    @property
    def port(self) -> int:
        return self.relay.port

    def token(self, account: str = "acme", domain: str | None = DOMAIN, **kwargs: Any) -> str:
        """An account (created when missing) with `domain`, and a fresh token for it."""
        if account not in {a["name"] for a in self.store.list_accounts()}:
            self.store.create_account(account)
        if domain and domain not in {d["domain"] for d in self.store.list_domains()}:
            self.store.add_domain(account, domain)
        return str(self.store.create_token(account, **kwargs)["token"])

    def connect(self, timeout: float = 10) -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL("127.0.0.1", self.port, context=self.client_tls, timeout=timeout)

    def login(self, token: str | None = None) -> smtplib.SMTP_SSL:
        client = self.connect()
        self.clients.append(client)
        client.ehlo("client.test")
        client.login("api_token", token or self.token())
        return client

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def raw(self) -> Raw:
        client = Raw(self.port, self.client_tls)
        self.clients.append(client)
        return client


@pytest.fixture
def relay_factory(
    cert_dir: Path,
    client_tls: ssl.SSLContext,
    database_url: str,
    new_database: Callable[[], str],
    tmp_path: Path,
) -> Iterator[Callable[..., RunningRelay]]:
    running: list[RunningRelay] = []

    def start(
        limits: Limits | None = None, upkeep: Upkeep | None = None, **env: str
    ) -> RunningRelay:
        base = {
            "RELAY_HOSTNAME": "relay.test",
            "RELAY_LISTEN": "127.0.0.1:0",
            "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
            "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
            "RELAY_DATABASE": new_database() if running else database_url,
            "RELAY_UPSTREAM_TIMEOUT": "5",
            "RELAY_DRAIN_TIMEOUT": "5",
            # Every test client comes from 127.0.0.1; the per-address cap has its own tests.
            "RELAY_MAX_CONNECTIONS_PER_IP": "1000",
        }
        given = {**base, **env}
        if is_postgres(given["RELAY_DATABASE"]):
            # No database file to put them beside: the test's own directory, not ./data.
            given.setdefault("RELAY_SPOOL_DIR", str(tmp_path / "spool"))
            given.setdefault("RELAY_SETTLE_JOURNAL", str(tmp_path / "settle-journal"))
        settings = load_settings(given)
        if limits is not None:
            settings = dataclasses.replace(settings, limits=limits)
        if upkeep is not None:
            settings = dataclasses.replace(settings, upkeep=upkeep)
        loop = uvloop.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        relay = Relay(settings)
        asyncio.run_coroutine_threadsafe(relay.start(), loop).result(10)
        store = Store(settings.database)
        handle = RunningRelay(relay, loop, thread, store, client_tls)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        for client in handle.clients:
            client.close()
        handle.call(handle.relay.stop())
        handle.call(_cancel_the_rest())
        handle.loop.call_soon_threadsafe(handle.loop.stop)
        handle.thread.join(5)
        handle.loop.close()
        handle.store.close()


@pytest.fixture
def sink(sink_factory: Callable[..., Sink]) -> Sink:
    return sink_factory("plain")


@pytest.fixture
def relay(relay_factory: Callable[..., RunningRelay], sink: Sink) -> RunningRelay:
    """The relay forwarding example.com to a plain aiosmtpd sink, with a balance to spend."""
    return relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="1000")
