"""Balances and send limits are hard stops under concurrency.

A hundred sessions at once, one recipient each, race for 30 places: exactly 30
messages reach the upstream, whether the places are a balance or a daily limit,
and whether one relay process serves them or two processes share the database.
The clients are aiosmtplib sessions on one event loop; the relay runs on its own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest
from support import DOMAIN, SENDER, free_port, message

from relay.store import Store

pytestmark = pytest.mark.backends
REPO = Path(__file__).resolve().parent.parent
SESSIONS = 100
PLACES = 30
START_TIMEOUT = 20.0  # seconds a relay subprocess may take to accept TLS


async def send_one(port: int, tls: ssl.SSLContext, token: str, rcpt: str) -> str:
    """One session, one message: the reply that ended it, as `code enhanced text`."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, use_tls=True, tls_context=tls, timeout=60
    )
    async with client:
        await client.login("api_token", token)
        try:
            await client.mail(SENDER)
            await client.rcpt(rcpt)
            response = await client.data(message(to=rcpt))
        except aiosmtplib.SMTPResponseException as exc:
            return f"{exc.code} {exc.message}"
    return f"{response.code} {response.message}"


def send_all(ports: list[int], tls: ssl.SSLContext, token: str) -> list[str]:
    """SESSIONS sessions at once, spread evenly over `ports`."""

    async def run() -> list[str]:
        return await asyncio.gather(
            *(
                send_one(ports[i % len(ports)], tls, token, f"r{i}@dest.test")
                for i in range(SESSIONS)
            )
        )

    return asyncio.run(run())


def tally(replies: list[str]) -> tuple[list[str], list[str]]:
    delivered = [r for r in replies if r.startswith("250 2.0.0 Ok <")]
    return delivered, [r for r in replies if r not in delivered]


def test_balance_of_30_serves_exactly_30_of_100_sessions(relay_factory, sink, client_tls):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config())
    token = relay.token()
    relay.store.set_sender(SENDER, balance=PLACES)

    delivered, refused = tally(send_all([relay.port], client_tls, token))

    assert len(delivered) == PLACES
    assert len(refused) == SESSIONS - PLACES
    assert all(r.startswith("550 5.7.1 ") for r in refused), set(refused)
    assert len(sink.messages) == PLACES
    assert relay.store.show_sender(SENDER)["balance"] == 0
    assert relay.store.pending_count() == 0


def test_daily_limit_of_30_serves_exactly_30_of_100_sessions(relay_factory, sink, client_tls):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config())
    token = relay.token()
    relay.store.add_nolimit(SENDER)
    relay.store.set_limits(account=None, daily=PLACES, monthly=None)

    delivered, refused = tally(send_all([relay.port], client_tls, token))

    assert len(delivered) == PLACES
    assert len(refused) == SESSIONS - PLACES
    prefix = f"451 4.7.1 Daily send limit of {PLACES} reached for the relay; the window resets at "
    assert all(r.startswith(prefix) and r.endswith("T00:00:00Z") for r in refused), set(refused)
    assert len(sink.messages) == PLACES
    relay_row = next(r for r in relay.store.show_limits() if r["scope"] == "relay")
    assert (relay_row["daily_count"], relay_row["monthly_count"]) == (PLACES, PLACES)
    assert relay.store.list_senders() == []  # the no-limit sender has no row to charge


# --- two relay processes on one database ----------------------------------------------


def wait_for_tls(port: int, tls: ssl.SSLContext, process: subprocess.Popen[bytes], log: Path):
    """Poll (bounded) until the subprocess answers a TLS greeting on `port`."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert process.poll() is None, f"relay exited {process.returncode}: {log.read_text()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                with tls.wrap_socket(sock, server_hostname="localhost") as conn:
                    if conn.recv(100).startswith(b"220 "):
                        return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"relay on {port} not ready: {log.read_text()}"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_on_one_database_serve_exactly_30(
    sink, cert_dir, client_tls, tmp_path, database_url
):
    database = database_url
    store = Store(database)
    store.migrate()
    store.create_account("acme")
    store.add_domain("acme", DOMAIN)
    token = str(store.create_token("acme")["token"])
    store.set_sender(SENDER, balance=PLACES)

    ports = [free_port(), free_port()]
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for n, port in enumerate(ports):
            env = {
                "PATH": os.environ.get("PATH", ""),
                "PYTHONPATH": str(REPO),
                "RELAY_HOSTNAME": "relay.test",
                "RELAY_LISTEN": f"127.0.0.1:{port}",
                "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
                "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
                "RELAY_DATABASE": database,
                "SMTP_CONFIG": sink.smtp_config(),
                "RELAY_LOG_LEVEL": "WARNING",
                "RELAY_DRAIN_TIMEOUT": "5",
                "RELAY_MAX_CONNECTIONS_PER_IP": "1000",  # 100 sessions, all from 127.0.0.1
            }
            logs.append(tmp_path / f"relay{n}.log")
            with logs[-1].open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "relay", "serve"],
                        cwd=REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for port, process, log in zip(ports, processes, logs, strict=True):
            wait_for_tls(port, client_tls, process, log)

        delivered, refused = tally(send_all(ports, client_tls, token))

        assert len(delivered) == PLACES, [p.read_text() for p in logs]
        assert len(refused) == SESSIONS - PLACES
        assert all(r.startswith("550 5.7.1 ") for r in refused), set(refused)
        assert len(sink.messages) == PLACES
        assert store.show_sender(SENDER)["balance"] == 0
        assert store.pending_count() == 0
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        store.close()
