"""Prometheus metrics: every figure the relay exports, and the calls that move them.

The rest of the relay calls the small functions below (`metrics.auth("success")`,
`metrics.reply(line)`, ...), never prometheus_client itself. Labels have a
bounded set of values: a result, a channel name, a reply code, an outcome, a
store method, a window. No label ever holds an address, a token id or a
Message-ID; those are in the delivery log.

One process records into its own registry. With `--workers N` each worker calls
`use_multiprocess(directory)` after the fork: its figures go to files in that
directory (prometheus_client's multiprocess mode), and `exposition()` in the
worker that serves the admin listener adds up the files of all of them. The
parent makes the directory private and removes it at exit (`relay.workers.run`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from relay.policy import is_balance_refusal, is_scope_refusal, limit_reached, token_rate_limited
from relay.replies import Reply
from relay.tokenrules import RateHit
from relay.windows import LimitHit

T = TypeVar("T")

CONNECTION_RESULTS = ("accepted", "refused_cap", "refused_ip", "tls_failed")
AUTH_RESULTS = ("success", "failure", "throttled")
# Why a token's own rules refused (relay.tokenrules): a sender outside its scope,
# a full rate window, AUTH from outside its networks.
REFUSAL_REASONS = ("scope", "token_rate", "network")
# The ports a client may come in on (RelaySession.listener), and what became of a
# STARTTLS: upgraded, its handshake failed, or none within the AUTH timeout.
LISTENERS = ("smtps", "submission")
STARTTLS_RESULTS = ("upgraded", "failed", "timeout")
UPSTREAM_ERROR_KINDS = ("timeout", "refused", "throttled", "unavailable", "credentials")
# Message sizes up to the documented 5 MiB; forward and store times from the
# sub-millisecond inline store call to the 60 s forward budget.
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 2097152, 5242880)
FORWARD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 10.0)
# The variable prometheus_client's multiprocess mode reads its directory from.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The relay's metrics, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # livesum: the open sessions of the workers alive now, added up.
        self.sessions = Gauge(
            "relay_sessions", "Open client sessions", registry=registry, multiprocess_mode="livesum"
        )
        self.connections = Counter(
            "relay_connections",
            "Client connections by result (accepted, refused_cap, refused_ip, tls_failed)",
            ["result"],
            registry=registry,
        )
        self.auth = Counter("relay_auth", "AUTH attempts by result", ["result"], registry=registry)
        self.messages = Counter(
            "relay_messages",
            "Messages that reached the end of DATA, by channel and outcome",
            ["channel", "outcome"],
            registry=registry,
        )
        self.recipients = Counter(
            "relay_recipients",
            "Recipients of those messages, by channel and outcome",
            ["channel", "outcome"],
            registry=registry,
        )
        self.message_bytes = Histogram(
            "relay_message_bytes",
            "Size of messages that reached the end of DATA",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.replies = Counter(
            "relay_replies", "Final replies sent, by reply code", ["code"], registry=registry
        )
        self.forward_seconds = Histogram(
            "relay_forward_seconds",
            "Time a forward took with its upstream",
            ["channel"],
            buckets=FORWARD_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "relay_upstream_errors",
            "Forwards the upstream did not take, by channel and kind",
            ["channel", "kind"],
            registry=registry,
        )
        self.failovers = Counter(
            "relay_failovers",
            "Messages a channel provably did not take, tried next on another, by channel",
            ["from", "to"],
            registry=registry,
        )
        self.delivery_attempts = Counter(
            "relay_delivery_attempts",
            "Channel attempts at a message (in session or from the queue), by channel and result",
            ["channel", "result"],
            registry=registry,
        )
        # The queue is the database's, not a process's: one process (the one serving
        # the admin listener) sets these; livemax reads its value, whatever its pid.
        self.queue_messages = Gauge(
            "relay_queue_messages",
            "Messages in the durable queue, by state (queued, held)",
            ["state"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.queue_oldest = Gauge(
            "relay_queue_oldest_seconds",
            "Age of the oldest message in the durable queue (0 when it is empty)",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.store_seconds = Histogram(
            "relay_store_seconds",
            "Time of store calls on the session path, by operation",
            ["op"],
            buckets=STORE_BUCKETS,
            registry=registry,
        )
        self.balance_refusals = Counter(
            "relay_balance_refusals",
            "Transactions refused for an exhausted balance or a disabled sender",
            registry=registry,
        )
        self.limit_hits = Counter(
            "relay_limit_hits",
            "Transactions refused by a full send-limit window",
            ["window"],
            registry=registry,
        )
        self.refusals = Counter(
            "relay_refusals",
            "Refusals by a token's own rules, by reason (scope, token_rate, network)",
            ["reason"],
            registry=registry,
        )
        # By port: a metric of its own rather than a `listener` label on
        # relay_messages, whose existing series (and the queries and alerts
        # written against them) would all change their label set.
        self.listener_messages = Counter(
            "relay_listener_messages",
            "Messages that reached the end of DATA, by the port they came in on and outcome",
            ["listener", "outcome"],
            registry=registry,
        )
        self.starttls = Counter(
            "relay_starttls",
            "STARTTLS on the submission port by result (upgraded, failed, timeout)",
            ["result"],
            registry=registry,
        )
        # Known label values start at 0, so a rate() sees the first event.
        for result in CONNECTION_RESULTS:
            self.connections.labels(result)
        for result in AUTH_RESULTS:
            self.auth.labels(result)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        for result in STARTTLS_RESULTS:
            self.starttls.labels(result)


_active = Metrics(CollectorRegistry())
_directory: str | None = None


def private_directory() -> str:
    """A new directory for the workers' metric files, readable by this user only."""
    return tempfile.mkdtemp(prefix="relay-metrics-")


def remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def use_multiprocess(directory: str) -> None:
    """In a worker, after the fork: record into `directory`, shared with the other workers.

    prometheus_client picks its value class, and reads the directory, from the
    environment; this sets both before any metric is made again.
    """
    global _active, _directory
    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _directory = directory
    _active = Metrics(CollectorRegistry())


def worker_gone(directory: str, pid: int) -> None:
    """A worker exited: its open sessions no longer count (the livesum gauge)."""
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def exposition() -> tuple[bytes, str]:
    """The text format for `GET /metrics`: this process's figures, or all workers'."""
    if _directory is None:
        return generate_latest(_active.registry), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=_directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


# --- the calls -------------------------------------------------------------------


def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: prometheus_client's lookup showed in
    the profile at a few microseconds a call, several calls a message."""
    key = (id(metric), labels)
    child = _active.children.get(key)
    if child is None:
        child = _active.children[key] = metric.labels(*labels)
    return child


def connection(result: str) -> None:
    _child(_active.connections, result).inc()


def auth(result: str) -> None:
    _child(_active.auth, result).inc()


def starttls(result: str) -> None:
    _child(_active.starttls, result).inc()


def reply(line: str) -> None:
    """A final reply the server sent, counted by its three-digit code."""
    code = line[:3]
    _child(_active.replies, code if code.isdigit() else "other").inc()


def message(
    channel: str, outcome: str, size: int, recipients: dict[str, int], listener: str = "smtps"
) -> None:
    _child(_active.messages, channel, outcome).inc()
    _child(_active.listener_messages, listener, outcome).inc()
    _active.message_bytes.observe(size)
    for kind, count in recipients.items():
        _child(_active.recipients, channel, kind).inc(count)


def forwarded(channel: str, seconds: float) -> None:
    _child(_active.forward_seconds, channel).observe(seconds)


def upstream_error(channel: str, kind: str) -> None:
    _child(_active.upstream_errors, channel, kind).inc()


def failover(origin: str, to: str) -> None:
    _child(_active.failovers, origin, to).inc()


def delivery_attempt(channel: str, result: str) -> None:
    """One channel attempt: `delivered`, `not_taken` (another may try), `deferred`
    (the outcome unknown, or nothing left to try), `refused` (for good)."""
    _child(_active.delivery_attempts, channel, result).inc()


def upstream_error_kind(failure: Reply, *, timed_out: bool = False) -> str:
    """Which kind of upstream failure a channel's reply (or the forward budget) tells of."""
    if timed_out or failure.text.endswith("upstream timed out"):
        return "timeout"
    if failure.text.endswith("upstream rejected relay credentials"):
        return "credentials"
    if failure.is_permanent:
        return "refused"
    if failure.enhanced.startswith("4.7"):
        return "throttled"
    return "unavailable"


def refusal(answer: Reply, hit: LimitHit | None = None, rate: RateHit | None = None) -> None:
    """Count a MAIL, RCPT or end-of-DATA answer that refused for a balance, a limit,
    or the token's sender scope or rates."""
    if is_balance_refusal(answer):
        _active.balance_refusals.inc()
    elif hit is not None and answer == limit_reached(hit):
        _child(_active.limit_hits, str(hit.window)).inc()
    elif rate is not None and answer == token_rate_limited(rate):
        refused_by("token_rate")
    elif is_scope_refusal(answer):
        refused_by("scope")


def refused_by(reason: str) -> None:
    """A refusal by a token's own rules (REFUSAL_REASONS); `network` is counted at AUTH."""
    _child(_active.refusals, reason).inc()


def queue(states: dict[str, int], oldest_seconds: float) -> None:
    """The durable queue's depth by state and its oldest message's age, as the upkeep
    last read them (relay.server)."""
    for state, count in states.items():
        _child(_active.queue_messages, state).set(count)
    _active.queue_oldest.set(oldest_seconds)


def store_call(op: str, seconds: float) -> None:
    """One store call's time (`AsyncStore.run` times each, several a message)."""
    _child(_active.store_seconds, op).observe(seconds)


class SessionSet(set[T]):
    """The open sessions; `relay_sessions` follows its size."""

    def add(self, item: T) -> None:
        if item not in self:
            super().add(item)
            _active.sessions.inc()

    def discard(self, item: object) -> None:
        if item in self:
            super().discard(item)
            _active.sessions.dec()
