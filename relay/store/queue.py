"""The durable queue: messages the relay answered 250 for and delivers in the background.

Guarantees:
- `enqueue` commits the message (its content, envelope and route) and hands its
  reservation to the queue in one transaction, on disk before the caller writes
  the 250: SQLite's `synchronous = FULL` for that commit (the WAL is fsync'd),
  PostgreSQL's normal commit. The content is kept in the database (no file
  beside it to lose or to orphan): one commit covers all of it.
- A queued message's reservation is the queue's (`pending.owner = 'queue'`):
  the stale sweep never refunds it; `finish` settles it, with the final record,
  in the same transaction that deletes the message.
- One owner at a time: an attempt claims a message with a lease (one UPDATE of
  due rows, `FOR UPDATE SKIP LOCKED` on PostgreSQL, under SQLite's write lock);
  a lease runs out after `lease_seconds`, so a relay that died mid-attempt
  loses it and another (or the next start) retries the message. `finish` and
  `requeue` act only while the caller still holds the lease.
- Bounded: `enqueue` refuses (returns None) when the queue holds
  `max_messages` messages or `max_bytes` octets of content already.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from relay import replies
from relay.store.db import Database, Row, read_only
from relay.store.deliveries import (
    DeliveryRecord,
    Outcome,
    RecipientOutcome,
    attempts_from,
    insert,
)
from relay.store.idempotency import remember_delivered
from relay.store.ledger import QUEUED_OWNER as QUEUE_OWNER
from relay.store.ledger import _settle
from relay.store.outbox import emit
from relay.store.queue_events import QueuedMessage as QueuedMessage
from relay.store.queue_events import QueueItem as QueueItem
from relay.store.queue_events import deferred_data, item_of, queued_data

STATES = ("queued", "held")
CANCELLED = replies.QUEUE_CANCELLED


@dataclass(frozen=True, slots=True)
class Keep:
    """One `enqueue`: the message and how it waits."""

    message: QueuedMessage
    next_try: int
    attempts: str = "[]"
    last_code: int | None = None
    last_text: str = ""
    max_messages: int = 0
    max_bytes: int = 0


def _keep_one(db: Any, keep: Keep, now: int, count: int, size: int) -> int | None:
    """Keep one message inside the caller's transaction; its id, or None (full, or its
    reservation swept meanwhile: nothing of it written)."""
    message = keep.message
    if count >= keep.max_messages or size + len(message.content) > keep.max_bytes:
        return None
    taken = db.execute(
        "UPDATE pending SET owner = ? WHERE id = ? AND created = ?",
        (QUEUE_OWNER, message.reservation_id, message.reservation_created),
    )
    if taken.rowcount != 1:
        return None
    inserted = db.execute(
        "INSERT INTO queue (created, message_id, account, account_id, token_id,"
        " client, sender, envelope_from, recipients, done, content, size,"
        " idempotency_key, routes, reservation_id, reservation_created, state,"
        " attempts, tries, next_try, last_code, last_text, listener)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '{}', ?, ?, ?, ?, ?, ?, 'queued', ?,"
        " ?, ?, ?, ?, ?) RETURNING id",
        (
            now,
            message.message_id,
            message.account,
            message.account_id,
            message.token_id,
            message.client,
            message.sender,
            message.envelope_from,
            json.dumps(message.recipients),
            message.content,
            message.size,
            message.idempotency_key,
            json.dumps(message.routes),
            message.reservation_id,
            message.reservation_created,
            keep.attempts,
            0 if keep.attempts == "[]" else len(json.loads(keep.attempts)),
            keep.next_try,
            keep.last_code,
            keep.last_text,
            message.listener,
        ),
    ).fetchone()
    if message.events:
        emit(
            db,
            message.account_id,
            "message.queued",
            queued_data(message, keep.attempts, keep.last_code, keep.last_text, now),
            now,
        )
    return int(inserted["id"])


@dataclass(frozen=True, slots=True)
class QueueBatch:
    """A Resend batch kept from before its request until every member ended."""

    key: str
    domain: str
    members: list[int]  # queue ids, in the body's order
    body: str  # the JSON request body, exactly as sent


class _Unmarked(Exception):
    """A batch member is no longer the caller's: nothing of the batch is written."""


class QueueStats(TypedDict):
    states: dict[str, int]  # messages by state
    oldest: int | None  # when the oldest was queued (unix seconds)


def _totals(db: Any) -> tuple[int, int]:
    """The queue's messages and octets: its totals row, made from a count if none yet."""
    row = db.execute("SELECT messages, bytes FROM queue_totals").fetchone()
    if row is None:
        row = db.execute(
            "SELECT count(*) AS messages, COALESCE(sum(length(content)), 0) AS bytes FROM queue"
        ).fetchone()
        db.execute(
            "INSERT INTO queue_totals (one, messages, bytes) VALUES (1, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (int(row["messages"]), int(row["bytes"])),
        )
        row = db.execute("SELECT messages, bytes FROM queue_totals").fetchone()
    return int(row["messages"]), int(row["bytes"])


@dataclass(frozen=True, slots=True)
class End:
    """One queued message's end (`Queue.finish_many`)."""

    queue_id: int
    delivered: int
    idempotency_key: str | None
    record: DeliveryRecord | None


def _finish_one(
    db: Any,
    now: int,
    queue_id: int,
    owner: str | None,
    delivered: int,
    idempotency_key: str | None,
    record: DeliveryRecord | None,
) -> int | None:
    """`Queue.finish` inside the caller's transaction."""
    if owner is None:
        # Nor while in a batch whose answer is not known: it may have been sent.
        row = db.execute(
            "DELETE FROM queue WHERE id = ? AND (lease_owner IS NULL OR lease_until < ?)"
            " AND batch_key IS NULL"
            " RETURNING reservation_id, reservation_created, length(content) AS octets",
            (queue_id, now),
        ).fetchone()
    else:
        row = db.execute(
            "DELETE FROM queue WHERE id = ? AND lease_owner = ?"
            " RETURNING reservation_id, reservation_created, length(content) AS octets",
            (queue_id, owner),
        ).fetchone()
    if row is None:
        return None
    db.execute(
        "UPDATE queue_totals SET messages = messages - 1, bytes = bytes - ?",
        (int(row["octets"]),),
    )
    if idempotency_key and delivered:
        remember_delivered(db, idempotency_key, now)
    settled = _settle(db, row["reservation_id"], delivered, now, row["reservation_created"]) or (
        0,
        0,
    )
    if record is not None:
        insert(db, record, settled[1], queued=True)
    return settled[0]


class Queue(Database):
    def enqueue(
        self,
        message: QueuedMessage,
        *,
        next_try: int,
        attempts: str = "[]",
        last_code: int | None = None,
        last_text: str = "",
        max_messages: int,
        max_bytes: int,
    ) -> int | None:
        """Keep `message` and take its reservation; its id, or None when the queue is full
        (or the reservation was swept meanwhile): then nothing changed."""
        keep = Keep(message, next_try, attempts, last_code, last_text, max_messages, max_bytes)
        return self.enqueue_many([keep])[0]

    def enqueue_many(self, keeps: Sequence[Keep], durable: bool = True) -> list[int | None]:
        """`enqueue` for each of `keeps`, in one transaction: one commit (one fsync on
        SQLite) for all, so messages queued together cost one disk flush (the
        caller writes no 250 before it returns). Each is kept or refused alone.
        `durable` False: the caller's group commit makes the commit durable
        (`relay.store.group`), the transaction is its."""
        now = self._now()
        durable = durable and not self.is_postgres
        if durable:
            self.db.execute("PRAGMA synchronous = FULL")
        out: list[int | None] = []
        try:
            with self._write() as db:
                count, size = _totals(db)
                added, octets = 0, 0
                for keep in keeps:
                    kept = _keep_one(db, keep, now, count + added, size + octets)
                    out.append(kept)
                    if kept is not None:
                        added, octets = added + 1, octets + len(keep.message.content)
                if added:
                    db.execute(
                        "UPDATE queue_totals SET messages = messages + ?, bytes = bytes + ?",
                        (added, octets),
                    )
            return out
        finally:
            if durable:
                self.db.execute("PRAGMA synchronous = NORMAL")

    @read_only
    def queue_due(self, dead_after: float = 60) -> bool:
        """Whether `claim` would find a message now: a read, so an idle worker's
        look costs no write transaction (and no write lock) in any process."""
        now = self._now()
        rows = self._read(
            "SELECT 1 FROM queue WHERE state = 'queued' AND next_try <= ?"
            " AND (lease_until IS NULL OR lease_until < ? OR NOT EXISTS"
            " (SELECT 1 FROM processes p WHERE p.id = queue.lease_owner"
            " AND p.heartbeat > ?)) LIMIT 1",
            (now, now, now - dead_after),
        )
        return bool(rows)

    def claim(
        self, owner: str, lease_seconds: int, limit: int, dead_after: float = 60
    ) -> list[Row]:
        """Lease up to `limit` due messages to `owner`; their rows. A lease whose holder
        is gone (no heartbeat for `dead_after` seconds, or retired) is free at once,
        not only when it runs out: a relay killed mid-attempt holds nothing.

        The members of a Resend batch that has not ended (`mark_batch`) are leased
        together or not at all, once one of them is due: that batch is sent again
        as it was (`queue_batch`), never one of its members alone."""
        now = self._now()
        lock = " FOR UPDATE SKIP LOCKED" if self.is_postgres else ""
        free = (
            "(lease_until IS NULL OR lease_until < ? OR NOT EXISTS"
            " (SELECT 1 FROM processes p WHERE p.id = queue.lease_owner AND p.heartbeat > ?))"
        )
        with self._write() as db:
            rows = list(
                db.execute(
                    "UPDATE queue SET lease_owner = ?, lease_until = ? WHERE id IN"  # noqa: S608 - constants only
                    " (SELECT id FROM queue WHERE state = 'queued' AND next_try <= ?"
                    f" AND batch_key IS NULL AND {free}"
                    f" ORDER BY next_try, id LIMIT ?{lock}) RETURNING *",
                    (owner, now + lease_seconds, now, now, now - dead_after, limit),
                ).fetchall()
            )
            free_members = db.execute(
                "SELECT id, batch_key, next_try FROM queue"  # noqa: S608 - constants only
                f" WHERE batch_key IS NOT NULL AND state = 'queued' AND {free}{lock}",
                (now, now - dead_after),
            ).fetchall()
            batches: dict[str, list[Row]] = {}
            for member in free_members:
                batches.setdefault(member["batch_key"], []).append(member)
            for key, members in batches.items():
                total = db.execute(
                    "SELECT count(*) AS n FROM queue WHERE batch_key = ?", (key,)
                ).fetchone()["n"]
                if int(total) != len(members) or min(int(m["next_try"]) for m in members) > now:
                    continue  # not due, or a member held or leased elsewhere: not yet
                rows += db.execute(
                    "UPDATE queue SET lease_owner = ?, lease_until = ? WHERE batch_key = ?"
                    " RETURNING *",
                    (owner, now + lease_seconds, key),
                ).fetchall()
            return rows

    def mark_batch(self, owner: str, key: str, domain: str, ids: Sequence[int], body: str) -> bool:
        """Keep a Resend batch before its request goes out: its key, its members in the
        body's order, the body itself; committed to disk (synchronous=FULL on SQLite).
        False, with nothing written, when `owner` no longer holds every member."""
        durable = not self.is_postgres
        if durable:
            self.db.execute("PRAGMA synchronous = FULL")
        try:
            with self._write() as db:
                marks = [
                    db.execute(
                        "UPDATE queue SET batch_key = ? WHERE id = ? AND lease_owner = ?"
                        " AND batch_key IS NULL",
                        (key, queue_id, owner),
                    ).rowcount
                    for queue_id in ids
                ]
                if sum(marks) != len(ids):
                    raise _Unmarked
                db.execute(
                    "INSERT INTO queue_batches (key, created, domain, members, body)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (key, self._now(), domain, json.dumps(list(ids)), body),
                )
            return True
        except _Unmarked:
            return False
        finally:
            if durable:
                self.db.execute("PRAGMA synchronous = NORMAL")

    @read_only
    def queue_batch(self, key: str) -> QueueBatch | None:
        """A batch `mark_batch` kept: its domain, its members in order, its body."""
        rows = self._read("SELECT domain, members, body FROM queue_batches WHERE key = ?", (key,))
        if not rows:
            return None
        row = rows[0]
        return QueueBatch(
            key, row["domain"], [int(i) for i in json.loads(row["members"])], row["body"]
        )

    def end_batch(self, key: str, members: Sequence[int] = ()) -> None:
        """The batch's answer is known (it was sent, or provably refused as a whole):
        its `members` still queued go singly or in new batches from now on, and the
        batch is forgotten once no message refers to it."""
        with self._write() as db:
            for queue_id in members:
                db.execute(
                    "UPDATE queue SET batch_key = NULL WHERE id = ? AND batch_key = ?",
                    (queue_id, key),
                )
            db.execute(
                "DELETE FROM queue_batches WHERE key = ?"
                " AND NOT EXISTS (SELECT 1 FROM queue WHERE batch_key = ?)",
                (key, key),
            )

    def requeue(
        self,
        queue_id: int,
        owner: str,
        *,
        done: str,
        attempts: str,
        next_try: int,
        last_code: int,
        last_text: str,
        events: bool = True,
    ) -> bool:
        """An attempt that left recipients to retry: its progress, the next try, the lease
        gone. `events`: whether message events are written (the delivery log is on)."""
        now = self._now()
        with self._write() as db:
            row = db.execute(
                "UPDATE queue SET done = ?, attempts = ?, tries = tries + 1, next_try = ?,"
                " last_code = ?, last_text = ?, lease_owner = NULL, lease_until = NULL"
                " WHERE id = ? AND lease_owner = ?"
                " RETURNING account_id, message_id, account, token_id, sender, recipients",
                (done, attempts, next_try, last_code, last_text, queue_id, owner),
            ).fetchone()
            if row is None:
                return False
            if events:
                # message.deferred: each retry scheduled, with the write that schedules it.
                emit(
                    db,
                    int(row["account_id"]),
                    "message.deferred",
                    deferred_data(row, done, attempts, last_code, last_text, next_try, now),
                    now,
                )
            return True

    def finish(
        self,
        queue_id: int,
        owner: str | None,
        delivered: int,
        idempotency_key: str | None,
        record: DeliveryRecord | None,
    ) -> int | None:
        """The end of a queued message: deleted, its charge kept for `delivered` recipients
        and the rest refunded, its final record written, in one transaction. `owner`:
        the lease holder (None: an operator's cancel, only while no attempt runs).
        Returns the refund, or None when the message was not this caller's to end."""
        with self._write() as db:
            return _finish_one(db, self._now(), queue_id, owner, delivered, idempotency_key, record)

    def finish_many(self, owner: str, ends: Sequence[End]) -> list[int | None]:
        """`finish` for each of `ends` (all leased to `owner`), in one transaction: the
        queue worker's ends of several messages cost one commit, not one each, and
        hold the write lock the sessions' group commits need once. Each end acts,
        or not, as `finish` alone would; a failure writes none of them."""
        now = self._now()
        with self._write() as db:
            return [
                _finish_one(db, now, e.queue_id, owner, e.delivered, e.idempotency_key, e.record)
                for e in ends
            ]

    def release_leases(self, owner: str) -> int:
        """A stopping relay gives its leases back: the next attempt is anyone's."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE queue SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (owner,),
            )
            return int(cur.rowcount)

    # --- operators ---------------------------------------------------------------

    @read_only
    def queue_list(
        self, state: str | None = None, account: str | None = None, limit: int = 1000
    ) -> list[QueueItem]:
        clauses, args = [], []
        if state:
            clauses.append("state = ?")
            args.append(state)
        if account:
            clauses.append("account = ?")
            args.append(account)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(
            "SELECT id, created, message_id, account, sender, recipients, done, size, state,"  # noqa: S608 - placeholders only
            " tries, next_try, last_code, last_text, lease_owner, lease_until, attempts"
            f" FROM queue{where} ORDER BY id LIMIT ?",
            (*args, limit),
        )
        return [item_of(r) for r in rows]

    @read_only
    def queue_get(self, queue_id: int) -> QueueItem | None:
        rows = self._read(
            "SELECT id, created, message_id, account, sender, recipients, done, size, state,"
            " tries, next_try, last_code, last_text, lease_owner, lease_until, attempts"
            " FROM queue WHERE id = ?",
            (queue_id,),
        )
        return item_of(rows[0]) if rows else None

    def queue_set(
        self, ids: Sequence[int] | None, *, state: str | None = None, due_now: bool = False
    ) -> int:
        """Hold, release (`state`) or retry now (`due_now`) the messages `ids` (None: all)."""
        now = self._now()
        sets: list[str] = []
        args: list[Any] = []
        if state is not None:
            assert state in STATES
            sets.append("state = ?")
            args.append(state)
        if due_now:
            sets.append("next_try = ?")
            args.append(now)
        where = ""
        if ids is not None:
            where = f" WHERE id IN ({','.join('?' * len(ids))})" if ids else " WHERE 0 = 1"
            args += list(ids)
        with self._write() as db:
            cur = db.execute(f"UPDATE queue SET {', '.join(sets)}{where}", tuple(args))  # noqa: S608
            return int(cur.rowcount)

    def cancel(self, queue_id: int) -> int | None:
        """An operator ends a queued message (not while an attempt holds it): what was
        delivered stays charged, the rest is refunded, a final record says so.
        Returns the refund, or None when there is no such message free to cancel."""
        rows = self._read("SELECT * FROM queue WHERE id = ?", (queue_id,))
        if not rows:
            return None
        row = rows[0]
        pairs = [(str(w), str(k)) for w, k in json.loads(row["recipients"])]
        done = json.loads(row["done"])
        reply = CANCELLED
        outcomes = []
        for written, key in pairs:
            code, enhanced = done.get(written, [reply.code, reply.enhanced])[:2]
            kind = (
                Outcome.DELIVERED
                if int(code) < 400
                else (Outcome.REFUSED if int(code) >= 500 else Outcome.DEFERRED)
            )
            outcomes.append(RecipientOutcome(key, kind, int(code), str(enhanced)))
        delivered = sum(1 for o in outcomes if o.outcome == Outcome.DELIVERED)
        record = DeliveryRecord(
            time=self._now(),
            message_id=row["message_id"],
            account=row["account"],
            token_id=row["token_id"],
            sender=row["sender"],
            recipients=tuple(outcomes),
            size=int(row["size"]),
            channel="",
            rule=None,
            outcome=Outcome.PARTIAL if delivered else Outcome.REFUSED,
            reply=replies.delivered(row["message_id"]) if delivered else reply,
            attempts=attempts_from(row["attempts"]),
        )
        return self.finish(queue_id, None, delivered, None, record)

    @read_only
    def queue_stats(self) -> QueueStats:
        rows = self._read(
            "SELECT state, count(*) AS n, min(created) AS oldest FROM queue GROUP BY state"
        )
        return QueueStats(
            states={r["state"]: int(r["n"]) for r in rows},
            oldest=min((int(r["oldest"]) for r in rows), default=None),
        )
