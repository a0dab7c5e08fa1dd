"""The pure policy functions besides the route (test_routing): sender refusal,
cost, send-limit windows, and the exact replies each decision becomes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from relay.config import load_settings
from relay.policy import (
    Channel,
    Route,
    SenderState,
    balance_exhausted,
    balance_short,
    cost,
    free_channel_possible,
    header_sender_denied,
    is_balance_refusal,
    limit_reached,
    no_channel,
    recipients_over_limit,
    sender_disabled,
    sender_domain_denied,
    sender_refusal,
)
from relay.replies import Reply
from relay.windows import UNLIMITED, LimitHit, Window, headroom, period_key, window_reset

CLOUDFLARE = {"CLOUDFLARE_ACCOUNT_ID": "acct-1", "CLOUDFLARE_API_TOKEN": "cf-token"}
PAID = Route(Channel.RESEND, charges=True, rule=2)
FREE = Route(Channel.OUTBOX, charges=False, rule=5)
A = "app@x.test"


@pytest.mark.parametrize(
    ("env", "route", "possible"),
    [
        pytest.param(CLOUDFLARE, PAID, True, id="cloudflare may take verified recipients"),
        pytest.param(CLOUDFLARE, FREE, True, id="cloudflare and a free route"),
        pytest.param({}, FREE, True, id="a free route"),
        pytest.param({}, PAID, False, id="neither"),
    ],
)
def test_free_channel_possible(env, route, possible):
    settings = load_settings({"RELAY_HOSTNAME": "relay.test", **env})
    assert free_channel_possible(settings, route) is possible


EXHAUSTED = Reply(550, "5.7.1", f"Send balance exhausted for {A}; ask the relay admin for a top-up")
DISABLED = Reply(550, "5.7.1", f"Sending is disabled for {A}; ask the relay admin to enable it")


@pytest.mark.parametrize(
    ("balance", "enabled", "unlimited", "free_possible", "refusal"),
    [
        (5, True, False, False, None),
        (1, True, False, False, None),
        (0, True, False, False, EXHAUSTED),
        (-1, True, False, False, EXHAUSTED),
        # RCPT decides when the free channel may still apply.
        (0, True, False, True, None),
        (5, True, False, True, None),
        (5, False, False, False, DISABLED),
        (5, False, False, True, DISABLED),
        (0, False, False, False, DISABLED),
        # The no-limit list is above both.
        (0, True, True, False, None),
        (0, False, True, False, None),
    ],
)
def test_sender_refusal(balance, enabled, unlimited, free_possible, refusal):
    state = SenderState(A, balance=balance, enabled=enabled, unlimited=unlimited)
    assert sender_refusal(state, free_possible) == refusal


@pytest.mark.parametrize(
    ("reply", "counted"),
    [
        (balance_exhausted(A), True),
        (balance_short(A, 1, 2), True),
        (sender_disabled(A), True),
        # The same code for another reason, and the same text under another code.
        (sender_domain_denied("x.test"), False),
        (header_sender_denied(A), False),
        (Reply(451, "4.7.1", f"Send balance exhausted for {A}"), False),
        (Reply(550, "5.7.0", f"Sending is disabled for {A}"), False),
        (Reply(250, "2.1.0", "Ok"), False),
    ],
)
def test_is_balance_refusal(reply, counted):
    assert is_balance_refusal(reply) is counted


@pytest.mark.parametrize(
    ("route", "recipients", "unlimited", "units"),
    [
        (PAID, 3, False, 3),
        (PAID, 1, False, 1),
        (PAID, 3, True, 0),
        (FREE, 3, False, 0),
        (FREE, 3, True, 0),
    ],
)
def test_cost(route, recipients, unlimited, units):
    assert cost(route, recipients, unlimited) == units


@pytest.mark.parametrize(
    ("limit", "used", "room"),
    [(UNLIMITED, 0, None), (UNLIMITED, 99, None), (10, 3, 7), (10, 10, 0), (10, 12, 0), (0, 0, 0)],
)
def test_headroom(limit, used, room):
    assert headroom(limit, used) == room


PLUS_14 = timezone(timedelta(hours=14))
MINUS_5 = timezone(timedelta(hours=-5))


@pytest.mark.parametrize(
    ("now", "day", "month"),
    [
        (datetime(2026, 11, 21, 12, 0, tzinfo=UTC), "d:2026-11-21", "m:2026-11"),
        (datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC), "d:2026-11-30", "m:2026-11"),
        (datetime(2026, 12, 1, 0, 0, tzinfo=UTC), "d:2026-12-01", "m:2026-12"),
        # The window is UTC's whatever zone `now` comes in.
        (datetime(2026, 11, 30, 19, 30, tzinfo=MINUS_5), "d:2026-12-01", "m:2026-12"),
        (datetime(2027, 1, 1, 9, 0, tzinfo=PLUS_14), "d:2026-12-31", "m:2026-12"),
    ],
)
def test_period_key(now, day, month):
    assert period_key(Window.DAY, now) == day
    assert period_key(Window.MONTH, now) == month


@pytest.mark.parametrize(
    ("now", "day_ends", "month_ends"),
    [
        (
            datetime(2026, 11, 21, 15, 4, 5, 123456, tzinfo=UTC),
            datetime(2026, 11, 22, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
        ),
        (
            datetime(2026, 11, 21, 0, 0, tzinfo=UTC),
            datetime(2026, 11, 22, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
        ),
        (
            datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            datetime(2028, 2, 10, 8, 0, tzinfo=UTC),  # a leap year's February
            datetime(2028, 2, 11, tzinfo=UTC),
            datetime(2028, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2027, 2, 28, 8, 0, tzinfo=UTC),
            datetime(2027, 3, 1, tzinfo=UTC),
            datetime(2027, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2026, 11, 30, 19, 30, tzinfo=MINUS_5),  # 2026-12-01 00:30 UTC
            datetime(2026, 12, 2, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
    ],
)
def test_window_reset(now, day_ends, month_ends):
    assert window_reset(Window.DAY, now) == day_ends
    assert window_reset(Window.MONTH, now) == month_ends
    assert window_reset(Window.DAY, now).tzinfo is UTC


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The machine's local zone 14 hours ahead of UTC (a POSIX TZ, no tz database)."""
    monkeypatch.setenv("TZ", "XXX-14")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_windows_do_not_follow_the_machines_zone(far_from_utc):
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)  # 2026-12-01 02:00 at UTC+14
    assert now.astimezone().utcoffset() == timedelta(hours=14)
    assert period_key(Window.DAY, now) == "d:2026-11-30"
    assert period_key(Window.MONTH, now) == "m:2026-11"
    assert window_reset(Window.DAY, now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert window_reset(Window.MONTH, now) == datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("hit", "text"),
    [
        (
            LimitHit("relay", Window.DAY, 500, datetime(2026, 11, 22, tzinfo=UTC)),
            "Daily send limit of 500 reached for the relay; "
            "the window resets at 2026-11-22T00:00:00Z",
        ),
        (
            LimitHit("account acme", Window.MONTH, 10000, datetime(2027, 1, 1, tzinfo=UTC)),
            "Monthly send limit of 10000 reached for the account acme; "
            "the window resets at 2027-01-01T00:00:00Z",
        ),
    ],
)
def test_limit_reached(hit, text):
    assert limit_reached(hit) == Reply(451, "4.7.1", text)


# The calls happen in the test, not at collection: the mutation run forks each
# mutant from a process that has already collected the tests.
@pytest.mark.parametrize(
    ("decision", "args", "code", "enhanced", "text"),
    [
        (
            no_channel,
            ("x.test",),
            451,
            "4.3.0",
            "No upstream channel configured for sender domain x.test",
        ),
        (
            sender_domain_denied,
            ("sub.x.test",),
            550,
            "5.7.1",
            "Sender denied: domain sub.x.test is not onboarded for this token's account"
            " (domains match exactly; a subdomain needs its own entry)",
        ),
        (
            header_sender_denied,
            ("boss@other.test",),
            550,
            "5.7.1",
            "Sender denied: header address boss@other.test is not on a domain of this"
            " token's account",
        ),
        (sender_disabled, (A,), 550, "5.7.1", DISABLED.text),
        (balance_exhausted, (A,), 550, "5.7.1", EXHAUSTED.text),
        (
            balance_short,
            (A, 2, 3),
            550,
            "5.7.1",
            f"Send balance of {A} (2) does not cover 3 recipients",
        ),
        (
            recipients_over_limit,
            (4,),
            451,
            "4.7.1",
            "Send limit allows 4 recipients per message now; send the rest later",
        ),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_policy_replies(decision, args, code, enhanced, text):
    assert decision(*args) == Reply(code, enhanced, text)
