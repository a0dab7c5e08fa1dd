"""Admin tokens: the credentials of the admin API, apart from the sending tokens.

Guarantees:
- An admin token is stored only as its SHA-256 hash (as `relay.store.tokens` does);
  the token itself is shown once, at creation, and never written.
- Admin tokens and sending tokens live in separate tables with separate
  prefixes: a sending token (`rlt_`) never authenticates to the admin API, and
  an admin token (`rla_`) never authenticates an SMTP session.
- A lookup finds the row by the hash's index and then compares the hash in
  constant time; revoked and expired tokens authenticate nobody.
"""

from __future__ import annotations

import hmac
import secrets

from relay.errors import NotFound
from relay.store.db import Database, read_only
from relay.store.rows import AdminTokenRow, NewAdminToken
from relay.store.tokens import hash_token

ADMIN_TOKEN_PREFIX = "rla_"  # noqa: S105 - lets secret scanners spot a leaked admin token


class AdminTokens(Database):
    def create_admin_token(
        self, *, name: str = "", expires_in_days: float | None = None
    ) -> NewAdminToken:
        token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = "adm_" + secrets.token_hex(6)
        now = self._now()
        expires = now + int(expires_in_days * 86400) if expires_in_days is not None else None
        with self._write() as db:
            db.execute(
                "INSERT INTO admin_tokens (id, hash, name, created, expires)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_id, hash_token(token), name, now, expires),
            )
        return NewAdminToken(id=token_id, name=name, created=now, expires=expires, token=token)

    def list_admin_tokens(self) -> list[AdminTokenRow]:
        rows = self._read(
            "SELECT id, name, created, expires, revoked FROM admin_tokens ORDER BY created, id"
        )
        return [
            AdminTokenRow(
                id=r["id"],
                name=r["name"],
                created=int(r["created"]),
                expires=r["expires"],
                revoked=r["revoked"],
            )
            for r in rows
        ]

    def revoke_admin_token(self, token_id: str) -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE admin_tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (self._now(), token_id),
            )
        if cur.rowcount == 0:
            raise NotFound(f"no active admin token with id {token_id!r}", code="no_such_token")

    @read_only
    def authenticate_admin(self, token: str) -> str | None:
        """The id of a valid admin token (not unknown, revoked or expired), else None."""
        digest = hash_token(token)
        rows = self._read(
            "SELECT id, hash, expires, revoked FROM admin_tokens WHERE hash = ?", (digest,)
        )
        if not rows or not hmac.compare_digest(rows[0]["hash"], digest):
            return None
        row = rows[0]
        if row["revoked"] is not None:
            return None
        if row["expires"] is not None and row["expires"] <= self._now():
            return None
        return str(row["id"])
