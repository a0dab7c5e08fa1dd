"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

DOMAIN = "example.com"
SENDER = f"app@{DOMAIN}"


def message(
    sender: str = SENDER, to: str = "rcpt@dest.test", subject: str = "Hi", body: str = "Hello.", extra: str = ""
) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\n{body}\r\n"
    ).encode()
