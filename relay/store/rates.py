"""Token rate limits: each token's messages and recipients in its UTC minute, hour and day.

One row per token and unit (`token_rates`), holding the counts of the window
that began at `start`; the first charge in a new window starts the row over,
so a token has at most three rows however long it sends. The charge
(`relay.store.ledger.reserve`) counts a message here in the same transaction
as the balance and the send-limit windows; the settle gives back what was not
delivered (the message itself when no recipient was).

Exact across sessions, processes and hosts on one database: the count is one
conditional upsert (`... DO UPDATE ... WHERE count + n <= limit RETURNING`),
which on PostgreSQL locks each window's row and re-checks its condition
against the latest committed count, and on SQLite runs under the write lock.
The rows are locked in one order, minute, hour, day, by the charge and the
settle alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.store.db import Connection, Cursor
from relay.tokenrules import SECONDS, RateHit, RateUse, TokenRules, Unit, rate_hit, window_start

# A limit for the upsert's condition when a window has none of that kind.
_NO_LIMIT = 2**62


def read_rates(db: Connection, token_id: str) -> dict[Unit, RateUse]:
    """The token's counts, by unit (the caller judges whether a window is current)."""
    return rates_of(start_read_rates(db, token_id).fetchall())


def start_read_rates(db: Connection, token_id: str) -> Cursor:
    """`read_rates`' statement, executed (in a pipeline: queued); `rates_of` reads it."""
    return db.execute(
        "SELECT unit, start, messages, recipients FROM token_rates WHERE token_id = ?",
        (token_id,),
    )


def rates_of(rows: list[Any]) -> dict[Unit, RateUse]:
    return {
        Unit(r["unit"]): RateUse(int(r["start"]), int(r["messages"]), int(r["recipients"]))
        for r in rows
    }


def count_rates(
    db: Connection, token_id: str, rules: TokenRules, recipients: int, now: int
) -> RateHit | None:
    """Count one message of `recipients` in the token's windows, or return the full one.

    A window with no row yet (or an ended one) is started unconditionally, so a
    message that alone is over a limit is refused before the statement. When
    the upsert did not return a window, the caller rolls the transaction back.
    """
    started = start_count_rates(db, token_id, rules, recipients, now)
    return started if isinstance(started, RateHit) else started()


def start_count_rates(
    db: Connection, token_id: str, rules: TokenRules, recipients: int, now: int
) -> RateHit | Callable[[], RateHit | None]:
    """`count_rates` in two steps: the statement is executed (in a pipeline, queued)
    and what reads its answer is returned, or the hit when the message alone is over."""
    alone = rate_hit(rules, {}, 1, recipients, now)
    if alone is not None:
        return alone
    limits: dict[Unit, list[int]] = {}
    for index, rates in enumerate((rules.rates, rules.rcpt_rates)):
        for rate in rates:
            limits.setdefault(rate.unit, [_NO_LIMIT, _NO_LIMIT])[index] = rate.limit
    units = [u for u in Unit if u in limits]  # the lock order: minute, hour, day
    if not units:
        return lambda: None
    values = ", ".join("(?, ?, ?, 1, ?)" for _ in units)
    cases = " ".join("WHEN ? THEN ?" for _ in units)
    params: list[object] = []
    for unit in units:
        params += [token_id, str(unit), window_start(unit, now), recipients]
    for index in (0, 1):
        for unit in units:
            params += [str(unit), limits[unit][index]]
    cursor = db.execute(
        "INSERT INTO token_rates (token_id, unit, start, messages, recipients)"  # noqa: S608
        f" VALUES {values} ON CONFLICT (token_id, unit) DO UPDATE SET"
        " messages = CASE WHEN token_rates.start = excluded.start"
        " THEN token_rates.messages ELSE 0 END + excluded.messages,"
        " recipients = CASE WHEN token_rates.start = excluded.start"
        " THEN token_rates.recipients ELSE 0 END + excluded.recipients,"
        " start = excluded.start"
        " WHERE CASE WHEN token_rates.start = excluded.start"
        " THEN token_rates.messages ELSE 0 END + excluded.messages"
        f" <= CASE token_rates.unit {cases} END"
        " AND CASE WHEN token_rates.start = excluded.start"
        " THEN token_rates.recipients ELSE 0 END + excluded.recipients"
        f" <= CASE token_rates.unit {cases} END"
        " RETURNING unit",
        params,
    )

    def finish() -> RateHit | None:
        returned = cursor.fetchall()
        if len(returned) == len(units):
            return None
        # The windows not returned were full. Their rows are locked now and this
        # statement did not change them, so their counts say which limit.
        full = set(units) - {Unit(r["unit"]) for r in returned}
        narrowed = TokenRules(
            rates=tuple(r for r in rules.rates if r.unit in full),
            rcpt_rates=tuple(r for r in rules.rcpt_rates if r.unit in full),
        )
        hit = rate_hit(narrowed, read_rates(db, token_id), 1, recipients, now)
        if hit is not None:
            return hit
        unit = max(full, key=SECONDS.__getitem__)
        rate = next(r for r in (*narrowed.rates, *narrowed.rcpt_rates) if r.unit == unit)
        return RateHit("messages", rate, window_start(unit, now) + SECONDS[unit] - now)

    return finish


def give_back(db: Connection, token_id: str, created: int, messages: int, recipients: int) -> None:
    """Take a settled message's undelivered part off the windows it was counted in
    (those that began when it was charged, at `created`), in the lock order."""
    for unit in Unit:
        db.execute(
            "UPDATE token_rates"
            " SET messages = CASE WHEN messages > ? THEN messages - ? ELSE 0 END,"
            " recipients = CASE WHEN recipients > ? THEN recipients - ? ELSE 0 END"
            " WHERE token_id = ? AND unit = ? AND start = ?",
            (
                messages,
                messages,
                recipients,
                recipients,
                token_id,
                str(unit),
                window_start(unit, created),
            ),
        )
