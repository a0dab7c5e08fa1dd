"""The DATA state machine, without sockets: chunk boundaries, dot-unstuffing, the limit."""

from __future__ import annotations

import pytest

from relay.smtp.upload import Upload


def collect(stream: bytes, chunk: int, limit: int = 1000) -> tuple[Upload, bytes]:
    """Feed `stream` in chunks; returns the upload and what the reader still holds."""
    upload = Upload(limit)
    for i in range(0, len(stream), chunk):
        if upload.feed(stream[i : i + chunk]):
            return upload, upload.leftover + stream[i + chunk :]
    raise AssertionError("the end of data was not found")


CASES = [
    ("plain", b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n", b""),
    ("empty message", b".\r\n", b"", b""),
    ("one empty line", b"\r\n.\r\n", b"\r\n", b""),
    ("dot-stuffed lines", b"..x\r\ny\r\n..\r\n.\r\n", b".x\r\ny\r\n.\r\n", b""),
    ("pipelined command after", b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
    ("bare LF dot does not end", b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", b""),
    ("bare CR dot does not end", b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n", b""),
    ("dot line with text", b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", b""),
    # The first end marker ends the data; one in the pipelined commands is theirs.
    ("end marker in the leftover", b"a\r\n.\r\nRSET\r\n.\r\n", b"a\r\n", b"RSET\r\n.\r\n"),
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
@pytest.mark.parametrize(
    ("name", "stream", "message", "leftover"), CASES, ids=[c[0] for c in CASES]
)
def test_upload_at_every_chunk_boundary(name, stream, message, leftover, chunk):
    upload, rest = collect(stream, chunk)
    assert upload.too_big is False
    assert upload.message() == message
    assert rest == leftover


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 64, 4096])
def test_over_the_limit_is_dropped_but_the_end_is_still_found(chunk):
    # Every split of the end marker across chunks, while the data is dropped.
    body = b"x" * 998 + b"\r\n"
    upload, rest = collect(body * 3 + b".\r\nNOOP\r\n", chunk, limit=2000)
    assert upload.too_big is True
    assert rest == b"NOOP\r\n"


def test_too_big_is_known_before_the_end_arrives():
    """Set once the bytes so far prove the message is over the limit, not before.

    After n bytes without the end, at least n - 2 are message (only ".\r\n"
    and nothing more can follow the last line's CRLF), so n = limit + 2 could
    still be a message of exactly `limit` bytes; n = limit + 4 cannot.
    """
    limit = 10
    upload = Upload(limit)
    verdicts = []
    for n in range(1, limit + 8):
        assert not upload.feed(b"x")
        verdicts.append((n, upload.too_big))
    assert all(too_big is False for n, too_big in verdicts if n <= limit + 2)
    assert all(too_big is True for n, too_big in verdicts if n >= limit + 4)


def test_exactly_at_the_limit_is_accepted():
    body = b"y" * 8 + b"\r\n"
    upload, _ = collect(body + b".\r\n", 4, limit=len(body))
    assert not upload.too_big
    assert upload.message() == body
    over, _ = collect(body + b"z\r\n.\r\n", 4, limit=len(body))
    assert over.too_big


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_commands_pipelined_after_the_end_do_not_count_against_the_limit(chunk):
    body = b"y" * 8 + b"\r\n"
    upload, rest = collect(body + b".\r\nMAIL FROM:<a@x.test>\r\n", chunk, limit=len(body))
    assert upload.too_big is False
    assert upload.message() == body
    assert rest == b"MAIL FROM:<a@x.test>\r\n"


def test_not_done_without_the_end():
    upload = Upload(100)
    assert not upload.feed(b"a\r\n.")
    assert not upload.feed(b"\r")
    assert upload.feed(b"\n")
    assert upload.message() == b"a\r\n"


STREAMS = [
    b".leading dot\r\n..two\r\nplain\r\n.\r\n",
    b"a\r\n.\r\n",
    b".\r\n",
    b"x\r\n.\r\nNOOP\r\n",
    b"line\r\n..\r\n...\r\n\r\n.\r\n",
    b"bare\n.\nlf\r\n.\r\n",
    b"\r\n\r\n..\r\n.\r\n",
]


@pytest.mark.parametrize("stream", STREAMS)
def test_taking_as_it_arrives_gives_the_same_message_at_every_chunk_size(stream):
    whole = Upload(1000)
    assert whole.feed(stream)
    expected, leftover = whole.message(), whole.leftover
    for size in range(1, len(stream) + 1):
        upload, taken, fed = Upload(1000), bytearray(), 0
        while not upload.feed(stream[fed : fed + size]):
            fed += size
            taken += upload.take()
        fed += size
        taken += upload.take()
        assert bytes(taken) == expected, size
        assert upload.leftover + stream[fed:] == leftover, size


def test_taking_keeps_memory_to_about_a_chunk():
    upload = Upload(10 * 1024 * 1024)
    line = b"y" * 76 + b"\r\n"
    for _ in range(100):
        assert not upload.feed(line * 1000)
        assert len(upload.take()) > 70_000
        assert len(upload._buf) < 8  # only what may start the end marker is held


# Chunks fed one after another, and what `take()` gives after each. Held back:
# the last four bytes (END may start in them) and a CR or CRLF just before them
# (a "\r\n." cut there would escape the unstuffing); everything else is handed out.
HELD_BACK = [
    ([b"ab"], [b""]),
    ([b"abcde"], [b"a"]),
    ([b"abcdefgh"], [b"abcd"]),
    ([b"abcdefgh", b"i"], [b"abcd", b"e"]),
    ([b"abc\r\ndefg"], [b"abc"]),
    ([b"abc\rdefg"], [b"abc"]),
    ([b"abc\r\ndefg", b"h"], [b"abc", b"\r\nd"]),
    ([b"abcdefgh", b"\r\n..", b"x\r\n"], [b"abcd", b"efgh", b"\r\n"]),
]


@pytest.mark.parametrize(("chunks", "taken"), HELD_BACK)
def test_take_holds_back_only_what_may_start_the_end(chunks, taken):
    upload = Upload(1000)
    got = []
    for chunk in chunks:
        assert not upload.feed(chunk)
        got.append(upload.take())
    assert got == taken


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_a_dropped_upload_keeps_looking_for_the_end_and_gives_nothing(chunk):
    # What a client may send after the point its message could no longer be
    # kept: lines that look like commands, then the end, then its next command.
    stream = b"kept\r\nRSET\r\nMAIL FROM:<a@x.test>\r\nDATA\r\n.\r\nNOOP\r\n"
    upload = Upload(1000)
    assert not upload.feed(stream[:6])
    upload.take()
    upload.drop()
    fed, taken = 6, bytearray()
    while not upload.feed(stream[fed : fed + chunk]):
        fed += chunk
        taken += upload.take()
    fed += chunk
    assert taken + upload.take() == b""
    assert upload.leftover + stream[fed:] == b"NOOP\r\n"
    assert upload.dropped and not upload.too_big
