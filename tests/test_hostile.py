"""Hostile clients against the real relay over TLS: each attack, and what the relay answers."""

from __future__ import annotations

import base64
import logging

import pytest
from support import b64, plain

from relay.logs import Printable, RedactAiosmtpd


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
