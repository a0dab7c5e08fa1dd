"""API tokens, the SMTP password: issue, list, revoke, authenticate.

Guarantee: tokens are stored only as SHA-256 hashes; the token itself is never
written. A lookup compares the hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from relay.errors import RelayError
from relay.store.accounts import account_id_of
from relay.store.db import Database, read_only
from relay.store.rows import NewToken, TokenRow

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


class Tokens(Database):
    def create_token(
        self, account: str, *, name: str = "", role: str = "", expires_in_days: float | None = None
    ) -> NewToken:
        account_id = account_id_of(self, account)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_hex(6)
        now = self._now()
        expires = now + int(expires_in_days * 86400) if expires_in_days is not None else None
        with self._write() as db:
            db.execute(
                "INSERT INTO tokens (id, account_id, hash, name, role, created, expires)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, account_id, hash_token(token), name, role, now, expires),
            )
        return NewToken(
            id=token_id, account=account, name=name, role=role, expires=expires, token=token
        )

    def list_tokens(self, account: str | None = None) -> list[TokenRow]:
        sql = (
            "SELECT t.id, a.name AS account, t.name, t.role, t.created, t.expires, t.revoked"
            " FROM tokens t JOIN accounts a ON a.id = t.account_id"
        )
        if account is None:
            rows = self._read(sql + " ORDER BY t.created, t.id")
        else:
            account_id_of(self, account)
            rows = self._read(sql + " WHERE a.name = ? ORDER BY t.created, t.id", (account,))
        return [
            TokenRow(
                id=r["id"],
                account=r["account"],
                name=r["name"],
                role=r["role"],
                created=int(r["created"]),
                expires=r["expires"],
                revoked=r["revoked"],
            )
            for r in rows
        ]

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
        """The principal of a valid token: not unknown, revoked or expired."""
        digest = hash_token(token)
        rows = self._read(
            "SELECT t.id, t.hash, t.role, t.expires, t.revoked, a.id AS account_id, a.name"
            " FROM tokens t JOIN accounts a ON a.id = t.account_id WHERE t.hash = ?",
            (digest,),
        )
        if not rows:
            return None
        row = rows[0]
        if not hmac.compare_digest(row["hash"], digest):
            return None
        if row["revoked"] is not None:
            return None
        if row["expires"] is not None and row["expires"] <= self._now():
            return None
        return Principal(row["id"], row["account_id"], row["name"], row["role"])
