"""The Resend channel: the MIME translation as a table, outcomes against a fake Resend."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any

import httpx
import pytest

from relay.channels.base import Delivery, Outbound
from relay.channels.resend import ERRORS, ResendChannel, is_config_fault, outcome, translate
from relay.errors import DeliveryError, PermanentDelivery, TransientDelivery
from relay.upstreams import ResendConfig, Secret
from tests.fake_upstreams import RESEND_ERRORS, FakeResend, resend_error

KEY = "ab" * 32
ABSENT = object()


def outbound(
    content: str | bytes,
    recipients: tuple[str, ...] = ("bob@example.org",),
    *,
    sender: str = "alice@example.com",
    key: str = KEY,
) -> Outbound:
    data = content.replace("\n", "\r\n").encode() if isinstance(content, str) else content
    return Outbound(sender, recipients, data, "<m1@example.com>", key)


def simple(headers: str, body: str = "hello\n") -> str:
    return headers.strip("\n") + "\n\n" + body


# --- translate: addresses, subject, headers ------------------------------------

ADDRESS_CASES: list[tuple[str, str, tuple[str, ...], dict[str, Any]]] = [
    (
        "to only",
        "From: alice@example.com\nTo: bob@example.org\nSubject: hi",
        ("bob@example.org",),
        {"from": "alice@example.com", "to": ["bob@example.org"], "cc": ABSENT, "bcc": ABSENT},
    ),
    (
        "display names kept",
        'From: "Alice, A." <alice@example.com>\nTo: Bob <bob@example.org>\nSubject: hi',
        ("bob@example.org",),
        {"from": '"Alice, A." <alice@example.com>', "to": ["Bob <bob@example.org>"]},
    ),
    (
        "envelope-only recipient goes to bcc",
        "From: alice@example.com\nTo: bob@example.org\nSubject: hi",
        ("bob@example.org", "carol@example.org"),
        {"to": ["bob@example.org"], "bcc": ["carol@example.org"]},
    ),
    (
        "header-only addresses are not sent to",
        "From: alice@example.com\nTo: bob@example.org, mallory@example.net\n"
        "Cc: eve@example.net\nSubject: hi",
        ("bob@example.org",),
        {"to": ["bob@example.org"], "cc": ABSENT, "bcc": ABSENT},
    ),
    (
        "header and envelope compared case-insensitively",
        "From: alice@example.com\nTo: Bob@Example.ORG\nSubject: hi",
        ("bob@example.org",),
        {"to": ["Bob@Example.ORG"], "bcc": ABSENT},
    ),
    (
        "cc kept for envelope recipients",
        "From: alice@example.com\nTo: bob@example.org\n"
        "Cc: Carol <carol@example.org>, dave@example.net\nSubject: hi",
        ("bob@example.org", "carol@example.org"),
        {"to": ["bob@example.org"], "cc": ["Carol <carol@example.org>"], "bcc": ABSENT},
    ),
    (
        "only cc names envelope recipients: cc stands in for to, bcc stays hidden",
        "From: alice@example.com\nTo: list@example.net\nCc: bob@example.org\nSubject: hi",
        ("bob@example.org", "carol@example.org"),
        {"to": ["bob@example.org"], "cc": ABSENT, "bcc": ["carol@example.org"]},
    ),
    (
        "no envelope recipient in the headers: they go in to",
        "From: alice@example.com\nTo: undisclosed-recipients:;\nSubject: hi",
        ("bob@example.org", "carol@example.org"),
        {"to": ["bob@example.org", "carol@example.org"], "bcc": ABSENT},
    ),
    (
        "duplicate envelope recipient sent once",
        "From: alice@example.com\nTo: bob@example.org\nSubject: hi",
        ("bob@example.org", "BOB@example.org", "carol@example.org"),
        {"to": ["bob@example.org"], "bcc": ["carol@example.org"]},
    ),
    (
        "reply_to",
        "From: alice@example.com\nTo: bob@example.org\nReply-To: Help <help@example.com>\n"
        "Subject: hi",
        ("bob@example.org",),
        {"reply_to": ["Help <help@example.com>"]},
    ),
    (
        "no from header: the envelope sender",
        "To: bob@example.org\nSubject: hi",
        ("bob@example.org",),
        {"from": "alice@example.com"},
    ),
    (
        "raw UTF-8 display name (8BITMIME, no SMTPUTF8)",
        "From: J\u00f6rg <alice@example.com>\nTo: bob@example.org\nSubject: caf\u00e9",
        ("bob@example.org",),
        {"from": "J\u00f6rg <alice@example.com>", "subject": "caf\u00e9"},
    ),
    (
        "subject missing",
        "From: alice@example.com\nTo: bob@example.org",
        ("bob@example.org",),
        {"subject": "(no subject)"},
    ),
    (
        "encoded, folded subject",
        "From: alice@example.com\nTo: bob@example.org\nSubject: =?utf-8?q?Caf=C3=A9?=\n au lait",
        ("bob@example.org",),
        {"subject": "Café au lait"},
    ),
]


@pytest.mark.parametrize(
    ("headers", "recipients", "expected"),
    [case[1:] for case in ADDRESS_CASES],
    ids=[case[0] for case in ADDRESS_CASES],
)
def test_translate_addresses(
    headers: str, recipients: tuple[str, ...], expected: dict[str, Any]
) -> None:
    body = translate(outbound(simple(headers), recipients))
    for key, value in expected.items():
        if value is ABSENT:
            assert key not in body, key
        else:
            assert body[key] == value, key


def test_translate_custom_headers_kept_and_forbidden_dropped() -> None:
    content = simple(
        """
Received: from client.example by relay.example
Return-Path: <alice@example.com>
DKIM-Signature: v=1; a=rsa-sha256; d=example.com; b=abc
From: alice@example.com
To: bob@example.org
Cc: carol@example.org
Bcc: dave@example.org
Subject: hi
Date: Mon, 1 Jan 2024 00:00:00 +0000
Message-ID: <m1@example.com>
In-Reply-To: <m0@example.com>
References: <a@example.com>
 <m0@example.com>
List-Unsubscribe: <https://example.com/u/1>
List-Unsubscribe-Post: List-Unsubscribe=One-Click
X-Campaign: spring
X-Campaign: ignored second value
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 7bit
"""
    )
    body = translate(outbound(content))
    assert body["headers"] == {
        "Message-ID": "<m1@example.com>",
        "In-Reply-To": "<m0@example.com>",
        "References": "<a@example.com> <m0@example.com>",
        "List-Unsubscribe": "<https://example.com/u/1>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "X-Campaign": "spring",
    }


def test_headers_resend_does_not_build_reach_it_and_the_dropped_are_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    content = simple(
        """
Received: from client.example by relay.example
DKIM-Signature: v=1; a=rsa-sha256; d=example.com; b=abc
From: alice@example.com
Sender: list-bot@example.com
To: bob@example.org
Subject: digest
Date: Mon, 1 Jan 2024 00:00:00 +0000
Message-ID: <m1@example.com>
Auto-Submitted: auto-generated
List-Id: Weekly digest <digest.example.com>
Precedence: bulk
Organization: Example Ltd
Keywords: one, two
Keywords: three
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
"""
    )
    with FakeResend() as fake, caplog.at_level(logging.DEBUG, logger="relay.resend"):
        (result,) = deliver(config_for(fake.url), outbound(content))
    assert isinstance(result, Delivery)
    assert fake.sent[0].json["headers"] == {
        "Sender": "list-bot@example.com",
        "Message-ID": "<m1@example.com>",
        "Auto-Submitted": "auto-generated",
        "List-Id": "Weekly digest <digest.example.com>",
        "Precedence": "bulk",
        "Organization": "Example Ltd",
        "Keywords": "one, two",
    }
    logged = [r.getMessage() for r in caplog.records if "not passed" in r.getMessage()]
    assert logged == [
        "resend: <m1@example.com>: headers not passed: Received, DKIM-Signature, From, To,"
        " Subject, Date, Keywords, MIME-Version, Content-Type"
    ]


def test_translate_adds_message_id_when_absent() -> None:
    body = translate(outbound(simple("From: alice@example.com\nTo: bob@example.org")))
    assert body["headers"] == {"Message-ID": "<m1@example.com>"}


def test_translate_plain_text_only() -> None:
    body = translate(outbound(simple("From: a@example.com\nTo: bob@example.org", "one\ntwo\n")))
    assert body["text"] == "one\ntwo\n"
    assert "html" not in body
    assert "attachments" not in body


def test_translate_undeclared_8bit_text_read_as_utf8() -> None:
    body = translate(outbound(simple("From: a@example.com\nTo: bob@example.org", "na\u00efve\n")))
    assert body["text"] == "na\u00efve\n"


def test_translate_undecodable_bytes_become_replacement_characters() -> None:
    content = (
        b"From: J\xf6rg <alice@example.com>\r\nTo: bob@example.org\r\n"
        b"Content-Type: text/plain; charset=x-unknown\r\n\r\nbody\xe9\r\n"
    )
    body = translate(outbound(content))
    assert body["from"] == "J\ufffdrg <alice@example.com>"
    assert body["text"] == "body\ufffd\n"


# --- translate: MIME structure -------------------------------------------------


def mime(build: Any) -> bytes:
    message = EmailMessage()
    message["From"] = "Alice <alice@example.com>"
    message["To"] = "bob@example.org"
    message["Subject"] = "structure"
    build(message)
    return message.as_bytes(policy=SMTP)


def test_translate_html_and_text_alternative() -> None:
    def build(m: EmailMessage) -> None:
        m.set_content("plain\n")
        m.add_alternative("<p>rich</p>\n", subtype="html")

    body = translate(outbound(mime(build)))
    assert body["text"] == "plain\n"
    assert body["html"] == "<p>rich</p>\n"
    assert "attachments" not in body


def test_translate_html_only() -> None:
    body = translate(outbound(mime(lambda m: m.set_content("<b>hi</b>\n", subtype="html"))))
    assert body["html"] == "<b>hi</b>\n"
    assert body["text"] == ""  # no plain text made up by Resend


PDF = b"%PDF-1.4\n\x00\xff binary"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00data"


def test_translate_attachments_survive() -> None:
    def build(m: EmailMessage) -> None:
        m.set_content("see attached\n")
        m.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
        m.add_attachment("a,b\n1,2\n", subtype="csv", filename="naïve data.csv")
        m.add_attachment(b"\x01\x02", maintype="application", subtype="octet-stream")

    body = translate(outbound(mime(build)))
    assert body["text"] == "see attached\n"
    assert body["attachments"] == [
        {
            "content": base64.b64encode(PDF).decode(),
            "filename": "report.pdf",
            "content_type": "application/pdf",
        },
        {
            "content": base64.b64encode(b"a,b\r\n1,2\r\n").decode(),
            "filename": "naïve data.csv",
            "content_type": "text/csv",
        },
        {
            "content": base64.b64encode(b"\x01\x02").decode(),
            "filename": "part-3.bin",
            "content_type": "application/octet-stream",
        },
    ]


def test_translate_inline_image_keeps_content_id() -> None:
    def build(m: EmailMessage) -> None:
        m.set_content("plain\n")
        m.add_alternative('<img src="cid:logo@example.com">\n', subtype="html")
        html = list(m.iter_parts())[1]
        html.add_related(PNG, "image", "png", cid="<logo@example.com>", filename="logo.png")

    body = translate(outbound(mime(build)))
    assert body["html"] == '<img src="cid:logo@example.com">\n'
    assert body["attachments"] == [
        {
            "content": base64.b64encode(PNG).decode(),
            "filename": "logo.png",
            "content_type": "image/png",
            "content_id": "logo@example.com",
        }
    ]


def test_translate_attached_message_stays_whole() -> None:
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner body\n")

    def build(m: EmailMessage) -> None:
        m.set_content("fwd\n")
        m.add_attachment(inner)

    body = translate(outbound(mime(build)))
    assert body["text"] == "fwd\n"
    [attached] = body["attachments"]
    assert attached["content_type"] == "message/rfc822"
    assert attached["filename"] == "message-1.eml"
    data = base64.b64decode(attached["content"])
    assert b"Subject: forwarded\r\n" in data
    assert data.endswith(b"inner body\r\n")


# --- the channel against a fake Resend ----------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeResend]:
    with FakeResend() as server:
        yield server


def config_for(url: str, **domain_tokens: str) -> ResendConfig:
    return ResendConfig(
        token=Secret("re_global"),
        domain_tokens={k: Secret(v) for k, v in domain_tokens.items()},
        api_url=url,
    )


def deliver(
    config: ResendConfig, *messages: Outbound, timeout: float = 5.0
) -> list[Delivery | DeliveryError]:
    """Each message through one channel (one client, as the relay runs it)."""

    async def run() -> list[Delivery | DeliveryError]:
        channel = ResendChannel(config, timeout=timeout)
        outcomes: list[Delivery | DeliveryError] = []
        try:
            for message in messages:
                try:
                    outcomes.append(await channel.deliver(message))
                except DeliveryError as exc:
                    outcomes.append(exc)
        finally:
            await channel.aclose()
        return outcomes

    return asyncio.run(run())


MESSAGE = simple(
    'From: "Alice" <alice@example.com>\nTo: bob@example.org\nSubject: hello\n'
    "Message-ID: <m1@example.com>\nX-Mailer: test"
)


def test_delivered_and_what_reached_resend(fake: FakeResend) -> None:
    message = outbound(MESSAGE, ("bob@example.org", "carol@example.org"))
    [result] = deliver(config_for(fake.url), message)

    assert isinstance(result, Delivery)
    assert result.accepted == ("bob@example.org", "carol@example.org")
    assert result.refused == {}
    [sent] = fake.sent
    assert result.upstream_id == sent.id
    request = sent.request
    assert (request.method, request.path) == ("POST", "/emails")
    assert request.headers["authorization"] == "Bearer re_global"
    assert request.headers["content-type"] == "application/json"
    # Written out, not computed by `translate`: the code under test is no oracle.
    assert request.json == {
        "from": "Alice <alice@example.com>",
        "to": ["bob@example.org"],
        "bcc": ["carol@example.org"],
        "subject": "hello",
        "text": "hello\n",
        "headers": {"Message-ID": "<m1@example.com>", "X-Mailer": "test"},
    }


def test_8bit_headers_reach_resend_as_valid_json(fake: FakeResend) -> None:
    message = outbound(b"From: J\xf6rg <alice@example.com>\r\nTo: bob@example.org\r\n\r\nx\r\n")
    [result] = deliver(config_for(fake.url), message)
    assert isinstance(result, Delivery)
    assert fake.sent[0].json["from"] == "J\ufffdrg <alice@example.com>"


@pytest.mark.parametrize(
    ("sender", "token"),
    [
        ("alice@example.com", "re_domain"),
        ("alice@EXAMPLE.com", "re_domain"),
        ("alice@other.example.com", "re_global"),
        ("alice@example.org", "re_global"),
    ],
)
def test_per_domain_token(fake: FakeResend, sender: str, token: str) -> None:
    config = config_for(fake.url, EXAMPLE_COM="re_domain")
    [result] = deliver(config, outbound(MESSAGE, sender=sender))
    assert isinstance(result, Delivery)
    assert fake.requests[0].headers["authorization"] == f"Bearer {token}"


def test_no_token_for_domain_defers_without_a_request(fake: FakeResend) -> None:
    config = ResendConfig(domain_tokens={"EXAMPLE_ORG": Secret("re_org")}, api_url=fake.url)
    [result] = deliver(config, outbound(MESSAGE))
    assert isinstance(result, TransientDelivery)
    assert (result.reply.code, result.reply.enhanced) == (451, "4.3.0")
    assert result.reply.text == "resend: no API token for example.com"
    assert fake.requests == []


def test_idempotency_key_is_stable_across_a_retry(fake: FakeResend) -> None:
    message = outbound(MESSAGE)
    first, second = deliver(config_for(fake.url), message, message)
    [third] = deliver(config_for(fake.url), message)  # a new channel, as after a restart

    assert isinstance(first, Delivery) and isinstance(second, Delivery)
    assert isinstance(third, Delivery)
    keys = {r.headers["idempotency-key"] for r in fake.requests}
    assert keys == {f"relay-{KEY}"}
    assert first.upstream_id == second.upstream_id == third.upstream_id
    assert len(fake.requests) == 3
    assert len(fake.sent) == 1


def test_another_message_gets_another_key(fake: FakeResend) -> None:
    deliver(config_for(fake.url), outbound(MESSAGE), outbound(MESSAGE, key="cd" * 32))
    assert len({r.headers["idempotency-key"] for r in fake.requests}) == 2
    assert len(fake.sent) == 2


def test_one_connection_kept_alive(fake: FakeResend) -> None:
    deliver(config_for(fake.url), outbound(MESSAGE), outbound(MESSAGE, key="cd" * 32))
    assert len({r.peer for r in fake.requests}) == 1


VALIDATION = "The example.com domain is not verified. Please, add and verify your domain"
# (status, name, message, retry-after) -> (error class, code, enhanced, text)
OUTCOMES: list[tuple[str, int, str, str | None, str | None, type, int, str, str]] = [
    (
        "429 with retry-after",
        429,
        "rate_limit_exceeded",
        None,
        "30",
        TransientDelivery,
        451,
        "4.7.0",
        "resend: rate limited; retry after 30 s",
    ),
    (
        "429 daily quota",
        429,
        "daily_quota_exceeded",
        None,
        None,
        TransientDelivery,
        451,
        "4.7.0",
        "resend: daily quota exceeded",
    ),
    (
        "429 monthly quota, date retry-after",
        429,
        "monthly_quota_exceeded",
        None,
        "Wed, 21 Oct 2037 07:28:00 GMT",
        TransientDelivery,
        451,
        "4.7.0",
        "resend: monthly quota exceeded",
    ),
    (
        "401 missing key",
        401,
        "missing_api_key",
        None,
        None,
        TransientDelivery,
        451,
        "4.3.0",
        "resend: upstream rejected relay credentials",
    ),
    (
        "401 restricted key",
        401,
        "restricted_api_key",
        None,
        None,
        TransientDelivery,
        451,
        "4.3.0",
        "resend: upstream rejected relay credentials",
    ),
    (
        "403 invalid key",
        403,
        "invalid_api_key",
        None,
        None,
        TransientDelivery,
        451,
        "4.3.0",
        "resend: upstream rejected relay credentials",
    ),
    (
        "403 unverified domain",
        403,
        "validation_error",
        VALIDATION,
        None,
        PermanentDelivery,
        550,
        "5.7.1",
        f"resend: {VALIDATION}",
    ),
    (
        "422 invalid attachment",
        422,
        "invalid_attachment",
        None,
        None,
        PermanentDelivery,
        554,
        "5.6.0",
        "resend: Attachment must have either a content or path.",
    ),
    (
        "422 invalid attachment, no message",
        422,
        "invalid_attachment",
        "",
        None,
        PermanentDelivery,
        554,
        "5.6.0",
        "resend: invalid attachment",
    ),
    (
        "422 missing field",
        422,
        "missing_required_field",
        "Missing `subject` field.",
        None,
        PermanentDelivery,
        554,
        "5.6.0",
        "resend: Missing subject field.",
    ),
    (
        "422 invalid recipient",
        422,
        "validation_error",
        "Invalid `to` field. The email address needs to follow the `email@example.com` format.",
        None,
        PermanentDelivery,
        550,
        "5.1.3",
        "resend: Invalid to field. The email address needs to follow the email@example.com format.",
    ),
    (
        "422 invalid from",
        422,
        "invalid_from_address",
        "Invalid `from` field.",
        None,
        PermanentDelivery,
        550,
        "5.1.7",
        "resend: Invalid from field.",
    ),
    (
        "400 multi-line message",
        400,
        "validation_error",
        'bad\r\nrequest {"x": 1}',
        None,
        PermanentDelivery,
        554,
        "5.6.0",
        'resend: bad request {"x": 1}',
    ),
    (
        "409 concurrent request",
        409,
        "concurrent_idempotent_requests",
        None,
        None,
        TransientDelivery,
        451,
        "4.3.0",
        "resend: idempotent request conflict",
    ),
    (
        "500",
        500,
        "internal_server_error",
        None,
        None,
        TransientDelivery,
        451,
        "4.3.0",
        "resend: upstream error (HTTP 500)",
    ),
]


@pytest.mark.parametrize(
    ("status", "name", "message", "retry_after", "error", "code", "enhanced", "text"),
    [case[1:] for case in OUTCOMES],
    ids=[case[0] for case in OUTCOMES],
)
def test_error_outcomes(
    fake: FakeResend,
    status: int,
    name: str,
    message: str | None,
    retry_after: str | None,
    error: type,
    code: int,
    enhanced: str,
    text: str,
) -> None:
    fake.fail(status, name, message, retry_after=retry_after)
    [result] = deliver(config_for(fake.url), outbound(MESSAGE))
    assert type(result) is error
    assert isinstance(result, DeliveryError)
    assert (result.reply.code, result.reply.enhanced, result.reply.text) == (code, enhanced, text)
    assert result.channel == "resend"
    assert fake.sent == []


@pytest.mark.parametrize(
    ("status", "body", "text"),
    [
        (502, "<html><body>Bad gateway</body></html>", "resend: unexpected reply (HTTP 502)"),
        (403, "<html>Forbidden</html>", "resend: unexpected reply (HTTP 403)"),
        (422, "not json", "resend: unexpected reply (HTTP 422)"),
        (200, "<html>ok?</html>", "resend: unexpected reply (HTTP 200)"),
        (200, {"object": "email"}, "resend: unexpected reply (HTTP 200)"),
    ],
)
def test_unexpected_bodies_defer(fake: FakeResend, status: int, body: Any, text: str) -> None:
    fake.script(status, body)
    [result] = deliver(config_for(fake.url), outbound(MESSAGE))
    assert isinstance(result, TransientDelivery)
    assert (result.reply.code, result.reply.enhanced, result.reply.text) == (451, "4.3.0", text)


def test_the_fakes_own_checks_reach_the_client_cleanly() -> None:
    with FakeResend(tokens={"re_good"}) as server:
        [result] = deliver(config_for(server.url), outbound(MESSAGE))
    assert isinstance(result, TransientDelivery)
    assert str(result.reply) == "451 4.3.0 resend: upstream rejected relay credentials"


def test_rejected_credentials_logged_without_the_token(
    fake: FakeResend, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail(403, "invalid_api_key")
    with caplog.at_level(logging.INFO, logger="relay.resend"):
        deliver(config_for(fake.url), outbound(MESSAGE))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "example.com" in errors[0].getMessage()
    assert "re_global" not in caplog.text


def test_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    [result] = deliver(config_for(f"http://127.0.0.1:{port}"), outbound(MESSAGE))
    assert isinstance(result, TransientDelivery)
    assert isinstance(result.__cause__, Exception)
    assert str(result.reply) == "451 4.3.0 resend: upstream unreachable (connection failed)"


def test_timeout(fake: FakeResend) -> None:
    fake.script(200, {"id": "late"}, delay=30)
    [result] = deliver(config_for(fake.url), outbound(MESSAGE), timeout=0.2)
    assert isinstance(result, TransientDelivery)
    assert str(result.reply) == "451 4.3.0 resend: upstream timed out"


def test_bad_api_url_defers() -> None:
    [result] = deliver(config_for("ftp://127.0.0.1"), outbound(MESSAGE))
    assert isinstance(result, TransientDelivery)
    assert str(result.reply) == "451 4.3.0 resend: RESEND_API_URL is not a usable URL"


# Every published (status, name), its documented message, and what the client is
# answered: (code, enhanced, text, logged as the relay's configuration fault).
CREDENTIALS = (451, "4.3.0", "resend: upstream rejected relay credentials", True)
ERROR_TABLE: dict[tuple[int, str], tuple[int, str, str, bool]] = {
    (400, "invalid_idempotency_key"): (451, "4.3.0", "resend: idempotency key refused", True),
    (400, "validation_error"): (
        554,
        "5.6.0",
        "resend: We found an error with one or more fields in the request.",
        False,
    ),
    (401, "missing_api_key"): CREDENTIALS,
    (401, "restricted_api_key"): CREDENTIALS,
    (403, "invalid_api_key"): CREDENTIALS,
    (403, "validation_error"): (
        550,
        "5.7.1",
        "resend: We found an error with one or more fields in the request.",
        False,
    ),
    (404, "not_found"): (451, "4.3.0", "resend: RESEND_API_URL has no /emails", True),
    (405, "method_not_allowed"): (451, "4.3.0", "resend: RESEND_API_URL has no /emails", True),
    (409, "invalid_idempotent_request"): (
        554,
        "5.0.0",
        "resend: Same idempotency key used with a different request payload.",
        False,
    ),
    (409, "concurrent_idempotent_requests"): (
        451,
        "4.3.0",
        "resend: idempotent request conflict",
        False,
    ),
    (422, "invalid_attachment"): (
        554,
        "5.6.0",
        "resend: Attachment must have either a content or path.",
        False,
    ),
    (422, "invalid_from_address"): (550, "5.1.7", "resend: Invalid from field.", False),
    (422, "invalid_parameter"): (
        550,
        "5.1.3",
        "resend: The to field must be a valid email address.",
        False,
    ),
    (422, "missing_required_field"): (
        554,
        "5.6.0",
        "resend: The request body is missing one or more required fields.",
        False,
    ),
    (422, "invalid_access"): (451, "4.3.0", "resend: unexpected reply (invalid_access)", False),
    (422, "invalid_region"): (451, "4.3.0", "resend: unexpected reply (invalid_region)", False),
    (429, "rate_limit_exceeded"): (451, "4.7.0", "resend: rate limited; retry after 30 s", False),
    (429, "daily_quota_exceeded"): (
        451,
        "4.7.0",
        "resend: daily quota exceeded; retry after 30 s",
        False,
    ),
    (429, "monthly_quota_exceeded"): (
        451,
        "4.7.0",
        "resend: monthly quota exceeded; retry after 30 s",
        False,
    ),
    (451, "security_error"): (
        550,
        "5.7.1",
        "resend: We may have found a security issue with the request.",
        False,
    ),
    (500, "application_error"): (451, "4.3.0", "resend: upstream error (HTTP 500)", False),
    (500, "internal_server_error"): (451, "4.3.0", "resend: upstream error (HTTP 500)", False),
}


def test_the_error_table_covers_every_published_error() -> None:
    assert set(ERROR_TABLE) == set(ERRORS)
    assert {name for _, name in ERRORS} == set(RESEND_ERRORS)
    assert all(
        RESEND_ERRORS[name][0] == status for status, name in ERRORS if name != "validation_error"
    )


@pytest.mark.parametrize(
    ("status", "name"), list(ERROR_TABLE), ids=[f"{s}-{n}" for s, n in ERROR_TABLE]
)
def test_error_table_row(status: int, name: str) -> None:
    code, enhanced, text, config = ERROR_TABLE[(status, name)]
    body = resend_error(status, name)
    reply = outcome(status, body, "30")
    assert (reply.code, reply.enhanced, reply.text) == (code, enhanced, text)
    assert is_config_fault(status, body) is config


@pytest.mark.parametrize(
    ("status", "name"),
    [(404, "not_found"), (403, "invalid_api_key"), (422, "invalid_from_address")],
)
def test_config_faults_are_logged_as_errors_and_refusals_as_warnings(
    fake: FakeResend, caplog: pytest.LogCaptureFixture, status: int, name: str
) -> None:
    fake.fail(status, name)
    with caplog.at_level(logging.WARNING, logger="relay.resend"):
        [result] = deliver(config_for(fake.url), outbound(MESSAGE))
    assert isinstance(result, DeliveryError)
    expected = "ERROR" if ERROR_TABLE[(status, name)][3] else "WARNING"
    assert [r.levelname for r in caplog.records] == [expected]


# --- pacing against a rate-enforcing fake ---------------------------------------


def deliver_together(
    channel_config: ResendConfig, messages: list[Outbound], *, timeout: float
) -> list[Delivery | DeliveryError]:
    """All messages at once through one channel, as concurrent sessions send them."""

    async def run() -> list[Delivery | DeliveryError]:
        channel = ResendChannel(channel_config, timeout=timeout)

        async def one(message: Outbound) -> Delivery | DeliveryError:
            try:
                return await channel.deliver(message)
            except DeliveryError as exc:
                return exc

        try:
            return list(await asyncio.gather(*(one(m) for m in messages)))
        finally:
            await channel.aclose()

    return asyncio.run(run())


def keyed(count: int) -> list[Outbound]:
    return [outbound(MESSAGE, key=f"{i:064x}") for i in range(count)]


def test_paced_to_the_rate_every_message_is_delivered(fake: FakeResend) -> None:
    fake.rate = 10
    config = replace(config_for(fake.url), rate_limit=10)
    results = deliver_together(config, keyed(20), timeout=5)
    assert all(isinstance(r, Delivery) for r in results)
    assert len(fake.sent) == 20
    assert len({e.request.headers["idempotency-key"] for e in fake.sent}) == 20


def test_a_429_is_retried_under_the_same_key_when_the_budget_covers(fake: FakeResend) -> None:
    fake.fail(429, "rate_limit_exceeded", retry_after="1")
    [result] = deliver(config_for(fake.url), outbound(MESSAGE), timeout=5)
    assert isinstance(result, Delivery)
    assert [r.headers["idempotency-key"] for r in fake.requests] == [f"relay-{KEY}"] * 2
    assert len(fake.sent) == 1


def test_when_the_budget_cannot_cover_the_wait_the_client_is_told_when(
    fake: FakeResend,
) -> None:
    fake.rate = 1  # the team's real limit, below what the relay was told
    config = replace(config_for(fake.url), rate_limit=100)
    results = deliver_together(config, keyed(3), timeout=0.5)  # a 1 s budget
    delivered = [r for r in results if isinstance(r, Delivery)]
    deferred = [r for r in results if isinstance(r, DeliveryError)]
    assert len(delivered) == len(fake.sent) == 1
    assert [str(r.reply) for r in deferred] == [
        "451 4.7.0 resend: rate limited; retry after 1 s"
    ] * 2
    assert fake.throttled == 2


def test_each_worker_paces_at_its_share() -> None:
    config = replace(config_for("http://127.0.0.1:9"), rate_limit=10)

    async def rate() -> float:
        channel = ResendChannel(config, timeout=1, workers=4)
        await channel.aclose()
        return channel.rate

    assert asyncio.run(rate()) == 2.5


# --- the body as the client composed it -----------------------------------------


def test_html_only_arrives_html_only(fake: FakeResend) -> None:
    content = (
        "From: alice@example.com\nTo: bob@example.org\nSubject: hi\n"
        "Content-Type: text/html; charset=utf-8\n\n<p>hello</p>\n"
    )
    [result] = deliver(config_for(fake.url), outbound(content))
    assert isinstance(result, Delivery)
    sent = fake.sent[0].json
    assert (sent["html"], sent["text"]) == ("<p>hello</p>\n", "")


def test_attachments_only_and_no_subject_are_sent_as_composed(fake: FakeResend) -> None:
    attachment = base64.b64encode(b"%PDF-1.4").decode()
    content = (
        "From: alice@example.com\nTo: bob@example.org\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b"\n\n'
        "--b\nContent-Type: application/pdf\n"
        'Content-Disposition: attachment; filename="a.pdf"\n'
        f"Content-Transfer-Encoding: base64\n\n{attachment}\n--b--\n"
    )
    [result] = deliver(config_for(fake.url), outbound(content))
    assert isinstance(result, Delivery)
    sent = fake.sent[0].json
    # SendEmailRequest requires from, to and subject only (resend-openapi).
    assert sent["subject"] == "(no subject)"
    assert "html" not in sent and "text" not in sent
    assert [(a["filename"], a["content"]) for a in sent["attachments"]] == [("a.pdf", attachment)]


def test_a_malformed_key_is_the_operators_fault(
    fake: FakeResend, caplog: pytest.LogCaptureFixture
) -> None:
    # Resend answers a malformed Authorization header 400 `validation_error`,
    # "API key is invalid": the relay's key, so 451 and an error, not 554 5.6.0.
    config = replace(config_for(fake.url), token=Secret("re_half pasted"))
    with caplog.at_level(logging.WARNING, logger="relay.resend"):
        [result] = deliver(config, outbound(MESSAGE))
    assert isinstance(result, TransientDelivery), result
    assert fake.requests, result.reply
    assert str(result.reply) == "451 4.3.0 resend: upstream rejected relay credentials"
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert fake.sent == []
    body = resend_error(400, "validation_error", "API key is invalid")
    assert is_config_fault(400, body)
    # Any other 400 validation_error stays the message's.
    assert not is_config_fault(400, resend_error(400, "validation_error"))


@pytest.mark.parametrize("missing", ["from", "to", "subject"])
def test_the_fake_requires_what_the_schema_requires(fake: FakeResend, missing: str) -> None:
    # resend-openapi resend.yaml SendEmailRequest: required [from, to, subject].
    body = {"from": "a@example.com", "to": ["b@example.org"], "subject": "s"}
    for absent in ({k: v for k, v in body.items() if k != missing}, {**body, missing: ""}):
        response = httpx.post(
            f"{fake.url}/emails", json=absent, headers={"Authorization": "Bearer re_x"}
        )
        assert response.status_code == 422
        assert response.json()["name"] == "missing_required_field"
    assert httpx.post(
        f"{fake.url}/emails", json=body, headers={"Authorization": "Bearer re_x"}
    ).is_success
    assert fake.sent[0].json == body  # neither text nor html is required


def test_keys_of_one_team_share_its_rate(fake: FakeResend) -> None:
    # Resend limits a team across all its API keys (api-reference/rate-limit); the
    # fake counts every request alike. By default every key is of one team.
    fake.rate = 10
    config = replace(config_for(fake.url, EXAMPLE_ORG="re_org"), rate_limit=10)
    messages = keyed(10) + [
        outbound(MESSAGE, sender="alice@example.org", key=f"{i + 100:064x}") for i in range(10)
    ]
    results = deliver_together(config, messages, timeout=5)
    assert all(isinstance(r, Delivery) for r in results)
    assert {e.request.headers["authorization"] for e in fake.sent} == {
        "Bearer re_global",
        "Bearer re_org",
    }


def test_resend_teams_setting() -> None:
    from relay.config import load_settings
    from relay.errors import ConfigError

    env = {"RESEND_TOKEN": "re_a", "RESEND_TOKEN_EXAMPLE_ORG": "re_b", "RESEND_TOKEN_B_COM": "c"}
    default = load_settings(env).resend
    assert {default.team_for(d) for d in ("example.com", "example.org", "b.com")} == {"default"}
    teams = load_settings({**env, "RESEND_TEAMS": "RESEND_TOKEN, resend_token_b_com;"
                           "RESEND_TOKEN_EXAMPLE_ORG"}).resend  # fmt: skip
    assert [teams.team_for(d) for d in ("example.com", "b.com", "example.org")] == [
        "team-1",
        "team-1",
        "team-2",
    ]
    for bad, words in [
        ("RESEND_TOKEN_NOPE", "names no configured Resend key"),
        ("RESEND_TOKEN;RESEND_TOKEN", "is in two teams"),
    ]:
        with pytest.raises(ConfigError, match=words) as caught:
            load_settings({**env, "RESEND_TEAMS": bad})
        assert "re_a" not in str(caught.value)


def test_one_bucket_per_team_not_per_key(fake: FakeResend) -> None:
    config = config_for(fake.url, EXAMPLE_ORG="re_org")
    separate = replace(config, teams={"": "team-1", "EXAMPLE_ORG": "team-2"})
    for teams, expected in ((config, {"default"}), (separate, {"team-1", "team-2"})):

        async def run(c: ResendConfig = teams) -> set[str]:
            channel = ResendChannel(c, timeout=5)
            try:
                await channel.deliver(outbound(MESSAGE, key="a" * 64))
                await channel.deliver(outbound(MESSAGE, sender="al@example.org", key="b" * 64))
                return set(channel._buckets)
            finally:
                await channel.aclose()

        assert asyncio.run(run()) == expected
