"""The Grafana dashboard and the Prometheus rules in deploy/ ask only for what the relay exports.

Every `relay_*` series a query names must be one the relay's registry produces
(a counter's `_total`, a histogram's `_bucket`/`_sum`/`_count`, a gauge by its
name), so a renamed metric fails here rather than as an empty panel. The rules
are checked by `promtool check rules` too, where Debian's `prometheus` is
installed (.ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import missing_tool

from relay import metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "relay.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
SERIES = re.compile(r"\brelay_[a-z0-9_]+\b")
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> set[str]:
    """The sample names the relay's metrics produce, by family type."""
    names = set()
    for family in metrics.Metrics(metrics.CollectorRegistry()).registry.collect():
        for suffix in SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def rule_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_the_exported_names_are_read_as_they_are_served() -> None:
    names = exported()
    assert {"relay_messages_total", "relay_forward_seconds_bucket", "relay_sessions"} <= names
    served = metrics.exposition()[0].decode()
    for name in ("relay_messages_total", "relay_auth_total", "relay_sessions"):
        assert re.search(rf"^# TYPE {name} ", served, re.M), name


@pytest.mark.parametrize(
    "queries", [dashboard_queries, rule_queries], ids=["grafana dashboard", "alert rules"]
)
def test_every_query_names_a_metric_the_relay_exports(queries) -> None:
    found = [name for query in queries() for name in SERIES.findall(query)]
    assert found, "no relay_ series in any query"
    assert sorted(set(found) - exported()) == []


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    queries = " ".join(dashboard_queries())
    for metric in (
        "relay_messages_total",  # rates by outcome
        "relay_refusals_total",  # refusals by reason
        "relay_forward_seconds_bucket",  # upstream latency
        "relay_upstream_errors_total",  # upstream errors
        "relay_queue_oldest_seconds",  # the queue
        "relay_connections_total",  # connections
        "relay_auth_total",  # AUTH failures
    ):
        assert metric in queries, metric


def test_a_renamed_metric_is_caught() -> None:
    broken = [q.replace("relay_messages_total", "relay_message_total") for q in rule_queries()]
    found = {name for query in broken for name in SERIES.findall(query)}
    assert found - exported() == {"relay_message_total"}


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_tool("promtool (Debian's prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout
