"""What the admin onboards: accounts, their sender domains, and the address lists.

A domain belongs to one account only, ever, so no account can send as another's
domain; `move_domain` hands it to another account in one statement, so there is
no moment where both or neither own it. The verified list (recipients the free
Cloudflare channel may reach) and the no-limit list (senders that send without
balance) are plain address sets.

A disabled account (`accounts.disabled`, the time it was disabled) keeps its rows;
its tokens authenticate no more (`Tokens.authenticate`, and the MAIL and charge
check in `relay.store.ledger`), while what the relay already accepted for it (the
durable queue) is still delivered: a 250 is a promise. `delete_account` refuses
while the queue holds the account's messages; otherwise it drops, in one
transaction, the account's tokens, domains, webhooks (with their outbox and
attempts), suppressions and send limits, and keeps the delivery log and the audit
log, which name the account rather than point at its row.
"""

from __future__ import annotations

from relay.errors import RelayError
from relay.store.db import Database, read_only
from relay.store.rows import (
    AccountRow,
    AddressRow,
    DeletedAccount,
    DomainRow,
    NewAccount,
    NewDomain,
)


class DomainAlreadyThere(RelayError):
    """A move to the account that owns the domain already."""


class AccountHasQueued(RelayError):
    """The durable queue holds messages of the account: deleting it now would drop
    messages the relay answered 250 for."""


class Accounts(Database):
    def create_account(self, name: str) -> NewAccount:
        with self._write() as db:
            try:
                row = db.execute(
                    "INSERT INTO accounts (name, created) VALUES (?, ?) RETURNING id",
                    (name, self._now()),
                ).fetchone()
            except self.integrity_errors:
                raise RelayError(f"account {name!r} already exists") from None
        return NewAccount(id=int(row["id"]), name=name)

    def list_accounts(self) -> list[AccountRow]:
        rows = self._read("SELECT id, name, created, queue, disabled FROM accounts ORDER BY id")
        return [
            AccountRow(
                id=int(r["id"]),
                name=r["name"],
                created=int(r["created"]),
                queue=r["queue"],
                disabled=None if r["disabled"] is None else int(r["disabled"]),
            )
            for r in rows
        ]

    def set_account_disabled(self, name: str, disabled: bool) -> bool:
        """Disable (or enable) an account; False when it already was (or was not)."""
        account_id = account_id_of(self, name)
        with self._write() as db:
            if disabled:
                cur = db.execute(
                    "UPDATE accounts SET disabled = ? WHERE id = ? AND disabled IS NULL",
                    (self._now(), account_id),
                )
            else:
                cur = db.execute(
                    "UPDATE accounts SET disabled = NULL WHERE id = ? AND disabled IS NOT NULL",
                    (account_id,),
                )
        return cur.rowcount == 1

    def delete_account(self, name: str) -> DeletedAccount:
        """Delete an account and what only it uses, in one transaction (the module
        docstring says what goes and what stays); `AccountHasQueued` while the queue
        holds its messages."""
        with self._write() as db:
            row = db.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise RelayError(f"no account named {name!r}")
            account_id = int(row["id"])
            # Read in the write transaction: on SQLite no message can be queued
            # meanwhile. On PostgreSQL another host may queue one of a session that
            # passed its charge just before; the queue's worker still delivers it
            # (it needs no account row: the queued row carries what it needs).
            queued = db.execute(
                "SELECT count(*) AS n FROM queue WHERE account_id = ?", (account_id,)
            ).fetchone()["n"]
            if queued:
                raise AccountHasQueued(
                    f"account {name!r} has {queued} queued message(s): cancel them"
                    " (relay queue cancel) or let them finish first"
                )
            tokens = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM tokens WHERE account_id = ? ORDER BY id", (account_id,)
                ).fetchall()
            ]
            domains = [
                r["domain"]
                for r in db.execute(
                    "SELECT domain FROM domains WHERE account_id = ? ORDER BY domain",
                    (account_id,),
                ).fetchall()
            ]
            endpoints = "SELECT id FROM webhook_endpoints WHERE account_id = ?"
            db.execute(
                f"DELETE FROM webhook_attempts WHERE endpoint_id IN ({endpoints})",  # noqa: S608
                (account_id,),
            )
            db.execute(
                f"DELETE FROM webhook_outbox WHERE endpoint_id IN ({endpoints})",  # noqa: S608
                (account_id,),
            )
            webhooks = db.execute(
                "DELETE FROM webhook_endpoints WHERE account_id = ?", (account_id,)
            ).rowcount
            suppressions = db.execute(
                "DELETE FROM suppressions WHERE account_id = ?", (account_id,)
            ).rowcount
            db.execute(
                "DELETE FROM token_rates WHERE token_id IN"
                " (SELECT id FROM tokens WHERE account_id = ?)",
                (account_id,),
            )
            db.execute("DELETE FROM tokens WHERE account_id = ?", (account_id,))
            db.execute("DELETE FROM domains WHERE account_id = ?", (account_id,))
            db.execute("DELETE FROM limits WHERE scope = ?", (str(account_id),))
            db.execute("DELETE FROM counters WHERE scope = ?", (str(account_id),))
            db.execute("DELETE FROM relay_counters WHERE scope = ?", (str(account_id),))
            db.execute("DELETE FROM accounts WHERE id = ?", (account_id,))
        return DeletedAccount(
            name=name,
            tokens=tokens,
            domains=domains,
            webhooks=int(webhooks),
            suppressions=int(suppressions),
        )

    def set_account_queue(self, name: str, mode: str | None) -> None:
        """The account's own RELAY_QUEUE mode (None: the relay's); its next MAIL reads it."""
        with self._write() as db:
            cur = db.execute("UPDATE accounts SET queue = ? WHERE name = ?", (mode, name))
        if cur.rowcount == 0:
            raise RelayError(f"no account named {name!r}")

    def add_domain(self, account: str, domain: str) -> NewDomain:
        domain = domain.strip().lower()
        account_id = account_id_of(self, account)
        with self._write() as db:
            row = db.execute(
                "SELECT account_id FROM domains WHERE domain = ?", (domain,)
            ).fetchone()
            if row is not None:
                # One domain, one account: otherwise two accounts could send as each other.
                raise RelayError(f"domain {domain} is already onboarded on an account")
            try:
                db.execute(
                    "INSERT INTO domains (domain, account_id, created) VALUES (?, ?, ?)",
                    (domain, account_id, self._now()),
                )
            except self.integrity_errors:  # onboarded meanwhile, by another host
                raise RelayError(f"domain {domain} is already onboarded on an account") from None
        return NewDomain(account=account, domain=domain)

    def remove_domain(self, account: str, domain: str) -> None:
        account_id = account_id_of(self, account)
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM domains WHERE domain = ? AND account_id = ?",
                (domain.strip().lower(), account_id),
            )
        if cur.rowcount == 0:
            raise RelayError(f"domain {domain} is not onboarded on account {account!r}")

    def move_domain(self, domain: str, to_account: str) -> str:
        """Hand a domain to another account in one statement; returns the account it
        left. From the next MAIL FROM (and at the charge of a message already past
        it) the old account's tokens are refused the domain, the new one's take it."""
        domain = domain.strip().lower()
        to_id = account_id_of(self, to_account)
        with self._write() as db:
            row = db.execute(
                "SELECT a.id, a.name FROM domains d JOIN accounts a ON a.id = d.account_id"
                " WHERE d.domain = ?",
                (domain,),
            ).fetchone()
            if row is None:
                raise RelayError(f"domain {domain} is not onboarded on any account")
            if int(row["id"]) == to_id:
                raise DomainAlreadyThere(f"domain {domain} is on account {to_account!r} already")
            db.execute(
                "UPDATE domains SET account_id = ? WHERE domain = ? AND account_id = ?",
                (to_id, domain, int(row["id"])),
            )
        return str(row["name"])

    def list_domains(self, account: str | None = None) -> list[DomainRow]:
        sql = (
            "SELECT a.name AS account, d.domain, d.created FROM domains d"
            " JOIN accounts a ON a.id = d.account_id"
        )
        if account is None:
            rows = self._read(sql + " ORDER BY a.name, d.domain")
        else:
            account_id_of(self, account)
            rows = self._read(sql + " WHERE a.name = ? ORDER BY d.domain", (account,))
        return [
            DomainRow(account=r["account"], domain=r["domain"], created=int(r["created"]))
            for r in rows
        ]

    @read_only
    def owned_domains(self, account_id: int, domains: tuple[str, ...]) -> frozenset[str]:
        """Which of `domains` are onboarded on the account."""
        if not domains:
            return frozenset()
        marks = ",".join("?" * len(domains))
        rows = self._read(
            f"SELECT domain FROM domains WHERE account_id = ? AND domain IN ({marks})",  # noqa: S608
            (account_id, *domains),
        )
        return frozenset(r["domain"] for r in rows)

    # --- address lists -----------------------------------------------------------

    def _list_add(self, table: str, address: str) -> None:
        with self._write() as db:
            db.execute(
                f"INSERT INTO {table} (address, created) VALUES (?, ?)"  # noqa: S608 - fixed names
                " ON CONFLICT (address) DO NOTHING",
                (address, self._now()),
            )

    def _list_remove(self, table: str, address: str) -> None:
        with self._write() as db:
            cur = db.execute(f"DELETE FROM {table} WHERE address = ?", (address,))  # noqa: S608
        if cur.rowcount == 0:
            raise RelayError(f"{address} is not on the list")

    def _list(self, table: str) -> list[AddressRow]:
        rows = self._read(f"SELECT address, created FROM {table} ORDER BY address")  # noqa: S608
        return [AddressRow(address=r["address"], created=int(r["created"])) for r in rows]

    def add_verified(self, address: str) -> None:
        self._list_add("verified", address)

    def remove_verified(self, address: str) -> None:
        self._list_remove("verified", address)

    def list_verified(self) -> list[AddressRow]:
        return self._list("verified")

    @read_only
    def verified_among(self, addresses: tuple[str, ...]) -> frozenset[str]:
        if not addresses:
            return frozenset()
        marks = ",".join("?" * len(addresses))
        rows = self._read(f"SELECT address FROM verified WHERE address IN ({marks})", addresses)  # noqa: S608
        return frozenset(r["address"] for r in rows)

    def add_nolimit(self, address: str) -> None:
        self._list_add("nolimit", address)

    def remove_nolimit(self, address: str) -> None:
        self._list_remove("nolimit", address)

    def list_nolimit(self) -> list[AddressRow]:
        return self._list("nolimit")


def account_id_of(database: Database, name: str) -> int:
    rows = database._read("SELECT id FROM accounts WHERE name = ?", (name,))
    if not rows:
        raise RelayError(f"no account named {name!r}")
    return int(rows[0]["id"])
