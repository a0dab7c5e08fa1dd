"""The Resend channel: the MIME message translated into one `POST /emails`.

Resend takes no raw MIME, so `translate` (pure, no I/O) turns the message the
client submitted into Resend's JSON fields. Only envelope recipients may receive
the message: an address that appears in To or Cc but was never given in RCPT TO
is left out, and an envelope recipient absent from To/Cc goes in `bcc`, as an
SMTP server would have delivered it.

`ResendChannel` sends that JSON over one shared keep-alive client and turns
every HTTP outcome into a `Delivery` or a `DeliveryError` carrying a clean
reply. Every request carries an `Idempotency-Key` derived from the message, so
a client's retry after a lost reply returns the first send's id instead of
sending twice (Resend keeps keys for 24 hours).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import mimetypes
import re
from collections.abc import Iterator, Mapping
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

from relay import replies
from relay.channels import httpapi, pacing
from relay.channels.base import Delivery, Outbound, partial_delivery
from relay.channels.httpapi import ErrorRow, Kind
from relay.errors import DeliveryError, PermanentDelivery, TransientDelivery
from relay.message import domain_of
from relay.replies import Refusal, Reply, one_line
from relay.upstreams import ResendConfig

log = logging.getLogger("relay.resend")

NAME = "resend"
# Resend accepts an Idempotency-Key of 1 to 256 characters (docs, "Idempotency keys").
MAX_IDEMPOTENCY_KEY = 256
IDEMPOTENCY_PREFIX = "relay-"
NO_SUBJECT = "(no subject)"

# Headers the relay does not copy into Resend's `headers` object; every other
# header passes (Auto-Submitted, List-Id, Precedence, Sender, ...). Resend's API
# (resend-openapi resend.yaml, SendEmailRequest) takes `headers` as a free
# object and publishes no refused list, so what is dropped is what would come
# out twice or false:
BUILT_FROM_FIELDS = frozenset({"from", "to", "cc", "bcc", "subject", "reply-to"})
# Resend composes the MIME structure from `text`/`html`/`attachments` and
# stamps the date it sends at.
BUILT_BY_RESEND = frozenset(
    {"mime-version", "content-type", "content-transfer-encoding", "content-disposition",
     "content-id", "date"}
)  # fmt: skip
# Trace and signature fields describe the client's copy (RFC 5321 section 4.4;
# RFC 6376 section 3.5: a body hash Resend's re-composition breaks).
TRACE_AND_SIGNATURES = frozenset(
    {"received", "return-path", "dkim-signature", "authentication-results",
     "arc-seal", "arc-message-signature", "arc-authentication-results"}
)  # fmt: skip
NOT_PASSED = BUILT_FROM_FIELDS | BUILT_BY_RESEND | TRACE_AND_SIGNATURES

# An attached message is re-serialized from its parse: CRLF as RFC 5322 asks,
# and its header lines left as the client folded them.
_ATTACHED_MESSAGE = default_policy.clone(linesep="\r\n", refold_source="none")
# Resend names the field in backticks ("Invalid `to` field"); plain English "to"
# ("needs to follow") must not make a sender or attachment error a recipient one.
_RECIPIENT_FIELD = re.compile(r"`(to|cc|bcc)`", re.IGNORECASE)


# Every error Resend publishes for `POST /emails`, by (HTTP status, name):
# resend.com/docs/api-reference/errors (errors.md) for statuses and meanings, the
# name list in resend-node src/interfaces.ts (RESEND_ERROR_CODE_KEY).
# `monthly_quota_exceeded` has no published status; 429 as its daily twin.
# No `suspended_api_key` is published (errors.md, resend-node, resend-openapi):
# a suspended key would arrive as one of the key errors below.
ERRORS: Mapping[tuple[int, str], ErrorRow] = {
    # Our key is at most 252 characters (MAX_IDEMPOTENCY_KEY): a refusal is a relay fault.
    (400, "invalid_idempotency_key"): ErrorRow(Kind.CONFIG, words="idempotency key refused"),
    (400, "validation_error"): ErrorRow(Kind.REFUSED, Refusal.CONTENT),
    (401, "missing_api_key"): ErrorRow(Kind.CREDENTIALS),
    (401, "restricted_api_key"): ErrorRow(Kind.CREDENTIALS),
    (403, "invalid_api_key"): ErrorRow(Kind.CREDENTIALS),
    # Unverified sending domain, or the testing address sending to a stranger.
    (403, "validation_error"): ErrorRow(Kind.REFUSED, Refusal.NOT_AUTHORIZED),
    (404, "not_found"): ErrorRow(Kind.CONFIG, words="RESEND_API_URL has no /emails"),
    (405, "method_not_allowed"): ErrorRow(Kind.CONFIG, words="RESEND_API_URL has no /emails"),
    # The same key with another body: the key is derived from the message, so the
    # same bytes will meet the same refusal on every retry.
    (409, "invalid_idempotent_request"): ErrorRow(
        Kind.REFUSED, Refusal.OTHER, "idempotency key already used for another message"
    ),
    (409, "concurrent_idempotent_requests"): ErrorRow(
        Kind.DEFERRED, words="idempotent request conflict"
    ),
    (422, "invalid_attachment"): ErrorRow(Kind.REFUSED, Refusal.CONTENT),
    (422, "invalid_from_address"): ErrorRow(Kind.REFUSED, Refusal.SENDER),
    (422, "invalid_parameter"): ErrorRow(Kind.REFUSED, Refusal.CONTENT),
    (422, "missing_required_field"): ErrorRow(Kind.REFUSED, Refusal.CONTENT),
    # API-key and domain endpoints' errors: never about a send.
    (422, "invalid_access"): ErrorRow(Kind.DEFERRED, words="unexpected reply (invalid_access)"),
    (422, "invalid_region"): ErrorRow(Kind.DEFERRED, words="unexpected reply (invalid_region)"),
    (429, "rate_limit_exceeded"): ErrorRow(Kind.THROTTLED, words="rate limited"),
    (429, "daily_quota_exceeded"): ErrorRow(Kind.QUOTA, words="daily quota exceeded"),
    (429, "monthly_quota_exceeded"): ErrorRow(Kind.QUOTA, words="monthly quota exceeded"),
    (451, "security_error"): ErrorRow(Kind.REFUSED, Refusal.NOT_AUTHORIZED),
    (500, "application_error"): ErrorRow(Kind.DEFERRED),
    (500, "internal_server_error"): ErrorRow(Kind.DEFERRED),
}


# --- translation (pure) ------------------------------------------------------


def translate(message: Outbound) -> dict[str, Any]:
    """Resend's `POST /emails` body for one message.

    >>> body = translate(Outbound("a@x.org", ("b@y.org",), b"From: a@x.org\\r\\n"
    ...     b"To: b@y.org\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n", "<1@x.org>", "k"))
    >>> body["to"], body["subject"], body["text"]
    (['b@y.org'], 'hi', 'hello\\n')
    """
    return _translate(message)[0]


def _translate(message: Outbound) -> tuple[dict[str, Any], bool]:
    """The body, and whether no header names any envelope recipient (a Bcc-only send)."""
    parsed = BytesParser(policy=default_policy).parsebytes(message.content)
    assert isinstance(parsed, EmailMessage)

    envelope: dict[str, str] = {}
    for rcpt in message.recipients:
        envelope.setdefault(rcpt.lower(), rcpt)
    to = _envelope_addresses(parsed, "To", envelope)
    cc = _envelope_addresses(parsed, "Cc", envelope)
    shown = {a.addr_spec.lower() for a in (*to, *cc)}
    bcc = [rcpt for key, rcpt in envelope.items() if key not in shown]
    # Resend refuses a send without `to`. Cc recipients are shown to everyone
    # anyway, so they may stand in for an empty To without revealing a Bcc.
    if not to:
        to, cc = cc, []
    hidden = not to
    if to:
        to_field = [str(a) for a in to]
    else:
        # No header names an envelope recipient (a Bcc-only send, or
        # "undisclosed-recipients:;"): they are the only addresses left to name.
        # `deliver` sends such a message once per recipient, so none sees another.
        to_field, bcc = bcc, []

    body: dict[str, Any] = {
        "from": _from_field(parsed, message.sender),
        "to": to_field,
        # SendEmailRequest requires `subject` (resend-openapi resend.yaml), and
        # Resend's validation takes an empty one as missing: a message without a
        # Subject goes under the words mail clients show for one.
        "subject": _header_text(parsed, "Subject") or NO_SUBJECT,
    }
    if cc:
        body["cc"] = [str(a) for a in cc]
    if bcc:
        body["bcc"] = bcc
    reply_to = [str(a) for a in _addresses(parsed, "Reply-To")]
    if reply_to:
        body["reply_to"] = reply_to

    text_part = parsed.get_body(preferencelist=("plain",))
    html_part = parsed.get_body(preferencelist=("html",))
    if text_part is not None:
        body["text"] = _text_of(text_part)
    if html_part is not None:
        body["html"] = _text_of(html_part)
    if text_part is None and html_part is not None:
        # Without `text`, Resend writes a plain-text version of the HTML; an
        # empty `text` opts out (resend.com/docs/api-reference/emails/send-email,
        # `text`). A message of attachments only sends neither: SendEmailRequest
        # requires only from, to and subject (resend-openapi resend.yaml).
        body["text"] = ""
    bodies = [p for p in (text_part, html_part) if p is not None]
    others = [(p, related) for p, related in _leaves(parsed) if not any(p is b for b in bodies)]
    attachments = [
        _attachment(part, index, related) for index, (part, related) in enumerate(others, start=1)
    ]
    if attachments:
        body["attachments"] = attachments

    headers, dropped = passed_headers(parsed)
    if not any(name.lower() == "message-id" for name in headers):
        headers["Message-ID"] = message.message_id
    body["headers"] = headers
    if dropped:
        log.debug("resend: %s: headers not passed: %s", message.message_id, ", ".join(dropped))
    mended: dict[str, Any] = _mend(body)
    return mended, hidden


def _addresses(parsed: MIMEPart, name: str) -> list[Address]:
    found: list[Address] = []
    for value in parsed.get_all(name) or ():
        found.extend(
            a for a in getattr(value, "addresses", ()) if a.addr_spec and "@" in a.addr_spec
        )
    return found


def _envelope_addresses(parsed: MIMEPart, name: str, envelope: dict[str, str]) -> list[Address]:
    """The header's addresses that are also envelope recipients, each once."""
    kept: dict[str, Address] = {}
    for address in _addresses(parsed, name):
        key = address.addr_spec.lower()
        if key in envelope:
            kept.setdefault(key, address)
    return list(kept.values())


def _from_field(parsed: MIMEPart, sender: str) -> str:
    # Resend takes one sender; "Name <addr>" keeps the display name the client chose.
    found = _addresses(parsed, "From")
    return str(found[0]) if found else sender


def _header_text(parsed: MIMEPart, name: str) -> str:
    value = parsed.get(name)
    return " ".join(str(value).split()) if value is not None else ""


def passed_headers(parsed: MIMEPart) -> tuple[dict[str, str], list[str]]:
    """The headers for Resend's `headers` object, and the names of those dropped.

    A JSON object holds one value per name; the first is the one a reader of
    the original message would have seen on top, a repeat is dropped.
    """
    headers: dict[str, str] = {}
    seen: set[str] = set()
    dropped: list[str] = []
    for name, value in parsed.items():
        key = name.lower()
        if key in NOT_PASSED or key in seen:
            dropped.append(name)
            continue
        seen.add(key)
        headers[name] = " ".join(str(value).split())
    return headers, dropped


def _leaves(part: MIMEPart, related: bool = False) -> Iterator[tuple[MIMEPart, bool]]:
    """Every non-multipart part, in order, and whether a multipart/related holds it.

    An attached message stays whole.
    """
    if part.get_content_maintype() == "multipart":
        inner = related or part.get_content_subtype() == "related"
        for sub in part.iter_parts():
            yield from _leaves(sub, inner)
    else:
        yield part, related


def _text_of(part: MIMEPart) -> str:
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    # The declared charset first; then UTF-8, which is what undeclared 8-bit text
    # (RFC 6152 lets it through) nearly always is; then UTF-8 losing what cannot
    # decode, for a charset Python does not know or a wrong declaration.
    for charset in (part.get_content_charset() or "us-ascii", "utf-8"):
        try:
            text = data.decode(charset)
            break
        except (LookupError, UnicodeDecodeError):
            continue
    else:
        text = data.decode("utf-8", "replace")
    # Resend builds its own MIME; JSON text reads plainer with bare newlines.
    return text.replace("\r\n", "\n")


def _attachment(part: MIMEPart, index: int, related: bool) -> dict[str, str]:
    content_type = part.get_content_type()
    if part.get_content_maintype() == "message":
        inner = part.get_payload(0)
        data = inner.as_bytes(policy=_ATTACHED_MESSAGE) if isinstance(inner, Message) else b""
    else:
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
    filename = part.get_filename() or _fallback_filename(content_type, index)
    attachment = {
        "content": base64.b64encode(data).decode("ascii"),
        "filename": filename,
        "content_type": content_type,
    }
    content_id = _header_text(part, "Content-ID").strip("<>")
    # RFC 2387: a multipart/related body refers to its parts by Content-ID, and
    # some clients mark those parts "attachment" anyway. Elsewhere a Content-ID
    # on an attachment (Apple Mail adds one to every part) must not hide it inline.
    if content_id and (related or part.get_content_disposition() != "attachment"):
        attachment["content_id"] = content_id
    return attachment


def _mend(value: Any) -> Any:
    """Every string in valid Unicode, as JSON must be.

    The parser hands 8-bit header bytes back as surrogate escapes (RFC 6532
    headers reach us without SMTPUTF8); as UTF-8 they become text again, and
    anything else becomes U+FFFD.
    """
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_mend(k): _mend(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mend(v) for v in value]
    return value


def _fallback_filename(content_type: str, index: int) -> str:
    # Resend names every attachment; a part without a name gets a stable one.
    if content_type == "message/rfc822":
        return f"message-{index}.eml"
    extension = mimetypes.guess_extension(content_type) or ".bin"
    return f"part-{index}{extension}"


# --- outcomes (pure) ---------------------------------------------------------


# A malformed Authorization header is answered 400 `validation_error` with the
# message "API key is invalid" (resend.com/docs/api-reference/errors), not 403
# `invalid_api_key`: the relay's own key, so a 451 and an operator error, never a
# permanent refusal of the client's message.
_KEY_REFUSED = re.compile(r"\bapi key\b", re.IGNORECASE)
KEY_MALFORMED = ErrorRow(Kind.CREDENTIALS)


def error_row(status: int, body: object) -> ErrorRow | None:
    """The table's row for an answer; by status alone for a name Resend adds later."""
    error = body if isinstance(body, dict) else {}
    name = str(error.get("name") or "")
    if name == "validation_error" and _KEY_REFUSED.search(str(error.get("message") or "")):
        return KEY_MALFORMED
    row = ERRORS.get((status, name))
    if row is not None:
        return row
    # The status alone is clear for these, even from a proxy's HTML page.
    if status == 429:
        return ErrorRow(Kind.THROTTLED, words="rate limited")
    if status == 401 or (status == 403 and error):
        return ErrorRow(Kind.CREDENTIALS)
    if not error:
        return None
    if status in (400, 422):
        return ErrorRow(Kind.REFUSED, Refusal.CONTENT)
    if status == 409:
        return ErrorRow(Kind.DEFERRED, words="idempotent request conflict")
    return None


def outcome(status: int, body: object, retry_after: str | None) -> Reply:
    """The reply a non-2xx Resend answer becomes, by the `ERRORS` table.

    Anything whose outcome is unknown (5xx, an unexpected status or body) is a
    4xx: a client that sees 5xx does not retry, and the idempotency key makes
    the retry of a message that did go out harmless.
    """
    error = body if isinstance(body, dict) else {}
    name = str(error.get("name") or "")
    message = str(error.get("message") or "")
    row = error_row(status, body)
    if row is None:
        if status >= 500 and error:
            return httpapi.upstream_error(NAME, status)
        return httpapi.unexpected_reply(NAME, status)
    refusal = row.refusal
    # Resend names the field in backticks ("Invalid `to` field").
    if refusal is Refusal.CONTENT and _RECIPIENT_FIELD.search(message):
        row = ErrorRow(Kind.REFUSED, Refusal.RECIPIENT, row.words)
    detail = message.replace("`", "") or row.words or name.replace("_", " ")
    return httpapi.row_reply(NAME, row, status=status, detail=detail, retry_after=retry_after)


def is_config_fault(status: int, body: object) -> bool:
    """Whether the answer blames the relay's own setup (logged as an error)."""
    row = error_row(status, body)
    return row is not None and row.config_fault


# --- the channel ---------------------------------------------------------------


class ResendChannel:
    name = NAME
    idempotent = True  # every request carries an Idempotency-Key

    def __init__(
        self,
        config: ResendConfig,
        *,
        timeout: float,
        budget: float | None = None,
        workers: int = 1,
    ) -> None:
        """`budget`: the time one message may spend here, waits included (the
        session's forward budget, twice `timeout` by default); `workers`: the
        processes sharing `config.rate_limit`, each paces at its share."""
        self.config = config
        self.url = f"{config.api_url.rstrip('/')}/emails"
        self.timeout = timeout
        self.budget = budget if budget is not None else timeout * 2
        self.rate = config.rate_limit / max(1, workers)
        # One client for every message: its pool keeps the TLS connection alive.
        self._client = httpapi.client(timeout)
        # Per team (RESEND_TEAMS): Resend limits a team across all its API keys
        # (resend.com/docs/api-reference/rate-limit), so keys of one team share.
        self._buckets: dict[str, pacing.TokenBucket] = {}

    def _bucket(self, team: str) -> pacing.TokenBucket:
        bucket = self._buckets.get(team)
        if bucket is None:
            bucket = self._buckets[team] = pacing.TokenBucket(self.rate)
        return bucket

    async def deliver(self, message: Outbound) -> Delivery:
        domain = domain_of(message.sender)
        token = self.config.token_for(domain)
        if not token:
            log.error("resend: no token configured for sender domain %s", domain)
            raise TransientDelivery(
                NAME,
                replies.upstream_unavailable(NAME, f"no API token for {domain}"),
                not_taken=True,
            )
        try:
            body, hidden = _translate(message)
        except Exception as exc:
            # The email package can fail on hostile or broken MIME. Nothing was
            # sent, and the same bytes would fail the same way on every retry.
            log.warning("resend: cannot translate %s: %r", message.message_id, exc)
            raise PermanentDelivery(
                NAME,
                replies.upstream_refused(NAME, Refusal.CONTENT, "message could not be translated"),
            ) from exc
        key = (IDEMPOTENCY_PREFIX + message.idempotency_key)[: MAX_IDEMPOTENCY_KEY - 4]
        deadline = pacing.Deadline(self.budget, self.timeout)
        if not hidden or len(body["to"]) == 1:
            upstream_id = await self._post(message, domain, token, body, key, deadline)
            return Delivery(accepted=message.recipients, upstream_id=upstream_id)
        # Bcc only: Resend wants a `to`, and a `to` is shown to every recipient.
        # One request per recipient keeps them from seeing each other.
        results = await asyncio.gather(
            *(
                self._post(message, domain, token, {**body, "to": [rcpt]}, f"{key}-{i}", deadline)
                for i, rcpt in enumerate(body["to"])
            ),
            return_exceptions=True,
        )
        accepted, refused, ids = [], {}, []
        for rcpt, result in zip(body["to"], results, strict=True):
            if isinstance(result, DeliveryError):
                refused[rcpt] = result.reply
            elif isinstance(result, BaseException):
                raise result
            else:
                accepted.append(rcpt)
                ids.append(result)
        # A copy deferred defers the message: the per-recipient keys keep the
        # copies that went out from going out twice when the client retries.
        try:
            return partial_delivery(NAME, accepted, refused, one_line(",".join(ids), 120))
        except DeliveryError as exc:
            # The copies that went out are taken; the rest may go on to another
            # channel only if every copy that failed provably was not sent.
            failed = [r for r in results if isinstance(r, DeliveryError)]
            not_taken = all(e.not_taken for e in failed)
            raise type(exc)(NAME, exc.reply, not_taken=not_taken, taken=tuple(accepted)) from exc

    async def _post(
        self,
        message: Outbound,
        domain: str,
        token: str,
        body: dict[str, Any],
        key: str,
        deadline: pacing.Deadline,
    ) -> str:
        """One send, paced per API key; the upstream id, or a DeliveryError."""
        answer = await self.request(
            self.url, body, key, domain, token, deadline, message.message_id
        )
        upstream_id = answer.get("id") if isinstance(answer, dict) else None
        if isinstance(upstream_id, str) and upstream_id:
            return one_line(upstream_id, 120)
        # A 2xx means Resend may well have sent it; only a 4xx lets the
        # client retry, and the idempotency key keeps that retry harmless.
        raise TransientDelivery(NAME, httpapi.unexpected_reply(NAME, 200))

    async def request(
        self,
        url: str,
        body: Any,
        key: str,
        domain: str,
        token: str,
        deadline: pacing.Deadline,
        label: str,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One request, paced per team; the 2xx answer's body, or a DeliveryError.

        A 429 for the rate (not a quota) is retried after the wait Resend
        names while the budget allows: the idempotency key makes the retry
        safe even if the first request did go through. `label`: what the log
        names (a Message-ID, or a batch).
        """
        bucket = self._bucket(self.config.team_for(domain))
        content = json.dumps(body, ensure_ascii=False).encode("utf-8")
        while True:
            try:
                slot = await pacing.take_slot(bucket, deadline)
            except pacing.BudgetExceeded as exc:
                reply = replies.upstream_throttled(NAME, "rate limited", exc.seconds)
                log.warning("resend: %s not sent: %s", label, reply)
                raise TransientDelivery(NAME, reply, not_taken=True) from None
            try:
                answer = await httpapi.post(
                    self._client,
                    url,
                    channel=NAME,
                    url_setting="RESEND_API_URL",
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                        "Idempotency-Key": key,
                        **(headers or {}),
                    },
                    content=content,
                )
            finally:
                if slot is not None:
                    bucket.done(slot)
            pause = httpapi.pause_seconds(answer)
            if pause:
                bucket.hold(pause)
            if answer.is_success:
                return answer.body
            row = error_row(answer.status, answer.body)
            retry_after = answer.retry_after
            if row is not None and row.kind is Kind.THROTTLED:
                wait = float(pause) if pause is not None else 1 / bucket.rate
                if deadline.fits(wait):
                    log.info("resend: %s throttled, retrying in %.1f s", label, wait)
                    continue
                retry_after = str(pacing.BudgetExceeded(wait).seconds)
            reply = outcome(answer.status, answer.body, retry_after)
            raise httpapi.refusal(
                log,
                NAME,
                answer,
                reply,
                message_id=label,
                credential=f"token for sender domain {domain}",
                config_fault=is_config_fault(answer.status, answer.body),
            )

    async def aclose(self) -> None:
        await self._client.aclose()
