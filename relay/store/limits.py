"""Send limits: the daily and monthly windows of the relay and of each account.

A window counts the recipients delivered in its UTC day or month; the charge
(`relay.store.ledger.reserve`) counts a message in its four windows in the
same transaction as the balance, the settle gives back what was not delivered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        COALESCE((SELECT count FROM counters WHERE scope = s.scope AND period = ?), 0)
        + COALESCE((SELECT sum(count) FROM relay_counters WHERE scope = s.scope AND period = ?), 0)
        AS d,
        COALESCE((SELECT count FROM counters WHERE scope = s.scope AND period = ?), 0)
        + COALESCE((SELECT sum(count) FROM relay_counters WHERE scope = s.scope AND period = ?), 0)
        AS m
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
    return db.execute(_WINDOWS_SQL, (day, day, month, month, RELAY_SCOPE, str(account_id)))


def windows_of(rows: list[Any]) -> list[tuple[str, Window, int, int]]:
    out = []
    for row in rows:
        label = "relay" if row["scope"] == RELAY_SCOPE else "account"
        out.append((label, Window.DAY, int(row["daily"]), int(row["d"])))
        out.append((label, Window.MONTH, int(row["monthly"]), int(row["m"])))
    return out


def count(db: Connection, scope: str, period: str) -> int:
    """A window's count: its shared row and the relays' own rows (`window_scopes`)."""
    row = db.execute(
        "SELECT COALESCE((SELECT count FROM counters WHERE scope = ? AND period = ?), 0)"
        " + COALESCE((SELECT sum(count) FROM relay_counters WHERE scope = ? AND period = ?), 0)",
        (scope, period, scope, period),
    ).fetchone()
    return int(row[0])


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


def window_scopes(
    account_id: int, windows: list[tuple[str, Window, int, int]], relay: str | None
) -> list[str]:
    """The scopes a charge counts in, as its pending row records them: the relay's
    and the account's, each `scope@relay` when `relay` (a relay process's id, on
    PostgreSQL) is given and both of the scope's windows are unlimited: then the
    count goes to that relay's own rows (`relay_counters`), which no other relay
    writes, so no commit waits for another host's. A window with a limit is
    counted in its one shared row, which its check needs to be exact."""
    unlimited = {label for label, _, limit, _ in windows if limit == UNLIMITED}
    limited = {label for label, _, limit, _ in windows if limit != UNLIMITED}
    out = []
    for label, scope in (("relay", RELAY_SCOPE), ("account", str(account_id))):
        own = relay is not None and label in unlimited and label not in limited
        out.append(f"{scope}@{relay}" if own else scope)
    return out


def plain(scopes: Sequence[str]) -> str:
    """The scopes as a pending row records them: `*,12` (where each was counted is
    found again by `give_back`)."""
    return ",".join(s.partition("@")[0] for s in scopes)


def give_back(db: Connection, scope: str, period: str, relay: str | None, n: int) -> None:
    """Take `n` off a window a settled message was counted in: the row of the relay
    that counted it if it holds that many (an unlimited window, `window_scopes`),
    else another relay's that does (a message the durable queue settles, its
    pending row no longer its relay's), else the shared row. Every row counts in
    the window's sum alike, so the window's count is right whichever gives."""
    if relay is not None:
        cursor = db.execute(
            "UPDATE relay_counters SET count = count - ?"
            " WHERE scope = ? AND period = ? AND count >= ? AND relay = (SELECT relay"
            " FROM relay_counters WHERE scope = ? AND period = ? AND count >= ?"
            " ORDER BY relay = ? DESC, relay LIMIT 1)",
            (n, scope, period, n, scope, period, n, relay),
        )
        if cursor.rowcount == 1:
            return
    db.execute(
        "UPDATE counters SET count = CASE WHEN count > ? THEN count - ? ELSE 0 END"
        " WHERE scope = ? AND period = ?",
        (n, n, scope, period),
    )


def count_windows(
    db: Connection,
    account_id: int,
    day: str,
    month: str,
    recipients: int,
    windows: list[tuple[str, Window, int, int]],
    scopes: Sequence[str] | None = None,
) -> tuple[str, Window, int, int] | None:
    """Count `recipients` in the four windows, each only if it stays within its limit.

    One statement for the shared rows, the account's before the relay's (the
    lock order), then one for this relay's own rows (`window_scopes`). A window
    whose row the upsert did not return was full: the first such, in
    `read_windows`' order, is returned, and the caller rolls back. A window with
    no row yet is inserted unconditionally: `reserve` checked `recipients <= limit`.
    A shared row's check counts the relays' own rows of its window too (counted
    while it had no limit).
    """
    return start_count_windows(db, account_id, day, month, recipients, windows, scopes)()


def start_count_windows(
    db: Connection,
    account_id: int,
    day: str,
    month: str,
    recipients: int,
    windows: list[tuple[str, Window, int, int]],
    scopes: Sequence[str] | None = None,
) -> Callable[[], tuple[str, Window, int, int] | None]:
    """`count_windows` in two steps: the statements are executed (in a pipeline,
    queued), and what reads their answer is returned."""
    limits = {(label, window): limit for label, window, limit, _ in windows}
    account = str(account_id)
    relay_scope, account_scope = scopes or [RELAY_SCOPE, account]
    shared: list[tuple[str, str, Window, str]] = []  # (label, scope, window, period)
    own: list[tuple[str, str, str]] = []  # (scope, period, relay)
    # The account's rows before the relay's: the lock order.
    for label, entry in (("account", account_scope), ("relay", relay_scope)):
        scope, _, relay = entry.partition("@")
        for window, period in ((Window.DAY, day), (Window.MONTH, month)):
            if relay:
                own.append((scope, period, relay))
            else:
                shared.append((label, scope, window, period))
    cursor = None
    if shared:
        values = ", ".join("(?, ?, ?)" for _ in shared)
        cases = " ".join("WHEN ? THEN ?" for _ in shared)
        params: list[object] = []
        for _, scope, _, period in shared:
            params += [scope, period, recipients]
        for label, scope, window, period in shared:
            limit = limits[(label, window)]
            params += [f"{scope} {period}", _NO_LIMIT if limit == UNLIMITED else limit]
        cursor = db.execute(
            f"INSERT INTO counters (scope, period, count) VALUES {values}"  # noqa: S608
            " ON CONFLICT (scope, period) DO UPDATE"
            " SET count = counters.count + excluded.count"
            " WHERE counters.count + excluded.count + COALESCE((SELECT sum(r.count)"
            " FROM relay_counters AS r WHERE r.scope = counters.scope"
            " AND r.period = counters.period), 0)"
            f" <= CASE counters.scope || ' ' || counters.period {cases} END"
            " RETURNING scope, period",
            params,
        )
    if own:
        values = ", ".join("(?, ?, ?, ?)" for _ in own)
        db.execute(
            f"INSERT INTO relay_counters (scope, period, relay, count) VALUES {values}"  # noqa: S608
            " ON CONFLICT (scope, period, relay) DO UPDATE"
            " SET count = relay_counters.count + excluded.count",
            [v for scope, period, relay in own for v in (scope, period, relay, recipients)],
        )

    def finish() -> tuple[str, Window, int, int] | None:
        if cursor is None:
            return None
        counted = {(r["scope"], r["period"]) for r in cursor.fetchall()}
        for label, scope, window, period in shared:
            if (scope, period) not in counted:
                return next(e for e in windows if (e[0], e[1]) == (label, window))
        return None

    return finish
