"""The charge on PostgreSQL inside a group commit: few round trips, locks in one order.

`relay.store.ledger.reserve` states the guarantees; this is the same charge
with its statements sent together (psycopg's pipeline mode), so a message
costs two round trips instead of one per statement:

1. the reads: the domain's owner and the token (one statement), the
   idempotency key, the send-limit windows and their limits;
2. the writes, in the lock order: the sender's conditional charge, the
   token's rate windows, the pending row, the send-limit windows.

A refusal found in the answers of (2) (a window full) raises inside the
write's savepoint, which rolls all four back. A sender that could not pay, or
has no row yet, is `ChargeMissed`: rolled back too, and the caller takes the
statement-by-statement way, which makes the row and says why it refuses.

`lock_rows` is what a group runs first (`relay.store.group`): the rows its
charges and refunds will change, locked in one global order.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from relay.errors import Refused
from relay.store.db import Connection, Cursor
from relay.store.limits import _WINDOWS_SQL as WINDOWS_SQL
from relay.store.limits import (
    RELAY_SCOPE,
    plain,
    start_count_windows,
    start_read_windows,
    window_scopes,
)
from relay.store.limits import windows_of as parse_windows
from relay.store.rates import start_count_rates
from relay.tokenrules import NO_RULES, RateHit, TokenRules, load_rules, sender_allowed
from relay.windows import UNLIMITED, LimitHit, Window, period_key, window_reset

# The domain's owner, whether a token is still valid (not revoked, not
# expired, its account not disabled or deleted), and its rules; parameters: the
# domain, the time now, the token's id twice.
_OWNER_AND_VALIDITY = (
    "(SELECT account_id FROM domains WHERE domain = ?) AS owner,"
    " (SELECT t.revoked IS NULL AND (t.expires IS NULL OR t.expires > ?)"
    " AND a.disabled IS NULL FROM tokens t JOIN accounts a ON a.id = t.account_id"
    " WHERE t.id = ?) AS token_ok,"
    " (SELECT rules FROM tokens WHERE id = ?) AS rules"
)
OWNER_SQL = f"SELECT {_OWNER_AND_VALIDITY}"
# MAIL FROM's check: with them, the no-limit list, the sender's row and the
# token's refusals within the window, counted no further than the limit, and the
# account's own queue mode.
MAIL_CHECK_SQL = (
    f"SELECT {_OWNER_AND_VALIDITY},"  # noqa: S608 - constants; placeholders only
    " EXISTS (SELECT 1 FROM nolimit WHERE address = ?) AS nolimit,"
    " (SELECT balance FROM senders WHERE address = ?) AS balance,"
    " (SELECT enabled FROM senders WHERE address = ?) AS enabled,"
    " (SELECT count(*) FROM (SELECT 1 FROM refusals WHERE token_id = ? AND created > ?"
    " LIMIT ?) AS r) AS refusals,"
    " (SELECT queue FROM accounts WHERE id = ?) AS queue"
)

# PostgreSQL: MAIL FROM's check and the windows' reads in one statement, the check's
# columns beside each window's row: one send and one round trip, where two
# statements in a pipeline cost three sends (theirs and the pipeline's sync).
MAIL_CHECK_WINDOWS_SQL = (
    f"SELECT c.*, w.* FROM ({MAIL_CHECK_SQL}) AS c CROSS JOIN ({WINDOWS_SQL}) AS w"  # noqa: S608
)


def windows_args(account_id: int, now: datetime) -> tuple[Any, ...]:
    """`WINDOWS_SQL`'s parameters (as `start_read_windows` gives them)."""
    day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
    return (day, day, month, month, RELAY_SCOPE, str(account_id))


class ChargeMissed(Exception):
    """The sender's row is missing or cannot pay: take the statement-by-statement way."""


class Reads:
    """A charge's reads, executed (in a pipeline: queued) and not yet read."""

    __slots__ = ("key", "seen", "who", "windows")

    def __init__(self, key: tuple[object, ...], who: Any, seen: Any, windows: Any) -> None:
        self.key, self.who, self.seen, self.windows = key, who, seen, windows


def start_reads(
    db: Connection,
    now: datetime,
    *,
    account_id: int,
    idempotency_key: str | None,
    domain: str | None,
    token_id: str | None,
) -> Reads:
    """Step (1)'s statements. A group executes those of all its charges at its start,
    in one round trip with its locks (`Ledger.prefetch_charges`): the counts read
    may then miss the group's own earlier charges, which on PostgreSQL only the
    conditional upserts of step (2) decide anyway."""
    from relay.store.idempotency import IDEMPOTENCY_WINDOW

    ts = int(now.timestamp())
    checked = token_id is not None or domain is not None
    who = (
        db.execute(OWNER_SQL, (domain or "", ts, token_id or "", token_id or ""))
        if checked
        else None
    )
    seen = (
        db.execute(
            "SELECT 1 FROM delivered_keys WHERE key = ? AND created > ?",
            (idempotency_key, ts - IDEMPOTENCY_WINDOW),
        )
        if idempotency_key
        else None
    )
    key = (account_id, idempotency_key, domain, token_id)
    return Reads(key, who, seen, start_read_windows(db, account_id, now))


def reserve_pipelined(
    db: Connection,
    *,
    now: datetime,
    sender: str,
    account_id: int,
    recipients: int,
    unit: int,
    idempotency_key: str | None,
    domain: str | None,
    token_id: str | None,
    owner: str | None,
    reads: Reads | None = None,
) -> tuple[int, int, int] | None:
    """The reservation's (id, units charged, time), or None: the upstream took
    this message already (its idempotency key), nothing charged."""
    ts = int(now.timestamp())
    day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
    if reads is None or reads.key != (account_id, idempotency_key, domain, token_id):
        reads = start_reads(
            db,
            now,
            account_id=account_id,
            idempotency_key=idempotency_key,
            domain=domain,
            token_id=token_id,
        )
    who, seen, windows_cursor = reads.who, reads.seen, reads.windows
    rules = NO_RULES
    if who is not None:
        row = who.fetchone()
        owner_id = None if row["owner"] is None else int(row["owner"])
        rules = load_rules(row["rules"])
        if token_id is not None and not row["token_ok"]:
            raise Refused("the session's token was revoked or expired", token_invalid=True)
        if domain is not None and owner_id != account_id:
            raise Refused(f"domain {domain} left the account", domain_lost=True)
        if not sender_allowed(rules.senders, sender):
            raise Refused(f"{sender} left the token's scope", out_of_scope=True)
    windows = parse_windows(windows_cursor.fetchall())
    if seen is not None and seen.fetchone() is not None:
        return None
    for label, window, limit, used in windows:
        if limit != UNLIMITED and used + recipients > limit:
            hit = LimitHit(label, window, limit, window_reset(window, now))
            raise Refused(f"{label} {window.value} limit {limit} reached", hit=hit)
    # (2) the writes, in the lock order, in one round trip.
    charge = unit * recipients
    charged = charge_sender(db, sender, charge, ts) if unit else None
    counted = token_id if token_id is not None and rules.counted else None
    rates = start_count_rates(db, counted, rules, recipients, ts) if counted is not None else None
    if isinstance(rates, RateHit):
        raise Refused(f"token {rates.what} rate {rates.rate} reached", rate=rates)
    scopes = window_scopes(account_id, windows, owner)
    pending = db.execute(
        "INSERT INTO pending (sender, unit, count, scopes, day, month, created, owner, token)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (sender, unit, recipients, plain(scopes), day, month, ts, owner, counted),
    )
    full = start_count_windows(db, account_id, day, month, recipients, windows, scopes)
    if charged is not None and charged.rowcount != 1:
        raise ChargeMissed(sender)
    rate = rates() if rates is not None else None
    if rate is not None:
        raise Refused(f"token {rate.what} rate {rate.rate} reached", rate=rate)
    hit_window = full()
    if hit_window is not None:
        label, window, limit, _ = hit_window
        hit = LimitHit(label, window, limit, window_reset(window, now))
        raise Refused(f"{label} {window.value} limit {limit} reached", hit=hit)
    return int(pending.fetchone()["id"]), charge, ts


# The group's locks, one statement per kind of row, in the order every charge and
# settle takes them (the module docstring of relay.store.ledger): senders by
# address, token rate windows by token and minute, hour, day, send-limit windows
# by scope and period with the relay-wide ones last. A settle's rows count only
# when it will refund (fewer delivered than reserved); parameters: the charges'
# keys, then the settles' ids and delivered counts.
_SETTLING = (
    " FROM pending p JOIN unnest(?::bigint[], ?::bigint[]) AS s(id, delivered)"
    " ON p.id = s.id WHERE p.count > s.delivered"
)
LOCK_SENDERS = (
    "SELECT 1 FROM senders WHERE address IN (SELECT unnest(?::text[])"  # noqa: S608
    f" UNION SELECT p.sender{_SETTLING} AND p.unit > 0) ORDER BY address FOR UPDATE"
)
LOCK_RATES = (
    "SELECT 1 FROM token_rates WHERE token_id IN (SELECT unnest(?::text[])"  # noqa: S608
    f" UNION SELECT p.token{_SETTLING} AND p.token IS NOT NULL)"
    " ORDER BY token_id, CASE unit WHEN 'minute' THEN 0 WHEN 'hour' THEN 1 ELSE 2 END"
    " FOR UPDATE"
)
LOCK_WINDOWS = (
    "SELECT 1 FROM counters WHERE (scope, period) IN"
    " (SELECT * FROM unnest(?::text[], ?::text[]) UNION SELECT sc.scope, v.period"
    " FROM pending p JOIN unnest(?::bigint[], ?::bigint[]) AS s(id, delivered) ON p.id = s.id"
    " CROSS JOIN LATERAL unnest(string_to_array(p.scopes, ',')) AS sc(scope)"
    " CROSS JOIN LATERAL (VALUES (p.day), (p.month)) AS v(period)"
    " WHERE p.count > s.delivered)"
    # Only windows with a limit: an unlimited one is counted in each relay's own rows.
    " AND scope IN (SELECT scope FROM limits WHERE daily <> -1 OR monthly <> -1)"
    " ORDER BY left(scope, 1) = '*', scope, period FOR UPDATE"
)


def lock_rows(
    db: Connection,
    now: datetime,
    charges: list[tuple[str, int, str | None]],
    settles: list[tuple[int, int]],
) -> None:
    """Lock the rows a group's charges (sender, account, token) and settles
    (reservation id, delivered) will change, in the global order. The statements
    are queued: their answers are read with the first write's."""
    day, month = period_key(Window.DAY, now), period_key(Window.MONTH, now)
    ids = [s[0] for s in settles]
    delivered = [s[1] for s in settles]
    senders = sorted({c[0] for c in charges})
    tokens = sorted({c[2] for c in charges if c[2] is not None})
    scopes, periods = [], []
    for scope in [*sorted({str(c[1]) for c in charges}), RELAY_SCOPE]:
        scopes += [scope, scope]
        periods += [day, month]
    if not charges:
        scopes, periods = [], []
    db.execute(LOCK_SENDERS, (senders, ids, delivered))
    db.execute(LOCK_RATES, (tokens, ids, delivered))
    db.execute(LOCK_WINDOWS, (scopes, periods, ids, delivered))


def charge_sender(db: Connection, address: str, charge: int, ts: int) -> Cursor:
    """Take `charge` from an enabled sender's balance if it covers it (rowcount 1), or nothing."""
    return db.execute(
        "UPDATE senders SET balance = balance - ?, updated = ?"
        " WHERE address = ? AND enabled = 1 AND balance >= ?",
        (charge, ts, address, charge),
    )


def owner_and_token(
    db: Connection, domain: str, token_id: str, now: int
) -> tuple[int | None, bool, TokenRules]:
    """The account owning `domain`, whether token `token_id` is still valid
    (not revoked, not expired), and its rules, in one statement: the charge
    asks them of every message (MAIL FROM's check reads them with more)."""
    row = db.execute(OWNER_SQL, (domain, now, token_id, token_id)).fetchone()
    owner = row["owner"]
    return (None if owner is None else int(owner)), bool(row["token_ok"]), load_rules(row["rules"])
