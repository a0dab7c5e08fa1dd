"""PostgreSQL's group commit: many writes in one transaction, on several hosts at once.

A group locks its rows in one global order and is run again whole when the
server aborts it (deadlock, serialization failure): each charge is made once,
and a refused one is rolled back alone. Two relay processes stand for two hosts.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator

import aiosmtplib
import pytest
from support import DOMAIN, SENDER, message
from test_concurrency import RelayProcesses, tally

from relay.errors import Refused
from relay.store.accounts import account_id_of
from relay.store.facade import Store
from relay.store.group import Write, commit_group

pytestmark = [pytest.mark.backends, pytest.mark.postgres_only]
OTHER = f"other@{DOMAIN}"


def seeded(database: str) -> tuple[Store, str]:
    store = Store(database)
    store.migrate()
    store.create_account("acme")
    store.add_domain("acme", DOMAIN)
    return store, str(store.create_token("acme")["token"])


def writes(*calls: tuple[object, tuple[object, ...], dict[str, object]]) -> list[Write]:
    loop = asyncio.new_event_loop()
    try:
        return [Write(fn, args, kwargs, loop.create_future()) for fn, args, kwargs in calls]  # type: ignore[arg-type]
    finally:
        loop.close()


def charge(sender: str, account_id: int) -> tuple[object, tuple[object, ...], dict[str, object]]:
    kwargs = {"account_id": account_id, "recipients": 1, "unit": 1, "default_balance": 0}
    return Store.reserve, (sender,), kwargs


def fail_pending_insert(store: Store, nth: int, sqlstate: str) -> None:
    """The `nth` pending row inserted raises `sqlstate` (a sequence, which a rollback
    does not turn back, counts the inserts)."""
    store.db.execute("CREATE SEQUENCE forced_failures")
    store.db.execute(
        "CREATE FUNCTION forced_failure() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF nextval('forced_failures') = {nth} THEN"
        f" RAISE EXCEPTION 'forced' USING ERRCODE = '{sqlstate}'; END IF; RETURN NEW; END $$"
    )
    store.db.execute(
        "CREATE TRIGGER forced_failure BEFORE INSERT ON pending"
        " FOR EACH ROW EXECUTE FUNCTION forced_failure()"
    )


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
def test_a_group_aborted_by_the_server_runs_again_and_charges_each_message_once(
    database_url, sqlstate
):
    store, _ = seeded(database_url)
    try:
        account = account_id_of(store, "acme")
        store.set_sender(SENDER, balance=10)
        store.set_sender(OTHER, balance=10)
        # The second charge's pending row fails: the first charge was made in the
        # same transaction, which the server rolls back with it.
        fail_pending_insert(store, 2, sqlstate)
        group = writes(charge(SENDER, account), charge(OTHER, account), charge(SENDER, account))

        outcomes = commit_group(store, group)

        assert [ok for ok, _ in outcomes] == [True, True, True], outcomes
        assert store.show_sender(SENDER)["balance"] == 8
        assert store.show_sender(OTHER)["balance"] == 9
        assert store.pending_count() == 3
        relay = next(r for r in store.show_limits() if r["scope"] == "relay")
        assert (relay["daily_count"], relay["monthly_count"]) == (3, 3)
        # The first attempt failed at its second insert; the second wrote three.
        tried = store.db.execute("SELECT last_value FROM forced_failures").fetchone()[0]
        assert tried == 5
    finally:
        store.close()


def test_a_refused_charge_in_a_group_is_rolled_back_alone(database_url):
    store, _ = seeded(database_url)
    try:
        account = account_id_of(store, "acme")
        store.set_sender(SENDER, balance=1)
        store.set_sender(OTHER, balance=5)
        group = writes(charge(SENDER, account), charge(SENDER, account), charge(OTHER, account))

        outcomes = commit_group(store, group)

        assert outcomes[0][0] and outcomes[2][0]
        assert isinstance(outcomes[1][1], Refused)
        assert store.show_sender(SENDER)["balance"] == 0
        assert store.show_sender(OTHER)["balance"] == 4
        assert store.pending_count() == 2
        relay = next(r for r in store.show_limits() if r["scope"] == "relay")
        assert relay["daily_count"] == 2
    finally:
        store.close()


def test_a_window_full_in_the_pipelined_charge_rolls_back_its_balance(database_url):
    """The charge's writes go out together; the limit's upsert refusing takes the
    balance's update back with it (the write's savepoint)."""
    store, _ = seeded(database_url)
    try:
        store.set_sender(SENDER, balance=10)
        store.set_limits(account="acme", daily=2, monthly=None)
        group = writes(*(charge(SENDER, account_id_of(store, "acme")) for _ in range(4)))

        outcomes = commit_group(store, group)

        assert [ok for ok, _ in outcomes] == [True, True, False, False]
        assert all(isinstance(v, Refused) and v.hit is not None for _, v in outcomes[2:])
        assert store.show_sender(SENDER)["balance"] == 8
        assert store.pending_count() == 2
    finally:
        store.close()


SESSIONS = 100
BALANCE = 20
DAILY = 45


@pytest.fixture
def relays(database_url, cert_dir, tmp_path) -> Iterator[RelayProcesses]:
    running = RelayProcesses(database_url, cert_dir, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def send_from(ports: list[int], tls: ssl.SSLContext, token: str) -> list[tuple[str, str]]:
    """SESSIONS sessions at once over `ports`, half from SENDER, half from OTHER:
    (sender, reply) each."""

    async def one(port: int, sender: str, n: int) -> tuple[str, str]:
        rcpt = f"r{n}@dest.test"
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, use_tls=True, tls_context=tls, timeout=60
        )
        async with client:
            await client.login("api_token", token)
            try:
                await client.mail(sender)
                await client.rcpt(rcpt)
                response = await client.data(message(to=rcpt, sender=sender))
            except aiosmtplib.SMTPResponseException as exc:
                return sender, f"{exc.code} {exc.message}"
        return sender, f"{response.code} {response.message}"

    async def run() -> list[tuple[str, str]]:
        return await asyncio.gather(
            *(one(ports[n % len(ports)], SENDER if n % 2 else OTHER, n) for n in range(SESSIONS))
        )

    return asyncio.run(run())


@pytest.mark.slow
def test_two_hosts_run_a_balance_and_a_daily_limit_to_their_edge_at_once(
    sink, client_tls, relays, database_url
):
    """Two relays, two senders: SENDER's balance of 20 and the account's daily limit
    of 45 both bind during one burst of grouped writes. The limit is met exactly,
    the balance never overdrawn, each delivered message charged once."""
    store, token = seeded(database_url)
    try:
        store.set_sender(SENDER, balance=BALANCE)
        store.add_nolimit(OTHER)
        store.set_limits(account="acme", daily=DAILY, monthly=None)
        for _ in range(2):
            relays.start(client_tls, sink.smtp_config())

        replies = send_from(relays.ports, client_tls, token)

        delivered, refused = tally([reply for _, reply in replies])
        assert len(delivered) == DAILY, relays.output()
        assert len(sink.messages) == DAILY
        from_sender = sum(1 for s, r in replies if s == SENDER and r.startswith("250"))
        assert from_sender <= BALANCE
        assert store.show_sender(SENDER)["balance"] == BALANCE - from_sender
        assert all(r.startswith(("550 5.7.1 ", "451 4.7.1 ")) for r in refused), set(refused)
        assert store.pending_count() == 0
        rows = {r["scope"]: r for r in store.show_limits()}
        assert (rows["acme"]["daily_count"], rows["acme"]["monthly_count"]) == (DAILY, DAILY)
        assert (rows["relay"]["daily_count"], rows["relay"]["monthly_count"]) == (DAILY, DAILY)
    finally:
        store.close()


def test_an_unlimited_window_is_counted_in_each_relays_own_rows_a_limited_one_shared(
    database_url,
):
    """No relay waits for another's commit to count an unlimited window; once a limit
    is set, the shared row's check counts what the relays' own rows hold."""
    first, _ = seeded(database_url)
    second = Store(database_url)
    try:
        account = account_id_of(first, "acme")
        first.owner, second.owner = "relay-a", "relay-b"
        first.set_sender(SENDER, balance=10)
        kwargs = {"account_id": account, "recipients": 1, "unit": 1, "default_balance": 0}
        a = first.reserve(SENDER, **kwargs)
        second.reserve(SENDER, **kwargs)

        own = first.db.execute(
            "SELECT scope, relay, count FROM relay_counters ORDER BY relay, scope, period"
        ).fetchall()
        assert {(r["scope"], r["relay"]) for r in own} == {
            ("*", "relay-a"),
            (str(account), "relay-a"),
            ("*", "relay-b"),
            (str(account), "relay-b"),
        }
        assert first.db.execute("SELECT count(*) FROM counters").fetchone()[0] == 0
        relay = next(r for r in first.show_limits() if r["scope"] == "relay")
        assert (relay["daily_count"], relay["monthly_count"]) == (2, 2)

        first.settle(a.id, 0, created=a.created)  # undelivered: its own rows give it back
        relay = next(r for r in first.show_limits() if r["scope"] == "relay")
        assert relay["daily_count"] == 1

        first.set_limits(account=None, daily=3, monthly=None)
        first.reserve(SENDER, **kwargs)
        second.reserve(SENDER, **kwargs)
        with pytest.raises(Refused) as refused:
            first.reserve(SENDER, **kwargs)
        assert refused.value.hit is not None and refused.value.hit.limit == 3
        shared = first.db.execute("SELECT scope, count FROM counters ORDER BY scope").fetchall()
        # The relay's day and month both shared now (one has a limit); the account's not.
        assert [(r["scope"], r["count"]) for r in shared] == [("*", 2), ("*", 2)]
        relay = next(r for r in first.show_limits() if r["scope"] == "relay")
        assert relay["daily_count"] == 3
        assert first.show_sender(SENDER)["balance"] == 10 - 4 + 1
    finally:
        second.close()
        first.close()
