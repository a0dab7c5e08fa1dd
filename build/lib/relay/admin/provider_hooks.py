"""`POST /hooks/resend`: Resend's signed events, on the admin listener.

The only route besides health that takes no admin token: its key is the
signature (relay.events.provider), checked before anything is read into the
store. Answers: 204 taken (or a repeat, or a type the relay does not act on),
401 a missing, forged or stale signature, 400 a body that is not a Resend
event, 404 a sender domain no account owns, 503 when the store fails (Resend
sends it again later).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.errors import StoreError
from relay.events import provider

log = logging.getLogger("relay.api")
PATH = "/hooks/resend"


def route(context: Any) -> Route:
    async def hook(request: Request) -> Response:
        secret = context.resend_webhook_secret
        if not secret:
            return _error(404, "not_configured", "RESEND_WEBHOOK_SECRET is not set")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > provider.MAX_BODY:
                return _error(413, "body_too_large", "the body is too large")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            provider.verify(str(secret), headers, body, int(time.time()))
        except provider.Refused as exc:
            log.warning("POST %s refused: %s", PATH, exc)
            return _error(401, "bad_signature", "not a genuine, fresh Resend event")
        try:
            event = provider.parse(headers, body)
        except provider.Refused as exc:
            return _error(400, "bad_event", str(exc))
        if event is None:
            return Response(status_code=204)
        store = context.store
        apply = functools.partial(
            store.sync.apply_provider_event,
            event.event_id,
            event.domain,
            event.relay_type,
            event.recipients,
            event.suppress,
            event.data,
        )
        try:
            outcome = await store.in_thread(apply)
        except StoreError:
            # Resend retries a failed delivery: a 503 loses nothing.
            return _error(503, "store_unavailable", "the store did not answer")
        if outcome == "unknown domain":
            return _error(404, "unknown_domain", "no account owns the sender's domain")
        log.info("resend %s for %s: %s", event.data["provider_type"], event.domain, outcome)
        return Response(status_code=204)

    return Route(PATH, hook, methods=["POST"])


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
