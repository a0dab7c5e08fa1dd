"""Send balances: who pays, how much, when, and what comes back.

Through the real relay over TLS, against a real aiosmtpd sink or the fake
Cloudflare API; each test reads the balance back from the store afterwards.
The `relay` command's admin surface is driven as a user would, as a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fake_upstreams import FakeCloudflare
from support import DOMAIN, SENDER, attempt, free_port, message

from relay.errors import RelayError
from relay.store.facade import Refused, Store
from relay.windows import Window, window_reset

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.backends
EXHAUSTED = f"550 5.7.1 Send balance exhausted for {SENDER}; ask the relay admin for a top-up"
DISABLED = f"550 5.7.1 Sending is disabled for {SENDER}; ask the relay admin to enable it"


def balance(store: Store, address: str = SENDER) -> int:
    return int(store.show_sender(address)["balance"])


def has_row(store: Store, address: str = SENDER) -> bool:
    return any(row["address"] == address for row in store.list_senders())


def relay_counts(store: Store) -> tuple[int, int]:
    """The relay-wide (daily, monthly) counts of the current windows."""
    row = next(r for r in store.show_limits() if r["scope"] == "relay")
    return row["daily_count"], row["monthly_count"]


def delivered(reply: str) -> bool:
    return reply.startswith("250 2.0.0 Ok <")


@pytest.fixture
def metered(relay_factory, sink):
    """A relay forwarding example.com to the sink; new senders start with 3."""
    return relay_factory(SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="3")


@pytest.fixture
def cloudflare() -> Iterator[FakeCloudflare]:
    with FakeCloudflare(account_id="acct-1", token="cf-token") as fake:
        yield fake


def cloudflare_env(fake: FakeCloudflare) -> dict[str, str]:
    return {
        "CLOUDFLARE_ACCOUNT_ID": "acct-1",
        "CLOUDFLARE_API_TOKEN": "cf-token",
        "CLOUDFLARE_API_URL": fake.url,
    }


# --- DEFAULT_SEND_BALANCE: a missing row only ----------------------------------------


def test_default_balance_creates_a_missing_row_at_the_first_charge(metered, sink):
    raw = metered.raw()
    raw.login(metered.token())
    assert not has_row(metered.store)
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert not has_row(metered.store)  # MAIL and RCPT read the default, write nothing
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert delivered(raw.read())
    assert metered.store.show_sender(SENDER) | {"created": 0, "updated": 0} == {
        "address": SENDER,
        "balance": 2,
        "enabled": True,
        "created": 0,
        "updated": 0,
    }
    assert len(sink.messages) == 1


def test_mail_from_alone_creates_no_sender_row(metered, sink):
    token = metered.token()
    for session in range(2):  # 100 RSETs are all one session may send (Limits)
        raw = metered.raw()
        raw.login(token)
        for i in range(100):
            assert raw.cmd(f"MAIL FROM:<probe{session}-{i}@{DOMAIN}>") == "250 2.1.0 Ok"
            assert raw.cmd("RSET") == "250 2.0.0 Ok"
    assert metered.store.list_senders() == []
    assert delivered(attempt(raw))
    assert [r["address"] for r in metered.store.list_senders()] == [SENDER]
    assert len(sink.messages) == 1


def test_sender_is_metered_lower_cased(metered, sink):
    raw = metered.raw()
    raw.login(metered.token())
    assert delivered(attempt(raw, sender="App@Example.COM"))
    assert delivered(attempt(raw, sender=SENDER))
    assert [row["address"] for row in metered.store.list_senders()] == [SENDER]
    assert balance(metered.store) == 1


def test_admin_edited_row_is_untouched_by_the_default(metered, sink):
    metered.store.set_sender(SENDER, balance=7)
    raw = metered.raw()
    raw.login(metered.token())
    assert delivered(attempt(raw))
    assert balance(metered.store) == 6


def test_disabled_row_stays_disabled_with_a_default_set(metered, sink):
    metered.store.set_sender(SENDER, balance=5, enabled=False)
    raw = metered.raw()
    raw.login(metered.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == DISABLED
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == DISABLED
    row = metered.store.show_sender(SENDER)
    assert (row["balance"], row["enabled"]) == (5, False)
    assert sink.messages == []


def test_deleted_row_is_created_afresh_with_the_default(metered, sink):
    metered.store.set_sender(SENDER, balance=0, enabled=False)
    metered.store.delete_sender(SENDER)
    assert not has_row(metered.store)
    raw = metered.raw()
    raw.login(metered.token())
    assert delivered(attempt(raw))
    row = metered.store.show_sender(SENDER)
    assert (row["balance"], row["enabled"]) == (2, True)


def test_zero_default_refuses_a_new_sender_at_mail_from(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config())
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == EXHAUSTED
    assert not has_row(relay.store)  # refused on the default of 0, nothing written
    relay.store.topup_sender(SENDER, 1)
    assert delivered(attempt(raw))
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == EXHAUSTED
    assert balance(relay.store) == 0
    assert len(sink.messages) == 1


def test_sender_of_a_domain_not_onboarded_gets_no_row(metered):
    metered.token("other", "other.test")
    raw = metered.raw()
    raw.login(metered.token())
    assert raw.cmd("MAIL FROM:<boss@other.test>").startswith("550 5.7.1 Sender denied")
    assert metered.store.list_senders() == []


# --- refusals at RCPT and at the end of DATA -------------------------------------------


def test_rcpt_the_balance_cannot_cover_is_550(metered, sink):
    metered.store.set_sender(SENDER, balance=2)
    raw = metered.raw()
    raw.login(metered.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("RCPT TO:<b@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"  # a duplicate costs nothing
    assert raw.cmd("RCPT TO:<c@dest.test>") == (
        f"550 5.7.1 Send balance of {SENDER} (2) does not cover 3 recipients"
    )
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert delivered(raw.read())
    assert sink.messages[0].rcpt_tos == ["a@dest.test", "b@dest.test"]
    assert balance(metered.store) == 0
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == EXHAUSTED


def test_balance_spent_between_rcpt_and_data_is_550_and_nothing_is_sent(metered, sink):
    metered.store.set_sender(SENDER, balance=1)
    raw = metered.raw()
    raw.login(metered.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    metered.store.set_sender(SENDER, balance=0)  # another session spent it meanwhile
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert raw.read() == f"550 5.7.1 Send balance of {SENDER} (0) does not cover 1 recipients"
    assert sink.messages == []
    assert balance(metered.store) == 0
    assert metered.store.pending_count() == 0
    assert relay_counts(metered.store) == (0, 0)


def balance_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "relay.session"
        and r.levelno == logging.INFO
        and "refused (balance" in r.getMessage()
    ]


def test_each_balance_refusal_is_logged_at_info_with_sender_and_balance(metered, sink, caplog):
    caplog.set_level(logging.INFO, "relay.session")
    metered.store.set_sender(SENDER, balance=1)
    raw, token = metered.raw(), metered.token()
    raw.login(token)
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert balance_log(caplog) == []  # nothing refused yet
    assert raw.cmd("RCPT TO:<b@dest.test>").startswith("550 5.7.1 ")
    metered.store.set_sender(SENDER, balance=0)  # another session spent it meanwhile
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert raw.read().startswith("550 5.7.1 ")
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == EXHAUSTED
    assert balance_log(caplog) == [
        f"RCPT TO refused (balance 1): 550 5.7.1 Send balance of {SENDER} (1) "
        "does not cover 2 recipients",
        f"end of DATA refused (balance 0): 550 5.7.1 Send balance of {SENDER} (0) "
        "does not cover 1 recipients",
        f"MAIL FROM refused (balance 0): {EXHAUSTED}",
    ]
    assert not any(token in r.getMessage() for r in caplog.records)


def test_sender_disabled_between_rcpt_and_data_is_550(metered, sink):
    metered.store.set_sender(SENDER, balance=4)
    raw = metered.raw()
    raw.login(metered.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    metered.store.set_sender(SENDER, enabled=False)
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert raw.read().startswith("550 5.7.1 ")
    assert sink.messages == []
    assert balance(metered.store) == 4


def test_sender_disabled_between_rcpt_and_data_is_told_so(metered, sink):
    metered.store.set_sender(SENDER, balance=4)
    raw = metered.raw()
    raw.login(metered.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    metered.store.set_sender(SENDER, enabled=False)
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert raw.read() == DISABLED


# --- refunds -----------------------------------------------------------------------------


def test_recipient_refused_upstream_is_refunded(metered, sink):
    sink.recorder.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    raw = metered.raw()
    raw.login(metered.token())
    assert delivered(attempt(raw, rcpts=("a@dest.test", "gone@dest.test")))
    assert sink.messages[0].rcpt_tos == ["a@dest.test"]
    assert balance(metered.store) == 2
    assert metered.store.pending_count() == 0
    assert relay_counts(metered.store) == (1, 1)


def test_every_recipient_refused_upstream_is_refunded_in_full(metered, sink):
    sink.recorder.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    raw = metered.raw()
    raw.login(metered.token())
    assert attempt(raw, rcpts=("gone@dest.test",)) == "550 5.1.1 smtp: no such user"
    assert balance(metered.store) == 3
    assert relay_counts(metered.store) == (0, 0)


def test_upstream_down_is_451_and_refunded(relay_factory):
    smtp = json.dumps({DOMAIN: {"host": "127.0.0.1", "port": free_port(), "secure": False}})
    relay = relay_factory(SMTP_CONFIG=smtp, DEFAULT_SEND_BALANCE="3")
    raw = relay.raw()
    raw.login(relay.token())
    assert attempt(raw) == "451 4.3.0 smtp: upstream refused the connection"
    assert balance(relay.store) == 3
    assert relay.store.pending_count() == 0
    assert relay_counts(relay.store) == (0, 0)


def test_upstream_transient_451_is_refunded(metered, sink):
    sink.recorder.data_reply = "451 4.3.0 try later"
    raw = metered.raw()
    raw.login(metered.token())
    reply = attempt(raw, rcpts=("a@dest.test", "b@dest.test"))
    assert reply.startswith("451 4.3.0 smtp: upstream deferred (451 4.3.0 try later)")
    assert balance(metered.store) == 3
    assert relay_counts(metered.store) == (0, 0)


# --- no limits: the list and the role ---------------------------------------------------


def test_nolimit_list_sends_with_no_row_and_no_charge(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config())  # default balance 0
    relay.store.add_nolimit(SENDER)
    raw = relay.raw()
    raw.login(relay.token())
    assert delivered(attempt(raw, rcpts=("a@dest.test", "b@dest.test")))
    assert delivered(attempt(raw))
    assert relay.store.list_senders() == []
    assert len(sink.messages) == 2
    # Send limits still apply to it.
    assert relay_counts(relay.store) == (3, 3)


def test_nolimit_list_bypasses_a_zero_balance_row(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config())
    relay.store.set_sender(SENDER, balance=0)
    relay.store.add_nolimit(SENDER)
    raw = relay.raw()
    raw.login(relay.token())
    assert delivered(attempt(raw))
    assert balance(relay.store) == 0
    relay.store.remove_nolimit(SENDER)
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == EXHAUSTED


def test_nolimit_role_sends_with_no_row_and_no_charge(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), NO_LIMIT_SEND_ROLE="ops, admin")
    raw = relay.raw()
    raw.login(relay.token(role="admin"))
    assert delivered(attempt(raw))
    assert relay.store.list_senders() == []
    # The same account with a token of another role pays.
    other = relay.raw()
    other.login(relay.token(role="app"))
    assert other.cmd(f"MAIL FROM:<{SENDER}>") == EXHAUSTED
    assert not has_row(relay.store)
    assert len(sink.messages) == 1


def test_nolimit_role_is_still_counted_in_send_limits(relay_factory, sink):
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), NO_LIMIT_SEND_ROLE="ops")
    relay.store.set_limits(account=None, daily=1, monthly=None)
    raw = relay.raw()
    raw.login(relay.token(role="ops"))
    assert delivered(attempt(raw))
    assert raw.cmd(f"MAIL FROM:<{SENDER}>").startswith(
        "451 4.7.1 Daily send limit of 1 reached for the relay; the window resets at "
    )
    assert relay_counts(relay.store) == (1, 1)


# --- the free verified channel and Cloudflare rule 4 ------------------------------------


def test_verified_channel_is_free_but_counted(relay_factory, cloudflare):
    relay = relay_factory(**cloudflare_env(cloudflare))  # default balance 0
    relay.store.add_verified("friend@dest.test")
    relay.store.add_verified("pal@dest.test")
    raw = relay.raw()
    raw.login(relay.token())
    # A zero balance is not final at MAIL FROM: the free channel may still apply.
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<friend@dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("RCPT TO:<Pal@Dest.test>") == "250 2.1.5 Ok"
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert delivered(raw.read())
    assert len(cloudflare.sent) == 1
    # Matched on the lower-cased key, forwarded as given.
    assert cloudflare.sent[0].json["recipients"] == ["friend@dest.test", "Pal@Dest.test"]
    assert not has_row(relay.store)  # free: no charge, no row
    assert relay_counts(relay.store) == (2, 2)


def test_unverified_recipient_with_zero_balance_is_550_at_rcpt(relay_factory, cloudflare):
    relay = relay_factory(**cloudflare_env(cloudflare))
    relay.store.add_verified("friend@dest.test")
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert raw.cmd("RCPT TO:<friend@dest.test>") == "250 2.1.5 Ok"
    # One unverified recipient makes the whole message rule 4, which charges.
    assert raw.cmd("RCPT TO:<stranger@dest.test>") == EXHAUSTED
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(message() + b".")
    assert delivered(raw.read())
    assert cloudflare.sent[0].json["recipients"] == ["friend@dest.test"]
    assert not has_row(relay.store)


def test_disabled_sender_is_refused_even_with_the_free_channel(relay_factory, cloudflare):
    relay = relay_factory(**cloudflare_env(cloudflare))
    relay.store.add_verified("friend@dest.test")
    relay.store.set_sender(SENDER, balance=3, enabled=False)
    raw = relay.raw()
    raw.login(relay.token())
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == DISABLED
    assert cloudflare.requests == []


def test_cloudflare_rule_4_charges_and_refunds_bounces(relay_factory, cloudflare):
    relay = relay_factory(**cloudflare_env(cloudflare), DEFAULT_SEND_BALANCE="5")
    relay.store.add_verified("friend@dest.test")
    cloudflare.bounce("gone@dest.test")
    raw = relay.raw()
    raw.login(relay.token())
    reply = attempt(raw, rcpts=("friend@dest.test", "a@dest.test", "gone@dest.test"))
    assert delivered(reply)
    assert cloudflare.sent[0].json["recipients"] == [
        "friend@dest.test",
        "a@dest.test",
        "gone@dest.test",
    ]
    # Three charged (one unverified recipient makes it rule 4), one bounce refunded.
    assert balance(relay.store) == 3
    assert relay_counts(relay.store) == (2, 2)


def test_cloudflare_upstream_error_is_refunded(relay_factory, cloudflare):
    relay = relay_factory(**cloudflare_env(cloudflare), DEFAULT_SEND_BALANCE="5")
    cloudflare.fail(503, 10000, "Service unavailable")
    raw = relay.raw()
    raw.login(relay.token())
    assert attempt(raw).startswith("451 4.3.0 ")
    assert balance(relay.store) == 5
    assert relay_counts(relay.store) == (0, 0)


def test_free_dev_outbox_sends_with_zero_balance(relay_factory, tmp_path):
    # `relay dev` (make run) leaves DEFAULT_SEND_BALANCE at 0: its demo must send.
    relay = relay_factory(RELAY_DEV_OUTBOX=str(tmp_path / "outbox"))
    raw = relay.raw()
    raw.login(relay.token())
    assert delivered(attempt(raw, rcpts=("a@dest.test", "b@dest.test")))
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 1
    assert not has_row(relay.store)
    assert relay_counts(relay.store) == (2, 2)


# --- crash recovery ----------------------------------------------------------------------


def seed(store: Store, sender_balance: int) -> int:
    """Schema, account acme with example.com, a sender row; returns the account id."""
    store.migrate()
    account = store.create_account("acme")
    store.add_domain("acme", DOMAIN)
    store.set_sender(SENDER, balance=sender_balance)
    return int(account["id"])


def test_pending_charge_of_a_dead_process_is_refunded_at_next_start(
    relay_factory, sink, database_url
):
    path = database_url
    earlier = datetime.now(UTC) - timedelta(days=2)  # another day's window
    dead = Store(path, clock=lambda: earlier)
    account_id = seed(dead, 10)
    dead.reserve(SENDER, account_id=account_id, recipients=3, unit=1, default_balance=0)
    dead.close()
    # A reservation of a process still forwarding is recent: the sweep leaves it.
    alive = Store(path)
    alive.reserve(SENDER, account_id=account_id, recipients=2, unit=1, default_balance=0)
    alive.close()

    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), RELAY_DATABASE=str(path))
    assert balance(relay.store) == 8
    assert relay.store.pending_count() == 1
    # The dead one's window was given back too; the live one's still counts.
    assert relay_counts(relay.store)[0] == 2
    seen = Store(path, clock=lambda: earlier)
    assert next(r for r in seen.show_limits() if r["scope"] == "relay")["daily_count"] == 0
    seen.close()


def test_settle_stale_refunds_only_what_is_old_enough(database_url):
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    clock = lambda: now  # noqa: E731
    store = Store(database_url, clock=clock)
    account_id = seed(store, 5)
    first = store.reserve(SENDER, account_id=account_id, recipients=2, unit=1, default_balance=0)
    now += timedelta(seconds=100)
    store.reserve(SENDER, account_id=account_id, recipients=1, unit=1, default_balance=0)
    assert balance(store) == 2
    settled = store.settle_stale(older_than=60)
    assert [(r["id"], r["sender"], r["count"]) for r in settled] == [(first.id, SENDER, 2)]
    assert balance(store) == 4
    assert store.pending_count() == 1
    # Settling a reservation the sweep took already refunds nothing twice.
    assert store.settle(first.id, 0) == 0
    assert balance(store) == 4
    store.close()


# --- the store's guarantees, without a server ------------------------------------------


def test_reserve_never_goes_below_zero_and_changes_nothing_when_refused(database_url):
    store = Store(database_url)
    account_id = seed(store, 2)
    with pytest.raises(Refused) as refused:
        store.reserve(SENDER, account_id=account_id, recipients=3, unit=1, default_balance=9)
    assert (refused.value.balance, refused.value.hit) == (2, None)
    assert balance(store) == 2
    assert store.pending_count() == 0
    reservation = store.reserve(
        SENDER, account_id=account_id, recipients=2, unit=1, default_balance=9
    )
    assert reservation.charged == 2
    assert balance(store) == 0
    assert store.settle(reservation.id, 1) == 1
    assert balance(store) == 1
    store.close()


def test_reserve_creates_a_deleted_row_with_the_default(database_url):
    store = Store(database_url)
    account_id = seed(store, 2)
    store.delete_sender(SENDER)
    store.reserve(SENDER, account_id=account_id, recipients=1, unit=1, default_balance=4)
    assert balance(store) == 3
    store.close()


def test_admin_edits_are_checked(database_url):
    store = Store(database_url)
    seed(store, 2)
    with pytest.raises(RelayError, match="negative"):
        store.set_sender(SENDER, balance=-1)
    with pytest.raises(RelayError, match="negative"):
        store.topup_sender(SENDER, -3)
    with pytest.raises(RelayError, match="negative"):
        store.topup_sender("nobody@example.com", -1)
    # A top-up for a sender with no row yet creates it with that balance.
    assert store.topup_sender("new@example.com", 7)["balance"] == 7
    with pytest.raises(RelayError, match="no sender row"):
        store.delete_sender("nobody@example.com")
    assert store.topup_sender(SENDER, -2)["balance"] == 0
    store.close()


# --- the admin commands -------------------------------------------------------------------


def run_cli(
    db: str, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`relay ARGS` on `db`, created (or migrated) first as `relay db init` would;
    `env`: settings besides RELAY_DATABASE."""
    store = Store(db)
    store.migrate()
    store.close()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "RELAY_DATABASE": db,
           **(env or {})}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def cli_json(db: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return json.loads(run_cli(db, *args, "--json", env=env).stdout)


def test_cli_sender_commands(database_url):
    db = database_url
    assert cli_json(db, "sender", "list") == []
    shown = cli_json(db, "sender", "set", "App@Example.com", "--balance", "5")
    assert {k: shown[k] for k in ("address", "balance", "enabled")} == {
        "address": SENDER,
        "balance": 5,
        "enabled": True,
    }
    shown = cli_json(db, "sender", "set", SENDER, "--disabled")
    assert (shown["balance"], shown["enabled"]) == (5, False)
    assert cli_json(db, "sender", "topup", SENDER, "3")["balance"] == 8
    shown = cli_json(db, "sender", "show", SENDER)
    assert {k: shown[k] for k in ("address", "balance", "enabled")} == {
        "address": SENDER,
        "balance": 8,
        "enabled": False,
    }
    assert cli_json(db, "sender", "set", SENDER, "--enabled")["enabled"] is True
    listed = cli_json(db, "sender", "list")
    assert [(r["address"], r["balance"], r["enabled"]) for r in listed] == [(SENDER, 8, True)]

    refused = run_cli(db, "sender", "topup", SENDER, "-9", check=False)
    assert (refused.returncode, refused.stderr) == (
        1,
        "relay: a top-up of -9 would make the balance negative\n",
    )
    assert run_cli(db, "sender", "delete", SENDER).stdout == f"deleted the sender row of {SENDER}\n"
    # Deleted: the address starts again from DEFAULT_SEND_BALANCE (0 here), no row.
    never = cli_json(db, "sender", "show", SENDER)
    assert (never["balance"], never["enabled"], never["stored"]) == (0, True, False)
    assert run_cli(db, "sender", "show", "not an address", check=False).returncode == 1
    negative = run_cli(db, "sender", "set", SENDER, "--balance", "-1", check=False)
    assert (negative.returncode, negative.stderr) == (1, "relay: a balance cannot be negative\n")


def test_cli_sender_show_of_an_address_never_charged(database_url, relay_factory, sink):
    """The balance an address would send with, before its first charge makes a row."""
    db = database_url
    env = {"DEFAULT_SEND_BALANCE": "5"}
    shown = cli_json(db, "sender", "show", "App@Example.com", env=env)
    assert shown == {"address": SENDER, "balance": 5, "enabled": True, "created": None,
                     "updated": None, "unlimited": False, "stored": False}  # fmt: skip
    text = run_cli(db, "sender", "show", SENDER, env=env).stdout
    assert text == (
        f"{SENDER}  balance=5  enabled"
        "  (nothing charged yet: the DEFAULT_SEND_BALANCE it starts with)\n"
    )
    assert run_cli(db, "sender", "show", SENDER).stdout.startswith(f"{SENDER}  balance=0  ")
    run_cli(db, "nolimit", "add", SENDER)
    shown = cli_json(db, "sender", "show", SENDER, env=env)
    assert (shown["unlimited"], shown["stored"]) == (True, False)
    assert "  unlimited (on the nolimit list" in run_cli(db, "sender", "show", SENDER).stdout
    run_cli(db, "nolimit", "remove", SENDER)
    # The relay charges the first message from that default: then the row exists.
    relay = relay_factory(SMTP_CONFIG=sink.smtp_config(), **env)
    with relay.login() as client:
        client.sendmail(SENDER, ["r@dest.test"], message())
    shown = cli_json(db, "sender", "show", SENDER, env=env)
    assert (shown["balance"], shown["stored"], shown["unlimited"]) == (4, True, False)
    assert isinstance(shown["created"], int)


def test_cli_sender_delete_takes_json(database_url):
    db = database_url
    run_cli(db, "sender", "set", SENDER, "--balance", "1")
    assert cli_json(db, "sender", "delete", SENDER) == {"address": SENDER, "deleted": True}
    assert cli_json(db, "sender", "list") == []


def test_cli_nolimit_commands(database_url):
    db = database_url
    assert run_cli(db, "nolimit", "add", "Ops@Example.com").stdout == "added ops@example.com\n"
    run_cli(db, "nolimit", "add", SENDER)
    run_cli(db, "nolimit", "add", SENDER)  # adding twice is harmless
    assert [r["address"] for r in cli_json(db, "nolimit", "list")] == [SENDER, "ops@example.com"]
    assert run_cli(db, "nolimit", "remove", SENDER).stdout == f"removed {SENDER}\n"
    assert [r["address"] for r in cli_json(db, "nolimit", "list")] == ["ops@example.com"]
    again = run_cli(db, "nolimit", "remove", SENDER, check=False)
    assert (again.returncode, again.stderr) == (1, f"relay: {SENDER} is not on the list\n")


def test_cli_limits_commands(database_url):
    db = database_url
    store = Store(db)
    account_id = seed(store, 10)
    store.reserve(SENDER, account_id=account_id, recipients=2, unit=1, default_balance=0)
    store.close()

    relay_row = cli_json(db, "limits", "set", "--daily", "100")
    assert {k: relay_row[k] for k in ("scope", "daily", "monthly", "daily_count")} == {
        "scope": "relay",
        "daily": 100,
        "monthly": -1,
        "daily_count": 2,
    }
    acme = cli_json(db, "limits", "set", "--monthly", "0", "--account", "acme")
    assert (acme["scope"], acme["daily"], acme["monthly"]) == ("acme", -1, 0)
    assert cli_json(db, "limits", "set", "--daily", "5", "--account", "acme")["monthly"] == 0

    before = datetime.now(UTC)
    shown = cli_json(db, "limits", "show")
    after = datetime.now(UTC)
    assert [(r["scope"], r["daily"], r["monthly"]) for r in shown] == [
        ("relay", 100, -1),
        ("acme", 5, 0),
    ]
    assert [(r["daily_count"], r["monthly_count"]) for r in shown] == [(2, 2), (2, 2)]
    resets = {window_reset(Window.DAY, t).isoformat() for t in (before, after)}
    assert shown[0]["daily_resets_at"] in resets
    assert shown[0]["daily_resets_at"].endswith("T00:00:00+00:00")

    for bad, why in (
        (("--daily", "-2"), "relay: a limit is -1 (unlimited), 0 (blocks sending) or more\n"),
        ((), "relay: give --daily N and/or --monthly N (-1 unlimited, 0 blocks sending)\n"),
        (("--daily", "1", "--account", "nobody"), "relay: no account named 'nobody'\n"),
    ):
        done = run_cli(db, "limits", "set", *bad, check=False)
        assert (done.returncode, done.stderr) == (1, why)


def test_a_retry_is_not_charged_within_the_idempotency_window_only(database_url):
    now = [datetime(2026, 11, 21, 12, 0, tzinfo=UTC)]
    store = Store(database_url, clock=lambda: now[0])
    store.migrate()
    store.create_account("acme")
    store.set_sender(SENDER, balance=5)
    first = store.reserve(SENDER, account_id=1, recipients=1, unit=1, default_balance=0,
                          idempotency_key="k1")  # fmt: skip
    store.settle(first.id, 1, "k1")
    retry = store.reserve(SENDER, account_id=1, recipients=1, unit=1, default_balance=0,
                          idempotency_key="k1")  # fmt: skip
    assert (retry.replay, retry.charged) == (True, 0)
    assert store.show_sender(SENDER)["balance"] == 4
    # A replay does not extend the window: it runs from the first delivery.
    now[0] += timedelta(hours=22)
    store.settle(store.reserve(SENDER, account_id=1, recipients=1, unit=1, default_balance=0,
                               idempotency_key="k1").id, 1, "k1")  # fmt: skip
    now[0] += timedelta(hours=1, seconds=1)
    late = store.reserve(SENDER, account_id=1, recipients=1, unit=1, default_balance=0,
                         idempotency_key="k1")  # fmt: skip
    assert (late.replay, late.charged) == (False, 1)
    assert store.show_sender(SENDER)["balance"] == 3
    store.close()
