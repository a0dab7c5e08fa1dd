"""The admin API (`/api/v1`): the CLI's operations as JSON over HTTP, on the admin listener.

Each route is a row of `ENDPOINTS` (relay.admin.openapi): its method, path, query
parameters and body fields, which both check the request and make the OpenAPI
document. A handler only turns the checked request into a call of
`relay.admin.operations` (the functions the CLI calls), run on the store's thread.

Authentication, in this order, for every route but the OpenAPI document:
1. Throttle: an address with `RELAY_AUTH_FAILURE_LIMIT` failed attempts (SMTP
   AUTH and the API count together, relay.store.throttle) in the last 15 minutes gets
   `429 throttled`, even with a good token, until the oldest leaves the window.
2. `Authorization: Bearer <admin token>`: missing, malformed, unknown, revoked,
   expired, or a sending token (`rlt_`, another table) is `401 unauthorized`,
   and counts as a failed attempt.

Errors are `{"error": {"code", "message"}}`: 400 bad JSON, 401, 404, 409, 413
(a body over MAX_BODY), 422 bad input, 429, 503 when the store fails. Anything
unexpected is logged here with its traceback and answered `500 internal`,
never with the traceback.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.admin import provider_hooks
from relay.admin.calls import MAX_BODY, MAX_TOKEN, ApiContext, Call, error
from relay.admin.openapi import PREFIX, Endpoint, check_body, check_query, document
from relay.admin.routes import ENDPOINTS
from relay.errors import AdminError, Invalid, StoreError
from relay.network import client_key
from relay.store.audit import Actor
from relay.store.throttle import AUTH_FAILURE_WINDOW

log = logging.getLogger("relay.api")


class BodyTooLarge(Exception):
    pass


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _authenticate(context: ApiContext, request: Request) -> Actor | Response:
    store = context.store
    address = request.client.host if request.client else ""
    client = client_key(address)  # the same count as SMTP AUTH's (relay.store.throttle)
    if await store.auth_failures(client) >= context.auth_failure_limit:
        return error(
            429,
            "throttled",
            "too many failed attempts from this address; try again later",
            {"Retry-After": str(AUTH_FAILURE_WINDOW)},
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    admin = None
    if scheme.lower() == "bearer" and 0 < len(token) <= MAX_TOKEN:
        admin = await store.authenticate_admin(token)
    if admin is None:
        await store.record_auth_failure(client)
        return error(
            401,
            "unauthorized",
            "an admin token is required: Authorization: Bearer <token> (relay admin-token create)",
            {"WWW-Authenticate": 'Bearer realm="relay admin"'},
        )
    return Actor(admin, address)


def _route(endpoint: Endpoint, context: ApiContext) -> Route:
    async def serve(request: Request) -> Response:
        try:
            actor = await _authenticate(context, request)
            if isinstance(actor, Response):
                return actor
            raw = await _read_body(request) if endpoint.body is not None else b""
            call = Call(
                context,
                dict(request.path_params),
                check_query(endpoint, request.query_params),
                check_body(endpoint, raw),
                actor,
            )
            value = await endpoint.handler(call)
        except BodyTooLarge:
            return error(413, "body_too_large", f"the body may be at most {MAX_BODY} bytes")
        except Invalid as exc:
            status = 400 if exc.code == "bad_json" else exc.status
            return error(status, exc.code, str(exc))
        except AdminError as exc:
            return error(exc.status, exc.code, str(exc))
        except StoreError as exc:
            log.warning("admin API: the store failed: %s", exc)
            return error(503, "store_unavailable", "the store did not answer; try again")
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse(value, status_code=endpoint.status)

    return Route(endpoint.path, serve, methods=[endpoint.method])


OPENAPI_PATH = f"{PREFIX}/openapi.json"
# Routes that take no token: the document, the console's files, and what
# Prometheus and orchestrators poll (relay.admin.app says why).
PUBLIC = [
    ("GET", OPENAPI_PATH, "this document"),
    ("GET", "/metrics", "Prometheus metrics (no token: scrapers poll it)"),
    ("GET", "/healthz", "liveness (no token)"),
    ("GET", "/readyz", "readiness (no token)"),
    ("POST", "/hooks/resend", "Resend's signed webhooks (no token: the signature is the key)"),
]


def routes(context: ApiContext) -> list[Route]:
    spec = document(ENDPOINTS, PUBLIC)

    async def openapi(request: Request) -> Response:
        return JSONResponse(spec)

    return [
        Route(OPENAPI_PATH, openapi),
        provider_hooks.route(context),
        *(_route(ep, context) for ep in ENDPOINTS),
    ]
