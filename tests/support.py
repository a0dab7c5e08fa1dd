"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest

DOMAIN = "example.com"
# The reason of a test skipped for a missing outside tool; conftest.py lists
# them at the end of the run, so a CI that lacks one does not pass quietly.
MISSING_TOOL = "missing tool: "


def missing_tool(what: str) -> None:
    pytest.skip(MISSING_TOOL + what)


SENDER = f"app@{DOMAIN}"


def message(
    sender: str = SENDER,
    to: str = "rcpt@dest.test",
    subject: str = "Hi",
    body: str = "Hello.",
    extra: str = "",
) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\n{body}\r\n").encode()


class Raw:
    """A line-level SMTPS client, for asserting exact replies (smtplib hides some)."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 10) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()

    def read(self) -> str:
        """One whole reply; multi-line replies are joined with newlines."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed: " + "\n".join(lines))
            text = line.decode().rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        self.sock.sendall(data + b"\r\n")

    def cmd(self, line: str | bytes) -> str:
        self.send(line)
        return self.read()

    def login(self, token: str) -> str:
        self.cmd("EHLO client.test")
        return self.cmd("AUTH PLAIN " + plain(token))

    def closed(self) -> bool:
        """True once the server has closed the connection."""
        try:
            return self.file.readline() == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def plain(token: str, user: str = "api_token") -> str:
    return base64.b64encode(f"\0{user}\0{token}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound by the OS, then released.

    Free to bind for a server a test starts, closed to a client a test points at it.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- balances and send limits -------------------------------------------------------


class FrozenClock:
    """A clock for `Store(path, clock=...)` that moves only when a test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def attempt(raw: Raw, sender: str = SENDER, rcpts: tuple[str, ...] = ("a@dest.test",)) -> str:
    """One whole transaction; the reply that ended it.

    That is the first refusal (of MAIL, of any RCPT, of DATA; the transaction is
    then reset so the session can go on) or the reply to the end of DATA.
    """
    reply = raw.cmd(f"MAIL FROM:<{sender}>")
    if not reply.startswith("250"):
        return reply
    for rcpt in rcpts:
        reply = raw.cmd(f"RCPT TO:<{rcpt}>")
        if not reply.startswith("250"):
            raw.cmd("RSET")
            return reply
    reply = raw.cmd("DATA")
    if not reply.startswith("354"):
        return reply
    raw.send(message(sender=sender, to=", ".join(rcpts)) + b".")
    return raw.read()


# --- subprocesses ---------------------------------------------------------------------


class Lines:
    """A subprocess's text output, read on a thread so that no wait is unbounded.

    `readline()` on a pipe blocks until the child writes or exits; a deadline
    loop around it can hang forever. The reader thread collects every line;
    `wait_for` waits on a condition with a timeout instead.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, done: Callable[[list[str]], bool], timeout: float = 30) -> bool:
        """True once `done(lines)` holds; False at the timeout or when the output ends first."""
        with self._changed:
            return self._changed.wait_for(lambda: done(self.lines) or self._ended, timeout) and (
                done(self.lines)
            )

    def text(self, timeout: float = 30) -> str:
        """All the output, once the stream has ended (the process exited)."""
        self._thread.join(timeout)
        with self._changed:
            return "".join(self.lines)


# --- a relay as its own process, for the tests that stop it hard ----------------------

ROOT = Path(__file__).resolve().parent.parent


def onboarded(database: Path, balance: int = 5) -> tuple[Any, str]:
    """A new database at `database`: account acme with example.com, SENDER holding
    `balance`; the store and a token of acme."""
    from relay.store.facade import Store

    store = Store(database)
    store.migrate()
    store.create_account("acme")
    store.add_domain("acme", DOMAIN)
    token = store.create_token("acme")["token"]
    store.set_sender(SENDER, balance=balance)
    return store, token


def serve_env(database: Path, cert_dir: Path, port: int, **settings: str) -> dict[str, str]:
    """The environment of a `relay serve` process on `port` over `database`."""
    return {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "RELAY_LISTEN": f"127.0.0.1:{port}",
        "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
        "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
        "RELAY_DATABASE": str(database),
        "RELAY_HOSTNAME": "relay.test",
        **settings,
    }


def serve(env: dict[str, str]) -> tuple[subprocess.Popen[str], Lines]:
    """`relay serve` with `env`, once it listens; its log lines as they come."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    log = Lines(proc.stderr)
    assert log.wait_for(lambda lines: any("relay listening on" in x for x in lines)), "".join(
        log.lines
    )
    return proc, log
