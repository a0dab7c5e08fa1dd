"""An account's life after creation: disable, enable, delete, and moving a domain
between accounts. The CLI and the admin API call these, as `relay.admin.operations`.

What each means for mail (docs/admin.md, "Accounts"):

- Disabled: its tokens fail AUTH with `535 5.7.8`, the reply of an unknown token
  (a disabled account is no oracle); a session that authenticated before is
  answered `530 5.7.0 ... revoked or expired` at its next MAIL or end of DATA (the
  check that also catches a revoked token, in the charge's transaction) and must
  AUTH again. What the relay already accepted for it (the durable queue) is still
  delivered: a 250 is a promise.
- Deleted: refused (`409 account_has_queued`) while the queue holds its messages;
  otherwise its tokens, domains, webhooks, suppressions and send limits go in one
  transaction, and its delivery records and audit entries stay.
- A moved domain: from the next MAIL FROM the old account's tokens are refused it
  (`550 5.7.1 Sender denied: domain <d> is not onboarded ...`), the new one's send
  as it; a message of the old account past MAIL FROM is refused at its charge.

Every change is an audit entry.
"""

from __future__ import annotations

from typing import Any

from relay.admin.operations import refused_as, require_account
from relay.errors import Conflict, Invalid, NotFound
from relay.message import parse_address
from relay.store.accounts import AccountHasQueued, DomainAlreadyThere
from relay.store.audit import Actor
from relay.store.facade import Store
from relay.store.rows import AccountRow, DeletedAccount


def _account(store: Store, name: str) -> AccountRow:
    for row in store.list_accounts():
        if row["name"] == name:
            return row
    raise NotFound(f"no account named {name!r}", code="no_such_account")


def set_disabled(store: Store, actor: Actor, name: str, disabled: bool) -> AccountRow:
    """Disable or enable an account; doing it twice changes nothing and audits nothing."""
    require_account(store, name)
    with refused_as(NotFound, "no_such_account"):
        changed = store.set_account_disabled(name, disabled)
    if changed:
        store.record_audit(actor, "account.disable" if disabled else "account.enable", name)
    return _account(store, name)


def delete_account(store: Store, actor: Actor, name: str) -> DeletedAccount:
    require_account(store, name)
    # The store's refusals are RelayErrors: the specific one first, inside.
    with refused_as(NotFound, "no_such_account"):
        try:
            value = store.delete_account(name)
        except AccountHasQueued as exc:
            raise Conflict(str(exc), code="account_has_queued") from None
    detail: dict[str, Any] = {k: v for k, v in value.items() if k != "name"}
    store.record_audit(actor, "account.delete", name, detail)
    return value


def move_domain(store: Store, actor: Actor, domain: str, to_account: str) -> dict[str, Any]:
    domain = domain.strip().lower()
    if parse_address(f"x@{domain}") is None:
        raise Invalid(f"not a usable domain: {domain!r}", code="bad_domain")
    require_account(store, to_account)
    with refused_as(NotFound, "no_such_domain"):
        try:
            left = store.move_domain(domain, to_account)
        except DomainAlreadyThere as exc:
            raise Conflict(str(exc), code="same_account") from None
    store.record_audit(actor, "domain.move", domain, {"from": left, "to": to_account})
    return {"domain": domain, "from": left, "account": to_account}
