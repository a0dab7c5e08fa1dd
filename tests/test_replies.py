"""Replies as values: what `Reply` refuses, `one_line`, the EHLO lines, and the
rewrite of aiosmtpd's built-in replies (RFC 2034: an enhanced code on each)."""

from __future__ import annotations

import pytest

from relay import replies
from relay.replies import Reply, delivered, ehlo, normalize, one_line


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [
        (200, "2.0.0", "lowest"),
        (599, "5.999.999", "highest"),
        (451, "4.7.1", "text with spaces and punctuation: ok."),
        (250, "2.1.5", ""),
    ],
)
def test_reply_accepts(code, enhanced, text):
    reply = Reply(code, enhanced, text)
    assert str(reply) == f"{code} {enhanced} {text}"


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [
        pytest.param(199, "2.0.0", "x", id="code below 200"),
        pytest.param(600, "5.0.0", "x", id="code above 599"),
        pytest.param(354, "3.0.0", "x", id="no class 3 enhanced code"),
        pytest.param(250, "4.0.0", "x", id="class differs from the code's"),
        pytest.param(550, "2.0.0", "x", id="class differs again"),
        pytest.param(250, "2.0", "x", id="two parts"),
        pytest.param(250, "2.1000.0", "x", id="subject over 3 digits"),
        pytest.param(250, "2.0.0 ", "x", id="trailing space"),
        pytest.param(250, "2.0.0", "a\rb", id="CR in text"),
        pytest.param(250, "2.0.0", "a\nb", id="LF in text"),
        pytest.param(250, "2.0.0", "a\r\nb", id="CRLF in text"),
    ],
)
def test_reply_refuses(code, enhanced, text):
    with pytest.raises(AssertionError):
        Reply(code, enhanced, text)


@pytest.mark.parametrize(
    ("code", "permanent"), [(250, False), (451, False), (499, False), (500, True), (554, True)]
)
def test_is_permanent(code, permanent):
    assert Reply(code, f"{str(code)[0]}.0.0", "x").is_permanent is permanent


def test_but_keeps_the_codes_and_cleans_the_text():
    reply = replies.SENDER_DENIED.but("Denied:\r\n  smuggled\x00line")
    assert reply == Reply(550, "5.7.1", "Denied: smuggled line")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("plain", "plain"),
        ("  padded  ", "padded"),
        ("a\x00b", "a b"),
        ("a\r\nb", "a b"),
        ("a\x7f\x1fb", "a b"),
        ("tab\tand  spaces", "tab and spaces"),
        ("Zoë ✓", "Zo? ?"),
        ("x" * 200, "x" * 200),
        ("x" * 201, "x" * 197 + "..."),
        ("y " * 150, ("y " * 99)[:197] + "..."),
    ],
)
def test_one_line(text, line):
    assert one_line(text) == line
    assert len(one_line(text)) <= replies.MAX_REASON


@pytest.mark.parametrize(
    ("text", "limit", "line"),
    [("abcdef", 6, "abcdef"), ("abcdefg", 6, "abc..."), ("a  b", 3, "a b")],
)
def test_one_line_limit(text, limit, line):
    assert one_line(text, limit) == line


def test_ehlo_lists_exactly_the_documented_extensions():
    assert ehlo("relay.test", "client.test", ("PLAIN", "LOGIN"), 5242880) == [
        "250-relay.test greets client.test",
        "250-AUTH PLAIN LOGIN",
        "250-SIZE 5242880",
        "250-8BITMIME",
        "250 ENHANCEDSTATUSCODES",
    ]


@pytest.mark.parametrize(
    ("client", "greeted"),
    [
        ("c" * 64, "c" * 64),
        # The client's name is cut at 64 characters, the last three a "...".
        ("c" * 65, "c" * 61 + "..."),
        ("bad\r\nname", "bad name"),
    ],
)
def test_ehlo_greets_the_client_on_one_short_line(client, greeted):
    assert ehlo("relay.test", client, ("PLAIN",), 10)[0] == f"250-relay.test greets {greeted}"


def test_helo_and_delivered():
    assert replies.helo("relay.test") == "250 relay.test"
    assert str(delivered("<m1@x.test>")) == "250 2.0.0 Ok <m1@x.test>"


@pytest.mark.parametrize(
    ("message_id", "text"),
    [
        # The longest msg-id the relay takes (relay.message.MAX_MESSAGE_ID) is echoed whole.
        ("<" + "a" * 246 + "@b>", "Ok <" + "a" * 246 + "@b>"),
        # An upstream's id, whatever it holds, stays one line of printable ASCII.
        ("<a@b>\r\n250 2.0.0 forged", "Ok <a@b> 250 2.0.0 forged"),
        ("<a\x00\x1b[31m@b>", "Ok <a [31m@b>"),
        ("<\u00e9\u2028@b>", "Ok <??@b>"),
        ("<" + "a" * 600 + "@b>", "Ok <" + "a" * 493 + "..."),
    ],
)
def test_delivered_echoes_an_id_as_one_printable_line(message_id, text):
    reply = delivered(message_id)
    assert reply.text == text
    line = str(reply).encode() + b"\r\n"
    # RFC 5321 section 4.5.3.1.5: 512 octets at most, code and CRLF included.
    assert len(line) <= 512
    assert all(0x20 <= octet <= 0x7E for octet in line[:-2])


@pytest.mark.parametrize(
    ("line", "normalized"),
    [
        # Without an enhanced code by definition (RFC 2034 section 3).
        ("220 relay.test ESMTP", "220 relay.test ESMTP"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
        ("354 End data with <CR><LF>.<CR><LF>", replies.START_DATA),
        # Already carrying one: unchanged.
        ("250 2.1.5 Ok", "250 2.1.5 Ok"),
        ("250-2.0.0 first of several", "250-2.0.0 first of several"),
        ("501 5.5.2 Can't decode base64", "501 5.5.2 Can't decode base64"),
        ("421 4.7.0 AUTH sent too many times", "421 4.7.0 AUTH sent too many times"),
        ("550 5.1.1", "550 5.1.1"),
        # aiosmtpd 1.4.6's own replies (aiosmtpd/smtp.py), each to ours.
        # aiosmtpd closes the session at the fifth unknown command: a 421 (RFC 5321 section 3.8).
        (
            "502 5.5.1 Too many unrecognized commands",
            "421 4.7.0 Too many unrecognized commands, closing",
        ),
        ("250 OK", "250 2.0.0 Ok"),
        ("221 Bye", "221 2.0.0 Service closing transmission channel"),
        ("500 Command line too long", "500 5.5.2 Line too long"),
        ("500 Line too long (see RFC5321 4.5.3.1.6)", "500 5.5.2 Line too long"),
        ("500 Error: bad syntax", "501 5.5.4 Syntax error"),
        ("500 Error: strict ASCII mode", "501 5.5.4 Non-ASCII command arguments"),
        ('500 Error: command "FOO" not recognized', "500 5.5.2 Command not recognized"),
        ("501 Syntax: HELO hostname", "501 5.5.4 Syntax error in parameters or arguments"),
        ("502 Could not VRFY x", "502 5.5.1 Command not implemented"),
        ("503 Error: need MAIL command", "503 5.5.1 Bad sequence of commands: MAIL first"),
        ("503 Error: need RCPT command", "503 5.5.1 Bad sequence of commands: RCPT first"),
        (
            "503 Error: nested MAIL command",
            "503 5.5.1 Bad sequence of commands: MAIL already given",
        ),
        (
            "503 Error: send EHLO first",
            "503 5.5.1 Bad sequence of commands: send EHLO or HELO first",
        ),
        ("503 Already authenticated", "503 5.5.1 Already authenticated"),
        ("552 Error: Too much mail data", "552 5.3.4 Message too big"),
        ("553 Could not parse", "553 5.1.3 Bad recipient address syntax"),
        (
            "555 MAIL FROM parameters not recognized or not implemented",
            "555 5.5.4 Parameter not recognized",
        ),
        (
            "252 Cannot VRFY user, but will accept message and attempt delivery",
            "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        # Anything else: the class's generic code, the text kept on one line.
        ("451 Local trouble", "451 4.0.0 Local trouble"),
        ("550 Something else", "550 5.0.0 Something else"),
        ("250 All fine", "250 2.0.0 All fine"),
        ("220-not a greeting prefix", "220-not a greeting prefix"),
        ("503 Error: \x00odd", "503 5.0.0 Error: odd"),
        # A class SMTP does not have still gets a permanent one.
        ("399 unexpected", "399 5.0.0 unexpected"),
    ],
)
def test_normalize(line, normalized):
    assert normalize(line) == normalized
