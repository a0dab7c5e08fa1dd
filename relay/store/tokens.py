"""API tokens, the SMTP password: issue, list, revoke, authenticate; and each
token's rules (`relay.tokenrules`: senders, networks, rates), kept as one JSON column.

Guarantee: tokens are stored only as SHA-256 hashes; the token itself is never
written. A lookup compares the hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from relay.errors import RelayError
from relay.store.accounts import account_id_of
from relay.store.db import Database, read_only
from relay.store.rows import NewToken, TokenRow
from relay.tokenrules import NO_RULES, TokenRules, load_rules

TOKEN_PREFIX = "rlt_"  # noqa: S105 - lets secret scanners spot a leaked token


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
    networks: tuple[str, ...] = ()  # the client networks it may AUTH from (none: any)


class Tokens(Database):
    def create_token(
        self,
        account: str,
        *,
        name: str = "",
        role: str = "",
        expires_in_days: float | None = None,
        rules: TokenRules = NO_RULES,
    ) -> NewToken:
        account_id = account_id_of(self, account)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_hex(6)
        now = self._now()
        expires = now + int(expires_in_days * 86400) if expires_in_days is not None else None
        with self._write() as db:
            db.execute(
                "INSERT INTO tokens (id, account_id, hash, name, role, created, expires, rules)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (token_id, account_id, hash_token(token), name, role, now, expires, rules.dump()),
            )
        return NewToken(
            id=token_id,
            account=account,
            name=name,
            role=role,
            expires=expires,
            token=token,
            senders=list(rules.senders),
            networks=list(rules.networks),
            rates=[str(r) for r in rules.rates],
            rcpt_rates=[str(r) for r in rules.rcpt_rates],
        )

    def list_tokens(self, account: str | None = None) -> list[TokenRow]:
        if account is None:
            rows = self._read(_TOKENS_SQL + " ORDER BY t.created, t.id")
        else:
            account_id_of(self, account)
            rows = self._read(
                _TOKENS_SQL + " WHERE a.name = ? ORDER BY t.created, t.id", (account,)
            )
        return [_token_row(r) for r in rows]

    def show_token(self, token_id: str) -> TokenRow:
        rows = self._read(_TOKENS_SQL + " WHERE t.id = ?", (token_id,))
        if not rows:
            raise RelayError(f"no token with id {token_id!r}")
        return _token_row(rows[0])

    def set_token_rules(self, token_id: str, rules: TokenRules) -> TokenRow:
        """Replace a token's rules; they apply from its sessions' next MAIL FROM (the
        networks from its next AUTH)."""
        with self._write() as db:
            cur = db.execute("UPDATE tokens SET rules = ? WHERE id = ?", (rules.dump(), token_id))
        if cur.rowcount == 0:
            raise RelayError(f"no token with id {token_id!r}")
        return self.show_token(token_id)

    def revoke_token(self, token_id: str) -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (self._now(), token_id),
            )
        if cur.rowcount == 0:
            raise RelayError(f"no active token with id {token_id!r}")

    @read_only
    def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid token: not unknown, revoked or expired, and of an
        account that is not disabled."""
        digest = hash_token(token)
        rows = self._read(
            "SELECT t.id, t.hash, t.role, t.expires, t.revoked, t.rules, a.id AS account_id,"
            " a.name, a.disabled FROM tokens t JOIN accounts a ON a.id = t.account_id"
            " WHERE t.hash = ?",
            (digest,),
        )
        if not rows:
            return None
        row = rows[0]
        if not hmac.compare_digest(row["hash"], digest):
            return None
        if row["revoked"] is not None:
            return None
        if row["disabled"] is not None:
            # The same None as an unknown token: AUTH answers alike (no oracle).
            return None
        if row["expires"] is not None and row["expires"] <= self._now():
            return None
        networks = load_rules(row["rules"]).networks
        return Principal(row["id"], row["account_id"], row["name"], row["role"], networks)


_TOKENS_SQL = (
    "SELECT t.id, a.name AS account, t.name, t.role, t.created, t.expires, t.revoked, t.rules"
    " FROM tokens t JOIN accounts a ON a.id = t.account_id"
)


def _token_row(r: Any) -> TokenRow:
    rules = load_rules(r["rules"])
    return TokenRow(
        id=r["id"],
        account=r["account"],
        name=r["name"],
        role=r["role"],
        created=int(r["created"]),
        expires=r["expires"],
        revoked=r["revoked"],
        senders=list(rules.senders),
        networks=list(rules.networks),
        rates=[str(x) for x in rules.rates],
        rcpt_rates=[str(x) for x in rules.rcpt_rates],
    )
