"""Promises the README makes, each with a test that fails when the promise breaks.

Issue #8: a mutation run found one-line changes to `relay/` that no test caught.
Each test here was seen to fail with its mutation applied. Where the promise is
about the wire, the test talks to the real relay over real TLS, with a real
aiosmtpd upstream behind it.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support import DOMAIN, SENDER, Raw, message, plain

from relay import config
from relay.config import load_settings
from relay.errors import StoreError
from relay.store import Refused, Store

DELIVERED = "250 2.0.0 Ok <"


def begin_data(raw: Raw, rcpts: tuple[str, ...] = ("a@dest.test",)) -> None:
    """MAIL, RCPT and DATA, each accepted: the next bytes are the message."""
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    for rcpt in rcpts:
        assert raw.cmd(f"RCPT TO:<{rcpt}>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA") == "354 Start mail input; end with <CR><LF>.<CR><LF>"


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll a condition, bounded; True once it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- a bare LF never ends DATA (SMTP smuggling) ---------------------------------------

# The endings SMTP smuggling scanners try (SEC Consult's SMTP-Smuggling-Tools,
# smtpsmug): each one some server somewhere took for CRLF "." CRLF. Only the
# real CRLF "." CRLF ends DATA here (RFC 5321 section 4.1.1.4).
SMUGGLING_ENDINGS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r\n\x00.\r\n",
    b"\n.\r",
    b"\r\n.\r\r\n",
    b"\r\n\r.\r\n",
    b"\r\n.\x00\r\n",
]

SMUGGLED = (
    b"MAIL FROM:<evil@example.com>\r\n"
    b"RCPT TO:<victim@dest.test>\r\n"
    b"DATA\r\n"
    b"From: evil@example.com\r\nTo: victim@dest.test\r\nSubject: smuggled\r\n\r\n"
    b"smuggled body\r\n"
)


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=lambda e: repr(e)[2:-1])
def test_a_fake_end_of_data_never_lets_a_second_message_through(relay, sink, ending):
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    headers = message(body="").removesuffix(b"\r\n")  # ends with the blank line
    raw.sock.sendall(headers + b"start" + ending + SMUGGLED + b".\r\n")
    assert raw.read().startswith(DELIVERED)
    # Had the fake ending ended the data, the smuggled MAIL, RCPT and DATA
    # would have had replies of their own queued before this one.
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"
    [received] = sink.messages
    assert received.rcpt_tos == ["a@dest.test"]
    assert received.mail_from == SENDER
    assert b"RCPT TO:<victim@dest.test>" in received.content
    assert received.content.endswith(b"smuggled body\r\n")
    assert relay.store.show_sender(SENDER)["balance"] == 999


# --- a reused upstream connection is replaced only before anything was sent -----------


def test_upstream_dropping_a_reused_connection_after_the_data_is_never_resent(relay, sink):
    original = sink.recorder.handle_DATA
    drops = []

    async def take_then_drop(server: Any, session: Any, envelope: Any) -> str:
        reply = await original(server, session, envelope)
        if len(sink.messages) == 2 and not drops:
            # The content was taken; the connection dies before the reply.
            drops.append(server.transport)
            server.transport.abort()
        return reply

    sink.recorder.handle_DATA = take_then_drop
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    raw.send(message(subject="first") + b".")
    assert raw.read().startswith(DELIVERED)
    assert sink.recorder.connections == 1  # the second message reuses it
    begin_data(raw)
    raw.send(message(subject="second") + b".")
    assert raw.read() == "451 4.3.0 smtp: upstream closed the connection"
    assert drops
    subjects = [m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages]
    assert subjects == [b"first", b"second"]
    # The second message was refunded: the client will send it again.
    assert relay.store.show_sender(SENDER)["balance"] == 999
    assert relay.store.pending_count() == 0


# --- 5 MiB per message ------------------------------------------------------------------


def test_a_message_just_under_5_mib_arrives_byte_exact(relay, sink):
    assert config.MAX_MESSAGE_SIZE == 5 * 1024 * 1024
    headers = message(
        body="",
        extra="Message-ID: <big.1@example.com>\r\nDate: Sun, 22 Nov 2026 06:00:00 +0000\r\n",
    )
    line = b"y" * 998 + b"\r\n"
    content = headers + line * ((int(4.9 * 1024 * 1024) - len(headers)) // len(line))
    assert 4.85 * 1024 * 1024 < len(content) <= 4.9 * 1024 * 1024
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    raw.sock.sendall(content + b".\r\n")
    assert raw.read() == "250 2.0.0 Ok <big.1@example.com>"
    [received] = sink.messages
    assert received.content == content


# --- exactly one From: ------------------------------------------------------------------


def test_two_from_headers_are_554_and_nothing_is_sent(relay, sink):
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    raw.send(message(extra=f"From: other@{DOMAIN}\r\n") + b".")
    assert raw.read() == "554 5.6.0 Message must have exactly one From header (RFC 5322)"
    assert sink.messages == []
    assert relay.store.show_sender(SENDER)["balance"] == 1000
    assert relay.store.pending_count() == 0


# --- Sender: on another account's domain is refused -------------------------------------


def test_sender_header_on_another_accounts_domain_is_refused(relay, sink):
    relay.token("other", "other.test")
    raw = relay.raw()
    raw.login(relay.token())
    begin_data(raw)
    raw.send(message(extra="Sender: boss@other.test\r\n") + b".")
    assert raw.read() == (
        "550 5.7.1 Sender denied: header address boss@other.test"
        " is not on a domain of this token's account"
    )
    assert sink.messages == []
    assert relay.store.show_sender(SENDER)["balance"] == 1000
