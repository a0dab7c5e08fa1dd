"""The ledger's guarantees at the store, without sockets: a real SQLite file, a frozen clock.

Balances (set, top up, delete, list), the charge (`reserve`) and what it refuses
with, its `settle`, the sweep of charges a dead process left (`settle_stale`,
`heartbeat`, `retire`) and the send-limit windows. Every effect is read back
through the store's public methods; wire tests of the same rules live in
test_balance.py and test_limits.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from support import DOMAIN, SENDER, FrozenClock

from relay.errors import RelayError
from relay.replies import DELIVERED
from relay.store import ledger
from relay.store.deliveries import DeliveryRecord, Outcome, Query
from relay.store.facade import Refused, Reservation, Store
from relay.store.ledger import OWNER_DEAD_AFTER
from relay.windows import UNLIMITED, LimitHit, Window

START = datetime(2026, 11, 21, 12, tzinfo=UTC)
T0 = int(START.timestamp())
OTHER = f"other@{DOMAIN}"


# The ledger's guarantees hold on both backends (tests/conftest.py, database_url).
pytestmark = pytest.mark.backends


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(START)


@pytest.fixture
def store(database_url, clock) -> Iterator[Store]:
    store = Store(database_url, clock=clock)
    store.migrate()
    store.create_account("acme")  # id 1
    store.add_domain("acme", DOMAIN)
    store.create_account("beta")  # id 2
    store.add_domain("beta", "beta.test")
    yield store
    store.close()


def reserve(store: Store, sender: str = SENDER, **kwargs: Any) -> Reservation:
    args: dict[str, Any] = {"account_id": 1, "recipients": 1, "unit": 1, "default_balance": 0}
    return store.reserve(sender, **(args | kwargs))


def refusal(store: Store, sender: str = SENDER, **kwargs: Any) -> Refused:
    with pytest.raises(Refused) as caught:
        reserve(store, sender, **kwargs)
    return caught.value


def balance(store: Store, address: str = SENDER) -> int:
    return int(store.show_sender(address)["balance"])


def counts(store: Store) -> dict[str, tuple[int, int]]:
    """(daily, monthly) count of every scope show_limits lists."""
    return {s["scope"]: (s["daily_count"], s["monthly_count"]) for s in store.show_limits()}


def record(charged: int = 0) -> DeliveryRecord:
    return DeliveryRecord(
        time=T0,
        message_id="<m@x.test>",
        account="acme",
        token_id="tok_1",
        sender=SENDER,
        recipients=(),
        size=10,
        channel="smtp",
        rule=1,
        outcome=Outcome.DELIVERED,
        reply=DELIVERED,
        charged=charged,
    )


def logged_charges(store: Store) -> list[int]:
    return [r.charged for r in store.find_deliveries(Query())]


# --- senders' balances --------------------------------------------------------------------

# Successive set_sender calls (seconds later each), and the row after each.
SET_SENDER = [
    ([{}], [(0, True)]),
    ([{"balance": 5}], [(5, True)]),
    ([{"enabled": False}], [(0, False)]),
    ([{"balance": 5, "enabled": False}], [(5, False)]),
    # What a later call does not give stays as it was.
    ([{"balance": 5, "enabled": False}, {}], [(5, False), (5, False)]),
    ([{"balance": 5, "enabled": False}, {"balance": 7}], [(5, False), (7, False)]),
    ([{"balance": 5, "enabled": False}, {"enabled": True}], [(5, False), (5, True)]),
    ([{"balance": 5}, {"balance": 0}], [(5, True), (0, True)]),
]


@pytest.mark.parametrize(("calls", "rows"), SET_SENDER)
def test_set_sender(store, clock, calls, rows):
    for step, (kwargs, (expected_balance, expected_enabled)) in enumerate(
        zip(calls, rows, strict=True)
    ):
        row = store.set_sender(SENDER, **kwargs)
        assert row == {
            "address": SENDER,
            "balance": expected_balance,
            "enabled": expected_enabled,
            "created": T0,
            "updated": T0 + step,
        }
        assert store.show_sender(SENDER) == row
        clock.advance(seconds=1)


def test_a_negative_balance_is_refused_and_changes_nothing(store):
    store.set_sender(SENDER, balance=3)
    with pytest.raises(RelayError) as caught:
        store.set_sender(SENDER, balance=-1)
    assert str(caught.value) == "a balance cannot be negative"
    assert balance(store) == 3


def test_list_senders_is_sorted_by_address_with_enabled_as_a_boolean(store, clock):
    for address in ("c@x.test", "a@x.test", "b@x.test"):
        store.set_sender(address, balance=len(address), enabled=address != "b@x.test")
        clock.advance(seconds=1)
    assert store.list_senders() == [
        {
            "address": "a@x.test",
            "balance": 8,
            "enabled": True,
            "created": T0 + 1,
            "updated": T0 + 1,
        },
        {
            "address": "b@x.test",
            "balance": 8,
            "enabled": False,
            "created": T0 + 2,
            "updated": T0 + 2,
        },
        {"address": "c@x.test", "balance": 8, "enabled": True, "created": T0, "updated": T0},
    ]


# amount topped up on (the row's balance, or None: no row), then the balance after.
TOPUPS = [
    (None, 5, 5),
    (None, 0, 0),
    (3, 4, 7),
    (3, -3, 0),
    (3, -1, 2),
]


@pytest.mark.parametrize(("before", "amount", "after"), TOPUPS)
def test_topup(store, clock, before, amount, after):
    if before is not None:
        store.set_sender(SENDER, balance=before, enabled=False)
    clock.advance(seconds=5)
    row = store.topup_sender(SENDER, amount)
    assert row == {
        "address": SENDER,
        "balance": after,
        "enabled": before is None,  # a row the top-up creates is enabled; an edit keeps it
        "created": T0 + (5 if before is None else 0),
        "updated": T0 + 5,
    }
    assert store.list_senders() == [row]


@pytest.mark.parametrize(("before", "amount"), [(None, -1), (3, -4)])
def test_a_topup_below_zero_is_refused_and_changes_nothing(store, before, amount):
    if before is not None:
        store.set_sender(SENDER, balance=before)
    with pytest.raises(RelayError) as caught:
        store.topup_sender(SENDER, amount)
    assert str(caught.value) == f"a top-up of {amount} would make the balance negative"
    assert store.list_senders() == ([] if before is None else [store.show_sender(SENDER)])
    if before is not None:
        assert balance(store) == before


def test_delete_sender(store):
    store.set_sender(SENDER, balance=1)
    store.set_sender(OTHER, balance=2)
    store.delete_sender(SENDER)
    assert [s["address"] for s in store.list_senders()] == [OTHER]
    for missing in (store.delete_sender, store.show_sender):
        with pytest.raises(RelayError) as caught:
            missing(SENDER)
        assert str(caught.value) == f"no sender row for {SENDER}"


# --- the charge -----------------------------------------------------------------------------

# (row before: balance, enabled; or None), unit, recipients, default balance,
# then the balance after and the units charged.
CHARGES = [
    ((10, True), 1, 1, 0, 9, 1),
    ((10, True), 1, 3, 0, 7, 3),
    ((3, True), 1, 3, 0, 0, 3),
    ((10, True), 1, 2, 50, 8, 2),  # a row's balance, not the default
    (None, 1, 2, 5, 3, 2),  # no row: created at the default, then charged
    (None, 1, 5, 5, 0, 5),
    ((10, True), 0, 4, 0, 10, 0),  # unit 0 (a free channel): nothing charged
]


@pytest.mark.parametrize(("row", "unit", "recipients", "default", "after", "charged"), CHARGES)
def test_reserve_charges_unit_per_recipient(store, row, unit, recipients, default, after, charged):
    if row is not None:
        store.set_sender(SENDER, balance=row[0], enabled=row[1])
    reservation = reserve(store, unit=unit, recipients=recipients, default_balance=default)
    assert reservation == Reservation(1, charged)
    assert balance(store) == after
    assert store.pending_count() == 1
    assert counts(store) == {"relay": (recipients, recipients)}


def test_a_free_reservation_creates_no_sender_row(store):
    reserve(store, unit=0, default_balance=5)
    assert store.list_senders() == []


# (row before, or None), recipients, default balance, then what Refused carries.
SHORT = [
    ((2, True), 3, 0, 2, False),
    ((0, True), 1, 0, 0, False),
    ((5, False), 1, 0, 5, True),  # disabled: refused whatever the balance
    (None, 2, 1, 1, False),  # the default cannot cover it either
]


@pytest.mark.parametrize(("row", "recipients", "default", "short_balance", "disabled"), SHORT)
def test_reserve_refuses_what_the_balance_cannot_cover_and_changes_nothing(
    store, row, recipients, default, short_balance, disabled
):
    if row is not None:
        store.set_sender(SENDER, balance=row[0], enabled=row[1])
    before = store.list_senders()
    refused = refusal(store, recipients=recipients, default_balance=default)
    assert str(refused) == f"balance of {SENDER} cannot cover {recipients}"
    assert (refused.balance, refused.disabled, refused.hit) == (short_balance, disabled, None)
    assert (refused.domain_lost, refused.token_invalid) == (False, False)
    assert store.list_senders() == before
    assert store.pending_count() == 0
    assert counts(store) == {"relay": (0, 0)}


@pytest.mark.parametrize(
    ("domain", "account_id"),
    [("gone.test", 1), ("beta.test", 1), (DOMAIN, 2)],
    ids=["not onboarded", "another account's", "moved away"],
)
def test_reserve_refuses_a_domain_the_account_does_not_own(store, domain, account_id):
    store.set_sender(SENDER, balance=5)
    refused = refusal(store, domain=domain, account_id=account_id)
    assert str(refused) == f"domain {domain} left the account"
    assert (refused.domain_lost, refused.token_invalid, refused.disabled) == (True, False, False)
    assert (refused.balance, refused.hit) == (None, None)
    assert (balance(store), store.pending_count()) == (5, 0)


def test_reserve_takes_a_domain_the_account_owns(store):
    store.set_sender(SENDER, balance=5)
    assert reserve(store, domain=DOMAIN) == Reservation(1, 1)


@pytest.mark.parametrize("how", ["revoked", "expired", "unknown"])
def test_reserve_refuses_a_token_no_longer_valid(store, clock, how):
    store.set_sender(SENDER, balance=5)
    token = store.create_token("acme", expires_in_days=1)
    if how == "revoked":
        store.revoke_token(token["id"])
    elif how == "expired":
        clock.advance(days=1)
    token_id = token["id"] if how != "unknown" else "tok_unknown"
    refused = refusal(store, token_id=token_id, domain=DOMAIN)
    assert str(refused) == "the session's token was revoked or expired"
    assert (refused.token_invalid, refused.domain_lost, refused.disabled) == (True, False, False)
    assert (refused.balance, refused.hit) == (None, None)
    assert (balance(store), store.pending_count()) == (5, 0)


def test_reserve_takes_a_valid_token(store, clock):
    store.set_sender(SENDER, balance=5)
    token = store.create_token("acme", expires_in_days=1)
    clock.advance(days=1, seconds=-1)
    assert reserve(store, token_id=token["id"]) == Reservation(1, 1)


# relay (daily, monthly), account (daily, monthly), then the window the first refused
# reservation of 2 recipients hits, after one of 2 was taken.
WINDOWS = [
    ((3, None), (None, None), LimitHit("relay", Window.DAY, 3, datetime(2026, 11, 22, tzinfo=UTC))),
    (
        (None, 3),
        (None, None),
        LimitHit("relay", Window.MONTH, 3, datetime(2026, 12, 1, tzinfo=UTC)),
    ),
    (
        (None, None),
        (3, None),
        LimitHit("account", Window.DAY, 3, datetime(2026, 11, 22, tzinfo=UTC)),
    ),
    (
        (None, None),
        (None, 3),
        LimitHit("account", Window.MONTH, 3, datetime(2026, 12, 1, tzinfo=UTC)),
    ),
    ((3, 3), (3, 3), LimitHit("relay", Window.DAY, 3, datetime(2026, 11, 22, tzinfo=UTC))),
]


@pytest.mark.parametrize(("relay", "account", "hit"), WINDOWS)
def test_reserve_refuses_what_a_window_cannot_take_and_charges_nothing(store, relay, account, hit):
    store.set_sender(SENDER, balance=10)
    store.set_limits(account=None, daily=relay[0], monthly=relay[1])
    store.set_limits(account="acme", daily=account[0], monthly=account[1])
    reserve(store, recipients=2)
    refused = refusal(store, recipients=2)
    assert str(refused) == f"{hit.scope} {hit.window.value} limit 3 reached"
    assert refused.hit == hit
    assert (refused.balance, refused.disabled, refused.domain_lost) == (None, False, False)
    assert refused.token_invalid is False
    assert (balance(store), store.pending_count()) == (8, 1)
    assert counts(store) == {"relay": (2, 2), "acme": (2, 2)}


@pytest.mark.sqlite_only  # SQLite's rowids, its trace callback or its file
def test_a_retry_the_upstream_took_is_a_replay_charged_nothing(store, clock):
    store.set_sender(SENDER, balance=10)
    first = reserve(store, recipients=2, idempotency_key="k1")
    assert store.settle(first.id, 2, idempotency_key="k1") == 0
    clock.advance(hours=1)
    assert reserve(store, recipients=2, idempotency_key="k1") == Reservation(0, 0, replay=True)
    assert (balance(store), store.pending_count()) == (8, 0)
    assert counts(store) == {"relay": (2, 2)}
    # A key nothing was delivered under, and another key, are charged.
    # (Pending ids are SQLite rowids: the settled row's id is free again.)
    assert reserve(store, recipients=1, idempotency_key="k2") == Reservation(1, 1)
    assert balance(store) == 7


@pytest.mark.sqlite_only  # SQLite's rowids, its trace callback or its file
def test_a_key_of_a_message_not_delivered_is_not_remembered(store):
    store.set_sender(SENDER, balance=10)
    first = reserve(store, recipients=2, idempotency_key="k1")
    store.settle(first.id, 0, idempotency_key="k1")
    assert reserve(store, recipients=2, idempotency_key="k1") == Reservation(1, 2)


# --- settling -------------------------------------------------------------------------------

# unit, recipients reserved, recipients delivered; then refund and units kept.
SETTLES = [
    (1, 3, 3, 0, 3),
    (1, 3, 1, 2, 1),
    (1, 3, 0, 3, 0),
    (1, 3, 5, 0, 3),  # never more kept than was reserved
    (0, 3, 1, 0, 0),  # a free channel: nothing to refund or keep
]


@pytest.mark.parametrize(("unit", "recipients", "delivered", "refund", "kept"), SETTLES)
def test_settle_refunds_what_was_not_delivered(store, unit, recipients, delivered, refund, kept):
    store.set_sender(SENDER, balance=10)
    reservation = reserve(store, unit=unit, recipients=recipients)
    assert store.settle(reservation.id, delivered, record=record(charged=99)) == refund
    assert balance(store) == 10 - unit * recipients + refund
    assert logged_charges(store) == [kept]
    assert store.pending_count() == 0
    taken = min(delivered, recipients)
    assert counts(store) == {"relay": (taken, taken)}


def test_a_second_settle_refunds_and_keeps_nothing(store):
    store.set_sender(SENDER, balance=10)
    reservation = reserve(store, recipients=3)
    assert store.settle(reservation.id, 1) == 2
    assert store.settle(reservation.id, 0, record=record(charged=99)) == 0
    assert balance(store) == 9
    assert logged_charges(store) == [0]
    assert counts(store) == {"relay": (1, 1)}


def test_settle_refunds_only_its_own_sender_and_windows(store, clock):
    store.set_limits(account="acme", daily=None, monthly=None)
    store.set_sender(SENDER, balance=10)
    store.set_sender(OTHER, balance=10)
    mine = reserve(store, recipients=3)
    clock.advance(days=1)
    reserve(store, OTHER, recipients=2, account_id=2)
    store.settle(mine.id, 0)
    assert (balance(store), balance(store, OTHER)) == (10, 8)
    # Refunded in the windows it was counted in: yesterday's day, this month.
    assert counts(store) == {"relay": (2, 2), "acme": (0, 0)}
    clock.advance(days=-1)
    assert counts(store) == {"relay": (0, 2), "acme": (0, 0)}


# --- the sweep of a dead process's charges -----------------------------------------------


def pending_row(id_: int, owner: str | None, created: int = T0) -> dict[str, Any]:
    return {
        "id": id_,
        "sender": SENDER,
        "unit": 1,
        "count": 2,
        "scopes": "*,1",
        "day": "d:2026-11-21",
        "month": "m:2026-11",
        "created": created,
        "owner": owner,
        "token": None,  # counted in no token rate window
    }


def test_the_sweep_refunds_rows_older_than_asked_without_a_live_owner(store, clock):
    store.set_sender(SENDER, balance=10)
    reserve(store, recipients=2)
    clock.advance(seconds=30)
    reserve(store, recipients=2)
    clock.advance(seconds=30)
    assert store.settle_stale(older_than=31) == [pending_row(1, None)]
    assert (balance(store), store.pending_count()) == (8, 1)
    assert counts(store) == {"relay": (2, 2)}
    # Exactly `older_than` old is old enough.
    assert store.settle_stale(older_than=30) == [pending_row(2, None, T0 + 30)]
    assert (balance(store), store.pending_count()) == (10, 0)
    assert store.settle_stale(older_than=0) == []


def test_the_sweep_leaves_a_live_owner_its_rows_until_its_heartbeat_is_too_old(store, clock):
    store.set_sender(SENDER, balance=10)
    store.owner = "1-live"
    store.heartbeat()
    reserve(store, recipients=2)
    clock.advance(seconds=OWNER_DEAD_AFTER - 1)
    assert store.settle_stale(older_than=0) == []
    store.heartbeat()  # a beat moves the owner's time of death on
    clock.advance(seconds=OWNER_DEAD_AFTER - 1)
    assert store.settle_stale(older_than=0) == []
    clock.advance(seconds=1)  # OWNER_DEAD_AFTER since the last beat: gone
    assert store.settle_stale(older_than=0) == [pending_row(1, "1-live")]
    assert balance(store) == 10


@pytest.mark.sqlite_only  # SQLite's rowids, its trace callback or its file
def test_a_retired_owner_leaves_its_rows_to_the_sweep_at_once(store):
    store.set_sender(SENDER, balance=10)
    other = Store(store.path, clock=store.clock)
    store.owner, other.owner = "1-me", "2-other"
    for each in (store, other):
        each.heartbeat()
        reserve(each, recipients=2)
    store.retire()
    assert store.settle_stale(older_than=0) == [pending_row(1, "1-me")]
    assert other.settle_stale(older_than=0) == []
    other.retire()
    assert store.settle_stale(older_than=0) == [pending_row(2, "2-other")]
    assert balance(store) == 10
    other.close()


def test_a_process_that_beats_again_after_retiring_is_live_again(store):
    store.set_sender(SENDER, balance=10)
    store.owner = "1-me"
    store.heartbeat()
    store.retire()
    store.heartbeat()
    reserve(store, recipients=2)
    assert store.settle_stale(older_than=0) == []


# --- send limits ------------------------------------------------------------------------------


def test_the_tightest_window_is_the_headroom_whichever_comes_first(store):
    store.set_limits(account=None, daily=2, monthly=None)
    store.set_limits(account="acme", daily=5, monthly=4)
    check = store.check_mail(SENDER, DOMAIN, 1, 0, False)
    assert (check.headroom, check.hit) == (2, None)
    store.set_limits(account=None, daily=9, monthly=3)
    check = store.check_mail(SENDER, DOMAIN, 1, 0, False)
    assert (check.headroom, check.hit) == (3, None)


@pytest.mark.parametrize(
    ("daily", "monthly", "row"),
    [
        (None, None, (UNLIMITED, UNLIMITED)),
        (5, None, (5, UNLIMITED)),
        (None, 7, (UNLIMITED, 7)),
        (0, -1, (0, UNLIMITED)),
    ],
)
def test_set_limits_on_a_new_scope(store, daily, monthly, row):
    assert store.set_limits(account="beta", daily=daily, monthly=monthly) == {
        "scope": "beta",
        "daily": row[0],
        "monthly": row[1],
        "daily_count": 0,
        "monthly_count": 0,
        "daily_resets_at": "2026-11-22T00:00:00+00:00",
        "monthly_resets_at": "2026-12-01T00:00:00+00:00",
    }


def test_set_limits_keeps_each_limit_it_is_not_given(store):
    store.set_limits(account=None, daily=5, monthly=50)
    assert store.set_limits(account=None, daily=None, monthly=60)["daily"] == 5
    assert store.set_limits(account=None, daily=6, monthly=None)["monthly"] == 60
    row = store.show_limits()[0]
    assert (row["scope"], row["daily"], row["monthly"]) == ("relay", 6, 60)


@pytest.mark.parametrize(("daily", "monthly"), [(-2, None), (None, -2), (-5, 3)])
def test_set_limits_refuses_less_than_unlimited(store, daily, monthly):
    with pytest.raises(RelayError) as caught:
        store.set_limits(account=None, daily=daily, monthly=monthly)
    assert str(caught.value) == "a limit is -1 (unlimited), 0 (blocks sending) or more"
    assert store.show_limits()[0]["daily"] == UNLIMITED


def test_show_limits_lists_the_relay_then_accounts_by_id(store, clock):
    store.create_account("gamma")  # id 3
    store.add_domain("gamma", "gamma.test")
    for name in ("gamma", "beta"):
        store.set_limits(account=name, daily=4, monthly=None)
    reserve(store, "x@gamma.test", account_id=3, recipients=2, unit=0)
    clock.now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    reserve(store, "x@gamma.test", account_id=3, recipients=1, unit=0)
    assert [
        (s["scope"], s["daily"], s["daily_count"], s["monthly_count"]) for s in store.show_limits()
    ] == [
        ("relay", UNLIMITED, 1, 1),
        ("beta", 4, 0, 0),
        ("gamma", 4, 1, 1),
    ]
    assert {(s["daily_resets_at"], s["monthly_resets_at"]) for s in store.show_limits()} == {
        ("2027-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00")
    }


@pytest.mark.sqlite_only  # SQLite's rowids, its trace callback or its file
def test_a_late_settle_of_a_swept_reservation_touches_no_other(store, clock):
    """A settle retried after a sweep refunded its row must find nothing (`_settle`: 0, 0).

    The process whose store failed keeps retrying its settle in the background
    (AsyncStore.settle); if its heartbeat failed for OWNER_DEAD_AFTER too, a sweep
    refunds the row in full. SQLite may give the freed id to the next
    reservation: the reservation's `created` names the row with its id.
    """
    store.set_sender(SENDER, balance=10)
    store.set_sender(OTHER, balance=10)
    store.owner = "1-stalled"
    store.heartbeat()
    swept = reserve(store, recipients=2)
    clock.advance(seconds=OWNER_DEAD_AFTER)
    assert [r["id"] for r in store.settle_stale(older_than=0)] == [swept.id]
    store.owner = "2-live"
    store.heartbeat()
    taken = reserve(store, OTHER, recipients=3)
    assert taken.id == swept.id  # SQLite gave the freed id to the next reservation
    assert store.settle(swept.id, 2, created=swept.created) == 0  # the late retry: settled
    assert (balance(store), balance(store, OTHER)) == (10, 7)
    assert store.pending_count() == 1


def test_reserve_checks_a_token_given_without_a_domain(store):
    store.set_sender(SENDER, balance=5)
    token = store.create_token("acme", expires_in_days=1)
    store.revoke_token(token["id"])
    refused = refusal(store, token_id=token["id"])
    assert (refused.token_invalid, refused.domain_lost) == (True, False)
    assert (balance(store), store.pending_count()) == (5, 0)


@pytest.mark.postgres_only  # on SQLite the write lock makes the counts read exact
def test_a_window_a_stale_read_missed_is_refused_by_the_upsert(store, monkeypatch):
    """On PostgreSQL the counts `reserve` reads may be stale; the upsert's condition decides.

    `read_windows` is made to report every window unused, as a read before another
    host's commit would: the limit itself must still refuse, with the window hit,
    and roll the charge and the pending row back.
    """
    store.set_sender(SENDER, balance=10)
    store.set_limits(account="acme", daily=3, monthly=None)
    reserve(store, recipients=2)
    fresh = ledger.read_windows

    def stale(*args: Any) -> list[tuple[str, Window, int, int]]:
        return [(label, window, limit, 0) for label, window, limit, _ in fresh(*args)]

    monkeypatch.setattr(ledger, "read_windows", stale)
    refused = refusal(store, recipients=2)
    assert str(refused) == "account daily limit 3 reached"
    assert refused.hit == LimitHit("account", Window.DAY, 3, datetime(2026, 11, 22, tzinfo=UTC))
    assert (balance(store), store.pending_count()) == (8, 1)
    assert counts(store) == {"relay": (2, 2), "acme": (2, 2)}


@pytest.mark.sqlite_only  # SQLite's rowids, its trace callback or its file
def test_settle_refunds_the_account_windows_before_the_relay_ones(store):
    """The lock order of `reserve` (module docstring): the account's rows, then the relay's."""
    store.set_sender(SENDER, balance=10)
    reservation = reserve(store, recipients=2)
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    store.settle(reservation.id, 0)
    store.db.set_trace_callback(None)
    refunded = [s.split("WHERE scope = ")[1] for s in statements if "UPDATE counters" in s]
    assert refunded == [
        "'1' AND period = 'd:2026-11-21'",
        "'1' AND period = 'm:2026-11'",
        "'*' AND period = 'd:2026-11-21'",
        "'*' AND period = 'm:2026-11'",
    ]


def test_the_sweep_dates_its_refund_now(store, clock):
    store.set_sender(SENDER, balance=10)
    reserve(store, recipients=2)
    clock.advance(seconds=30)
    assert len(store.settle_stale(older_than=0)) == 1
    assert (balance(store), store.show_sender(SENDER)["updated"]) == (10, T0 + 30)


@pytest.mark.sqlite_only  # SQLite's rowids, its trace callback or its file
def test_the_sweep_leaves_a_reservation_that_took_a_swept_id_meanwhile(store, clock, monkeypatch):
    """Between the sweep's read and its settle, another host may sweep the row and
    the next reservation take its id (SQLite reuses a freed rowid): the sweep's
    settle names the row by its id and creation time, and leaves the new one."""
    store.set_sender(SENDER, balance=10)
    store.set_sender(OTHER, balance=10)
    swept = reserve(store, recipients=2)
    clock.advance(seconds=30)
    other = Store(store.path, clock=store.clock)
    other.owner = "2-live"
    other.heartbeat()
    read = store._read
    taken: list[Reservation] = []

    def racing(sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        rows = read(sql, args)
        if sql.startswith("SELECT * FROM pending") and not taken:
            assert [r["id"] for r in other.settle_stale(older_than=0)] == [swept.id]
            taken.append(reserve(other, OTHER, recipients=3))
        return rows

    monkeypatch.setattr(store, "_read", racing)
    assert store.settle_stale(older_than=0) == []
    assert taken[0].id == swept.id
    assert (balance(store), balance(store, OTHER)) == (10, 7)
    assert store.pending_count() == 1
    other.close()


@pytest.mark.postgres_only  # on SQLite the write lock makes first charges take turns
def test_a_first_charge_that_races_another_hosts_is_charged_by_its_balance(store, database_url):
    """Two hosts charge a sender that has no row yet. The one whose insert of the
    row loses (the other host made it meanwhile) charges that row, by its balance."""
    import psycopg

    outcome: list[object] = []

    def charge() -> None:
        try:
            outcome.append(reserve(store))
        except Exception as exc:  # the assertion below names it
            outcome.append(exc)

    with psycopg.connect(database_url, autocommit=True) as watcher:
        with psycopg.connect(database_url) as other, other.transaction():
            # The other host's first charge has made the row, not yet committed.
            other.execute(
                "INSERT INTO senders (address, balance, enabled, created, updated)"
                " VALUES (%s, 5, 1, %s, %s)",
                (SENDER, T0, T0),
            )
            charging = threading.Thread(target=charge)
            charging.start()
            # This charge finds no row it can see, and its insert waits on that one.
            deadline = time.monotonic() + 10
            while not watcher.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "the charge never waited on the row"
                time.sleep(0.01)
        charging.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], Reservation), outcome
    assert balance(store) == 4
