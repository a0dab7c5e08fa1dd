"""The delivery-log step: fill N records (1 million by default), time the queries.

    python -m bench --delivery-log 1000000

Fills a fresh database in a temporary directory with records spread over 30
days (1,000 senders, 100,000 recipients, 1.5 recipients a message, 1 in 100
deferred), then times `Store.find_deliveries`, the query `relay log` runs, for
each filter: the median of a few runs. The target is well under a second each.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay.store.deliveries import Outcome, Query
from relay.store.facade import Store

RUNS = 5
TARGET_SECONDS = 1.0
SPAN = 30 * 86400
SENDERS = 1000
RECIPIENTS = 100_000
BATCH = 50_000


def _rows(
    count: int, now: int, seed: int = 12
) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]:
    rng = random.Random(seed)
    for n in range(1, count + 1):
        created = now - SPAN + (SPAN * n) // count
        roll = rng.random()
        outcome = (
            Outcome.DEFERRED
            if roll < 0.01
            else Outcome.REFUSED
            if roll < 0.03
            else Outcome.DELIVERED
        )
        code, enhanced = {Outcome.DELIVERED: (250, "2.0.0"), Outcome.REFUSED: (554, "5.0.0"),
                          Outcome.DEFERRED: (451, "4.3.0")}[outcome]  # fmt: skip
        sender = f"s{rng.randrange(SENDERS)}@bench.test"
        delivery = (n, created, f"<m{n}@bench.test>", f"account{n % 10}", "tok", sender,
                    2048, "smtp", 3, str(outcome), code, enhanced, "Ok", f"up{n}", 1, 5,
                    "127.0.0.1", 0)  # fmt: skip
        rcpts = {f"r{rng.randrange(RECIPIENTS)}@dest.test" for _ in range(1 + (n % 2))}
        yield delivery, [(n, r, str(outcome), code, enhanced) for r in rcpts]


def fill(store: Store, count: int, now: int) -> None:
    db = store.db
    deliveries: list[tuple[Any, ...]] = []
    recipients: list[tuple[Any, ...]] = []

    def flush() -> None:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO deliveries (id, created, message_id, account, token_id, sender, size,"
            " channel, rule, outcome, reply_code, reply_enhanced, reply_text, upstream_id,"
            " charged, duration_ms, client, replay)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            deliveries,
        )
        db.executemany(
            "INSERT INTO delivery_recipients (delivery_id, recipient, outcome, code, enhanced)"
            " VALUES (?, ?, ?, ?, ?)",
            recipients,
        )
        db.execute("COMMIT")
        deliveries.clear()
        recipients.clear()

    for delivery, rcpts in _rows(count, now):
        deliveries.append(delivery)
        recipients.extend(rcpts)
        if len(deliveries) >= BATCH:
            flush()
    if deliveries:
        flush()
    db.execute("ANALYZE")


def queries(count: int, now: int) -> dict[str, Query]:
    middle = count // 2
    return {
        "newest 50": Query(),
        "message-id": Query(message_id=f"<m{middle}@bench.test>"),
        "sender": Query(sender="s7@bench.test"),
        "recipient": Query(recipient="r4242@dest.test"),
        "account": Query(account="account3"),
        "outcome deferred": Query(outcome=Outcome.DEFERRED),
        "since 1h": Query(since=now - 3600),
        "sender, last 7 days": Query(sender="s7@bench.test", since=now - 7 * 86400),
        "recipient, until 20 days ago": Query(recipient="r4242@dest.test", until=now - 20 * 86400),
        "outcome refused, until 25 days ago": Query(
            outcome=Outcome.REFUSED, until=now - 25 * 86400
        ),
        "1000 newest": Query(limit=1000),
    }


def run(count: int) -> dict[str, Any]:
    now = int(time.time())
    with tempfile.TemporaryDirectory(prefix="relay-bench-log-") as directory:
        store = Store(Path(directory) / "relay.db")
        store.migrate()
        started = time.perf_counter()
        fill(store, count, now)
        filled = time.perf_counter() - started
        size = store.path.stat().st_size
        results: dict[str, Any] = {}
        for name, query in queries(count, now).items():
            times, found = [], 0
            for _ in range(RUNS):
                began = time.perf_counter()
                found = len(store.find_deliveries(query))
                times.append(time.perf_counter() - began)
            results[name] = {"median_ms": round(statistics.median(times) * 1000, 2),
                             "max_ms": round(max(times) * 1000, 2), "records": found}  # fmt: skip
        store.close()
    worst = max(r["max_ms"] for r in results.values()) / 1000
    return {
        "records": count,
        "fill_seconds": round(filled, 1),
        "database_mib": round(size / 2**20, 1),
        "queries": results,
        "target": f"every query under {TARGET_SECONDS:g} s",
        "met": worst < TARGET_SECONDS,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"delivery log: {result['records']:,} records, filled in {result['fill_seconds']} s,"
        f" {result['database_mib']} MiB",
        f"{'query':<36} {'median ms':>10} {'max ms':>8} {'records':>8}",
    ]
    for name, r in result["queries"].items():
        lines.append(f"{name:<36} {r['median_ms']:>10} {r['max_ms']:>8} {r['records']:>8}")
    lines.append(f"target ({result['target']}): {'met' if result['met'] else 'MISSED'}")
    return "\n".join(lines)
