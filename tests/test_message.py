"""The pure message core: addresses, header fields, line endings, Message-ID and Date."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.message import header_fields, parse_address, parse_path, prepare, to_crlf


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("app@Example.COM", ("app", "example.com")),
        ("First.Last+tag@sub.example.com", ("First.Last+tag", "sub.example.com")),
        ("a@b", ("a", "b")),
        ("no-at-sign", None),
        ("@example.com", None),
        ("a@", None),
        ("a\r@example.com", None),
        ("a\x00b@example.com", None),
        ("a@exa mple.com", None),
        ("a@-bad-.com", None),
        ("ü@example.com", None),
        ("x" * 65 + "@example.com", None),
        ("a@" + "b" * 250 + ".com", None),
    ],
)
def test_parse_address(address, parsed):
    assert parse_address(address) == parsed


@pytest.mark.parametrize(
    ("head", "fields"),
    [
        (b"From: a@x.test\r\nTo: b@y.test", {b"from": ["a@x.test"]}),
        (b"FROM: a@x.test\r\nsender:s@x.test", {b"from": ["a@x.test"], b"sender": ["s@x.test"]}),
        (b"From: A\r\n <a@x.test>\r\n\tmore", {b"from": ["A <a@x.test> more"]}),
        (b"From: a@x.test\r\nFrom: b@x.test", {b"from": ["a@x.test", "b@x.test"]}),
        (b"X-Other: 1\r\n folded\r\nDate: Sat", {b"date": ["Sat"]}),
        (b" leading continuation\r\nMessage-ID: <1@x>", {b"message-id": ["<1@x>"]}),
        (b"no colon line\r\nFrom: a@x.test", {b"from": ["a@x.test"]}),
    ],
)
def test_header_fields(head, fields):
    assert header_fields(head) == fields


@pytest.mark.parametrize(
    ("raw", "crlf"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\n\nb", b"a\r\n\r\nb"),
    ],
)
def test_to_crlf(raw, crlf):
    assert to_crlf(raw) == crlf


NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def test_prepare_adds_message_id_and_date_in_front():
    prepared = prepare(
        b"From: App <app@x.test>\r\n\r\nbody\r\n", sender="app@x.test", recipients=("r@y.test",),
        hostname="relay.test", now=NOW,
    )  # fmt: skip
    assert prepared.content.startswith(b"Message-ID: " + prepared.message_id.encode() + b"\r\n")
    assert (
        b"\r\nDate: Sat, 21 Nov 2026 12:00:00 +0000\r\nFrom: App <app@x.test>\r\n"
        in prepared.content
    )
    assert prepared.message_id.endswith("@relay.test>")
    assert prepared.header_senders == ("app@x.test",)
    assert prepared.from_count == 1


def test_prepare_keeps_the_clients_message_id_and_date():
    raw = (
        b"Message-ID: <m1@x.test>\r\nDate: Fri, 20 Nov 2026 10:00:00 +0000\r\n"
        b"From: a@x.test\r\n\r\nb\r\n"
    )
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h", now=NOW)
    assert prepared.content == raw
    assert prepared.message_id == "<m1@x.test>"


def test_idempotency_key_is_stable_for_a_retry_and_differs_otherwise():
    raw = b"Message-ID: <m1@x.test>\r\nFrom: a@x.test\r\n\r\nb\r\n"
    first = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    retry = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    other = prepare(raw, sender="a@x.test", recipients=("s@y.test",), hostname="h")
    assert first.idempotency_key == retry.idempotency_key != other.idempotency_key
    # Without a Message-ID of its own a message is a new send each time.
    bare = b"From: a@x.test\r\n\r\nb\r\n"
    one = prepare(bare, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    two = prepare(bare, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    assert one.idempotency_key != two.idempotency_key


def test_sender_header_addresses_are_collected():
    raw = b'From: "Boss, The" <boss@x.test>, b@x.test\r\nSender: s@y.test\r\n\r\n'
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    assert prepared.header_senders == ("boss@x.test", "b@x.test", "s@y.test")
    assert prepared.from_count == 1


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [
        ("<a@b.test>", ("a@b.test", "")),
        ("<a@b.test> SIZE=10 BODY=8BITMIME", ("a@b.test", "SIZE=10 BODY=8BITMIME")),
        ("<a@b.test>SIZE=10", ("a@b.test", "SIZE=10")),
        ("  <a@b.test>  ", ("a@b.test", "")),
        ("<>", ("<>", "")),
        ("<> SIZE=1", ("<>", "SIZE=1")),
        ("", ("", "")),
        ("a@b.test", ("a@b.test", "")),  # bare: clients still send it
        ("a@b.test SIZE=1", ("a@b.test", "SIZE=1")),
        ("<@r1.test,@r2.test:a@b.test>", ("a@b.test", "")),  # source route ignored
        ('<"john"@b.test>', ("john@b.test", "")),  # needless quotes dropped
        ('<"jo hn"@b.test>', ('"jo hn"@b.test', "")),
        ('<"a\\"b"@b.test>', ('"a\\"b"@b.test', "")),
        ("<Mixed.Case+tag@B.Test>", ("Mixed.Case+tag@B.Test", "")),  # as written
        ("<a@[192.0.2.1]>", ("a@[192.0.2.1]", "")),  # parse_address refuses it later
        ("<a(comment)@b.test>", (None, None)),
        ("<a b@b.test>", (None, None)),
        ("< a@b.test >", (None, None)),
        ("<a@b.test", (None, None)),
        ("a@b.test>", (None, None)),
        ("<a@b@c.test>", (None, None)),
        ("<b.test>", (None, None)),
        ("<a@>", (None, None)),
        ("<@b.test>", (None, None)),
        ('<"a\rb"@b.test>', (None, None)),
        ("<a\x00@b.test>", (None, None)),
        ("<a@b\x00.test>", (None, None)),
        ("<a@b<c.test>", (None, None)),
        ("<ä@b.test>", (None, None)),
    ],
)
def test_parse_path(arg, parsed):
    assert parse_path(arg) == parsed
