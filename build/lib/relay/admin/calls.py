"""What every admin API handler is given: the API's context, and one checked request."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.responses import JSONResponse, Response

from relay.store.audit import Actor
from relay.store.loop import AsyncStore

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
