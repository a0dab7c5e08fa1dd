"""The pure message core: addresses, header fields, line endings, Message-ID and Date."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from email.utils import make_msgid

import pytest

from relay.message import (
    Defect,
    Prepared,
    domain_of,
    find_defect,
    header_fields,
    mailbox_addresses,
    message_id_of,
    normalize_address,
    parse_address,
    parse_path,
    prepare,
    to_crlf,
)

# RFC 5321 section 4.5.3.1: at most 64 octets of local part and 254 of address
# (the 256-octet path less its angle brackets). Labels of at most 63 octets.
DOMAIN_252 = ("b" * 63 + ".") * 3 + "c" * 60


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("app@Example.COM", ("app", "example.com")),
        ("First.Last+tag@sub.example.com", ("First.Last+tag", "sub.example.com")),
        ("a@b", ("a", "b")),
        # The domain is after the last "@": a quoted local part may hold one.
        ('"a@b"@x.test', ('"a@b"', "x.test")),
        ("x" * 64 + "@example.com", ("x" * 64, "example.com")),
        ("a@" + DOMAIN_252, ("a", DOMAIN_252)),
        ("aa@" + DOMAIN_252, None),
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


def test_address_lengths_in_the_table_are_at_the_limits():
    assert len("a@" + DOMAIN_252) == 254
    assert len("aa@" + DOMAIN_252) == 255


@pytest.mark.parametrize(
    ("address", "key", "domain"),
    [
        ("App@Example.COM", "app@example.com", "example.com"),
        (" a@x.test\t", "a@x.test", "x.test"),
        ('"a@B"@Sub.X.test', '"a@b"@sub.x.test', "sub.x.test"),
    ],
)
def test_normalize_address_and_domain_of(address, key, domain):
    assert normalize_address(address) == key
    assert domain_of(address.strip()) == domain


@pytest.mark.parametrize(
    ("value", "addresses"),
    [
        # The strict patterns: one bare or one named address.
        ("a@x.test", ["a@x.test"]),
        ("  App <app@x.test> ", ["app@x.test"]),
        # An obsolete phrase (RFC 5322 section 4.1) the email package flags as a
        # defect; the named pattern takes it, so the common form is not refused.
        ("Joe Q. Public <john.q.public@example.com>", ["john.q.public@example.com"]),
        ('"Boss, The" <boss@x.test>', ["boss@x.test"]),
        # Anything else: both parsers, no defects, the same addresses.
        ("Joe <j@x.test>, k@x.test", ["j@x.test", "k@x.test"]),
        ("g: a@x.test, b@y.test;", ["a@x.test", "b@y.test"]),
        ("a@x.test (c, d@y.test)", ["a@x.test"]),
        # A defect alone is enough, though both parsers agree on the addresses.
        ("J. Smith <j@x.test>, k@x.test", None),
        # The parsers disagree, without a defect: getaddresses sees an empty address.
        ("<a@x.test>, g:;", None),
        ("x@victim.test y@own.test", None),
        ("undisclosed-recipients:;", None),
        ("a@[1.2.3.4]", None),  # parses, but not an address this relay sends from
    ],
)
def test_mailbox_addresses(value, addresses):
    assert mailbox_addresses(value) == addresses


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
        (b"From: \xff <a@x.test>", {b"from": ["\ufffd <a@x.test>"]}),
        # Only WSP is trimmed: a form feed or vertical tab stays, for the checks to see.
        (b"Message-ID: \x0b<1@x>\x0c \r\n\t(c)\x0c", {b"message-id": ["\x0b<1@x>\x0c (c)\x0c"]}),
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
        (b"a\rb", b"a\r\nb"),
        (b"a\nb", b"a\r\nb"),
        # As many bare CR as bare LF, and none of them a CRLF.
        (b"a\rb\n", b"a\r\nb\r\n"),
        (b"a\n\rb", b"a\r\n\r\nb"),
        (b"no line end", b"no line end"),
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


def test_generated_message_id_is_24_random_bytes_at_the_hostname():
    prepared = prepare(
        b"From: a@x.test\r\n\r\n", sender="a@x.test", recipients=(), hostname="h.test"
    )
    assert re.fullmatch(r"<[A-Za-z0-9_-]{32}@h\.test>", prepared.message_id)


def test_date_defaults_to_now_in_utc():
    before = datetime.now(UTC).replace(microsecond=0)
    prepared = prepare(b"From: a@x.test\r\n\r\n", sender="a@x.test", recipients=(), hostname="h")
    date = re.search(rb"^Date: (.*)\r\n", prepared.content, re.M)
    assert date is not None
    # "+0000", not "-0000" (RFC 5322 section 3.3: the zone is not known).
    assert date.group(1).endswith(b" +0000")
    stamped = datetime.strptime(date.group(1).decode(), "%a, %d %b %Y %H:%M:%S %z")
    assert before <= stamped <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("raw", "message_id"),
    [
        # The msg-id alone: the white space and comments around it are not part of it.
        pytest.param(b"Message-ID:  <m1@x.test>   (retry)\r\n\r\n", "<m1@x.test>", id="spaces"),
        pytest.param(b"Message-ID: <m1@x.test>\r\n\t(retry)\r\n\r\n", "<m1@x.test>", id="folded"),
        # No blank line: the whole message is header.
        pytest.param(b"From: a@x.test\r\nMessage-ID: <m1@x.test>", "<m1@x.test>", id="no body"),
        pytest.param(b"Message-ID:   \r\n\r\n", None, id="empty"),
        pytest.param(b"Message-ID:\r\n \r\n\t\r\n\r\n", None, id="empty and folded"),
        # A body line is not a header field, even when it looks like one.
        pytest.param(
            b"From: a@x.test\r\n\r\nhi\r\n\r\nMessage-ID: <b@x.test>\r\n", None, id="in body"
        ),
    ],
)
def test_message_id_the_client_gave(raw, message_id):
    """The client's msg-id; None: the relay adds its own."""
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h.test")
    assert prepared.defect is None
    if message_id is None:
        assert prepared.message_id.endswith("@h.test>")
        assert prepared.content.startswith(b"Message-ID: " + prepared.message_id.encode())
    else:
        assert prepared.message_id == message_id
        assert not prepared.content.startswith(b"Message-ID:")


# What generators send, each as its library writes it.
GENERATED_IDS = [
    # Python email.utils.make_msgid(): <time.pid.random@fqdn>
    "<179640862980.11114.6812025889731309@build-host.local>",
    "<179640862980.11114.6812025889731309@localhost>",
    # Nodemailer: <uuid@sender-domain>
    "<3f8a2b1c-9d4e-4f5a-8b6c-7d8e9f0a1b2c@example.com>",
    # PHPMailer: <uniqid@server-hostname>
    "<Xk3JvQ8pL2mN9rT5wY7zA1bC4dE6fG0hI@www.example.com>",
    # Jakarta Mail: <hash.counter.millis@domain>
    "<1234567890.1.1796408629801@example.com>",
    # Thunderbird: <uuid@domain>
    "<8e5b9f2a-3c4d-4e6f-a7b8-c9d0e1f2a3b4@example.com>",
    # Outlook: $-separated hex, and Exchange Online's ids
    "<002a01d4b5c1$5d3b8f20$17b2ad60$@example.com>",
    "<DM6PR11MB4073A1B2C3D4E5F6A7B8C9D0E1F2A@DM6PR11MB4073.namprd11.prod.outlook.com>",
    # Gmail: base64-ish text with + and =
    "<CAKx9+aBc=dEf_GhIjK-LmN0pQrStUvWxYz1234567890@mail.gmail.com>",
    # swaks, Ruby's mail gem
    "<20261121120000.012345@client.test>",
    "<6573a1b2c3d4e_1a2b3c4d5e6f7@host.mail>",
    # A no-fold-literal on the right (RFC 5322 section 3.6.4), and every atext character.
    "<a.b@[192.0.2.1]>",
    "<a@[IPv6:2001:db8::1]>",
    "<!#$%&'*+-/=?^_`{|}~.0@x.test>",
]


@pytest.mark.parametrize("msg_id", GENERATED_IDS)
def test_what_clients_generate_is_a_msg_id(msg_id):
    assert message_id_of(msg_id) == msg_id
    raw = b"Message-ID: " + msg_id.encode() + b"\r\nDate: Sat\r\nFrom: a@x.test\r\n\r\nb\r\n"
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    assert (prepared.defect, prepared.message_id) == (None, msg_id)
    assert prepared.content == raw  # forwarded exactly as written


def test_make_msgid_passes():
    for domain in (None, "example.com", "relay.test"):
        msg_id = make_msgid(domain=domain)
        assert message_id_of(msg_id) == msg_id


@pytest.mark.parametrize(
    ("value", "msg_id"),
    [
        pytest.param("<a@b>", "<a@b>", id="bare"),
        pytest.param(" \t<a@b>\t ", "<a@b>", id="white space around"),
        pytest.param("(sent by cron) <a@b>", "<a@b>", id="comment before"),
        pytest.param("<a@b> (retry (2nd) \\) x)", "<a@b>", id="nested comment, quoted-pair"),
        pytest.param("<a@b>(x)(y)", "<a@b>", id="two comments"),
        pytest.param("<" + "a" * 246 + "@b>", "<" + "a" * 246 + "@b>", id="250 octets"),
        # Refused: not one msg-id.
        pytest.param('<x"><img src=x onerror=alert(1)>@example.com>', None, id="markup and quote"),
        pytest.param('<x">...<img src=x>@example.com>', None, id="the reported one"),
        pytest.param("<a b@x.test>", None, id="space inside"),
        pytest.param("<a@x .test>", None, id="space on the right"),
        pytest.param("<ab.x.test>", None, id="no @"),
        pytest.param("<a@b@x.test>", None, id="two @"),
        pytest.param("<@x.test>", None, id="empty id-left"),
        pytest.param("<a@>", None, id="empty id-right"),
        pytest.param("a@x.test", None, id="no brackets"),
        pytest.param("<a@x.test", None, id="no closing bracket"),
        pytest.param("a@x.test>", None, id="no opening bracket"),
        pytest.param("<<a@x.test>>", None, id="doubled brackets"),
        pytest.param("<>", None, id="empty brackets"),
        pytest.param("<a@x.test> <b@x.test>", None, id="two ids"),
        pytest.param("<a@x.test>,<b@x.test>", None, id="two ids with a comma"),
        pytest.param("<a@x.test> trailing", None, id="text after"),
        pytest.param("leading <a@x.test>", None, id="text before"),
        pytest.param("<" + "a" * 247 + "@b>", None, id="251 octets"),
        pytest.param("<" + "a" * 5000 + "@b>", None, id="very long"),
        pytest.param("<a..b@x.test>", None, id="two dots"),
        pytest.param("<.a@x.test>", None, id="leading dot"),
        pytest.param("<a.@x.test>", None, id="trailing dot"),
        pytest.param("<a@x..test>", None, id="two dots on the right"),
        # The obsolete forms (RFC 5322 section 4.5.4) must not be generated.
        pytest.param('<"a b"@x.test>', None, id="quoted id-left"),
        pytest.param("<a(c)@x.test>", None, id="comment inside"),
        pytest.param("< a@x.test>", None, id="white space inside"),
        pytest.param("<a@[x y]>", None, id="space in a literal"),
        pytest.param("<a@[x\\]]>", None, id="quoted-pair in a literal"),
        # Comments must close and hold printable ASCII only.
        pytest.param("<a@x.test> (open", None, id="unclosed comment"),
        pytest.param("<a@x.test> (a))", None, id="unopened comment end"),
        pytest.param("<a@x.test> (\\", None, id="quoted-pair at the end"),
        pytest.param("<a@x.test> (\x01)", None, id="control in a comment"),
        pytest.param("<a@x.test> (\\\x01)", None, id="quoted control in a comment"),
        pytest.param("<a@x.test> (\u00e9)", None, id="8-bit comment"),
        # Controls and 8-bit text anywhere.
        pytest.param("<m\x01@x.test>", None, id="control character"),
        pytest.param("<m\x7f@x.test>", None, id="DEL"),
        pytest.param("<a@x.test>\x0c", None, id="form feed after"),
        pytest.param("\x0b<a@x.test>", None, id="vertical tab before"),
        pytest.param("<\u00e9@x.test>", None, id="non-ASCII id-left"),
        pytest.param("<a@x.test\ufffd>", None, id="undecodable octet"),
        pytest.param("<a@x.test>\r\n250 fake", None, id="CRLF"),
    ],
)
def test_message_id_of(value, msg_id):
    assert message_id_of(value) == msg_id


@pytest.mark.parametrize(
    ("head", "defect"),
    [
        (b"Message-ID: <a@x.test>\r\n", None),
        (b"Message-ID:\r\n", None),  # empty: the relay adds its own
        (b'Message-ID: <x">...<img src=x>@example.com>\r\n', Defect.BAD_MESSAGE_ID),
        (b"Message-ID: <a@x.test>\x0c\r\n", Defect.BAD_MESSAGE_ID),
        (b"Message-ID: <a@x.test>\r\n (folded comment\r\n", Defect.BAD_MESSAGE_ID),
        (b"Message-ID: <a@x.test>\r\n (folded comment)\r\n", None),
        (b"Message-ID: (c)\r\n", Defect.BAD_MESSAGE_ID),  # a comment alone is not empty
        (b"Message-ID: \xff\r\n", Defect.BAD_MESSAGE_ID),
        (b"Message-ID: <a@x.test>\r\nMessage-ID: <a@x.test>\r\n", Defect.MESSAGE_IDS),
        (b"Message-ID: <a@x.test>\r\nmessage-id: <b@x.test>\r\n", Defect.MESSAGE_IDS),
        (b"Message-ID:\r\nMessage-ID: <b@x.test>\r\n", Defect.MESSAGE_IDS),
    ],
)
def test_message_id_defects(head, defect):
    raw = b"From: a@x.test\r\n" + head + b"\r\nbody\r\n"
    assert find_defect(raw) is defect
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    assert prepared.defect is defect
    if defect is not None:  # nothing of a refused message is kept or echoed
        assert (prepared.message_id, prepared.idempotency_key) == ("", "")


def test_header_fields_in_the_body_are_not_counted():
    raw = b"From: a@x.test\r\nDate: Sat\r\n\r\n\r\nFrom: b@y.test\r\n\r\nSender: c@y.test\r\n"
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    assert prepared.from_count == 1
    assert prepared.header_senders == ("a@x.test",)


def test_a_message_with_an_empty_header_section_is_a_defect():
    raw = b"\r\nFrom: a@x.test\r\nMessage-ID: <m1@x.test>\r\n\r\nbody\r\n"
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h.test")
    assert prepared.defect is Defect.NO_HEADER_SECTION


OK_HEAD = b"From: a@x.test\r\nTo: r@y.test\r\nSubject: hi\r\n"


def parts(n: int) -> bytes:
    body = b"".join(b"--b1\r\nContent-Type: text/plain\r\n\r\npart\r\n" for _ in range(n))
    return b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n' + body + b"--b1--\r\n"


def nested_parts(outer: int, inner: int) -> bytes:
    """A multipart of `outer` parts, the first of them a multipart of `inner`."""
    leaf = b"Content-Type: text/plain\r\n\r\npart\r\n"
    inside = b"".join(b"--b2\r\n" + leaf for _ in range(inner)) + b"--b2--\r\n"
    first = b'--b1\r\nContent-Type: multipart/alternative; boundary="b2"\r\n\r\n' + inside
    body = first + b"".join(b"--b1\r\n" + leaf for _ in range(outer - 1)) + b"--b1--\r\n"
    return b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n' + body


def header_of(size: int) -> bytes:
    """A header section of `size` octets (without the CRLF that ends it), lines of 998."""
    line = b"X: " + b"a" * 995 + b"\r\n"
    full, rest = divmod(size, len(line))
    assert rest >= 4
    return line * full + b"X: " + b"a" * (rest - 3)


@pytest.mark.parametrize(
    ("raw", "defect"),
    [
        (OK_HEAD + b"\r\nbody\r\n", None),
        (OK_HEAD, None),  # no body at all
        (OK_HEAD + b"X-Folded: a\r\n b\r\n\tc\r\n\r\nbody\r\n", None),
        (b"", Defect.NO_HEADER_SECTION),
        (b"\r\nFrom: a@x.test\r\n\r\nbody\r\n", Defect.NO_HEADER_SECTION),
        (OK_HEAD + b"\r\nbo\x00dy\r\n", Defect.NUL),
        (b"From\x00: a@x.test\r\n\r\n", Defect.NUL),
        # A field name folded onto the next line, before a real From.
        (b"From\r\n : ceo@victim.test\r\nFrom: a@x.test\r\n\r\n", Defect.BAD_FIELD),
        (b"From : a@x.test\r\n\r\n", Defect.BAD_FIELD),  # space before the colon
        (b" From: a@x.test\r\n\r\n", Defect.BAD_FIELD),  # a continuation of nothing
        (b"From: a@x.test\r\nno colon here\r\n\r\n", Defect.BAD_FIELD),
        (b"Fr\xc3\xb6m: a@x.test\r\n\r\n", Defect.BAD_FIELD),  # 8-bit name
        (b"X: " + b"a" * 995 + b"\r\n\r\n", None),  # 998 octets exactly
        (b"X: " + b"a" * 996 + b"\r\n\r\n", Defect.LONG_LINE),
        (OK_HEAD + b"\r\n" + b"b" * 999 + b"\r\n", Defect.LONG_LINE),
        (OK_HEAD + (b"X: " + b"a" * 900 + b"\r\n") * 73 + b"\r\n", Defect.HEADER_TOO_BIG),
        (b"To: " + b", ".join([b"r@y.test"] * 1000) + b"\r\n\r\n", Defect.LONG_LINE),
        (b"To: " + b",\r\n ".join([b"r@y.test"] * 1000) + b"\r\n\r\n", None),
        (b"To: " + b",\r\n ".join([b"r@y.test"] * 1001) + b"\r\n\r\n", Defect.TOO_MANY_ADDRESSES),
        (OK_HEAD + parts(100), None),
        (OK_HEAD + parts(101), Defect.TOO_MANY_PARTS),
        # Only a multipart (or an attached message) at the top has parts to count.
        (OK_HEAD + parts(101).replace(b"multipart/mixed", b"text/plain"), None),
        (OK_HEAD + b"Content-Type: message/rfc822\r\n\r\n" + parts(101), Defect.TOO_MANY_PARTS),
        (OK_HEAD + b"\r\n" + parts(101), None),  # no Content-Type: text/plain
        # Parts of every multipart count, nested ones included.
        (OK_HEAD + nested_parts(60, 40), None),
        (OK_HEAD + nested_parts(60, 41), Defect.TOO_MANY_PARTS),
        # A bad line after a folded one is still found.
        (b"X-Folded: a\r\n b\r\nno colon here\r\n\r\n", Defect.BAD_FIELD),
        # 64 KiB of header section exactly, then one octet more.
        (header_of(64 * 1024) + b"\r\n\r\nbody\r\n", None),
        (header_of(64 * 1024 + 1) + b"\r\n\r\nbody\r\n", Defect.HEADER_TOO_BIG),
    ],
)
def test_find_defect(raw, defect):
    assert find_defect(raw) is defect


def test_an_unclean_from_makes_header_senders_none_whatever_follows():
    raw = b"From: x@victim.test y@own.test\r\nSender: s@x.test\r\n\r\n"
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    assert prepared.header_senders is None
    assert prepared.from_count == 1


def test_idempotency_key_is_sha256_of_envelope_and_content():
    """Pinned: a retry may reach an upgraded relay, and a changed key would send it twice."""
    raw = b"Message-ID: <m1@x.test>\r\nDate: Sat\r\nFrom: a@x.test\r\n\r\nb\r\n"
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test", "s@y.test"), hostname="h")
    expected = hashlib.sha256(b"a@x.test\0r@y.test\0s@y.test\0" + raw).hexdigest()
    assert prepared.idempotency_key == expected


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
        ("<>SIZE=1", ("<>", "SIZE=1")),  # what follows the path, as for <a@b.test>SIZE=10
        ("", ("", "")),
        ("a@b.test", ("a@b.test", "")),  # bare: clients still send it
        ("a@b.test SIZE=1", ("a@b.test", "SIZE=1")),
        ("<@r1.test,@r2.test:a@b.test>", ("a@b.test", "")),  # source route ignored
        ('<"john"@b.test>', ("john@b.test", "")),  # needless quotes dropped
        ('<"jo hn"@b.test>', ('"jo hn"@b.test', "")),
        ('<"ab@c"@b.test>', ('"ab@c"@b.test', "")),  # the domain is after the last "@"
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


@pytest.mark.parametrize(
    ("raw", "message_ids"),
    [
        # An empty Message-ID or Date is replaced, not kept beside ours (RFC 5322 3.6).
        (
            b"Message-ID:\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nFrom: a@x.test\r\n\r\nb\r\n",
            1,
        ),
        (b"Message-ID: <m@x.test>\r\nDate:   \r\nFrom: a@x.test\r\n\r\nb\r\n", 1),
        (b"Message-ID:\r\n \r\nDate:\r\nFrom: a@x.test\r\n\r\nMessage-ID:\r\n", 2),  # body kept
        (b"From: a@x.test\r\n\r\nb\r\n", 1),
    ],
)
def test_an_empty_message_id_or_date_is_replaced(raw, message_ids):
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h.test")
    head, _, body = prepared.content.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert sum(line.lower().startswith(b"message-id:") for line in lines) == 1
    assert sum(line.lower().startswith(b"date:") for line in lines) == 1
    assert prepared.content.count(b"Message-ID:") == message_ids
    assert all(line.split(b":", 1)[1].strip() for line in lines if b":" in line)
    assert body == raw.partition(b"\r\n\r\n")[2]


DATE_NOW = b"Date: Sat, 21 Nov 2026 12:00:00 +0000\r\n"


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        # A Date with a control character goes whole, folded lines (space or tab)
        # included; another folded field stays whole.
        (
            b"Message-ID: <m@x.test>\r\nDate: Mon,\x01 21 Nov\r\n 2026 12:00:00\r\n\t+0000\r\n"
            b"Subject: a\r\n b\r\n\tc\r\nFrom: a@x.test\r\n\r\nbody\r\n",
            b"Message-ID: <m@x.test>\r\nSubject: a\r\n b\r\n\tc\r\nFrom: a@x.test\r\n\r\nbody\r\n",
        ),
        # The field name ends at the first colon, not the last.
        (
            b"Date: Mon, 21 Nov 2026 12:00:00 +0000\x7f\r\nMessage-ID: <m@x.test>\r\n"
            b"From: a@x.test\r\n\r\nb\r\n",
            b"Message-ID: <m@x.test>\r\nFrom: a@x.test\r\n\r\nb\r\n",
        ),
        # Only the header section: a field-like line in the body is body.
        (
            b"Date:\r\nMessage-ID: <m@x.test>\r\nFrom: a@x.test\r\n\r\n"
            b"Date: in the body\r\n\r\nend\r\n",
            b"Message-ID: <m@x.test>\r\nFrom: a@x.test\r\n\r\nDate: in the body\r\n\r\nend\r\n",
        ),
        # A message that is all header section.
        (
            b"Message-ID: <m@x.test>\r\nFrom: a@x.test\r\nDate: \r\n",
            b"Message-ID: <m@x.test>\r\nFrom: a@x.test\r\n",
        ),
    ],
)
def test_an_unclean_date_is_replaced_exactly(raw, kept):
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h", now=NOW)
    assert prepared.content == DATE_NOW + kept
    assert prepared.message_id == "<m@x.test>"


def test_an_empty_message_id_is_replaced_exactly():
    raw = b"From: a@x.test\r\nMessage-ID:\r\n \r\n\t\r\nDate: Sat\r\n\r\nb\r\n"
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h", now=NOW)
    assert prepared.content == (
        b"Message-ID: "
        + prepared.message_id.encode()
        + b"\r\nFrom: a@x.test\r\nDate: Sat\r\n\r\nb\r\n"
    )


def test_prepare_checks_every_address_field_for_too_many_addresses():
    to = b"To: " + b",\r\n ".join([b"r@y.test"] * 1001) + b"\r\n"
    raw = b"From: a@x.test\r\n" + to + b"\r\nb\r\n"
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    assert prepared.defect is Defect.TOO_MANY_ADDRESSES


@pytest.mark.parametrize(
    ("raw", "defect"),
    [
        (b"From: a@x.test\r\nMessage-ID: <m@x.test>\r\n\r\nb\x00\r\n", Defect.NUL),
        (b"\r\nFrom: a@x.test\r\nMessage-ID: <m@x.test>\r\n\r\nb\r\n", Defect.NO_HEADER_SECTION),
    ],
)
def test_a_defective_message_gets_no_message_id_or_key(raw, defect):
    """Nothing is added to what the relay refuses: its delivery record has no Message-ID."""
    prepared = prepare(raw, sender="a@x.test", recipients=("r@y.test",), hostname="h")
    assert prepared == Prepared(raw, "", None, 0, "", defect)
