"""What an operator can do, once: the `relay` CLI and the admin API both call these.

Each function takes the synchronous `Store`, checks its input (raising
`Invalid`), makes the change or the read, translates the store's refusals into
`NotFound` or `Conflict`, and records every change in the audit log with its
`Actor`. It returns JSON-ready values whose field names are the CLI's `--json`
output, which the API returns as they are. So the two front ends cannot drift:
neither has rules of its own beyond parsing its input.

The API runs these on the store's thread (`AsyncStore.in_thread`), never on
the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from relay.config import QUEUE_MODES
from relay.errors import AdminError, Conflict, Invalid, NotFound, RelayError, StoreError
from relay.message import normalize_address, parse_address
from relay.store.audit import MAX_AUDIT_PAGE, Actor
from relay.store.browse import LogPage
from relay.store.deliveries import MAX_LIMIT, DeliveryRecord, Outcome, parse_when
from relay.store.facade import Store
from relay.store.rows import (
    AccountRow,
    AddressRow,
    AdminTokenRow,
    AdminTokenView,
    AuditRow,
    DomainRow,
    NewAccount,
    NewAdminToken,
    NewDomain,
    NewToken,
    TokenRow,
    TokenView,
)
from relay.tokenrules import (
    NO_RULES,
    BadRule,
    TokenRules,
    parse_networks,
    parse_rates,
    parse_senders,
    rules_of,
)

# A token's lifetime, at most: beyond, the expiry is a typo (and past SQLite's integers).
MAX_EXPIRY_DAYS = 36_500
# Account names and labels are shown in tables and URL paths: short, one line.
MAX_NAME = 100
LIST_KINDS = ("verified", "nolimit")


@contextmanager
def refused_as(kind: type[AdminError], code: str) -> Iterator[None]:
    """Turn the store's plain `RelayError` (a refused change) into `kind` with `code`."""
    try:
        yield
    except (AdminError, StoreError):
        raise
    except RelayError as exc:
        raise kind(str(exc), code=code) from None


def address(value: str) -> str:
    """A usable email address, normalized, or `Invalid`."""
    if not isinstance(value, str) or parse_address(value) is None:
        raise Invalid(f"not a usable email address: {value!r}", code="bad_address")
    return normalize_address(value)


def _name(value: str, what: str, *, empty: bool = False) -> str:
    text = value.strip()
    if (not text and not empty) or len(text) > MAX_NAME:
        raise Invalid(f"{what}: 1 to {MAX_NAME} characters", code=f"bad_{what}")
    if any(not c.isprintable() or c == "/" for c in text):
        raise Invalid(f"{what}: printable characters, no '/'", code=f"bad_{what}")
    return text


def require_account(store: Store, name: str) -> None:
    if name not in {a["name"] for a in store.list_accounts()}:
        raise NotFound(f"no account named {name!r}", code="no_such_account")


def _expiry(days: float | None) -> float | None:
    if days is not None and not (math.isfinite(days) and 0 < days <= MAX_EXPIRY_DAYS):
        raise Invalid(
            f"expires in: a number of days above 0 and at most {MAX_EXPIRY_DAYS}"
            " (leave it out: no expiry)",
            code="bad_expiry",
        )
    return days


def _status(row: TokenRow | AdminTokenRow) -> str:
    if row["revoked"]:
        return "revoked"
    if row["expires"] and row["expires"] <= datetime.now(UTC).timestamp():
        return "expired"
    return "active"


# --- accounts and domains ------------------------------------------------------------


def create_account(store: Store, actor: Actor, name: str) -> NewAccount:
    name = _name(name, "name")
    with refused_as(Conflict, "account_exists"):
        value = store.create_account(name)
    store.record_audit(actor, "account.create", name)
    return value


def list_accounts(store: Store) -> list[AccountRow]:
    return store.list_accounts()


def set_account(store: Store, actor: Actor, name: str, *, queue: str | None = None) -> AccountRow:
    """An account's own settings: `queue`, its RELAY_QUEUE mode (`default`: the relay's)."""
    require_account(store, name)
    if queue is not None:
        if queue not in (*QUEUE_MODES, "default"):
            raise Invalid(f"queue: one of {', '.join(QUEUE_MODES)} or default", code="bad_queue")
        with refused_as(NotFound, "no_such_account"):
            store.set_account_queue(name, None if queue == "default" else queue)
        store.record_audit(actor, "account.set", name, {"queue": queue})
    return next(a for a in store.list_accounts() if a["name"] == name)


def add_domain(store: Store, actor: Actor, account: str, domain: str) -> NewDomain:
    domain = domain.strip().lower()
    if parse_address(f"x@{domain}") is None:
        raise Invalid(f"not a usable domain: {domain!r}", code="bad_domain")
    require_account(store, account)
    with refused_as(Conflict, "domain_taken"):
        value = store.add_domain(account, domain)
    store.record_audit(actor, "domain.add", account, {"domain": domain})
    return value


def remove_domain(store: Store, actor: Actor, account: str, domain: str) -> dict[str, Any]:
    domain = domain.strip().lower()
    require_account(store, account)
    with refused_as(NotFound, "no_such_domain"):
        store.remove_domain(account, domain)
    store.record_audit(actor, "domain.remove", account, {"domain": domain})
    return {"account": account, "domain": domain, "removed": True}


def list_domains(store: Store, account: str | None = None) -> list[DomainRow]:
    if account is not None:
        require_account(store, account)
    return store.list_domains(account)


# --- sending tokens ------------------------------------------------------------------


def _rules(
    store: Store,
    account: str,
    base: TokenRules,
    *,
    senders: list[str] | None,
    networks: list[str] | None,
    rates: list[str] | None,
    rcpt_rates: list[str] | None,
) -> TokenRules:
    """`base` with each list given replaced (an empty list clears it), checked: a
    sender on a domain of `account` only, a CIDR range, a rate from 1 per unit."""
    for what, value in (
        ("sender", senders),
        ("network", networks),
        ("rate", rates),
        ("rcpt_rate", rcpt_rates),
    ):
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            raise Invalid(f"{what}s: a list of strings", code=f"bad_{what}")
    try:
        return TokenRules(
            senders=base.senders
            if senders is None
            else parse_senders(senders, [d["domain"] for d in store.list_domains(account)]),
            networks=base.networks if networks is None else parse_networks(networks),
            rates=base.rates if rates is None else parse_rates(rates, "rate"),
            rcpt_rates=base.rcpt_rates
            if rcpt_rates is None
            else parse_rates(rcpt_rates, "recipient rate"),
        )
    except BadRule as exc:
        raise Invalid(str(exc), code=exc.code) from None


def create_token(
    store: Store,
    actor: Actor,
    account: str,
    *,
    name: str = "",
    role: str = "",
    expires_in_days: float | None = None,
    senders: list[str] | None = None,
    networks: list[str] | None = None,
    rates: list[str] | None = None,
    rcpt_rates: list[str] | None = None,
) -> NewToken:
    """A token for `account`; the value holds the token itself, shown this once."""
    name, role = _name(name, "name", empty=True), _name(role, "role", empty=True)
    require_account(store, account)
    rules = _rules(
        store,
        account,
        NO_RULES,
        senders=senders,
        networks=networks,
        rates=rates,
        rcpt_rates=rcpt_rates,
    )
    value = store.create_token(
        account, name=name, role=role, expires_in_days=_expiry(expires_in_days), rules=rules
    )
    detail = {
        "id": value["id"],
        "name": name,
        "role": role,
        "expires": value["expires"],
        **{k: v for k, v in rules.as_json().items() if v},
    }
    store.record_audit(actor, "token.create", account, detail)
    return value


def show_token(store: Store, token_id: str) -> TokenView:
    """One token, never its secret: its row, its rules and its `status`."""
    with refused_as(NotFound, "no_such_token"):
        row = store.show_token(token_id)
    return TokenView(**row, status=_status(row))


def set_token(
    store: Store,
    actor: Actor,
    token_id: str,
    *,
    senders: list[str] | None = None,
    networks: list[str] | None = None,
    rates: list[str] | None = None,
    rcpt_rates: list[str] | None = None,
) -> TokenView:
    """Replace the lists given (an empty one clears it); the others stay as they are."""
    changes = {
        k: v
        for k, v in (
            ("senders", senders),
            ("networks", networks),
            ("rates", rates),
            ("rcpt_rates", rcpt_rates),
        )
        if v is not None
    }
    if not changes:
        raise Invalid(
            "give senders, networks, rates and/or rcpt_rates (an empty list clears one)",
            code="bad_body",
        )
    current = show_token(store, token_id)
    base = rules_of(
        current["senders"], current["networks"], current["rates"], current["rcpt_rates"]
    )
    rules = _rules(
        store,
        current["account"],
        base,
        senders=senders,
        networks=networks,
        rates=rates,
        rcpt_rates=rcpt_rates,
    )
    with refused_as(NotFound, "no_such_token"):
        row = store.set_token_rules(token_id, rules)
    shown = rules.as_json()
    store.record_audit(actor, "token.set", token_id, {k: shown[k] for k in changes})
    return TokenView(**row, status=_status(row))


def list_tokens(store: Store, account: str | None = None) -> list[TokenView]:
    """Tokens, never their secrets, each with its `status`: active, revoked or expired."""
    if account is not None:
        require_account(store, account)
    return [TokenView(**row, status=_status(row)) for row in store.list_tokens(account)]


def revoke_token(store: Store, actor: Actor, token_id: str) -> dict[str, Any]:
    with refused_as(NotFound, "no_such_token"):
        store.revoke_token(token_id)
    store.record_audit(actor, "token.revoke", token_id)
    return {"id": token_id, "revoked": True}


# --- the verified and no-limit lists -------------------------------------------------

_LISTS: dict[str, tuple[Callable[[Store, str], None], Callable[[Store, str], None]]] = {
    "verified": (Store.add_verified, Store.remove_verified),
    "nolimit": (Store.add_nolimit, Store.remove_nolimit),
}


def add_to_list(store: Store, actor: Actor, kind: str, value: str) -> dict[str, Any]:
    """Add an address to the `verified` or `nolimit` list (adding it twice is no error)."""
    normalized = address(value)
    _LISTS[kind][0](store, normalized)
    store.record_audit(actor, f"{kind}.add", normalized)
    return {"address": normalized, "added": True}


def remove_from_list(store: Store, actor: Actor, kind: str, value: str) -> dict[str, Any]:
    normalized = address(value)
    with refused_as(NotFound, "not_on_list"):
        _LISTS[kind][1](store, normalized)
    store.record_audit(actor, f"{kind}.remove", normalized)
    return {"address": normalized, "removed": True}


def list_addresses(store: Store, kind: str) -> list[AddressRow]:
    return store.list_verified() if kind == "verified" else store.list_nolimit()


# --- the delivery log ----------------------------------------------------------------


def log_query(
    *,
    since: str | None = None,
    until: str | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    account: str | None = None,
    outcome: str | None = None,
    message_id: str | None = None,
    channel: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
) -> LogPage:
    """The `relay log` filters (and the API's query parameters) as one query."""
    now = datetime.now(UTC)
    try:
        return LogPage(
            since=parse_when(since, now) if since else None,
            until=parse_when(until, now) if until else None,
            sender=sender,
            recipient=recipient,
            account=account,
            outcome=Outcome(outcome) if outcome else None,
            message_id=message_id,
            limit=limit,
            before=cursor,
            channel=None if channel is None else ("" if channel == "none" else channel),
        )
    except ValueError:
        raise Invalid(
            f"outcome: one of {', '.join(str(o) for o in Outcome)}", code="bad_outcome"
        ) from None
    except RelayError as exc:
        raise Invalid(str(exc), code="bad_time") from None


def find_log(store: Store, query: LogPage) -> tuple[list[DeliveryRecord], str | None]:
    """Records newest first, and the cursor of the next page (None on the last)."""
    if not 1 <= query.limit <= MAX_LIMIT:
        raise Invalid(f"limit: from 1 to {MAX_LIMIT}", code="bad_limit")
    records = store.find_deliveries(query)
    more = len(records) == query.limit and records
    return records, str(records[-1].id) if more else None


def show_log(store: Store, message_id: str) -> list[DeliveryRecord]:
    """Everything recorded for a Message-ID (a retried message has several records),
    written with or without its angle brackets."""
    if not message_id.strip():  # no filter at all would show every record
        raise Invalid("a Message-ID is required", code="bad_message_id")
    records = store.find_deliveries(LogPage(message_id=message_id, limit=1000))
    if not records:
        raise NotFound(f"no delivery record for Message-ID {message_id}", code="no_such_message")
    return records


# --- admin tokens and the audit log --------------------------------------------------


def create_admin_token(
    store: Store, actor: Actor, *, name: str = "", expires_in_days: float | None = None
) -> NewAdminToken:
    value = store.create_admin_token(
        name=_name(name, "name", empty=True), expires_in_days=_expiry(expires_in_days)
    )
    detail = {"name": value["name"], "expires": value["expires"]}
    store.record_audit(actor, "admin_token.create", value["id"], detail)
    return value


def list_admin_tokens(store: Store) -> list[AdminTokenView]:
    return [AdminTokenView(**row, status=_status(row)) for row in store.list_admin_tokens()]


def revoke_admin_token(store: Store, actor: Actor, token_id: str) -> dict[str, Any]:
    store.revoke_admin_token(token_id)
    store.record_audit(actor, "admin_token.revoke", token_id)
    return {"id": token_id, "revoked": True}


def audit(
    store: Store, *, limit: int = 100, cursor: int | None = None
) -> tuple[list[AuditRow], int | None]:
    """Audit records newest first, and the cursor of the next page (None on the last)."""
    if not 1 <= limit <= MAX_AUDIT_PAGE:
        raise Invalid(f"limit: from 1 to {MAX_AUDIT_PAGE}", code="bad_limit")
    rows = store.list_audit(limit=limit, before=cursor)
    return rows, rows[-1]["id"] if rows and len(rows) == limit else None
