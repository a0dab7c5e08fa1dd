"""The group commit: sessions' writes share one SQLite transaction, each in a savepoint.

`AsyncStore` gathers the writes asked for during a few turns of the event loop
and commits them together. What must hold whatever the grouping: each write
gets its own answer; a refused charge rolls back alone and its neighbours
commit; a commit that fails, or a transaction SQLite ends by itself, leaves
nothing of the group written and every write of it answered with the error;
a lock another process holds sends the group, whole and in order, to the
store's thread. Real SQLite files; the statements SQLite ran are read from its
own trace callback.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import DOMAIN, SENDER

from relay.errors import BatchBroken, RelayError, StoreError
from relay.store.facade import Refused, Reservation, Store
from relay.store.group import GROUP_MAX, GROUP_TURNS
from relay.store.loop import AsyncStore

pytestmark = pytest.mark.sqlite_only
NEW = f"new@{DOMAIN}"  # a sender with no row yet


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    database = tmp_path / "relay.db"
    store = Store(database)
    store.migrate()
    store.create_account("acme")  # id 1
    store.add_domain("acme", DOMAIN)
    store.close()
    yield database


def sender(n: int) -> str:
    return f"s{n}@{DOMAIN}"


def charge(aio: AsyncStore, address: str) -> Any:
    return aio.reserve(address, account_id=1, recipients=1, unit=1, default_balance=0)


def traced(aio: AsyncStore) -> list[str]:
    """The statements the inline connection runs from now on (SQLite's trace callback)."""
    statements: list[str] = []
    aio._inline.db.set_trace_callback(statements.append)
    return statements


def commits(statements: list[str]) -> int:
    return sum(1 for s in statements if s.strip().upper() == "COMMIT")


async def gather(*calls: Any) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


def run(path: Path, scenario: Any) -> Any:
    async def main() -> Any:
        aio = AsyncStore(Store(path))
        try:
            return await scenario(aio)
        finally:
            await aio.aclose()

    return asyncio.run(main())


def test_writes_asked_for_together_commit_once_each_with_its_own_answer(path):
    count = 20
    seen: dict[str, Any] = {}

    async def scenario(aio: AsyncStore) -> None:
        for n in range(count):
            aio.sync.set_sender(sender(n), balance=5)
        statements = traced(aio)
        seen["results"] = await gather(*(charge(aio, sender(n)) for n in range(count)))
        seen["commits"] = commits(statements)

    run(path, scenario)
    results = seen["results"]
    assert all(isinstance(r, Reservation) and r.charged == 1 for r in results)
    assert len({r.id for r in results}) == count  # one pending row each
    assert seen["commits"] == 1
    store = Store(path)
    assert [store.show_sender(sender(n))["balance"] for n in range(count)] == [4] * count
    assert store.pending_count() == count
    assert next(s for s in store.show_limits() if s["scope"] == "relay")["daily_count"] == count


def test_a_refused_charge_rolls_back_alone_and_its_neighbours_commit(path):
    seen: dict[str, Any] = {}

    async def scenario(aio: AsyncStore) -> None:
        aio.sync.set_sender(SENDER, balance=3)
        statements = traced(aio)
        # A new sender's row is made by its first charge: refused, it is rolled back.
        calls = [charge(aio, SENDER) for _ in range(5)] + [charge(aio, NEW)]
        seen["results"] = await gather(*calls)
        seen["commits"] = commits(statements)

    run(path, scenario)
    results = seen["results"]
    assert [type(r) for r in results] == [Reservation] * 3 + [Refused] * 3
    assert [r.balance for r in results[3:]] == [0, 0, 0]
    assert seen["commits"] == 1
    store = Store(path)
    assert store.show_sender(SENDER)["balance"] == 0
    with pytest.raises(RelayError, match="no sender row"):
        store.show_sender(NEW)
    assert store.pending_count() == 3
    # The refused ones counted nothing in the send-limit windows either.
    assert next(s for s in store.show_limits() if s["scope"] == "relay")["daily_count"] == 3


def test_a_commit_that_fails_answers_every_write_and_writes_nothing(path):
    # A deferred foreign key is checked at COMMIT: the first charge's pending
    # row adds a dangling reference, so the group's commit fails.
    setup = sqlite3.connect(path)
    setup.executescript(
        """
        CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
        CREATE TRIGGER dangle AFTER INSERT ON pending WHEN NEW.sender = 'bad@acme.test'
        BEGIN INSERT INTO child VALUES (42); END;
        """
    )
    setup.close()
    seen: dict[str, Any] = {}

    async def scenario(aio: AsyncStore) -> None:
        for address in ("bad@acme.test", SENDER):
            aio.sync.set_sender(address, balance=5)
        seen["results"] = await gather(charge(aio, "bad@acme.test"), charge(aio, SENDER))

    run(path, scenario)
    assert [type(r) for r in seen["results"]] == [StoreError, StoreError]
    assert "FOREIGN KEY" in str(seen["results"][0])
    store = Store(path)
    assert store.show_sender(SENDER)["balance"] == 5
    assert store.show_sender("bad@acme.test")["balance"] == 5
    assert store.pending_count() == 0


def test_a_transaction_sqlite_ends_by_itself_leaves_nothing_of_the_group(path):
    # RAISE(ROLLBACK) ends the whole transaction, as a full disk or an I/O
    # error may: the charges before it in the group were rolled back with it.
    setup = sqlite3.connect(path)
    setup.execute(
        "CREATE TRIGGER crash BEFORE INSERT ON pending WHEN NEW.sender = 'bad@acme.test'"
        " BEGIN SELECT RAISE(ROLLBACK, 'disk I/O error'); END"
    )
    setup.close()
    seen: dict[str, Any] = {}
    addresses = (SENDER, "bad@acme.test", sender(2))

    async def scenario(aio: AsyncStore) -> None:
        for address in addresses:
            aio.sync.set_sender(address, balance=5)
        seen["results"] = await gather(*(charge(aio, a) for a in addresses))
        # The store goes on: the next group commits.
        seen["after"] = await charge(aio, SENDER)

    run(path, scenario)
    first, bad, third = seen["results"]
    assert isinstance(first, BatchBroken) and isinstance(third, BatchBroken)
    assert isinstance(bad, StoreError) and "disk I/O error" in str(bad)
    assert isinstance(seen["after"], Reservation)
    store = Store(path)
    assert [store.show_sender(a)["balance"] for a in addresses] == [4, 5, 5]
    assert store.pending_count() == 1


def test_a_lock_held_elsewhere_sends_the_group_to_the_thread_in_order(path):
    seen: dict[str, Any] = {}

    async def scenario(aio: AsyncStore) -> None:
        aio.sync.set_sender(SENDER, balance=10)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's writer
        first = asyncio.ensure_future(charge(aio, SENDER))
        second = asyncio.ensure_future(charge(aio, SENDER))
        for _ in range(GROUP_TURNS + 1):  # the group's turns: it tried inline, and queued
            await asyncio.sleep(0)
        seen["waiting"] = (first.done(), second.done(), aio.queued)
        other.execute("COMMIT")
        other.close()
        seen["results"] = [await first, await second]

    run(path, scenario)
    assert seen["waiting"] == (False, False, 1)  # one group, queued whole
    first, second = seen["results"]
    assert first.id < second.id  # in the order asked
    assert Store(path).show_sender(SENDER)["balance"] == 8


def test_a_group_is_at_most_group_max_writes(path):
    count = GROUP_MAX + 5
    seen: dict[str, Any] = {}

    async def scenario(aio: AsyncStore) -> None:
        aio.sync.set_sender(SENDER, balance=count)
        statements = traced(aio)
        seen["results"] = await gather(*(charge(aio, SENDER) for _ in range(count)))
        seen["commits"] = commits(statements)

    run(path, scenario)
    assert all(isinstance(r, Reservation) for r in seen["results"])
    assert seen["commits"] == 2
    assert Store(path).show_sender(SENDER)["balance"] == 0


def test_writes_wait_on_the_loop_while_the_log_starts_over(path):
    """A RESTART holds writers back: this process's wait on the loop, never in
    SQLite's busy handler, and commit the moment it ends."""
    filler = sqlite3.connect(path, isolation_level=None)
    filler.execute("PRAGMA wal_autocheckpoint = 0")  # as the relay's inline connection
    filler.execute("BEGIN IMMEDIATE")
    filler.executemany(
        "INSERT INTO delivered_keys (key, created) VALUES (?, 0)",
        ((f"{i}{'x' * 1000}",) for i in range(8192)),
    )
    filler.execute("COMMIT")  # kept open: closing the last connection would checkpoint
    seen: dict[str, Any] = {}

    async def scenario(aio: AsyncStore) -> None:
        aio.sync.set_sender(SENDER, balance=5)
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM senders").fetchone()  # a snapshot in the log
        statements = traced(aio)
        assert await aio.upkeep(Store.checkpoint) == "RESTART"  # past the limit
        restart = asyncio.ensure_future(aio.restart_log("RESTART"))
        await asyncio.sleep(0)  # it runs to its first wait: the upkeep thread's
        charged = asyncio.ensure_future(charge(aio, SENDER))
        for _ in range(GROUP_TURNS + 2):
            await asyncio.sleep(0)
        seen["during"] = (charged.done(), [s for s in statements if "BEGIN" in s])
        reader.execute("COMMIT")  # the RESTART was waiting for this reader
        reader.close()
        await restart
        seen["result"] = await charged
        seen["commits"] = commits(statements)

    run(path, scenario)
    filler.close()
    assert seen["during"] == (False, [])
    assert isinstance(seen["result"], Reservation)
    assert seen["commits"] == 1
    assert Store(path).show_sender(SENDER)["balance"] == 4
