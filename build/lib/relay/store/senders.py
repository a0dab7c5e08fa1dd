"""Senders' balances: what an address may still send, and the operator's changes to it.

A sender's row appears at its first charged message (or a top-up); until then
its balance is `DEFAULT_SEND_BALANCE`. The charge itself is `relay.store.ledger`.
"""

from __future__ import annotations

from typing import TypedDict

from relay.errors import RelayError
from relay.store.db import Connection, Database, Row


class SenderRow(TypedDict):
    address: str
    balance: int
    enabled: bool
    created: int | None
    updated: int | None


class SenderView(SenderRow):
    """A sender as the CLI and API show it: `unlimited` (on the no-limit list, so it
    sends without balance) and `stored` (whether the relay holds a row for it)."""

    unlimited: bool
    stored: bool


class Senders(Database):
    def list_senders(self) -> list[SenderRow]:
        rows = self._read("SELECT address, balance, enabled, created, updated FROM senders")
        return [sender_row(r) for r in sorted(rows, key=lambda r: r["address"])]

    def show_sender(self, address: str) -> SenderRow:
        rows = self._read(
            "SELECT address, balance, enabled, created, updated FROM senders WHERE address = ?",
            (address,),
        )
        if not rows:
            raise RelayError(f"no sender row for {address}")
        return sender_row(rows[0])

    def set_sender(
        self, address: str, *, balance: int | None = None, enabled: bool | None = None
    ) -> SenderRow:
        if balance is not None and balance < 0:
            raise RelayError("a balance cannot be negative")
        now = self._now()
        with self._write() as db:
            db.execute(
                "INSERT INTO senders (address, balance, enabled, created, updated)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO UPDATE SET"
                " balance = COALESCE(?, senders.balance), enabled = COALESCE(?, senders.enabled),"
                " updated = ?",
                (
                    address,
                    balance or 0,
                    1 if enabled is None else int(enabled),
                    now,
                    now,
                    balance,
                    None if enabled is None else int(enabled),
                    now,
                ),
            )
        return self.show_sender(address)

    def topup_sender(self, address: str, amount: int) -> SenderRow:
        now = self._now()
        with self._write() as db:
            # A top-up for a sender who never sent creates the row with it.
            ensure_sender(db, address, 0, now)
            # Conditional, as a charge is: a concurrent charge cannot make it negative.
            cur = db.execute(
                "UPDATE senders SET balance = balance + ?, updated = ?"
                " WHERE address = ? AND balance + ? >= 0",
                (amount, now, address, amount),
            )
            if cur.rowcount != 1:
                raise RelayError(f"a top-up of {amount} would make the balance negative")
        return self.show_sender(address)

    def delete_sender(self, address: str) -> None:
        with self._write() as db:
            cur = db.execute("DELETE FROM senders WHERE address = ?", (address,))
        if cur.rowcount == 0:
            raise RelayError(f"no sender row for {address}")


def sender_row(row: Row) -> SenderRow:
    return SenderRow(
        address=row["address"],
        balance=int(row["balance"]),
        enabled=bool(row["enabled"]),
        created=row["created"],
        updated=row["updated"],
    )


def ensure_sender(db: Connection, address: str, balance: int, ts: int) -> None:
    """Create the sender's row with `balance` unless it exists."""
    db.execute(
        "INSERT INTO senders (address, balance, enabled, created, updated) VALUES (?, ?, 1, ?, ?)"
        " ON CONFLICT (address) DO NOTHING",
        (address, balance, ts, ts),
    )
