"""A queued message as the delivery queue keeps it and as operators see it, and the
data of its message events (docs/events.md): `message.queued` when it is kept,
`message.deferred` for each retry scheduled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from relay import replies
from relay.store.db import Row


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message as `enqueue` keeps it."""

    message_id: str
    account: str
    account_id: int
    token_id: str
    client: str
    sender: str
    envelope_from: str
    recipients: tuple[tuple[str, str], ...]  # (as written, normalized)
    content: bytes
    size: int
    idempotency_key: str
    routes: tuple[tuple[str, bool, int], ...]  # (channel, charges, rule)
    reservation_id: int
    reservation_created: int | None
    listener: str = "smtps"  # the port it came in on: its final record names it
    # Message events go with the delivery log (docs/events.md): none while it is off.
    events: bool = True


def queued_data(
    message: QueuedMessage, attempts: str, last_code: int | None, last_text: str, now: int
) -> dict[str, Any]:
    """`message.queued`'s data: a message event's shape (docs/events.md), each
    recipient `queued` with the last reply that deferred it (none under `always`)."""
    last = f"{last_code} {last_text}".strip() if last_code is not None else ""
    return {
        "message_id": message.message_id,
        "delivery_id": None,
        "account": message.account,
        "token_id": message.token_id,
        "sender": message.sender,
        "recipients": [
            {"address": key, "outcome": "queued", "reply": last} for _, key in message.recipients
        ],
        "recipient_count": len(message.recipients),
        "outcome": "queued",
        "reply": str(replies.queued(message.message_id)),
        "channel": "",
        "upstream_id": None,
        "attempts": len(json.loads(attempts)),
        "time": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
    }


def deferred_data(
    row: Row,
    done: str,
    attempts: str,
    last_code: int,
    last_text: str,
    next_try: int,
    now: int,
) -> dict[str, Any]:
    """`message.deferred`'s data for a queued message whose retry is scheduled: each
    recipient's outcome so far (`deferred` for those that wait), and `next_try`."""
    ended = json.loads(done)
    last = f"{last_code} {last_text}".strip()
    recipients = []
    for written, key in json.loads(row["recipients"]):
        if written in ended:
            code, enhanced, text = ended[written]
            outcome = "delivered" if int(code) < 400 else "refused"
            recipients.append(
                {"address": key, "outcome": outcome, "reply": f"{code} {enhanced} {text}".strip()}
            )
        else:
            recipients.append({"address": key, "outcome": "deferred", "reply": last})
    return {
        "message_id": row["message_id"],
        "delivery_id": None,
        "account": row["account"],
        "token_id": row["token_id"],
        "sender": row["sender"],
        "recipients": recipients,
        "recipient_count": len(recipients),
        "outcome": "deferred",
        "reply": last,
        "channel": "",
        "upstream_id": None,
        "attempts": len(json.loads(attempts)),
        "next_try": datetime.fromtimestamp(next_try, UTC).isoformat().replace("+00:00", "Z"),
        "time": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
    }


class QueueItem(TypedDict):
    """A queued message as `relay queue list|show` and `/api/v1/queue` show it."""

    id: int
    created: int
    message_id: str
    account: str
    sender: str
    size: int
    state: str
    tries: int
    next_try: int
    last_code: int | None
    last_text: str
    lease_owner: str | None
    lease_until: int | None
    recipients: list[str]
    done: dict[str, Any]
    attempts: list[Any]


def item_of(row: Row) -> QueueItem:
    """A queue row as `relay queue list|show` and the API show it."""
    return QueueItem(
        id=int(row["id"]),
        created=int(row["created"]),
        message_id=row["message_id"],
        account=row["account"],
        sender=row["sender"],
        size=int(row["size"]),
        state=row["state"],
        tries=int(row["tries"]),
        next_try=int(row["next_try"]),
        last_code=row["last_code"],
        last_text=row["last_text"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        recipients=[written for written, _ in json.loads(row["recipients"])],
        done=json.loads(row["done"]),
        attempts=json.loads(row["attempts"]),
    )
