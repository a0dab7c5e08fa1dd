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

import httpx

from relay import httpapi, replies
from relay.channel import Delivery, Outbound, all_refused
from relay.config import CloudflareConfig
from relay.errors import PermanentDelivery, TransientDelivery, delivery_error
from relay.replies import Reply, one_line

log = logging.getLogger("relay.cloudflare")

NAME = "cloudflare"

# RFC 3463 codes for what Cloudflare documents (API reference, send_raw errors).
PERMANENT_BOUNCE = replies.UPSTREAM_BOUNCE.but("cloudflare: permanent bounce")
NOT_UTF8 = replies.UPSTREAM_CONTENT_REFUSED.but(
    "cloudflare: message is not UTF-8 (use a transfer encoding)"
)
CONTENT_REFUSED = replies.UPSTREAM_CONTENT_REFUSED.but("cloudflare: message refused")
SENDING_DISABLED = replies.UPSTREAM_NOT_AUTHORIZED.but("cloudflare: sending disabled")
TOO_BIG = replies.UPSTREAM_TOO_BIG.but("cloudflare: message too big")
INVALID_ADDRESS = replies.UPSTREAM_BAD_RECIPIENT.but("cloudflare: invalid email address")
# The relay's own token was refused: a configuration fault, not the client's.
CREDENTIALS_REJECTED = replies.UPSTREAM_UNAVAILABLE.but(
    f"{NAME}: upstream rejected relay credentials"
)

SCHEMA_ERROR = 10001
INTERNAL_ERROR = 10002
THROTTLED = 10004
SERVICE_UNAVAILABLE = 10100
UNAUTHORIZED = 10101
FORBIDDEN = 10102
TOO_BIG_ERROR = 10200
INVALID_EMAIL = 10202
SENDING_DISABLED_ERROR = 10203

# Codes whose meaning does not depend on the HTTP status they come with.
_BY_CODE: Mapping[int, Reply] = {
    SENDING_DISABLED_ERROR: SENDING_DISABLED,
    TOO_BIG_ERROR: TOO_BIG,
    INVALID_EMAIL: INVALID_ADDRESS,
    SCHEMA_ERROR: CONTENT_REFUSED,
}


def outcome(status: int, body: object, retry_after: str | None) -> Reply:
    """The reply a failed `send_raw` answer becomes (non-2xx, or `success: false`).

    Anything not documented as a refusal is a 4xx: the message may have gone
    out, and a client that sees 5xx does not retry.
    """
    code, detail = _first_error(body)
    if status == 429 or code == THROTTLED:
        wait = httpapi.retry_after_seconds(retry_after)
        suffix = f"; retry after {wait} s" if wait is not None else ""
        return replies.UPSTREAM_THROTTLED.but(f"{NAME}: rate limited{suffix}")
    if code in (UNAUTHORIZED, FORBIDDEN):
        return CREDENTIALS_REJECTED
    base = _BY_CODE.get(code) if code is not None else None
    if base is not None:
        return base.but(f"{NAME}: {detail}") if detail else base
    # After the codes: a 403 may also carry 10203 (sending disabled), which is not
    # about the token.
    if status in (401, 403):
        return CREDENTIALS_REJECTED
    if status == 413:
        return TOO_BIG
    if status == 400:
        return CONTENT_REFUSED.but(f"{NAME}: {detail}") if detail else CONTENT_REFUSED
    if status >= 500 or code in (INTERNAL_ERROR, SERVICE_UNAVAILABLE):
        return replies.UPSTREAM_UNAVAILABLE.but(f"{NAME}: upstream error (HTTP {status})")
    return replies.UPSTREAM_UNAVAILABLE.but(f"{NAME}: unexpected reply (HTTP {status})")


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
        try:
            response = await self._client.post(
                self.url,
                json=body,
                headers={"Authorization": f"Bearer {self.config.api_token}"},
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise TransientDelivery(
                NAME,
                replies.UPSTREAM_UNAVAILABLE.but(
                    f"{NAME}: {httpapi.describe(exc, 'CLOUDFLARE_API_URL')}"
                ),
            ) from exc
        return self._delivery(message, response)

    def _delivery(self, message: Outbound, response: httpx.Response) -> Delivery:
        try:
            answer: object = response.json()
        except ValueError:
            answer = None
        if response.is_success and isinstance(answer, dict) and answer.get("success") is True:
            delivery = per_recipient(message, answer.get("result"))
            if delivery.refused:
                log.warning(
                    "cloudflare bounced %d of %d recipients of %s",
                    len(delivery.refused),
                    len(message.recipients),
                    message.message_id,
                )
            if not delivery.accepted:
                raise all_refused(NAME, delivery.refused)
            return delivery
        reply = outcome(response.status_code, answer, response.headers.get("retry-after"))
        if reply == CREDENTIALS_REJECTED:
            log.error(
                "cloudflare rejected the configured API token for account %s (HTTP %d)",
                self.config.account_id,
                response.status_code,
            )
        else:
            log.warning(
                "cloudflare refused %s: HTTP %d, %s",
                message.message_id,
                response.status_code,
                reply,
            )
        raise delivery_error(NAME, reply)

    async def aclose(self) -> None:
        await self._client.aclose()
