"""What an operator does with senders' balances and the send limits, once for the CLI
and the admin API: show, set, top up and delete a sender; show and set the limits."""

from __future__ import annotations

from typing import Any

from relay.admin.operations import address, refused_as, require_account
from relay.config import SQLITE_MAX_INT
from relay.errors import Conflict, Invalid, NotFound, RelayError, StoreError
from relay.store.audit import Actor
from relay.store.browse import MAX_PAGE
from relay.store.facade import Store
from relay.store.limits import LimitsRow
from relay.store.senders import SenderRow, SenderView
from relay.windows import UNLIMITED


def _balance(value: int, what: str, minimum: int = 0, below: str = "") -> int:
    """A whole number from `minimum` to the largest SQLite integer; `below`: the
    message when it is under `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{what}: a whole number", code=f"bad_{what}")
    if value < minimum:
        raise Invalid(below or f"{what}: at least {minimum}", code=f"bad_{what}")
    if value > SQLITE_MAX_INT:
        raise Invalid(f"{what}: at most {SQLITE_MAX_INT}", code=f"bad_{what}")
    return value


def list_senders(
    store: Store, *, prefix: str = "", limit: int | None = None, cursor: str | None = None
) -> tuple[list[SenderRow], str | None]:
    """Sender rows by address, starting with `prefix`, after `cursor`; and the next cursor.

    `limit=None`: every row (the CLI); else one page of at most `limit` (at most
    MAX_PAGE), and the cursor for the next page, or None on the last.
    """
    prefix = prefix.strip().lower()
    if limit is None:
        rows: list[SenderRow] = []
        while page := store.page_senders(prefix=prefix, limit=MAX_PAGE, after=cursor):
            rows += page
            cursor = page[-1]["address"]
        return rows, None
    if not 1 <= limit <= MAX_PAGE:
        raise Invalid(f"limit: from 1 to {MAX_PAGE}", code="bad_limit")
    rows = store.page_senders(prefix=prefix, limit=limit, after=cursor)
    return rows, rows[-1]["address"] if len(rows) == limit else None


def _sender_view(store: Store, row: SenderRow, *, stored: bool = True) -> SenderView:
    """A sender as the CLI and API show it: the row's fields, `unlimited` (on the
    no-limit list: sends without balance) and `stored` (whether the row exists)."""
    nolimit = {r["address"] for r in store.list_nolimit()}
    return SenderView(**row, unlimited=row["address"] in nolimit, stored=stored)


def show_sender(store: Store, value: str, *, default_balance: int = 0) -> SenderView:
    """The balance `value` sends with. An address never charged (nor set or topped
    up) has no row yet: it shows `default_balance` (DEFAULT_SEND_BALANCE), enabled,
    `stored: false`, as MAIL FROM reads it (relay.store.ledger `check_mail`)."""
    normalized = address(value)
    try:
        row = store.show_sender(normalized)
    except StoreError:
        raise
    except RelayError:
        never = SenderRow(
            address=normalized, balance=default_balance, enabled=True, created=None, updated=None
        )
        return _sender_view(store, never, stored=False)
    return _sender_view(store, row)


def set_sender(
    store: Store, actor: Actor, value: str, *, balance: int | None, enabled: bool | None
) -> SenderView:
    """Create or edit a sender row: its balance, whether it may send."""
    normalized = address(value)
    if balance is not None:
        _balance(balance, "balance", below="a balance cannot be negative")
    if enabled is not None and not isinstance(enabled, bool):
        raise Invalid("enabled: true or false", code="bad_enabled")
    row = store.set_sender(normalized, balance=balance, enabled=enabled)
    detail = {k: v for k, v in (("balance", balance), ("enabled", enabled)) if v is not None}
    store.record_audit(actor, "sender.set", normalized, detail)
    return _sender_view(store, row)


def topup_sender(store: Store, actor: Actor, value: str, amount: int) -> SenderView:
    """Add `amount` (negative: take away) to a balance; creates the row if missing."""
    normalized = address(value)
    _balance(amount, "amount", minimum=-SQLITE_MAX_INT)
    current = {r["address"]: r["balance"] for r in store.page_senders(prefix=normalized)}
    if current.get(normalized, 0) + amount > SQLITE_MAX_INT:
        raise Conflict(f"a top-up of {amount} would pass the largest balance", code="too_large")
    with refused_as(Conflict, "balance_negative"):
        row = store.topup_sender(normalized, amount)
    store.record_audit(actor, "sender.topup", normalized, {"amount": amount})
    return _sender_view(store, row)


def delete_sender(store: Store, actor: Actor, value: str) -> dict[str, Any]:
    normalized = address(value)
    with refused_as(NotFound, "no_such_sender"):
        store.delete_sender(normalized)
    store.record_audit(actor, "sender.delete", normalized)
    return {"address": normalized, "deleted": True}


# --- send limits ---------------------------------------------------------------------


def show_limits(store: Store) -> list[LimitsRow]:
    """Each scope's limits, its counts in the current UTC day and month, and their resets."""
    return store.show_limits()


def set_limits(
    store: Store,
    actor: Actor,
    *,
    account: str | None = None,
    daily: int | None = None,
    monthly: int | None = None,
) -> LimitsRow:
    if daily is None and monthly is None:
        raise Invalid(
            "give daily and/or monthly (-1 unlimited, 0 blocks sending)", code="bad_limits"
        )
    for what, number in (("daily", daily), ("monthly", monthly)):
        if number is not None:
            _balance(
                number,
                what,
                minimum=UNLIMITED,
                below="a limit is -1 (unlimited), 0 (blocks sending) or more",
            )
    if account:
        require_account(store, account)
    value = store.set_limits(account=account or None, daily=daily, monthly=monthly)
    detail = {k: v for k, v in (("daily", daily), ("monthly", monthly)) if v is not None}
    store.record_audit(actor, "limits.set", account or "relay", detail)
    return value
