"""Each account's suppression list: the addresses its mail no longer goes to.

An entry is an address, or `*@domain` for a whole domain, with a reason
(`hard-bounce`, `complaint`, `manual`, `provider`), a source (who or what added
it) and an optional expiry. Guarantees:
- RCPT TO a suppressed address is refused before any charge (`suppression_for`,
  one indexed read of at most two keys: the address and its domain's `*@`).
- An upstream's permanent refusal of a recipient as a mailbox error (RFC 3463
  X.1.x, the sender's own X.1.7 and X.1.8 aside) adds a `hard-bounce` entry in
  the same transaction as the delivery record that says so (`record_refusals`,
  called by `relay.store.deliveries.insert`): the record and the entry commit
  together. A recipient the provider keeps on its own list adds a `provider`
  entry lasting PROVIDER_SECONDS, learned again at the next refusal.
- An automatic entry never replaces a permanent one (a manual or complaint
  entry, or a hard bounce): it only renews an entry that expires.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from relay.errors import Invalid, NotFound
from relay.message import domain_of, parse_address
from relay.replies import PROVIDER_SUPPRESSED
from relay.store.accounts import account_id_of
from relay.store.db import Connection, Database, Row, read_only
from relay.store.rows import SuppressionRow

# Cloudflare's shortest suppression, a soft bounce, lasts 24 hours
# (cloudflare-docs email-service/concepts/suppressions.mdx, "Suppression rules");
# a `provider` entry lasts as long, and is learned again if the provider still
# refuses the address.
PROVIDER_SECONDS = 24 * 3600
# The longest `--expires-in`: ten years; longer is "until removed".
MAX_EXPIRES_IN = 10 * 365 * 86400
# RFC 3463 section 3.2: X.1.7 and X.1.8 are the sender's address, not a recipient's.
_SENDER_CODES = frozenset({"5.1.7", "5.1.8"})


class Reason(enum.StrEnum):
    HARD_BOUNCE = "hard-bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"
    PROVIDER = "provider"


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str  # the entry's key: the address, or `*@domain`
    reason: str
    source: str
    created: int
    expires: int | None


def entry_key(address: str) -> str:
    """The key an address or `*@domain` is listed under, or `Invalid`.

    >>> entry_key("Bob@Example.ORG"), entry_key("*@Example.org")
    ('bob@example.org', '*@example.org')
    """
    text = address.strip()
    if text.startswith("*@"):
        if parse_address("x" + text[1:]) is None:
            raise Invalid(f"not a domain: {text[:80]!r}", code="bad_address")
        return text.lower()
    if parse_address(text) is None:
        raise Invalid(f"not an address: {text[:80]!r}", code="bad_address")
    return text.lower()


def is_mailbox_refusal(code: int, enhanced: str) -> bool:
    """A permanent refusal of the recipient's address (RFC 3463 X.1.x), not the sender's."""
    return code >= 500 and enhanced.startswith("5.1.") and enhanced not in _SENDER_CODES


def record_refusals(
    db: Connection, account_id: int, refusals: Iterable[tuple[str, str, str]], now: int
) -> list[tuple[str, str]]:
    """Add an entry for each (recipient, enhanced code, reply text) an upstream refused
    as a mailbox error, inside the caller's transaction; the (address, reason) added."""
    added: list[tuple[str, str]] = []
    for address, enhanced, text in refusals:
        provider = PROVIDER_SUPPRESSED in text
        reason = Reason.PROVIDER if provider else Reason.HARD_BOUNCE
        expires = now + PROVIDER_SECONDS if provider else None
        source = f"upstream: {enhanced} {text}"[:200]
        row = db.execute(
            "INSERT INTO suppressions (account_id, address, reason, source, created, expires)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (account_id, address) DO UPDATE SET reason = excluded.reason,"
            " source = excluded.source, created = excluded.created, expires = excluded.expires"
            " WHERE suppressions.expires IS NOT NULL RETURNING address",
            (account_id, address.lower(), str(reason), source, now, expires),
        ).fetchone()
        if row is not None:
            added.append((address.lower(), str(reason)))
    return added


def _row(r: Row) -> SuppressionRow:
    return SuppressionRow(
        address=r["address"],
        reason=r["reason"],
        source=r["source"],
        created=int(r["created"]),
        expires=None if r["expires"] is None else int(r["expires"]),
    )


class Suppressions(Database):
    def add_suppression(
        self,
        account: str,
        address: str,
        *,
        reason: str = Reason.MANUAL,
        source: str = "admin",
        expires_in: int | None = None,
    ) -> SuppressionRow:
        """Add or replace an entry (an operator's word wins over what was there)."""
        key = entry_key(address)
        if reason not in set(Reason):
            raise Invalid(
                f"reason must be one of {', '.join(Reason)}, got {reason[:40]!r}",
                code="bad_reason",
            )
        if expires_in is not None and not 0 < expires_in <= MAX_EXPIRES_IN:
            raise Invalid(f"--expires-in must be 1 to {MAX_EXPIRES_IN} seconds", code="bad_expiry")
        account_id = account_id_of(self, account)
        now = self._now()
        expires = None if expires_in is None else now + expires_in
        with self._write() as db:
            db.execute(
                "INSERT INTO suppressions (account_id, address, reason, source, created, expires)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, address) DO UPDATE SET"
                " reason = excluded.reason, source = excluded.source,"
                " created = excluded.created, expires = excluded.expires",
                (account_id, key, str(reason), source[:200], now, expires),
            )
        return SuppressionRow(
            address=key, reason=str(reason), source=source[:200], created=now, expires=expires
        )

    def remove_suppression(self, account: str, address: str) -> None:
        key = entry_key(address)
        account_id = account_id_of(self, account)
        with self._write() as db:
            gone = db.execute(
                "DELETE FROM suppressions WHERE account_id = ? AND address = ?", (account_id, key)
            ).rowcount
        if not gone:
            raise NotFound(f"{key} is not suppressed for {account}", code="no_such_suppression")

    @read_only
    def list_suppressions(self, account: str) -> list[SuppressionRow]:
        """The account's active entries, by address."""
        account_id = account_id_of(self, account)
        rows = self._read(
            "SELECT * FROM suppressions WHERE account_id = ?"
            " AND (expires IS NULL OR expires > ?) ORDER BY address",
            (account_id, self._now()),
        )
        return [_row(r) for r in rows]

    @read_only
    def suppression_for(self, account_id: int, address: str) -> Suppression | None:
        """The active entry that suppresses `address` for the account: its own, or its
        domain's `*@` entry."""
        key = address.lower()
        rows = self._read(
            "SELECT * FROM suppressions WHERE account_id = ? AND address IN (?, ?)"
            " AND (expires IS NULL OR expires > ?)",
            (account_id, key, f"*@{domain_of(key)}", self._now()),
        )
        if not rows:
            return None
        best = min(rows, key=lambda r: r["address"] != key)  # the address's own first
        return Suppression(
            best["address"],
            best["reason"],
            best["source"],
            int(best["created"]),
            None if best["expires"] is None else int(best["expires"]),
        )

    def prune_suppressions(self) -> int:
        """Delete expired entries (upkeep)."""
        with self._write() as db:
            return int(
                db.execute(
                    "DELETE FROM suppressions WHERE expires IS NOT NULL AND expires <= ?",
                    (self._now(),),
                ).rowcount
            )
