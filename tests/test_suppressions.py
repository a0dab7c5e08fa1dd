"""The suppression list and the webhook outbox in the store: on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from support import FrozenClock

from relay.errors import Invalid, NotFound
from relay.replies import Reply
from relay.store.deliveries import DeliveryRecord, Outcome, Query, RecipientOutcome
from relay.store.facade import Store

pytestmark = pytest.mark.backends

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Store:
    store = Store(database_url, clock=FrozenClock(T0))
    store.migrate()
    store.create_account("acme")
    return store


def clock(store: Store) -> FrozenClock:
    assert isinstance(store.clock, FrozenClock)
    return store.clock


def claim(store: Store) -> list:
    return store.claim_webhook_events(store.due_webhook_events())


def account_id(store: Store) -> int:
    return int(store.list_accounts()[0]["id"])


def test_add_list_remove_and_domain_entries(store: Store) -> None:
    row = store.add_suppression("acme", "Bob@Example.org", reason="complaint", expires_in=60)
    assert (row["address"], row["reason"], row["expires"]) == (
        "bob@example.org",
        "complaint",
        int(T0.timestamp()) + 60,
    )
    store.add_suppression("acme", "*@Spam.test")
    aid = account_id(store)
    assert store.suppression_for(aid, "BOB@example.org") is not None
    found = store.suppression_for(aid, "anyone@spam.test")
    assert found is not None and (found.address, found.reason) == ("*@spam.test", "manual")
    assert store.suppression_for(aid, "carol@example.org") is None
    assert [r["address"] for r in store.list_suppressions("acme")] == [
        "*@spam.test",
        "bob@example.org",
    ]
    store.remove_suppression("acme", "bob@example.org")
    with pytest.raises(NotFound):
        store.remove_suppression("acme", "bob@example.org")
    for bad in ("not an address", "*@", "a@b@", ""):
        with pytest.raises(Invalid):
            store.add_suppression("acme", bad)
    with pytest.raises(Invalid):
        store.add_suppression("acme", "x@y.test", reason="spite")


def test_an_entry_expires(store: Store) -> None:
    store.add_suppression("acme", "bob@example.org", expires_in=60)
    aid = account_id(store)
    clock(store).advance(seconds=61)
    assert store.suppression_for(aid, "bob@example.org") is None
    assert store.list_suppressions("acme") == []
    assert store.prune_suppressions() == 1


def record(*recipients: RecipientOutcome, channel: str = "smtp") -> DeliveryRecord:
    refused = any(r.outcome is Outcome.REFUSED for r in recipients)
    delivered = any(r.outcome is Outcome.DELIVERED for r in recipients)
    outcome = (
        Outcome.PARTIAL
        if refused and delivered
        else Outcome.REFUSED
        if refused
        else Outcome.DELIVERED
    )
    reply = Reply(250, "2.0.0", "Ok") if delivered else Reply(550, "5.1.1", "smtp: No such user")
    return DeliveryRecord(
        time=int(T0.timestamp()),
        message_id="<m1@example.com>",
        account="acme",
        token_id="tok1",
        sender="alice@example.com",
        recipients=recipients,
        size=100,
        channel=channel,
        rule=3,
        outcome=outcome,
        reply=reply,
    )


BOUNCED = RecipientOutcome("gone@dest.test", Outcome.REFUSED, 550, "5.1.1", "smtp: No such user")
OK = RecipientOutcome("ok@dest.test", Outcome.DELIVERED, 250, "2.0.0")


def test_a_mailbox_refusal_is_suppressed_with_its_record(store: Store) -> None:
    store.record_delivery(record(OK, BOUNCED))
    aid = account_id(store)
    found = store.suppression_for(aid, "gone@dest.test")
    assert found is not None
    assert (found.reason, found.expires) == ("hard-bounce", None)
    assert found.source == "upstream: 5.1.1 smtp: No such user"
    assert store.suppression_for(aid, "ok@dest.test") is None


@pytest.mark.parametrize(
    "recipient",
    [
        # The sender's address (RFC 3463 X.1.7), a policy refusal, a deferral.
        RecipientOutcome("x@dest.test", Outcome.REFUSED, 550, "5.1.7", "smtp: bad sender"),
        RecipientOutcome("x@dest.test", Outcome.REFUSED, 554, "5.7.1", "smtp: spam"),
        RecipientOutcome("x@dest.test", Outcome.DEFERRED, 451, "4.1.1", "smtp: later"),
        # The relay's own words, not an upstream's.
        RecipientOutcome("x@dest.test", Outcome.REFUSED, 550, "5.1.1", "Mailbox unknown"),
    ],
)
def test_what_is_not_suppressed(store: Store, recipient: RecipientOutcome) -> None:
    store.record_delivery(record(OK, recipient))
    assert store.suppression_for(account_id(store), "x@dest.test") is None


def test_a_provider_suppression_lasts_a_day_and_never_shortens_a_permanent_one(
    store: Store,
) -> None:
    text = "cloudflare: recipient on the provider's suppression list (soft_bounce)"
    provider = RecipientOutcome("p@dest.test", Outcome.REFUSED, 550, "5.1.1", text)
    store.add_suppression("acme", "gone@dest.test", reason="complaint")
    store.record_delivery(record(OK, provider, BOUNCED, channel="cloudflare"))
    aid = account_id(store)
    found = store.suppression_for(aid, "p@dest.test")
    assert found is not None and found.reason == "provider"
    assert found.expires == int(T0.timestamp()) + 86400
    kept = store.suppression_for(aid, "gone@dest.test")
    assert kept is not None and kept.reason == "complaint"  # not replaced


def test_events_are_written_with_the_record(store: Store) -> None:
    store.record_delivery(record(OK))  # no endpoint yet: nothing queued
    assert claim(store) == []
    hook = store.add_webhook("acme", "https://hooks.example/x", None)
    assert hook["secret"].startswith("whsec_")
    store.record_delivery(record(OK, BOUNCED))
    due = claim(store)
    assert [d.type for d in due] == ["message.delivered", "recipient.suppressed"]
    assert all(d.secret == hook["secret"] for d in due)
    assert "secret" not in store.list_webhooks("acme")[0]
    only = store.add_webhook("acme", "https://hooks.example/y", "message.refused")
    assert only["events"] == ["message.refused"]
    with pytest.raises(Invalid):
        store.add_webhook("acme", "https://hooks.example/z", "message.exploded")


def test_attempts_retry_and_the_endpoint_is_disabled_after_three_days(store: Store) -> None:
    hook = store.add_webhook("acme", "https://hooks.example/x", None)
    store.test_webhook("acme", hook["id"])
    [due] = claim(store)
    now = int(T0.timestamp())
    assert not store.record_webhook_attempt(
        due.id, due.endpoint_id, status=500, duration_ms=3, answer="x" * 5000, next_attempt=now + 30
    )
    assert claim(store) == []
    [attempt] = store.list_webhook_attempts("acme", hook["id"])
    assert (attempt["status"], len(attempt["answer"]), attempt["state"]) == (500, 1024, "pending")
    clock(store).advance(seconds=3 * 86400 + 1)
    [due] = claim(store)
    assert store.record_webhook_attempt(
        due.id, due.endpoint_id, status=None, duration_ms=10, answer="timeout", next_attempt=None
    )
    [endpoint] = store.list_webhooks("acme")
    assert endpoint["enabled"] is False
    assert store.replay_webhook_event("acme", due.event_id) == 1
    assert claim(store) == []  # disabled: nothing goes until a test re-enables


def test_settled_events_are_pruned_with_their_attempts(store: Store) -> None:
    hook = store.add_webhook("acme", "https://hooks.example/x", None)
    store.test_webhook("acme", hook["id"])
    [due] = claim(store)
    store.record_webhook_attempt(
        due.id, due.endpoint_id, status=200, duration_ms=1, answer="ok", next_attempt=None
    )
    assert store.prune_webhook_events(86400) == 0  # not a day old yet
    clock(store).advance(days=2)
    assert store.prune_webhook_events(86400) == 1
    assert store.list_webhook_attempts("acme", hook["id"]) == []


def test_a_settle_writes_its_record_suppression_and_events_with_it(store: Store) -> None:
    # The settle's own path (on PostgreSQL one statement with its record): the
    # units kept in the record, the refund, the suppression and the events; a
    # second settle of the same reservation changes and records nothing more.
    store.add_webhook("acme", "https://hooks.example/x", None)
    aid = account_id(store)
    held = store.reserve(
        "alice@example.com", account_id=aid, recipients=2, unit=3, default_balance=100
    )
    assert store.show_sender("alice@example.com")["balance"] == 94
    refund = store.settle(held.id, 1, None, record(OK, BOUNCED), held.created)
    assert refund == 3
    assert store.show_sender("alice@example.com")["balance"] == 97
    [kept] = store.find_deliveries(Query())
    assert kept.charged == 3
    assert {r.address for r in kept.recipients} == {"ok@dest.test", "gone@dest.test"}
    assert store.suppression_for(aid, "gone@dest.test") is not None
    assert [d.type for d in claim(store)] == ["message.delivered", "recipient.suppressed"]
    assert store.settle(held.id, 1, None, record(OK), held.created) == 0
    assert store.show_sender("alice@example.com")["balance"] == 97
    assert [r.charged for r in store.find_deliveries(Query())] == [0, 3]
