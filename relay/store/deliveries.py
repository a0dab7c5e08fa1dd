"""The delivery log: one record per mail transaction that reached the end of DATA.

Guarantees:
- A message the relay charged is recorded in the same write transaction that
  settles its charge (`Ledger.settle` calls `insert`): the record and the kept
  charge commit together or not at all, and the hot path takes no extra write
  transaction. A settle retried in the background carries its record along.
- A message refused at the end of DATA before any charge (a header defect, a
  header sender on another account's domain, a balance or limit the charge
  found short), and a replay (an idempotent retry the upstream took already),
  are recorded by `record_delivery`, one small write of their own.
- Records older than `RELAY_LOG_RETENTION_DAYS` are deleted by the upkeep in
  batches (`prune_deliveries`), each its own short transaction; so are the
  oldest records while the log is past `RELAY_LOG_MAX_MB` (`log_size`).
- A message refused before any charge keeps its recipient count and at most
  its first REFUSED_RECIPIENTS_KEPT recipients (they all share its one reply),
  so refusals cannot fill the disk 50 recipients at a time.
- Queries by Message-ID, sender and recipient are index lookups; a recipient
  is found through `delivery_recipients`, one row per recipient. An account is
  not indexed (each index costs every message a few microseconds, and the log
  may cost at most 5% of the throughput): its query reads newest first and
  stops at the page's limit.

`find_deliveries(Query)` is the one query the CLI (and the admin API) use.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from relay.errors import RelayError
from relay.replies import Reply
from relay.store import outbox
from relay.store.db import Connection, Database, Row, read_only
from relay.store.suppressions import is_mailbox_refusal, record_refusals

# Records a prune deletes per transaction: each holds the write lock for a few
# milliseconds, so sessions never queue behind a long delete.
PRUNE_BATCH = 1000
# The most records one query returns.
MAX_LIMIT = 100_000
# Recipients fetched per statement (SQLite's bound-parameter limit is 32,766).
_CHUNK = 500
# The recipients a record of a message refused before any charge keeps.
REFUSED_RECIPIENTS_KEPT = 10
# The records whose size `log_size` samples on PostgreSQL (the newest).
SIZE_SAMPLE = 1000
# A PostgreSQL row costs its tuple header and line pointer (23 + 4 bytes,
# aligned) beyond pg_column_size of its values.
PG_ROW_OVERHEAD = 32
# ... and its index entries: deliveries has four indexes, delivery_recipients
# two, each entry about as large as its key plus 16 bytes: about half again the
# rows' own size for the log's short rows.
PG_INDEX_FACTOR = 1.5


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"  # every recipient taken
    PARTIAL = "partial"  # some recipients taken, the others refused for good
    REFUSED = "refused"  # a 5xx: no recipient taken, the client must not retry
    DEFERRED = "deferred"  # a 4xx: no recipient taken, the client retries


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    address: str  # normalized, as metered and searched
    outcome: Outcome  # delivered, refused or deferred
    code: int  # the upstream's reply code, or the relay's
    enhanced: str
    # The reply's text where the channel answered for this recipient ("" when it
    # shares the message's): not kept in the log's rows, it reaches the
    # suppression list and the webhook events written with them.
    text: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One channel's try at a message: what it answered, how long it took, and
    how many recipients it took."""

    channel: str
    code: int
    enhanced: str
    text: str
    duration: float  # seconds
    accepted: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "reply": {"code": self.code, "enhanced": self.enhanced, "text": self.text},
            "duration": round(self.duration, 3),
            "accepted": self.accepted,
        }


def attempts_text(attempts: Sequence[Attempt], *, keep_one: bool = False) -> str | None:
    """The attempts as the `attempts` column keeps them: JSON, or NULL for one or none
    (the record's own channel, reply and duration are then its one attempt)."""
    if len(attempts) < (1 if keep_one else 2):
        return None
    return json.dumps(
        [
            [a.channel, a.code, a.enhanced, a.text, round(a.duration, 3), a.accepted]
            for a in attempts
        ],
        separators=(",", ":"),
    )


def attempts_from(text: str | None) -> tuple[Attempt, ...]:
    if not text:
        return ()
    return tuple(
        Attempt(str(c), int(n), str(e), str(t), float(d), int(a))
        for c, n, e, t, d, a in json.loads(text)
    )


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """What the relay did with one message, as recorded."""

    time: int  # unix seconds
    message_id: str
    account: str
    token_id: str
    sender: str
    recipients: tuple[RecipientOutcome, ...]
    size: int
    channel: str  # '' when no channel was chosen
    rule: int | None
    outcome: Outcome
    reply: Reply
    upstream_id: str = ""
    charged: int = 0
    duration: float = 0.0  # seconds the forward took
    client: str = ""
    replay: bool = False
    id: int = 0  # set when read back
    # How many recipients the message had; `recipients` may keep only the first
    # few (REFUSED_RECIPIENTS_KEPT). 0: as many as `recipients` holds.
    recipient_count: int = 0
    # Each channel tried, in order, when more than one was (failover); else
    # empty, and the record's channel, reply and duration are its one attempt.
    attempts: tuple[Attempt, ...] = ()
    # The port the message came in on: "smtps" (implicit TLS, RELAY_LISTEN) or
    # "submission" (STARTTLS, RELAY_STARTTLS_LISTEN).
    listener: str = "smtps"
    # What a provider told of the message after taking it (Resend's events:
    # relay.events.provider), oldest first: {"time", "provider", "type",
    # "recipients", "detail"}. The relay's own outcome above is left as it was.
    provider_events: tuple[dict[str, Any], ...] = ()

    @property
    def total_recipients(self) -> int:
        return self.recipient_count or len(self.recipients)

    @property
    def tries(self) -> tuple[Attempt, ...]:
        """Every attempt: the recorded ones, or the record's own when one channel was tried."""
        if self.attempts or not self.channel:
            return self.attempts
        accepted = sum(1 for r in self.recipients if r.outcome == Outcome.DELIVERED)
        reply = self.reply
        return (
            Attempt(self.channel, reply.code, reply.enhanced, reply.text, self.duration, accepted),
        )

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["time"] = datetime.fromtimestamp(self.time, UTC).isoformat()
        out["reply"] = {
            "code": self.reply.code,
            "enhanced": self.reply.enhanced,
            "text": self.reply.text,
        }
        for recipient in out["recipients"]:
            recipient.pop("text", None)
        out["duration"] = round(self.duration, 3)
        out["recipient_count"] = self.total_recipients
        out["attempts"] = [a.as_json() for a in self.tries]
        out["provider_events"] = list(self.provider_events)
        return out


def outcome_of(reply: Reply, refused: int) -> Outcome:
    """The message's outcome from the client's reply and the recipients refused."""
    if reply.code < 400:
        return Outcome.PARTIAL if refused else Outcome.DELIVERED
    return Outcome.REFUSED if reply.is_permanent else Outcome.DEFERRED


def recipient_outcomes(
    recipients: Sequence[str],
    keys: Sequence[str],
    accepted: Iterable[str],
    refused: Mapping[str, Reply],
    reply: Reply,
) -> tuple[RecipientOutcome, ...]:
    """Each recipient's outcome: `recipients` as written (the channel's keys), `keys`
    normalized (as recorded). A recipient neither accepted nor refused shares the
    message's reply: a refusal or deferral of the whole message."""
    taken = set(accepted)
    out = []
    for written, key in zip(recipients, keys, strict=True):
        if written in taken:
            out.append(RecipientOutcome(key, Outcome.DELIVERED, 250, "2.0.0"))
            continue
        why = refused.get(written, reply)
        if why.code < 400:  # a channel that named neither: the message's 250 covers it
            kind = Outcome.DELIVERED
        else:
            kind = Outcome.REFUSED if why.is_permanent else Outcome.DEFERRED
        # The text only where the upstream answered for this recipient: a refusal
        # of the whole message must not suppress each of its recipients.
        own = why.text if written in refused else ""
        out.append(RecipientOutcome(key, kind, why.code, why.enhanced, own))
    return tuple(out)


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# A bad time is quoted in its one-line error up to this many characters.
_SHOWN = 40


def parse_when(text: str, now: datetime) -> int:
    """A point in time as unix seconds: a duration back from `now` (`90s`, `15m`,
    `2h`, `1d12h`, `1w`) or an ISO 8601 date or time (UTC unless it says otherwise).

        >>> now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
        >>> parse_when("2h", now) == int(datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp())
        True
        >>> parse_when("2026-11-21", now) == int(datetime(2026, 11, 21, tzinfo=UTC).timestamp())
        True
    """
    value = text.strip()
    shown = repr(value) if len(value) <= _SHOWN else f"{value[:_SHOWN]!r}..."
    parts = _DURATION.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        try:
            seconds = sum(int(n) * _UNITS[u] for n, u in parts)
            return int((now - timedelta(seconds=seconds)).timestamp())
        except (OverflowError, ValueError):  # before year 1, or past int()'s digit limit
            raise RelayError(f"a duration back past year 1: {shown}") from None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise RelayError(
            f"not a duration (30m, 2h, 1d) or an ISO 8601 time (2026-11-22T10:00): {shown}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


def message_id_forms(text: str) -> tuple[str, str]:
    """A Message-ID as people paste it, with or without its angle brackets: the
    bracketed form (RFC 5322 section 3.6.4's msg-id, what a header and the 250
    reply carry) and the bare one (what a header written without them recorded).

        >>> message_id_forms(" a@b.test "), message_id_forms("<a@b.test>")
        (('<a@b.test>', 'a@b.test'), ('<a@b.test>', 'a@b.test'))
    """
    bare = text.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1].strip()
    return f"<{bare}>", bare


@dataclass(frozen=True, slots=True)
class Query:
    """Which records to return, newest first. Addresses are compared normalized, a
    Message-ID with or without its angle brackets."""

    since: int | None = None  # unix seconds, inclusive
    until: int | None = None  # unix seconds, exclusive
    sender: str | None = None
    recipient: str | None = None
    account: str | None = None
    outcome: Outcome | None = None
    message_id: str | None = None
    limit: int = 50

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if self.message_id:
            clauses.append("d.message_id IN (?, ?)")
            args += message_id_forms(self.message_id)
        for column, value in (
            ("sender", self.sender and self.sender.strip().lower()),
            ("account", self.account),
            ("outcome", self.outcome and str(self.outcome)),
        ):
            if value:
                clauses.append(f"d.{column} = ?")
                args.append(value)
        if self.recipient:
            clauses.append(
                "d.id IN (SELECT delivery_id FROM delivery_recipients WHERE recipient = ?)"
            )
            args.append(self.recipient.strip().lower())
        if self.since is not None:
            clauses.append("d.created >= ?")
            args.append(self.since)
        if self.until is not None:
            clauses.append("d.created < ?")
            args.append(self.until)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def insert(
    db: Connection, record: DeliveryRecord, charged: int | None = None, *, queued: bool = False
) -> int:
    """Write `record` inside the caller's write transaction; returns its id.

    `charged`, when given, is the units the settle kept (instead of the record's);
    `queued`: the final record of a queued message (its events: `QUEUE_EVENTS`).
    """
    if getattr(db, "is_postgres", False):
        return int(_insert_pg(db, record, charged, queued=queued)["delivery_id"])
    row = db.execute(
        "INSERT INTO deliveries (created, message_id, account, token_id, sender, size, channel,"
        " rule, outcome, reply_code, reply_enhanced, reply_text, upstream_id, charged,"
        " duration_ms, client, replay, recipient_count, attempts, listener)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        _values(record, charged),
    ).fetchone()
    delivery_id = int(row["id"])
    # A recipient given twice was metered once (RCPT dedupes): one row each.
    db.executemany(
        "INSERT INTO delivery_recipients (delivery_id, recipient, outcome, code, enhanced)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (delivery_id, recipient) DO NOTHING",
        [(delivery_id, r.address, str(r.outcome), r.code, r.enhanced) for r in record.recipients],
    )
    after_record(db, record, delivery_id, queued=queued)
    return delivery_id


# PostgreSQL: the record, its recipients (arrays unnested) and whether its account
# has an enabled webhook endpoint, in one statement: one round trip, where the
# three statements (and one per recipient) each cost the relay a send and the
# record's id a wait. The endpoint lookup is `outbox.account_events`' own.
# `{pending}`: the settle's DELETE of its pending row, when the record is a
# settle's (`insert_settled`), `{charged}` then the units it kept.
_INSERT_PG = (
    "WITH {pending}d AS (INSERT INTO deliveries (created, message_id, account, token_id, sender,"
    " size, channel, rule, outcome, reply_code, reply_enhanced, reply_text, upstream_id,"
    " charged, duration_ms, client, replay, recipient_count, attempts, listener)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {charged}, ?, ?, ?, ?, ?, ?) RETURNING id),"
    " r AS (INSERT INTO delivery_recipients (delivery_id, recipient, outcome, code, enhanced)"
    " SELECT d.id, x.recipient, x.outcome, x.code, x.enhanced FROM d,"
    " unnest(?::text[], ?::text[], ?::bigint[], ?::text[])"
    " AS x (recipient, outcome, code, enhanced)"
    " ON CONFLICT (delivery_id, recipient) DO NOTHING)"
    " SELECT d.id AS delivery_id, EXISTS (SELECT 1 FROM webhook_endpoints AS e"
    " JOIN accounts AS a ON a.id = e.account_id WHERE a.name = ? AND e.enabled = 1) AS hooked"
    "{columns} FROM d{join}"
)
INSERT_PG = _INSERT_PG.format(pending="", charged="?", columns="", join="")
# The pending row's DELETE comes first in the statement and takes the row (as
# `relay.store.ledger._settle`'s own): of two settles, the second finds it gone.
INSERT_SETTLED_PG = _INSERT_PG.format(
    pending="p AS (DELETE FROM pending WHERE id = ? AND created = ? RETURNING *), ",
    charged="COALESCE((SELECT p.unit * LEAST(?, p.count) FROM p), 0)",
    columns=", p.*",
    join=" LEFT JOIN p ON true",
)


def _values(record: DeliveryRecord, charged: int | None) -> tuple[Any, ...]:
    """A record's columns, in the order both backends' INSERTs name them."""
    return (
        record.time,
        record.message_id,
        record.account,
        record.token_id,
        record.sender,
        record.size,
        record.channel,
        record.rule,
        str(record.outcome),
        record.reply.code,
        record.reply.enhanced,
        record.reply.text,
        record.upstream_id,
        record.charged if charged is None else charged,
        round(record.duration * 1000),
        record.client,
        int(record.replay),
        record.total_recipients,
        attempts_text(record.attempts),
        record.listener,
    )


def _insert_pg(
    db: Connection,
    record: DeliveryRecord,
    charged: int | None,
    *,
    queued: bool,
    settle: tuple[int, int] | None = None,
) -> Any:
    """`insert` on PostgreSQL (`INSERT_PG`): what follows a record (`after_record`)
    runs only when its account has an endpoint or a recipient is to be suppressed,
    where it does all it does on SQLite. `settle` (reservation id, created): the
    record's settle deletes its pending row in the same statement, `charged` the
    recipients delivered; returns the row (its `delivery_id`, and the pending
    row's columns, None if it was gone)."""
    recipients = record.recipients
    row = db.execute(
        INSERT_PG if settle is None else INSERT_SETTLED_PG,
        (
            *(settle or ()),
            *_values(record, charged),
            [r.address for r in recipients],
            [str(r.outcome) for r in recipients],
            [r.code for r in recipients],
            [r.enhanced for r in recipients],
            record.account,
        ),
    ).fetchone()
    if row["hooked"] or _refusals(record):
        after_record(db, record, int(row["delivery_id"]), queued=queued)
    return row


def insert_settled(
    db: Connection,
    record: DeliveryRecord,
    reservation_id: int,
    created: int,
    delivered: int,
) -> Any:
    """PostgreSQL: a settle's DELETE of its pending row and its delivery record in one
    statement (`INSERT_SETTLED_PG`); the pending row as deleted, or None if it was gone."""
    row = _insert_pg(db, record, delivered, queued=False, settle=(reservation_id, created))
    return None if row["id"] is None else row


def _refusals(record: DeliveryRecord) -> list[tuple[str, str, str]]:
    """The recipients an upstream refused as mailbox errors: (address, enhanced, text)."""
    return [
        (r.address, r.enhanced, r.text)
        for r in record.recipients
        if r.outcome is Outcome.REFUSED
        and record.channel
        and r.text.startswith(f"{record.channel}:")  # the upstream's words, not the relay's
        and is_mailbox_refusal(r.code, r.enhanced)
    ]


def after_record(
    db: Connection, record: DeliveryRecord, delivery_id: int, *, queued: bool = False
) -> None:
    """What a record implies, in its own transaction: the recipients an upstream
    refused as mailbox errors join the account's suppression list, and the
    account's webhooks get the events that describe the message."""
    refusals = _refusals(record)
    account_id = None
    if refusals:
        account_id = _account_id(db, record.account)
    suppressed = (
        record_refusals(db, account_id, refusals, record.time) if account_id is not None else []
    )

    def events() -> list[tuple[str, dict[str, Any]]]:
        data = message_data(record, delivery_id)
        by_outcome = QUEUE_EVENTS[record.outcome] if queued else (EVENT_BY_OUTCOME[record.outcome],)
        made = [(event_type, data) for event_type in by_outcome]
        made += [
            (
                "recipient.suppressed",
                {
                    "account": record.account,
                    "address": address,
                    "reason": reason,
                    "message_id": record.message_id,
                    "source": "upstream",
                },
            )
            for address, reason in suppressed
        ]
        return made

    outbox.account_events(db, record.account, events, record.time)


# The delivery log's outcomes as webhook events (relay.store.outbox).
EVENT_BY_OUTCOME = {
    Outcome.DELIVERED: "message.delivered",
    Outcome.PARTIAL: "message.delivered",
    Outcome.REFUSED: "message.refused",
    Outcome.DEFERRED: "message.deferred",
}
# A queued message's end: the app was told 250 (queued), so a recipient the queue
# could not deliver is a final failure (message.failed), whatever its last reply;
# a partial end tells both.
QUEUE_EVENTS: dict[Outcome, tuple[str, ...]] = {
    Outcome.DELIVERED: ("message.delivered",),
    Outcome.PARTIAL: ("message.delivered", "message.failed"),
    Outcome.REFUSED: ("message.failed",),
    Outcome.DEFERRED: ("message.failed",),
}


def message_data(record: DeliveryRecord, delivery_id: int) -> dict[str, Any]:
    """The `data` of a message event: the message and what became of each recipient."""
    return {
        "message_id": record.message_id,
        "delivery_id": delivery_id,
        "account": record.account,
        "token_id": record.token_id,
        "sender": record.sender,
        "recipients": [
            {
                "address": r.address,
                "outcome": str(r.outcome),
                "reply": f"{r.code} {r.enhanced} {r.text}".strip(),
            }
            for r in record.recipients
        ],
        "recipient_count": record.total_recipients,
        "outcome": str(record.outcome),
        "reply": str(record.reply),
        "channel": record.channel,
        "upstream_id": record.upstream_id,
        # Each channel tried counts one (a failover's, a queue's retries).
        "attempts": max(len(record.attempts), 1),
        "time": datetime.fromtimestamp(record.time, UTC).isoformat().replace("+00:00", "Z"),
    }


def _account_id(db: Connection, name: str) -> int | None:
    row = db.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row["id"])


class Deliveries(Database):
    def record_delivery(self, record: DeliveryRecord) -> int:
        """Record a message no charge is settled for (refused before it, or a replay)."""
        with self._write() as db:
            return insert(db, record)

    @read_only
    def find_deliveries(self, query: Query) -> list[DeliveryRecord]:
        where, args = query.where()
        limit = max(1, min(query.limit, MAX_LIMIT))
        rows = self._read(
            f"SELECT * FROM deliveries AS d{where} ORDER BY d.id DESC LIMIT ?",  # noqa: S608 - placeholders only
            (*args, limit),
        )
        recipients: dict[int, list[RecipientOutcome]] = {r["id"]: [] for r in rows}
        ids = list(recipients)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT * FROM delivery_recipients WHERE delivery_id IN ({marks})"  # noqa: S608 - placeholders only
            for r in self._read(sql, tuple(chunk)):
                recipients[r["delivery_id"]].append(
                    RecipientOutcome(
                        r["recipient"], Outcome(r["outcome"]), r["code"], r["enhanced"]
                    )
                )
        return [_record(row, recipients[row["id"]]) for row in rows]

    def prune_deliveries(self, before: int, batch: int = PRUNE_BATCH) -> int:
        """Delete up to `batch` records created before `before` (unix seconds), oldest
        first, in one short transaction; returns how many went."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
                " WHERE created < ? ORDER BY created LIMIT ?)",
                (before, batch),
            )
        return int(cur.rowcount)

    def prune_oldest_deliveries(self, count: int) -> int:
        """Delete the `count` oldest records (at most PRUNE_BATCH), in one short
        transaction; returns how many went."""
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
                " ORDER BY created, id LIMIT ?)",
                (min(count, PRUNE_BATCH),),
            )
        return int(cur.rowcount)

    @read_only
    def log_size(self) -> tuple[int, int]:
        """An estimate of the delivery log's size: (bytes, records). Cheap enough for
        every upkeep tick; exact figures would read every page of the log.

        Records: the span of ids (an index's two ends), as records are pruned
        oldest first; ids a rolled-back write took make it a little high.

        SQLite: the database's pages in use (page_count less the free list)
        times the page size, two pragmas. That counts the other tables too, but
        beside the log they are small (a row per sender, account and token; the
        idempotency keys, failed AUTH and refusals pruned within hours), and a
        delete frees the log's pages at once, so the figure falls as it prunes.

        PostgreSQL: a DELETE frees no file space (pg_total_relation_size stays
        at its high-water mark until a VACUUM FULL), so the live records are
        estimated instead: the records times the mean size of the newest
        SIZE_SAMPLE records with their recipients (pg_column_size), plus each
        row's overhead and its index entries.
        """
        span = self._read("SELECT min(id) AS low, max(id) AS high FROM deliveries")[0]
        records = 0 if span["low"] is None else int(span["high"]) - int(span["low"]) + 1
        if not self.is_postgres:
            pages = (
                self._read("PRAGMA page_count")[0][0] - self._read("PRAGMA freelist_count")[0][0]
            )
            return int(pages) * int(self._read("PRAGMA page_size")[0][0]), records
        if not records:
            return 0, 0
        row = self._read(
            "SELECT avg(pg_column_size(d.*) + ? + COALESCE((SELECT sum(pg_column_size(r.*) + ?)"
            " FROM delivery_recipients AS r WHERE r.delivery_id = d.id), 0)) AS mean"
            " FROM (SELECT * FROM deliveries ORDER BY id DESC LIMIT ?) AS d",
            (PG_ROW_OVERHEAD, PG_ROW_OVERHEAD, SIZE_SAMPLE),
        )[0]
        return int(float(row["mean"] or 0) * PG_INDEX_FACTOR * records), records


def _record(row: Row, recipients: list[RecipientOutcome]) -> DeliveryRecord:
    order = {"delivered": 0, "refused": 1, "deferred": 2}
    return DeliveryRecord(
        time=row["created"],
        message_id=row["message_id"],
        account=row["account"],
        token_id=row["token_id"],
        sender=row["sender"],
        recipients=tuple(sorted(recipients, key=lambda r: (order[r.outcome], r.address))),
        size=row["size"],
        channel=row["channel"],
        rule=row["rule"],
        outcome=Outcome(row["outcome"]),
        reply=Reply(row["reply_code"], row["reply_enhanced"], row["reply_text"]),
        upstream_id=row["upstream_id"],
        charged=row["charged"],
        duration=row["duration_ms"] / 1000,
        client=row["client"],
        replay=bool(row["replay"]),
        id=row["id"],
        recipient_count=row["recipient_count"] or len(recipients),
        attempts=attempts_from(row["attempts"]),
        listener=row["listener"],
        provider_events=tuple(json.loads(row["provider_events"] or "[]")),
    )
