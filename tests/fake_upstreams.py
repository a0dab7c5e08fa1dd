"""Local HTTP servers that answer as Resend and Cloudflare document, for tests.

Each fake listens on 127.0.0.1, port 0, in a background thread, records every
request and answers as the real API does (including its error bodies), unless
a test scripts the next answers:

    with FakeResend() as resend:
        resend.fail(429, "rate_limit_exceeded", retry_after="30")  # the next answer
        ...  # point a channel at resend.url
        assert resend.requests[0].headers["idempotency-key"]

`requests` holds every request as received; `sent` only what the fake
"sent" (Resend: once per idempotency key; Cloudflare: the accepted ones).
Scripted answers are used first, in order; then `default` when set; then the
documented behaviour. `rate` (requests per second, both fakes) makes a fake
enforce a rate limit as the real API does: a request past it gets the
documented 429 with `retry-after`, and is neither recorded in `sent` nor sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it. Header names are lower-cased."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    json: Any  # None when the body is not JSON
    peer: tuple[str, int]  # the client's address: equal ports mean a reused connection


@dataclass(frozen=True)
class Scripted:
    """One answer. A dict or list body is sent as JSON, bytes or str as they are."""

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Hold the answer this long (a slow upstream); `stop` releases it early.
    delay: float = 0.0
    # Hold the answer until this is set (a request in flight), then call `then`
    # (the request is done, whether or not the client is still there to read it).
    wait: threading.Event | None = None
    then: Callable[[], None] | None = None


class FakeUpstream:
    """The recording, scriptable HTTP server the API fakes share."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.default: Scripted | None = None
        self._scripted: deque[Scripted] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Requests per second the fake lets through (None: no limit); see `_admit`.
        self.rate: float | None = None
        self.throttled = 0  # requests answered 429 by the rate limit
        self._window_start = 0.0
        self._window_count = 0

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> Self:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # `stop` waits up to one poll interval for the loop to notice.
            kwargs={"poll_interval": 0.02},
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # --- scripting -----------------------------------------------------------

    def script(
        self,
        status: int,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        *,
        delay: float = 0.0,
    ) -> None:
        """Queue the next answer; several calls queue several answers."""
        with self._lock:
            self._scripted.append(Scripted(status, body, dict(headers or {}), delay))

    def answer(self, request: Recorded) -> Scripted:
        """The documented behaviour of the API (called under the lock)."""
        raise NotImplementedError

    def throttle(self, limit: int, reset: int) -> Scripted:
        """The API's own 429 for a request past the rate limit."""
        raise NotImplementedError

    def _admit(self) -> Scripted | None:
        """A fixed one-second window of `rate` requests, as both APIs count.

        Past it, the API's 429 naming the whole seconds left in the window:
        waiting that long always lands in a fresh window.
        """
        if self.rate is None:
            return None
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        limit = max(1, int(self.rate))
        if self._window_count < limit:
            self._window_count += 1
            return None
        self.throttled += 1
        reset = max(1, math.ceil(1.0 - (now - self._window_start)))
        return self.throttle(limit, reset)

    def _respond(self, request: Recorded) -> Scripted:
        with self._lock:
            self.requests.append(request)
            if self._scripted:
                return self._scripted.popleft()
            if self.default is not None:
                return self.default
            return self._admit() or self.answer(request)


class _Server(ThreadingHTTPServer):
    fake: FakeUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is a case under test, not a failure.
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs offer
    timeout = 10  # an idle kept-alive connection must not hold a thread for ever
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        fake = self.server.fake
        request = Recorded(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            json=parsed,
            peer=(str(self.client_address[0]), int(self.client_address[1])),
        )
        reply = fake._respond(request)
        if reply.delay:
            fake._stopping.wait(reply.delay)
        if reply.wait is not None:
            reply.wait.wait(30)
        if reply.then is not None:
            reply.then()
        if isinstance(reply.body, bytes | str):
            payload = reply.body.encode() if isinstance(reply.body, str) else reply.body
            content_type = "text/html; charset=utf-8"
        else:
            payload = json.dumps(reply.body).encode()
            content_type = "application/json"
        try:
            self.send_response(reply.status)
            for name, value in {"Content-Type": content_type, **reply.headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    do_GET = do_POST
    do_PUT = do_POST
    do_DELETE = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        return None


# --- Resend ------------------------------------------------------------------


def resend_error(status: int, name: str, message: str | None = None) -> dict[str, Any]:
    """A Resend error body, with the documented message for `name` by default."""
    text = RESEND_ERRORS[name][1] if message is None else message
    return {"statusCode": status, "name": name, "message": text}


# Resend's documented errors, name -> (status, message): resend.com/docs/api-reference/errors
# (errors.md), the name list in resend-node src/interfaces.ts (RESEND_ERROR_CODE_KEY).
# `monthly_quota_exceeded` is in resend-node's list; its 429 is by analogy with the
# daily quota. No `suspended_api_key` is published anywhere we found.
RESEND_ERRORS: dict[str, tuple[int, str]] = {
    "invalid_idempotency_key": (400, "The key must be between 1-256 chars."),
    "validation_error": (400, "We found an error with one or more fields in the request."),
    "missing_api_key": (401, "Missing API key in the authorization header."),
    "restricted_api_key": (401, "This API key is restricted to only send emails."),
    "invalid_api_key": (403, "API key is invalid."),
    "not_found": (404, "The requested endpoint does not exist."),
    "method_not_allowed": (405, "Method is not allowed for the requested path."),
    "invalid_idempotent_request": (
        409,
        "Same idempotency key used with a different request payload.",
    ),
    "concurrent_idempotent_requests": (
        409,
        "Same idempotency key used while original request is still in progress.",
    ),
    "invalid_attachment": (422, "Attachment must have either a `content` or `path`."),
    "invalid_from_address": (422, "Invalid `from` field."),
    "invalid_access": (422, "Access must be 'full_access' | 'sending_access'."),
    "invalid_parameter": (422, "The `to` field must be a valid email address."),
    "invalid_region": (422, "Region must be 'us-east-1' | 'eu-west-1' | 'sa-east-1'."),
    "missing_required_field": (422, "The request body is missing one or more required fields."),
    "daily_quota_exceeded": (429, "You have reached your daily email sending quota."),
    "monthly_quota_exceeded": (429, "You have reached your monthly email sending quota."),
    "rate_limit_exceeded": (
        429,
        "Too many requests. Please limit the number of requests per second.",
    ),
    "security_error": (451, "We may have found a security issue with the request."),
    "application_error": (500, "An unexpected error occurred."),
    "internal_server_error": (500, "An unexpected error occurred."),
}
# The other 403 `validation_error`s Resend documents: an unverified sending domain,
# and the testing address that may only send to its owner.
RESEND_UNVERIFIED_DOMAIN = (
    "The example.com domain is not verified. Please, add and verify your domain on "
    "https://resend.com/domains"
)
RESEND_TESTING_ONLY = (
    "You can only send testing emails to your own email address (you@example.com)."
)


# SendEmailRequest's required fields (resend-openapi resend.yaml, components/schemas).
RESEND_REQUIRED = ("from", "to", "subject")


# resend.com/docs/dashboard/emails/idempotency-keys: "We keep idempotency keys in our
# system for 24 hours."
RESEND_IDEMPOTENCY_TTL = 24 * 3600


@dataclass
class _Kept:
    """A request kept under its idempotency key."""

    digest: str  # of its body
    answer: Scripted
    created: float  # time.monotonic()
    in_progress: bool = False


@dataclass(frozen=True)
class SentEmail:
    id: str
    request: Recorded
    item: Any = None  # its SendEmailRequest, when it came in a batch

    @property
    def json(self) -> Any:
        return self.item if self.item is not None else self.request.json


class FakeResend(FakeUpstream):
    """`POST /emails` as Resend answers it.

    `tokens`: the API keys it accepts (None: any). Honours `Idempotency-Key` on
    `POST /emails` and `POST /emails/batch` as resend.com/docs/dashboard/emails/
    idempotency-keys documents: a key (1-256 characters, else 400
    `invalid_idempotency_key`) of a request that sent is kept 24 hours; the same
    key with the same body is answered the original answer and sends nothing;
    with another body, 409 `invalid_idempotent_request`; while the first request
    is still in progress, 409 `concurrent_idempotent_requests`. A request that
    sent nothing (an error) keeps no key. The docs do not say whether keys are
    shared between the two endpoints; the fake keeps them apart (the relay never
    uses one key on both).

    `hold`: while set to an unset Event, each request that sends is held in
    progress (its emails counted as sent, its answer not yet written) until the
    Event is set: a relay killed with a request in flight.
    """

    def __init__(self, tokens: set[str] | None = None) -> None:
        super().__init__()
        self.tokens = tokens
        self.sent: list[SentEmail] = []
        self.batches: list[Recorded] = []  # each POST /emails/batch
        # Addresses a batch's validation refuses (a test's invalid `to`).
        self.invalid_to: set[str] = set()
        self._keys: dict[tuple[str, str], _Kept] = {}  # (path, key) -> its request
        self.hold: threading.Event | None = None

    def fail(
        self,
        status: int,
        name: str,
        message: str | None = None,
        *,
        retry_after: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Script the next answer as a Resend error."""
        headers = {"retry-after": retry_after} if retry_after is not None else {}
        self.script(status, resend_error(status, name, message), headers, delay=delay)

    def throttle(self, limit: int, reset: int) -> Scripted:
        # resend.com/docs/api-reference/rate-limit: draft-06 ratelimit-* headers
        # on every answer, retry-after on the 429.
        headers = {
            "ratelimit-limit": str(limit),
            "ratelimit-remaining": "0",
            "ratelimit-reset": str(reset),
            "retry-after": str(reset),
        }
        return Scripted(429, resend_error(429, "rate_limit_exceeded"), headers)

    def answer(self, request: Recorded) -> Scripted:
        if request.method != "POST" or request.path not in ("/emails", "/emails/batch"):
            return _resend_failure(404, "not_found")
        auth = request.headers.get("authorization")
        if auth is None:
            return _resend_failure(401, "missing_api_key")
        if not re.fullmatch(r"Bearer \S+", auth):
            # A malformed Authorization header: 400 `validation_error`, "API key is
            # invalid" (resend.com/docs/api-reference/errors), not a 401 or 403.
            return _resend_failure(400, "validation_error", "API key is invalid")
        if self.tokens is not None and auth[7:] not in self.tokens:
            return _resend_failure(403, "invalid_api_key")
        body = request.json
        if request.path == "/emails/batch":
            return self._batch(request)
        if not isinstance(body, dict):
            return _resend_failure(400, "validation_error", "Invalid JSON body.")
        invalid = _resend_invalid(body)
        if invalid is not None:
            return invalid

        return self._idempotent(request, self._send)

    def _send(self, request: Recorded) -> Scripted:
        email_id = str(uuid.uuid4())
        self.sent.append(SentEmail(email_id, request))
        return Scripted(200, {"id": email_id}, self._ratelimit_headers())

    def _idempotent(self, request: Recorded, send: Callable[[Recorded], Scripted]) -> Scripted:
        """`send(request)` under the request's Idempotency-Key, as the class says."""
        key = request.headers.get("idempotency-key")
        if key is None:
            return send(request)
        if not 1 <= len(key) <= 256:
            return _resend_failure(400, "invalid_idempotency_key")
        digest = hashlib.sha256(request.body).hexdigest()
        kept = self._keys.get((request.path, key))
        if kept is not None and time.monotonic() - kept.created >= RESEND_IDEMPOTENCY_TTL:
            del self._keys[(request.path, key)]  # kept 24 hours, then a new request
            kept = None
        if kept is not None:
            if kept.digest != digest:
                return _resend_failure(409, "invalid_idempotent_request")
            if kept.in_progress:
                return _resend_failure(409, "concurrent_idempotent_requests")
            return Scripted(kept.answer.status, kept.answer.body)
        answer = send(request)
        if answer.status != 200:
            return answer
        kept = _Kept(digest, answer, time.monotonic(), in_progress=self.hold is not None)
        self._keys[(request.path, key)] = kept
        if self.hold is None:
            return answer

        def done(kept: _Kept = kept) -> None:
            with self._lock:
                kept.in_progress = False

        return Scripted(answer.status, answer.body, answer.headers, wait=self.hold, then=done)

    def _batch(self, request: Recorded) -> Scripted:
        """`POST /emails/batch` (resend-openapi resend.yaml `emails/send-batch`): an
        array of up to 100 SendEmailRequest, answered `{"data": [{"id"}]}`. No
        attachments or scheduled_at in a batch (resend.com/docs/api-reference/emails/
        send-batch-emails). `x-batch-validation: permissive` (resend.com/changelog/
        batch-validation-modes) sends the valid emails and lists the others in
        `errors` by index; strict, the default, refuses the whole batch for one."""
        self.batches.append(request)
        items = request.json
        if not isinstance(items, list) or not 1 <= len(items) <= 100:
            return _resend_failure(422, "validation_error", "Batch must have 1 to 100 emails.")
        errors = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                errors.append({"index": index, "message": "Invalid email."})
                continue
            if item.get("attachments") or item.get("scheduled_at"):
                message = "Attachments and scheduling are not supported in batch sending."
                errors.append({"index": index, "message": message})
                continue
            invalid = _resend_invalid(item)
            if invalid is None and set(item.get("to") or ()) & self.invalid_to:
                invalid = _resend_failure(422, "invalid_parameter", "Invalid `to` field.")
            if invalid is not None:
                errors.append({"index": index, "message": invalid.body["message"]})
        permissive = request.headers.get("x-batch-validation") == "permissive"
        if errors and not permissive:
            return _resend_failure(422, "validation_error", errors[0]["message"])
        return self._idempotent(request, lambda request: self._send_batch(request, errors))

    def _send_batch(self, request: Recorded, errors: list[dict[str, Any]]) -> Scripted:
        refused = {e["index"] for e in errors}
        data = []
        for index, item in enumerate(request.json):
            if index in refused:
                continue
            email_id = str(uuid.uuid4())
            self.sent.append(SentEmail(email_id, request, item))
            data.append({"id": email_id})
        answer: dict[str, Any] = {"data": data}
        if request.headers.get("x-batch-validation") == "permissive":
            answer["errors"] = errors
        return Scripted(200, answer, self._ratelimit_headers())

    def _ratelimit_headers(self) -> dict[str, str]:
        if self.rate is None:
            return {}
        limit = max(1, int(self.rate))
        return {
            "ratelimit-limit": str(limit),
            "ratelimit-remaining": str(max(0, limit - self._window_count)),
            "ratelimit-reset": "1",
        }


def _resend_invalid(body: dict[str, Any]) -> Scripted | None:
    """A SendEmailRequest's validation, as Resend answers a bad one; None when valid."""
    # SendEmailRequest's `required` (resend-openapi resend.yaml); an empty
    # string counts as missing, as Resend's validation reads it.
    for required in RESEND_REQUIRED:
        if not body.get(required):
            return _resend_failure(422, "missing_required_field", f"Missing `{required}` field.")
    for name in ("subject", "text", "html"):
        if name in body and not isinstance(body[name], str):
            return _resend_failure(422, "validation_error", f"Invalid `{name}` field.")
    for attachment in body.get("attachments") or []:
        if (
            not isinstance(attachment, dict)
            or not _valid_base64(attachment.get("content"))
            or not attachment.get("filename")
        ):
            return _resend_failure(422, "invalid_attachment")
    return None


def _resend_failure(status: int, name: str, message: str | None = None) -> Scripted:
    return Scripted(status, resend_error(status, name, message))


def _valid_base64(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error:
        return False
    return True


# --- Cloudflare --------------------------------------------------------------

# The send_raw error codes, code -> (HTTP status, message), from cloudflare-docs
# src/content/docs/email-service/api/send-emails/rest-api.mdx ("REST API error codes").
CLOUDFLARE_ERRORS: dict[int, tuple[int, str]] = {
    10000: (404, "email.sending.error.not_found"),
    10001: (400, "email.sending.error.invalid_request_schema"),
    10002: (500, "email.sending.error.internal_server"),
    10003: (500, "email.sending.error.not_implemented"),
    10004: (429, "email.sending.error.throttled"),
    10100: (503, "email.sending.error.authentication.upstream"),
    10101: (401, "email.sending.error.authentication.unauthorized"),
    10102: (403, "email.sending.error.authentication.forbidden"),
    10103: (401, "email.sending.error.authentication.bad_token_type"),
    10105: (403, "email.sending.error.authentication.not_entitled"),
    10200: (400, "email.sending.error.email.too_big"),
    10201: (400, "email.sending.error.email.no_content_length"),
    10202: (400, "email.sending.error.email.invalid"),
    10203: (403, "email.sending.error.email.sending_disabled"),
}


def cloudflare_error(code: int, message: str | None = None) -> dict[str, Any]:
    """Cloudflare's v4 envelope for a failure, with the documented message by default."""
    text = CLOUDFLARE_ERRORS[code][1] if message is None else message
    return {
        "success": False,
        "errors": [{"code": code, "message": text}],
        "messages": [],
        "result": None,
    }


def cloudflare_failure(code: int, headers: Mapping[str, str] | None = None) -> Scripted:
    """The documented answer for `code`: its HTTP status and envelope."""
    return Scripted(CLOUDFLARE_ERRORS[code][0], cloudflare_error(code), dict(headers or {}))


# Cloudflare's documented maximum (email-service/platform/limits.mdx): 5 MiB per
# message including attachments, 25 MiB to verified destination addresses only;
# 50 recipients.
CLOUDFLARE_MAX_BYTES = 5 * 1024 * 1024
CLOUDFLARE_MAX_RECIPIENTS = 50


class FakeCloudflare(FakeUpstream):
    """`POST /accounts/{id}/email/sending/send_raw` as Cloudflare answers it.

    Every recipient is `delivered` unless `bounce` or `queue` named it. The
    answer's `result.message_id` is the message's own Message-ID, or a fresh one
    under Cloudflare's domain when `replace_message_id` (whether send_raw keeps
    the client's is not documented; tests cover both). A body that is not a
    parseable RFC 5322 message with a From is 10202 (invalid email content).
    """

    def __init__(self, account_id: str = "acct-1", token: str = "cf-token") -> None:
        super().__init__()
        self.account_id = account_id
        self.token = token
        self.sent: list[Recorded] = []
        self.replace_message_id = False
        self._bounces: set[str] = set()
        self._queued: set[str] = set()
        self._suppressed: dict[str, str] = {}  # address -> reason
        self.suppression_body: dict[str, Any] = SUPPRESSED_BODY

    @property
    def path(self) -> str:
        return f"/accounts/{self.account_id}/email/sending/send_raw"

    @property
    def suppressions_path(self) -> str:
        return f"/accounts/{self.account_id}/email/sending/suppressions"

    def suppress(self, address: str, reason: str = "hard_bounce") -> None:
        """Put `address` on the account's suppression list (`reason` as the API names it)."""
        with self._lock:
            self._suppressed[address.lower()] = reason

    def bounce(self, *addresses: str) -> None:
        """These recipients come back in `permanent_bounces`."""
        with self._lock:
            self._bounces.update(a.lower() for a in addresses)

    def queue(self, *addresses: str) -> None:
        """These recipients come back in `queued`."""
        with self._lock:
            self._queued.update(a.lower() for a in addresses)

    def fail(
        self,
        status: int,
        code: int,
        message: str | None = None,
        *,
        retry_after: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Script the next answer as a Cloudflare error (status 200 included)."""
        headers = {"retry-after": retry_after} if retry_after is not None else {}
        self.script(status, cloudflare_error(code, message), headers, delay=delay)

    def throttle(self, limit: int, reset: int) -> Scripted:
        return cloudflare_failure(10004, {"retry-after": str(reset)})

    def answer(self, request: Recorded) -> Scripted:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return cloudflare_failure(10101)
        path, _, query = request.path.partition("?")
        if request.method == "GET" and path == self.suppressions_path:
            return self._suppressions(parse_qs(query))
        if request.method != "POST" or request.path != self.path:
            return cloudflare_failure(10000)
        body = request.json
        recipients = body.get("recipients") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("from"), str)
            or "@" not in body["from"]
            or not isinstance(body.get("mime_message"), str)
            or not isinstance(recipients, list)
            or not recipients
            or len(recipients) > CLOUDFLARE_MAX_RECIPIENTS
            or not all(isinstance(a, str) and "@" in a for a in recipients)
        ):
            return cloudflare_failure(10001)
        if any(r.lower() in self._suppressed for r in recipients):
            # concepts/suppressions.mdx: through the REST API "Returns 400. If any
            # recipient is suppressed, Email Service rejects the entire request."
            return Scripted(400, self.suppression_body)
        mime = body["mime_message"]
        if len(mime.encode()) > CLOUDFLARE_MAX_BYTES:
            return cloudflare_failure(10200)
        head = mime.split("\r\n\r\n", 1)[0]
        if "\r\n\r\n" not in mime or not re.search(r"(?im)^from:", head):
            return cloudflare_failure(10202)

        found = re.search(r"(?im)^message-id:[ \t]*(<[^>\r\n]*>)", head)
        if self.replace_message_id or found is None:
            message_id = f"<{uuid.uuid4()}@cloudflare-email.net>"
        else:
            message_id = found.group(1)
        result: dict[str, Any] = {
            "delivered": [],
            "permanent_bounces": [],
            "queued": [],
            "message_id": message_id,
        }
        for rcpt in recipients:
            if rcpt.lower() in self._bounces:
                result["permanent_bounces"].append(rcpt)
            elif rcpt.lower() in self._queued:
                result["queued"].append(rcpt)
            else:
                result["delivered"].append(rcpt)
        if result["delivered"] or result["queued"]:
            self.sent.append(request)
        return Scripted(200, {"success": True, "errors": [], "messages": [], "result": result})

    def _suppressions(self, query: dict[str, list[str]]) -> Scripted:
        """`GET .../suppressions?email=ADDRESS`: the active entry for one complete
        address, or an empty `result` (configuration/suppressions.mdx)."""
        email = (query.get("email") or [""])[0].lower()
        entries = [
            {
                "id": hashlib.sha256(address.encode()).hexdigest()[:32],
                "email": address,
                "reason": reason,
                "created_at": "2026-01-01T00:00:00Z",
                # A soft bounce lasts 24 hours, a hard bounce 7 days (concepts/suppressions.mdx).
                "expires_at": None if reason in ("manual", "complaint") else "2026-01-08T00:00:00Z",
                "read_only": reason == "policy",
            }
            for address, reason in self._suppressed.items()
            if address == email
        ]
        return Scripted(
            200,
            {
                "success": True,
                "errors": [],
                "messages": [],
                "result": entries,
                "result_info": {"next_cursor": None, "per_page": 100},
            },
        )


# The suppression 400 has no code of its own in the published error table
# (concepts/suppressions.mdx, api/send-emails/rest-api.mdx); its words here are
# the fake's.
SUPPRESSED_BODY: dict[str, Any] = {
    "success": False,
    "errors": [{"message": "recipient is suppressed"}],
    "messages": [],
    "result": None,
}
