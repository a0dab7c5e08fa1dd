"""The Cloudflare Email Service channel: the raw message through `send_raw`.

The message goes unchanged, with the envelope sender and recipients, so what
the client signed or composed is what arrives. Cloudflare answers per
recipient (`delivered`, `queued`, `permanent_bounces`) and may say
`success: false` under HTTP 200, so the body, not the status, decides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from urllib.parse import quote

from relay import httpapi, replies
from relay.channel import Delivery, Outbound, partial_delivery
from relay.config import CloudflareConfig
from relay.errors import PermanentDelivery
from relay.replies import Refusal, Reply, one_line

log = logging.getLogger("relay.cloudflare")

NAME = "cloudflare"

# What Cloudflare documents (API reference, send_raw errors), as RFC 3463 codes.
PERMANENT_BOUNCE = replies.upstream_refused(NAME, Refusal.BOUNCE, "permanent bounce")
NOT_UTF8 = replies.upstream_refused(
    NAME, Refusal.CONTENT, "message is not UTF-8 (use a transfer encoding)"
)
TOO_BIG = replies.upstream_refused(NAME, Refusal.TOO_BIG, "message too big")

SCHEMA_ERROR = 10001
INTERNAL_ERROR = 10002
THROTTLED = 10004
SERVICE_UNAVAILABLE = 10100
UNAUTHORIZED = 10101
FORBIDDEN = 10102
TOO_BIG_ERROR = 10200
INVALID_EMAIL = 10202
SENDING_DISABLED_ERROR = 10203

# Codes whose meaning does not depend on the HTTP status they come with, and
# the words for them when Cloudflare gives none.
_BY_CODE: Mapping[int, tuple[Refusal, str]] = {
    SENDING_DISABLED_ERROR: (Refusal.NOT_AUTHORIZED, "sending disabled"),
    TOO_BIG_ERROR: (Refusal.TOO_BIG, "message too big"),
    INVALID_EMAIL: (Refusal.RECIPIENT, "invalid email address"),
    SCHEMA_ERROR: (Refusal.CONTENT, "message refused"),
}


def outcome(status: int, body: object, retry_after: str | None) -> Reply:
    """The reply a failed `send_raw` answer becomes (non-2xx, or `success: false`).

    Anything not documented as a refusal is a 4xx: the message may have gone
    out, and a client that sees 5xx does not retry.
    """
    code, detail = _first_error(body)
    if status == 429 or code == THROTTLED:
        wait = httpapi.retry_after_seconds(retry_after)
        return replies.upstream_throttled(NAME, retry_after=wait)
    if code in (UNAUTHORIZED, FORBIDDEN):
        return replies.upstream_credentials_rejected(NAME)
    known = _BY_CODE.get(code) if code is not None else None
    if known is not None:
        refusal, words = known
        return replies.upstream_refused(NAME, refusal, detail or words)
    # After the codes: a 403 may also carry 10203 (sending disabled), which is not
    # about the token.
    if status in (401, 403):
        return replies.upstream_credentials_rejected(NAME)
    if status == 413:
        return TOO_BIG
    if status == 400:
        return replies.upstream_refused(NAME, Refusal.CONTENT, detail or "message refused")
    if status >= 500 or code in (INTERNAL_ERROR, SERVICE_UNAVAILABLE):
        return httpapi.upstream_error(NAME, status)
    return httpapi.unexpected_reply(NAME, status)


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
    return Delivery(accepted=accepted, refused=refused)


class CloudflareChannel:
    name = NAME
    idempotent = False  # no idempotency key is sent: a retry may send again

    def __init__(self, config: CloudflareConfig, *, timeout: float) -> None:
        self.config = config
        account = quote(config.account_id, safe="")
        self.url = f"{config.api_url.rstrip('/')}/accounts/{account}/email/sending/send_raw"
        # One client for every message: its pool keeps the TLS connection alive.
        self._client = httpapi.client(timeout)

    async def deliver(self, message: Outbound) -> Delivery:
        try:
            mime = message.content.decode("utf-8")
        except UnicodeDecodeError as exc:
            # send_raw carries the message in a JSON string; 8-bit bytes that are
            # not UTF-8 cannot travel there unchanged.
            raise PermanentDelivery(NAME, NOT_UTF8) from exc
        body = {
            "from": message.sender,
            "recipients": list(message.recipients),
            "mime_message": mime,
        }
        answer = await httpapi.post(
            self._client,
            self.url,
            channel=NAME,
            url_setting="CLOUDFLARE_API_URL",
            headers={"Authorization": f"Bearer {self.config.api_token}"},
            json=body,
        )
        return self._delivery(message, answer)

    def _delivery(self, message: Outbound, answer: httpapi.Answer) -> Delivery:
        body = answer.body
        if answer.is_success and isinstance(body, dict) and body.get("success") is True:
            delivery = per_recipient(message, body.get("result"))
            if delivery.refused:
                log.warning(
                    "cloudflare bounced %d of %d recipients of %s",
                    len(delivery.refused),
                    len(message.recipients),
                    message.message_id,
                )
            return partial_delivery(NAME, delivery.accepted, delivery.refused)
        reply = outcome(answer.status, answer.body, answer.retry_after)
        raise httpapi.refusal(
            log,
            NAME,
            answer,
            reply,
            message_id=message.message_id,
            credential=f"API token for account {self.config.account_id}",
        )

    async def aclose(self) -> None:
        await self._client.aclose()
