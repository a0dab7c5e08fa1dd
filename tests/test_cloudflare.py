"""The Cloudflare channel: outcomes as a table, delivery against a fake Cloudflare."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from email import policy
from email.parser import BytesParser
from typing import Any

import pytest
from support import free_port

from relay.channels.base import Delivery, Outbound, delivered_reply
from relay.channels.cloudflare import ERRORS as CODES
from relay.channels.cloudflare import (
    PERMANENT_BOUNCE,
    CloudflareChannel,
    outcome,
    per_recipient,
    sent_message_id,
)
from relay.errors import DeliveryError, PermanentDelivery, TransientDelivery
from relay.policy import max_forwardable
from relay.replies import Reply
from relay.upstreams import CloudflareConfig, Secret
from tests.fake_upstreams import CLOUDFLARE_ERRORS, FakeCloudflare, cloudflare_error

CONTENT = (
    "From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: caf\u00e9\r\n"
    "Message-ID: <m1@example.com>\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\nbonjour \u00e0 tous\r\n"
).encode()


def outbound(
    recipients: tuple[str, ...] = ("bob@example.org",), content: bytes = CONTENT
) -> Outbound:
    return Outbound("alice@example.com", recipients, content, "<m1@example.com>", "ab" * 32)


@pytest.fixture
def fake() -> Iterator[FakeCloudflare]:
    with FakeCloudflare(account_id="acct-1", token="cf-token") as server:
        yield server


def config_for(url: str, token: str = "cf-token") -> CloudflareConfig:
    return CloudflareConfig(account_id="acct-1", api_token=Secret(token), api_url=url)


def deliver(
    config: CloudflareConfig, *messages: Outbound, timeout: float = 5.0
) -> list[Delivery | DeliveryError]:
    async def run() -> list[Delivery | DeliveryError]:
        channel = CloudflareChannel(config, timeout=timeout)
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


# --- pure: per-recipient results and error bodies ------------------------------

RECIPIENTS = ("bob@example.org", "Carol@example.org", "dave@example.org")
PER_RECIPIENT: list[tuple[str, Any, tuple[str, ...], tuple[str, ...]]] = [
    (
        "all delivered",
        {"delivered": list(RECIPIENTS), "queued": [], "permanent_bounces": []},
        RECIPIENTS,
        (),
    ),
    (
        "queued counts as taken",
        {"delivered": ["bob@example.org"], "queued": ["Carol@example.org", "dave@example.org"]},
        RECIPIENTS,
        (),
    ),
    (
        "bounce matched case-insensitively",
        {
            "delivered": ["bob@example.org", "dave@example.org"],
            "permanent_bounces": ["carol@EXAMPLE.org"],
        },
        ("bob@example.org", "dave@example.org"),
        ("Carol@example.org",),
    ),
    (
        "all bounced",
        {"permanent_bounces": list(RECIPIENTS)},
        (),
        RECIPIENTS,
    ),
    (
        "result without lists: success means taken",
        None,
        RECIPIENTS,
        (),
    ),
]


@pytest.mark.parametrize(
    ("result", "accepted", "refused"),
    [case[1:] for case in PER_RECIPIENT],
    ids=[case[0] for case in PER_RECIPIENT],
)
def test_per_recipient(result: Any, accepted: tuple[str, ...], refused: tuple[str, ...]) -> None:
    delivery = per_recipient(outbound(RECIPIENTS), result)
    assert delivery.accepted == accepted
    assert dict(delivery.refused) == {r: PERMANENT_BOUNCE for r in refused}


CREDENTIALS = (451, "4.3.0", "cloudflare: upstream rejected relay credentials", True)
# Every published code, answered with its documented status and message, and a
# retry-after of 60: what the client is answered, and whether it is logged as
# the relay's configuration fault.
ERROR_TABLE: dict[int, tuple[int, str, str, bool]] = {
    10000: (451, "4.3.0", "cloudflare: CLOUDFLARE_API_URL or account id not found", True),
    10001: (554, "5.6.0", "cloudflare: invalid request", False),
    10002: (451, "4.3.0", "cloudflare: upstream error (HTTP 500)", False),
    10003: (451, "4.3.0", "cloudflare: operation not implemented", True),
    10004: (451, "4.7.0", "cloudflare: rate limited; retry after 60 s", False),
    10100: (451, "4.3.0", "cloudflare: authentication service unavailable", False),
    10101: CREDENTIALS,
    10102: (451, "4.3.0", "cloudflare: API token lacks the email sending permission", True),
    10103: CREDENTIALS,
    10105: (451, "4.3.0", "cloudflare: account not entitled to Email Sending", True),
    10200: (552, "5.3.4", "cloudflare: message too big", False),
    10201: (451, "4.3.0", "cloudflare: request without content length", True),
    10202: (554, "5.6.0", "cloudflare: invalid email content", False),
    10203: (451, "4.3.0", "cloudflare: sending disabled for this domain or account", True),
}


def test_the_error_table_covers_every_published_code() -> None:
    assert set(ERROR_TABLE) == set(CODES) == set(CLOUDFLARE_ERRORS)


@pytest.mark.parametrize("error_code", list(ERROR_TABLE))
def test_error_table_row(
    fake: FakeCloudflare, caplog: pytest.LogCaptureFixture, error_code: int
) -> None:
    code, enhanced, text, config = ERROR_TABLE[error_code]
    status = CLOUDFLARE_ERRORS[error_code][0]
    fake.fail(status, error_code, retry_after="60")
    with caplog.at_level(logging.WARNING, logger="relay.cloudflare"):
        [result] = deliver(config_for(fake.url), outbound())
    assert isinstance(result, DeliveryError)
    assert type(result) is (PermanentDelivery if code >= 500 else TransientDelivery)
    assert (result.reply.code, result.reply.enhanced, result.reply.text) == (code, enhanced, text)
    assert [r.levelname for r in caplog.records] == ["ERROR" if config else "WARNING"]
    assert fake.sent == []


# Codes under another status than documented, and codes not published.
ERRORS: list[tuple[str, int, int | None, str, str | None, int, str, str]] = [
    ("10004 under 200", 200, 10004, "Throttled", None, 451, "4.7.0", "cloudflare: rate limited"),
    (
        "10203 under 200",
        200,
        10203,
        "Sending disabled",
        None,
        451,
        "4.3.0",
        "cloudflare: sending disabled for this domain or account",
    ),
    (
        "429 without a code",
        429,
        None,
        "",
        "5",
        451,
        "4.7.0",
        "cloudflare: rate limited; retry after 5 s",
    ),
    (
        "400 unknown code",
        400,
        99999,
        "Something else",
        None,
        554,
        "5.6.0",
        "cloudflare: message refused",
    ),
    (
        "403 unpublished 10104",
        403,
        10104,
        "email.sending.error.authentication.something",
        None,
        451,
        "4.3.0",
        "cloudflare: upstream rejected relay credentials",
    ),
    (
        "200 success false, unknown code",
        200,
        12345,
        "?",
        None,
        451,
        "4.3.0",
        "cloudflare: unexpected reply (HTTP 200)",
    ),
    (
        "404 wrong account, generic v4 code",
        404,
        7003,
        "Could not route",
        None,
        451,
        "4.3.0",
        "cloudflare: unexpected reply (HTTP 404)",
    ),
]


@pytest.mark.parametrize(
    ("status", "error_code", "message", "retry_after", "code", "enhanced", "text"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_error_outcomes(
    fake: FakeCloudflare,
    status: int,
    error_code: int | None,
    message: str,
    retry_after: str | None,
    code: int,
    enhanced: str,
    text: str,
) -> None:
    if error_code is None:
        fake.script(status, {"success": False, "errors": []}, {"retry-after": retry_after or ""})
    else:
        fake.fail(status, error_code, message, retry_after=retry_after)
    [result] = deliver(config_for(fake.url), outbound())
    assert isinstance(result, DeliveryError)
    assert type(result) is (PermanentDelivery if code >= 500 else TransientDelivery)
    assert (result.reply.code, result.reply.enhanced, result.reply.text) == (code, enhanced, text)
    assert result.channel == "cloudflare"
    assert fake.sent == []


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (502, "<html>Bad gateway</html>", "451 4.3.0 cloudflare: upstream error (HTTP 502)"),
        (200, "<html>ok?</html>", "451 4.3.0 cloudflare: unexpected reply (HTTP 200)"),
        (200, {"result": {"delivered": []}}, "451 4.3.0 cloudflare: unexpected reply (HTTP 200)"),
        (413, "Payload Too Large", "552 5.3.4 cloudflare: message too big"),
        (
            403,
            {"success": False, "errors": []},
            "451 4.3.0 cloudflare: upstream rejected relay credentials",
        ),
    ],
)
def test_unexpected_bodies(fake: FakeCloudflare, status: int, body: Any, expected: str) -> None:
    fake.script(status, body)
    [result] = deliver(config_for(fake.url), outbound())
    assert isinstance(result, DeliveryError)
    assert str(result.reply) == expected


def test_outcome_is_pure() -> None:
    body = cloudflare_error(10202)
    assert outcome(400, body, None) == Reply(554, "5.6.0", "cloudflare: invalid email content")


# --- the channel against a fake Cloudflare -----------------------------------


def test_delivered_and_what_reached_cloudflare(fake: FakeCloudflare) -> None:
    message = outbound(("bob@example.org", "carol@example.org"))
    [result] = deliver(config_for(fake.url), message)

    assert isinstance(result, Delivery)
    assert result.accepted == ("bob@example.org", "carol@example.org")
    assert result.refused == {}
    [request] = fake.sent
    assert (request.method, request.path) == ("POST", "/accounts/acct-1/email/sending/send_raw")
    assert request.headers["authorization"] == "Bearer cf-token"
    assert request.json == {
        "from": "alice@example.com",
        "recipients": ["bob@example.org", "carol@example.org"],
        "mime_message": CONTENT.decode(),
    }


def test_queued_recipients_are_accepted(fake: FakeCloudflare) -> None:
    fake.queue("carol@example.org")
    [result] = deliver(config_for(fake.url), outbound(("bob@example.org", "carol@example.org")))
    assert isinstance(result, Delivery)
    assert result.accepted == ("bob@example.org", "carol@example.org")


def test_partial_permanent_bounce(fake: FakeCloudflare) -> None:
    fake.bounce("carol@example.org")
    message = outbound(("bob@example.org", "carol@example.org", "dave@example.org"))
    [result] = deliver(config_for(fake.url), message)
    assert isinstance(result, Delivery)
    assert result.accepted == ("bob@example.org", "dave@example.org")
    assert dict(result.refused) == {
        "carol@example.org": Reply(550, "5.1.1", "cloudflare: permanent bounce")
    }


def test_all_bounced(fake: FakeCloudflare) -> None:
    fake.bounce("bob@example.org", "carol@example.org")
    [result] = deliver(config_for(fake.url), outbound(("bob@example.org", "carol@example.org")))
    assert isinstance(result, PermanentDelivery)
    assert str(result.reply) == "550 5.1.1 cloudflare: permanent bounce"
    assert fake.sent == []


def test_not_utf8_refused_before_sending(fake: FakeCloudflare) -> None:
    content = CONTENT.replace("caf\u00e9".encode(), b"caf\xe9")
    [result] = deliver(config_for(fake.url), outbound(content=content))
    assert isinstance(result, PermanentDelivery)
    assert str(result.reply) == (
        "554 5.6.0 cloudflare: header is neither ASCII nor UTF-8 (use RFC 2047 encoded words)"
    )
    assert fake.requests == []


LATIN1 = (
    b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n"
    b"Message-ID: <m1@example.com>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9 cr\xe8me\r\n"
    b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nd\xc3\xa9j\xc3\xa0 UTF-8\r\n"
    b"--b\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: binary\r\n\r\n\x00\xff\xfe\x80 bytes\r\n"
    b"--b--\r\n"
)


def test_8bit_parts_that_are_not_utf8_are_reencoded_and_sent(fake: FakeCloudflare) -> None:
    [result] = deliver(config_for(fake.url), outbound(content=LATIN1))
    assert isinstance(result, Delivery)
    [request] = fake.sent
    sent = request.json["mime_message"].encode("utf-8")
    parts = [p for p in BytesParser(policy=policy.default).parsebytes(sent).walk()][1:]
    assert [p["Content-Transfer-Encoding"] for p in parts] == [
        "quoted-printable",
        "8bit",  # already UTF-8: left as the client wrote it
        "base64",
    ]
    assert [p.get_payload(decode=True) for p in parts] == [
        # RFC 2046 section 5.1.1: the CRLF before a boundary belongs to the boundary.
        b"caf\xe9 cr\xe8me",
        "d\u00e9j\u00e0 UTF-8".encode(),
        b"\x00\xff\xfe\x80 bytes",
    ]
    assert sent.startswith(LATIN1.split(b"\r\n\r\n")[0])  # headers untouched


def test_wrong_token_is_a_config_fault_logged_without_the_token(
    fake: FakeCloudflare, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="relay.cloudflare"):
        [result] = deliver(config_for(fake.url, token="cf-wrong"), outbound())
    assert isinstance(result, TransientDelivery)
    assert str(result.reply) == "451 4.3.0 cloudflare: upstream rejected relay credentials"
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert "cf-wrong" not in caplog.text


def test_one_connection_kept_alive(fake: FakeCloudflare) -> None:
    deliver(config_for(fake.url), outbound(), outbound())
    assert len(fake.requests) == 2
    assert len({r.peer for r in fake.requests}) == 1


def test_connection_refused() -> None:
    [result] = deliver(config_for(f"http://127.0.0.1:{free_port()}"), outbound())
    assert isinstance(result, TransientDelivery)
    assert str(result.reply) == "451 4.3.0 cloudflare: upstream unreachable (connection failed)"


def test_timeout(fake: FakeCloudflare) -> None:
    fake.script(200, {"success": True, "result": {"delivered": ["bob@example.org"]}}, delay=30)
    [result] = deliver(config_for(fake.url), outbound(), timeout=0.2)
    assert isinstance(result, TransientDelivery)
    assert str(result.reply) == "451 4.3.0 cloudflare: upstream timed out"


def test_upstream_id_is_the_message_id_cloudflare_kept(fake: FakeCloudflare) -> None:
    [result] = deliver(config_for(fake.url), outbound())
    assert isinstance(result, Delivery)
    assert result.upstream_id == "<m1@example.com>"
    assert result.message_id == ""
    assert str(delivered_reply(outbound(), result)) == "250 2.0.0 Ok <m1@example.com>"


def test_a_message_id_cloudflare_replaced_is_the_one_the_client_is_told(
    fake: FakeCloudflare,
) -> None:
    fake.replace_message_id = True
    [result] = deliver(config_for(fake.url), outbound())
    assert isinstance(result, Delivery)
    assert result.upstream_id.endswith("@cloudflare-email.net>")
    assert result.message_id == result.upstream_id
    # What reached Cloudflare still carried the client's own.
    assert "Message-ID: <m1@example.com>" in fake.sent[0].json["mime_message"]
    assert str(delivered_reply(outbound(), result)) == f"250 2.0.0 Ok {result.upstream_id}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@b>", "<a@b>"),
        ("a@b", "<a@b>"),
        ("", ""),
        (None, ""),
        (42, ""),
        ("two words", ""),
        ("<a@b>\r\nX: y", ""),
    ],
)
def test_sent_message_id(value: object, expected: str) -> None:
    assert sent_message_id(value) == expected


@pytest.mark.parametrize(
    ("channel", "verified", "declared", "forwardable"),
    [
        ("cloudflare", False, 5 * 1024 * 1024 - 1024, True),
        ("cloudflare", False, 5 * 1024 * 1024 - 1023, False),
        ("cloudflare", False, 5 * 1024 * 1024, False),  # the relay's own maximum
        ("cloudflare", True, 5 * 1024 * 1024, True),
        ("resend", False, 5 * 1024 * 1024, True),
        ("smtp", False, 5 * 1024 * 1024, True),
        ("outbox", False, 5 * 1024 * 1024, True),
    ],
)
def test_max_forwardable(channel: str, verified: bool, declared: int, forwardable: bool) -> None:
    limit = max_forwardable(channel, verified=verified)
    assert (limit is None or declared <= limit) is forwardable


def test_what_max_forwardable_allows_cloudflare_takes(fake: FakeCloudflare) -> None:
    limit = max_forwardable("cloudflare")
    assert limit is not None
    head = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n\r\n"
    body = b"x" * (limit - len(head))
    # What message.prepare may add on top: a long Message-ID and a Date.
    added = b"Message-ID: <" + b"a" * 64 + b"@" + b"h" * 200 + b">\r\n"
    added += b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    [result] = deliver(config_for(fake.url), outbound(content=added + head + body))
    assert isinstance(result, Delivery)
    [over] = deliver(config_for(fake.url), outbound(content=added + head + body + b"x" * 1024))
    assert str(getattr(over, "reply", "")) == "552 5.3.4 cloudflare: message too big"


LIMIT = 5 * 1024 * 1024  # email-service/platform/limits.mdx, "Total message size"


def limited(content: bytes) -> Outbound:
    return Outbound(
        "alice@example.com", ("bob@example.org",), content, "<m1@example.com>", "k", LIMIT
    )


def test_size_is_measured_as_sent_crlf_escaped(fake: FakeCloudflare) -> None:
    # Under 5 MiB as MIME, over it once each CRLF travels as \r\n in the JSON string.
    head = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n\r\n"
    lines = (LIMIT - len(head) - 4096) // 10
    content = head + b"abcdefgh\r\n" * lines
    assert len(content) < LIMIT
    [result] = deliver(config_for(fake.url), limited(content))
    assert isinstance(result, PermanentDelivery)
    assert result.reply.code == 552 and result.reply.enhanced == "5.3.4"
    assert result.reply.text.startswith("cloudflare: message too big as sent (")
    assert fake.requests == []  # refused before the request, not after the upload


def test_size_counts_the_seven_bit_re_encoding(fake: FakeCloudflare) -> None:
    # 8-bit Latin-1 text is re-encoded quoted-printable for JSON: each octet
    # above 127 becomes three, so 2 MiB of it is over 5 MiB as sent.
    head = (
        b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    content = head + (b"\xe9" * 70 + b"\r\n") * (2 * 1024 * 1024 // 72)
    [result] = deliver(config_for(fake.url), limited(content))
    assert isinstance(result, PermanentDelivery)
    assert result.reply.code == 552
    assert fake.requests == []


def test_a_message_that_fits_as_sent_goes(fake: FakeCloudflare) -> None:
    head = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: s\r\n\r\n"
    content = head + b"x" * 900 + b"\r\n"
    [result] = deliver(config_for(fake.url), limited(content * 1))
    assert isinstance(result, Delivery)
    assert len(fake.sent) == 1


# --- the account's suppression list (concepts/suppressions.mdx) -------------------

SUPPRESSED_REPLY = "550 5.1.1 cloudflare: recipient on the provider's suppression list"


def test_a_suppressed_recipient_is_refused_and_the_rest_sent_once(fake: FakeCloudflare) -> None:
    fake.suppress("Carol@example.org", "soft_bounce")
    [result] = deliver(config_for(fake.url), outbound(("bob@example.org", "carol@example.org")))
    assert isinstance(result, Delivery)
    assert result.accepted == ("bob@example.org",)
    assert {r: str(v) for r, v in result.refused.items()} == {
        "carol@example.org": f"{SUPPRESSED_REPLY} (soft_bounce)"
    }
    assert [(r.method, r.path.split("?")[0].rsplit("/", 1)[1]) for r in fake.requests] == [
        ("POST", "send_raw"),
        ("GET", "suppressions"),
        ("GET", "suppressions"),
        ("POST", "send_raw"),
    ]
    [sent] = fake.sent
    assert sent.json["recipients"] == ["bob@example.org"]


def test_every_recipient_suppressed(fake: FakeCloudflare) -> None:
    fake.suppress("bob@example.org")
    fake.suppress("carol@example.org", "complaint")
    [result] = deliver(config_for(fake.url), outbound(("bob@example.org", "carol@example.org")))
    assert isinstance(result, PermanentDelivery)
    assert str(result.reply) == f"{SUPPRESSED_REPLY} (hard_bounce)"
    assert {r: str(v) for r, v in result.refused.items()} == {
        "bob@example.org": f"{SUPPRESSED_REPLY} (hard_bounce)",
        "carol@example.org": f"{SUPPRESSED_REPLY} (complaint)",
    }
    assert fake.sent == []


def test_suppression_list_unreadable(fake: FakeCloudflare) -> None:
    fake.suppress("bob@example.org")
    fake.script(400, fake.suppression_body)
    fake.script(403, cloudflare_error(10102))  # a token without the read permission
    [result] = deliver(config_for(fake.url), outbound())
    assert isinstance(result, PermanentDelivery)
    assert str(result.reply) == (
        "550 5.1.1 cloudflare: request refused; a recipient may be on the account's"
        " suppression list"
    )
    assert result.refused == {}  # no recipient named: none is recorded as suppressed
    assert fake.sent == []


def test_a_schema_400_with_no_suppressed_recipient_stays_a_content_error(
    fake: FakeCloudflare,
) -> None:
    fake.fail(400, 10001)
    [result] = deliver(config_for(fake.url), outbound())
    assert isinstance(result, PermanentDelivery)
    assert str(result.reply) == "554 5.6.0 cloudflare: invalid request"
    assert [r.method for r in fake.requests] == ["POST", "GET"]
