"""A provider's events on the delivery record of the message they name.

Resend tells of a message after it took it (email.delivered, email.bounced, ...:
relay.events.provider). Each event is appended to the record of the message it
names, in the transaction that takes the event (relay.store.outbox), so the
record and the relay's own event agree. The record's outcome, reply and charge
stay what the relay did.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from relay.store.db import Connection

# A delivery record keeps at most this many provider events (one per recipient and
# kind is the usual; a provider resending many cannot grow a record without bound).
MAX_PROVIDER_NOTES = 50


def note_on_record(
    db: Connection,
    is_postgres: bool,
    account_id: int,
    event_id: str,
    event_type: str,
    recipients: Sequence[str],
    data: dict[str, Any],
    now: int,
) -> tuple[str, int] | None:
    """Append a provider's event to the delivery record of the message it names (by
    the provider's id for it, within the account owning the sender's domain: an
    event cannot touch another account's record), once per event (a provider's
    retry is noted once, with or without webhook endpoints to find it by);
    that record's Message-ID and id."""
    upstream_id = str(data.get("upstream_id") or "")
    if not upstream_id:
        return None
    lock = " FOR UPDATE OF d" if is_postgres else ""
    row = db.execute(
        "SELECT d.id AS id, d.message_id AS message_id, d.provider_events AS events"  # noqa: S608 - constants only
        " FROM deliveries AS d JOIN accounts AS a ON a.name = d.account"
        " WHERE d.upstream_id = ? AND a.id = ? ORDER BY d.id DESC LIMIT 1" + lock,
        (upstream_id, account_id),
    ).fetchone()
    if row is None:
        return None
    notes = json.loads(row["events"] or "[]")
    if len(notes) < MAX_PROVIDER_NOTES and all(n.get("id") != event_id for n in notes):
        notes.append(
            {
                "id": event_id,
                "time": now,
                "provider": str(data.get("provider") or ""),
                "type": str(data.get("provider_type") or event_type),
                "recipients": list(recipients),
                "detail": str(data.get("detail") or ""),
            }
        )
        db.execute(
            "UPDATE deliveries SET provider_events = ? WHERE id = ?",
            (json.dumps(notes, separators=(",", ":")), row["id"]),
        )
    return str(row["message_id"]), int(row["id"])
