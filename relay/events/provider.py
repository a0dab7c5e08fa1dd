"""Resend's own webhooks (`POST /hooks/resend`): verified, then turned into suppressions
and the relay's events.

Resend signs its webhooks with Svix (resend.com/docs/dashboard/webhooks/verify-webhooks-requests):
`svix-id`, `svix-timestamp` and `svix-signature` (space-separated `v1,<base64>`
signatures), HMAC-SHA256 over `{id}.{timestamp}.{body}` under the endpoint's
signing secret (`whsec_...`): the Standard Webhooks scheme under other header
names. A request is refused unless one signature matches, in constant time,
and its timestamp is within TOLERANCE of now (a replayed capture goes stale); a
repeat of an event already taken (the same `svix-id`) changes nothing.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any

from relay.events import signing
from relay.message import domain_of

# Svix's tolerance for a signed timestamp (the standardwebhooks libraries use the same).
TOLERANCE = 5 * 60
MAX_BODY = 256 * 1024
# Resend's event types the relay acts on (resend.com/docs/dashboard/webhooks/event-types),
# and the relay event each becomes.
EVENTS = {
    "email.bounced": "message.bounced",
    "email.complained": "message.complained",
    "email.delivered": "message.delivered",
    "email.delivery_delayed": "message.deferred",
}


class Refused(Exception):
    """The request is not a genuine, fresh Resend event (answered 401 or 400)."""


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    event_id: str  # the relay's: derived from svix-id, so a repeat is found
    relay_type: str
    domain: str  # the sender's domain: the account it belongs to
    recipients: tuple[str, ...]
    suppress: str | None  # the suppression reason it implies, if any
    data: dict[str, Any]


def verify(secret: str, headers: dict[str, str], body: bytes, now: int) -> None:
    """Raise `Refused` unless the request is signed with `secret` and fresh."""
    msg_id = headers.get("svix-id", "")
    stamp = headers.get("svix-timestamp", "")
    given = headers.get("svix-signature", "")
    if not msg_id or not stamp.isdigit() or not given or len(given) > 4096:
        raise Refused("missing signature headers")
    if abs(now - int(stamp)) > TOLERANCE:
        raise Refused("stale or future timestamp")
    expected = signing.sign(secret, msg_id, int(stamp), body)
    if not any(
        hmac.compare_digest(expected.encode(), candidate.encode())
        for candidate in given.split(" ")
        if candidate.startswith("v1,")
    ):
        raise Refused("bad signature")


def parse(headers: dict[str, str], body: bytes) -> ProviderEvent | None:
    """The event a verified body describes; None for a type the relay does not act on."""
    try:
        payload = json.loads(body)
    except ValueError:
        raise Refused("body is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise Refused("not a Resend event")
    kind = str(payload.get("type") or "")
    if kind not in EVENTS:
        return None
    data = payload["data"]
    to = data.get("to")
    recipients = tuple(
        str(a).strip().lower()
        for a in (to if isinstance(to, list) else [to])
        if isinstance(a, str) and "@" in a
    )[:50]
    sender = parseaddr(str(data.get("from") or ""))[1]
    suppress = None
    detail = ""
    if kind == "email.complained":
        suppress = "complaint"
    elif kind == "email.bounced":
        bounce = data.get("bounce") if isinstance(data.get("bounce"), dict) else {}
        # Only a permanent bounce suppresses: a transient one is retried upstream.
        if str(bounce.get("type", "")).lower() == "permanent":
            suppress = "hard-bounce"
        # Resend's bounce object: type, subType, message (its email.bounced payload).
        kinds = " ".join(str(bounce.get(k) or "") for k in ("type", "subType")).strip()
        detail = ": ".join(p for p in (kinds, str(bounce.get("message") or "")) if p)[:200]
    digest = hmac.new(b"resend", headers["svix-id"].encode(), "sha256").hexdigest()[:24]
    event = {
        "provider": "resend",
        "provider_type": kind,
        "upstream_id": str(data.get("email_id") or "")[:120],
        "sender": sender.lower(),
        "recipients": list(recipients),
        "subject": str(data.get("subject") or "")[:200],
        "time": str(payload.get("created_at") or "")[:40],
        "detail": detail,
    }
    return ProviderEvent(
        f"evt_rs_{digest}", EVENTS[kind], domain_of(sender), recipients, suppress, event
    )
