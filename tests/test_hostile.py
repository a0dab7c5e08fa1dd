"""Hostile clients against the real relay over TLS: each attack, and what the relay answers."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from support import attempt, b64, plain
from test_admission import wait_until

from relay.config import Limits
from relay.logs import Printable, RedactAiosmtpd
from relay.store.facade import Store


def b64_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- AUTH ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authzid", "reply"),
    [
        (b"", "235 2.7.0 Authentication successful"),
        (b"api_token", "235 2.7.0 Authentication successful"),
        (b"ceo@victim.test", "535 5.7.8 Authentication failed"),
        (b"api_token2", "535 5.7.8 Authentication failed"),
    ],
)
def test_auth_plain_authorization_identity(relay, authzid, reply):
    token = relay.token()
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    blob = b64_bytes(authzid + b"\0api_token\0" + token.encode())
    assert raw.cmd("AUTH PLAIN " + blob) == reply


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_an_over_long_auth_line_is_500_5_5_6_and_never_read_as_commands(relay, mechanism):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd(f"AUTH {mechanism}").startswith("334")
    # 5,000 bytes whose tail, if the relay dropped only part of the line, would
    # reach the command loop as "QUIT".
    raw.send(b"A" * 4995 + b" QUIT")
    assert raw.read() == "500 5.5.6 Authentication Exchange line is too long"
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"  # no stray reply in between: in step
    assert raw.login(relay.token()) == "235 2.7.0 Authentication successful"


# --- nothing secret in logs -------------------------------------------------------------


def test_no_token_reaches_the_log_whatever_the_client_sends(relay, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="mail.log")
    token = relay.token()
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    assert raw.cmd(token) == "500 5.5.2 Command not recognized"  # the token as a command
    assert raw.cmd("AUTH PLAIN " + plain("wrong")) == "535 5.7.8 Authentication failed"
    # AUTH data pipelined after the refusal: read as commands, logged nowhere.
    raw.send(f"{b64('api_token')}\r\n{b64(token)}".encode())
    assert raw.read().startswith("500 ")
    assert raw.read().startswith(("500 ", "421 "))
    raw.close()
    text = caplog.text
    secrets = [token, token.upper(), plain(token), plain("wrong"), b64(token), b64(token).upper()]
    assert [s for s in secrets if s in text] == []
    assert "unrecognised: [not logged]" in text  # aiosmtpd's record, redacted


def test_the_ehlo_greeting_echoes_no_control_characters(relay):
    raw = relay.raw()
    reply = raw.cmd(b"EHLO evil\x00\x1b[31mhost")
    assert reply.splitlines()[0] == "250-relay.test greets evil [31mhost"


def record(msg: str, *args: object, name: str = "relay.session") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)


def test_printable_escapes_control_characters_in_every_record():
    rec = record("from=%s", "a\r\nFAKE 250 Ok\x00\x1b[2J")
    assert Printable().filter(rec)
    assert rec.getMessage() == "from=a\\x0d\\x0aFAKE 250 Ok\\x00\\x1b[2J"


@pytest.mark.parametrize(
    ("msg", "args", "logged"),
    [
        (
            "%r >> %r",
            (("1.2.3.4", 5), b"AUTH PLAIN AGFwaV90b2tlbgBybHRf"),
            "('1.2.3.4', 5) >> 'AUTH'",
        ),
        ("%r >> %r", (("1.2.3.4", 5), b"cmx0X3NlY3JldA=="), "('1.2.3.4', 5) >> 'CMX'"),
        ("%r >> %r", (("1.2.3.4", 5), b"\x00\x01"), "('1.2.3.4', 5) >> '[not logged]'"),
        ("_handle_client readline: %r", (b"rlt_secret\r\n",), "_handle_client readline: 'RLT'"),
        (
            "%r unrecognised: %s",
            (("1.2.3.4", 5), "RLT_SECRET"),
            "('1.2.3.4', 5) unrecognised: [not logged]",
        ),
        ("%r connection lost", (("1.2.3.4", 5),), "('1.2.3.4', 5) connection lost"),
    ],
)
def test_aiosmtpd_records_keep_only_the_verb(msg, args, logged):
    rec = record(msg, *args, name="mail.log")
    assert RedactAiosmtpd().filter(rec)
    assert rec.getMessage() == logged


# --- messages that parsers could read differently, or that cost too much to parse --------

HEAD = b"From: app@example.com\r\nTo: a@dest.test\r\nSubject: hi\r\n"


def mime(parts: int) -> bytes:
    body = b"".join(b"--b1\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(parts))
    return b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n' + body + b"--b1--\r\n"


def dot_stuffed(content: bytes) -> bytes:
    return content.replace(b"\r\n.", b"\r\n..")


@pytest.mark.parametrize(
    ("content", "reply"),
    [
        pytest.param(
            b"\r\nFrom: app@example.com\r\n\r\nall body\r\n",
            "554 5.6.0 Message has no header section (RFC 5322 section 2.1)",
            id="empty-header-section",
        ),
        pytest.param(
            b"From\r\n : ceo@victim.test\r\n" + HEAD + b"\r\nbody\r\n",
            "554 5.6.0 Malformed header field: each line must be a name of printable ASCII,"
            " a colon and the value, or a folded continuation (RFC 5322 section 2.2)",
            id="folded-field-name",
        ),
        pytest.param(
            b"From\x00: ceo@victim.test\r\n" + HEAD + b"\r\nbody\r\n",
            "554 5.6.0 Message contains a NUL octet, which 8BITMIME content must not"
            " (RFC 6152 section 3)",
            id="nul-in-field-name",
        ),
        pytest.param(
            HEAD + b"\r\nline\r\n\x00.\r\nMAIL FROM:<evil@example.com>\r\n",
            "554 5.6.0 Message contains a NUL octet, which 8BITMIME content must not"
            " (RFC 6152 section 3)",
            id="nul-dot-smuggling",
        ),
        pytest.param(
            HEAD + b"\r\n" + b"x" * 999 + b"\r\n",
            "554 5.6.0 Line over 998 octets (RFC 5322 section 2.1.1); encode the body as"
            " quoted-printable or base64",
            id="long-line",
        ),
        pytest.param(
            HEAD + b"Cc: " + b",\r\n ".join([b"c@dest.test"] * 1001) + b"\r\n\r\nbody\r\n",
            "554 5.6.0 Over 1000 addresses in one header field",
            id="address-list",
        ),
        pytest.param(
            HEAD + mime(101),
            "554 5.6.0 Over 100 MIME parts in one message",
            id="mime-parts",
        ),
        pytest.param(
            HEAD + (b"X-Pad: " + b"p" * 900 + b"\r\n") * 73 + b"\r\nbody\r\n",
            "552 5.3.4 Header section over 64 KiB",
            id="big-header",
        ),
    ],
)
def test_a_message_parsers_could_misread_is_refused_and_nothing_is_sent(
    relay, sink, content, reply
):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd("MAIL FROM:<app@example.com>")
    raw.cmd("RCPT TO:<a@dest.test>")
    assert raw.cmd("DATA").startswith("354 ")
    raw.sock.sendall(dot_stuffed(content) + b".\r\n")
    assert raw.read() == reply
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"  # the session goes on
    assert sink.messages == []
    assert relay.store.list_senders() == []  # nothing charged


def test_the_largest_message_the_bounds_accept_is_delivered(relay, sink):
    own = b",\r\n ".join(b"user%d@example.com" % i for i in range(1000))
    content = (
        b"From: " + own + b"\r\nTo: a@dest.test\r\nSubject: big\r\n" + mime(100)[:-2] + b"\r\n"
    )
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd("MAIL FROM:<app@example.com>")
    raw.cmd("RCPT TO:<a@dest.test>")
    assert raw.cmd("DATA").startswith("354 ")
    raw.sock.sendall(dot_stuffed(content) + b".\r\n")
    assert raw.read().startswith("250 2.0.0 Ok <")
    [received] = sink.messages
    assert received.content.count(b"@example.com") == 1000


# --- a token revoked mid-transaction ---------------------------------------------------


def test_a_token_revoked_during_the_transaction_stops_it_at_the_end_of_data(relay, sink):
    token = relay.token()
    token_id = relay.store.list_tokens("acme")[-1]["id"]
    raw = relay.raw()
    assert raw.login(token) == "235 2.7.0 Authentication successful"
    assert raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    relay.store.revoke_token(token_id)  # while the message is being uploaded
    raw.sock.sendall(HEAD + b"\r\nbody\r\n.\r\n")
    assert raw.read() == "530 5.7.0 Authentication required: the token was revoked or expired"
    assert sink.messages == []
    assert relay.store.list_senders() == []  # nothing charged
    # The session must authenticate again.
    assert raw.cmd("MAIL FROM:<app@example.com>") == "530 5.7.0 Authentication required"


# --- failed AUTH across sessions and processes ---------------------------------------


def greeting_from(relay, source: str = "127.0.0.1") -> str:
    sock = socket.create_connection(
        ("127.0.0.1", relay.port), timeout=5, source_address=(source, 0)
    )
    tls = relay.client_tls.wrap_socket(sock, server_hostname="localhost")
    try:
        return tls.makefile("rb").readline().decode().rstrip("\r\n")
    finally:
        tls.close()


def fail_auth(relay, times: int) -> None:
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    for _ in range(times):
        assert raw.cmd("AUTH PLAIN " + plain("rlt_guess")) == "535 5.7.8 Authentication failed"
    raw.close()


THROTTLED = "421 4.7.0 Too many failed authentication attempts, try again later"


def test_failed_auth_is_counted_across_sessions_per_address(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_AUTH_FAILURE_LIMIT="4")
    token = relay.token()
    fail_auth(relay, 2)
    fail_auth(relay, 1)
    ok = relay.raw()
    assert ok.login(token) == "235 2.7.0 Authentication successful"  # a success resets nothing
    fail_auth(relay, 1)  # the fourth failure
    assert greeting_from(relay) == THROTTLED
    # Another address is not affected.
    assert greeting_from(relay, "127.0.0.2").startswith("220 ")
    # A session opened before the limit goes on.
    assert ok.cmd("NOOP") == "250 2.0.0 Ok"


def test_failed_auth_counts_across_relays_on_one_database(relay_factory, sink, tmp_path):
    database = str(tmp_path / "shared.db")
    first = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), RELAY_AUTH_FAILURE_LIMIT="3", RELAY_DATABASE=database
    )
    second = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), RELAY_AUTH_FAILURE_LIMIT="3", RELAY_DATABASE=database
    )
    fail_auth(first, 2)
    assert greeting_from(second).startswith("220 ")
    fail_auth(second, 1)
    assert greeting_from(first) == THROTTLED
    assert greeting_from(second) == THROTTLED


def guess_three_times(raw, start: threading.Barrier) -> list[str]:
    """Three wrong AUTH in one session, as fast as the relay answers; every reply."""
    start.wait()
    answers = []
    for _ in range(3):
        answers.append(raw.cmd("AUTH PLAIN " + plain("rlt_guess")))
        if answers[-1].startswith("421"):
            break
    else:
        answers.append(raw.read())  # the session's own limit: 535, then 421
    assert raw.closed()
    return answers


@pytest.mark.backends
def test_concurrent_sessions_get_at_most_the_limit_of_535s(relay_factory, sink, database_url):
    # Two relays on one database, as two workers or two hosts: each process
    # writes from one thread, so only another process's writes can interleave.
    relays = [
        relay_factory(
            SMTP_CONFIG=sink.smtp_config(),
            RELAY_AUTH_FAILURE_LIMIT="10",
            RELAY_DATABASE=database_url,
        )
        for _ in range(2)
    ]
    relay = relays[0]
    # All open before the first failure, half on each relay.
    sessions = [relays[n % 2].raw() for n in range(20)]
    for raw in sessions:
        raw.cmd("EHLO client.test")
    start = threading.Barrier(len(sessions))
    with ThreadPoolExecutor(len(sessions)) as pool:
        answers = list(pool.map(lambda raw: guess_three_times(raw, start), sessions))
    failed = [a for session in answers for a in session if a.startswith("535")]
    assert failed == ["535 5.7.8 Authentication failed"] * 10
    for session in answers:  # each: its 535s, then one 421 4.7.0, then the close
        *wrong, last = session
        assert set(wrong) <= {"535 5.7.8 Authentication failed"}
        assert last == (
            "421 4.7.0 Too many failed authentication attempts" if len(wrong) == 3 else THROTTLED
        )
    assert relay.store.auth_failures("127.0.0.1") == 10  # past the limit nothing is written
    assert greeting_from(relay) == THROTTLED


def test_an_auth_in_a_session_opened_before_the_limit_gets_421(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_AUTH_FAILURE_LIMIT="2")
    token = relay.token()
    early = relay.raw()
    early.cmd("EHLO client.test")
    fail_auth(relay, 2)  # another session reaches the limit
    # Even the right token: the answer must not tell a guesser whether it was right.
    assert early.cmd("AUTH PLAIN " + plain(token)) == THROTTLED
    assert early.closed()
    assert relay.store.auth_failures("127.0.0.1") == 2


def test_failures_leave_the_window_after_15_minutes(tmp_path):
    now = [datetime(2026, 11, 22, 12, 0, tzinfo=UTC)]
    store = Store(tmp_path / "t.db", clock=lambda: now[0])
    store.migrate()
    try:
        store.record_auth_failure("192.0.2.1")
        store.record_auth_failure("192.0.2.1")
        store.record_auth_failure("192.0.2.9")
        assert store.auth_failures("192.0.2.1") == 2
        now[0] += timedelta(minutes=14, seconds=59)
        assert store.auth_failures("192.0.2.1") == 2
        assert store.prune_auth_failures() == 0
        now[0] += timedelta(seconds=1)
        assert store.auth_failures("192.0.2.1") == 0
        assert store.prune_auth_failures() == 3
    finally:
        store.close()


# --- sessions that move nothing forward ------------------------------------------------

IDLE = "421 4.7.0 Too many commands without a message, closing"


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("NOOP", "250 2.0.0 Ok"),
        ("RSET", "250 2.0.0 Ok"),
        (
            "VRFY a@dest.test",
            "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        ("EHLO again.test", None),
        ("XYZZY", "500 5.5.2 Command not recognized"),
        ("RCPT TO:<a@dest.test>", "503 5.5.1 Bad sequence of commands: MAIL first"),
    ],
)
def test_a_hundred_commands_without_a_message_end_the_session(relay_factory, sink, command, reply):
    relay = relay_factory(Limits(max_idle_commands=3), SMTP_CONFIG=sink.smtp_config())
    raw = relay.raw()
    raw.login(relay.token())
    for _ in range(3):
        answer = raw.cmd(command)
        assert reply is None or answer == reply
    raw.send(command)
    if reply is not None:  # the fourth is answered, then the session ends
        assert raw.read() == reply
    assert raw.read() == IDLE
    assert raw.closed()


def test_a_delivered_message_starts_the_count_again(relay_factory, sink):
    relay = relay_factory(
        Limits(max_idle_commands=3), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="9"
    )
    raw = relay.raw()
    raw.login(relay.token())
    for _ in range(3):  # a pooling client: RSET before every message
        for _ in range(3):
            assert raw.cmd("RSET") == "250 2.0.0 Ok"
        assert raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
        assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
        assert raw.cmd("DATA").startswith("354 ")
        assert raw.cmd(HEAD + b"\r\nbody\r\n.").startswith("250 2.0.0 Ok <")
    assert len(sink.messages) == 3
    assert Limits().max_idle_commands == 100  # the documented default


IDLE_TOO_LONG = "421 4.4.2 Session idle too long, closing connection"


def noop_until_refused(raw) -> str:
    """NOOP every 50 ms, a client keeping its session barely alive; the first other reply."""
    while True:
        with contextlib.suppress(OSError):  # closed meanwhile: its last reply is still to read
            raw.send("NOOP")
        reply = raw.read()
        if reply != "250 2.0.0 Ok":
            return reply
        time.sleep(0.05)


def test_a_session_that_delivers_nothing_ends_at_the_idle_limit(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_SESSION_IDLE_MAX="1")
    raw = relay.raw()
    raw.login(relay.token())
    assert noop_until_refused(raw) == IDLE_TOO_LONG
    assert raw.closed()
    wait_until(lambda: relay.relay.admission.total == 0)  # the slot is free


@pytest.mark.parametrize(
    "exchange",
    [
        [],  # not even EHLO
        ["EHLO client.test", "AUTH LOGIN"],  # waiting for the user name (334)
        ["EHLO client.test", "AUTH LOGIN", b64("api_token")],  # ... for the token
        ["login", "MAIL FROM:<app@example.com>", "RCPT TO:<a@dest.test>"],  # before DATA
    ],
)
def test_the_idle_limit_holds_in_the_middle_of_an_exchange(relay_factory, sink, exchange):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), RELAY_SESSION_IDLE_MAX="1", DEFAULT_SEND_BALANCE="5"
    )
    raw = relay.raw()
    for line in exchange:
        reply = raw.login(relay.token()) if line == "login" else raw.cmd(line)
        assert reply[:1] in ("2", "3"), reply
    assert raw.read() == IDLE_TOO_LONG  # the client says nothing more
    assert raw.closed()


def test_a_session_that_delivers_keeps_its_slot(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), RELAY_SESSION_IDLE_MAX="1", DEFAULT_SEND_BALANCE="100"
    )
    raw = relay.raw()
    raw.login(relay.token())
    started, sent = time.monotonic(), 0
    while time.monotonic() - started < 3:  # three times the limit, a message every 200 ms
        assert attempt(raw).startswith("250 2.0.0 Ok <")
        sent += 1
        time.sleep(0.2)
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"
    assert len(sink.messages) == sent


@pytest.mark.parametrize("delivered", [True, False])
def test_an_upload_past_the_idle_limit_is_not_cut_and_its_outcome_decides(
    relay_factory, sink, delivered
):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), RELAY_SESSION_IDLE_MAX="1", DEFAULT_SEND_BALANCE="5"
    )
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    raw.sock.sendall(HEAD if delivered else HEAD + b"From: other@example.com\r\n")
    [session] = relay.relay.sessions
    wait_until(session.idle_limit_passed)  # mid-upload: nothing is sent to the client
    raw.send(b"\r\nbody\r\n.")
    if delivered:
        assert raw.read().startswith("250 2.0.0 Ok <")
        assert raw.cmd("NOOP") == "250 2.0.0 Ok"  # the delivery started the clock again
        assert len(sink.messages) == 1
    else:
        assert raw.read().startswith("554 5.6.0 ")
        assert raw.read() == IDLE_TOO_LONG
        assert raw.closed()


def test_after_quit_the_relay_closes_without_waiting_for_the_client(relay):
    raw = relay.raw()
    assert raw.cmd("QUIT") == "221 2.0.0 Service closing transmission channel"
    # The client never answers the TLS close_notify; asyncio would wait 30 s.
    wait_until(lambda: not relay.relay.sessions and relay.relay.admission.total == 0, 10)


def test_the_fifth_unknown_command_closes_with_421(relay):
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    for _ in range(4):
        assert raw.cmd("XYZZY") == "500 5.5.2 Command not recognized"
    assert raw.cmd("XYZZY") == "421 4.7.0 Too many unrecognized commands, closing"
    assert raw.closed()


# --- an upload that never ends is spooled to disk, and freed on every exit ------------


def spool_files(relay) -> dict[str, int]:
    """This process's open, nameless files in the relay's spool directory, and their sizes."""
    found = {}
    directory = str(relay.relay.spool.directory) + os.sep
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(directory) and target.endswith("(deleted)"):
                found[fd] = os.fstat(int(fd)).st_size
        except OSError:
            continue
    return found


def start_endless_upload(relay, size: int):
    raw = relay.raw()
    raw.login(relay.token())
    raw.cmd("MAIL FROM:<app@example.com>")
    raw.cmd("RCPT TO:<a@dest.test>")
    assert raw.cmd("DATA").startswith("354 ")
    raw.sock.sendall(HEAD + b"\r\n" + (b"z" * 76 + b"\r\n") * (size // 78))
    return raw


@pytest.mark.parametrize("ending", ["disconnect", "timeout"])
def test_a_large_upload_goes_to_a_private_file_freed_however_it_ends(relay_factory, sink, ending):
    relay = relay_factory(
        Limits(data_timeout=3.0), SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="5"
    )
    assert relay.relay.spool.directory.stat().st_mode & 0o777 == 0o700
    raw = start_endless_upload(relay, 1024 * 1024)
    wait_until(lambda: any(n >= 900_000 for n in spool_files(relay).values()))
    [fd] = spool_files(relay)
    assert stat.S_IMODE(os.fstat(int(fd)).st_mode) == 0o600
    assert list(relay.relay.spool.directory.iterdir()) == []  # the file has no name
    if ending == "disconnect":
        raw.close()
    else:
        assert raw.read() == "421 4.4.2 Timeout, closing connection"
    wait_until(lambda: not spool_files(relay) and relay.relay.spool.used == 0)
    assert sink.messages == []
    assert relay.store.list_senders() == []


def test_a_small_upload_stays_in_memory_and_a_large_one_arrives_whole(relay, sink):
    raw = start_endless_upload(relay, 50 * 1024)
    wait_until(lambda: relay.relay.spool.used >= 49 * 1024)  # all of it held, in memory
    assert not spool_files(relay)
    raw.sock.sendall(b".\r\n")
    assert raw.read().startswith("250 2.0.0 Ok <")
    raw = start_endless_upload(relay, 2 * 1024 * 1024)
    raw.sock.sendall(b".\r\n")
    assert raw.read().startswith("250 2.0.0 Ok <")
    second = sink.messages[1].content
    assert second.endswith(b"z" * 76 + b"\r\n") and len(second) > 2 * 1024 * 1024 - 200
