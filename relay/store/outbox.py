"""Each account's webhooks: its endpoints, and the outbox of events to send them.

Guarantees:
- An event is written in the same transaction as the record it describes
  (`account_events`, called by `relay.store.deliveries.insert`; `emit` for an
  event of its own), so a crash loses neither or both: nothing is sent about
  a record that was not kept, and no kept record lacks its events.
- One outbox row per (event, endpoint); the `webhook-id` (event_id) is the same
  on every attempt, so a receiver drops duplicates (delivery is at least once).
- The endpoint's secret is stored so the relay can sign with it (Standard
  Webhooks needs the key, not a hash); it is returned only by `add_webhook`,
  once, and to the sender (`due_webhook_events`), never by a listing.
- Each attempt (status, duration, the first 1 KiB of the answer) is kept for
  the endpoint; an endpoint failing for DISABLE_AFTER is disabled, with an
  audit entry.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay.errors import Invalid, NotFound
from relay.store.accounts import account_id_of
from relay.store.db import Connection, Database, read_only
from relay.store.provider_notes import note_on_record
from relay.store.rows import NewWebhook, WebhookAttemptRow, WebhookRow

# The event types an endpoint may ask for. message.queued and message.failed
# come from the delivery queue (relay.store.queue), message.bounced and
# message.complained from provider events.
EVENT_TYPES = (
    "message.delivered",
    "message.deferred",
    "message.refused",
    "message.queued",
    "message.failed",
    "message.bounced",
    "message.complained",
    "recipient.suppressed",
)
TEST_EVENT = "webhook.test"
# An endpoint failing this long is disabled (seconds: 3 days).
DISABLE_AFTER = 3 * 86400
# What an attempt keeps of the endpoint's answer.
ANSWER_KEPT = 1024
# RCPT TO a suppressed address emits recipient.suppressed at most once per
# address and account in this window: a client repeating the RCPT cannot make
# the relay write (and send) an event per command.
RCPT_EVENT_WINDOW = 3600
MAX_ENDPOINTS = 20  # per account
# How long a claimed event is left to its sender (longer than an attempt's 10 s).
LEASE = 60
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class DueEvent:
    """One outbox row the sender may attempt now."""

    id: int
    event_id: str
    endpoint_id: str
    url: str
    secret: str
    type: str
    payload: str
    attempts: int
    created: int
    next_attempt: int = 0  # as read: the claim takes it only if unchanged


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def event_types(text: str | Sequence[str] | None) -> str:
    """The endpoint's event list as stored ('' for every type), or `Invalid`."""
    if text is None:
        return ""
    names = text.split(",") if isinstance(text, str) else list(text)
    wanted = sorted({n.strip() for n in names if n.strip()})
    unknown = [n for n in wanted if n not in EVENT_TYPES]
    if unknown:
        raise Invalid(
            f"unknown event type {unknown[0][:40]!r} (use {', '.join(EVENT_TYPES)})",
            code="bad_event_type",
        )
    return ",".join(wanted)


def _payload(event_type: str, when: int, data: dict[str, Any]) -> str:
    # Standard Webhooks' recommended body: type, timestamp, data.
    stamp = datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"type": event_type, "timestamp": stamp, "data": data}, sort_keys=True)


_ENDPOINTS = {
    # Two fixed statements: by the account's id, or by its name (a delivery record's).
    "a.id = ?": "SELECT e.id AS id, e.events AS events FROM webhook_endpoints AS e"
    " JOIN accounts AS a ON a.id = e.account_id WHERE a.id = ? AND e.enabled = 1",
    "a.name = ?": "SELECT e.id AS id, e.events AS events FROM webhook_endpoints AS e"
    " JOIN accounts AS a ON a.id = e.account_id WHERE a.name = ? AND e.enabled = 1",
}


def _endpoints(db: Connection, where: str, key: object) -> list[tuple[str, str]]:
    rows = db.execute(_ENDPOINTS[where], (key,)).fetchall()
    return [(str(r["id"]), str(r["events"])) for r in rows]


def _enqueue(
    db: Connection,
    endpoints: list[tuple[str, str]],
    event_type: str,
    payload: str,
    now: int,
    event_id: str | None = None,
) -> str:
    event_id = event_id or f"evt_{secrets.token_hex(12)}"
    for endpoint_id, events in endpoints:
        if events and event_type not in events.split(",") and event_type != TEST_EVENT:
            continue
        db.execute(
            "INSERT INTO webhook_outbox (event_id, endpoint_id, type, payload, created,"
            " attempts, next_attempt, state) VALUES (?, ?, ?, ?, ?, 0, ?, 'pending')",
            (event_id, endpoint_id, event_type, payload, now, now),
        )
    return event_id


def emit(db: Connection, account_id: int, event_type: str, data: dict[str, Any], now: int) -> None:
    """Queue one event for the account's endpoints, inside the caller's transaction.

    The call a record's writer makes (the delivery queue: message.queued,
    message.failed) so the event commits with the record.
    """
    endpoints = _endpoints(db, "a.id = ?", account_id)
    if endpoints:
        _enqueue(db, endpoints, event_type, _payload(event_type, now, data), now)


def account_events(
    db: Connection,
    account: str,
    events: Callable[[], list[tuple[str, dict[str, Any]]]],
    now: int,
) -> None:
    """Queue the events `events()` makes (type, data) for the endpoints of the
    account named `account`, inside the caller's transaction. With no endpoint:
    one indexed read, and the events are never built (every delivery record
    comes here, and most accounts have no webhook)."""
    endpoints = _endpoints(db, "a.name = ?", account)
    for event_type, data in events() if endpoints else ():
        _enqueue(db, endpoints, event_type, _payload(event_type, now, data), now)


def _webhook_row(r: Any, account: str) -> WebhookRow:
    return WebhookRow(
        id=r["id"],
        account=account,
        url=r["url"],
        events=[e for e in str(r["events"]).split(",") if e],
        created=int(r["created"]),
        enabled=bool(r["enabled"]),
        failing_since=None if r["failing_since"] is None else int(r["failing_since"]),
    )


class Webhooks(Database):
    def add_webhook(self, account: str, url: str, events: str | Sequence[str] | None) -> NewWebhook:
        """A new endpoint; the only answer that holds its secret. `url` is checked by
        the caller (relay.events.urls), which alone knows what may be reached."""
        wanted = event_types(events)
        account_id = account_id_of(self, account)
        endpoint_id, secret, now = f"wh_{secrets.token_hex(8)}", new_secret(), self._now()
        with self._write() as db:
            count = db.execute(
                "SELECT COUNT(*) AS n FROM webhook_endpoints WHERE account_id = ?", (account_id,)
            ).fetchone()["n"]
            if int(count) >= MAX_ENDPOINTS:
                raise Invalid(f"at most {MAX_ENDPOINTS} endpoints per account", code="too_many")
            db.execute(
                "INSERT INTO webhook_endpoints (id, account_id, url, secret, events, created,"
                " enabled) VALUES (?, ?, ?, ?, ?, ?, 1)",
                (endpoint_id, account_id, url, secret, wanted, now),
            )
        return NewWebhook(
            id=endpoint_id,
            account=account,
            url=url,
            events=[e for e in wanted.split(",") if e],
            secret=secret,
        )

    @read_only
    def list_webhooks(self, account: str) -> list[WebhookRow]:
        account_id = account_id_of(self, account)
        rows = self._read(
            "SELECT id, url, events, created, enabled, failing_since FROM webhook_endpoints"
            " WHERE account_id = ? ORDER BY created, id",
            (account_id,),
        )
        return [_webhook_row(r, account) for r in rows]

    def _endpoint_of(self, account: str, endpoint_id: str) -> int:
        account_id = account_id_of(self, account)
        rows = self._read(
            "SELECT 1 FROM webhook_endpoints WHERE id = ? AND account_id = ?",
            (endpoint_id, account_id),
        )
        if not rows:
            raise NotFound(f"no webhook {endpoint_id[:40]!r} for {account}", code="no_such_webhook")
        return account_id

    def remove_webhook(self, account: str, endpoint_id: str) -> None:
        self._endpoint_of(account, endpoint_id)
        with self._write() as db:
            db.execute("DELETE FROM webhook_outbox WHERE endpoint_id = ?", (endpoint_id,))
            db.execute("DELETE FROM webhook_attempts WHERE endpoint_id = ?", (endpoint_id,))
            db.execute("DELETE FROM webhook_endpoints WHERE id = ?", (endpoint_id,))

    def test_webhook(self, account: str, endpoint_id: str) -> str:
        """Queue a `webhook.test` event for one endpoint (enabled again if it was not);
        its event id."""
        self._endpoint_of(account, endpoint_id)
        now = self._now()
        data = {"account": account, "endpoint": endpoint_id}
        with self._write() as db:
            db.execute(
                "UPDATE webhook_endpoints SET enabled = 1, failing_since = NULL WHERE id = ?",
                (endpoint_id,),
            )
            return _enqueue(
                db, [(endpoint_id, "")], TEST_EVENT, _payload(TEST_EVENT, now, data), now
            )

    def replay_webhook_event(self, account: str, event_id: str) -> int:
        """Send an event again to the account's endpoints that had it; how many rows."""
        account_id = account_id_of(self, account)
        with self._write() as db:
            count = db.execute(
                "UPDATE webhook_outbox SET state = 'pending', attempts = 0, next_attempt = ?"
                " WHERE event_id = ? AND endpoint_id IN"
                " (SELECT id FROM webhook_endpoints WHERE account_id = ?)",
                (self._now(), event_id, account_id),
            ).rowcount
        if not count:
            raise NotFound(f"no event {event_id[:40]!r} for {account}", code="no_such_event")
        return int(count)

    @read_only
    def list_webhook_attempts(
        self, account: str, endpoint_id: str, limit: int = 100
    ) -> list[WebhookAttemptRow]:
        self._endpoint_of(account, endpoint_id)
        rows = self._read(
            "SELECT t.created, t.status, t.duration_ms, t.answer, o.event_id, o.type, o.state"
            " FROM webhook_attempts AS t JOIN webhook_outbox AS o ON o.id = t.outbox_id"
            " WHERE t.endpoint_id = ? ORDER BY t.id DESC LIMIT ?",
            (endpoint_id, max(1, min(limit, MAX_PAGE))),
        )
        return [
            WebhookAttemptRow(
                created=int(r["created"]),
                event_id=r["event_id"],
                type=r["type"],
                status=None if r["status"] is None else int(r["status"]),
                duration_ms=int(r["duration_ms"]),
                answer=r["answer"],
                state=r["state"],
            )
            for r in rows
        ]

    @read_only
    def due_webhook_events(self, limit: int = 50) -> list[DueEvent]:
        """The pending events whose next attempt is due, oldest first, with what signs
        them: a read (the sender's idle second costs no write); `claim_webhook_events`
        then takes them."""
        rows = self._read(
            "SELECT o.id, o.event_id, o.endpoint_id, o.type, o.payload, o.attempts,"
            " o.created, o.next_attempt, e.url, e.secret FROM webhook_outbox AS o"
            " JOIN webhook_endpoints AS e ON e.id = o.endpoint_id"
            " WHERE o.state = 'pending' AND o.next_attempt <= ? AND e.enabled = 1"
            " ORDER BY o.next_attempt, o.id LIMIT ?",
            (self._now(), limit),
        )
        return [
            DueEvent(
                int(r["id"]),
                r["event_id"],
                r["endpoint_id"],
                r["url"],
                r["secret"],
                r["type"],
                r["payload"],
                int(r["attempts"]),
                int(r["created"]),
                int(r["next_attempt"]),
            )
            for r in rows
        ]

    def claim_webhook_events(self, due: Sequence[DueEvent]) -> list[DueEvent]:
        """Those of `due` no other sender took meanwhile, each pushed LEASE seconds
        ahead: no other relay sharing the database sends it while this one does, and
        one whose sender died is due again after the lease."""
        now = self._now()
        claimed = []
        with self._write() as db:
            for event in due:
                taken = db.execute(
                    "UPDATE webhook_outbox SET next_attempt = ? WHERE id = ? AND next_attempt = ?"
                    " AND state = 'pending'",
                    (now + LEASE, event.id, event.next_attempt),
                ).rowcount
                if taken:
                    claimed.append(event)
        return claimed

    def record_webhook_attempt(
        self,
        outbox_id: int,
        endpoint_id: str,
        *,
        status: int | None,
        duration_ms: int,
        answer: str,
        next_attempt: int | None,
    ) -> bool:
        """One attempt's outcome: delivered (a 2xx), retried at `next_attempt`, or
        failed for good (`next_attempt` None). True when the endpoint was disabled now."""
        now = self._now()
        ok = status is not None and 200 <= status < 300
        state = "delivered" if ok else ("pending" if next_attempt is not None else "failed")
        disabled = False
        with self._write() as db:
            db.execute(
                "INSERT INTO webhook_attempts (outbox_id, endpoint_id, created, status,"
                " duration_ms, answer) VALUES (?, ?, ?, ?, ?, ?)",
                (outbox_id, endpoint_id, now, status, duration_ms, answer[:ANSWER_KEPT]),
            )
            db.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, state = ?,"
                " next_attempt = ? WHERE id = ?",
                (state, next_attempt if next_attempt is not None else now, outbox_id),
            )
            if ok:
                db.execute(
                    "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = ?",
                    (endpoint_id,),
                )
            else:
                db.execute(
                    "UPDATE webhook_endpoints SET failing_since = ? WHERE id = ?"
                    " AND failing_since IS NULL",
                    (now, endpoint_id),
                )
                disabled = (
                    db.execute(
                        "UPDATE webhook_endpoints SET enabled = 0 WHERE id = ? AND enabled = 1"
                        " AND failing_since <= ?",
                        (endpoint_id, now - DISABLE_AFTER),
                    ).rowcount
                    > 0
                )
                if disabled:  # the audit says why deliveries stopped
                    db.execute(
                        "INSERT INTO audit (created, actor, address, action, target, detail)"
                        " VALUES (?, 'relay', 'local', 'webhook.disable', ?, ?)",
                        (
                            now,
                            endpoint_id,
                            json.dumps({"failing_for_days": DISABLE_AFTER // 86400}),
                        ),
                    )
        return disabled

    def suppressed_rcpt_event(self, account_id: int, address: str, reason: str) -> None:
        """recipient.suppressed for a RCPT TO the list refused, once per window per
        address: reads first, so a repeated RCPT costs no write."""
        now = self._now()
        endpoints = self._read(
            "SELECT e.id FROM webhook_endpoints AS e WHERE e.account_id = ? AND e.enabled = 1",
            (account_id,),
        )
        if not endpoints:
            return
        recent = self._read(
            "SELECT 1 FROM webhook_outbox WHERE endpoint_id = ? AND type = ? AND created > ?"
            " AND payload LIKE ? LIMIT 1",
            (
                endpoints[0]["id"],
                "recipient.suppressed",
                now - RCPT_EVENT_WINDOW,
                f'%"address": {json.dumps(address)}%',
            ),
        )
        if recent:
            return
        with self._write() as db:
            row = db.execute("SELECT name FROM accounts WHERE id = ?", (account_id,)).fetchone()
            data = {
                "account": row["name"] if row is not None else "",
                "address": address,
                "reason": reason,
                "source": "rcpt",
            }
            emit(db, account_id, "recipient.suppressed", data, now)

    def apply_provider_event(
        self,
        event_id: str,
        domain: str,
        event_type: str,
        recipients: Sequence[str],
        suppress: str | None,
        data: dict[str, Any],
    ) -> str:
        """A provider's event (relay.events.provider) for the account owning the sender's
        domain: its suppressions and its event, in one transaction, once per
        `event_id`. What became of it: applied, duplicate, or unknown domain."""
        now = self._now()
        with self._write() as db:
            row = db.execute(
                "SELECT account_id FROM domains WHERE domain = ?", (domain,)
            ).fetchone()
            if row is None:
                return "unknown domain"
            account_id = int(row["account_id"])
            seen = db.execute(
                "SELECT 1 FROM webhook_outbox WHERE event_id = ? LIMIT 1", (event_id,)
            ).fetchone()
            if seen is not None:
                return "duplicate"
            noted = note_on_record(
                db, self.is_postgres, account_id, event_id, event_type, recipients, data, now
            )
            if noted is not None:
                data = {**data, "message_id": noted[0], "delivery_id": noted[1]}
            added = []
            for address in recipients if suppress else ():
                kept = db.execute(
                    "INSERT INTO suppressions (account_id, address, reason, source, created,"
                    " expires) VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (account_id, address)"
                    " DO UPDATE SET reason = excluded.reason, source = excluded.source,"
                    " created = excluded.created, expires = NULL"
                    " WHERE suppressions.expires IS NOT NULL RETURNING address",
                    (account_id, address, suppress, f"resend: {data.get('provider_type')}", now),
                ).fetchone()
                if kept is not None:
                    added.append(address)
            endpoints = _endpoints(db, "a.id = ?", account_id)
            if endpoints:
                payload = _payload(event_type, now, data)
                _enqueue(db, endpoints, event_type, payload, now, event_id)
                for address in added:
                    event = {"address": address, "reason": suppress, "source": "resend"}
                    _enqueue(db, endpoints, "recipient.suppressed",
                             _payload("recipient.suppressed", now, event), now)  # fmt: skip
            return "applied"

    def prune_webhook_events(self, keep_seconds: int) -> int:
        """Delete events settled (delivered or failed) and made over `keep_seconds`
        ago, with their attempts (upkeep); how many events."""
        before = self._now() - keep_seconds
        with self._write() as db:
            db.execute(
                "DELETE FROM webhook_attempts WHERE outbox_id IN (SELECT id FROM webhook_outbox"
                " WHERE state <> 'pending' AND created < ?)",
                (before,),
            )
            return int(
                db.execute(
                    "DELETE FROM webhook_outbox WHERE state <> 'pending' AND created < ?",
                    (before,),
                ).rowcount
            )
