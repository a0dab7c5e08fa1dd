"""One benchmark run: the phases, in order, and the result they add up to.

Against the relay (the default), on loopback, one sink throughout and a fresh
relay and a fresh ceiling for each block: memory a process freed but kept from
an earlier block would be reused and hide the growth the next block measures.
1. idle sessions: open and authenticate N sessions and hold them; RSS growth / N;
2. large messages (1 MiB and more): throughput and peak RSS growth;
3. small messages: throughput, then latency in an open loop at half the relay's
   measured 2 KiB maximum, at the same rate for the ceiling;
4. the floor: a bare aiosmtplib client forwards the 2 KiB load to the same sink
   (its own process); the relay's CPU per message against the ceiling's plus
   that client's;
5. pipelining: the 2 KiB load through a relay whose sink advertises PIPELINING
   against the one whose sink does not, alternating, then at the paced rate;
   the delivery log on against off; this relay (queue off) against the relay
   before failover and the queue (bench.baseline), alternating;
6. the queue and delivery (bench.delivery): RELAY_QUEUE=always at 2 KiB; the
   drain after an upstream outage, the drain to a Resend allowing 5 requests a
   second, the added p99 of a failover at half load, on SQLite and PostgreSQL;
7. workers: a relay with 2 (or more) workers under the 2 KiB load.
Each block starts with a few warm-up messages, so first-use costs (imports,
the upstream pool) are not measured. Throughput runs are closed loops, ceiling
and relay alternating for `rounds` rounds so drift on a shared machine hits
both sides alike.

Against `--target`, the same client phases without a ceiling, a sink or workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import baseline as baseline_module
from bench import hostile, proc, report, stack
from bench.client import Message, Outcome, Pool, SmtpFailure, Target
from bench.report import HEADLINE_SIZE, KIB, MIB

# The relay's documented SIZE (5 MiB, RFC 1870). A nominal 5 MiB message is sent
# 1 KiB under it, so headers and all stay inside the limit.
MAX_MESSAGE_SIZE = 5 * MIB
SIZE_MARGIN = KIB
LARGE = MIB  # from this size on, the message count and session count are the large ones
SAMPLE_INTERVAL = 0.02  # seconds between RSS samples during a phase
SETTLE = 0.5  # seconds for a server to finish the work of opening sessions before RSS is read
OPEN_DEADLINE = 180.0  # opening the largest idle pool, TLS handshakes included
WARMUP_MESSAGES = 4
FD_HEADROOM = 512  # descriptors beyond the sessions: listeners, the store, pipes, logs


@dataclass(frozen=True)
class Plan:
    """What to run. The defaults take about 13 minutes on 2 cores: most of it the
    delivery rows (two 60 s outages and their drains) and the hardening phases."""

    sizes: tuple[int, ...] = (2 * KIB, 100 * KIB, 5 * MIB)
    sessions: int = 50
    large_sessions: int = 4
    messages: int | None = None  # per session; None picks by size
    rounds: int = 3
    idle: tuple[int, ...] = (1000, 5000)
    latency_seconds: float = 10.0
    workers: tuple[int, ...] = (1, 2)
    phase_timeout: float = 180.0
    wal_seconds: float = 60.0  # 0: no hardening phases (bench.hostile)
    burst_connections: int = 2000
    stall_noops: int = 400
    stalled_uploads: int = 150
    # The delivery rows (bench.delivery): messages queued through an upstream outage
    # of `outage_seconds`, messages drained to a rate-limited Resend; and whether
    # they (and the failover's) run on PostgreSQL too.
    outage_messages: int = 10_000
    outage_seconds: float = 60.0
    resend_messages: int = 3_000
    delivery_postgres: bool = True
    # The relay before failover and the queue, paired with this one (queue off) in
    # one run (bench.baseline); "" skips the pair.
    baseline: str = baseline_module.BASELINE

    def sessions_for(self, size: int) -> int:
        return self.large_sessions if size >= LARGE else self.sessions

    def messages_for(self, size: int) -> int:
        if self.messages is not None:
            return self.messages
        # 60 small messages a session give a stable rate; larger ones are capped
        # near 800 KiB a session (8 x 100 KiB), and at least 3 (3 x 5 MiB) are sent.
        return min(max(round(800 * KIB / size), 3), 60)


def wire_size(size: int) -> int:
    return min(size, MAX_MESSAGE_SIZE - SIZE_MARGIN)


@dataclass
class Side:
    """A server under load: its address, its processes (when local), its sink (relay only)."""

    name: str
    target: Target
    pids: Callable[[], list[int]] | None
    sink: stack.ReferenceServer | None = None


@dataclass
class Watch:
    """What a server's processes did during one phase: CPU, RSS before, peak RSS."""

    side: Side
    before: proc.Usage | None = None
    after: proc.Usage | None = None
    sink_before: proc.Usage | None = None
    sink_after: proc.Usage | None = None
    sink_counts: dict[str, int] = field(default_factory=dict)
    sampled_peak: int = 0
    hwm_reset: bool = False

    @property
    def peak(self) -> int | None:
        if self.after is None:
            return None
        # VmHWM catches peaks between samples, but only once it could be reset.
        return max(self.sampled_peak, self.after.peak if self.hwm_reset else 0)

    @contextlib.asynccontextmanager
    async def over(self) -> AsyncIterator[Watch]:
        side = self.side
        pids = side.pids() if side.pids else []
        if pids:
            self.hwm_reset = proc.reset_peak(pids)
            self.before = proc.usage(pids)
        sink_pids = side.sink.pids if side.sink else []
        if side.sink:
            self.sink_before = proc.usage(sink_pids)
            self.sink_counts = await side.sink.stats()
        sampler = asyncio.create_task(self._sample(pids)) if pids else None
        try:
            yield self
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            if pids:
                self.after = proc.usage(pids)
            if side.sink:
                self.sink_after = proc.usage(sink_pids)
                later = await side.sink.stats()
                self.sink_counts = {k: later[k] - self.sink_counts.get(k, 0) for k in later}

    async def _sample(self, pids: list[int]) -> None:
        # Bounded by the phase: cancelled when it ends.
        while True:
            self.sampled_peak = max(self.sampled_peak, proc.usage(pids).rss)
            await asyncio.sleep(SAMPLE_INTERVAL)


def phase_record(outcome: Outcome, watch: Watch) -> dict[str, Any]:
    sent = outcome.ok + outcome.failed
    cpu = None
    if watch.before is not None and watch.after is not None:
        cpu = watch.after.cpu - watch.before.cpu
    record: dict[str, Any] = {
        "messages_sent": sent,
        "messages_ok": outcome.ok,
        "messages_failed": outcome.failed,
        "errors": dict(outcome.errors.most_common(5)),
        "seconds": round(outcome.seconds, 3),
        "messages_per_s": outcome.ok / outcome.seconds if outcome.seconds > 0 else None,
        "latency_ms": report.latency_ms(outcome.latencies_ns),
        "server_cpu_s": cpu,
        "server_cpu_s_per_1000": report.per_thousand(cpu, outcome.ok),
        "server_processes": watch.after.processes if watch.after else None,
        "server_rss_before": watch.before.rss if watch.before else None,
        "server_peak_rss": watch.peak,
        "client_cpu_s_per_1000": report.per_thousand(outcome.client_cpu, outcome.ok),
        "late_starts": outcome.late,
        "sink": None,
        "forwarded_all": None,
        "_latencies_ns": outcome.latencies_ns,  # merged across rounds, dropped before output
    }
    if watch.side.sink is not None and watch.sink_before and watch.sink_after:
        received = watch.sink_counts.get("messages", 0)
        record["sink"] = {
            "messages": received,
            "connections": watch.sink_counts.get("connections", 0),
            "cpu_s_per_1000": report.per_thousand(
                watch.sink_after.cpu - watch.sink_before.cpu, outcome.ok
            ),
        }
        record["forwarded_all"] = outcome.failed == 0 and received == outcome.ok == sent
    return record


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one phase as one: summed counts, the median rate, latency over all sends."""
    latencies = [v for r in records for v in r["_latencies_ns"]]
    ok = sum(r["messages_ok"] for r in records)
    cpu = [r["server_cpu_s"] for r in records]
    errors: Counter[str] = Counter()
    for r in records:
        errors.update(r["errors"])
    sinks = [r["sink"] for r in records if r["sink"] is not None]
    total_cpu = None if None in cpu else sum(cpu)
    peaks = [r["server_peak_rss"] for r in records if r["server_peak_rss"] is not None]
    client = [r["client_cpu_s_per_1000"] for r in records if r["client_cpu_s_per_1000"]]
    merged: dict[str, Any] = {
        "rounds": len(records),
        "messages_per_s": report.median([r["messages_per_s"] or 0.0 for r in records]),
        "messages_per_s_rounds": [r["messages_per_s"] for r in records],
        "messages_sent": sum(r["messages_sent"] for r in records),
        "messages_ok": ok,
        "messages_failed": sum(r["messages_failed"] for r in records),
        "errors": dict(errors.most_common(5)),
        "latency_ms": report.latency_ms(latencies),
        "server_cpu_s_per_1000": report.per_thousand(total_cpu, ok),
        "server_rss_before": records[0]["server_rss_before"],
        "server_peak_rss": max(peaks) if peaks else None,
        "client_cpu_s_per_1000": report.median(client) if client else None,
        "late_starts": sum(r["late_starts"] for r in records),
        "sink": None,
        "forwarded_all": None,
    }
    if sinks:
        merged["sink"] = {
            "messages": sum(s["messages"] for s in sinks),
            "connections": sum(s["connections"] for s in sinks),
            "cpu_s_per_1000": report.median([s["cpu_s_per_1000"] or 0.0 for s in sinks]),
        }
        merged["forwarded_all"] = all(r["forwarded_all"] for r in records)
    return merged


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


class Runner:
    def __init__(self, plan: Plan, *, tls_target: str) -> None:
        self.plan = plan
        self.messages: dict[tuple[int, str], Message] = {}
        self.forwarding = Counter[str]()
        self.relay_peak = 0
        self.result: dict[str, Any] = {
            "bench": "relay load benchmark",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            "machine": machine(),
            "target": tls_target,
            "plan": asdict(plan),
        }

    def log(self, text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def message(self, size: int, sender: str) -> Message:
        key = (size, sender)
        if key not in self.messages:
            self.messages[key] = Message.of_size(wire_size(size), sender)
        return self.messages[key]

    # --- one phase -----------------------------------------------------------

    async def closed(
        self, side: Side, size: int, sessions: int, per_session: int
    ) -> dict[str, Any]:
        message = self.message(size, side.target.sender)
        pool = await Pool.open(side.target, sessions, deadline=OPEN_DEADLINE)
        try:
            async with Watch(side).over() as watch:
                outcome = await pool.run_closed(
                    message, per_session, deadline=self.plan.phase_timeout
                )
        finally:
            await pool.close()
        return self._record(side, outcome, watch)

    async def paced(
        self, side: Side, size: int, sessions: int, rate: float, count: int
    ) -> dict[str, Any]:
        message = self.message(size, side.target.sender)
        pool = await Pool.open(side.target, sessions, deadline=OPEN_DEADLINE)
        try:
            async with Watch(side).over() as watch:
                outcome = await pool.run_paced(
                    message, rate, count, deadline=self.plan.phase_timeout
                )
        finally:
            await pool.close()
        return self._record(side, outcome, watch)

    def _record(self, side: Side, outcome: Outcome, watch: Watch) -> dict[str, Any]:
        record = phase_record(outcome, watch)
        if side.name == "relay":
            self.relay_peak = max(self.relay_peak, record["server_peak_rss"] or 0)
            if record["sink"] is not None:
                self.forwarding["sent"] += record["messages_sent"]
                self.forwarding["accepted"] += record["messages_ok"]
                self.forwarding["sink_received"] += record["sink"]["messages"]
        return record

    async def idle(self, side: Side, counts: tuple[int, ...]) -> list[dict[str, Any]]:
        """Hold growing numbers of authenticated sessions; the server's RSS growth per session."""
        assert side.pids is not None
        pools: list[Pool] = []
        out: list[dict[str, Any]] = []
        base = proc.usage(side.pids()).rss
        opened = 0
        try:
            for count in sorted(set(counts)):
                held = True
                try:
                    pools.append(
                        await Pool.open(side.target, count - opened, deadline=OPEN_DEADLINE)
                    )
                except (SmtpFailure, OSError, TimeoutError) as exc:
                    self.log(f"{side.name}: could not hold {count} sessions: {exc!r}")
                    held = False
                opened = sum(len(p.connections) for p in pools)
                await asyncio.sleep(SETTLE)
                rss = proc.usage(side.pids()).rss
                if side.name == "relay":
                    self.relay_peak = max(self.relay_peak, rss)
                out.append(
                    {
                        "sessions": count,
                        "held": held,
                        "rss_before": base,
                        "rss_after": rss,
                        "bytes_per_session": (rss - base) / max(opened, 1),
                    }
                )
                self.log(
                    f"{side.name}: {opened} idle sessions, RSS +{(rss - base) / MIB:.1f} MiB"
                    f" = {(rss - base) / max(opened, 1) / KIB:.1f} KiB each"
                )
                if not held:
                    break
        finally:
            for pool in pools:
                await pool.close()
            await asyncio.sleep(SETTLE)  # let the server see the closes before the next phase
        return out

    # --- the run -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def fresh(
        self, setup: stack.Setup, sink: stack.ReferenceServer
    ) -> AsyncIterator[list[Side]]:
        """A new ceiling and a new one-worker relay, warmed up: [ceiling, relay]."""
        async with (
            stack.ceiling(setup) as ceiling,
            stack.Relay.start(
                setup, sink.port, workers=1, max_connections=self.max_connections
            ) as relay,
        ):
            self.log(f"relay pid {relay.process.pid} on {stack.HOST}:{relay.port}")
            sides = [ceiling_side(setup, ceiling), relay_side(setup, relay, sink)]
            try:
                await self.warm_up(sides)
                yield sides
            except (SmtpFailure, OSError, TimeoutError) as exc:
                # Most often the relay refused or died: its log says why.
                raise stack.BenchError(f"{exc!r}; relay log:\n{relay.tail()}") from exc

    async def warm_up(self, sides: list[Side]) -> None:
        for side in sides:
            await self.closed(side, HEADLINE_SIZE, 2, WARMUP_MESSAGES // 2)

    async def throughput(self, sides: list[Side], sizes: list[int]) -> None:
        entries = self.result.setdefault("throughput", [])
        for size in sizes:
            sessions, per = self.plan.sessions_for(size), self.plan.messages_for(size)
            rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
            for number in range(self.plan.rounds):
                # Alternate who goes first, so a drift in the machine's speed is shared.
                order = sides if number % 2 == 0 else sides[::-1]
                for side in order:
                    record = await self.closed(side, size, sessions, per)
                    rounds[side.name].append(record)
                    self.log(
                        f"{side.name} {report.size_label(size)} {sessions}x{per}"
                        f" round {number + 1}: {record['messages_per_s'] or 0:.0f} msg/s,"
                        f" {record['messages_failed']} failed"
                    )
            entry: dict[str, Any] = {
                "size": size,
                "wire_size": wire_size(size),
                "label": report.size_label(size),
                "sessions": sessions,
                "messages_per_session": per,
            }
            merged = {name: merge(records) for name, records in rounds.items()}
            for name, record in merged.items():
                entry[name] = public(record)
            if "relay" in merged and "ceiling" in merged:
                relay, ceiling = merged["relay"], merged["ceiling"]
                entry["ratio"] = report.ratio(relay["messages_per_s"], ceiling["messages_per_s"])
                entry["added_latency_ms"] = {
                    q: report.difference(relay["latency_ms"][q], ceiling["latency_ms"][q])
                    for q in ("p50", "p99")
                }
            if size >= LARGE:
                self.result.setdefault("large_messages", {}).update(
                    {
                        name: large_figures(size, sessions, records)
                        for name, records in rounds.items()
                    }
                )
            entries.append(entry)
        entries.sort(key=lambda e: self.plan.sizes.index(e["size"]))

    def max_rate(self, side: str) -> float | None:
        entries = self.result.get("throughput", [])
        head = next((e for e in entries if e["size"] == HEADLINE_SIZE), None)
        head = head or (entries[0] if entries else None)
        if head is None or side not in head:
            return None
        rate: float | None = head[side]["messages_per_s"]
        return rate

    async def latency(self, sides: list[Side], reference: str) -> None:
        """Open loop at half the measured maximum of `reference`, the same rate for every side."""
        top = self.max_rate(reference)
        if not top or self.plan.latency_seconds <= 0:
            return
        size = next((s for s in self.plan.sizes if s == HEADLINE_SIZE), self.plan.sizes[0])
        rate = top / 2
        count = max(int(rate * self.plan.latency_seconds), 1)
        paced: dict[str, Any] = {
            "rate": rate,
            "label": report.size_label(size),
            "size": size,
            "sessions": self.plan.sessions,
            "messages": count,
        }
        for side in sides:
            record = await self.paced(side, size, self.plan.sessions, rate, count)
            paced[side.name] = public(record)
            lat = record["latency_ms"]
            self.log(
                f"{side.name} paced {rate:.0f} msg/s: p50 {lat['p50'] or 0:.2f} ms,"
                f" p99 {lat['p99'] or 0:.2f} ms, {record['late_starts']} late"
            )
        if "relay" in paced and "ceiling" in paced:
            paced["added_ms"] = {
                q: report.difference(
                    paced["relay"]["latency_ms"][q], paced["ceiling"]["latency_ms"][q]
                )
                for q in ("p50", "p99")
            }
        self.result["latency_at_half_max"] = paced

    def headline(self) -> dict[str, Any] | None:
        entries = self.result.get("throughput", [])
        return next((e for e in entries if e["size"] == HEADLINE_SIZE and "relay" in e), None)

    async def floor(self, sink: stack.ReferenceServer) -> None:
        """The relay's CPU per message against the bare receive plus the bare forward.

        (a) the ceiling's and (c) the relay's CPU come from the 2 KiB throughput
        phase; (b) is a bare aiosmtplib client sending the same load to the same
        sink over pooled connections, measured now.
        """
        head = self.headline()
        if head is None or "ceiling" not in head:
            return
        sessions, per = head["sessions"], head["messages_per_session"]
        figures = await stack.floor_client(sink.port, HEADLINE_SIZE, sessions, per)
        receive = head["ceiling"]["server_cpu_s_per_1000"]
        forward = report.per_thousand(float(figures["cpu_s"]), int(figures["messages"]))
        relay = head["relay"]["server_cpu_s_per_1000"]
        floor = None if receive is None or forward is None else receive + forward
        self.result["floor"] = {
            "label": f"{report.size_label(HEADLINE_SIZE)} x {sessions} sessions",
            "messages": figures["messages"],
            "failed": figures["failed"],
            "receive_cpu_s_per_1000": receive,
            "forward_cpu_s_per_1000": forward,
            "floor_cpu_s_per_1000": floor,
            "relay_cpu_s_per_1000": relay,
            "ratio": report.ratio(relay, floor),
        }
        self.log(
            f"floor: receive {receive or 0:.3f} + forward {forward or 0:.3f} s/1k;"
            f" relay {relay or 0:.3f} s/1k"
        )

    async def alternate(
        self,
        what: str,
        off: Side,
        on: Side,
        sessions: int,
        per: int,
        rounds: dict[str, list[dict[str, Any]]],
    ) -> None:
        """2 KiB rounds on `off` and `on` in turn (the first one swapped each round)."""
        for number in range(self.plan.rounds):
            order = [("off", off), ("on", on)]
            for name, side in order if number % 2 == 0 else order[::-1]:
                record = await self.closed(side, HEADLINE_SIZE, sessions, per)
                rounds[name].append(record)
                self.log(
                    f"{what} {name} round {number + 1}: {record['messages_per_s'] or 0:.0f} msg/s"
                )

    async def delivery_log(self, setup: stack.Setup, sink: stack.ReferenceServer) -> None:
        """2 KiB through two fresh relays, the delivery log off on one and on (the
        default) on the other, in alternate rounds of one run.

        Both are new processes with new databases, made and warmed alike: the
        relay the throughput phase used has served every phase before this one
        and recorded all their messages, and would weigh that history against
        the log.
        """
        head = self.headline()
        if head is None:
            return
        sessions, per = head["sessions"], head["messages_per_session"]
        rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        sides: dict[str, Side] = {}
        async with contextlib.AsyncExitStack() as relays:
            for name, extra in (("off", {"RELAY_LOG_RETENTION_DAYS": "0"}), ("on", {})):
                directory = setup.directory / f"delivery-log-{name}"
                directory.mkdir()
                own = await stack.configure(directory)
                relay = await relays.enter_async_context(
                    stack.Relay.start(
                        own,
                        sink.port,
                        workers=1,
                        max_connections=self.max_connections,
                        extra_env=extra,
                    )
                )
                sides[name] = relay_side(own, relay, sink)
                await self.closed(sides[name], HEADLINE_SIZE, 2, WARMUP_MESSAGES // 2)
            await self.alternate("delivery log", sides["off"], sides["on"], sessions, per, rounds)
        entry: dict[str, Any] = {
            "label": f"{report.size_label(HEADLINE_SIZE)} x {sessions} sessions"
        }
        for name, records in rounds.items():
            merged = merge(records)
            entry[name] = {
                "messages_per_s": merged["messages_per_s"],
                "server_cpu_s_per_1000": merged["server_cpu_s_per_1000"],
                "forwarded_all": merged["forwarded_all"],
            }
        entry["on_over_off"] = report.ratio(
            entry["on"]["messages_per_s"], entry["off"]["messages_per_s"]
        )
        self.result["delivery_log"] = entry

    async def queue(self, setup: stack.Setup, sink: stack.ReferenceServer) -> None:
        """2 KiB through a fresh relay with RELAY_QUEUE=always: the rate it accepts
        (the queue's durable commit replacing the forward on the client's path),
        against the ceiling's, and the rate the queue drains to the sink, from the
        phase's first message to the sink's last."""
        head = self.headline()
        if head is None:
            return
        sessions, per = head["sessions"], head["messages_per_session"]
        directory = setup.directory / "queue-always"
        directory.mkdir()
        own = await stack.configure(directory)
        async with stack.Relay.start(
            own,
            sink.port,
            workers=1,
            max_connections=self.max_connections,
            extra_env={"RELAY_QUEUE": "always"},
        ) as relay:
            # Not "relay": the run's forwarding count compares the sink with each
            # phase's 250s, and a queued message reaches the sink after its phase.
            side = dataclasses.replace(relay_side(own, relay, sink), name="queue")
            start = int((await sink.stats())["messages"])
            warm = await self.closed(side, HEADLINE_SIZE, 2, WARMUP_MESSAGES // 2)
            before = await self._drained(sink, start + warm["messages_ok"])
            started = time.monotonic()
            record = await self.closed(side, HEADLINE_SIZE, sessions, per)
            drained = await self._drained(sink, before + record["messages_ok"])
            seconds = time.monotonic() - started
        ceiling = head.get("ceiling", {}).get("messages_per_s")
        accepted = record["messages_ok"]
        self.result["queue"] = {
            "label": f"{report.size_label(HEADLINE_SIZE)} x {sessions} sessions",
            "messages": accepted,
            "failed": record["messages_failed"],
            "accept_messages_per_s": record["messages_per_s"],
            "ceiling_messages_per_s": ceiling,
            "accept_over_ceiling": report.ratio(record["messages_per_s"], ceiling),
            "drained": drained - before,
            "drain_messages_per_s": (drained - before) / seconds if seconds > 0 else None,
            "delivered_all": drained - before == accepted and record["messages_failed"] == 0,
        }
        self.log(
            f"queue always: accepted {record['messages_per_s'] or 0:.0f} msg/s,"
            f" drained {self.result['queue']['drain_messages_per_s'] or 0:.0f} msg/s"
        )

    async def delivery(self, setup: stack.Setup, sink: stack.ReferenceServer) -> None:
        """The delivery rows (bench.delivery), on SQLite and, when it is installed,
        on a throwaway PostgreSQL: the drain after an upstream outage, the drain to
        a rate-limited Resend, the added p99 of a failover at half load."""
        from bench import delivery

        plan = self.plan
        if not plan.outage_messages:
            return
        rows: dict[str, Any] = {}
        backends: list[tuple[str, stack.Setup | None]] = [("sqlite", None)]
        async with contextlib.AsyncExitStack() as stack_:
            if plan.delivery_postgres:
                directory = setup.directory / "delivery-postgres"
                directory.mkdir()
                backends.append(
                    ("postgresql", await stack_.enter_async_context(delivery.postgres(directory)))
                )
            for name, own in backends:
                if name == "sqlite":
                    directory = setup.directory / "delivery-sqlite"
                    directory.mkdir()
                    own = await stack.configure(directory)
                if own is None:
                    continue
                row: dict[str, Any] = {}
                row["outage"] = await delivery.outage(
                    own,
                    plan.outage_messages,
                    plan.outage_seconds,
                    plan.sessions,
                    plan.phase_timeout,
                )
                self.log(f"{name} outage: {row['outage']}")
                row["resend"] = await delivery.resend(
                    own, plan.resend_messages, plan.sessions, plan.phase_timeout
                )
                self.log(f"{name} resend: {row['resend']}")
                top = self.max_rate("relay")
                if top and plan.latency_seconds > 0:
                    rate = top / 2
                    count = max(int(rate * plan.latency_seconds), 1)
                    row["failover"] = await delivery.failover(self, own, sink, rate, count)
                    plain = self.result.get("latency_at_half_max", {}).get("relay", {})
                    row["failover"]["added_p99_ms"] = report.difference(
                        row["failover"]["latency_ms"]["p99"],
                        plain.get("latency_ms", {}).get("p99"),
                    )
                    self.log(f"{name} failover: {row['failover']}")
                rows[name] = row
        self.result["delivery"] = rows

    async def _drained(self, sink: stack.ReferenceServer, until: int) -> int:
        """Wait (at most the phase timeout) for the sink to count `until` messages;
        the count it reached."""
        deadline = time.monotonic() + self.plan.phase_timeout
        while True:
            count = int((await sink.stats())["messages"])
            if count >= until or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.02)

    async def pipelining(self, setup: stack.Setup, off: Side) -> None:
        """2 KiB through a relay whose sink advertises PIPELINING, against `off`, same run."""
        head = self.headline()
        if head is None:
            return
        sessions, per = head["sessions"], head["messages_per_session"]
        rounds: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        paced_on: dict[str, Any] | None = None
        paced = self.result.get("latency_at_half_max")
        async with (
            stack.sink(pipelining=True) as sink,
            stack.Relay.start(
                setup, sink.port, workers=1, max_connections=self.max_connections
            ) as relay,
        ):
            on = relay_side(setup, relay, sink)
            await self.closed(on, HEADLINE_SIZE, 2, WARMUP_MESSAGES // 2)
            await self.alternate("pipelining", off, on, sessions, per, rounds)
            if paced is not None:
                paced_on = await self.paced(
                    on, HEADLINE_SIZE, paced["sessions"], paced["rate"], paced["messages"]
                )
        ceiling_p99 = head.get("ceiling", {}).get("latency_ms", {}).get("p99")
        entry: dict[str, Any] = {
            "label": f"{report.size_label(HEADLINE_SIZE)} x {sessions} sessions",
        }
        for name, records in rounds.items():
            merged = merge(records)
            entry[name] = {
                "messages_per_s": merged["messages_per_s"],
                "p99_ms": merged["latency_ms"]["p99"],
                "added_p99_ms": report.difference(merged["latency_ms"]["p99"], ceiling_p99),
                "server_cpu_s_per_1000": merged["server_cpu_s_per_1000"],
                "forwarded_all": merged["forwarded_all"],
            }
        entry["speedup"] = report.ratio(
            entry["on"]["messages_per_s"], entry["off"]["messages_per_s"]
        )
        if paced is not None and paced_on is not None and "ceiling" in paced:
            ceiling_paced = paced["ceiling"]["latency_ms"]["p99"]
            entry["paced"] = {
                "rate": paced["rate"],
                "off_added_p99_ms": report.difference(
                    paced["relay"]["latency_ms"]["p99"], ceiling_paced
                ),
                "on_added_p99_ms": report.difference(paced_on["latency_ms"]["p99"], ceiling_paced),
            }
        floor = self.result.get("floor")
        if floor is not None:
            on_cpu = entry["on"]["server_cpu_s_per_1000"]
            floor["relay_pipelining_cpu_s_per_1000"] = on_cpu
            floor["ratio_pipelining"] = report.ratio(on_cpu, floor["floor_cpu_s_per_1000"])
        self.result["pipelining"] = entry

    async def hostile(self, setup: stack.Setup, sink: stack.ReferenceServer) -> None:
        """The hardening figures (bench.hostile), each on a fresh relay."""
        figures: dict[str, Any] = {}
        for name in ("wal", "bursts", "stall", "refusals", "stalled_uploads"):
            extra = {}
            if name == "stalled_uploads":
                # A spool budget that holds every upload: the row measures memory,
                # not the budget's refusals (they have tests of their own).
                room = 2 * self.plan.stalled_uploads * hostile.STALLED_UPLOAD_BYTES
                extra["RELAY_SPOOL_MAX_BYTES"] = str(room)
            async with stack.Relay.start(
                setup,
                sink.port,
                workers=1,
                max_connections=self.max_connections,
                extra_env=extra,
            ) as relay:
                side = relay_side(setup, relay, sink)
                try:
                    if name == "wal":
                        self.log(f"write-ahead log under {self.plan.wal_seconds:g} s of load")
                        figures[name] = await hostile.wal(
                            side.target,
                            setup.database,
                            seconds=self.plan.wal_seconds,
                            sessions=self.plan.sessions,
                        )
                    elif name == "bursts":
                        self.log(f"ten bursts of {self.plan.burst_connections:,} TLS connections")
                        figures[name] = await hostile.bursts(
                            relay.port,
                            setup.client_tls(),
                            relay.pids,
                            connections=self.plan.burst_connections,
                        )
                    elif name == "refusals":
                        self.log(f"database growth under {self.plan.wal_seconds:g} s of refusals")
                        figures[name] = await hostile.refusals(
                            side.target, setup.database, seconds=self.plan.wal_seconds
                        )
                    elif name == "stall":
                        self.log("NOOP round trips beside the worst accepted message")
                        figures[name] = await hostile.stall(
                            side.target, noops=self.plan.stall_noops
                        )
                    else:
                        count = self.plan.stalled_uploads
                        self.log(f"RSS with {count} uploads of ~2 MB stalled mid-DATA")
                        figures[name] = await hostile.stalled_uploads(
                            side.target, relay.pids, sessions=count
                        )
                except (SmtpFailure, OSError, TimeoutError) as exc:
                    raise stack.BenchError(f"{exc!r}; relay log:\n{relay.tail()}") from exc
        self.result["hardening"] = figures

    async def workers(self, setup: stack.Setup, sink: stack.ReferenceServer) -> None:
        counts = sorted(set(self.plan.workers))
        if len(counts) < 2 or not self.max_rate("relay"):
            return
        size, sessions = HEADLINE_SIZE, self.plan.sessions
        per = self.plan.messages_for(size)
        figures: list[dict[str, Any]] = []
        for count in counts:
            if count == 1:
                rate = self.max_rate("relay")  # measured above, side by side with the ceiling
            else:
                async with stack.Relay.start(
                    setup, sink.port, workers=count, max_connections=self.max_connections
                ) as relay:
                    side = relay_side(setup, relay, sink)
                    await self.closed(side, size, 2, WARMUP_MESSAGES // 2)
                    records = [
                        await self.closed(side, size, sessions, per)
                        for _ in range(self.plan.rounds)
                    ]
                rate = merge(records)["messages_per_s"]
            figures.append(
                {
                    "workers": count,
                    "label": f"{report.size_label(size)} x {sessions} sessions",
                    "messages_per_s": rate,
                }
            )
            self.log(f"relay with {count} worker(s): {rate or 0:.0f} msg/s")
        base = figures[0]["messages_per_s"]
        for figure in figures:
            figure["speedup"] = report.ratio(figure["messages_per_s"], base)
        self.result["workers"] = figures

    @property
    def max_connections(self) -> int:
        # Above the largest idle pool, so the relay's cap never refuses the bench.
        return max([10_000, *self.plan.idle]) + 100

    def finish(self, started: float) -> dict[str, Any]:
        if self.forwarding:
            self.result["forwarding"] = {
                "sent": self.forwarding["sent"],
                "accepted": self.forwarding["accepted"],
                "sink_received": self.forwarding["sink_received"],
                "all_forwarded": self.forwarding["sent"]
                == self.forwarding["accepted"]
                == self.forwarding["sink_received"],
            }
        if self.relay_peak:
            self.result["relay_peak_rss"] = self.relay_peak
        self.result["wall_seconds"] = round(time.monotonic() - started, 1)
        report.attach_checks(self.result)
        return self.result


def large_figures(size: int, sessions: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak RSS growth while `sessions` messages of `size` are in flight at once."""
    growths = [
        r["server_peak_rss"] - r["server_rss_before"]
        for r in records
        if r["server_peak_rss"] is not None and r["server_rss_before"] is not None
    ]
    in_flight = sessions * wire_size(size)
    growth = max(growths) if growths else None
    return {
        "size": size,
        "sessions": sessions,
        "bytes_in_flight": in_flight,
        "peak_growth": growth,
        "growth_per_byte_in_flight": report.ratio(growth, in_flight),
    }


def relay_side(setup: stack.Setup, relay: stack.Relay, sink: stack.ReferenceServer) -> Side:
    target = Target(stack.HOST, relay.port, setup.token, setup.sender, setup.client_tls())
    return Side("relay", target, lambda: relay.pids, sink)


def ceiling_side(setup: stack.Setup, ceiling: stack.ReferenceServer) -> Side:
    target = Target(stack.HOST, ceiling.port, setup.token, setup.sender, setup.client_tls())
    return Side("ceiling", target, lambda: ceiling.pids)


def machine() -> dict[str, Any]:
    cpus = os.cpu_count() or 0
    return {
        "cpus": cpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "summary": f"{cpus} cpu, Python {platform.python_version()}, {platform.system()}",
    }


def raise_fd_limit(sessions: int) -> None:
    """Enough descriptors for the largest idle pool, here and in every child (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sessions + FD_HEADROOM
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise stack.BenchError(
            f"{sessions} idle sessions need {needed} file descriptors; the hard limit is"
            f" {hard} (raise it, or pass a smaller --idle)"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_relay(plan: Plan) -> dict[str, Any]:
    """The full comparison: sink, ceiling and relay started here, on loopback."""
    started = time.monotonic()
    raise_fd_limit(max(plan.idle, default=0))
    runner = Runner(plan, tls_target="relay (python -m relay serve) -> aiosmtpd sink")
    large = [s for s in plan.sizes if s >= LARGE]
    small = [s for s in plan.sizes if s < LARGE]
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as directory:
        setup = await stack.configure(Path(directory))
        async with stack.sink() as sink:
            if plan.idle:
                async with runner.fresh(setup, sink) as sides:
                    # The relay first: it is what the target is about.
                    runner.result["idle_sessions"] = {
                        side.name: await runner.idle(side, plan.idle) for side in sides[::-1]
                    }
            for sizes in (large, small):
                if not sizes:
                    continue
                async with runner.fresh(setup, sink) as sides:
                    await runner.throughput(sides, sizes)
                    if sizes is small or not small:
                        await runner.latency(sides, reference="relay")
                    if HEADLINE_SIZE in sizes:
                        await runner.floor(sink)
                        await runner.pipelining(setup, sides[1])
                        await runner.delivery_log(setup, sink)
                        await baseline_module.pair(runner, setup, sink)
                        await runner.queue(setup, sink)
                        await runner.delivery(setup, sink)
            await runner.workers(setup, sink)
            if plan.wal_seconds:
                await runner.hostile(setup, sink)
    return runner.finish(started)


async def run_target(plan: Plan, target: Target, pid: int | None) -> dict[str, Any]:
    """The client alone against any SMTPS server; server figures only with its `pid`."""
    started = time.monotonic()
    raise_fd_limit(max(plan.idle, default=0) if pid else 0)
    runner = Runner(plan, tls_target=f"{target.host}:{target.port}")
    side = Side("target", target, (lambda: proc.tree(pid)) if pid else None)
    await runner.warm_up([side])
    if plan.idle and pid:
        runner.result["idle_sessions"] = {"target": await runner.idle(side, plan.idle)}
    await runner.throughput([side], list(plan.sizes))
    await runner.latency([side], reference="target")
    return runner.finish(started)
