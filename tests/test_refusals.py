"""One token cannot fill the database disk with refused messages.

A message refused at the end of DATA is charged nothing but leaves a record.
Past RELAY_REFUSAL_LIMIT refusals within 15 minutes, counted in the store across
relays, the token's next MAIL gets 421 4.7.0 and the session closes; a refused
record keeps its first 10 recipients and their count; RELAY_LOG_MAX_MB caps
the delivery log, pruning the oldest records first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import is_postgres
from support import DOMAIN, SENDER, message

from relay.config import Upkeep
from relay.replies import BAD_MESSAGE, Reply
from relay.store.deliveries import DeliveryRecord, Outcome, Query, RecipientOutcome

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.backends

TOO_MANY_REFUSALS = "421 4.7.0 Too many refused messages, try again later"
# RFC 5322 section 3.6: at most one From field.
TWO_FROMS = message(extra=f"From: other@{DOMAIN}\r\n")


def refused_message(raw, rcpts: list[str]) -> str:
    """MAIL, every RCPT pipelined, and a message with two From: the reply to its end."""
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    raw.send("\r\n".join(f"RCPT TO:<{r}>" for r in rcpts).encode())
    assert [raw.read() for _ in rcpts] == ["250 2.1.5 Ok"] * len(rcpts)
    assert raw.cmd("DATA").startswith("354 ")
    raw.send(TWO_FROMS + b".")
    return raw.read()


def test_a_refusal_costs_nothing_and_under_the_limit_mail_goes_on(relay, sink):
    relay.store.set_sender(SENDER, balance=5)
    raw = relay.raw()
    raw.login(relay.token())
    assert refused_message(raw, ["a@dest.test"]).startswith("554 5.6.0 ")
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"  # the default limit is 100
    assert relay.store.show_sender(SENDER)["balance"] == 5
    assert sink.messages == []


def test_past_the_limit_the_next_mail_gets_421_and_the_session_closes(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="1000", RELAY_REFUSAL_LIMIT="3"
    )
    token, other = relay.token(), relay.token()
    raw = relay.raw()
    raw.login(token)
    for _ in range(3):
        assert refused_message(raw, ["a@dest.test"]).startswith("554 5.6.0 ")
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == TOO_MANY_REFUSALS
    assert raw.closed()
    again = relay.raw()
    again.login(token)
    assert again.cmd(f"MAIL FROM:<{SENDER}>") == TOO_MANY_REFUSALS
    # Another token of the same account is not held to this one's refusals.
    fresh = relay.raw()
    fresh.login(other)
    assert fresh.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"
    assert len(relay.store.find_deliveries(Query(outcome=Outcome.REFUSED))) == 3


def test_refusals_are_counted_across_relays_on_one_database(relay_factory, sink, database_url):
    env = {
        "SMTP_CONFIG": sink.smtp_config(),
        "DEFAULT_SEND_BALANCE": "1000",
        "RELAY_REFUSAL_LIMIT": "3",
        "RELAY_DATABASE": database_url,
    }
    first, second = relay_factory(**env), relay_factory(**env)
    token = first.token()
    one, two = first.raw(), second.raw()
    one.login(token)
    two.login(token)
    assert refused_message(one, ["a@dest.test"]).startswith("554 ")
    assert refused_message(two, ["a@dest.test"]).startswith("554 ")
    assert refused_message(one, ["a@dest.test"]).startswith("554 ")
    assert two.cmd(f"MAIL FROM:<{SENDER}>") == TOO_MANY_REFUSALS


def test_a_refusal_limit_of_0_is_no_limit(relay_factory, sink):
    relay = relay_factory(
        SMTP_CONFIG=sink.smtp_config(), DEFAULT_SEND_BALANCE="1000", RELAY_REFUSAL_LIMIT="0"
    )
    raw = relay.raw()
    raw.login(relay.token())
    for _ in range(3):
        assert refused_message(raw, ["a@dest.test"]).startswith("554 ")
    assert raw.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Ok"


def test_a_refused_record_keeps_ten_recipients_and_their_count(relay, database_url, tmp_path):
    rcpts = [f"{'r' * 60}{i:02d}@{'d' * 60}.{'e' * 60}.{'f' * 60}.test" for i in range(50)]
    raw = relay.raw()
    raw.login(relay.token())
    reply = refused_message(raw, rcpts)
    assert reply.startswith(f"{BAD_MESSAGE.code} {BAD_MESSAGE.enhanced} ")
    [record] = relay.store.find_deliveries(Query())
    assert record.outcome == Outcome.REFUSED
    assert record.total_recipients == 50
    assert sorted(r.address for r in record.recipients) == sorted(rcpts[:10])
    assert record.as_json()["recipient_count"] == 50
    rows = relay.store.db.execute("SELECT count(*) FROM delivery_recipients").fetchone()[0]
    assert rows == 10
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "RELAY_DATABASE": database_url}
    run = subprocess.run(
        [sys.executable, "-m", "relay", "log", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(run.stdout.splitlines()[0])["recipient_count"] == 50
    shown = subprocess.run(
        [sys.executable, "-m", "relay", "log", "show", record.message_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "recipients  (10 of 50 kept)" in shown


# --- the size cap ----------------------------------------------------------------------


def filler(i: int) -> DeliveryRecord:
    rcpts = tuple(
        RecipientOutcome(f"{'x' * 150}{i}-{n}@dest.test", Outcome.REFUSED, 554, "5.6.0")
        for n in range(10)
    )
    return DeliveryRecord(
        time=1_800_000_000 + i,
        message_id=f"<{i}@fill.test>",
        account="acme",
        token_id="tok",
        sender=SENDER,
        recipients=rcpts,
        size=100,
        channel="",
        rule=None,
        outcome=Outcome.REFUSED,
        reply=Reply(554, "5.6.0", "Message rejected"),
    )


def test_the_log_cap_prunes_the_oldest_records_first(relay_factory, sink, database_url):
    # No upkeep tick of its own meanwhile: the test runs the prune when the log is full.
    quiet = Upkeep(checkpoint_interval=3600)
    relay = relay_factory(upkeep=quiet, SMTP_CONFIG=sink.smtp_config(), RELAY_LOG_MAX_MB="1")
    cap = 1024 * 1024
    ids = [relay.store.record_delivery(filler(i)) for i in range(1500)]
    assert relay.store.log_size()[0] > cap
    relay.call(relay.relay._prune())  # the upkeep tick's prune, due now
    size, _ = relay.store.log_size()
    assert size <= cap
    left = [r.id for r in relay.store.find_deliveries(Query(limit=5000))]
    assert 0 < len(left) < len(ids)
    assert sorted(left) == ids[-len(left) :]  # the newest stayed, the oldest went
    if not is_postgres(database_url):
        # The freed pages are reused: new records do not grow the file past the cap.
        before = os.path.getsize(database_url)
        for i in range(1500, 1800):
            relay.store.record_delivery(filler(i))
        relay.call(relay.relay._prune())  # the upkeep tick's prune, due now
        assert relay.store.log_size()[0] <= cap
        assert os.path.getsize(database_url) <= before
