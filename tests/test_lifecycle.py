"""Start, serve, drain: a stopping relay finishes what it accepted; workers share the port."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

from support import SENDER, Lines, free_port, message

from relay.store.facade import Store

ROOT = Path(__file__).resolve().parent.parent


class HeldData:
    """The sink holds DATA until the test releases it: a forward in flight, as long as needed."""

    def __init__(self, sink) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        original = sink.recorder.handle_DATA

        async def handle_DATA(server, session, envelope):
            self.arrived.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
            return await original(server, session, envelope)

        sink.recorder.handle_DATA = handle_DATA


def wait_until(condition, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_stop_lets_a_forward_in_flight_finish_and_refuses_new_sessions(relay, sink):
    token = relay.token()
    held = HeldData(sink)
    replies: list[tuple[int, bytes]] = []

    def send() -> None:
        with relay.connect() as client:
            client.login("api_token", token)
            client.mail(SENDER)
            client.rcpt("a@dest.test")
            replies.append(client.data(message()))

    sender = threading.Thread(target=send)
    sender.start()
    assert held.arrived.wait(10)
    idle = relay.raw()
    stopping = asyncio.run_coroutine_threadsafe(relay.relay.stop(), relay.loop)
    # The idle session is told at once; the forward is still held at the sink.
    assert idle.read() == "421 4.3.2 Service shutting down, try again later"
    assert not stopping.done() and replies == []
    held.release.set()
    sender.join(10)
    stopping.result(10)
    assert replies and replies[0][0] == 250 and replies[0][1].startswith(b"2.0.0 Ok <")
    assert len(sink.messages) == 1
    try:
        relay.raw()
        refused = False
    except (ConnectionError, OSError):
        refused = True
    assert refused


def test_serve_with_two_workers_forwards_and_stops_on_sigterm(tmp_path, cert_dir, sink, client_tls):
    database = tmp_path / "relay.db"
    store = Store(database)
    store.migrate()
    store.create_account("acme")
    store.add_domain("acme", "example.com")
    token = store.create_token("acme")["token"]
    store.add_nolimit(SENDER)
    store.close()
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "RELAY_LISTEN": f"127.0.0.1:{port}",
        "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
        "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
        "RELAY_DATABASE": str(database),
        "RELAY_HOSTNAME": "relay.test",
        "SMTP_CONFIG": sink.smtp_config(),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    log = Lines(proc.stderr)
    try:
        # Each worker logs this once it listens, just before it takes SIGTERM:
        # signalled earlier, a worker would die of the default action.
        assert log.wait_for(lambda lines: "".join(lines).count("relay listening on") == 2), "".join(
            log.lines
        )
        for i in range(6):
            with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=10) as client:
                client.login("api_token", token)
                client.sendmail(SENDER, [f"r{i}@dest.test"], message())
        assert len(sink.messages) == 6
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    stderr = log.text()
    proc.stderr.close()
    assert proc.returncode == 0, stderr
    assert stderr.count("stopping: draining sessions") == 2


def test_a_stopping_relay_takes_no_new_transaction(relay, sink):
    token = relay.token()
    held = HeldData(sink)
    raw = relay.raw()
    raw.login(token)
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    raw.cmd("DATA")
    raw.send(message() + b".")
    assert held.arrived.wait(10)
    stopping = asyncio.run_coroutine_threadsafe(relay.relay.stop(), relay.loop)
    assert wait_until(lambda: relay.relay.stopping)
    held.release.set()
    assert raw.read().startswith("250 2.0.0 Ok <")
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "421 4.3.2 Service shutting down, try again later"
    assert raw.closed()
    stopping.result(10)
    assert len(sink.messages) == 1
