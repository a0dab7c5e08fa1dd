"""What one token may do: its sender scope, its rates, its client networks.

The rules as a table over the pure core (`relay.tokenrules`); the store with a
frozen clock (the count in the charge's transaction, the give-back at the
settle and the sweep); then the real relay over TLS: exact replies, what
reached the sink, the balance after, the operator's log and the metrics.
The admin API and CLI round trips and the two-process count are at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from support import DOMAIN, SENDER, FrozenClock, Raw, attempt, message, plain
from test_adminapi import Admin
from test_cli import ok, relay_cli
from test_concurrency import RelayProcesses, send_one, tally
from test_console import browser  # noqa: F401 - the fixture: a headless Chromium

from relay import metrics
from relay.store.facade import Refused, Store
from relay.tokenrules import (
    BadRule,
    Rate,
    RateUse,
    TokenRules,
    Unit,
    load_rules,
    network_allowed,
    parse_network,
    parse_rate,
    parse_rates,
    parse_senders,
    rate_hit,
    rules_of,
    sender_allowed,
)

pytestmark = pytest.mark.backends
BILLING = f"billing@{DOMAIN}"
CEO = f"ceo@{DOMAIN}"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# --- the pure core ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("60/min", "60/minute"),
        ("1000/day", "1000/day"),
        ("5 / H", "5/hour"),
        ("2/m", "2/minute"),
        ("1/d", "1/day"),
        ("1000000000/minute", "1000000000/minute"),
    ],
)
def test_a_rate_is_a_count_per_minute_hour_or_day(text, shown):
    assert str(parse_rate(text)) == shown


@pytest.mark.parametrize(
    "text",
    ["0/min", "60", "60/week", "-1/min", "1/min/2", "1000000001/day", "x/min", "/min", ""],
)
def test_a_bad_rate_is_one_clean_line(text):
    with pytest.raises(BadRule) as caught:
        parse_rate(text)
    assert caught.value.code == "bad_rate"
    assert "\n" not in str(caught.value)


def test_one_rate_per_unit_kept_in_the_lock_order():
    assert [str(r) for r in parse_rates(["1000/day", "60/min"])] == ["60/minute", "1000/day"]
    with pytest.raises(BadRule, match="two limits per minute"):
        parse_rates(["5/min", "6/m"])


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("::1", "::1/128"),
    ],
)
def test_a_network_is_a_cidr_range(text, shown):
    assert parse_network(text) == shown


@pytest.mark.parametrize("text", ["300.1.1.1/8", "10.0.0.1/8", "fe80::/129", "example.com", ""])
def test_a_bad_network_is_refused(text):
    with pytest.raises(BadRule) as caught:
        parse_network(text)
    assert caught.value.code == "bad_network"


def test_senders_only_narrow_the_accounts_domains():
    owned = [DOMAIN, "b.test"]
    assert parse_senders(["Billing@Example.com", "*@b.test", "example.com"], owned) == (
        BILLING,
        "*@b.test",
        DOMAIN,
    )
    for bad in ("ceo@other.test", "*@other.test", "other.test", "not an address", "*@"):
        with pytest.raises(BadRule) as caught:
            parse_senders([bad], owned)
        assert caught.value.code == "bad_sender"


@pytest.mark.parametrize(
    ("senders", "address", "allowed"),
    [
        ((), CEO, True),
        ((BILLING,), BILLING, True),
        ((BILLING,), "BILLING@EXAMPLE.COM", True),
        ((BILLING,), CEO, False),
        ((f"*@{DOMAIN}",), CEO, True),
        ((DOMAIN,), CEO, True),
        ((DOMAIN,), "ceo@sub.example.com", False),
        ((BILLING, "*@b.test"), "x@b.test", True),
    ],
)
def test_sender_scope(senders, address, allowed):
    assert sender_allowed(senders, address) is allowed


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        ((), "203.0.113.9", True),
        (("10.0.0.0/8",), "127.0.0.1", False),
        (("10.0.0.0/8",), "10.200.0.1", True),
        (("10.0.0.0/8", "127.0.0.0/8"), "127.0.0.1", True),
        (("2001:db8::/32",), "2001:db8:1::5", True),
        (("2001:db8::/32",), "2001:db9::5", False),
        (("2001:db8::/32",), "10.0.0.1", False),
        (("10.0.0.0/8",), "::ffff:10.1.2.3", True),  # an IPv4 client of a dual-stack listener
        (("fe80::/10",), "fe80::1%eth0", True),
        (("10.0.0.0/8",), "", False),  # no IP address: no range holds it
        (("10.0.0.0/8",), "/run/relay.sock", False),
    ],
)
def test_client_networks(networks, address, allowed):
    assert network_allowed(networks, address) is allowed


def test_rate_windows_are_the_utc_minute_hour_and_day():
    rules = TokenRules(rates=(Rate(2, Unit.MINUTE), Rate(5, Unit.DAY)))
    now = int(utc(2026, 11, 21, 12, 0, 10).timestamp())
    minute = now - 10
    used = {Unit.MINUTE: RateUse(minute, 2, 2), Unit.DAY: RateUse(now - 43210, 2, 2)}
    hit = rate_hit(rules, used, 1, 1, now)
    assert hit is not None and (hit.what, str(hit.rate), hit.retry) == ("messages", "2/minute", 50)
    # The minute that ended counts nothing.
    assert rate_hit(rules, {Unit.MINUTE: RateUse(minute - 60, 2, 2)}, 1, 1, now) is None
    # Of two full windows, the one that ends last: waiting for it is what helps.
    used[Unit.DAY] = RateUse(now - 43210, 5, 5)
    hit = rate_hit(rules, used, 1, 1, now)
    assert hit is not None and (str(hit.rate), hit.retry) == ("5/day", 43190)


def test_rules_survive_the_store_column():
    rules = rules_of([BILLING], ["10.0.0.0/8"], ["60/minute"], ["5/day"])
    assert load_rules(rules.dump()) == rules
    assert TokenRules().dump() == ""
    assert load_rules("") == TokenRules()


# --- the store, with a frozen clock -------------------------------------------------------


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(utc(2026, 11, 21, 12, 0, 10))


@pytest.fixture
def store(database_url, clock) -> Iterator[Store]:
    store = Store(database_url, clock=clock)
    store.migrate()
    store.create_account("acme")
    store.add_domain("acme", DOMAIN)
    store.set_sender(SENDER, balance=1000)
    yield store
    store.close()


def limited(store: Store, **lists: list[str]) -> str:
    return store.create_token("acme", rules=rules_of(**lists))["id"]


def reserve(store: Store, token_id: str, recipients: int = 1, sender: str = SENDER, unit: int = 1):
    account = next(a["id"] for a in store.list_accounts() if a["name"] == "acme")
    return store.reserve(
        sender,
        account_id=account,
        recipients=recipients,
        unit=unit,
        default_balance=0,
        domain=DOMAIN,
        token_id=token_id,
    )


def counts(store: Store, token_id: str) -> dict[str, tuple[int, int]]:
    rows = store._read(
        "SELECT unit, messages, recipients FROM token_rates WHERE token_id = ?", (token_id,)
    )
    return {r["unit"]: (int(r["messages"]), int(r["recipients"])) for r in rows}


def test_the_charge_counts_the_token_and_refuses_a_full_window(store, clock):
    token = limited(store, rates=["2/minute", "10/day"])
    reserve(store, token)
    reserve(store, token)
    with pytest.raises(Refused) as caught:
        reserve(store, token)
    rate = caught.value.rate
    assert rate is not None and (rate.what, str(rate.rate), rate.retry) == (
        "messages",
        "2/minute",
        50,
    )
    # Nothing of the refused message was kept: balance and the day's count.
    assert store.show_sender(SENDER)["balance"] == 998
    assert counts(store, token) == {"minute": (2, 2), "day": (2, 2)}
    clock.advance(seconds=50)  # 12:01:00, a new minute
    reserve(store, token)
    assert counts(store, token) == {"minute": (1, 1), "day": (3, 3)}


def test_the_recipient_rate_counts_recipients(store):
    token = limited(store, rcpt_rates=["3/hour"])
    reserve(store, token, recipients=2)
    with pytest.raises(Refused) as caught:
        reserve(store, token, recipients=2)
    rate = caught.value.rate
    assert rate is not None and (rate.what, str(rate.rate)) == ("recipients", "3/hour")
    with pytest.raises(Refused):  # over the limit alone, before any count
        reserve(store, limited(store, rcpt_rates=["3/hour"]), recipients=4)
    reserve(store, token, recipients=1)
    assert counts(store, token) == {"hour": (2, 3)}


def test_a_charge_refused_for_its_balance_counts_nothing(store):
    token = limited(store, rates=["2/minute"])
    store.set_sender(SENDER, balance=0)
    with pytest.raises(Refused) as caught:
        reserve(store, token)
    assert caught.value.rate is None
    assert counts(store, token) == {}


def test_the_settle_gives_back_what_was_not_delivered(store):
    token = limited(store, rates=["2/minute"], rcpt_rates=["10/minute"])
    first = reserve(store, token, recipients=3)
    second = reserve(store, token, recipients=3)
    assert counts(store, token) == {"minute": (2, 6)}
    store.settle(first.id, 1, created=first.created)  # one of three delivered: the message stays
    assert counts(store, token) == {"minute": (2, 4)}
    store.settle(second.id, 0, created=second.created)  # none: the message is given back too
    assert counts(store, token) == {"minute": (1, 1)}
    reserve(store, token)


def test_a_charge_a_dead_process_left_is_given_back_by_the_sweep(store, clock):
    token = limited(store, rates=["1/hour"])
    reserve(store, token, recipients=2)  # the process dies before the settle
    clock.advance(seconds=120)
    assert len(store.settle_stale(older_than=60)) == 1
    assert counts(store, token) == {"hour": (0, 0)}
    assert store.show_sender(SENDER)["balance"] == 1000
    reserve(store, token)


def test_the_charge_checks_the_scope_again(store):
    token = limited(store, senders=[BILLING])
    with pytest.raises(Refused) as caught:
        reserve(store, token, sender=CEO)
    assert caught.value.out_of_scope
    reserve(store, token, sender=BILLING, unit=0)


def test_mail_check_reads_the_rules_as_they_are_now(store):
    token = limited(store, rates=["1/minute"])
    account = next(a["id"] for a in store.list_accounts() if a["name"] == "acme")
    check = store.check_mail(SENDER, DOMAIN, account, 0, False, token)
    assert check.rate is None and str(check.rules.rates[0]) == "1/minute"
    reserve(store, token)
    check = store.check_mail(SENDER, DOMAIN, account, 0, False, token)
    assert check.rate is not None and check.rate.retry == 50
    store.set_token_rules(token, rules_of(senders=[BILLING]))
    check = store.check_mail(SENDER, DOMAIN, account, 0, False, token)
    assert check.rate is None and check.rules.senders == (BILLING,)


# --- through the relay -------------------------------------------------------------------


@pytest.fixture
def frozen(relay_factory, sink, clock, monkeypatch):
    """The relay, with every store's default clock at `clock` (as test_limits does)."""

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return clock.now if tz is None else clock.now.astimezone(tz)

    monkeypatch.setattr("relay.store.db.datetime", FrozenDatetime)
    return relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="100")


def refusals(reason: str) -> float:
    text = metrics.exposition()[0].decode()
    found = re.search(rf'^relay_refusals_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def token_for(relay, **lists: list[str]) -> str:
    relay.token()  # the account and its domain
    return str(relay.store.create_token("acme", rules=rules_of(**lists))["token"])


def delivered(reply: str) -> bool:
    return reply.startswith("250 2.0.0 Ok <")


def not_allowed(address: str) -> str:
    return f"550 5.7.1 Sender <{address}> is not allowed for this token"


def test_a_scoped_token_sends_as_its_sender_only(frozen, sink):
    raw = frozen.raw()
    assert raw.login(token_for(frozen, senders=[BILLING])).startswith("235 ")
    before = refusals("scope")
    assert delivered(attempt(raw, BILLING))
    assert raw.cmd(f"MAIL FROM:<{CEO}>") == not_allowed(CEO)
    # The envelope in scope, the header not: refused at the end of DATA.
    assert raw.cmd(f"MAIL FROM:<{BILLING}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message(sender=CEO) + b".")
    assert raw.read() == not_allowed(CEO)
    assert raw.cmd(f"MAIL FROM:<{BILLING}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message(sender=BILLING, extra=f"Sender: {CEO}\r\n") + b".")
    assert raw.read() == not_allowed(CEO)
    assert len(sink.messages) == 1
    assert frozen.store.show_sender(BILLING)["balance"] == 99
    assert [s["address"] for s in frozen.store.list_senders()] == [BILLING]  # ceo never charged
    assert refusals("scope") - before == 3


def test_a_domain_scope_takes_every_address_of_it(frozen, sink):
    raw = frozen.raw()
    raw.login(token_for(frozen, senders=[f"*@{DOMAIN}"]))
    assert delivered(attempt(raw, CEO))


def test_two_a_minute_then_451_then_the_next_minute(frozen, sink, clock):
    raw = frozen.raw()
    raw.login(token_for(frozen, rates=["2/minute"]))
    before = refusals("token_rate")
    assert delivered(attempt(raw))
    assert delivered(attempt(raw))
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == (
        "451 4.7.1 Token rate limit: 2 messages per minute; retry in 50 s"
    )
    assert len(sink.messages) == 2
    assert frozen.store.show_sender(SENDER)["balance"] == 98  # the third charged nothing
    assert refusals("token_rate") - before == 1
    clock.advance(seconds=50)
    assert delivered(attempt(raw))
    assert len(sink.messages) == 3


def test_the_recipient_rate_refuses_at_rcpt(frozen, sink, clock):
    raw = frozen.raw()
    raw.login(token_for(frozen, rcpt_rates=["2/hour"]))
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("RCPT TO:<b@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("RCPT TO:<c@dest.test>") == (
        "451 4.7.1 Token rate limit: 2 recipients per hour; retry in 3590 s"
    )
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert delivered(raw.read())
    assert sink.messages[0].rcpt_tos == ["a@dest.test", "b@dest.test"]
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<d@dest.test>").startswith("451 4.7.1 Token rate limit: 2 recipients")
    assert frozen.store.show_sender(SENDER)["balance"] == 98


def test_a_window_filled_by_another_session_is_451_at_the_end_of_data(frozen, sink):
    token = token_for(frozen, rates=["1/minute"])
    first, second = frozen.raw(), frozen.raw()
    for raw in (first, second):
        raw.login(token)
        assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
        assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    for raw in (first, second):
        assert raw.cmd("DATA").startswith("354 ")
        raw.send(message() + b".")
    assert delivered(first.read())
    assert second.read() == "451 4.7.1 Token rate limit: 1 messages per minute; retry in 50 s"
    assert len(sink.messages) == 1
    assert frozen.store.show_sender(SENDER)["balance"] == 99


def test_auth_from_outside_the_networks_is_a_wrong_token(relay, caplog):
    outside = token_for(relay, networks=["10.0.0.0/8"])
    before = refusals("network")
    raw = relay.raw()
    raw.cmd("EHLO client.test")
    with caplog.at_level(logging.INFO, logger="relay.protocol"):
        assert raw.cmd("AUTH PLAIN " + plain(outside)) == "535 5.7.8 Authentication failed"
    assert raw.cmd("AUTH PLAIN " + plain("rlt_wrong")) == "535 5.7.8 Authentication failed"
    assert relay.store.auth_failures("127.0.0.1") == 2  # counted as a failed AUTH
    line = next(r.getMessage() for r in caplog.records if "AUTH failed: network" in r.getMessage())
    assert "is not allowed from 127.0.0.1" in line and outside not in line
    assert refusals("network") - before == 1
    inside = token_for(relay, networks=["10.0.0.0/8", "127.0.0.0/8"])
    assert relay.raw().login(inside).startswith("235 2.7.0 ")


class Raw6(Raw):
    """`Raw` over IPv6 loopback."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        sock = socket.create_connection(("::1", port), timeout=10)
        self.sock = context.wrap_socket(sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()


def test_ipv6_ranges_match(relay_factory, sink, client_tls):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_LISTEN="[::1]:0")
    cases = {
        "::1/128": "235 ",
        "::/0": "235 ",
        "2001:db8::/32": "535 5.7.8 ",
        "127.0.0.0/8": "535 5.7.8 ",  # an IPv6 client is no IPv4 address
    }
    for network, reply in cases.items():
        raw = Raw6(relay.port, client_tls)
        relay.clients.append(raw)
        assert raw.login(token_for(relay, networks=[network])).startswith(reply), network


# --- the admin API and the CLI ------------------------------------------------------------

RULES = {
    "senders": [BILLING, f"*@{DOMAIN}"],
    "networks": ["10.0.0.0/8", "2001:db8::/32"],
    "rates": ["60/minute", "1000/day"],
    "rcpt_rates": ["500/hour"],
}


@pytest.fixture
def admin(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(),
        RELAY_ADMIN_LISTEN="127.0.0.1:0",
        RELAY_AUTH_FAILURE_LIMIT="100000",
    )
    relay.token()  # account acme with example.com
    client = Admin(relay, f"http://127.0.0.1:{relay.relay.admin_port}")
    yield client
    client.http.close()


def rules_in(value: dict) -> dict:
    return {k: value[k] for k in RULES}


def test_the_api_round_trips_every_rule(admin):
    created = admin.ok("POST", "/accounts/acme/tokens", 201, json={"name": "app", **RULES})
    token_id = created["id"]
    assert rules_in(created) == RULES
    shown = admin.ok("GET", f"/tokens/{token_id}")
    assert rules_in(shown) == RULES and shown["status"] == "active" and "token" not in shown
    listed = admin.ok("GET", "/accounts/acme/tokens")["tokens"]
    assert rules_in(next(t for t in listed if t["id"] == token_id)) == RULES
    # PATCH replaces the lists it is given; an empty list clears one; the rest stay.
    patched = admin.ok("PATCH", f"/tokens/{token_id}", json={"networks": [], "rates": ["2/min"]})
    assert rules_in(patched) == {**RULES, "networks": [], "rates": ["2/minute"]}
    assert rules_in(admin.ok("GET", f"/tokens/{token_id}")) == rules_in(patched)
    # What GET shows, PATCH takes back unchanged.
    assert rules_in(admin.ok("PATCH", f"/tokens/{token_id}", json=rules_in(patched))) == (
        rules_in(patched)
    )
    audit = admin.ok("GET", "/audit")["records"]
    actions = [(r["action"], r["target"]) for r in audit]
    assert ("token.create", "acme") in actions and ("token.set", token_id) in actions
    change = next(r for r in audit if r["action"] == "token.set")
    assert change["detail"] == {
        k: rules_in(patched)[k] for k in ("senders", "networks", "rates", "rcpt_rates")
    }
    first_set = [r for r in audit if r["action"] == "token.set"][-1]
    assert first_set["detail"] == {"networks": [], "rates": ["2/minute"]}
    # The store holds what the API answered.
    assert admin.relay.store.show_token(token_id)["rates"] == ["2/minute"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"rates": ["0/min"]}, "bad_rate"),
        ({"rcpt_rates": ["5/week"]}, "bad_rate"),
        ({"networks": ["300.1.1.1/8"]}, "bad_network"),
        ({"senders": ["ceo@other.test"]}, "bad_sender"),
        ({"senders": "billing@example.com"}, "bad_body"),
        ({"senders": [1]}, "bad_body"),
        ({"rates": ["1/min", "2/h", "3/d", "4/d"]}, "bad_body"),
        ({}, "bad_body"),
    ],
)
def test_a_bad_rule_is_a_422(admin, body, code):
    token_id = admin.ok("POST", "/accounts/acme/tokens", 201, json={})["id"]
    admin.fails("PATCH", f"/tokens/{token_id}", 422, code, json=body)
    if body:
        admin.fails("POST", "/accounts/acme/tokens", 422, code, json=body)
    assert rules_in(admin.ok("GET", f"/tokens/{token_id}")) == {k: [] for k in RULES}


def test_an_unknown_token_is_a_404(admin):
    admin.fails("GET", "/tokens/tok_nope", 404, "no_such_token")
    admin.fails("PATCH", "/tokens/tok_nope", 404, "no_such_token", json={"rates": ["1/d"]})


def test_the_openapi_document_names_the_token_routes(admin):
    spec = admin.ok("GET", "/openapi.json", token=None)
    operations = spec["paths"]["/api/v1/tokens/{id}"]
    assert {"get", "patch", "delete"} <= set(operations)
    schema = operations["patch"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["senders"]["type"] == "array"
    assert schema["properties"]["senders"]["items"] == {"type": "string"}


def test_the_cli_round_trips_every_rule(tmp_path):
    env = {"RELAY_DATABASE": str(tmp_path / "relay.db")}
    ok(relay_cli("db", "init", env=env))
    ok(relay_cli("account", "create", "acme", env=env))
    ok(relay_cli("domain", "add", "acme", DOMAIN, env=env))
    options = [
        *("--sender", BILLING, "--sender", f"*@{DOMAIN}"),
        *("--network", "10.0.0.0/8", "--network", "2001:db8::/32"),
        *("--rate", "60/min", "--rate", "1000/day", "--rcpt-rate", "500/hour"),
    ]
    created = json.loads(ok(relay_cli("token", "create", "acme", *options, "--json", env=env)))
    assert rules_in(created) == RULES
    token_id = created["id"]
    text = ok(relay_cli("token", "create", "acme", "--rate", "1/d", env=env))
    assert text.splitlines()[-1].startswith("rlt_")  # the token, the last line
    assert "rates: 1/day" in text
    assert rules_in(json.loads(ok(relay_cli("token", "show", token_id, "--json", env=env)))) == (
        RULES
    )
    shown = ok(relay_cli("token", "show", token_id, env=env))
    assert "networks: 10.0.0.0/8, 2001:db8::/32" in shown
    changed = json.loads(
        ok(
            relay_cli(
                "token", "set", token_id, "--clear-networks", "--rate", "2/min", "--json", env=env
            )
        )
    )
    assert rules_in(changed) == {**RULES, "networks": [], "rates": ["2/minute"]}
    listed = json.loads(ok(relay_cli("token", "list", "acme", "--json", env=env)))
    assert rules_in(next(t for t in listed if t["id"] == token_id)) == rules_in(changed)
    assert "rates: 2/minute" in ok(relay_cli("token", "list", env=env))
    audit = ok(relay_cli("audit", env=env))
    assert "token.set" in audit and '"rates": ["2/minute"]' in audit
    cleared = json.loads(
        ok(
            relay_cli(
                "token",
                "set",
                token_id,
                "--clear-senders",
                "--clear-rates",
                "--clear-rcpt-rates",
                "--json",
                env=env,
            )
        )
    )
    assert rules_in(cleared) == {k: [] for k in RULES}


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--rate", "0/min"), "relay: rate '0/min': from 1 to 1000000000 per minute"),
        (("--network", "300.1.1.1/8"), "relay: network '300.1.1.1/8': not a CIDR range"),
        (
            ("--sender", "ceo@other.test"),
            "relay: sender 'ceo@other.test': other.test is not a domain of the token's account",
        ),
    ],
)
def test_a_bad_rule_is_one_clean_line(tmp_path, args, error):
    env = {"RELAY_DATABASE": str(tmp_path / "relay.db")}
    ok(relay_cli("db", "init", env=env))
    ok(relay_cli("account", "create", "acme", env=env))
    ok(relay_cli("domain", "add", "acme", DOMAIN, env=env))
    for command in (("token", "create", "acme"), ("token", "set", "tok_x")):
        if command[1] == "set":
            made = json.loads(ok(relay_cli("token", "create", "acme", "--json", env=env)))
            command = ("token", "set", made["id"])
        result = relay_cli(*command, *args, env=env)
        assert result.returncode == 1
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(error)
        assert result.stdout == ""


# --- two relay processes on one database --------------------------------------------------

SESSIONS = 40
PER_DAY = 10  # a day's window: the count cannot start over in the test's few seconds


@pytest.fixture
def relays(database_url, cert_dir, tmp_path) -> Iterator[RelayProcesses]:
    running = RelayProcesses(database_url, cert_dir, tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.slow
def test_two_processes_send_exactly_the_tokens_rate(sink, client_tls, relays, database_url):
    store = Store(database_url)
    try:
        store.migrate()
        store.create_account("acme")
        store.add_domain("acme", DOMAIN)
        store.add_nolimit(SENDER)  # only the token's rate limits
        made = store.create_token("acme", rules=rules_of(rates=[f"{PER_DAY}/day"]))
        for _ in range(2):
            relays.start(client_tls, sink.smtp_config())

        async def run() -> list[str]:
            return await asyncio.gather(
                *(
                    send_one(relays.ports[i % 2], client_tls, made["token"], f"r{i}@dest.test")
                    for i in range(SESSIONS)
                )
            )

        delivered_, refused = tally(asyncio.run(run()))

        assert len(delivered_) == PER_DAY, relays.output()
        prefix = f"451 4.7.1 Token rate limit: {PER_DAY} messages per day; retry in "
        assert len(refused) == SESSIONS - PER_DAY
        assert all(r.startswith(prefix) for r in refused), set(refused)
        assert len(sink.messages) == PER_DAY
        assert counts(store, made["id"]) == {"day": (PER_DAY, PER_DAY)}
        assert store.pending_count() == 0
    finally:
        store.close()


# --- the console's token page ---------------------------------------------------------------


def test_the_console_creates_and_edits_a_tokens_rules(relay_factory, sink, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_ADMIN_LISTEN="127.0.0.1:0")
    relay.token()
    admin_token = relay.store.create_admin_token(name="browser")["token"]
    wait = WebDriverWait(browser, 15)
    find = browser.find_element

    def visible(selector: str):
        return wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, selector)))

    def text_in(selector: str, text: str) -> None:
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, selector), text))

    browser.get(f"http://127.0.0.1:{relay.relay.admin_port}/")
    visible("#token-input").send_keys(admin_token)
    find(By.ID, "sign-in").click()
    visible("#nav-tokens").click()  # the console opens on its overview
    text_in("#account-select", "acme")
    find(By.ID, "token-name").send_keys("billing")
    find(By.ID, "token-senders").send_keys(BILLING)
    find(By.ID, "token-networks").send_keys("10.0.0.0/8, 2001:db8::/32")
    find(By.ID, "token-rates").send_keys("2/min 100/day")
    find(By.ID, "create-token").click()
    text_in("#new-token", "rlt_")
    text_in("#tokens-table", "messages: 2/minute 100/day")
    made = next(t for t in relay.store.list_tokens("acme") if t["name"] == "billing")
    assert rules_in(made) == {
        "senders": [BILLING],
        "networks": ["10.0.0.0/8", "2001:db8::/32"],
        "rates": ["2/minute", "100/day"],
        "rcpt_rates": [],
    }
    # Edit: the form opens with the rules; clearing a field clears the list.
    find(By.CSS_SELECTOR, f'#tokens-table tr[data-id="{made["id"]}"] button.edit').click()
    visible("#rules-form")
    assert find(By.ID, "rules-senders").get_attribute("value") == BILLING
    find(By.ID, "rules-networks").clear()
    find(By.ID, "rules-rcpt-rates").send_keys("50/hour")
    find(By.ID, "rules-save").click()
    text_in("#tokens-table", "recipients: 50/hour")
    shown = relay.store.show_token(made["id"])
    assert (shown["networks"], shown["rcpt_rates"]) == ([], ["50/hour"])
    # A bad rule shows the API's message and changes nothing.
    find(By.CSS_SELECTOR, f'#tokens-table tr[data-id="{made["id"]}"] button.edit').click()
    find(By.ID, "rules-rates").clear()
    find(By.ID, "rules-rates").send_keys("0/min")
    find(By.ID, "rules-save").click()
    text_in("#status-tokens.error", "rate '0/min'")
    assert relay.store.show_token(made["id"])["rates"] == ["2/minute", "100/day"]
