"""The STARTTLS submission port (RELAY_STARTTLS_LISTEN), with real clients.

smtplib, curl and swaks deliver through it; before TLS only NOOP, EHLO,
STARTTLS and QUIT are served; bytes pipelined after STARTTLS are never read as
commands (the CVE-2011-0411 probes); a client that never upgrades is closed
after the AUTH timeout; the caps and the failed-AUTH screen count both ports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import SENDER, free_port, message, missing_tool, plain

from relay import cli, metrics
from relay.config import Limits, load_settings
from relay.errors import ConfigError
from relay.server import Relay
from relay.store.deliveries import Query

STARTTLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
EHLO_BEFORE_TLS = "\n".join(
    [
        "250-relay.test greets client.test",
        "250-STARTTLS",
        "250-SIZE 5242880",
        "250-8BITMIME",
        "250 ENHANCEDSTATUSCODES",
    ]
)
EHLO_AFTER_TLS = "\n".join(
    [
        "250-relay.test greets client.test",
        "250-AUTH PLAIN LOGIN",
        "250-SIZE 5242880",
        "250-8BITMIME",
        "250 ENHANCEDSTATUSCODES",
    ]
)


class Plain:
    """A line-level client of the STARTTLS port: plaintext, then `upgrade()`."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()

    def read(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed: " + "\n".join(lines))
            text = line.decode().rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.read()

    def upgrade(self, context: ssl.SSLContext) -> None:
        """The client side of the handshake, after the server's 220."""
        self.file.close()
        # The TLS socket is ours before its handshake, so a failed handshake still
        # leaves it for close() (the fixture's), not to the garbage collector.
        self.sock = context.wrap_socket(
            self.sock, server_hostname="localhost", do_handshake_on_connect=False
        )
        self.sock.do_handshake()
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        try:
            return self.file.readline() == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def starttls(relay_factory, sink):
    """The relay with its STARTTLS port open, forwarding to the plain sink."""
    return relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        DEFAULT_SEND_BALANCE="1000",
        RELAY_STARTTLS_LISTEN="127.0.0.1:0",
    )


@pytest.fixture
def plain_client(starttls):
    opened: list[Plain] = []

    def connect() -> Plain:
        client = Plain(starttls.relay.starttls_port)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def upgraded(connect: Callable[[], Plain], client_tls: ssl.SSLContext) -> Plain:
    client = connect()
    assert client.cmd("EHLO client.test") == EHLO_BEFORE_TLS
    assert client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    client.upgrade(client_tls)
    return client


# --- real clients --------------------------------------------------------------------


def exact_message(subject: str) -> bytes:
    """A message the relay forwards unchanged (it has its own Message-ID and Date)."""
    return message(
        subject=subject,
        body="caf\xe9 line one\r\n..leading dot\r\nlast",
        extra=(
            f"Message-ID: <{subject}@example.com>\r\n"
            "Date: Sun, 22 Nov 2026 06:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        ),
    )


def test_smtplib_starttls_delivers_byte_for_byte(starttls, sink, client_tls):
    content = exact_message("smtplib")
    with smtplib.SMTP("127.0.0.1", starttls.relay.starttls_port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, _ = client.starttls(context=client_tls)
        assert code == 220
        client.ehlo("client.test")
        assert client.has_extn("auth") and not client.has_extn("starttls")
        client.login("api_token", starttls.token())
        assert client.sendmail(SENDER, ["a@dest.test"], content) == {}
    [received] = sink.messages
    assert received.content == content
    assert received.rcpt_tos == ["a@dest.test"]


def test_curl_smtp_with_ssl_reqd_delivers_byte_for_byte(starttls, sink, cert_dir, tmp_path):
    if shutil.which("curl") is None:
        missing_tool("curl")
    content = exact_message("curl")
    mail = tmp_path / "mail.eml"
    mail.write_bytes(content)
    result = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--ssl-reqd", "-v",
            "--cacert", str(cert_dir / "relay.crt"),
            "--url", f"smtp://localhost:{starttls.relay.starttls_port}",
            "--user", f"api_token:{starttls.token()}",
            "--mail-from", SENDER, "--mail-rcpt", "rcpt@dest.test",
            "--upload-file", str(mail),
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "< 220 2.0.0 Ready to start TLS" in result.stderr
    assert "< 250 2.0.0 Ok <curl@example.com>" in result.stderr
    [received] = sink.messages
    assert received.content == content


def test_swaks_tls_delivers_byte_for_byte(starttls, sink, tmp_path):
    if shutil.which("swaks") is None:
        missing_tool("swaks")
    content = exact_message("swaks")
    mail = tmp_path / "mail.eml"
    mail.write_bytes(content.removesuffix(b"\r\n"))  # swaks adds the last CRLF itself
    result = subprocess.run(
        [
            "swaks", "--server", "127.0.0.1", "--port", str(starttls.relay.starttls_port),
            "--tls", "--auth", "PLAIN", "--auth-user", "api_token",
            "--auth-password", starttls.token(),
            "--from", SENDER, "--to", "rcpt@dest.test", "--data", f"@{mail}",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  220 2.0.0 Ready to start TLS" in result.stdout
    assert "<~  250 2.0.0 Ok <swaks@example.com>" in result.stdout
    [received] = sink.messages
    assert received.content == content


# --- before TLS ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "AUTH PLAIN " + plain("rlt_anything"),
        "AUTH LOGIN",
        f"MAIL FROM:<{SENDER}>",
        "RCPT TO:<a@dest.test>",
        "DATA",
        "RSET",
        "HELO client.test",
        "VRFY a@dest.test",
        "BDAT 10 LAST",
    ],
)
def test_every_command_but_noop_ehlo_starttls_quit_needs_tls_first(plain_client, command):
    client = plain_client()
    assert client.greeting.startswith("220 relay.test ")
    assert client.cmd("EHLO client.test") == EHLO_BEFORE_TLS
    assert client.cmd(command) == STARTTLS_REQUIRED
    assert client.cmd("NOOP") == "250 2.0.0 Ok"
    assert client.cmd("QUIT") == "221 2.0.0 Service closing transmission channel"


def test_a_token_sent_before_tls_is_not_looked_at(starttls, plain_client):
    """AUTH before STARTTLS gets 530 without a check: a wrong token is no failure."""
    client = plain_client()
    client.cmd("EHLO client.test")
    for _ in range(3):
        assert client.cmd("AUTH PLAIN " + plain("rlt_wrong")) == STARTTLS_REQUIRED
    assert starttls.store.auth_failures("127.0.0.1") == 0


def test_starttls_needs_ehlo_and_no_argument(plain_client):
    client = plain_client()
    assert client.cmd("STARTTLS") == "503 5.5.1 Bad sequence of commands: send EHLO or HELO first"
    client.cmd("EHLO client.test")
    assert client.cmd("STARTTLS now") == "501 5.5.4 Syntax: STARTTLS"


# --- after TLS -----------------------------------------------------------------------


def test_after_tls_the_session_starts_again_and_a_second_starttls_is_refused(
    starttls, plain_client, client_tls
):
    client = upgraded(plain_client, client_tls)
    # RFC 3207 section 4.2: the plaintext EHLO is forgotten.
    assert client.cmd(f"MAIL FROM:<{SENDER}>") == (
        "503 5.5.1 Bad sequence of commands: send EHLO or HELO first"
    )
    assert client.cmd("EHLO client.test") == EHLO_AFTER_TLS
    assert client.cmd("STARTTLS") == "554 5.5.1 TLS already active"
    assert client.cmd(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"
    assert client.cmd("AUTH PLAIN " + plain(starttls.token())) == (
        "235 2.7.0 Authentication successful"
    )
    assert client.cmd("STARTTLS") == "554 5.5.1 TLS already active"
    assert client.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"


# The probes of CVE-2011-0411 (Wietse Venema's `STARTTLS\r\nRSET\r\n`) and of the
# 2021 family (Poddebniak et al., "Why TLS is better without STARTTLS", USENIX
# Security 2021): commands in the STARTTLS packet that a vulnerable server runs
# inside the TLS session.
INJECTIONS = [
    b"RSET\r\n",
    b"RSET\r\nMAIL FROM:<x@example.com>\r\n",
    b"EHLO evil.test\r\n",
    b"NOOP\r\nNOOP\r\nNOOP\r\n",
    b"AUTH PLAIN " + plain("rlt_injected").encode() + b"\r\n",
    b"QUIT\r\n",
    b"STARTTLS\r\n",
]


@pytest.mark.parametrize("injected", INJECTIONS)
def test_commands_pipelined_after_starttls_are_never_run(
    starttls, plain_client, client_tls, injected
):
    client = plain_client()
    client.cmd("EHLO client.test")
    client.send(b"STARTTLS\r\n" + injected)  # one packet
    assert client.read() == "220 2.0.0 Ready to start TLS"
    client.upgrade(client_tls)
    # The first reply inside TLS is to our own EHLO: nothing injected was answered.
    assert client.cmd("EHLO client.test") == EHLO_AFTER_TLS
    # And nothing injected ran: the transaction is fresh, AUTH was never tried.
    assert client.cmd(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"
    assert client.cmd("AUTH PLAIN " + plain(starttls.token())).startswith("235 ")
    assert client.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert starttls.store.auth_failures("127.0.0.1") == 0


def test_plaintext_sent_after_the_220_fails_the_handshake(starttls, plain_client):
    client = plain_client()
    client.cmd("EHLO client.test")
    assert client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    client.send(b"RSET\r\nMAIL FROM:<x@example.com>\r\n")
    assert client.closed()
    wait_until(lambda: starttls.relay.admission.total == 0 and not starttls.relay.sessions)


# --- time limits ---------------------------------------------------------------------


@pytest.fixture
def short(relay_factory, sink):
    """A STARTTLS port whose AUTH timeout (and so its plaintext limit) is half a second."""
    return relay_factory(
        Limits(auth_timeout=0.5),
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_STARTTLS_LISTEN="127.0.0.1:0",
    )


def test_a_client_that_never_upgrades_is_closed_after_the_auth_timeout(short):
    before = starttls_count("timeout")
    client = Plain(short.relay.starttls_port)
    try:
        # Commands (each restarts the command timer) do not extend the plaintext phase.
        assert client.cmd("EHLO client.test").startswith("250-")
        assert client.cmd("NOOP") == "250 2.0.0 Ok"
        assert client.read() == "421 4.7.0 Must issue a STARTTLS command first, closing"
        assert client.closed()
    finally:
        client.close()
    wait_until(lambda: short.relay.admission.total == 0 and not short.relay.sessions)
    assert starttls_count("timeout") == before + 1


def test_a_handshake_that_never_comes_is_dropped_within_the_auth_timeout(short):
    before = starttls_count("failed")
    client = Plain(short.relay.starttls_port)
    try:
        client.cmd("EHLO client.test")
        assert client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        assert client.closed()  # no 421: the connection belongs to TLS now
    finally:
        client.close()
    wait_until(lambda: short.relay.admission.total == 0 and not short.relay.sessions)
    assert starttls_count("failed") == before + 1


def test_an_upgraded_session_keeps_the_ordinary_limits(short, client_tls):
    client = Plain(short.relay.starttls_port)
    try:
        client.cmd("EHLO client.test")
        client.cmd("STARTTLS")
        client.upgrade(client_tls)
        time.sleep(0.8)  # past the plaintext limit: it no longer applies
        assert client.cmd("EHLO client.test") == EHLO_AFTER_TLS
    finally:
        client.close()


# --- what both ports share -------------------------------------------------------------


def test_the_per_address_cap_counts_both_ports(relay_factory, sink, client_tls):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_STARTTLS_LISTEN="127.0.0.1:0",
        RELAY_MAX_CONNECTIONS_PER_IP="2",
    )
    first = relay.raw()
    second = Plain(relay.relay.starttls_port)
    try:
        assert second.greeting.startswith("220 ")
        third = Plain(relay.relay.starttls_port)
        assert third.greeting == "421 4.7.0 Too many connections from your address"
        assert third.closed()
        third.close()
        first.close()
        wait_until(lambda: relay.relay.admission.total == 1)
        fourth = Plain(relay.relay.starttls_port)
        assert fourth.greeting.startswith("220 ")
        fourth.close()
    finally:
        second.close()


def test_failed_auth_on_one_port_throttles_the_other(relay_factory, sink, client_tls):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_STARTTLS_LISTEN="127.0.0.1:0",
        RELAY_AUTH_FAILURE_LIMIT="1",
    )
    raw = relay.raw()
    assert raw.login("rlt_wrong") == "535 5.7.8 Authentication failed"
    raw.close()
    client = Plain(relay.relay.starttls_port)
    try:
        assert client.greeting == (
            "421 4.7.0 Too many failed authentication attempts, try again later"
        )
    finally:
        client.close()


def test_idle_commands_in_plaintext_count_towards_the_limit(relay_factory, sink, client_tls):
    relay = relay_factory(
        Limits(max_idle_commands=3),
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_STARTTLS_LISTEN="127.0.0.1:0",
    )
    client = Plain(relay.relay.starttls_port)
    try:
        client.cmd("EHLO client.test")
        assert client.cmd("MAIL FROM:<a@example.com>") == STARTTLS_REQUIRED
        assert client.cmd("NOOP") == "250 2.0.0 Ok"
        client.cmd("STARTTLS")
        client.upgrade(client_tls)
        client.cmd("EHLO client.test")  # a first EHLO again: RFC 3207 reset the session
        assert client.cmd("NOOP") == "250 2.0.0 Ok"  # the third since the start
        assert client.cmd("NOOP") == "250 2.0.0 Ok"
        assert client.read() == "421 4.7.0 Too many commands without a message, closing"
    finally:
        client.close()


# --- metrics and the delivery log --------------------------------------------------------


def figure(name: str, **labels: str) -> float:
    text = metrics.exposition()[0].decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)\{([^}]*)\} (\S+)", line)
        if match and match[1] == name and ",".join(sorted(match[2].split(","))) == want:
            return float(match[3])
    return 0.0


def starttls_count(result: str) -> float:
    return figure("relay_starttls_total", result=result)


@pytest.mark.backends
def test_metrics_and_the_delivery_log_name_the_port(
    starttls, client_tls, monkeypatch, capsys, database_url
):
    def delivered(listener: str) -> float:
        return figure("relay_listener_messages_total", listener=listener, outcome="delivered")

    before = {name: delivered(name) for name in ("smtps", "submission")}
    upgrades = starttls_count("upgraded")
    token = starttls.token()
    with smtplib.SMTP("127.0.0.1", starttls.relay.starttls_port, timeout=10) as client:
        client.starttls(context=client_tls)
        client.login("api_token", token)
        client.sendmail(
            SENDER,
            ["a@dest.test"],
            message(subject="587", extra="Message-ID: <587@example.com>\r\n"),
        )
    implicit = starttls.login(token)
    implicit.sendmail(SENDER, ["b@dest.test"], message(subject="465"))
    assert delivered("submission") == before["submission"] + 1
    assert delivered("smtps") == before["smtps"] + 1
    assert starttls_count("upgraded") == upgrades + 1
    records = starttls.store.find_deliveries(Query())
    by_recipient = {r.recipients[0].address: r.listener for r in records}
    assert by_recipient == {"a@dest.test": "submission", "b@dest.test": "smtps"}
    assert {r.as_json()["listener"] for r in records} == {"submission", "smtps"}
    monkeypatch.setenv("RELAY_DATABASE", database_url)
    assert cli.main(["log", "show", "<587@example.com>"]) == 0
    assert "\nport        submission\n" in capsys.readouterr().out


# --- the setting ---------------------------------------------------------------------


def listening_inodes() -> set[str]:
    """This process's sockets in the LISTEN state (the relay runs on a thread of it)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:[") : -1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in mine:
                listening.add(fields[9])
    return listening


def test_unset_nothing_listens_but_the_implicit_tls_port(relay_factory, sink):
    if not Path("/proc/self/fd").exists():
        pytest.skip("reads this process's sockets from /proc")
    before = listening_inodes()
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config())
    assert relay.relay.starttls_port is None
    assert len(listening_inodes() - before) == 1  # RELAY_LISTEN's socket only
    with_starttls = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), RELAY_STARTTLS_LISTEN="127.0.0.1:0"
    )
    assert with_starttls.relay.starttls_port is not None
    assert len(listening_inodes() - before) == 3


def test_the_setting_is_checked_at_load():
    assert load_settings({}).starttls_listen is None
    assert load_settings({"RELAY_STARTTLS_LISTEN": "0.0.0.0:587"}).starttls_listen == (
        "0.0.0.0",
        587,
    )
    with pytest.raises(ConfigError, match=r"^RELAY_STARTTLS_LISTEN: expected host:port"):
        load_settings({"RELAY_STARTTLS_LISTEN": "587"})
    with pytest.raises(ConfigError, match=r"^RELAY_STARTTLS_LISTEN: .* RELAY_LISTEN's address"):
        load_settings({"RELAY_LISTEN": "127.0.0.1:2465", "RELAY_STARTTLS_LISTEN": "127.0.0.1:2465"})


def test_a_busy_starttls_port_stops_the_start_with_one_line(cert_dir, tmp_path):
    implicit = free_port()
    settings = load_settings(
        {
            "RELAY_HOSTNAME": "relay.test",
            "RELAY_LISTEN": f"127.0.0.1:{implicit}",
            "RELAY_TLS_CERT": str(cert_dir / "relay.crt"),
            "RELAY_TLS_KEY": str(cert_dir / "relay.key"),
            "RELAY_DATABASE": str(tmp_path / "relay.db"),
            "RELAY_STARTTLS_LISTEN": "127.0.0.1:1",  # replaced below
        }
    )
    relay = None

    async def start() -> None:
        try:
            await relay.start()
        finally:
            await relay.store.aclose()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = Relay(dataclasses.replace(settings, starttls_listen=("127.0.0.1", port)))
        with pytest.raises(ConfigError) as raised:
            asyncio.run(start())
    assert (
        str(raised.value)
        == f"RELAY_STARTTLS_LISTEN: cannot listen on 127.0.0.1:{port}: already in use"
    )
    with socket.socket() as again:  # the implicit-TLS socket was closed, not leaked
        again.bind(("127.0.0.1", implicit))


# The relay resets this connection while the client's wrap_socket builds its
# SSLSocket: the stdlib then drops the half-built socket to the garbage collector
# (its ResourceWarning), which says nothing about the relay.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_flood_pipelined_after_starttls_is_dropped_and_the_slot_released(
    starttls, plain_client, client_tls
):
    """Past the reader's buffer limit (the transport pauses): still nothing is read."""
    client = plain_client()
    client.cmd("EHLO client.test")
    flood = b"RSET\r\n" * 60_000  # 360 KB, more than the stream buffers
    client.sock.settimeout(10)
    client.send(b"STARTTLS\r\n" + flood)
    assert client.read() == "220 2.0.0 Ready to start TLS"
    # What the server had not read yet is TLS input now: the handshake fails.
    with pytest.raises((ssl.SSLError, OSError)):
        client.upgrade(client_tls)
    wait_until(lambda: starttls.relay.admission.total == 0 and not starttls.relay.sessions)
    # And a well-behaved client is served as ever.
    fresh = upgraded(plain_client, client_tls)
    assert fresh.cmd("EHLO client.test") == EHLO_AFTER_TLS


def test_a_client_gone_after_the_220_releases_its_slot(starttls, plain_client):
    client = plain_client()
    client.cmd("EHLO client.test")
    assert client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    client.close()
    wait_until(lambda: starttls.relay.admission.total == 0 and not starttls.relay.sessions)


def test_stopping_the_relay_closes_plaintext_sessions_with_421(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_STARTTLS_LISTEN="127.0.0.1:0")
    client = Plain(relay.relay.starttls_port)
    try:
        client.cmd("EHLO client.test")
        relay.call(relay.relay.stop())
        assert client.read() == "421 4.3.2 Service shutting down, try again later"
        assert client.closed()
    finally:
        client.close()
