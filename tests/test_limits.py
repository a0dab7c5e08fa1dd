"""Send limits: UTC daily and monthly windows, relay-wide and per account.

The windows as a table over the pure core; the store with a frozen clock; then
the real relay, whose store clock a test freezes and moves, so a window's end is
crossed without waiting for it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from support import DOMAIN, SENDER, FrozenClock, attempt, message

from relay import policy, windows
from relay.errors import RelayError
from relay.store.facade import Refused, Store
from relay.windows import UNLIMITED, LimitHit, Window, period_key, window_reset

pytestmark = pytest.mark.backends


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


# --- the pure core: windows ----------------------------------------------------------

WINDOWS = [
    # (now, daily key, daily reset, monthly key, monthly reset)
    ("mid-month", utc(2026, 11, 21, 13, 5), "d:2026-11-21", utc(2026, 11, 22), "m:2026-11",
     utc(2026, 12, 1)),
    ("exactly midnight", utc(2026, 11, 21), "d:2026-11-21", utc(2026, 11, 22), "m:2026-11",
     utc(2026, 12, 1)),
    ("last second of a day", utc(2026, 11, 21, 23, 59, 59), "d:2026-11-21", utc(2026, 11, 22),
     "m:2026-11", utc(2026, 12, 1)),
    ("30-day month ends", utc(2026, 4, 30, 8), "d:2026-04-30", utc(2026, 5, 1), "m:2026-04",
     utc(2026, 5, 1)),
    ("31-day month ends", utc(2026, 1, 31, 8), "d:2026-01-31", utc(2026, 2, 1), "m:2026-01",
     utc(2026, 2, 1)),
    ("December to January", utc(2026, 12, 31, 23, 59, 59), "d:2026-12-31", utc(2027, 1, 1),
     "m:2026-12", utc(2027, 1, 1)),
    ("leap February 28", utc(2028, 2, 28, 12), "d:2028-02-28", utc(2028, 2, 29), "m:2028-02",
     utc(2028, 3, 1)),
    ("leap February 29", utc(2028, 2, 29, 12), "d:2028-02-29", utc(2028, 3, 1), "m:2028-02",
     utc(2028, 3, 1)),
    ("common February 28", utc(2027, 2, 28, 12), "d:2027-02-28", utc(2027, 3, 1), "m:2027-02",
     utc(2027, 3, 1)),
    ("2100 is not leap", utc(2100, 2, 28, 12), "d:2100-02-28", utc(2100, 3, 1), "m:2100-02",
     utc(2100, 3, 1)),
    ("2000 is leap", utc(2000, 2, 28, 12), "d:2000-02-28", utc(2000, 2, 29), "m:2000-02",
     utc(2000, 3, 1)),
    # Windows are UTC whatever the offset `now` carries.
    ("east of UTC, still yesterday in UTC",
     datetime(2027, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))), "d:2026-12-31",
     utc(2027, 1, 1), "m:2026-12", utc(2027, 1, 1)),
    ("west of UTC, already tomorrow in UTC",
     datetime(2026, 11, 30, 22, 0, tzinfo=timezone(timedelta(hours=-5))), "d:2026-12-01",
     utc(2026, 12, 2), "m:2026-12", utc(2027, 1, 1)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("now", "day_key", "day_reset", "month_key", "month_reset"),
    [case[1:] for case in WINDOWS],
    ids=[case[0] for case in WINDOWS],
)
def test_windows(now, day_key, day_reset, month_key, month_reset):
    assert period_key(Window.DAY, now) == day_key
    assert window_reset(Window.DAY, now) == day_reset
    assert period_key(Window.MONTH, now) == month_key
    assert window_reset(Window.MONTH, now) == month_reset
    assert window_reset(Window.DAY, now).tzinfo == UTC


def test_every_day_of_a_leap_year_resets_at_the_next_utc_midnight():
    day = utc(2028, 1, 1, 18)
    months = set()
    while day.year == 2028:
        reset = window_reset(Window.DAY, day)
        assert reset - day == timedelta(hours=6)
        assert period_key(Window.DAY, reset) != period_key(Window.DAY, day)
        months.add(window_reset(Window.MONTH, day))
        day = reset + timedelta(hours=18)
    assert sorted(months) == [utc(2028, m, 1) for m in range(2, 13)] + [utc(2029, 1, 1)]


@pytest.mark.parametrize(
    ("limit", "used", "room"),
    [(UNLIMITED, 10**6, None), (0, 0, 0), (5, 2, 3), (5, 5, 0), (5, 9, 0)],
)
def test_headroom(limit, used, room):
    assert windows.headroom(limit, used) == room


def test_limit_reached_names_the_window_and_its_utc_reset():
    hit = LimitHit("relay", Window.MONTH, 300, utc(2027, 1, 1))
    assert str(policy.limit_reached(hit)) == (
        "451 4.7.1 Monthly send limit of 300 reached for the relay;"
        " the window resets at 2027-01-01T00:00:00Z"
    )


# --- the store, with a frozen clock ------------------------------------------------------


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(utc(2026, 11, 21, 12))


@pytest.fixture
def store(database_url, clock) -> Iterator[Store]:
    store = Store(database_url, clock=clock)
    store.migrate()
    for name, domain in (("acme", DOMAIN), ("beta", "beta.test")):
        store.create_account(name)
        store.add_domain(name, domain)
    store.set_sender(SENDER, balance=1000)
    yield store
    store.close()


def account_id(store: Store, name: str = "acme") -> int:
    return next(int(a["id"]) for a in store.list_accounts() if a["name"] == name)


def reserve(store: Store, recipients: int = 1, account: str = "acme", unit: int = 0) -> int:
    return store.reserve(
        SENDER,
        account_id=account_id(store, account),
        recipients=recipients,
        unit=unit,
        default_balance=0,
    ).id


def refused(store: Store, recipients: int = 1, account: str = "acme", unit: int = 0) -> LimitHit:
    with pytest.raises(Refused) as caught:
        reserve(store, recipients, account, unit)
    assert caught.value.hit is not None
    return caught.value.hit


def counts(store: Store, scope: str = "relay") -> tuple[int, int]:
    row = next(r for r in store.show_limits() if r["scope"] == scope)
    return row["daily_count"], row["monthly_count"]


def mail_check(store: Store, account: str = "acme") -> tuple[int | None, LimitHit | None]:
    check = store.check_mail(SENDER, DOMAIN, account_id(store, account), 0, False)
    return check.headroom, check.hit


def test_relay_daily_limit_and_the_next_day(store, clock):
    store.set_limits(account=None, daily=2, monthly=None)
    assert mail_check(store) == (2, None)
    reserve(store)
    reserve(store)
    assert refused(store) == LimitHit("relay", Window.DAY, 2, utc(2026, 11, 22))
    assert mail_check(store) == (0, LimitHit("relay", Window.DAY, 2, utc(2026, 11, 22)))
    assert counts(store) == (2, 2)
    # The whole relay: another account is stopped too.
    assert refused(store, account="beta").scope == "relay"

    clock.advance(hours=11, minutes=59, seconds=59)  # 23:59:59, still the same day
    assert refused(store).window is Window.DAY
    clock.advance(seconds=1)
    assert mail_check(store) == (2, None)
    reserve(store, 2)
    assert counts(store) == (2, 4)


def test_multi_recipient_messages_fit_a_window_or_not_at_all(store):
    store.set_limits(account=None, daily=5, monthly=None)
    reserve(store, 3)
    assert mail_check(store) == (2, None)
    assert refused(store, 3).limit == 5
    assert counts(store) == (3, 3)
    reserve(store, 2)
    assert counts(store) == (5, 5)


def test_relay_monthly_limit_across_days_and_into_the_next_month(store, clock):
    store.set_limits(account=None, daily=None, monthly=3)
    clock.now = utc(2026, 12, 30, 9)
    reserve(store, 2)
    clock.advance(days=1)
    reserve(store)
    assert counts(store) == (1, 3)
    assert refused(store) == LimitHit("relay", Window.MONTH, 3, utc(2027, 1, 1))
    clock.now = utc(2027, 1, 1)
    assert mail_check(store) == (3, None)
    reserve(store, 3)
    assert counts(store) == (3, 3)


def test_the_tightest_window_decides(store):
    store.set_limits(account=None, daily=10, monthly=4)
    store.set_limits(account="acme", daily=3, monthly=None)
    assert mail_check(store) == (3, None)
    reserve(store, 2)
    assert mail_check(store) == (1, None)
    reserve(store)
    hit = refused(store)
    assert (hit.scope, hit.window, hit.limit) == ("account", Window.DAY, 3)
    # beta is held by the relay's monthly 4 only.
    assert mail_check(store, "beta") == (1, None)
    reserve(store, account="beta")
    hit = refused(store, account="beta")
    assert (hit.scope, hit.window, hit.limit) == ("relay", Window.MONTH, 4)


def test_per_account_limit_leaves_other_accounts_alone(store):
    store.set_limits(account="acme", daily=1, monthly=None)
    reserve(store)
    assert refused(store).scope == "account"
    for _ in range(5):
        reserve(store, account="beta")
    assert counts(store) == (6, 6)
    assert counts(store, "acme") == (1, 1)


def test_zero_blocks_and_minus_one_is_unlimited(store):
    row = store.set_limits(account=None, daily=0, monthly=None)
    assert (row["daily"], row["monthly"]) == (0, UNLIMITED)
    assert mail_check(store) == (0, LimitHit("relay", Window.DAY, 0, utc(2026, 11, 22)))
    assert refused(store).limit == 0
    store.set_limits(account=None, daily=-1, monthly=None)
    assert mail_check(store) == (None, None)
    reserve(store, 50)
    reserve(store, 50)
    assert counts(store) == (100, 100)


def test_limit_refusal_charges_nothing(store):
    store.set_limits(account=None, daily=1, monthly=None)
    reserve(store, unit=1)
    assert store.show_sender(SENDER)["balance"] == 999
    refused(store, unit=1)
    assert store.show_sender(SENDER)["balance"] == 999
    assert store.pending_count() == 1


def test_set_limits_keeps_what_it_is_not_given(store):
    store.set_limits(account="acme", daily=5, monthly=None)
    row = store.set_limits(account="acme", daily=None, monthly=50)
    assert (row["scope"], row["daily"], row["monthly"]) == ("acme", 5, 50)
    with pytest.raises(RelayError, match="a limit is -1"):
        store.set_limits(account=None, daily=-2, monthly=None)


def test_show_limits(store):
    store.set_limits(account="beta", daily=7, monthly=None)
    reserve(store, 2)
    reserve(store, 1, account="beta")
    assert store.show_limits() == [
        {
            "scope": "relay",
            "daily": UNLIMITED,
            "monthly": UNLIMITED,
            "daily_count": 3,
            "monthly_count": 3,
            "daily_resets_at": "2026-11-22T00:00:00+00:00",
            "monthly_resets_at": "2026-12-01T00:00:00+00:00",
        },
        {
            "scope": "beta",
            "daily": 7,
            "monthly": UNLIMITED,
            "daily_count": 1,
            "monthly_count": 1,
            "daily_resets_at": "2026-11-22T00:00:00+00:00",
            "monthly_resets_at": "2026-12-01T00:00:00+00:00",
        },
    ]


def test_refunds_give_back_the_windows_they_were_counted_in(store, clock):
    store.set_limits(account=None, daily=3, monthly=None)
    first = reserve(store, 3)
    assert store.settle(first, 1) == 0  # unit 0: nothing to refund, but 2 window places
    assert counts(store) == (1, 1)
    late = reserve(store, 2)
    clock.advance(days=1)
    reserve(store, 3)
    store.settle(late, 0)  # settled after midnight: yesterday's window gets it back
    assert counts(store) == (3, 4)
    clock.advance(days=-1)
    assert counts(store) == (1, 4)


# --- through the relay ---------------------------------------------------------------------


@pytest.fixture
def frozen(relay_factory, sink, clock, monkeypatch):
    """The relay, with every store's default clock (the relay's and the admin's) at `clock`.

    The relay builds its stores itself, so the test reaches the clock they
    default to: `datetime.now` as `relay.store.db` sees it.
    """

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return clock.now if tz is None else clock.now.astimezone(tz)

    monkeypatch.setattr("relay.store.db.datetime", FrozenDatetime)
    return relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="100")


def delivered(reply: str) -> bool:
    return reply.startswith("250 2.0.0 Ok <")


DAILY_2 = (
    "451 4.7.1 Daily send limit of 2 reached for the relay;"
    " the window resets at 2026-11-22T00:00:00Z"
)


def test_daily_limit_through_the_relay(frozen, sink, clock):
    frozen.store.set_limits(account=None, daily=2, monthly=None)
    raw = frozen.raw()
    raw.login(frozen.token())
    assert delivered(attempt(raw))
    assert delivered(attempt(raw))
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == DAILY_2
    assert len(sink.messages) == 2
    assert frozen.store.show_sender(SENDER)["balance"] == 98
    assert counts(frozen.store) == (2, 2)
    clock.now = utc(2026, 11, 22)
    assert delivered(attempt(raw))
    assert counts(frozen.store) == (1, 3)


def test_rcpt_beyond_the_headroom_is_451(frozen, sink):
    frozen.store.set_limits(account=None, daily=2, monthly=None)
    raw = frozen.raw()
    raw.login(frozen.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("RCPT TO:<b@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("RCPT TO:<c@dest.test>").startswith("451 4.7.1 Send limit ")
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert delivered(raw.read())
    assert sink.messages[0].rcpt_tos == ["a@dest.test", "b@dest.test"]
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == DAILY_2


def test_rcpt_beyond_the_headroom_says_how_many_fit(frozen):
    frozen.store.set_limits(account=None, daily=2, monthly=None)
    raw = frozen.raw()
    raw.login(frozen.token())
    raw.cmd(f"MAIL FROM:<{SENDER}>")
    raw.cmd("RCPT TO:<a@dest.test>")
    raw.cmd("RCPT TO:<b@dest.test>")
    assert raw.cmd("RCPT TO:<c@dest.test>") == (
        "451 4.7.1 Send limit allows 2 recipients per message now; send the rest later"
    )


def test_window_filled_between_rcpt_and_data_is_451_and_nothing_is_sent(frozen, sink):
    raw = frozen.raw()
    raw.login(frozen.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    frozen.store.set_limits(account="acme", daily=None, monthly=0)
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert raw.read() == (
        "451 4.7.1 Monthly send limit of 0 reached for the account;"
        " the window resets at 2026-12-01T00:00:00Z"
    )
    assert sink.messages == []
    assert frozen.store.list_senders() == []  # the charge rolled back, row and all
    assert frozen.store.pending_count() == 0


def test_counts_after_refunds_through_the_relay(frozen, sink):
    frozen.store.set_limits(account=None, daily=3, monthly=None)
    sink.recorder.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    raw = frozen.raw()
    raw.login(frozen.token())
    assert delivered(attempt(raw, rcpts=("a@dest.test", "gone@dest.test", "b@dest.test")))
    assert counts(frozen.store) == (2, 2)
    sink.recorder.data_reply = "451 4.3.0 try later"
    assert attempt(raw).startswith("451 4.3.0 smtp: upstream deferred")
    assert counts(frozen.store) == (2, 2)
    sink.recorder.data_reply = None
    assert delivered(attempt(raw))
    assert raw.cmd(f"MAIL FROM:<{SENDER}>").startswith("451 4.7.1 Daily send limit of 3")
    assert frozen.store.show_sender(SENDER)["balance"] == 97


def test_database_failure_at_mail_from_is_451_4_3_0(frozen, sink):
    raw = frozen.raw()
    raw.login(frozen.token())
    frozen.store.db.execute("DROP TABLE nolimit")
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == (
        "451 4.3.0 Local error, message deferred; try again later"
    )
    assert sink.messages == []


def test_database_failure_at_end_of_data_is_451_and_nothing_is_sent(frozen, sink):
    raw = frozen.raw()
    raw.login(frozen.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    # The pending table is written last in `reserve`: the charge and the counts
    # before it must roll back with it.
    frozen.store.db.execute("DROP TABLE pending")
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert raw.read() == "451 4.3.0 Local error, message deferred; try again later"
    assert sink.messages == []
    assert frozen.store.list_senders() == []
    assert counts(frozen.store) == (0, 0)
    # The session survives the failure.
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"


@pytest.mark.sqlite_only  # SQLite's write lock; PostgreSQL's writers wait on rows
def test_database_locked_by_another_writer_is_451_4_3_0(relay_factory, sink, monkeypatch):
    # The relay waits out another writer for its store's busy timeout (10 s) and
    # then defers; the timeout is shortened so that the wait takes 0.2 s here.
    monkeypatch.setattr("relay.server.Store", functools.partial(Store, busy_timeout_ms=200))
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config())
    relay.store.set_sender(SENDER, balance=5)
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    relay.store.db.execute("BEGIN IMMEDIATE")
    try:
        raw.send(message() + b".")
        assert raw.read() == "451 4.3.0 Local error, message deferred; try again later"
        # MAIL FROM only reads, so it answers while another process writes.
        assert raw.cmd(f"MAIL FROM:<new@{DOMAIN}>").startswith(
            f"550 5.7.1 Send balance exhausted for new@{DOMAIN}"
        )
    finally:
        relay.store.db.execute("ROLLBACK")
    assert sink.messages == []
    assert relay.store.show_sender(SENDER)["balance"] == 5
    assert relay.store.pending_count() == 0
    assert delivered(attempt(raw))
    assert relay.store.show_sender(SENDER)["balance"] == 4
