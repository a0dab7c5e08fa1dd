"""A short, bounded fuzzer: mutated commands at the real relay, then a normal send must work.

Seeded, so a failure replays. Bounded by a count of lines, not by time. Every
reply must be a well-formed SMTP reply line (or the session closed), no
unexpected error may reach the log, and afterwards a normal client delivers.
"""

from __future__ import annotations

import logging
import random
import re
import ssl

import pytest
from support import SENDER, message, plain

pytestmark = pytest.mark.slow

CORPUS = [
    b"EHLO client.test",
    b"HELO client.test",
    b"AUTH PLAIN AGFwaV90b2tlbgBybHRfZ3Vlc3M=",
    b"AUTH LOGIN",
    b"MAIL FROM:<app@example.com> SIZE=100 BODY=8BITMIME",
    b"RCPT TO:<a@dest.test>",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY a@dest.test",
    b"HELP",
    b"QUIT",
    b"STARTTLS",
]
SPECIALS = [b"\x00", b"\r", b"\n", b"\x1b", b"<", b">", b":", b"@", b'"', b"\xff", b" ", b"="]
REPLY = re.compile(rb"[2-5]\d\d[ -]")
LINES = 3000


def mutate(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(data) + 1)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:
            data[at:at] = rng.choice(SPECIALS)
        elif kind == 2:
            data[at:at] = rng.choice(SPECIALS) * rng.randint(1, 3000)
        elif kind == 3:
            del data[at:]
        elif kind == 4:
            data[at:at] = rng.choice(CORPUS)
        else:
            data = data.swapcase() if hasattr(data, "swapcase") else data
    return bytes(data).replace(b"\r\n", b"")


def test_mutated_commands_then_a_normal_send(relay, sink, caplog):
    caplog.set_level(logging.WARNING)
    rng = random.Random(20261122)
    token = relay.token()
    sent = 0
    seen: dict[bytes, int] = {}
    raw = None
    while sent < LINES:
        if raw is None:
            raw = relay.raw()
            raw.sock.settimeout(10)
            if rng.random() < 0.5:
                raw.login(token)
        line = mutate(rng, rng.choice(CORPUS))
        try:
            raw.send(line)
            reply = raw.file.readline()
        except (ConnectionError, ssl.SSLError, TimeoutError, OSError):
            reply = b""
        sent += 1
        if not reply:
            raw.close()
            raw = None
            continue
        assert REPLY.match(reply) or reply.startswith(b"334 "), (line, reply)
        seen[reply[:3]] = seen.get(reply[:3], 0) + 1
        if reply.startswith((b"354", b"221", b"421")):
            raw.close()  # leave DATA and closing sessions behind
            raw = None
    if raw is not None:
        raw.close()
    # The run went through more than the greeting: refusals and acceptances both.
    assert sum(seen.values()) > LINES // 2 and {b"250", b"500"} <= set(seen), seen
    with relay.login(token) as client:
        client.sendmail(SENDER, ["a@dest.test"], message())
    assert sink.messages[-1].rcpt_tos == ["a@dest.test"]
    unexpected = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("relay")
    ]
    assert unexpected == []
    assert plain(token) not in caplog.text
