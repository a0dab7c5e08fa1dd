"""The DATA state machine, without sockets: chunk boundaries, dot-unstuffing, the limit."""

from __future__ import annotations

import pytest

from relay.upload import Upload


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
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
@pytest.mark.parametrize(
    ("name", "stream", "message", "leftover"), CASES, ids=[c[0] for c in CASES]
)
def test_upload_at_every_chunk_boundary(name, stream, message, leftover, chunk):
    upload, rest = collect(stream, chunk)
    assert not upload.too_big
    assert upload.message() == message
    assert rest == leftover


def test_over_the_limit_is_dropped_but_the_end_is_still_found():
    body = b"x" * 998 + b"\r\n"
    upload, rest = collect(body * 3 + b".\r\nNOOP\r\n", 7, limit=2000)
    assert upload.too_big
    assert rest == b"NOOP\r\n"


def test_exactly_at_the_limit_is_accepted():
    body = b"y" * 8 + b"\r\n"
    upload, _ = collect(body + b".\r\n", 4, limit=len(body))
    assert not upload.too_big
    assert upload.message() == body
    over, _ = collect(body + b"z\r\n.\r\n", 4, limit=len(body))
    assert over.too_big


def test_not_done_without_the_end():
    upload = Upload(100)
    assert not upload.feed(b"a\r\n.")
    assert not upload.feed(b"\r")
    assert upload.feed(b"\n")
    assert upload.message() == b"a\r\n"
