"""Storage: accounts, domains, tokens, senders' balances, send limits. SQLite behind one class.

Guarantees, whatever the number of sessions and relay processes on one database:
- `reserve` is atomic and conditional: it charges the balance and counts the
  send-limit windows in one write transaction (`BEGIN IMMEDIATE` takes SQLite's
  write lock across processes), and a balance never goes below zero (the UPDATE
  is conditional and the column has a CHECK).
- Every reservation is recorded as a pending row until `settle` refunds what the
  upstream did not take; a crash leaves the row, and `settle_stale` (on start and
  periodically) refunds it, so no refund is lost silently.
- Tokens are stored only as SHA-256 hashes; the token itself is never written.

The runtime calls go through `AsyncStore`, which runs them on one dedicated
thread so a slow disk or a lock held by another process never stalls the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from relay.errors import RelayError, StoreError
from relay.policy import UNLIMITED, LimitHit, SenderState, Window, period_key, window_reset
from relay.schema import MIGRATIONS

TOKEN_PREFIX = "rlt_"  # noqa: S105 - lets secret scanners spot a leaked token
RELAY_SCOPE = "*"

# Resend keeps an idempotency key for 24 hours from its first request; a retry
# within them sends nothing. Ours is shorter, so it never outlasts theirs.
IDEMPOTENCY_WINDOW = 23 * 3600


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a plain SHA-256 cannot be brute-forced;
    # a slow KDF would only slow every AUTH.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a session authenticated as."""

    token_id: str
    account_id: int
    account: str
    role: str


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


class StoreBusy(StoreError):
    """Another connection holds SQLite's write lock (only seen without a busy timeout)."""


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
    ) -> None:
        super().__init__(message)
        self.balance = balance
        self.disabled = disabled
        self.domain_lost = domain_lost
        self.hit = hit


class Store:
    """The synchronous store. Admin commands use it directly; the server via `AsyncStore`."""

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout_ms: int = 10_000,
        autocheckpoint: bool = True,
    ) -> None:
        self.path = Path(path)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.busy_timeout_ms = busy_timeout_ms
        self.autocheckpoint = autocheckpoint
        self._db: sqlite3.Connection | None = None

    # --- connection and schema ---------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            db.execute("PRAGMA journal_mode = WAL")
            # WAL with synchronous=NORMAL survives a process crash; only a power
            # loss can drop the last commits.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            if not self.autocheckpoint:
                # A checkpoint writes and syncs the database file: leave it to
                # `checkpoint()`, called off the event loop.
                db.execute("PRAGMA wal_autocheckpoint = 0")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"RELAY_DATABASE: cannot open {self.path}: {exc}") from exc
        return db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock across processes."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        try:
            yield db
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc) from exc
            raise
        else:
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise _translate(exc) from exc

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def migrate(self) -> int:
        """Apply the schema migrations not applied yet; returns the schema version."""
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
        return len(MIGRATIONS)

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database file (PASSIVE: never waits)."""
        self._read("PRAGMA wal_checkpoint(PASSIVE)")

    def _now(self) -> int:
        return int(self.clock().timestamp())

    # --- accounts, domains, tokens ---------------------------------------------

    def create_account(self, name: str) -> dict[str, Any]:
        with self._write() as db:
            try:
                cur = db.execute(
                    "INSERT INTO accounts (name, created) VALUES (?, ?)", (name, self._now())
                )
            except sqlite3.IntegrityError:
                raise RelayError(f"account {name!r} already exists") from None
        return {"id": cur.lastrowid, "name": name}

    def list_accounts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._read("SELECT id, name, created FROM accounts ORDER BY id")]

    def _account_id(self, name: str) -> int:
        rows = self._read("SELECT id FROM accounts WHERE name = ?", (name,))
        if not rows:
            raise RelayError(f"no account named {name!r}")
        return int(rows[0]["id"])

    def add_domain(self, account: str, domain: str) -> dict[str, Any]:
        domain = domain.strip().lower()
        account_id = self._account_id(account)
        with self._write() as db:
            row = db.execute(
                "SELECT account_id FROM domains WHERE domain = ?", (domain,)
            ).fetchone()
            if row is not None:
                # One domain, one account: otherwise two accounts could send as each other.
                raise RelayError(f"domain {domain} is already onboarded on an account")
            db.execute(
                "INSERT INTO domains (domain, account_id, created) VALUES (?, ?, ?)",
                (domain, account_id, self._now()),
            )
        return {"account": account, "domain": domain}

    def remove_domain(self, account: str, domain: str) -> None:
        account_id = self._account_id(account)
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM domains WHERE domain = ? AND account_id = ?",
                (domain.strip().lower(), account_id),
            )
        if cur.rowcount == 0:
            raise RelayError(f"domain {domain} is not onboarded on account {account!r}")

    def list_domains(self, account: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT a.name AS account, d.domain, d.created FROM domains d"
            " JOIN accounts a ON a.id = d.account_id"
        )
        if account is None:
            return [dict(r) for r in self._read(sql + " ORDER BY a.name, d.domain")]
        self._account_id(account)
        return [
            dict(r) for r in self._read(sql + " WHERE a.name = ? ORDER BY d.domain", (account,))
        ]

    def owned_domains(self, account_id: int, domains: tuple[str, ...]) -> frozenset[str]:
        """Which of `domains` are onboarded on the account."""
        if not domains:
            return frozenset()
        marks = ",".join("?" * len(domains))
        rows = self._read(
            f"SELECT domain FROM domains WHERE account_id = ? AND domain IN ({marks})",  # noqa: S608
            (account_id, *domains),
        )
        return frozenset(r["domain"] for r in rows)

    def create_token(
        self, account: str, *, name: str = "", role: str = "", expires_in_days: float | None = None
    ) -> dict[str, Any]:
        account_id = self._account_id(account)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_hex(6)
        now = self._now()
        expires = now + int(expires_in_days * 86400) if expires_in_days is not None else None
        with self._write() as db:
            db.execute(
                "INSERT INTO tokens (id, account_id, hash, name, role, created, expires)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, account_id, hash_token(token), name, role, now, expires),
            )
        return {
            "id": token_id,
            "account": account,
            "name": name,
            "role": role,
            "expires": expires,
            "token": token,
        }

    def list_tokens(self, account: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT t.id, a.name AS account, t.name, t.role, t.created, t.expires, t.revoked"
            " FROM tokens t JOIN accounts a ON a.id = t.account_id"
        )
        if account is None:
            return [dict(r) for r in self._read(sql + " ORDER BY t.created, t.id")]
        self._account_id(account)
        rows = self._read(sql + " WHERE a.name = ? ORDER BY t.created, t.id", (account,))
        return [dict(r) for r in rows]

    def revoke_token(self, token_id: str) -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (self._now(), token_id),
            )
        if cur.rowcount == 0:
            raise RelayError(f"no active token with id {token_id!r}")

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid token: not unknown, revoked or expired."""
        digest = hash_token(token)
        rows = self._read(
            "SELECT t.id, t.hash, t.role, t.expires, t.revoked, a.id AS account_id, a.name"
            " FROM tokens t JOIN accounts a ON a.id = t.account_id WHERE t.hash = ?",
            (digest,),
        )
        if not rows:
            return None
        row = rows[0]
        if not hmac.compare_digest(row["hash"], digest):
            return None
        if row["revoked"] is not None:
            return None
        if row["expires"] is not None and row["expires"] <= self._now():
            return None
        return Principal(row["id"], row["account_id"], row["name"], row["role"])

    # --- address lists -----------------------------------------------------------

    def _list_add(self, table: str, address: str) -> None:
        with self._write() as db:
            db.execute(
                f"INSERT INTO {table} (address, created) VALUES (?, ?)"  # noqa: S608 - fixed names
                " ON CONFLICT (address) DO NOTHING",
                (address, self._now()),
            )

    def _list_remove(self, table: str, address: str) -> None:
        with self._write() as db:
            cur = db.execute(f"DELETE FROM {table} WHERE address = ?", (address,))  # noqa: S608
        if cur.rowcount == 0:
            raise RelayError(f"{address} is not on the list")

    def _list(self, table: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._read(f"SELECT * FROM {table} ORDER BY address")]  # noqa: S608

    def add_verified(self, address: str) -> None:
        self._list_add("verified", address)

    def remove_verified(self, address: str) -> None:
        self._list_remove("verified", address)

    def list_verified(self) -> list[dict[str, Any]]:
        return self._list("verified")

    def verified_among(self, addresses: tuple[str, ...]) -> frozenset[str]:
        if not addresses:
            return frozenset()
        marks = ",".join("?" * len(addresses))
        rows = self._read(f"SELECT address FROM verified WHERE address IN ({marks})", addresses)  # noqa: S608
        return frozenset(r["address"] for r in rows)

    def add_nolimit(self, address: str) -> None:
        self._list_add("nolimit", address)

    def remove_nolimit(self, address: str) -> None:
        self._list_remove("nolimit", address)

    def list_nolimit(self) -> list[dict[str, Any]]:
        return self._list("nolimit")

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

    def check_mail(
        self,
        address: str,
        domain: str,
        account_id: int,
        default_balance: int,
        unlimited: bool,
        token_id: str = "",
    ) -> MailCheck:
        """MAIL FROM: the domain's owner, the sender's row (created if missing), the windows.

        `DEFAULT_SEND_BALANCE` only ever creates a missing row (ON CONFLICT DO
        NOTHING): an admin-disabled or admin-edited row stays as the admin left it.
        """
        now = self.clock()
        db = self.db
        try:
            owner = _owner(db, domain)
            token_valid = self._token_valid(db, token_id)
            unlimited = unlimited or self._is_nolimit(db, address)
            row = _sender_row(db, address)
            room, hit = self._headroom(db, account_id, now)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        if row is None and owner is not None and owner[0] == account_id and not unlimited:
            # Only a first send writes here; every later MAIL is a plain read.
            with self._write() as db:
                _ensure_sender(db, address, default_balance, int(now.timestamp()))
                row = _sender_row(db, address)
        state = SenderState(
            address=address,
            balance=row["balance"] if row else 0,
            enabled=bool(row["enabled"]) if row else True,
            unlimited=unlimited,
        )
        return MailCheck(owner[0] if owner else None, token_valid, state, room, hit)

    def _token_valid(self, db: sqlite3.Connection, token_id: str) -> bool:
        """A token revoked or expired after AUTH stops its open sessions too."""
        row = db.execute("SELECT revoked, expires FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None or row["revoked"] is not None:
            return False
        return row["expires"] is None or row["expires"] > self._now()

    @staticmethod
    def _is_nolimit(db: sqlite3.Connection, address: str) -> bool:
        return (
            db.execute("SELECT 1 FROM nolimit WHERE address = ?", (address,)).fetchone() is not None
        )

    def _headroom(
        self, db: sqlite3.Connection, account_id: int, now: datetime
    ) -> tuple[int | None, LimitHit | None]:
        """The tightest window's remaining room, and the first exhausted window if any."""
        tightest: int | None = None
        for label, window, limit, used in _windows(db, account_id, now):
            if limit == UNLIMITED:
                continue
            room = max(limit - used, 0)
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
    ) -> Reservation:
        """Atomically charge `unit` per recipient and count the send-limit windows.

        Raises `Refused` (and changes nothing) when the balance or a window cannot
        cover all recipients. The pending row lets `settle` refund what the
        upstream did not take, even after a crash.
        """
        now = self.clock()
        ts = int(now.timestamp())
        day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
        scopes = (RELAY_SCOPE, str(account_id))
        charge = unit * recipients
        with self._write() as db:
            if domain is not None:
                owner = _owner(db, domain)
                if owner is None or owner[0] != account_id:
                    raise Refused(f"domain {domain} left the account", domain_lost=True)
            if idempotency_key and _delivered_recently(db, idempotency_key, ts):
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
                "INSERT INTO pending (sender, unit, count, scopes, day, month, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sender, unit, recipients, ",".join(scopes), day, month, ts),
            )
        assert cur.lastrowid is not None
        return Reservation(cur.lastrowid, charge)

    def settle(
        self, reservation_id: int, delivered: int, idempotency_key: str | None = None
    ) -> int:
        """Keep the charge for `delivered` recipients, refund the rest. Returns the refund.

        With an `idempotency_key`, a delivered message is remembered for the
        upstream's idempotency window, so `reserve` does not charge a retry.
        """
        now = self._now()
        with self._write() as db:
            if idempotency_key and delivered:
                # DO NOTHING: the window runs from the first delivery, as Resend's does.
                db.execute(
                    "INSERT INTO delivered_keys (key, created) VALUES (?, ?)"
                    " ON CONFLICT (key) DO NOTHING",
                    (idempotency_key, now),
                )
            return _settle(db, reservation_id, delivered, now)

    def settle_stale(self, older_than: float) -> list[dict[str, Any]]:
        """Refund in full every reservation left pending longer than `older_than` seconds.

        Such a reservation belongs to a process that died between charge and
        forward. The client got no 250 for it, so it will retry and be charged
        again: refunding avoids charging it twice.
        """
        now = self._now()
        with self._write() as db:
            rows = db.execute(
                "SELECT * FROM pending WHERE created <= ?", (now - older_than,)
            ).fetchall()
            for row in rows:
                _settle(db, row["id"], 0, now)
            db.execute("DELETE FROM delivered_keys WHERE created <= ?", (now - IDEMPOTENCY_WINDOW,))
        return [dict(r) for r in rows]

    def pending_count(self) -> int:
        return int(self._read("SELECT count(*) FROM pending")[0][0])

    # --- send limits -------------------------------------------------------------

    def set_limits(
        self, *, account: str | None, daily: int | None, monthly: int | None
    ) -> dict[str, Any]:
        for value in (daily, monthly):
            if value is not None and value < UNLIMITED:
                raise RelayError("a limit is -1 (unlimited), 0 (blocks sending) or more")
        scope = str(self._account_id(account)) if account else RELAY_SCOPE
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
        names = {str(a["id"]): a["name"] for a in self.list_accounts()}
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


def _delivered_recently(db: sqlite3.Connection, key: str, now: int) -> bool:
    row = db.execute(
        "SELECT 1 FROM delivered_keys WHERE key = ? AND created > ?",
        (key, now - IDEMPOTENCY_WINDOW),
    ).fetchone()
    return row is not None


def _owner(db: sqlite3.Connection, domain: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT account_id FROM domains WHERE domain = ?", (domain,)
    ).fetchone()
    return row


def _sender_row(db: sqlite3.Connection, address: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT balance, enabled FROM senders WHERE address = ?", (address,)
    ).fetchone()
    return row


def _translate(exc: sqlite3.Error) -> StoreError:
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StoreBusy(f"database is locked by another writer: {exc}")
    return StoreError(f"database failed: {exc}")


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


def _settle(db: sqlite3.Connection, reservation_id: int, delivered: int, ts: int) -> int:
    row = db.execute("SELECT * FROM pending WHERE id = ?", (reservation_id,)).fetchone()
    if row is None:
        return 0  # settled already (by a sweep that judged it stale)
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
    return int(refund)


P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """The store for the event loop, which it must never stall noticeably.

    Decide, then act: when nothing is queued on the store's thread, a call first
    runs inline on a second connection that never waits for a lock (busy
    timeout 0) and never checkpoints; uncontended, a WAL transaction costs tens
    of microseconds, less than a hop to a thread. If another process holds the
    write lock, the inline attempt fails at once and the call goes to the
    store's one thread, which waits for the lock there. Calls keep their order:
    nothing runs inline while the thread has work.
    """

    def __init__(self, store: Store) -> None:
        self.sync = store
        self._inline = Store(store.path, clock=store.clock, busy_timeout_ms=0, autocheckpoint=False)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-store")
        self._queued = 0
        # Checkpoints sync the disk and the stale sweep scans: on a thread and
        # connection of their own, so no session call ever queues behind them.
        self._upkeep = Store(store.path, clock=store.clock)
        self._upkeep_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-upkeep")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn`, a method of `self.sync`, inline when possible, else on the thread."""
        if self._queued == 0:
            inline: Callable[P, T] = getattr(self._inline, fn.__name__)
            try:
                return inline(*args, **kwargs)
            except StoreBusy:
                pass
        return await self.in_thread(fn, *args, **kwargs)

    async def in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))
        except sqlite3.Error as exc:  # anything the store's own wrapping missed
            raise StoreError(f"database failed: {exc}") from exc
        finally:
            self._queued -= 1

    async def upkeep(self, fn: Callable[[Store], T]) -> T:
        """Run maintenance (`fn(store)`) on the upkeep thread's own connection."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._upkeep_thread, fn, self._upkeep)
        except sqlite3.Error as exc:
            raise StoreError(f"database failed: {exc}") from exc

    async def aclose(self) -> None:
        await self.in_thread(self.sync.close)
        await self.upkeep(Store.close)
        self._thread.shutdown(wait=True)
        self._upkeep_thread.shutdown(wait=True)
        self._inline.close()
