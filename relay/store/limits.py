"""Send limits: the daily and monthly windows of the relay and of each account.

A window counts the recipients delivered in its UTC day or month; the charge
(`relay.store.ledger.reserve`) counts a message in its four windows in the
same transaction as the balance, the settle gives back what was not delivered.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypedDict

from relay.errors import RelayError
from relay.store.accounts import account_id_of
from relay.store.db import Connection, Cursor, Database
from relay.windows import UNLIMITED, Window, period_key, window_reset

RELAY_SCOPE = "*"


class LimitsRow(TypedDict):
    scope: str  # "relay" or an account's name
    daily: int
    monthly: int
    daily_count: int
    monthly_count: int
    daily_resets_at: str
    monthly_resets_at: str


class SendLimits(Database):
    def set_limits(
        self, *, account: str | None, daily: int | None, monthly: int | None
    ) -> LimitsRow:
        for value in (daily, monthly):
            if value is not None and value < UNLIMITED:
                raise RelayError("a limit is -1 (unlimited), 0 (blocks sending) or more")
        scope = str(account_id_of(self, account)) if account else RELAY_SCOPE
        with self._write() as db:
            db.execute(
                "INSERT INTO limits (scope, daily, monthly)"
                " VALUES (?, COALESCE(?, -1), COALESCE(?, -1))"
                " ON CONFLICT (scope) DO UPDATE SET daily = COALESCE(?, limits.daily),"
                " monthly = COALESCE(?, limits.monthly)",
                (scope, daily, monthly, daily, monthly),
            )
        return next(s for s in self.show_limits() if s["scope"] == (account or "relay"))

    def show_limits(self) -> list[LimitsRow]:
        now = self.clock()
        day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
        names = {str(r["id"]): r["name"] for r in self._read("SELECT id, name FROM accounts")}
        rows = {r["scope"]: r for r in self._read("SELECT * FROM limits")}
        scopes = [RELAY_SCOPE, *sorted(s for s in rows if s != RELAY_SCOPE)]
        out = []
        with self._connection() as db:
            for scope in scopes:
                row = rows.get(scope)
                out.append(
                    LimitsRow(
                        **{
                            "scope": "relay" if scope == RELAY_SCOPE else names.get(scope, scope),
                            "daily": row["daily"] if row else UNLIMITED,
                            "monthly": row["monthly"] if row else UNLIMITED,
                            "daily_count": count(db, scope, day),
                            "monthly_count": count(db, scope, month),
                            "daily_resets_at": window_reset(Window.DAY, now).isoformat(),
                            "monthly_resets_at": window_reset(Window.MONTH, now).isoformat(),
                        }
                    )
                )
        return out


_WINDOWS_SQL = """
    SELECT s.scope, COALESCE(l.daily, -1) AS daily, COALESCE(l.monthly, -1) AS monthly,
        COALESCE((SELECT count FROM counters WHERE scope = s.scope AND period = ?), 0) AS d,
        COALESCE((SELECT count FROM counters WHERE scope = s.scope AND period = ?), 0) AS m
    FROM (SELECT ? AS scope UNION ALL SELECT ?) AS s LEFT JOIN limits AS l ON l.scope = s.scope
"""


def read_windows(
    db: Connection, account_id: int, now: datetime
) -> list[tuple[str, Window, int, int]]:
    """(label, window, limit, used) for the relay's and the account's day and month, one query."""
    return windows_of(start_read_windows(db, account_id, now).fetchall())


def start_read_windows(db: Connection, account_id: int, now: datetime) -> Cursor:
    """`read_windows`' statement, executed (in a pipeline: queued); `windows_of` reads it."""
    day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
    return db.execute(_WINDOWS_SQL, (day, month, RELAY_SCOPE, str(account_id)))


def windows_of(rows: list[Any]) -> list[tuple[str, Window, int, int]]:
    out = []
    for row in rows:
        label = "relay" if row["scope"] == RELAY_SCOPE else "account"
        out.append((label, Window.DAY, int(row["daily"]), int(row["d"])))
        out.append((label, Window.MONTH, int(row["monthly"]), int(row["m"])))
    return out


def count(db: Connection, scope: str, period: str) -> int:
    row = db.execute(
        "SELECT count FROM counters WHERE scope = ? AND period = ?", (scope, period)
    ).fetchone()
    return int(row[0]) if row else 0


def add_to_windows(db: Connection, account_id: int, day: str, month: str, n: int) -> None:
    """Count `n` in the account's and the relay's day and month (the lock order)."""
    account = str(account_id)
    db.execute(
        "INSERT INTO counters (scope, period, count) VALUES (?, ?, ?), (?, ?, ?), (?, ?, ?),"
        " (?, ?, ?) ON CONFLICT (scope, period) DO UPDATE"
        " SET count = counters.count + excluded.count",
        (account, day, n, account, month, n, RELAY_SCOPE, day, n, RELAY_SCOPE, month, n),
    )


# A limit for the upsert's condition when a window has none.
_NO_LIMIT = 2**62


def count_windows(
    db: Connection,
    account_id: int,
    day: str,
    month: str,
    recipients: int,
    windows: list[tuple[str, Window, int, int]],
) -> tuple[str, Window, int, int] | None:
    """Count `recipients` in the four windows, each only if it stays within its limit.

    One statement, the account's rows before the relay's (the lock order). A
    window whose row the upsert did not return was full: the first such, in
    `read_windows`' order, is returned, and the caller rolls back. A window with no
    row yet is inserted unconditionally: `reserve` checked `recipients <= limit`.
    """
    return start_count_windows(db, account_id, day, month, recipients, windows)()


def start_count_windows(
    db: Connection,
    account_id: int,
    day: str,
    month: str,
    recipients: int,
    windows: list[tuple[str, Window, int, int]],
) -> Callable[[], tuple[str, Window, int, int] | None]:
    """`count_windows` in two steps: the statement is executed (in a pipeline,
    queued), and what reads its answer is returned."""
    limits = {(label, window): limit for label, window, limit, _ in windows}

    def limit(label: str, window: Window) -> int:
        value = limits[(label, window)]
        return _NO_LIMIT if value == UNLIMITED else value

    account = str(account_id)
    cursor = db.execute(
        "INSERT INTO counters (scope, period, count) VALUES (?, ?, ?), (?, ?, ?), (?, ?, ?),"
        " (?, ?, ?) ON CONFLICT (scope, period) DO UPDATE"
        " SET count = counters.count + excluded.count"
        " WHERE counters.count + excluded.count <= CASE counters.scope || ' ' || counters.period"
        " WHEN ? THEN ? WHEN ? THEN ? WHEN ? THEN ? WHEN ? THEN ? END"
        " RETURNING scope, period",
        (
            *(account, day, recipients, account, month, recipients),
            *(RELAY_SCOPE, day, recipients, RELAY_SCOPE, month, recipients),
            *(f"{account} {day}", limit("account", Window.DAY)),
            *(f"{account} {month}", limit("account", Window.MONTH)),
            *(f"{RELAY_SCOPE} {day}", limit("relay", Window.DAY)),
            *(f"{RELAY_SCOPE} {month}", limit("relay", Window.MONTH)),
        ),
    )
    keys = {
        ("relay", Window.DAY): (RELAY_SCOPE, day),
        ("relay", Window.MONTH): (RELAY_SCOPE, month),
        ("account", Window.DAY): (account, day),
        ("account", Window.MONTH): (account, month),
    }

    def finish() -> tuple[str, Window, int, int] | None:
        counted = {(r["scope"], r["period"]) for r in cursor.fetchall()}
        for entry in windows:
            if keys[(entry[0], entry[1])] not in counted:
                return entry
        return None

    return finish
