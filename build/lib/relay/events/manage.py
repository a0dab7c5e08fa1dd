"""What an operator can do with suppressions and webhooks, once: the `relay` CLI and
the admin API both call these (as `relay.admin.operations` for the rest).

Each checks its input (`Invalid`), translates the store's refusals into
`NotFound`, and records every change in the audit log with its `Actor`; never
a webhook's secret, which only `add_webhook`'s answer holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from relay.errors import AdminError, NotFound, RelayError, StoreError
from relay.events import urls
from relay.store.audit import Actor
from relay.store.facade import Store
from relay.store.rows import NewWebhook, SuppressionRow, WebhookAttemptRow, WebhookRow

log = logging.getLogger("relay.webhooks")


@contextmanager
def _account(account: str) -> Iterator[None]:
    """The store's "no account named" (a plain `RelayError`) as a 404."""
    try:
        yield
    except (AdminError, StoreError):
        raise
    except RelayError as exc:
        raise NotFound(str(exc), code="no_such_account") from None


# --- suppressions ------------------------------------------------------------------


def add_suppression(
    store: Store,
    actor: Actor,
    account: str,
    address: str,
    *,
    reason: str = "manual",
    expires_in: int | None = None,
) -> SuppressionRow:
    with _account(account):
        row = store.add_suppression(
            account, address, reason=reason, source=f"admin: {actor.who}", expires_in=expires_in
        )
    detail = {"address": row["address"], "reason": row["reason"], "expires": row["expires"]}
    store.record_audit(actor, "suppression.add", account, detail)
    return row


def remove_suppression(store: Store, actor: Actor, account: str, address: str) -> dict[str, Any]:
    with _account(account):
        store.remove_suppression(account, address)
    store.record_audit(actor, "suppression.remove", account, {"address": address.lower()})
    return {"account": account, "address": address.lower(), "removed": True}


def list_suppressions(store: Store, account: str) -> list[SuppressionRow]:
    with _account(account):
        return store.list_suppressions(account)


# --- webhooks ----------------------------------------------------------------------


def check_url(url: str, *, allow_private: bool) -> str:
    """The endpoint URL, checked and resolved now (`Invalid` otherwise); a warning
    for plain http:// (loopback only)."""
    asyncio.run(urls.resolve(url, allow_private=allow_private))
    if urls.parse(url)[0] == "http":
        log.warning("webhook URL is plain http:// to a loopback host: for tests only")
    return url


def add_webhook(
    store: Store, actor: Actor, account: str, url: str, events: str | list[str] | None
) -> NewWebhook:
    """A new endpoint. `url` must have passed `check_url` (the caller resolves it:
    the CLI at once, the API off its event loop)."""
    with _account(account):
        value = store.add_webhook(account, url, events)
    # The URL's path may hold the receiver's own secret: the audit keeps the host.
    detail = {"id": value["id"], "host": urls.parse(url)[1], "events": value["events"]}
    store.record_audit(actor, "webhook.add", account, detail)
    return value


def list_webhooks(store: Store, account: str) -> list[WebhookRow]:
    with _account(account):
        return store.list_webhooks(account)


def remove_webhook(store: Store, actor: Actor, account: str, endpoint_id: str) -> dict[str, Any]:
    with _account(account):
        store.remove_webhook(account, endpoint_id)
    store.record_audit(actor, "webhook.remove", account, {"id": endpoint_id})
    return {"account": account, "id": endpoint_id, "removed": True}


def test_webhook(store: Store, actor: Actor, account: str, endpoint_id: str) -> dict[str, Any]:
    with _account(account):
        event_id = store.test_webhook(account, endpoint_id)
    store.record_audit(actor, "webhook.test", account, {"id": endpoint_id})
    return {"account": account, "id": endpoint_id, "event_id": event_id, "queued": True}


def replay_event(store: Store, actor: Actor, account: str, event_id: str) -> dict[str, Any]:
    with _account(account):
        count = store.replay_webhook_event(account, event_id)
    store.record_audit(actor, "webhook.replay", account, {"event_id": event_id})
    return {"account": account, "event_id": event_id, "queued": count}


def webhook_attempts(
    store: Store, account: str, endpoint_id: str, limit: int = 100
) -> list[WebhookAttemptRow]:
    with _account(account):
        return store.list_webhook_attempts(account, endpoint_id, limit)
