"""An account's life after creation, against the real relay: disable (its tokens fail
AUTH as unknown ones do; what was queued is still delivered), enable, delete (refused
while messages are queued; keeps the delivery and audit records), and moving a
domain to another account (relay.admin.accounts, docs/admin.md)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from support import DOMAIN, SENDER, attempt, message
from test_adminapi import admin_for  # noqa: F401 - a fixture
from test_channels import MESSAGE_ID, RCPT, balance, mail, wrap_hook
from test_cli import db_env, ok, relay_cli  # noqa: F401 - a fixture

from relay.store.deliveries import Query

pytestmark = pytest.mark.backends

AUTH_FAILED = "535 5.7.8 Authentication failed"
NO_LONGER_VALID = "530 5.7.0 Authentication required: the token was revoked or expired"
DENIED = (
    f"550 5.7.1 Sender denied: domain {DOMAIN} is not onboarded for this token's account"
    " (domains match exactly; a subdomain needs its own entry)"
)
QUEUED = f"250 2.0.0 Queued as {MESSAGE_ID}; delivery will be retried"


def until(check: Any, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


@pytest.fixture
def setup(relay_factory, sink, admin_for):  # noqa: F811 - the fixture imported above
    def make(**settings: str) -> tuple[Any, Any]:
        relay = relay_factory(
            SMTP_CONFIG=sink.smtp_config(),
            DEFAULT_SEND_BALANCE="10",
            RELAY_ADMIN_LISTEN="127.0.0.1:0",
            RELAY_AUTH_FAILURE_LIMIT="100000",
            **settings,
        )
        return relay, admin_for(relay, f"http://127.0.0.1:{relay.relay.admin_port}")

    return make


def actions(relay: Any) -> list[tuple[str, str]]:
    return [(r["action"], r["target"]) for r in relay.store.list_audit(limit=100)]


def test_a_disabled_accounts_token_fails_auth_as_an_unknown_one_does(setup, sink):
    relay, admin = setup()
    token = relay.token()
    unknown = relay.raw().login("rlt_" + "x" * 43)
    assert unknown == AUTH_FAILED

    shown = admin.ok("POST", "/accounts/acme/disable")
    assert shown["name"] == "acme" and shown["disabled"] is not None
    assert relay.raw().login(token) == unknown  # the same reply: no oracle
    # Twice is no error, and changes (and audits) nothing.
    assert admin.ok("POST", "/accounts/acme/disable")["disabled"] == shown["disabled"]

    assert admin.ok("POST", "/accounts/acme/enable")["disabled"] is None
    raw = relay.raw()
    assert raw.login(token).startswith("235 ")
    assert attempt(raw).startswith("250 ")
    assert len(sink.messages) == 1
    assert actions(relay)[:2] == [("account.enable", "acme"), ("account.disable", "acme")]
    admin.fails("POST", "/accounts/nobody/disable", 404, "no_such_account")


def test_an_open_session_stops_at_its_next_mail_and_at_the_charge(setup, sink):
    relay, admin = setup()
    token = relay.token()
    before = relay.raw()
    assert before.login(token).startswith("235 ")
    during = relay.raw()
    assert during.login(token).startswith("235 ")
    assert during.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert during.cmd(f"RCPT TO:<{RCPT}>").startswith("250 ")

    admin.ok("POST", "/accounts/acme/disable")
    assert before.cmd(f"MAIL FROM:<{SENDER}>") == NO_LONGER_VALID
    assert during.cmd("DATA").startswith("354")
    during.send(message() + b".")
    assert during.read() == NO_LONGER_VALID  # checked with the charge: nothing sent
    assert sink.messages == [] and balance(relay) == 10


def test_a_queued_message_of_a_disabled_account_is_delivered_and_delete_waits(setup, sink):
    relay, admin = setup(RELAY_QUEUE="on-failure", RELAY_QUEUE_BACKOFF="3600")
    down = [1]  # the sink defers the first MAIL: the message is queued

    def defer(server: Any) -> str | None:
        if down[0]:
            down[0] -= 1
            return "421 4.3.2 service not available"
        return None

    wrap_hook(sink, "MAIL", defer)
    token = relay.token()
    relay.store.add_suppression("acme", "gone@dest.test")
    relay.store.add_webhook("acme", "https://hooks.example.test/relay", None)
    relay.store.set_limits(account="acme", daily=100, monthly=None)
    raw = relay.raw()
    assert raw.login(token).startswith("235 ")
    assert raw.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert raw.cmd(f"RCPT TO:<{RCPT}>").startswith("250 ")
    assert raw.cmd("DATA").startswith("354")
    raw.send(mail() + b".")
    assert raw.read() == QUEUED

    admin.ok("POST", "/accounts/acme/disable")
    admin.fails("DELETE", "/accounts/acme", 409, "account_has_queued")
    assert "acme" in {a["name"] for a in admin.ok("GET", "/accounts")["accounts"]}

    [item] = admin.ok("GET", "/queue")["messages"]
    admin.ok("POST", f"/queue/{item['id']}/retry")
    until(lambda: relay.store.queue_list() == [] and len(sink.messages) == 1)
    assert balance(relay) == 9  # a 250 is a promise: delivered and charged once

    gone = admin.ok("DELETE", "/accounts/acme")
    assert gone["domains"] == [DOMAIN] and len(gone["tokens"]) == 1
    assert (gone["webhooks"], gone["suppressions"]) == (1, 1)
    assert "acme" not in {a["name"] for a in admin.ok("GET", "/accounts")["accounts"]}
    assert relay.store.list_domains() == [] and relay.store.list_tokens() == []
    assert [s["scope"] for s in relay.store.show_limits()] == ["relay"]
    assert relay.raw().login(token) == AUTH_FAILED
    # The delivery record and the audit log stay.
    [record] = relay.store.find_deliveries(Query(message_id=MESSAGE_ID))
    assert record.account == "acme" and record.outcome == "delivered"
    entry = relay.store.list_audit(limit=1)[0]
    assert (entry["action"], entry["target"]) == ("account.delete", "acme")
    assert json.loads(json.dumps(entry["detail"]))["domains"] == [DOMAIN]
    # The name is free again: a new account of it starts with nothing.
    admin.ok("POST", "/accounts", 201, json={"name": "acme"})
    assert admin.ok("GET", "/accounts/acme/tokens")["tokens"] == []
    assert admin.ok("GET", "/accounts/acme/webhooks") == []


def test_moving_a_domain_hands_its_senders_to_the_new_account(setup, sink):
    relay, admin = setup()
    old = relay.token("acme")
    new = relay.token("beta", domain=None)
    midway = relay.raw()
    assert midway.login(old).startswith("235 ")
    assert midway.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
    assert midway.cmd(f"RCPT TO:<{RCPT}>").startswith("250 ")

    moved = admin.ok("POST", f"/domains/{DOMAIN}/move", json={"account": "beta"})
    assert moved == {"domain": DOMAIN, "from": "acme", "account": "beta"}
    # A message of the old account past MAIL FROM is refused at its charge.
    assert midway.cmd("DATA").startswith("354")
    midway.send(message() + b".")
    assert midway.read() == DENIED
    raw = relay.raw()
    assert raw.login(old).startswith("235 ")
    assert attempt(raw) == DENIED  # the existing reply, at MAIL FROM
    raw = relay.raw()
    assert raw.login(new).startswith("235 ")
    assert attempt(raw).startswith("250 ")
    assert len(sink.messages) == 1 and balance(relay) == 9
    assert [d["domain"] for d in admin.ok("GET", "/accounts/beta/domains")["domains"]] == [DOMAIN]
    assert admin.ok("GET", "/accounts/acme/domains")["domains"] == []
    entry = relay.store.list_audit(limit=1)[0]
    assert (entry["action"], entry["target"]) == ("domain.move", DOMAIN)
    assert entry["detail"] == {"from": "acme", "to": "beta"}

    admin.fails("POST", f"/domains/{DOMAIN}/move", 409, "same_account", json={"account": "beta"})
    admin.fails(
        "POST", "/domains/nowhere.test/move", 404, "no_such_domain", json={"account": "beta"}
    )
    admin.fails("POST", f"/domains/{DOMAIN}/move", 404, "no_such_account", json={"account": "x"})
    admin.fails("POST", f"/domains/{DOMAIN}/move", 422, "bad_body", json={})


def test_the_commands(db_env):  # noqa: F811 - the fixture imported above
    ok(relay_cli("account", "create", "acme", env=db_env))
    ok(relay_cli("account", "create", "beta", env=db_env))
    ok(relay_cli("domain", "add", "acme", "example.com", env=db_env))
    ok(relay_cli("token", "create", "acme", env=db_env))
    assert ok(relay_cli("account", "disable", "acme", env=db_env)) == (
        "account acme: disabled (its tokens no longer work)\n"
    )
    listed = json.loads(ok(relay_cli("account", "list", "--json", env=db_env)))
    assert [a["disabled"] is not None for a in listed] == [True, False]
    assert "disabled" in ok(relay_cli("account", "list", env=db_env))
    assert ok(relay_cli("account", "enable", "acme", env=db_env)) == "account acme: enabled\n"

    assert ok(relay_cli("domain", "move", "Example.COM", "beta", env=db_env)) == (
        "moved example.com from account acme to beta\n"
    )
    again = relay_cli("domain", "move", "example.com", "beta", env=db_env)
    assert (again.returncode, again.stderr) == (
        1,
        "relay: domain example.com is on account 'beta' already\n",
    )

    # No terminal and no --yes: nothing is deleted.
    asked = relay_cli("account", "delete", "acme", env=db_env)
    assert asked.returncode == 1 and "--yes" in asked.stderr
    gone = json.loads(ok(relay_cli("account", "delete", "acme", "--yes", "--json", env=db_env)))
    assert gone["name"] == "acme" and len(gone["tokens"]) == 1 and gone["domains"] == []
    assert [
        a["name"] for a in json.loads(ok(relay_cli("account", "list", "--json", env=db_env)))
    ] == ["beta"]
    audit = ok(relay_cli("audit", "--json", env=db_env))
    assert all(a in audit for a in ("account.disable", "domain.move", "account.delete"))


@pytest.mark.parametrize(("typed", "deleted"), [("acme", True), ("acm", False)])
def test_delete_in_a_terminal_asks_for_the_name(db_env, typed, deleted):  # noqa: F811
    import os
    import pty
    import subprocess
    import sys

    from test_cli import ROOT

    ok(relay_cli("account", "create", "acme", env=db_env))
    leader, follower = pty.openpty()
    try:
        os.write(leader, f"{typed}\n".encode())
        done = subprocess.run(
            [sys.executable, "-m", "relay", "account", "delete", "acme"],
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **db_env},
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(leader)
        os.close(follower)
    assert "Type its name to confirm" in done.stdout
    names = [a["name"] for a in json.loads(ok(relay_cli("account", "list", "--json", env=db_env)))]
    if deleted:
        assert done.returncode == 0 and names == []
    else:
        assert done.returncode == 1 and "the name did not match" in done.stderr
        assert names == ["acme"]
