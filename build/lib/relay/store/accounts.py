"""What the admin onboards: accounts, their sender domains, and the address lists.

A domain belongs to one account only, ever, so no account can send as another's
domain. The verified list (recipients the free Cloudflare channel may reach) and
the no-limit list (senders that send without balance) are plain address sets.
"""

from __future__ import annotations

from relay.errors import RelayError
from relay.store.db import Database, read_only
from relay.store.rows import AccountRow, AddressRow, DomainRow, NewAccount, NewDomain


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
        rows = self._read("SELECT id, name, created, queue FROM accounts ORDER BY id")
        return [
            AccountRow(id=int(r["id"]), name=r["name"], created=int(r["created"]), queue=r["queue"])
            for r in rows
        ]

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
