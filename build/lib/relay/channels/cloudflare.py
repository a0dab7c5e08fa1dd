"""The Cloudflare Email Service channel: the raw message through `send_raw`.

The message goes unchanged, with the envelope sender and recipients, so what
the client signed or composed is what arrives. Cloudflare answers per
recipient (`delivered`, `queued`, `permanent_bounces`) and may say
`success: false` under HTTP 200, so the body, not the status, decides.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import quopri
from collections.abc import Mapping
from dataclasses import replace
from email.parser import BytesParser
from email.policy import compat32
from urllib.parse import quote

from relay import replies
from relay.channels import httpapi
from relay.channels.base import Delivery, Outbound, all_refused, partial_delivery
from relay.channels.httpapi import ErrorRow, Kind
from relay.errors import DeliveryError, PermanentDelivery
from relay.replies import Refusal, Reply, one_line
from relay.upstreams import CloudflareConfig

log = logging.getLogger("relay.cloudflare")

NAME = "cloudflare"

PERMANENT_BOUNCE = replies.upstream_refused(NAME, Refusal.BOUNCE, "permanent bounce")
TOO_BIG = replies.upstream_refused(NAME, Refusal.TOO_BIG, "message too big")
NOT_UTF8 = replies.upstream_refused(
    NAME, Refusal.CONTENT, "header is neither ASCII nor UTF-8 (use RFC 2047 encoded words)"
)

SUPPRESSION_UNKNOWN = "request refused; a recipient may be on the account's suppression list"

# send_raw's error codes and what each means for the message. Codes, statuses and
# meanings: cloudflare-docs src/content/docs/email-service/api/send-emails/rest-api.mdx
# ("REST API error codes"). 10104 is not published; it falls to its HTTP status.
# Cloudflare's messages are machine names ("email.sending.error.email.invalid"),
# so the reply says what each means instead.
NOT_FOUND = 10000
SCHEMA_ERROR = 10001
INTERNAL_ERROR = 10002
NOT_IMPLEMENTED = 10003
THROTTLED = 10004
AUTH_UPSTREAM = 10100
UNAUTHORIZED = 10101
FORBIDDEN = 10102
BAD_TOKEN_TYPE = 10103
NOT_ENTITLED = 10105
TOO_BIG_ERROR = 10200
NO_CONTENT_LENGTH = 10201
INVALID_EMAIL = 10202
SENDING_DISABLED = 10203

ERRORS: Mapping[int, ErrorRow] = {
    NOT_FOUND: ErrorRow(Kind.CONFIG, words="CLOUDFLARE_API_URL or account id not found"),
    # The relay builds the request from addresses it checked: what is left is
    # the message's (an address Cloudflare reads differently).
    SCHEMA_ERROR: ErrorRow(Kind.REFUSED, Refusal.CONTENT, "invalid request"),
    INTERNAL_ERROR: ErrorRow(Kind.DEFERRED),
    NOT_IMPLEMENTED: ErrorRow(Kind.CONFIG, words="operation not implemented"),
    THROTTLED: ErrorRow(Kind.THROTTLED, words="rate limited"),
    AUTH_UPSTREAM: ErrorRow(Kind.DEFERRED, words="authentication service unavailable"),
    UNAUTHORIZED: ErrorRow(Kind.CREDENTIALS),
    BAD_TOKEN_TYPE: ErrorRow(Kind.CREDENTIALS),
    FORBIDDEN: ErrorRow(Kind.CONFIG, words="API token lacks the email sending permission"),
    NOT_ENTITLED: ErrorRow(Kind.CONFIG, words="account not entitled to Email Sending"),
    TOO_BIG_ERROR: ErrorRow(Kind.REFUSED, Refusal.TOO_BIG, "message too big"),
    # httpx always sends a Content-Length: this would be a relay fault.
    NO_CONTENT_LENGTH: ErrorRow(Kind.CONFIG, words="request without content length"),
    INVALID_EMAIL: ErrorRow(Kind.REFUSED, Refusal.CONTENT, "invalid email content"),
    # "Sending disabled for this zone or account" (HTTP 403): the account's or the
    # zone's state, which only the operator can change; the message itself is fine
    # and goes once sending is enabled again, so a 451 and an operator error.
    SENDING_DISABLED: ErrorRow(Kind.CONFIG, words="sending disabled for this domain or account"),
}


def error_row(status: int, body: object) -> ErrorRow | None:
    """The table's row for an answer; by HTTP status for a code not published."""
    code, _ = _first_error(body)
    row = ERRORS.get(code) if code is not None else None
    if row is not None:
        return row
    if status == 429:
        return ERRORS[THROTTLED]
    if status in (401, 403):
        return ERRORS[UNAUTHORIZED]
    if status == 413:
        return ERRORS[TOO_BIG_ERROR]
    if status == 400 and code is not None:
        return ErrorRow(Kind.REFUSED, Refusal.CONTENT, "message refused")
    if status == 400:
        # A 400 without a code: the suppression list's refusal, when the list
        # could not say which recipient (concepts/suppressions.mdx).
        return ErrorRow(Kind.REFUSED, Refusal.BOUNCE, SUPPRESSION_UNKNOWN)
    if status >= 500:
        return ErrorRow(Kind.DEFERRED)
    return None


def outcome(status: int, body: object, retry_after: str | None) -> Reply:
    """The reply a failed `send_raw` answer becomes (non-2xx, or `success: false`).

    Anything not documented as a refusal is a 4xx: the message may have gone
    out, and a client that sees 5xx does not retry.
    """
    row = error_row(status, body)
    if row is None:
        return httpapi.unexpected_reply(NAME, status)
    return httpapi.row_reply(NAME, row, status=status, detail="", retry_after=retry_after)


# The 400s that say what is wrong with the message itself; any other 400 may be
# the suppression list's, which has no code of its own.
_MESSAGE_FAULTS = frozenset({TOO_BIG_ERROR, NO_CONTENT_LENGTH, INVALID_EMAIL})


def _suppression_refusal(answer: httpapi.Answer) -> bool:
    code, _ = _first_error(answer.body)
    return answer.status == 400 and code not in _MESSAGE_FAULTS


def is_config_fault(status: int, body: object) -> bool:
    row = error_row(status, body)
    return row is not None and row.config_fault


def _first_error(body: object) -> tuple[int | None, str]:
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None, ""
    code = errors[0].get("code")
    message = errors[0].get("message")
    return (
        code if isinstance(code, int) else None,
        one_line(message) if isinstance(message, str) else "",
    )


def per_recipient(message: Outbound, result: object) -> Delivery:
    """The recipients Cloudflare took (delivered or queued) and those that bounced.

    `success: true` means Cloudflare took the message; a recipient it names in
    no list has no bounce to report, so it counts as taken.
    """
    lists = result if isinstance(result, dict) else {}

    def named(key: str) -> set[str]:
        value = lists.get(key)
        return (
            {a.lower() for a in value if isinstance(a, str)} if isinstance(value, list) else set()
        )

    bounced = named("permanent_bounces") - named("delivered") - named("queued")
    accepted = tuple(r for r in message.recipients if r.lower() not in bounced)
    refused = {r: PERMANENT_BOUNCE for r in message.recipients if r.lower() in bounced}
    upstream_id = sent_message_id(lists.get("message_id"))
    # Whether send_raw keeps the client's Message-ID is not documented (the
    # structured `send` generates its own: email-service/reference/headers.mdx,
    # "Platform-controlled headers"); `result.message_id` says which it used.
    replaced = upstream_id if upstream_id and upstream_id != message.message_id else ""
    return Delivery(accepted, refused, upstream_id, replaced)


def sent_message_id(value: object) -> str:
    """`result.message_id` (cloudflare-typescript EmailSendingSendRawResponse) as
    a Message-ID in angle brackets, or "" when absent or not one clean line."""
    if not isinstance(value, str) or not value.strip():
        return ""
    text = one_line(value, 200).strip("<> ")
    return f"<{text}>" if text and " " not in text else ""


_RAW = compat32.clone(linesep="\r\n")


def seven_bit_parts(content: bytes) -> bytes | None:
    """The message with every body part that is not UTF-8 re-encoded for 7-bit
    transport; None when a header is not UTF-8 either (nothing to re-encode).

    send_raw carries the message in a JSON string: UTF-8 travels, other 8-bit
    bytes cannot. RFC 6152 section 3 lets a relay convert such a part to
    quoted-printable (text) or base64 (anything else); the decoded content is
    unchanged. Parts already UTF-8 (or 7-bit) are left as the client wrote them.
    """
    parsed = BytesParser(policy=_RAW).parsebytes(content)
    for part in parsed.walk():
        if part.is_multipart():
            continue
        encoding = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        if encoding in ("quoted-printable", "base64"):
            continue  # already 7-bit
        # Under 7bit, 8bit or binary, the decoded payload is the bytes as sent.
        decoded = part.get_payload(decode=True)
        body = decoded if isinstance(decoded, bytes) else b""
        if body.isascii() or _is_utf8(body):
            continue
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            encoded = quopri.encodestring(body).replace(b"\r\n", b"\n")
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            encoded = base64.encodebytes(body)
            part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(encoded.decode("ascii"))
    result = parsed.as_bytes(policy=_RAW)
    return result if _is_utf8(result) else None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class CloudflareChannel:
    name = NAME
    idempotent = False  # no idempotency key is sent: a retry may send again

    def __init__(self, config: CloudflareConfig, *, timeout: float) -> None:
        self.config = config
        account = quote(config.account_id, safe="")
        base = f"{config.api_url.rstrip('/')}/accounts/{account}/email/sending"
        self.url = f"{base}/send_raw"
        self.suppressions_url = f"{base}/suppressions"
        # One client for every message: its pool keeps the TLS connection alive.
        self._client = httpapi.client(timeout)

    async def _suppressed(self, recipients: tuple[str, ...]) -> dict[str, str] | None:
        """Which recipients the account's suppression list holds, with Cloudflare's
        reason; None when the list could not be read.

        `GET /accounts/{id}/email/sending/suppressions?email=ADDRESS` answers the
        active entry for one complete address, an empty `result` for none
        (email-service/configuration/suppressions.mdx, "Find an exact address").
        """

        async def one(address: str) -> tuple[str, str | None]:
            answer = await httpapi.get(
                self._client,
                self.suppressions_url,
                params={"email": address},
                channel=NAME,
                url_setting="CLOUDFLARE_API_URL",
                headers={"Authorization": f"Bearer {self.config.api_token}"},
            )
            body = answer.body
            if not answer.is_success or not isinstance(body, dict) or body.get("success") is False:
                raise LookupError(answer.status)
            entries = body.get("result")
            if not isinstance(entries, list):
                raise LookupError(answer.status)
            for entry in entries:
                if (
                    isinstance(entry, dict)
                    and str(entry.get("email", "")).lower() == address.lower()
                ):
                    return address, one_line(str(entry.get("reason") or "suppressed"), 40)
            return address, None

        try:
            found = await asyncio.gather(*(one(r) for r in dict.fromkeys(recipients)))
        except (LookupError, DeliveryError) as exc:
            log.warning("cloudflare: suppression list not readable (%s)", exc)
            return None
        return {address: reason for address, reason in found if reason is not None}

    async def deliver(self, message: Outbound) -> Delivery:
        content = message.content
        if not _is_utf8(content):
            downgraded = seven_bit_parts(content)
            if downgraded is None:
                raise PermanentDelivery(NAME, NOT_UTF8)
            log.info("cloudflare: %s: 8-bit parts re-encoded for JSON", message.message_id)
            content = downgraded
        mime = content.decode("utf-8")
        self._check_size(message, mime)
        answer = await self._send(message, message.recipients, mime)
        if not _suppression_refusal(answer):
            return self._delivery(message, answer)
        # Through the REST API, one suppressed recipient gets the whole request
        # a 400 with no code of its own (email-service/concepts/suppressions.mdx,
        # "Enforcement by sending method"); the docs advise filtering before
        # sending. The relay finds which, refuses those, and sends the rest once.
        suppressed = await self._suppressed(message.recipients)
        if not suppressed:
            return self._delivery(message, answer)
        refused = {
            r: replies.upstream_refused(
                NAME, Refusal.BOUNCE, f"{replies.PROVIDER_SUPPRESSED} ({suppressed[r]})"
            )
            for r in message.recipients
            if r in suppressed
        }
        log.warning(
            "cloudflare: %d of %d recipients of %s are on the account's suppression list",
            len(refused),
            len(message.recipients),
            message.message_id,
        )
        rest = tuple(r for r in message.recipients if r not in suppressed)
        if not rest:
            raise all_refused(NAME, refused)
        try:
            delivery = self._delivery(message, await self._send(message, rest, mime), rest)
        except DeliveryError as exc:
            exc.refused = {**refused, **exc.refused}
            raise
        return replace(delivery, refused={**refused, **delivery.refused})

    async def _send(
        self, message: Outbound, recipients: tuple[str, ...], mime: str
    ) -> httpapi.Answer:
        body = {"from": message.sender, "recipients": list(recipients), "mime_message": mime}
        return await httpapi.post(
            self._client,
            self.url,
            channel=NAME,
            url_setting="CLOUDFLARE_API_URL",
            headers={"Authorization": f"Bearer {self.config.api_token}"},
            json=body,
        )

    @staticmethod
    def _check_size(message: Outbound, mime: str) -> None:
        """552 before the request when what goes is over the limit.

        Cloudflare counts "total message size" (email-service/platform/limits.mdx)
        and does not say whether the JSON's escaping counts; the relay measures
        the `mime_message` string as it travels (its re-encoded 8-bit parts, the
        headers the relay added, CRLF escaped as \\r\\n), so a message Cloudflare
        would refuse as 10200 after the upload is refused here, without a request.
        """
        limit = message.size_limit
        if limit is None:
            return
        size = len(json.dumps(mime, ensure_ascii=False).encode("utf-8")) - 2
        if size > limit:
            log.info("cloudflare: %s is %d octets as sent, over %d", message.message_id,
                     size, limit)  # fmt: skip
            raise PermanentDelivery(
                NAME,
                replies.upstream_refused(
                    NAME,
                    Refusal.TOO_BIG,
                    f"message too big as sent ({size} octets, at most {limit})",
                ),
            )

    def _delivery(
        self, message: Outbound, answer: httpapi.Answer, recipients: tuple[str, ...] | None = None
    ) -> Delivery:
        body = answer.body
        if answer.is_success and isinstance(body, dict) and body.get("success") is True:
            sent = message if recipients is None else replace(message, recipients=recipients)
            delivery = per_recipient(sent, body.get("result"))
            if delivery.message_id:
                log.info("cloudflare sent %s as %s", message.message_id, delivery.message_id)
            if delivery.refused:
                log.warning(
                    "cloudflare bounced %d of %d recipients of %s",
                    len(delivery.refused),
                    len(sent.recipients),
                    message.message_id,
                )
            return partial_delivery(
                NAME,
                delivery.accepted,
                delivery.refused,
                delivery.upstream_id,
                delivery.message_id,
            )
        reply = outcome(answer.status, answer.body, answer.retry_after)
        raise httpapi.refusal(
            log,
            NAME,
            answer,
            reply,
            message_id=message.message_id,
            credential=f"API token for account {self.config.account_id}",
            config_fault=is_config_fault(answer.status, answer.body),
        )

    async def aclose(self) -> None:
        await self._client.aclose()
