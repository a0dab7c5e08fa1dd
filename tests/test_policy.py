"""The transaction's decisions as tables: MAIL, RCPT and the end of DATA, without sockets."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay import policy, replies
from relay.config import Limits, load_settings
from relay.policy import Channel, MessagePlan, Route, SenderState
from relay.windows import LimitHit, Window

SMTP = load_settings({"SMTP_CONFIG": '{"example.com": {"host": "mx.test", "port": 25}}'})
CLOUDFLARE = load_settings(
    {"CLOUDFLARE_ACCOUNT_ID": "acct", "CLOUDFLARE_API_TOKEN": "cf", "RELAY_HOSTNAME": "r.test"}
)
NOTHING = load_settings({"RELAY_HOSTNAME": "r.test"})
RESET = datetime(2026, 11, 23, tzinfo=UTC)
HIT = LimitHit("relay", Window.DAY, 30, RESET)
RICH = SenderState("app@example.com", balance=10, enabled=True, unlimited=False)
BROKE = SenderState("app@example.com", balance=0, enabled=True, unlimited=False)
ONE_LEFT = SenderState("app@example.com", balance=1, enabled=True, unlimited=False)
OFF = SenderState("app@example.com", balance=10, enabled=False, unlimited=False)
FREE = SenderState("app@example.com", balance=0, enabled=False, unlimited=True)


def mail(settings=SMTP, owner=7, valid=True, sender=RICH, hit=None):
    return policy.decide_mail(
        settings,
        account_id=7,
        domain="example.com",
        domain_owner=owner,
        token_valid=valid,
        sender=sender,
        hit=hit,
    )


@pytest.mark.parametrize(
    ("kwargs", "reply"),
    [
        ({}, "250 2.1.0 Ok"),
        ({"valid": False}, "530 5.7.0 Authentication required: the token was revoked or expired"),
        # An invalid token wins over everything else: the session must AUTH again.
        (
            {"valid": False, "owner": 8, "hit": HIT},
            "530 5.7.0 Authentication required: the token was revoked or expired",
        ),
        (
            {"owner": 8},
            "550 5.7.1 Sender denied: domain example.com is not onboarded for this"
            " token's account (domains match exactly; a subdomain needs its own entry)",
        ),
        (
            {"owner": None},
            "550 5.7.1 Sender denied: domain example.com is not onboarded for this"
            " token's account (domains match exactly; a subdomain needs its own entry)",
        ),
        (
            {"settings": NOTHING},
            "451 4.3.0 No upstream channel configured for sender domain example.com",
        ),
        (
            {"sender": OFF},
            "550 5.7.1 Sending is disabled for app@example.com; ask the relay admin to enable it",
        ),
        (
            {"sender": BROKE},
            "550 5.7.1 Send balance exhausted for app@example.com; ask the relay"
            " admin for a top-up",
        ),
        # Cloudflare's verified channel may still make it free: RCPT decides.
        ({"settings": CLOUDFLARE, "sender": BROKE}, "250 2.1.0 Ok"),
        ({"sender": FREE}, "250 2.1.0 Ok"),
        (
            {"hit": HIT},
            "451 4.7.1 Daily send limit of 30 reached for the relay; the window"
            " resets at 2026-11-23T00:00:00Z",
        ),
        (
            {"sender": BROKE, "hit": HIT},
            "550 5.7.1 Send balance exhausted for app@example.com;"
            " ask the relay admin for a top-up",
        ),
    ],
)
def test_decide_mail(kwargs, reply):
    assert str(mail(**kwargs)) == reply


@pytest.mark.parametrize(
    ("count", "rcpt", "reply"),
    [
        (0, "a@x.test", None),
        (49, "new@x.test", None),
        (49, "r0@x.test", replies.RECIPIENT_OK),  # a duplicate: accepted, not added
        (50, "new@x.test", replies.TOO_MANY_RECIPIENTS),
        (50, "r0@x.test", replies.TOO_MANY_RECIPIENTS),
    ],
)
def test_rcpt_before_lookup(count, rcpt, reply):
    recipients = [f"r{i}@x.test" for i in range(count)]
    assert policy.rcpt_before_lookup(Limits(), recipients, rcpt) == reply


def test_rcpt_count_comes_from_the_limits():
    assert policy.rcpt_before_lookup(Limits(max_recipients=2), ["a@x", "b@x"], "c@x") == (
        replies.TOO_MANY_RECIPIENTS
    )


def rcpt(settings=SMTP, before=1, verified=(), sender=RICH, headroom=None, domain="example.com"):
    return policy.decide_rcpt(
        settings,
        domain=domain,
        recipients=[f"r{i}@dest.test" for i in range(before)],
        rcpt="new@dest.test",
        verified=verified,
        sender=sender,
        headroom=headroom,
    )


@pytest.mark.parametrize(
    ("kwargs", "reply"),
    [
        ({}, "250 2.1.5 Ok"),
        ({"before": 9}, "250 2.1.5 Ok"),  # 10 recipients, balance 10
        (
            {"before": 10},
            "550 5.7.1 Send balance of app@example.com (10) does not cover 11 recipients",
        ),
        # A balance of 1 is short, not exhausted: the reply says how short.
        (
            {"sender": ONE_LEFT, "before": 1},
            "550 5.7.1 Send balance of app@example.com (1) does not cover 2 recipients",
        ),
        (
            {"sender": BROKE, "before": 0},
            "550 5.7.1 Send balance exhausted for app@example.com;"
            " ask the relay admin for a top-up",
        ),
        ({"sender": FREE, "before": 40}, "250 2.1.5 Ok"),
        (
            {"settings": NOTHING},
            "451 4.3.0 No upstream channel configured for sender domain example.com",
        ),
        ({"headroom": 2}, "250 2.1.5 Ok"),
        (
            {"headroom": 1},
            "451 4.7.1 Send limit allows 1 recipients per message now; send the rest later",
        ),
        (
            {"headroom": 0, "before": 0},
            "451 4.7.1 Send limit allows 0 recipients per message now; send the rest later",
        ),
        # Every recipient verified: Cloudflare's free channel, whatever the balance.
        (
            {"settings": CLOUDFLARE, "sender": BROKE, "before": 0, "verified": {"new@dest.test"}},
            "250 2.1.5 Ok",
        ),
        (
            {"settings": CLOUDFLARE, "sender": BROKE, "before": 0},
            "550 5.7.1 Send balance"
            " exhausted for app@example.com; ask the relay admin for a top-up",
        ),
    ],
)
def test_decide_rcpt(kwargs, reply):
    assert str(rcpt(**kwargs)) == reply


@pytest.mark.parametrize(
    ("from_count", "senders", "reply"),
    [
        (1, ("a@example.com",), None),
        (0, (), replies.ONE_FROM_REQUIRED),
        (2, ("a@example.com", "b@example.com"), replies.ONE_FROM_REQUIRED),
        (1, None, replies.UNCLEAN_SENDER_HEADER),
    ],
)
def test_header_refusal(from_count, senders, reply):
    assert policy.header_refusal(from_count, senders) == reply


def test_foreign_header_domains():
    assert policy.foreign_header_domains(
        "example.com", ["a@example.com", "b@Other.test", "c@third.test"]
    ) == frozenset({"other.test", "third.test"})
    assert policy.foreign_header_domains("example.com", ["a@EXAMPLE.com"]) == frozenset()
    # A quoted local part may hold an "@": the domain is after the last one.
    assert policy.foreign_header_domains(
        "example.com", ['"a@victim.test"@example.com', '"b@example.com"@other.test']
    ) == frozenset({"other.test"})


@pytest.mark.parametrize(
    ("senders", "owned", "reply"),
    [
        (["a@example.com"], set(), None),
        (["a@example.com", "b@other.test"], {"other.test"}, None),
        # A quoted local part may hold an "@": the domain is after the last one.
        (['"b@victim.test"@example.com'], set(), None),
        (
            ['"b@example.com"@victim.test'],
            set(),
            "550 5.7.1 Sender denied: header address"
            ' "b@example.com"@victim.test is not on a domain of this token\'s account',
        ),
        (
            ["a@example.com", "b@victim.test"],
            {"other.test"},
            "550 5.7.1 Sender denied: header"
            " address b@victim.test is not on a domain of this token's account",
        ),
    ],
)
def test_header_sender_refusal(senders, owned, reply):
    got = policy.header_sender_refusal("example.com", senders, owned)
    assert (None if got is None else str(got)) == reply


# A single channel configured: its route is the whole chain (nothing to fail over to).
SMTP_ROUTE = Route(Channel.SMTP, charges=True, rule=3)
FREE_CF = Route(Channel.CLOUDFLARE, charges=False, rule=1)
PAID_CF = Route(Channel.CLOUDFLARE, charges=True, rule=4)


@pytest.mark.parametrize(
    ("settings", "verified", "unlimited", "plan"),
    [
        (SMTP, (), False, MessagePlan(SMTP_ROUTE, unit=1, chain=(SMTP_ROUTE,))),
        (SMTP, (), True, MessagePlan(SMTP_ROUTE, unit=0, chain=(SMTP_ROUTE,))),
        (
            CLOUDFLARE,
            ("a@dest.test",),
            False,
            MessagePlan(FREE_CF, unit=0, chain=(FREE_CF,)),
        ),
        (
            CLOUDFLARE,
            (),
            False,
            MessagePlan(PAID_CF, unit=1, chain=(PAID_CF,)),
        ),
        (NOTHING, (), False, policy.no_channel("example.com")),
    ],
)
def test_plan_message(settings, verified, unlimited, plan):
    got = policy.plan_message(
        settings,
        domain="example.com",
        recipients=["a@dest.test"],
        verified=verified,
        unlimited=unlimited,
    )
    assert got == plan


@pytest.mark.parametrize(
    ("kwargs", "reply"),
    [
        (
            {"hit": HIT, "disabled": True},
            "451 4.7.1 Daily send limit of 30 reached for the relay;"
            " the window resets at 2026-11-23T00:00:00Z",
        ),
        (
            {"domain_lost": True, "disabled": True},
            "550 5.7.1 Sender denied: domain example.com is"
            " not onboarded for this token's account (domains match exactly; a subdomain needs its"
            " own entry)",
        ),
        (
            {"disabled": True},
            "550 5.7.1 Sending is disabled for app@example.com; ask the relay admin to enable it",
        ),
        (
            {"balance": 2},
            "550 5.7.1 Send balance of app@example.com (2) does not cover 3 recipients",
        ),
        ({}, "550 5.7.1 Send balance of app@example.com (0) does not cover 3 recipients"),
    ],
)
def test_reservation_refusal(kwargs, reply):
    args = {"balance": None, "disabled": False, "hit": None, "domain_lost": False, **kwargs}
    got = policy.reservation_refusal(
        sender="app@example.com", domain="example.com", recipients=3, **args
    )
    assert str(got) == reply


@pytest.mark.parametrize(
    ("route", "unlimited", "unit", "cost"),
    [
        (Route(Channel.SMTP, charges=True, rule=3), False, 1, 7),
        (Route(Channel.SMTP, charges=True, rule=3), True, 0, 0),
        (Route(Channel.OUTBOX, charges=False, rule=5), False, 0, 0),
    ],
)
def test_unit_cost_and_cost(route, unlimited, unit, cost):
    assert policy.unit_cost(route, unlimited) == unit
    assert policy.cost(route, 7, unlimited) == cost


@pytest.mark.parametrize(
    ("route", "declared", "refused"),
    [
        (Route(Channel.CLOUDFLARE, charges=True, rule=4), None, False),
        (Route(Channel.CLOUDFLARE, charges=True, rule=4), 5_241_856, False),
        (Route(Channel.CLOUDFLARE, charges=True, rule=4), 5_241_857, True),
        # Verified recipients: Cloudflare takes 25 MiB, more than the relay's 5.
        (Route(Channel.CLOUDFLARE, charges=False, rule=1), 5_241_857, False),
        (Route(Channel.SMTP, charges=True, rule=3), 5_242_880, False),
        (Route(Channel.RESEND, charges=True, rule=2), 5_242_880, False),
    ],
)
def test_size_refusal(route, declared, refused):
    got = policy.size_refusal(route, declared)
    assert (got is not None) is refused
    if refused:
        assert str(got) == (
            "552 5.3.4 Message too big for the cloudflare channel: at most 5241856 octets"
        )
