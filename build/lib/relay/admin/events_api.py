"""The admin API's routes for suppressions and webhooks (`relay.events.manage`, the
operations the CLI calls), appended to `relay.admin.routes.ENDPOINTS`.

A webhook's URL is resolved and checked here, on the event loop (relay.events.urls),
before the operation runs on the store's thread; its secret is in the answer to
its creation only.
"""

from __future__ import annotations

from typing import Any, Protocol

from relay.admin.openapi import PREFIX, Endpoint, Field, Param
from relay.errors import Invalid
from relay.events import manage, urls
from relay.store.audit import Actor
from relay.store.outbox import EVENT_TYPES


class Call(Protocol):
    """What a handler gets (relay.admin.calls.Call)."""

    path: dict[str, str]
    query: dict[str, Any]
    body: dict[str, Any]
    actor: Actor
    context: Any

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any: ...


async def list_suppressions(call: Call) -> Any:
    return await call.run(manage.list_suppressions, call.path["name"])


async def add_suppression(call: Call) -> Any:
    expires_in = call.body.get("expires_in")
    if expires_in is not None and (isinstance(expires_in, bool) or not isinstance(expires_in, int)):
        raise Invalid("expires_in: a whole number of seconds", code="bad_expiry")
    return await call.run(
        manage.add_suppression,
        call.actor,
        call.path["name"],
        call.body["address"],
        reason=call.body.get("reason", "manual"),
        expires_in=expires_in,
    )


async def remove_suppression(call: Call) -> Any:
    return await call.run(
        manage.remove_suppression, call.actor, call.path["name"], call.path["address"]
    )


async def list_webhooks(call: Call) -> Any:
    return await call.run(manage.list_webhooks, call.path["name"])


async def add_webhook(call: Call) -> Any:
    url = call.body["url"]
    await urls.resolve(url, allow_private=bool(call.context.webhook_allow_private))
    events = call.body.get("events")
    if events is not None and (
        not isinstance(events, list) or not all(isinstance(e, str) for e in events)
    ):
        raise Invalid("events: a list of event types", code="bad_event_type")
    return await call.run(manage.add_webhook, call.actor, call.path["name"], url, events)


async def remove_webhook(call: Call) -> Any:
    return await call.run(manage.remove_webhook, call.actor, call.path["name"], call.path["id"])


async def test_webhook(call: Call) -> Any:
    return await call.run(manage.test_webhook, call.actor, call.path["name"], call.path["id"])


async def webhook_attempts(call: Call) -> Any:
    limit = call.query.get("limit") or 100
    return await call.run(manage.webhook_attempts, call.path["name"], call.path["id"], limit)


async def replay_event(call: Call) -> Any:
    return await call.run(manage.replay_event, call.actor, call.path["name"], call.path["event_id"])


NO_ACCOUNT = {"404": "no such account (`no_such_account`)"}
BAD_BODY = {"400": "the body is not JSON (`bad_json`)", "422": "a field is missing or wrong"}
SUPPRESSIONS = f"{PREFIX}/accounts/{{name}}/suppressions"
WEBHOOKS = f"{PREFIX}/accounts/{{name}}/webhooks"

ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "GET",
        SUPPRESSIONS,
        "list an account's active suppressions",
        list_suppressions,
        returns="entries: `address` (or `*@domain`), `reason`, `source`, `created`, `expires`",
        errors=NO_ACCOUNT,
    ),
    Endpoint(
        "POST",
        SUPPRESSIONS,
        "suppress an address or `*@domain` for an account (replaces an entry there)",
        add_suppression,
        201,
        body=(
            Field("address", "string", "an address, or `*@domain`", required=True, max_length=320),
            Field("reason", "string", "manual (default), hard-bounce, complaint, provider"),
            Field("expires_in", "integer", "seconds until it expires (none: until removed)"),
        ),
        errors={**NO_ACCOUNT, **BAD_BODY},
    ),
    Endpoint(
        "DELETE",
        f"{SUPPRESSIONS}/{{address}}",
        "remove a suppression",
        remove_suppression,
        errors={"404": "no such account, or the address is not suppressed"},
    ),
    Endpoint(
        "GET",
        WEBHOOKS,
        "list an account's webhook endpoints (never their secrets)",
        list_webhooks,
        errors=NO_ACCOUNT,
    ),
    Endpoint(
        "POST",
        WEBHOOKS,
        "add a webhook endpoint: the answer holds its signing `secret`, shown this once",
        add_webhook,
        201,
        body=(
            Field("url", "string", "https://... (the endpoint)", required=True, max_length=2000),
            Field("events", "array", f"event types (default: all): {', '.join(EVENT_TYPES)}"),
        ),
        errors={
            **NO_ACCOUNT,
            **BAD_BODY,
            "422": "a bad URL, one resolving to a private address (`private_address`),"
            " or an unknown event type",
        },
    ),
    Endpoint(
        "DELETE",
        f"{WEBHOOKS}/{{id}}",
        "remove a webhook endpoint and its queued events",
        remove_webhook,
        errors={"404": "no such account or endpoint"},
    ),
    Endpoint(
        "POST",
        f"{WEBHOOKS}/{{id}}/test",
        "queue a `webhook.test` event for an endpoint (re-enables a disabled one)",
        test_webhook,
        202,
        errors={"404": "no such account or endpoint"},
    ),
    Endpoint(
        "GET",
        f"{WEBHOOKS}/{{id}}/attempts",
        "an endpoint's delivery attempts, newest first",
        webhook_attempts,
        query=(Param("limit", "attempts at most (default 100, at most 1000)", "integer"),),
        returns="attempts: `created`, `event_id`, `type`, `status` (null: no answer),"
        " `duration_ms`, `answer` (its first 1 KiB), `state`",
        errors={"404": "no such account or endpoint"},
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/accounts/{{name}}/events/{{event_id}}/replay",
        "send one event again to the endpoints that had it",
        replay_event,
        202,
        errors={"404": "no such account or event"},
    ),
]
