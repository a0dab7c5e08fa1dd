"""The load benchmark at a tiny size, end to end, so it cannot rot.

It runs `python -m bench` as a user would (a subprocess, from the repository
root) with a few messages, a few idle sessions and one size, and checks the
shape of the JSON and that every message the relay accepted reached the sink.
It asserts no speed: timings on a shared machine say nothing about correctness.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SESSIONS = 2
MESSAGES = 3
SIZE = 2048
RUN_TIMEOUT = 300  # seconds; the run takes about 40 on 2 idle cores (its delivery rows, the pairs)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    args = [
        sys.executable,
        "-m",
        "bench",
        "--sizes",
        "2k",
        "--sessions",
        str(SESSIONS),
        "--messages",
        str(MESSAGES),
        "--rounds",
        "1",
        "--idle",
        "3",
        "--latency-seconds",
        "0.5",
        "--workers",
        "1,2",
        "--wal-seconds",
        "1",
        "--burst-connections",
        "20",
        "--stall-noops",
        "10",
        "--stalled-uploads",
        "3",
        "--outage-messages",
        "20",
        "--outage-seconds",
        "0.5",
        "--resend-messages",
        "20",
        "--no-delivery-postgres",
        # The pair's mechanism against the committed relay: HEAD is in any clone,
        # shallow or not, where the default's older commit may not be.
        "--baseline",
        "HEAD",
        "--json-out",
        str(out),
    ]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "target" in done.stdout  # the human table was printed
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.mark.slow
def test_the_result_has_every_section(result: dict[str, Any]) -> None:
    for key in (
        "date",
        "machine",
        "plan",
        "throughput",
        "latency_at_half_max",
        "idle_sessions",
        "workers",
        "forwarding",
        "relay_peak_rss",
        "targets",
        "wall_seconds",
    ):
        assert key in result, key
    [entry] = result["throughput"]
    assert entry["size"] == SIZE
    assert {"ceiling", "relay", "ratio", "added_latency_ms"} <= entry.keys()
    for side in ("ceiling", "relay"):
        phase = entry[side]
        assert {"messages_per_s", "latency_ms", "server_cpu_s_per_1000", "server_peak_rss"} <= (
            phase.keys()
        )
        assert {"p50", "p99"} <= phase["latency_ms"].keys()
    assert {"ceiling", "relay", "added_ms"} <= result["latency_at_half_max"].keys()
    assert [w["workers"] for w in result["workers"]] == [1, 2]
    assert [e["sessions"] for e in result["idle_sessions"]["relay"]] == [3]
    assert result["idle_sessions"]["relay"][0]["held"] is True
    names = " ".join(t["name"] for t in result["targets"])
    assert "relay / ceiling" in names and "idle" in names and "latency" in names


@pytest.mark.slow
def test_every_message_was_sent_and_forwarded(result: dict[str, Any]) -> None:
    relay = result["throughput"][0]["relay"]
    assert relay["messages_sent"] == SESSIONS * MESSAGES
    assert relay["messages_failed"] == 0, relay["errors"]
    assert relay["sink"]["messages"] == relay["messages_ok"] == SESSIONS * MESSAGES
    assert relay["forwarded_all"] is True
    forwarding = result["forwarding"]
    # Every relay phase counts: warm-ups, the load, the paced run.
    assert forwarding["sink_received"] == forwarding["accepted"] == forwarding["sent"] > 0
    assert forwarding["all_forwarded"] is True
    ceiling = result["throughput"][0]["ceiling"]
    assert ceiling["messages_ok"] == SESSIONS * MESSAGES


@pytest.mark.slow
def test_the_hardening_phases_report_their_figures(result: dict[str, Any]) -> None:
    hard = result["hardening"]
    assert hard["wal"]["messages"] > 0 and hard["wal"]["peak_bytes"] >= hard["wal"]["after_bytes"]
    assert len(hard["bursts"]["rss_after"]) == 10 and hard["bursts"]["failed"] == 0
    assert hard["stall"]["noops"] == 10 and hard["stall"]["messages_sent"] >= 1
    assert hard["refusals"]["refused"] >= 1 and hard["refusals"]["growth_bytes"] >= 0
    stalled = hard["stalled_uploads"]
    assert stalled["sessions"] == 3 and stalled["upload_bytes"] > 1_900_000
    assert stalled["rss_stalled"] > 0 and stalled["per_stalled_upload"] is not None
    log = result["delivery_log"]
    assert log["on"]["forwarded_all"] is True and log["off"]["forwarded_all"] is True
    queue = result["queue"]
    assert queue["delivered_all"] is True and queue["messages"] == SESSIONS * MESSAGES
    assert queue["accept_messages_per_s"] and queue["drain_messages_per_s"]
    names = " ".join(t["name"] for t in result["targets"])
    assert "delivery log" in names and "RELAY_QUEUE=always" in names
    assert "write-ahead log" in names and "bursts" in names and "NOOP" in names
    assert "refused messages" in names
    assert "RSS per stalled upload" in names


@pytest.mark.slow
def test_the_delivery_rows_report_their_figures(result: dict[str, Any]) -> None:
    row = result["delivery"]["sqlite"]
    outage, resend, failover = row["outage"], row["resend"], row["failover"]
    assert outage["delivered_all"] is True and outage["messages"] == 20
    assert outage["drain_s"] > 0
    assert resend["delivered_all"] is True and resend["sent"] == 20 and resend["batches"] >= 1
    assert failover["forwarded_all"] is True and failover["latency_ms"]["p99"] is not None
    names = " ".join(t["name"] for t in result["targets"])
    assert "upstream outage (SQLite)" in names and "Resend" in names and "failover" in names


@pytest.mark.slow
def test_the_queue_off_pair_against_an_earlier_relay(result: dict[str, Any]) -> None:
    base = result["baseline"]
    assert base["revision"] == "HEAD"
    has_git = (
        shutil.which("git") is not None
        and subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, check=False
        ).returncode
        == 0
    )
    if not has_git:  # a checkout without its history: the one line that says so
        assert "git" in base["skipped"]
        return
    assert "skipped" not in base, base
    assert base["baseline"]["forwarded_all"] is True and base["relay"]["forwarded_all"] is True
    assert base["rate_ratio"] > 0
    # Six messages may take less CPU than one clock tick (/proc counts 10 ms):
    # then there is no ratio, and the report says so rather than divide by 0.
    if base["baseline"]["server_cpu_s_per_1000"] and base["relay"]["server_cpu_s_per_1000"]:
        assert base["cpu_ratio"] > 0
    else:  # a side measured no tick: no ratio, or 0 over the other's
        assert base["cpu_ratio"] in (None, 0.0)
    names = " ".join(t["name"] for t in result["targets"])
    assert "queue off / the relay at HEAD" in names
