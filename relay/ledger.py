"""The ledger: senders' balances, send-limit windows, and the charge of each message.

Guarantees, whatever the number of sessions and relay processes on one database:
- `reserve` is atomic and conditional: it charges the balance and counts the
  send-limit windows in one write transaction (`BEGIN IMMEDIATE` takes SQLite's
  write lock across processes), and a balance never goes below zero (the UPDATE
  is conditional and the column has a CHECK).
- Every reservation is recorded as a pending row until `settle` refunds what the
  upstream did not take; a crash leaves the row, and `settle_stale` (on start and
  periodically) refunds it, so no refund is lost silently.
- A pending row names the process that reserved it (`owner`), which refreshes its
  `heartbeat` while it lives. `settle_stale` refunds only rows whose owner is
  gone: a live process whose `settle` failed keeps retrying it, and the message
  the upstream took stays charged.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from relay.accounts import account_id_of, domain_owner, is_nolimit
from relay.db import Database, read_only, translate
from relay.deliveries import DeliveryRecord, insert
from relay.errors import RelayError
from relay.idempotency import delivered_recently, forget_expired, remember_delivered
from relay.policy import (
    UNLIMITED,
    LimitHit,
    SenderState,
    Window,
    headroom,
    period_key,
    window_reset,
)
from relay.tokens import token_still_valid

RELAY_SCOPE = "*"
# A process whose heartbeat is older than this is dead (it beats every 10 s).
OWNER_DEAD_AFTER = 60


@dataclass(frozen=True, slots=True)
class MailCheck:
    """Everything MAIL FROM needs to know, read in one round trip."""

    domain_owner: int | None
    token_valid: bool  # revoked or expired since AUTH: the session must AUTH again
    sender: SenderState
    headroom: int | None  # recipients the tightest send-limit window still allows
    hit: LimitHit | None  # the exhausted window, if any


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    charged: int
    replay: bool = False  # the upstream already took this message: nothing charged


class Refused(RelayError):
    """`reserve` refused: the balance or a send-limit window cannot cover the message."""

    def __init__(
        self,
        message: str,
        *,
        balance: int | None = None,
        disabled: bool = False,
        hit: LimitHit | None = None,
        domain_lost: bool = False,
        token_invalid: bool = False,
    ) -> None:
        super().__init__(message)
        self.token_invalid = token_invalid
        self.balance = balance
        self.disabled = disabled
        self.domain_lost = domain_lost
        self.hit = hit


class Ledger(Database):
    owner: str | None = None  # the live process's id, recorded on each reservation

    # --- senders' balances -------------------------------------------------------

    def list_senders(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT address, balance, enabled, created, updated FROM senders")
        return [_sender(r) for r in sorted(rows, key=lambda r: r["address"])]

    def show_sender(self, address: str) -> dict[str, Any]:
        rows = self._read(
            "SELECT address, balance, enabled, created, updated FROM senders WHERE address = ?",
            (address,),
        )
        if not rows:
            raise RelayError(f"no sender row for {address}")
        return _sender(rows[0])

    def set_sender(
        self, address: str, *, balance: int | None = None, enabled: bool | None = None
    ) -> dict[str, Any]:
        if balance is not None and balance < 0:
            raise RelayError("a balance cannot be negative")
        now = self._now()
        with self._write() as db:
            db.execute(
                "INSERT INTO senders (address, balance, enabled, created, updated)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET"
                " balance = COALESCE(?, balance), enabled = COALESCE(?, enabled), updated = ?",
                (
                    address,
                    balance or 0,
                    1 if enabled is None else int(enabled),
                    now,
                    now,
                    balance,
                    None if enabled is None else int(enabled),
                    now,
                ),
            )
        return self.show_sender(address)

    def topup_sender(self, address: str, amount: int) -> dict[str, Any]:
        now = self._now()
        with self._write() as db:
            row = db.execute("SELECT balance FROM senders WHERE address = ?", (address,)).fetchone()
            if row is None:
                # A top-up for a sender who never sent creates the row with it.
                _ensure_sender(db, address, 0, now)
                row = {"balance": 0}
            if row["balance"] + amount < 0:
                raise RelayError(f"a top-up of {amount} would make the balance negative")
            db.execute(
                "UPDATE senders SET balance = balance + ?, updated = ? WHERE address = ?",
                (amount, now, address),
            )
        return self.show_sender(address)

    def delete_sender(self, address: str) -> None:
        with self._write() as db:
            cur = db.execute("DELETE FROM senders WHERE address = ?", (address,))
        if cur.rowcount == 0:
            raise RelayError(f"no sender row for {address}")

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
    ) -> MailCheck:
        """MAIL FROM: the domain's owner, the sender's balance, the windows. Reads only.

        A sender with no row is read as `default_balance`; its row is created by
        the first `reserve` that charges it, never here, so MAIL FROM alone
        (a client probing addresses, MAIL + RSET in a loop) writes nothing.
        `DEFAULT_SEND_BALANCE` only ever creates a missing row (ON CONFLICT DO
        NOTHING): an admin-disabled or admin-edited row stays as the admin left it.
        """
        now = self.clock()
        db = self.db
        try:
            owner = domain_owner(db, domain)
            token_valid = token_still_valid(db, token_id, self._now())
            unlimited = unlimited or is_nolimit(db, address)
            row = _sender_row(db, address)
            room, hit = self._headroom(db, account_id, now)
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        state = SenderState(
            address=address,
            balance=row["balance"] if row else default_balance,
            enabled=bool(row["enabled"]) if row else True,
            unlimited=unlimited,
        )
        return MailCheck(owner[0] if owner else None, token_valid, state, room, hit)

    def _headroom(
        self, db: sqlite3.Connection, account_id: int, now: datetime
    ) -> tuple[int | None, LimitHit | None]:
        """The tightest window's remaining room, and the first exhausted window if any."""
        tightest: int | None = None
        for label, window, limit, used in _windows(db, account_id, now):
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
        revoked or expired, the sender's domain left the account, or the balance
        or a window cannot cover all recipients. The pending row lets `settle`
        refund what the upstream did not take, even after a crash.
        """
        now = self.clock()
        ts = int(now.timestamp())
        day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
        scopes = (RELAY_SCOPE, str(account_id))
        charge = unit * recipients
        with self._write() as db:
            if token_id is not None and not token_still_valid(db, token_id, ts):
                raise Refused("the session's token was revoked or expired", token_invalid=True)
            if domain is not None:
                owner = domain_owner(db, domain)
                if owner is None or owner[0] != account_id:
                    raise Refused(f"domain {domain} left the account", domain_lost=True)
            if idempotency_key and delivered_recently(db, idempotency_key, ts):
                return Reservation(0, 0, replay=True)
            if unit:
                _ensure_sender(db, sender, default_balance, ts)
                cur = db.execute(
                    "UPDATE senders SET balance = balance - ?, updated = ?"
                    " WHERE address = ? AND enabled = 1 AND balance >= ?",
                    (charge, ts, sender, charge),
                )
                if cur.rowcount != 1:
                    row = db.execute(
                        "SELECT balance, enabled FROM senders WHERE address = ?", (sender,)
                    ).fetchone()
                    raise Refused(
                        f"balance of {sender} cannot cover {charge}",
                        balance=row["balance"] if row else 0,
                        disabled=bool(row and not row["enabled"]),
                    )
            for label, window, limit, used in _windows(db, account_id, now):
                if limit != UNLIMITED and used + recipients > limit:
                    hit = LimitHit(label, window, limit, window_reset(window, now))
                    raise Refused(f"{label} {window.value} limit {limit} reached", hit=hit)
            db.executemany(
                "INSERT INTO counters (scope, period, count) VALUES (?, ?, ?)"
                " ON CONFLICT (scope, period) DO UPDATE SET count = count + excluded.count",
                [(scope, period, recipients) for scope in scopes for period in (day, month)],
            )
            cur = db.execute(
                "INSERT INTO pending (sender, unit, count, scopes, day, month, created, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sender, unit, recipients, ",".join(scopes), day, month, ts, self.owner),
            )
        assert cur.lastrowid is not None
        return Reservation(cur.lastrowid, charge)

    def settle(
        self,
        reservation_id: int,
        delivered: int,
        idempotency_key: str | None = None,
        record: DeliveryRecord | None = None,
    ) -> int:
        """Keep the charge for `delivered` recipients, refund the rest. Returns the refund.

        With an `idempotency_key`, a delivered message is remembered for the
        upstream's idempotency window, so `reserve` does not charge a retry.
        The delivery log's `record` is written in the same transaction, with
        the units kept.
        """
        now = self._now()
        with self._write() as db:
            if idempotency_key and delivered:
                remember_delivered(db, idempotency_key, now)
            refund, kept = _settle(db, reservation_id, delivered, now)
            if record is not None:
                insert(db, replace(record, charged=kept))
            return refund

    def settle_stale(self, older_than: float) -> list[dict[str, Any]]:
        """Refund in full every reservation left pending longer than `older_than` seconds
        by a process that is gone (no owner, or no heartbeat for OWNER_DEAD_AFTER).

        Such a reservation belongs to a process that died between charge and
        forward. The client got no 250 for it, so it will retry and be charged
        again: refunding avoids charging it twice. A live owner's rows stay: it
        is still settling them.
        """
        now = self._now()
        with self._write() as db:
            rows = db.execute(
                "SELECT * FROM pending WHERE created <= ? AND (owner IS NULL OR NOT EXISTS"
                " (SELECT 1 FROM processes p WHERE p.id = pending.owner AND p.heartbeat > ?))",
                (now - older_than, now - OWNER_DEAD_AFTER),
            ).fetchall()
            for row in rows:
                _settle(db, row["id"], 0, now)
            forget_expired(db, now)
            db.execute("DELETE FROM processes WHERE heartbeat <= ?", (now - 86400,))
        return [dict(r) for r in rows]

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

    # --- send limits -------------------------------------------------------------

    def set_limits(
        self, *, account: str | None, daily: int | None, monthly: int | None
    ) -> dict[str, Any]:
        for value in (daily, monthly):
            if value is not None and value < UNLIMITED:
                raise RelayError("a limit is -1 (unlimited), 0 (blocks sending) or more")
        scope = str(account_id_of(self, account)) if account else RELAY_SCOPE
        with self._write() as db:
            db.execute(
                "INSERT INTO limits (scope, daily, monthly)"
                " VALUES (?, COALESCE(?, -1), COALESCE(?, -1))"
                " ON CONFLICT (scope) DO UPDATE SET daily = COALESCE(?, daily),"
                " monthly = COALESCE(?, monthly)",
                (scope, daily, monthly, daily, monthly),
            )
        return next(s for s in self.show_limits() if s["scope"] == (account or "relay"))

    def show_limits(self) -> list[dict[str, Any]]:
        now = self.clock()
        day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
        names = {str(r["id"]): r["name"] for r in self._read("SELECT id, name FROM accounts")}
        rows = {r["scope"]: r for r in self._read("SELECT * FROM limits")}
        scopes = [RELAY_SCOPE, *sorted(s for s in rows if s != RELAY_SCOPE)]
        out = []
        for scope in scopes:
            row = rows.get(scope)
            out.append(
                {
                    "scope": "relay" if scope == RELAY_SCOPE else names.get(scope, scope),
                    "daily": row["daily"] if row else UNLIMITED,
                    "monthly": row["monthly"] if row else UNLIMITED,
                    "daily_count": _count(self.db, scope, day),
                    "monthly_count": _count(self.db, scope, month),
                    "daily_resets_at": window_reset(Window.DAY, now).isoformat(),
                    "monthly_resets_at": window_reset(Window.MONTH, now).isoformat(),
                }
            )
        return out


def _sender_row(db: sqlite3.Connection, address: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT balance, enabled FROM senders WHERE address = ?", (address,)
    ).fetchone()
    return row


def _sender(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["enabled"] = bool(out["enabled"])
    return out


def _ensure_sender(db: sqlite3.Connection, address: str, balance: int, ts: int) -> None:
    db.execute(
        "INSERT INTO senders (address, balance, enabled, created, updated) VALUES (?, ?, 1, ?, ?)"
        " ON CONFLICT (address) DO NOTHING",
        (address, balance, ts, ts),
    )


_WINDOWS_SQL = """
    SELECT s.scope, COALESCE(l.daily, -1) AS daily, COALESCE(l.monthly, -1) AS monthly,
        COALESCE((SELECT count FROM counters WHERE scope = s.scope AND period = ?), 0) AS d,
        COALESCE((SELECT count FROM counters WHERE scope = s.scope AND period = ?), 0) AS m
    FROM (SELECT ? AS scope UNION ALL SELECT ?) AS s LEFT JOIN limits AS l ON l.scope = s.scope
"""


def _windows(
    db: sqlite3.Connection, account_id: int, now: datetime
) -> list[tuple[str, Window, int, int]]:
    """(label, window, limit, used) for the relay's and the account's day and month, one query."""
    day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
    rows = db.execute(_WINDOWS_SQL, (day, month, RELAY_SCOPE, str(account_id))).fetchall()
    out = []
    for row in rows:
        label = "relay" if row["scope"] == RELAY_SCOPE else "account"
        out.append((label, Window.DAY, int(row["daily"]), int(row["d"])))
        out.append((label, Window.MONTH, int(row["monthly"]), int(row["m"])))
    return out


def _count(db: sqlite3.Connection, scope: str, period: str) -> int:
    row = db.execute(
        "SELECT count FROM counters WHERE scope = ? AND period = ?", (scope, period)
    ).fetchone()
    return int(row[0]) if row else 0


def _settle(
    db: sqlite3.Connection, reservation_id: int, delivered: int, ts: int
) -> tuple[int, int]:
    """Settle one pending row: (units refunded, units kept)."""
    row = db.execute("SELECT * FROM pending WHERE id = ?", (reservation_id,)).fetchone()
    if row is None:
        return 0, 0  # settled already (by a sweep that judged it stale)
    undelivered = max(row["count"] - delivered, 0)
    refund = row["unit"] * undelivered
    if refund:
        db.execute(
            "UPDATE senders SET balance = balance + ?, updated = ? WHERE address = ?",
            (refund, ts, row["sender"]),
        )
    if undelivered:
        for scope in row["scopes"].split(","):
            for period in (row["day"], row["month"]):
                db.execute(
                    "UPDATE counters SET count = max(count - ?, 0) WHERE scope = ? AND period = ?",
                    (undelivered, scope, period),
                )
    db.execute("DELETE FROM pending WHERE id = ?", (reservation_id,))
    return int(refund), int(row["unit"] * min(delivered, row["count"]))
