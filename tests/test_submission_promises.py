"""What the end of DATA promises about the message it forwards, against the real relay.

A client's Message-ID is checked before it is echoed or charged; a resend over
a channel that honours no idempotency key goes out and is charged again; and a
client that drops the connection while the upstream works cancels neither the
upstream call nor the settle. Each test was seen to fail with the guard it
names removed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support import SENDER, message

from relay.store.deliveries import Outcome, Query

DELIVERED = "250 2.0.0 Ok <"
BAD_MESSAGE_ID = (
    "554 5.6.0 Message-ID header is not a valid msg-id of at most 250 octets"
    " (RFC 5322 section 3.6.4)"
)
TWO_MESSAGE_IDS = "554 5.6.0 Message must have at most one Message-ID header (RFC 5322 section 3.6)"


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll a condition, bounded; True once it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def transaction(raw: Any, content: bytes) -> str:
    """MAIL, RCPT, DATA and `content`; the reply to the end of DATA."""
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(content + b".")
    return str(raw.read())


# --- a Message-ID that is not a msg-id ---------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reply"),
    [
        pytest.param(
            'Message-ID: <x">...<img src=x onerror=alert(1)>@example.com>\r\n',
            BAD_MESSAGE_ID,
            id="markup and a quote",
        ),
        pytest.param("Message-ID: <a b@example.com>\r\n", BAD_MESSAGE_ID, id="space"),
        pytest.param("Message-ID: a.1@example.com\r\n", BAD_MESSAGE_ID, id="no brackets"),
        pytest.param(
            "Message-ID: <a.1@example.com>\r\nMessage-ID: <a.2@example.com>\r\n",
            TWO_MESSAGE_IDS,
            id="two fields",
        ),
    ],
)
def test_a_message_id_that_is_not_a_msg_id_is_554_and_nothing_is_sent(relay, sink, header, reply):
    raw = relay.raw()
    raw.login(relay.token())
    assert transaction(raw, message(extra=header)) == reply
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"  # the session goes on
    assert sink.messages == []
    assert relay.store.list_senders() == []  # nothing charged, not even a sender row
    assert relay.store.pending_count() == 0
    [record] = relay.store.find_deliveries(Query())
    assert (record.outcome, record.charged, str(record.reply)) == (Outcome.REFUSED, 0, reply)
    assert record.message_id == ""  # nothing of the refused id is kept
    # The same session sends a message with a clean id, echoed as the msg-id alone.
    good = message(extra="Message-ID: <a.1@example.com> (first try)\r\n")
    assert transaction(raw, good) == "250 2.0.0 Ok <a.1@example.com>"
    [received] = sink.messages
    assert b"\r\nMessage-ID: <a.1@example.com> (first try)\r\n" in received.content
    assert relay.store.show_sender(SENDER)["balance"] == 999


# --- a resend over a channel without idempotency keys ------------------------------------


def test_an_smtp_resend_of_the_same_message_goes_out_and_is_charged_again(relay, sink):
    """An SMTP upstream honours no idempotency key, so the relay must not act as if it did:
    the same Message-ID and bytes sent twice are two deliveries and two charges."""
    # Its own Date too: the relay adds one to a message without, at each send.
    extra = "Message-ID: <resend.1@example.com>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    content = message(extra=extra)
    raw = relay.raw()
    raw.login(relay.token())
    assert transaction(raw, content) == "250 2.0.0 Ok <resend.1@example.com>"
    assert transaction(raw, content) == "250 2.0.0 Ok <resend.1@example.com>"
    first, second = sink.messages
    assert first.content == second.content
    assert relay.store.show_sender(SENDER)["balance"] == 998
    records = relay.store.find_deliveries(Query(message_id="<resend.1@example.com>"))
    assert [(r.outcome, r.charged, r.replay) for r in records] == [
        (Outcome.DELIVERED, 1, False),
        (Outcome.DELIVERED, 1, False),
    ]


# --- a client gone mid-forward -------------------------------------------------------------


def test_a_client_dropping_mid_forward_cancels_neither_the_upstream_nor_the_settle(relay, sink):
    reached = threading.Event()  # the upstream has the whole message, no reply given yet
    release = asyncio.Event()  # set on the sink's loop
    original = sink.recorder.handle_DATA

    async def hold(server: Any, session: Any, envelope: Any) -> str:
        reached.set()
        await release.wait()
        return str(await original(server, session, envelope))

    sink.recorder.handle_DATA = hold
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message(extra="Message-ID: <gone.1@example.com>\r\n") + b".")
    assert reached.wait(10)

    # An abortive close (RST): the relay's session ends at once, mid-forward.
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()

    async def sessions() -> int:
        return len(relay.relay.sessions)

    assert wait_until(lambda: relay.call(sessions()) == 0)
    assert sink.messages == []  # still held: the forward is under way
    sink.server.get_loop().call_soon_threadsafe(release.set)

    recorded = wait_until(lambda: bool(relay.store.find_deliveries(Query())))
    assert recorded, "no delivery record: the forward or its settle was cancelled"
    [record] = relay.store.find_deliveries(Query())
    assert (record.message_id, record.outcome, record.charged) == (
        "<gone.1@example.com>",
        Outcome.DELIVERED,
        1,
    )
    assert str(record.reply) == "250 2.0.0 Ok <gone.1@example.com>"
    assert len(sink.messages) == 1
    assert relay.store.show_sender(SENDER)["balance"] == 999
    assert relay.store.pending_count() == 0
