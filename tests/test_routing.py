"""The send-channel priority (`policy.choose_route`) as a table: no sockets, no store.

Each row is the settings (built from environment variables, as the relay reads
them), the sender domain, the envelope recipients and the verified list, and the
route the documented order gives (docs/channels.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from relay.config import Settings, load_settings
from relay.policy import Channel, Route, choose_route

VERIFIED = "verified@dest.test"
VERIFIED_TOO = "also-verified@dest.test"
UNVERIFIED = "stranger@dest.test"

CLOUDFLARE = {"CLOUDFLARE_ACCOUNT_ID": "acct-1", "CLOUDFLARE_API_TOKEN": "cf-token"}
RESEND = {"RESEND_TOKEN": "re_global"}
RESEND_EXAMPLE = {"RESEND_TOKEN_EXAMPLE_COM": "re_example"}
OUTBOX = {"RELAY_DEV_OUTBOX": "outbox"}


def smtp(*domains: str) -> dict[str, str]:
    return {"SMTP_CONFIG": json.dumps({d: {"host": "smtp.test", "port": 587} for d in domains})}


SMTP = smtp("example.com")

FREE_CLOUDFLARE = Route(Channel.CLOUDFLARE, charges=False, rule=1)
RESEND_ROUTE = Route(Channel.RESEND, charges=True, rule=2)
SMTP_ROUTE = Route(Channel.SMTP, charges=True, rule=3)
PAID_CLOUDFLARE = Route(Channel.CLOUDFLARE, charges=True, rule=4)
OUTBOX_ROUTE = Route(Channel.OUTBOX, charges=False, rule=5)


def settings(env: Mapping[str, str]) -> Settings:
    return load_settings({"RELAY_HOSTNAME": "relay.test", **env})


ROUTES: list[tuple[str, dict[str, str], str, tuple[str, ...], set[str], Route | None]] = [
    # rule 1: Cloudflare, free, when every recipient is verified
    ("1: all verified", CLOUDFLARE, "example.com", (VERIFIED,), {VERIFIED}, FREE_CLOUDFLARE),
    (
        "1: beats resend and smtp",
        {**CLOUDFLARE, **RESEND, **SMTP},
        "example.com",
        (VERIFIED, VERIFIED_TOO),
        {VERIFIED, VERIFIED_TOO},
        FREE_CLOUDFLARE,
    ),
    (
        "1: one unverified recipient is enough to lose it",
        {**CLOUDFLARE, **RESEND},
        "example.com",
        (VERIFIED, UNVERIFIED),
        {VERIFIED},
        RESEND_ROUTE,
    ),
    (
        "1: empty verified set",
        CLOUDFLARE,
        "example.com",
        (VERIFIED,),
        set(),
        PAID_CLOUDFLARE,
    ),
    (
        "1: no recipients yet is not 'all verified'",
        CLOUDFLARE,
        "example.com",
        (),
        {VERIFIED},
        PAID_CLOUDFLARE,
    ),
    (
        "1: needs cloudflare configured",
        {**RESEND},
        "example.com",
        (VERIFIED,),
        {VERIFIED},
        RESEND_ROUTE,
    ),
    ("1: verified alone is no channel", {}, "example.com", (VERIFIED,), {VERIFIED}, None),
    # rule 2: Resend, when a token serves the sender domain
    ("2: global token", RESEND, "example.com", (UNVERIFIED,), set(), RESEND_ROUTE),
    ("2: per-domain token", RESEND_EXAMPLE, "example.com", (UNVERIFIED,), set(), RESEND_ROUTE),
    (
        "2: per-domain token serves only its domain",
        {**RESEND_EXAMPLE, **smtp("other.test")},
        "other.test",
        (UNVERIFIED,),
        set(),
        SMTP_ROUTE,
    ),
    (
        "2: per-domain token is exact, not for a subdomain",
        RESEND_EXAMPLE,
        "sub.example.com",
        (UNVERIFIED,),
        set(),
        None,
    ),
    ("2: beats smtp", {**RESEND, **SMTP}, "example.com", (UNVERIFIED,), set(), RESEND_ROUTE),
    (
        "2: beats paid cloudflare",
        {**RESEND, **CLOUDFLARE},
        "example.com",
        (UNVERIFIED,),
        set(),
        RESEND_ROUTE,
    ),
    # rule 3: upstream SMTP, when SMTP_CONFIG has the sender domain
    ("3: smtp for the domain", SMTP, "example.com", (UNVERIFIED,), set(), SMTP_ROUTE),
    (
        "3: beats paid cloudflare",
        {**SMTP, **CLOUDFLARE},
        "example.com",
        (UNVERIFIED,),
        set(),
        SMTP_ROUTE,
    ),
    (
        "3: config key matched case-insensitively",
        smtp("Example.COM"),
        "example.com",
        (UNVERIFIED,),
        set(),
        SMTP_ROUTE,
    ),
    ("3: exact, no subdomain", SMTP, "sub.example.com", (UNVERIFIED,), set(), None),
    ("3: exact, no parent", smtp("sub.example.com"), "example.com", (UNVERIFIED,), set(), None),
    ("3: exact, no suffix", SMTP, "myexample.com", (UNVERIFIED,), set(), None),
    ("3: exact, no prefix", SMTP, "example.co", (UNVERIFIED,), set(), None),
    # rule 4: Cloudflare, paid, otherwise
    ("4: cloudflare otherwise", CLOUDFLARE, "example.com", (UNVERIFIED,), set(), PAID_CLOUDFLARE),
    (
        "4: smtp of another domain does not count",
        {**CLOUDFLARE, **smtp("other.test")},
        "example.com",
        (UNVERIFIED,),
        set(),
        PAID_CLOUDFLARE,
    ),
    (
        "4: resend token of another domain does not count",
        {**CLOUDFLARE, "RESEND_TOKEN_OTHER_TEST": "re_other"},
        "example.com",
        (UNVERIFIED,),
        set(),
        PAID_CLOUDFLARE,
    ),
    # rule 5: the development outbox, only when asked for, and last
    ("5: dev outbox", OUTBOX, "example.com", (UNVERIFIED,), set(), OUTBOX_ROUTE),
    ("5: last", {**OUTBOX, **SMTP}, "example.com", (UNVERIFIED,), set(), SMTP_ROUTE),
    (
        "5: after paid cloudflare",
        {**OUTBOX, **CLOUDFLARE},
        "x.test",
        (UNVERIFIED,),
        set(),
        PAID_CLOUDFLARE,
    ),
    # None: the session answers 451 4.3.0 naming the domain
    ("none: nothing configured", {}, "example.com", (UNVERIFIED,), set(), None),
    ("none: another domain's smtp", smtp("other.test"), "example.com", (UNVERIFIED,), set(), None),
    ("none: empty resend token", {"RESEND_TOKEN": ""}, "example.com", (UNVERIFIED,), set(), None),
]


@pytest.mark.parametrize(
    ("env", "domain", "recipients", "verified", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in ROUTES],
)
def test_choose_route(
    env: dict[str, str],
    domain: str,
    recipients: tuple[str, ...],
    verified: set[str],
    expected: Route | None,
) -> None:
    assert choose_route(settings(env), domain, recipients, verified) == expected


@pytest.mark.parametrize(
    ("env", "domain", "token"),
    [
        pytest.param({**RESEND, **RESEND_EXAMPLE}, "example.com", "re_example", id="domain wins"),
        pytest.param({**RESEND, **RESEND_EXAMPLE}, "other.test", "re_global", id="global else"),
        pytest.param(
            {**RESEND, **RESEND_EXAMPLE}, "sub.example.com", "re_global", id="subdomain: global"
        ),
        pytest.param(RESEND_EXAMPLE, "Example.COM", "re_example", id="domain case-insensitive"),
        pytest.param(
            {"RESEND_TOKEN_example_com": "re_lower"}, "example.com", "re_lower", id="name lower"
        ),
        pytest.param(
            {"RESEND_TOKEN_MAIL_EXAMPLE_COM": "re_sub", **RESEND},
            "mail.example.com",
            "re_sub",
            id="subdomain has its own",
        ),
    ],
)
def test_per_domain_resend_token_wins(env: dict[str, str], domain: str, token: str) -> None:
    resend = settings(env).resend
    assert resend.token_for(domain) == token
    assert choose_route(settings(env), domain, (UNVERIFIED,), ()) == RESEND_ROUTE


def test_smtp_rule_folds_the_case_of_the_sender_domain_as_rule_2_does() -> None:
    assert choose_route(settings(SMTP), "Example.COM", (UNVERIFIED,), ()) == SMTP_ROUTE


def test_recipients_and_verified_may_be_any_iterable() -> None:
    route = choose_route(
        settings(CLOUDFLARE),
        "example.com",
        iter([VERIFIED, VERIFIED]),
        (a for a in [VERIFIED]),
    )
    assert route == FREE_CLOUDFLARE
