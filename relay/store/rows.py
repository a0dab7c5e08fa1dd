"""The shapes of what the store hands the CLI, the admin API and the console.

Each is a `TypedDict`: the JSON the API answers and the CLI's `--json` print
are these dictionaries as they are, so their keys are part of the interface
(docs/admin.md), and mypy checks every reader of them.
"""

from __future__ import annotations

from typing import Any, TypedDict


class AccountRow(TypedDict):
    id: int
    name: str
    created: int
    queue: str | None  # its own RELAY_QUEUE; None: the relay's
    disabled: int | None  # unix seconds it was disabled; None: enabled


class DeletedAccount(TypedDict):
    """What deleting an account removed (its delivery and audit records stay)."""

    name: str
    tokens: list[str]  # the ids of its tokens, gone with it
    domains: list[str]
    webhooks: int
    suppressions: int


class NewAccount(TypedDict):
    id: int
    name: str


class DomainRow(TypedDict):
    account: str
    domain: str
    created: int


class NewDomain(TypedDict):
    account: str
    domain: str


class AddressRow(TypedDict):
    """An entry of the verified or the no-limit list."""

    address: str
    created: int


class TokenRules(TypedDict):
    """A token's rules (`relay.tokenrules`), each list empty when it has none."""

    senders: list[str]  # addresses, `*@domain` or domains it may send as
    networks: list[str]  # CIDR ranges it may AUTH from
    rates: list[str]  # `N/minute`, `N/hour`, `N/day`: messages
    rcpt_rates: list[str]  # the same, recipients


class TokenRow(TokenRules):
    id: str
    account: str
    name: str
    role: str
    created: int
    expires: int | None
    revoked: int | None


class NewToken(TokenRules):
    """A token as created: the secret is shown this once and never stored."""

    id: str
    account: str
    name: str
    role: str
    expires: int | None
    token: str


class AdminTokenRow(TypedDict):
    id: str
    name: str
    created: int
    expires: int | None
    revoked: int | None


class NewAdminToken(TypedDict):
    id: str
    name: str
    created: int
    expires: int | None
    token: str


class AuditRow(TypedDict):
    id: int
    created: int
    time: str
    actor: str
    address: str
    action: str
    target: str
    detail: dict[str, Any]


class TokenView(TokenRow):
    """A token as listed: its row and whether it is active, revoked or expired."""

    status: str


class AdminTokenView(AdminTokenRow):
    status: str


class SuppressionRow(TypedDict):
    """An entry of an account's suppression list."""

    address: str  # the address, or `*@domain`
    reason: str  # hard-bounce, complaint, manual, provider
    source: str
    created: int
    expires: int | None  # None: until removed


class NewWebhook(TypedDict):
    """A new endpoint: the only answer that holds its secret."""

    id: str
    account: str
    url: str
    events: list[str]  # empty: every type
    secret: str  # whsec_...


class WebhookRow(TypedDict):
    id: str
    account: str
    url: str
    events: list[str]  # empty: every type
    created: int
    enabled: bool
    failing_since: int | None


class WebhookAttemptRow(TypedDict):
    created: int
    event_id: str
    type: str
    status: int | None  # None: no answer came
    duration_ms: int
    answer: str  # the first 1 KiB of the answer, or why none came
    state: str  # the event's: pending, delivered, failed
