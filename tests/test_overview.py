"""The console's overview (GET /api/v1/stats/overview): aggregated in the database,
each query of the delivery log a range of its time index, checked at 1M records by
the answer's numbers and by SQLite's query plan (never by a stopwatch)."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from relay.admin import overview
from relay.replies import Reply
from relay.store.browse import LogPage
from relay.store.deliveries import DeliveryRecord, Outcome, RecipientOutcome
from relay.store.facade import Store
from relay.store.stats import (
    CHANNELS_SQL,
    REASONS_SQL,
    SENDERS_SQL,
    SERIES_SQL,
    percentile,
)

pytestmark = pytest.mark.backends  # the tests that take `database_url`: SQLite and PostgreSQL

RECORDS = 1_000_000
# The records span 30 days before NOW, one every SPACING seconds.
NOW = 1_800_000_000
SPACING = 30 * 86400 / RECORDS
OUTCOMES = ("delivered",) * 6 + ("partial", "refused", "deferred", "refused")
CHANNELS = ("smtp", "resend", "")
REPLIES = {
    "delivered": (250, "2.0.0"),
    "partial": (250, "2.0.0"),
    "refused": (550, "5.7.1"),
    "deferred": (451, "4.3.0"),
}


def record(i: int) -> tuple[Any, ...]:
    """The i-th record: a time, and the columns the overview reads, made of i."""
    created = NOW - 30 * 86400 + int(i * SPACING)
    outcome = OUTCOMES[i % len(OUTCOMES)]
    code, enhanced = REPLIES[outcome]
    if outcome == "refused" and i % 20 == 9:
        code, enhanced = 554, "5.7.0"
    return (created, f"<m{i}@x.test>", "acme", "tok", f"s{i % 37}@a.test", 100,
            CHANNELS[i % 3], outcome, code, enhanced, "t", "", 1, (i % 97) * 7, "c", 0)  # fmt: skip


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, list[tuple[Any, ...]]]:
    path = tmp_path_factory.mktemp("overview") / "relay.db"
    setup = Store(path)
    setup.migrate()  # the schema
    setup.close()
    rows = [record(i) for i in range(RECORDS)]
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO deliveries (created, message_id, account, token_id, sender, size,"
            " channel, outcome, reply_code, reply_enhanced, reply_text, upstream_id, charged,"
            " duration_ms, client, replay) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    db.close()
    return Store(path), rows


def plan(path: Path, sql: str, args: tuple[Any, ...]) -> str:
    db = sqlite3.connect(path)
    try:
        return " | ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, args))
    finally:
        db.close()


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        (SERIES_SQL, (0, 60, 0, 1)),
        (REASONS_SQL, (0, 1, 10)),
        (CHANNELS_SQL, (0, 1)),
        (SENDERS_SQL, (0, 1, 10)),
    ],
)
def test_each_query_is_a_range_of_the_time_index(big, sql, args):
    store, _ = big
    shown = plan(store.path, sql, args)
    assert "USING INDEX deliveries_created (created>? AND created<?)" in shown, shown
    assert "SCAN deliveries" not in shown.replace("SCAN deliveries USING INDEX", ""), shown


@pytest.mark.parametrize(
    ("page", "index", "column", "value"),
    [
        (LogPage(account="acme"), "deliveries_account", 2, "acme"),
        (LogPage(account="nobody"), "deliveries_account", 2, "nobody"),
        (LogPage(channel="resend", before=500_000), "deliveries_channel", 6, "resend"),
        (LogPage(channel=""), "deliveries_channel", 6, ""),
    ],
)
def test_each_log_filter_is_a_range_of_its_index(big, page, index, column, value):
    """The console's log filters by account and channel read one index newest
    first, a page at a time: a filter matching nothing at 1M records reads nothing."""
    store, rows = big
    where, args = page.where()
    sql = f"SELECT * FROM deliveries AS d{where} ORDER BY d.id DESC LIMIT ?"
    shown = plan(store.path, sql, (*args, 50))
    assert f"USING INDEX {index} (" in shown, shown
    assert "SCAN" not in shown and "TEMP B-TREE" not in shown, shown
    ids = [r.id for r in store.find_deliveries(page)]
    below = page.before or len(rows) + 1
    expected = [i + 1 for i in reversed(range(len(rows))) if rows[i][column] == value]
    assert ids == [i for i in expected if i < below][:50]


@pytest.mark.parametrize("window", ["1h", "24h", "7d"])
def test_the_overview_at_1m_records_counts_exactly(big, window):
    store, rows = big
    start, step, count = overview.window_bounds(window, NOW)
    end = start + step * count
    inside = [r for r in rows if start <= r[0] < end]
    assert inside, "the window holds records"
    answer = overview.overview(store, window=window, now=NOW)

    assert (answer["start"], answer["step"], answer["buckets"]) == (start, step, count)
    expected: dict[str, list[int]] = {}
    for r in inside:
        expected.setdefault(r[7], [0] * count)[(r[0] - start) // step] += 1
    assert answer["series"] == expected
    assert answer["totals"] == dict(Counter(r[7] for r in inside))

    reasons = Counter((r[7], r[8], r[9]) for r in inside if r[7] in ("refused", "deferred"))
    got = {(x["outcome"], x["code"], x["enhanced"]): x["messages"] for x in answer["refusals"]}
    assert got == dict(reasons)

    for channel in answer["channels"]:
        mine = [r for r in inside if r[6] == channel["channel"]]
        assert channel["messages"] == len(mine)
        assert channel["errors"] == sum(1 for r in mine if r[7] in ("refused", "deferred"))
        durations = sorted(r[13] for r in mine)
        p90 = durations[-(-len(durations) * 90 // 100) - 1]  # the nearest rank
        assert channel["p90_ms"] is not None and channel["p90_ms"] >= p90
    assert {c["channel"] for c in answer["channels"]} == {"smtp", "resend"}


def test_top_senders_today_and_low_balances(big):
    store, rows = big
    answer = overview.overview(store, window="1h", now=NOW)
    day = NOW - NOW % 86400
    today = Counter(r[4] for r in rows if day <= r[0] < NOW + 1)
    top = sorted(today.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert [(s["sender"], s["messages"]) for s in answer["top_senders"]] == top


def test_percentiles_are_band_bounds():
    assert percentile({}, 50) is None
    assert percentile({10: 1}, 99) == 10
    assert percentile({25: 99, 60000: 1}, 99) == 25
    assert percentile({25: 98, 60000: 2}, 99) == 60000


def test_the_overview_on_each_backend(database_url):
    """The same answer from SQLite and PostgreSQL (integer buckets, positional groups)."""
    store = Store(database_url)
    store.migrate()
    try:
        for n, (outcome, code, enhanced, channel, ms) in enumerate([
            (Outcome.DELIVERED, 250, "2.0.0", "smtp", 8),
            (Outcome.DELIVERED, 250, "2.0.0", "smtp", 40),
            (Outcome.REFUSED, 550, "5.1.1", "smtp", 900),
            (Outcome.DEFERRED, 451, "4.3.0", "", 0),
        ]):  # fmt: skip
            store.record_delivery(
                DeliveryRecord(
                    time=NOW - (180, 120, 60, 30)[n], message_id=f"<o{n}@x>", account="acme",
                    token_id="tok", sender=f"s{n % 2}@a.test",
                    recipients=(RecipientOutcome("r@b.test", outcome, code, enhanced),),
                    size=1, channel=channel, rule=None, outcome=outcome,
                    reply=Reply(code, enhanced, "x"), duration=ms / 1000,
                )
            )  # fmt: skip
        store.set_sender("poor@a.test", balance=2)
        store.set_sender("rich@a.test", balance=500)
        answer = overview.overview(store, window="1h", now=NOW)
        assert answer["series"]["delivered"][-4:] == [1, 1, 0, 0]
        assert answer["series"]["deferred"][-4:] == [0, 0, 1, 0]
        assert answer["totals"] == {"delivered": 2, "refused": 1, "deferred": 1}
        assert [(r["code"], r["messages"]) for r in answer["refusals"]] == [(451, 1), (550, 1)]
        [smtp] = answer["channels"]
        assert (smtp["channel"], smtp["messages"], smtp["errors"]) == ("smtp", 3, 1)
        assert (smtp["p50_ms"], smtp["p99_ms"]) == (50, 1000)
        assert answer["top_senders"] == [
            {"sender": "s0@a.test", "messages": 2},
            {"sender": "s1@a.test", "messages": 2},
        ]
        assert answer["low_balances"] == [{"address": "poor@a.test", "balance": 2}]
        assert answer["queue"] == {"states": {}, "depth": 0, "oldest_age": None}
        with pytest.raises(Exception, match="window"):
            overview.overview(store, window="2y", now=NOW)
    finally:
        store.close()
