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

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.admin import events_api, operations, provider_hooks
from relay.admin.openapi import PREFIX, Endpoint, Field, Param, check_body, check_query, document
from relay.errors import AdminError, Invalid, StoreError
from relay.network import client_key
from relay.store.audit import Actor
from relay.store.deliveries import Outcome
from relay.store.loop import AsyncStore
from relay.store.queue import STATES as QUEUE_STATES
from relay.store.throttle import AUTH_FAILURE_WINDOW

log = logging.getLogger("relay.api")
T = TypeVar("T")
# The largest request body: every body of this API is a few fields.
MAX_BODY = 64 * 1024
# A bearer token longer than this is not one of ours (they are 47 characters).
MAX_TOKEN = 512
DEFAULT_PAGE = 100


@dataclass(frozen=True)
class ApiContext:
    """What the API uses: the store, the throttle's limit, and the balance a sender
    never charged has (DEFAULT_SEND_BALANCE)."""

    store: AsyncStore
    auth_failure_limit: int
    default_send_balance: int = 0
    # RELAY_WEBHOOK_ALLOW_PRIVATE: a webhook endpoint may resolve to a private address.
    webhook_allow_private: bool = False
    # RESEND_WEBHOOK_SECRET: POST /hooks/resend takes Resend's events signed with it.
    resend_webhook_secret: str | None = None


@dataclass(frozen=True)
class Call:
    """One checked request: its path parameters, query, body, and who makes it."""

    context: ApiContext
    path: dict[str, str]
    query: dict[str, Any]
    body: dict[str, Any]
    actor: Actor

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(store, *args, **kwargs)`, an operation, on the store's thread."""
        store = self.context.store
        return await store.in_thread(functools.partial(fn, store.sync, *args, **kwargs))


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


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


# --- handlers ------------------------------------------------------------------------


def _page(call: Call) -> int:
    limit = call.query.get("limit", DEFAULT_PAGE)
    assert isinstance(limit, int)
    return limit


async def list_accounts(call: Call) -> Any:
    return {"accounts": await call.run(operations.list_accounts)}


async def create_account(call: Call) -> Any:
    return await call.run(operations.create_account, call.actor, call.body["name"])


async def set_account(call: Call) -> Any:
    return await call.run(
        operations.set_account, call.actor, call.path["name"], queue=call.body.get("queue")
    )


async def list_domains(call: Call) -> Any:
    return {"domains": await call.run(operations.list_domains, call.path["name"])}


async def add_domain(call: Call) -> Any:
    return await call.run(operations.add_domain, call.actor, call.path["name"], call.body["domain"])


async def remove_domain(call: Call) -> Any:
    return await call.run(
        operations.remove_domain, call.actor, call.path["name"], call.path["domain"]
    )


async def list_tokens(call: Call) -> Any:
    return {"tokens": await call.run(operations.list_tokens, call.path["name"])}


async def create_token(call: Call) -> Any:
    return await call.run(
        operations.create_token,
        call.actor,
        call.path["name"],
        name=call.body.get("name", ""),
        role=call.body.get("role", ""),
        expires_in_days=call.body.get("expires_in_days"),
        **{k: call.body[k] for k in RULE_KEYS if k in call.body},
    )


async def show_token(call: Call) -> Any:
    return await call.run(operations.show_token, call.path["id"])


async def set_token(call: Call) -> Any:
    return await call.run(
        operations.set_token,
        call.actor,
        call.path["id"],
        **{k: call.body[k] for k in RULE_KEYS if k in call.body},
    )


async def revoke_token(call: Call) -> Any:
    return await call.run(operations.revoke_token, call.actor, call.path["id"])


async def list_senders(call: Call) -> Any:
    rows, cursor = await call.run(
        operations.list_senders,
        prefix=call.query.get("prefix", ""),
        limit=_page(call),
        cursor=call.query.get("cursor"),
    )
    return {"senders": rows, "next_cursor": cursor}


async def show_sender(call: Call) -> Any:
    return await call.run(
        operations.show_sender,
        call.path["address"],
        default_balance=call.context.default_send_balance,
    )


async def set_sender(call: Call) -> Any:
    return await call.run(
        operations.set_sender,
        call.actor,
        call.path["address"],
        balance=call.body.get("balance"),
        enabled=call.body.get("enabled"),
    )


async def delete_sender(call: Call) -> Any:
    return await call.run(operations.delete_sender, call.actor, call.path["address"])


async def topup_sender(call: Call) -> Any:
    return await call.run(
        operations.topup_sender, call.actor, call.path["address"], call.body["amount"]
    )


def _lists(kind: str) -> tuple[Callable[[Call], Awaitable[Any]], ...]:
    async def listing(call: Call) -> Any:
        return {"addresses": await call.run(operations.list_addresses, kind)}

    async def add(call: Call) -> Any:
        return await call.run(operations.add_to_list, call.actor, kind, call.body["address"])

    async def remove(call: Call) -> Any:
        return await call.run(operations.remove_from_list, call.actor, kind, call.path["address"])

    return listing, add, remove


async def show_limits(call: Call) -> Any:
    return {"limits": await call.run(operations.show_limits)}


async def set_limits(call: Call) -> Any:
    return await call.run(
        operations.set_limits,
        call.actor,
        account=call.body.get("account"),
        daily=call.body.get("daily"),
        monthly=call.body.get("monthly"),
    )


async def find_log(call: Call) -> Any:
    query = operations.log_query(**{"limit": 50, **call.query})
    records, cursor = await call.run(operations.find_log, query)
    return {"records": [r.as_json() for r in records], "next_cursor": cursor}


async def show_log(call: Call) -> Any:
    records = await call.run(operations.show_log, call.path["message_id"])
    return {"records": [r.as_json() for r in records]}


async def list_audit(call: Call) -> Any:
    rows, cursor = await call.run(
        operations.audit, limit=_page(call), cursor=call.query.get("cursor")
    )
    return {"records": rows, "next_cursor": cursor}


# --- the durable queue (docs/queue.md) ------------------------------------------------


async def queue_list(call: Call) -> Any:
    return {
        "messages": await call.run(
            operations.queue_list,
            state=call.query.get("state"),
            account=call.query.get("account"),
        )
    }


async def queue_show(call: Call) -> Any:
    return await call.run(operations.queue_show, call.path["id"])


def _queue_action(action: str) -> Callable[[Call], Awaitable[Any]]:
    async def handler(call: Call) -> Any:
        return await call.run(operations.queue_set, call.actor, call.path["id"], action)

    return handler


async def queue_cancel(call: Call) -> Any:
    return await call.run(operations.queue_cancel, call.actor, call.path["id"])


# --- the route table -----------------------------------------------------------------

NO_ACCOUNT = {"404": "no such account (`no_such_account`)"}
BAD_BODY = {"400": "the body is not JSON (`bad_json`)", "422": "a field is missing or wrong"}
BAD_ADDRESS = {"422": "not a usable email address (`bad_address`)"}
PAGING = (
    Param("limit", "rows at most (default 100, at most 1000)", "integer"),
    Param("cursor", "the `next_cursor` of the previous page"),
)
SENDER_FIELDS = (
    "the sender: `address`, `balance`, `enabled`, `created`, `updated` (unix seconds, null"
    " when no row), `unlimited` (on the no-limit list: sends without balance), `stored`"
    " (whether the relay holds a row for it)"
)
ADDRESS = Field("address", "string", "an email address", required=True, max_length=320)
RULE_KEYS = ("senders", "networks", "rates", "rcpt_rates")
TOKEN_RULES = (
    Field(
        "senders",
        "array",
        "the senders it may use: addresses, `*@domain` or domains, all of the account's"
        " domains (none: any address of them)",
        max_length=100,
    ),
    Field(
        "networks",
        "array",
        "CIDR ranges (IPv4, IPv6) it may AUTH from (none: anywhere)",
        max_length=100,
    ),
    Field(
        "rates",
        "array",
        "messages per window: `60/minute`, `1000/day` (none: no limit)",
        max_length=3,
    ),
    Field("rcpt_rates", "array", "recipients per window, as `rates`", max_length=3),
)
RULES_ANSWER = (
    "the token, never its secret: `id`, `account`, `name`, `role`, `created`, `expires`,"
    " `revoked`, `status` (active, revoked, expired), and its rules: `senders`, `networks`,"
    " `rates`, `rcpt_rates` (each empty when it has none)"
)
BAD_RULE = (
    "a field is missing or wrong (`bad_body`), or a rule is (`bad_sender`: not an address,"
    " `*@domain` or domain of the account; `bad_network`; `bad_rate`: not N/minute, N/hour"
    " or N/day with N from 1)"
)
verified_list, verified_add, verified_remove = _lists("verified")
nolimit_list, nolimit_add, nolimit_remove = _lists("nolimit")
NO_QUEUED = {
    "404": "no such queued message (`no_such_message`)",
    "422": "not a queued message's id (`bad_id`)",
}
QUEUE_FIELDS = (
    "a queued message: `id`, `message_id`, `created`, `account`, `sender`, `recipients`,"
    " `done` (each finished recipient's reply), `size`, `state` (queued or held), `tries`,"
    " `next_try` (unix seconds), `last_code`, `last_text`, `lease_owner` and `lease_until`"
    " (an attempt runs), `attempts` (channel, code, enhanced code, text, seconds)"
)

ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", f"{PREFIX}/accounts", "list accounts", list_accounts),
    Endpoint(
        "POST",
        f"{PREFIX}/accounts",
        "create an account",
        create_account,
        201,
        body=(Field("name", "string", "the account's name", required=True, max_length=100),),
        errors={**BAD_BODY, "409": "an account of that name exists (`account_exists`)"},
    ),
    Endpoint(
        "PATCH",
        f"{PREFIX}/accounts/{{name}}",
        "set an account's own settings",
        set_account,
        returns="the account: `id`, `name`, `created`, `queue` (null: the relay's RELAY_QUEUE)",
        body=(
            Field(
                "queue",
                "string",
                "its own RELAY_QUEUE: off, on-failure, always, or default (the relay's)",
                max_length=20,
            ),
        ),
        errors={**NO_ACCOUNT, **BAD_BODY},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/accounts/{{name}}/domains",
        "list an account's sender domains",
        list_domains,
        errors=NO_ACCOUNT,
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/accounts/{{name}}/domains",
        "onboard a sender domain on an account",
        add_domain,
        201,
        body=(Field("domain", "string", "a domain name", required=True, max_length=255),),
        errors={
            **NO_ACCOUNT,
            **BAD_BODY,
            "409": "the domain is onboarded on an account already (`domain_taken`)",
        },
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/accounts/{{name}}/domains/{{domain}}",
        "remove a sender domain from an account",
        remove_domain,
        errors={"404": "no such account or domain on it"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/accounts/{{name}}/tokens",
        "list an account's sending tokens (never their secrets)",
        list_tokens,
        errors=NO_ACCOUNT,
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/accounts/{{name}}/tokens",
        "issue a sending token: the answer holds `token`, shown this once",
        create_token,
        201,
        body=(
            Field("name", "string", "a label", max_length=100),
            Field("expires_in_days", "number", "days until it expires (none: never)"),
            Field("role", "string", "a role, see NO_LIMIT_SEND_ROLE", max_length=100),
            *TOKEN_RULES,
        ),
        errors={**NO_ACCOUNT, **BAD_BODY, "422": BAD_RULE},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/tokens/{{id}}",
        "show a sending token and its rules (never its secret)",
        show_token,
        returns=RULES_ANSWER,
        errors={"404": "no token with that id (`no_such_token`)"},
    ),
    Endpoint(
        "PATCH",
        f"{PREFIX}/tokens/{{id}}",
        "replace a token's senders, networks, rates or rcpt_rates (the fields given; an"
        " empty list clears one); its open sessions follow from their next MAIL FROM, the"
        " networks from their next AUTH",
        set_token,
        returns=RULES_ANSWER,
        body=TOKEN_RULES,
        errors={**BAD_BODY, "404": "no token with that id (`no_such_token`)", "422": BAD_RULE},
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/tokens/{{id}}",
        "revoke a sending token (its open sessions stop at their next MAIL or end of DATA)",
        revoke_token,
        errors={"404": "no active token with that id (`no_such_token`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/senders",
        "list sender rows by address, a page at a time",
        list_senders,
        query=(Param("prefix", "only addresses that start with this"), *PAGING),
        errors={"422": "a bad query parameter (`bad_query`, `bad_limit`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/senders/{{address}}",
        "show one sender's balance and state",
        show_sender,
        returns=SENDER_FIELDS + "; an address never charged shows DEFAULT_SEND_BALANCE,"
        " `enabled: true`, `stored: false`",
        errors=BAD_ADDRESS,
    ),
    Endpoint(
        "PATCH",
        f"{PREFIX}/senders/{{address}}",
        "set a sender's balance and/or enabled state (creates the row when missing)",
        set_sender,
        returns=SENDER_FIELDS,
        body=(
            Field("balance", "integer", "the new balance (0 or more)"),
            Field("enabled", "boolean", "whether the sender may send"),
        ),
        errors={**BAD_BODY, **BAD_ADDRESS},
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/senders/{{address}}",
        "delete a sender row (it starts again from DEFAULT_SEND_BALANCE)",
        delete_sender,
        errors={**BAD_ADDRESS, "404": "no sender row (`no_such_sender`)"},
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/senders/{{address}}/topup",
        "add to a sender's balance (negative: take away; creates the row when missing)",
        topup_sender,
        returns=SENDER_FIELDS,
        body=(Field("amount", "integer", "units to add", required=True),),
        errors={**BAD_BODY, "409": "the balance would go below 0 (`balance_negative`)"},
    ),
    Endpoint("GET", f"{PREFIX}/verified", "list verified recipients", verified_list),
    Endpoint(
        "POST",
        f"{PREFIX}/verified",
        "add a verified recipient (adding it twice is no error)",
        verified_add,
        201,
        body=(ADDRESS,),
        errors=BAD_BODY,
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/verified/{{address}}",
        "remove a verified recipient",
        verified_remove,
        errors={**BAD_ADDRESS, "404": "not on the list (`not_on_list`)"},
    ),
    Endpoint("GET", f"{PREFIX}/nolimit", "list senders that send without balance", nolimit_list),
    Endpoint(
        "POST",
        f"{PREFIX}/nolimit",
        "add a sender to the no-limit list (adding it twice is no error)",
        nolimit_add,
        201,
        body=(ADDRESS,),
        errors=BAD_BODY,
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/nolimit/{{address}}",
        "remove a sender from the no-limit list",
        nolimit_remove,
        errors={**BAD_ADDRESS, "404": "not on the list (`not_on_list`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/limits",
        "send limits, with the counts of the current UTC day and month and their resets",
        show_limits,
    ),
    Endpoint(
        "PUT",
        f"{PREFIX}/limits",
        "set the relay's (or one account's) daily and/or monthly limit",
        set_limits,
        body=(
            Field("daily", "integer", "-1 unlimited, 0 blocks sending, or a count"),
            Field("monthly", "integer", "-1 unlimited, 0 blocks sending, or a count"),
            Field("account", "string", "limit this account instead of the relay", max_length=100),
        ),
        errors={**BAD_BODY, **NO_ACCOUNT},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/log",
        "the delivery log, newest first (the filters of `relay log`)",
        find_log,
        query=(
            Param("since", "a duration back (2h, 1d) or an ISO 8601 time"),
            Param("until", "a duration back (2h, 1d) or an ISO 8601 time"),
            Param("sender", "the envelope sender"),
            Param("recipient", "one of the recipients"),
            Param("account", "the account's name"),
            Param("outcome", "the message's outcome", enum=tuple(str(o) for o in Outcome)),
            Param("message_id", "the Message-ID, with or without its angle brackets"),
            Param("limit", "records at most (default 50)", "integer"),
            Param("cursor", "the `next_cursor` of the previous page", "integer"),
        ),
        errors={"422": "a bad filter (`bad_query`, `bad_time`, `bad_limit`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/log/{{message_id:path}}",
        "everything recorded for a Message-ID (a retried message has several records)",
        show_log,
        errors={
            "404": "no record (`no_such_message`)",
            "422": "a blank Message-ID (`bad_message_id`)",
        },
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/audit",
        "the audit log of changes, newest first",
        list_audit,
        query=(
            Param("limit", "records at most (default 100, at most 1000)", "integer"),
            Param("cursor", "the `next_cursor` of the previous page", "integer"),
        ),
        errors={"422": "a bad query parameter"},
    ),
    # --- the durable queue (docs/queue.md)
    Endpoint(
        "GET",
        f"{PREFIX}/queue",
        "queued messages, oldest first (`relay queue list`)",
        queue_list,
        query=(
            Param("state", "only messages in this state", enum=QUEUE_STATES),
            Param("account", "only this account's messages"),
        ),
        returns=QUEUE_FIELDS,
        errors={"422": "a bad filter (`bad_query`, `bad_state`)"},
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/queue/{{id}}",
        "one queued message with its attempts and next try (`relay queue show`)",
        queue_show,
        returns=QUEUE_FIELDS,
        errors=NO_QUEUED,
    ),
    *(
        Endpoint(
            "POST",
            f"{PREFIX}/queue/{{id}}/{action}",
            f"{summary}; `all` for every queued message (`relay queue {action}`)",
            _queue_action(action),
            returns="`action`, `changed`: how many messages it changed",
            errors=NO_QUEUED,
        )
        for action, summary in (
            ("retry", "make a queued message due now"),
            ("hold", "hold a queued message: no attempt until released"),
            ("release", "release a held message"),
        )
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/queue/{{id}}/cancel",
        "end a queued message: the undelivered part refunded, a final record (`550 5.0.0`)",
        queue_cancel,
        returns="`id`, `cancelled`, `refunded`: the units given back",
        errors={**NO_QUEUED, "409": "an attempt holds it now (`attempt_running`)"},
    ),
]
ENDPOINTS += events_api.ENDPOINTS
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
