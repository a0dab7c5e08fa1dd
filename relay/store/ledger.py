"""The ledger: the charge of each message, its settle, and the sweep of stale charges.

Balances are kept by `relay.store.senders`, the send-limit windows by
`relay.store.limits`; the charge reads and changes both.

Guarantees, whatever the number of sessions, relay processes and hosts on one
database:
- `reserve` is atomic and conditional: it charges the balance and counts the
  token's rate windows (`relay.store.rates`) and the send-limit windows in one
  write transaction, or changes nothing.
- A balance never goes below zero: the charge is one conditional UPDATE
  (`... WHERE balance >= charge`), and the column has a CHECK. On SQLite the
  transaction holds the write lock (`BEGIN IMMEDIATE`); on PostgreSQL (READ
  COMMITTED) the UPDATE locks the sender's row and re-checks its condition
  against the latest committed balance, so two hosts cannot both spend the
  last unit.
- A send limit is never exceeded. On SQLite the write lock is held, so the
  windows' counts read in the transaction are exact: a window they show full
  refuses the message, and the others grow by one upsert. On PostgreSQL each
  window's count grows by one conditional upsert (`ON CONFLICT DO UPDATE SET
  count = counters.count + excluded.count WHERE counters.count +
  excluded.count <= limit RETURNING`), which locks the window's row and
  re-checks the sum against its latest count; a window the upsert did not
  return refuses the message and rolls the transaction back. A token's rate
  windows are counted the same way (`relay.store.rates`). Every transaction
  locks rows in one order (the sender, the token's rate windows, the account's
  windows, then the relay's), so none waits on another in a cycle.
  A window without a limit is counted in the relay process's own rows
  instead (`relay.store.limits.window_scopes`), which no other host waits
  for; a group commit takes all its shared rows first, in this same order
  (`relay.store.group`; docs/postgres.md, "Group commit").
- Every reservation is recorded as a pending row until `settle` refunds what the
  upstream did not take; a crash leaves the row, and `settle_stale` (on start and
  periodically) refunds it. A settle begins by deleting its pending row
  (`DELETE ... RETURNING`): of two hosts that settle or sweep the same row, one
  deletes it and refunds, the other finds nothing, so a refund is made once.
- A pending row names the process that reserved it (`owner`), which refreshes its
  `heartbeat` while it lives. `settle_stale` refunds only rows whose owner is
  gone: a live process whose `settle` failed keeps retrying it, and the message
  the upstream took stays charged. Heartbeats are the relays' clocks: hosts
  sharing a database keep them in step (NTP), well within OWNER_DEAD_AFTER.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from relay.errors import Refused
from relay.policy import SenderState
from relay.store.charge import (
    MAIL_CHECK_SQL,
    MAIL_CHECK_WINDOWS_SQL,
    ChargeMissed,
    Reads,
    charge_sender,
    lock_rows,
    owner_and_token,
    reserve_pipelined,
    start_reads,
    windows_args,
)
from relay.store.db import Connection, Database, read_only
from relay.store.deliveries import DeliveryRecord, insert, insert_settled
from relay.store.idempotency import delivered_recently, forget_expired, remember_delivered
from relay.store.journal import PendingSettle
from relay.store.limits import (
    RELAY_SCOPE,
    add_to_windows,
    count_windows,
    plain,
    read_windows,
    start_read_windows,
    window_scopes,
    windows_of,
)
from relay.store.limits import give_back as give_back_window
from relay.store.rates import count_rates, give_back, read_rates
from relay.store.refusals import REFUSAL_WINDOW
from relay.store.senders import ensure_sender
from relay.tokenrules import (
    NO_RULES,
    RateHit,
    RateUse,
    TokenRules,
    Unit,
    load_rules,
    rate_hit,
    sender_allowed,
)
from relay.windows import UNLIMITED, LimitHit, Window, headroom, period_key, window_reset

# A process whose heartbeat is older than this is dead (it beats every 10 s);
# the relay passes its RELAY_OWNER_DEAD_AFTER.
OWNER_DEAD_AFTER = 60
# The pending row's owner while the durable queue holds its message (relay.store.queue).
QUEUED_OWNER = "queue"


@dataclass(frozen=True, slots=True)
class MailCheck:
    """Everything MAIL FROM needs to know, read in one round trip."""

    domain_owner: int | None
    token_valid: bool  # revoked or expired since AUTH: the session must AUTH again
    sender: SenderState
    headroom: int | None  # recipients the tightest send-limit window still allows
    hit: LimitHit | None  # the exhausted window, if any
    refusals: int = 0  # the token's refused messages in the window, counted up to the limit
    rules: TokenRules = NO_RULES  # the token's senders and rates, as they are now
    rate_use: Mapping[Unit, RateUse] = field(default_factory=dict)  # its rate windows
    rate: RateHit | None = None  # the message window one more message would pass
    queue: str | None = None  # the account's own RELAY_QUEUE mode; None: the relay's


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    charged: int
    replay: bool = False  # the upstream already took this message: nothing charged
    # When it was made: with the id, what names the pending row. SQLite may
    # give a swept row's id to the next reservation (rowids without
    # AUTOINCREMENT); a late settle must not settle that one.
    created: int | None = field(default=None, compare=False)


class Ledger(Database):
    owner: str | None = None  # the live process's id, recorded on each reservation
    # A PostgreSQL group's charges' reads, executed at its start (`prefetch_charges`).
    _prefetched: deque[Reads] = deque()  # replaced, never changed in place

    # --- the runtime path --------------------------------------------------------

    @read_only
    def check_mail(
        self,
        address: str,
        domain: str,
        account_id: int,
        default_balance: int,
        unlimited: bool,
        token_id: str = "",
        refusal_limit: int = 0,
    ) -> MailCheck:
        """MAIL FROM: the domain's owner, the sender's balance, the windows. Reads only.

        A sender with no row is read as `default_balance`; its row is created by
        the first `reserve` that charges it, never here, so MAIL FROM alone
        (a client probing addresses, MAIL + RSET in a loop) writes nothing.
        `DEFAULT_SEND_BALANCE` only ever creates a missing row (ON CONFLICT DO
        NOTHING): an admin-disabled or admin-edited row stays as the admin left it.

        The token's refusals (`relay.store.refusals`) are counted up to `refusal_limit`
        (0: not counted), so the count costs the same however many there were.
        """
        now = self.clock()
        # PostgreSQL: one statement with the windows (`MAIL_CHECK_WINDOWS_SQL`); a
        # token whose rules count rates has its rate windows read after, in a second.
        pg = self.is_postgres
        with self._connection(pipelined=not pg) as db:
            # The domain's owner, the token, the no-limit list and the sender's
            # row, and the token's refusals, in one statement: MAIL FROM asks
            # all five of every message.
            ts = int(now.timestamp())
            args = (
                domain,
                ts,
                token_id,
                token_id,
                *(address,) * 3,
                token_id,
                ts - REFUSAL_WINDOW,
                refusal_limit,
                account_id,
            )
            if pg:  # with the windows: one statement (`MAIL_CHECK_WINDOWS_SQL`)
                rows = db.execute(
                    MAIL_CHECK_WINDOWS_SQL, (*args, *windows_args(account_id, now))
                ).fetchall()
                row = rows[0]
            else:
                check = db.execute(MAIL_CHECK_SQL, args)
                windows = start_read_windows(db, account_id, now)
                row = check.fetchone()
                rows = windows.fetchall()
            room, hit = self._headroom(windows_of(rows), now)
            rules = load_rules(row["rules"])
            use = read_rates(db, token_id) if rules.counted else {}
        owner, known = row["owner"], row["balance"] is not None
        state = SenderState(
            address=address,
            balance=row["balance"] if known else default_balance,
            enabled=bool(row["enabled"]) if known else True,
            unlimited=unlimited or bool(row["nolimit"]),
        )
        owner = None if owner is None else int(owner)
        return MailCheck(
            owner,
            bool(row["token_ok"]),
            state,
            room,
            hit,
            int(row["refusals"]),
            rules,
            use,
            rate_hit(rules, use, 1, 0, ts) if rules.counted else None,
            row["queue"],
        )

    def _headroom(
        self, windows: list[tuple[str, Window, int, int]], now: datetime
    ) -> tuple[int | None, LimitHit | None]:
        """The tightest window's remaining room, and the first exhausted window if any."""
        tightest: int | None = None
        for label, window, limit, used in windows:
            room = headroom(limit, used)
            if room is None:
                continue
            if room == 0:
                return 0, LimitHit(label, window, limit, window_reset(window, now))
            tightest = room if tightest is None else min(tightest, room)
        return tightest, None

    def reserve(
        self,
        sender: str,
        *,
        account_id: int,
        recipients: int,
        unit: int,
        default_balance: int,
        idempotency_key: str | None = None,
        domain: str | None = None,
        token_id: str | None = None,
    ) -> Reservation:
        """Atomically charge `unit` per recipient and count the send-limit windows.

        Raises `Refused` (and changes nothing) when the session's token was
        revoked or expired, the sender's domain left the account or the token's
        sender scope, or the balance, a token rate window or a send-limit window
        cannot cover all recipients. The pending row lets `settle` refund what
        the upstream did not take, even after a crash.

        Order matters on PostgreSQL: the sender's row is locked first, then the
        token's rate windows, the pending row written, and the send-limit
        windows counted last in one statement, the account's before the
        relay's (the module docstring says why).
        """
        now = self.clock()
        if self.in_batch:
            # PostgreSQL's group commit: the same charge in two round trips
            # (`relay.store.charge`); a sender that cannot pay, or has no row
            # yet, is rolled back there and charged the way below.
            try:
                with self._write() as db:
                    made = reserve_pipelined(
                        db,
                        now=now,
                        sender=sender,
                        account_id=account_id,
                        recipients=recipients,
                        unit=unit,
                        idempotency_key=idempotency_key,
                        domain=domain,
                        token_id=token_id,
                        owner=self.owner,
                        reads=self._prefetched.popleft() if self._prefetched else None,
                    )
                if made is None:
                    return Reservation(0, 0, replay=True)
                return Reservation(made[0], made[1], created=made[2])
            except ChargeMissed:
                pass
        ts = int(now.timestamp())
        day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
        scopes: tuple[str, ...] = (RELAY_SCOPE, str(account_id))
        charge = unit * recipients
        rules = NO_RULES
        with self._write() as db:
            if token_id is not None or domain is not None:
                owner, token_valid, rules = owner_and_token(db, domain or "", token_id or "", ts)
                if token_id is not None and not token_valid:
                    raise Refused("the session's token was revoked or expired", token_invalid=True)
                if domain is not None and owner != account_id:
                    raise Refused(f"domain {domain} left the account", domain_lost=True)
                if not sender_allowed(rules.senders, sender):
                    raise Refused(f"{sender} left the token's scope", out_of_scope=True)
            if idempotency_key and delivered_recently(db, idempotency_key, ts):
                return Reservation(0, 0, replay=True)
            if unit:
                cur = charge_sender(db, sender, charge, ts)
                if cur.rowcount != 1:
                    # No row yet (its first charge), or one that cannot pay. The
                    # charge is tried again after the row is made, whoever made it:
                    # on PostgreSQL another host's first charge may have made it
                    # since, and its balance decides, not the miss above.
                    ensure_sender(db, sender, default_balance, ts)
                    cur = charge_sender(db, sender, charge, ts)
                if cur.rowcount != 1:
                    row = db.execute(
                        "SELECT balance, enabled FROM senders WHERE address = ?", (sender,)
                    ).fetchone()
                    raise Refused(
                        f"balance of {sender} cannot cover {charge}",
                        balance=row["balance"] if row else 0,
                        disabled=bool(row and not row["enabled"]),
                    )
            counted = token_id if token_id is not None and rules.counted else None
            if counted is not None:
                rate = count_rates(db, counted, rules, recipients, ts)
                if rate is not None:
                    raise Refused(f"token {rate.what} rate {rate.rate} reached", rate=rate)
            windows = read_windows(db, account_id, now)
            for label, window, limit, used in windows:
                # Exact on SQLite (the write lock is held); on PostgreSQL a count
                # read here may be stale, and the upsert below decides.
                if limit != UNLIMITED and used + recipients > limit:
                    hit = LimitHit(label, window, limit, window_reset(window, now))
                    raise Refused(f"{label} {window.value} limit {limit} reached", hit=hit)
            if self.is_postgres:
                scopes = tuple(window_scopes(account_id, windows, self.owner))
            pending = db.execute(
                "INSERT INTO pending"
                " (sender, unit, count, scopes, day, month, created, owner, token)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (sender, unit, recipients, plain(scopes), day, month, ts, self.owner, counted),
            ).fetchone()
            if self.is_postgres:
                full = count_windows(db, account_id, day, month, recipients, windows, scopes)
                if full is not None:
                    label, window, limit, _ = full
                    hit = LimitHit(label, window, limit, window_reset(window, now))
                    raise Refused(f"{label} {window.value} limit {limit} reached", hit=hit)
            else:
                # SQLite: the write lock is held, so the counts checked above are
                # exact and the windows need no condition of their own.
                add_to_windows(db, account_id, day, month, recipients)
        return Reservation(int(pending["id"]), charge, created=ts)

    def settle(
        self,
        reservation_id: int,
        delivered: int,
        idempotency_key: str | None = None,
        record: DeliveryRecord | None = None,
        created: int | None = None,
    ) -> int:
        """Keep the charge for `delivered` recipients, refund the rest. Returns the refund.

        With an `idempotency_key`, a delivered message is remembered for the
        upstream's idempotency window, so `reserve` does not charge a retry.
        The delivery log's `record` is written in the same transaction, with
        the units kept. `created` (the reservation's) makes sure the row settled
        is the one reserved: a sweep may have refunded it, and the next
        reservation may have taken its id, while this settle waited.
        """
        now = self._now()
        with self._write() as db:
            if idempotency_key and delivered:
                remember_delivered(db, idempotency_key, now)
            if record is not None and created is not None and getattr(db, "is_postgres", False):
                # One statement, one round trip (`insert_settled`).
                row = insert_settled(db, record, reservation_id, created, delivered)
                return 0 if row is None else _refund(db, row, delivered, now)[0]
            refund, kept = _settle(db, reservation_id, delivered, now, created) or (0, 0)
            if record is not None:
                insert(db, record, kept)
            return refund

    def apply_settles(self, entries: Sequence[PendingSettle]) -> int:
        """Apply settles a stopped process journaled (`relay.store.journal`); returns how many
        settled a row.

        Each as `settle` does it, but only while its pending row is still there:
        a settle its process made after all, or an entry applied before, changes
        nothing and records nothing a second time.
        """
        now, applied = self._now(), 0
        for entry in entries:
            with self._write() as db:
                settled = _settle(db, entry.reservation_id, entry.delivered, now, entry.created)
                if settled is None:
                    continue
                if entry.idempotency_key and entry.delivered:
                    remember_delivered(db, entry.idempotency_key, now)
                if entry.record is not None:
                    insert(db, entry.record, settled[1])
                applied += 1
        return applied

    def settle_stale(
        self, older_than: float, dead_after: float = OWNER_DEAD_AFTER
    ) -> list[dict[str, Any]]:
        """Refund in full every reservation left pending longer than `older_than` seconds
        by a process that is gone (no owner, or no heartbeat for `dead_after` seconds).

        Such a reservation belongs to a process that died between charge and
        forward. The client got no 250 for it, so it will retry and be charged
        again: refunding avoids charging it twice. A live owner's rows stay: it
        is still settling them.

        A row the durable queue holds (`owner = 'queue'`) is never swept: its
        250 was sent, and the queue settles it when the message ends.

        Each row is settled in a transaction of its own, as `settle` does it: of
        two hosts sweeping at once, the one whose `DELETE ... RETURNING` takes
        the row refunds it, and the other finds it gone.
        """
        now = self._now()
        rows = self._read(
            "SELECT * FROM pending WHERE created <= ? AND (owner IS NULL OR (owner <> ?"
            " AND NOT EXISTS (SELECT 1 FROM processes p WHERE p.id = pending.owner"
            " AND p.heartbeat > ?))) ORDER BY id",
            (now - older_than, QUEUED_OWNER, now - dead_after),
        )
        settled = []
        for row in rows:
            with self._write() as db:
                if _settle(db, row["id"], 0, now, row["created"]) is not None:
                    settled.append(dict(row))
        with self._write() as db:
            forget_expired(db, now)
            db.execute("DELETE FROM processes WHERE heartbeat <= ?", (now - 86400,))
        return settled

    def lock_rows(
        self, charges: list[tuple[str, int, str | None]], settles: list[tuple[int, int]]
    ) -> None:
        """A PostgreSQL group's first step (`relay.store.group`): lock the rows its
        charges (sender, account, token) and its settles (reservation id, delivered)
        change, in the global order."""
        with self._write() as db:
            lock_rows(db, self.clock(), charges, settles)

    def prefetch_charges(self, charges: list[dict[str, Any]]) -> None:
        """A PostgreSQL group's charges' reads, queued at its start in its order
        (`relay.store.charge.start_reads`); each `reserve` takes the first."""
        now = self.clock()
        self._prefetched = deque()
        with self._write() as db:
            for charge in charges:
                self._prefetched.append(
                    start_reads(
                        db,
                        now,
                        account_id=charge["account_id"],
                        idempotency_key=charge.get("idempotency_key"),
                        domain=charge.get("domain"),
                        token_id=charge.get("token_id"),
                    )
                )

    def heartbeat(self) -> None:
        """Record that this process (`owner`) lives; also proves the database writable."""
        with self._write() as db:
            db.execute(
                "INSERT INTO processes (id, pid, heartbeat) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat",
                (self.owner or "", os.getpid(), self._now()),
            )

    def retire(self) -> None:
        """This process stops: its reservations left pending are now any sweep's."""
        with self._write() as db:
            db.execute("DELETE FROM processes WHERE id = ?", (self.owner or "",))

    def pending_count(self) -> int:
        return int(self._read("SELECT count(*) FROM pending")[0][0])


def _settle(
    db: Connection, reservation_id: int, delivered: int, ts: int, created: int | None = None
) -> tuple[int, int] | None:
    """Settle one pending row: (units refunded, units kept), or None if it was settled.

    The DELETE comes first and takes the row: a second transaction settling the
    same row (another host's sweep) waits for it, then deletes nothing and
    refunds nothing. Then the sender's row, then the windows in `reserve`'s
    lock order (the token's, the account's, the relay's).
    """
    if created is None:
        row = db.execute(
            "DELETE FROM pending WHERE id = ? RETURNING *", (reservation_id,)
        ).fetchone()
    else:
        row = db.execute(
            "DELETE FROM pending WHERE id = ? AND created = ? RETURNING *",
            (reservation_id, created),
        ).fetchone()
    if row is None:
        return None  # settled already (by a sweep that judged it stale)
    return _refund(db, row, delivered, ts)


def _refund(db: Connection, row: Any, delivered: int, ts: int) -> tuple[int, int]:
    """A deleted pending `row`'s refund: (units refunded, units kept)."""
    undelivered = max(row["count"] - delivered, 0)
    refund = row["unit"] * undelivered
    if refund:
        db.execute(
            "UPDATE senders SET balance = balance + ?, updated = ? WHERE address = ?",
            (refund, ts, row["sender"]),
        )
    if undelivered and row["token"] is not None:
        messages = 1 if undelivered >= row["count"] else 0
        give_back(db, row["token"], int(row["created"]), messages, undelivered)
    if undelivered:
        # The account's before the relay's (the lock order); each to the row that
        # counted it (`relay.store.limits.give_back`).
        for scope in sorted(row["scopes"].split(","), key=lambda s: s == RELAY_SCOPE):
            for period in (row["day"], row["month"]):
                give_back_window(db, scope, period, row["owner"], undelivered)
    return int(refund), int(row["unit"] * min(delivered, row["count"]))
