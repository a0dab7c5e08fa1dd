"""Figures from raw measurements, the issue's targets, and the short table.

Pure functions over plain values: nothing here does I/O except `write_json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KIB = 1024
MIB = 1024 * KIB

# The targets the benchmark reports (docs/performance.md).
MIN_CEILING_RATIO = 0.6  # 2 KiB messages, 50 sessions
MAX_ADDED_P99_MS = 5.0  # at half the measured maximum throughput
MAX_IDLE_SESSION_BYTES = 64 * KIB  # at 5,000 idle authenticated sessions
MAX_LARGE_GROWTH = 3.0  # 5 MiB messages: peak RSS growth / bytes in flight
HEADLINE_SIZE = 2 * KIB
# The relay's CPU per 2 KiB message against the floor, the bare
# receive (the ceiling) plus the bare forward (aiosmtplib to the same sink).
MAX_FLOOR_RATIO = 1.15
# The write-ahead log under a 60 s full load and 10 s after it; RSS
# after ten bursts of 2,000 TLS connections against after the first; a NOOP beside
# the worst message the bounds accept.
# The delivery log may cost at most 5% of the 2 KiB throughput.
MIN_LOG_ON_OVER_OFF = 0.95
# With RELAY_QUEUE=off, failover and the queue cost no more than the noise of one
# same-run pair on a shared 2-core machine (about 3% a side): this relay's 2 KiB
# rate and CPU per message against the relay before them (bench.baseline).
MIN_BASELINE_RATE = 0.95
MAX_BASELINE_CPU = 1.05
# RELAY_QUEUE=always: the queue's durable commit replaces the forward on the
# client's path; its accept rate should stay near the bare receive's.
MIN_QUEUE_ACCEPT_OVER_CEILING = 0.6
# Resend allows 5 requests a second (resend.com/docs/api-reference/rate-limit): one
# message each unbatched; the queue's batches (up to 100 emails a request,
# resend-openapi /emails/batch) should carry at least 100 times that.
UNBATCHED_RESEND_RATE = 5.0
MIN_RESEND_BATCH_GAIN = 100
MAX_WAL_PEAK = 64 * MIB
MAX_WAL_AFTER = 4 * MIB
MAX_BURST_GROWTH = 1.10
MAX_STALL_P99_MS = 50.0
MAX_REFUSAL_GROWTH = 10 * MIB  # one client sending only refused messages for 60 s
# A client that stalls mid-DATA after ~2 MB: the relay's RSS per such session,
# its TLS connection included (the rest of the upload waits in the spool file).
MAX_STALLED_UPLOAD_BYTES = 300 * KIB


def size_label(size: int) -> str:
    for unit, name in ((MIB, "MiB"), (KIB, "KiB")):
        if size >= unit:
            return f"{size / unit:g} {name}"
    return f"{size} B"


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of `values` (sorted or not); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return float(ordered[rank - 1])


def latency_ms(latencies_ns: Sequence[int]) -> dict[str, float | None]:
    ms = [v / 1e6 for v in latencies_ns]
    return {
        "p50": percentile(ms, 0.50),
        "p99": percentile(ms, 0.99),
        "mean": sum(ms) / len(ms) if ms else None,
        "max": max(ms) if ms else None,
        "samples": len(ms),
    }


def per_thousand(seconds: float | None, messages: int) -> float | None:
    if seconds is None or messages <= 0:
        return None
    return seconds / messages * 1000


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 0.5)


@dataclass(frozen=True)
class Check:
    """One target of the issue, judged on this run."""

    name: str
    target: str
    value: float | None
    passed: bool | None  # None: not measured in this run
    note: str = ""


def checks(result: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    head = next(
        (t for t in result.get("throughput", []) if t["size"] == HEADLINE_SIZE and "ratio" in t),
        None,
    )
    if head is not None:
        value = head["ratio"]
        forwarded = head["relay"]["forwarded_all"]
        out.append(
            Check(
                f"2 KiB x {head['sessions']} sessions: relay / ceiling msg/s",
                f">= {MIN_CEILING_RATIO}, every message forwarded",
                value,
                value is not None and value >= MIN_CEILING_RATIO and forwarded is True,
                "" if forwarded else "not every message was forwarded",
            )
        )
    paced = result.get("latency_at_half_max")
    if paced is not None and "added_ms" in paced:
        value = paced["added_ms"]["p99"]
        out.append(
            Check(
                f"added p99 latency at {paced['rate']:.0f} msg/s (half max)",
                f"< {MAX_ADDED_P99_MS} ms",
                value,
                None if value is None else value < MAX_ADDED_P99_MS,
            )
        )
    floor = result.get("floor")
    if floor is not None:
        value = floor["ratio"]
        out.append(
            Check(
                f"relay CPU / (receive + forward), {floor['label']}",
                f"<= {MAX_FLOOR_RATIO}x",
                value,
                None if value is None else value <= MAX_FLOOR_RATIO,
            )
        )
    idle = _measured(result.get("idle_sessions", {}))
    if idle:
        largest = idle[-1]
        value = largest["bytes_per_session"] / KIB
        out.append(
            Check(
                f"RSS per idle authenticated session at {largest['sessions']}",
                f"< {MAX_IDLE_SESSION_BYTES // KIB} KiB",
                value,
                largest["held"] and value < MAX_IDLE_SESSION_BYTES / KIB,
                "" if largest["held"] else "not every session was held",
            )
        )
    large = _measured(result.get("large_messages", {}))
    if large is not None:
        value = large["growth_per_byte_in_flight"]
        out.append(
            Check(
                f"{size_label(large['size'])} peak RSS growth / bytes in flight",
                f"< {MAX_LARGE_GROWTH}x",
                value,
                None if value is None else value < MAX_LARGE_GROWTH,
            )
        )
    log = result.get("delivery_log")
    if log is not None:
        value = log["on_over_off"]
        out.append(
            Check(
                f"2 KiB msg/s with the delivery log on / off, {log['label']}",
                f">= {MIN_LOG_ON_OVER_OFF}",
                value,
                None if value is None else value >= MIN_LOG_ON_OVER_OFF,
            )
        )
    base = result.get("baseline")
    if base is not None and "skipped" not in base:
        rate, cpu = base["rate_ratio"], base["cpu_ratio"]
        out.append(
            Check(
                f"2 KiB msg/s, queue off / the relay at {base['revision']}, {base['label']}",
                f">= {MIN_BASELINE_RATE}",
                rate,
                None if rate is None else rate >= MIN_BASELINE_RATE,
            )
        )
        out.append(
            Check(
                f"relay CPU per message, queue off / the relay at {base['revision']}",
                f"<= {MAX_BASELINE_CPU}x",
                cpu,
                None if cpu is None else cpu <= MAX_BASELINE_CPU,
            )
        )
    queue = result.get("queue")
    if queue is not None:
        value = queue["accept_over_ceiling"]
        out.append(
            Check(
                f"2 KiB accept rate with RELAY_QUEUE=always / ceiling, {queue['label']}",
                f">= {MIN_QUEUE_ACCEPT_OVER_CEILING}",
                value,
                None if value is None else value >= MIN_QUEUE_ACCEPT_OVER_CEILING,
            )
        )
        out.append(
            Check(
                "every message the queue accepted reached the sink",
                "sink count = 250s, no failures",
                queue["drained"],
                queue["delivered_all"],
                f"drain {_fmt(queue['drain_messages_per_s'], 0)} msg/s",
            )
        )
    out += _delivery_checks(result.get("delivery", {}))
    out += _hardening_checks(result.get("hardening", {}))
    forwarded = result.get("forwarding")
    if forwarded is not None:
        out.append(
            Check(
                "every message the relay accepted reached the sink",
                "sink count = relay 250s, no failures",
                forwarded["sink_received"],
                forwarded["all_forwarded"],
                f"sent {forwarded['sent']}, 250 {forwarded['accepted']}",
            )
        )
    return out


BACKENDS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def _delivery_checks(rows: dict[str, Any]) -> list[Check]:
    """The delivery rows (bench.delivery), one set per backend."""
    out: list[Check] = []
    for backend, row in rows.items():
        name = BACKENDS.get(backend, backend)
        outage = row.get("outage")
        if outage is not None:
            out.append(
                Check(
                    f"s to drain {outage['messages']:,} queued after a {outage['outage_s']:g} s"
                    f" upstream outage ({name})",
                    "every message delivered",
                    outage["drain_s"],
                    outage["delivered_all"],
                    f"{_fmt(outage['drain_messages_per_s'], 0)} msg/s",
                )
            )
        resend = row.get("resend")
        if resend is not None:
            floor = UNBATCHED_RESEND_RATE * MIN_RESEND_BATCH_GAIN
            value = resend["messages_per_s"]
            out.append(
                Check(
                    f"queue drain to Resend at {UNBATCHED_RESEND_RATE:g} req/s, msg/s ({name})",
                    f">= {floor:g} (100x unbatched)",
                    value,
                    resend["delivered_all"] and value is not None and value >= floor,
                    f"{resend['requests']} requests, {resend['throttled']} answered 429",
                )
            )
        failover = row.get("failover")
        if failover is not None:
            out.append(
                Check(
                    f"added p99 ms of a failover (first channel refusing) at half load ({name})",
                    "reported; every message forwarded",
                    failover["added_p99_ms"],
                    failover["forwarded_all"],
                    f"p99 {_fmt(failover['latency_ms']['p99'], 2)} ms",
                )
            )
    return out


def _hardening_checks(hard: dict[str, Any]) -> list[Check]:
    out = []
    wal = hard.get("wal")
    if wal is not None:
        out.append(
            Check(
                f"write-ahead log peak, {wal['seconds']:g} s at full 2 KiB load",
                f"< {MAX_WAL_PEAK // MIB} MiB",
                wal["peak_bytes"] / MIB,
                wal["peak_bytes"] < MAX_WAL_PEAK,
            )
        )
        out.append(
            Check(
                f"write-ahead log {wal['after_seconds']:g} s after the load",
                f"< {MAX_WAL_AFTER // MIB} MiB",
                wal["after_bytes"] / MIB,
                wal["after_bytes"] < MAX_WAL_AFTER,
            )
        )
    bursts = hard.get("bursts")
    if bursts is not None:
        value = bursts["last_over_first"]
        out.append(
            Check(
                f"RSS after {bursts['bursts']} bursts of {bursts['connections']:,} TLS"
                " connections / after the first",
                f"<= {MAX_BURST_GROWTH}x",
                value,
                None if value is None else value <= MAX_BURST_GROWTH and not bursts["failed"],
                f"{bursts['failed']} connections failed" if bursts["failed"] else "",
            )
        )
    stall = hard.get("stall")
    if stall is not None:
        value = stall["noop_ms"]["p99"]
        out.append(
            Check(
                "NOOP p99 beside the worst accepted message",
                f"< {MAX_STALL_P99_MS} ms",
                value,
                None if value is None else value < MAX_STALL_P99_MS,
            )
        )
    refusals = hard.get("refusals")
    if refusals is not None:
        out.append(
            Check(
                f"database growth, {refusals['seconds']:g} s of refused messages",
                f"< {MAX_REFUSAL_GROWTH // MIB} MiB",
                refusals["growth_bytes"] / MIB,
                refusals["growth_bytes"] < MAX_REFUSAL_GROWTH,
            )
        )
    stalled = hard.get("stalled_uploads")
    if stalled is not None:
        value = stalled["per_stalled_upload"]
        out.append(
            Check(
                f"RSS per stalled upload ({stalled['sessions']} x"
                f" {stalled['upload_bytes'] / MIB:.1f} MiB)",
                f"<= {MAX_STALLED_UPLOAD_BYTES // KIB} KiB",
                value / KIB,
                value <= MAX_STALLED_UPLOAD_BYTES,
            )
        )
    return out


def _hardening_lines(hard: dict[str, Any]) -> list[str]:
    lines = []
    wal = hard.get("wal")
    if wal is not None:
        lines.append(
            f"write-ahead log: peak {_mib(wal['peak_bytes'])} over {wal['seconds']:g} s of"
            f" 2 KiB load ({wal['messages']:,} messages), {_mib(wal['at_stop_bytes'])} at the"
            f" stop, {_mib(wal['after_bytes'])} {wal['after_seconds']:g} s later"
        )
    bursts = hard.get("bursts")
    if bursts is not None:
        after = ", ".join(_mib(v) for v in bursts["rss_after"])
        lines.append(
            f"RSS after bursts of {bursts['connections']:,} TLS connections (before"
            f" {_mib(bursts['rss_before'])}): {after}; last/first"
            f" {_fmt(bursts['last_over_first'], 2, 'x')}"
        )
    stall = hard.get("stall")
    if stall is not None:
        lat = stall["noop_ms"]
        lines.append(
            f"NOOP beside the worst accepted message ({_mib(stall['message_bytes'])}, 1,000"
            f" From addresses, 100 parts; {stall['messages_sent']} sent): p50"
            f" {_fmt(lat['p50'], 2)} p99 {_fmt(lat['p99'], 2)} ms"
        )
    refusals = hard.get("refusals")
    if refusals is not None:
        lines.append(
            f"refused messages (50 recipients each) for {refusals['seconds']:g} s:"
            f" {refusals['refused']:,} refused, then {refusals['closed_at_mail']:,} MAILs"
            f" closed with 421; database growth {_mib(refusals['growth_bytes'])}"
        )
    stalled = hard.get("stalled_uploads")
    if stalled is not None:
        lines.append(
            f"{stalled['sessions']} uploads of {_mib(stalled['upload_bytes'])} stalled mid-DATA:"
            f" RSS {_mib(stalled['rss_before'])} before, {_mib(stalled['rss_idle'])} with the"
            f" sessions open, {_mib(stalled['rss_stalled'])} stalled (peak"
            f" {_mib(stalled['rss_peak'])}); per stalled upload"
            f" {_fmt(stalled['per_stalled_upload'] / KIB, 0)} KiB, of which the upload"
            f" {_fmt(stalled['per_upload_over_idle'] / KIB, 0)} KiB"
        )
    return lines


def _measured(by_side: dict[str, Any]) -> Any:
    """The figures of the server under test: the relay, or a --target."""
    return by_side.get("relay", by_side.get("target"))


def attach_checks(result: dict[str, Any]) -> None:
    result["targets"] = [asdict(c) for c in checks(result)]


def write_json(result: dict[str, Any], path: Path | None) -> str:
    text = json.dumps(result, indent=2, sort_keys=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text


# --- the table -----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f} MiB"


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _floor_lines(result: dict[str, Any]) -> list[str]:
    """The relay's CPU against the floor, and pipelining on against off (ms/msg = s/1k)."""
    lines = []
    floor = result.get("floor")
    if floor is not None:
        text = (
            f"CPU against the floor ({floor['label']}): receive"
            f" {_fmt(floor['receive_cpu_s_per_1000'], 3)} + forward"
            f" {_fmt(floor['forward_cpu_s_per_1000'], 3)} ="
            f" {_fmt(floor['floor_cpu_s_per_1000'], 3)} ms/msg; relay"
            f" {_fmt(floor['relay_cpu_s_per_1000'], 3)} ms/msg = {_fmt(floor['ratio'], 2, 'x')}"
        )
        if floor.get("ratio_pipelining") is not None:
            text += (
                f" (to a PIPELINING sink {_fmt(floor['relay_pipelining_cpu_s_per_1000'], 3)}"
                f" = {_fmt(floor['ratio_pipelining'], 2, 'x')})"
            )
        lines.append(text)
    pipe = result.get("pipelining")
    if pipe is not None:
        parts = [
            f"{name} {_fmt(pipe[name]['messages_per_s'], 0)} msg/s, p99"
            f" {_fmt(pipe[name]['added_p99_ms'], 2, '+')} ms, cpu"
            f" {_fmt(pipe[name]['server_cpu_s_per_1000'], 3)} ms/msg"
            for name in ("off", "on")
        ]
        speedup = _fmt(pipe["speedup"], 2, "x")
        text = f"pipelining ({pipe['label']}): {'; '.join(parts)}; on/off {speedup}"
        paced = pipe.get("paced")
        if paced is not None:
            text += (
                f"; at {paced['rate']:.0f} msg/s added p99 off"
                f" {_fmt(paced['off_added_p99_ms'], 2)}, on {_fmt(paced['on_added_p99_ms'], 2)} ms"
            )
        lines.append(text)
    return lines


def table(result: dict[str, Any]) -> str:
    lines = [f"bench {result['date']}  {result['machine']['summary']}  target: {result['target']}"]
    rows = []
    for entry in result.get("throughput", []):
        for side in ("ceiling", "relay", "target"):
            phase = entry.get(side)
            if phase is None:
                continue
            rows.append(
                [
                    entry["label"],
                    f"{entry['sessions']}x{entry['messages_per_session']}",
                    side,
                    _fmt(phase["messages_per_s"], 0),
                    _fmt(phase["latency_ms"]["p50"], 2),
                    _fmt(phase["latency_ms"]["p99"], 2),
                    _fmt(phase["server_cpu_s_per_1000"], 2),
                    _mib(phase["server_peak_rss"]),
                    _fmt(phase["client_cpu_s_per_1000"], 2),
                    "-" if phase["forwarded_all"] is None else str(phase["forwarded_all"]).lower(),
                ]
            )
        if entry.get("ratio") is not None:
            added = entry["added_latency_ms"]
            rows.append(
                [
                    "",
                    "",
                    "relay/ceiling",
                    _fmt(entry["ratio"], 2, "x"),
                    _fmt(added["p50"], 2, "+"),
                    _fmt(added["p99"], 2, "+"),
                    "",
                    "",
                    "",
                    "",
                ]
            )
    if rows:
        lines.append("")
        lines += _rows(
            [
                "size",
                "load",
                "server",
                "msg/s",
                "p50 ms",
                "p99 ms",
                "cpu s/1k",
                "peak rss",
                "client s/1k",
                "forwarded",
            ],
            rows,
        )
    paced = result.get("latency_at_half_max")
    if paced is not None:
        lines.append("")
        parts = []
        for side in ("ceiling", "relay", "target"):
            if side in paced:
                lat = paced[side]["latency_ms"]
                parts.append(f"{side} p50 {_fmt(lat['p50'], 2)} p99 {_fmt(lat['p99'], 2)} ms")
        if "added_ms" in paced:
            added = paced["added_ms"]
            parts.append(f"added p50 {_fmt(added['p50'], 2)} p99 {_fmt(added['p99'], 2)} ms")
        head = f"latency at {paced['rate']:.0f} msg/s open loop ({paced['label']}): "
        lines.append(head + "; ".join(parts))
    lines += _floor_lines(result)
    for side, entries in result.get("idle_sessions", {}).items():
        text = ", ".join(
            f"{e['sessions']}: {_fmt(e['bytes_per_session'] / KIB, 1)} KiB/session" for e in entries
        )
        lines.append(f"idle authenticated sessions, {side} RSS growth: {text}")
    for side, large in result.get("large_messages", {}).items():
        lines.append(
            f"{size_label(large['size'])} x {large['sessions']} in flight, {side}: peak RSS +"
            f"{_mib(large['peak_growth'])} for {_mib(large['bytes_in_flight'])} in flight"
            f" = {_fmt(large['growth_per_byte_in_flight'], 2)}x"
        )
    workers = result.get("workers")
    if workers:
        text = ", ".join(
            f"{w['workers']} worker(s) {_fmt(w['messages_per_s'], 0)} msg/s" for w in workers
        )
        lines.append(f"relay workers ({workers[0]['label']}): {text}")
    if result.get("relay_peak_rss"):
        lines.append(f"relay peak RSS over the run: {_mib(result['relay_peak_rss'])}")
    log = result.get("delivery_log")
    if log is not None:
        lines.append(
            f"delivery log ({log['label']}): off {_fmt(log['off']['messages_per_s'], 0)} msg/s,"
            f" cpu {_fmt(log['off']['server_cpu_s_per_1000'], 3)} ms/msg; on"
            f" {_fmt(log['on']['messages_per_s'], 0)} msg/s, cpu"
            f" {_fmt(log['on']['server_cpu_s_per_1000'], 3)} ms/msg; on/off"
            f" {_fmt(log['on_over_off'], 2, 'x')}"
        )
    base = result.get("baseline")
    if base is not None and "skipped" in base:
        lines.append(f"queue off against {base['revision']}: skipped, {base['skipped']}")
    elif base is not None:
        lines.append(
            f"queue off against the relay at {base['revision']} ({base['label']}):"
            f" {base['revision']} {_fmt(base['baseline']['messages_per_s'], 0)} msg/s,"
            f" cpu {_fmt(base['baseline']['server_cpu_s_per_1000'], 3)} ms/msg; this relay"
            f" {_fmt(base['relay']['messages_per_s'], 0)} msg/s, cpu"
            f" {_fmt(base['relay']['server_cpu_s_per_1000'], 3)} ms/msg; rate"
            f" {_fmt(base['rate_ratio'], 2, 'x')}, cpu {_fmt(base['cpu_ratio'], 2, 'x')}"
        )
    queue = result.get("queue")
    if queue is not None:
        lines.append(
            f"queue always ({queue['label']}): accepted"
            f" {_fmt(queue['accept_messages_per_s'], 0)} msg/s"
            f" ({_fmt(queue['accept_over_ceiling'], 2, 'x')} the ceiling), drained"
            f" {_fmt(queue['drain_messages_per_s'], 0)} msg/s to the sink"
        )
    for backend, row in result.get("delivery", {}).items():
        name = BACKENDS.get(backend, backend)
        if "outage" in row:
            o = row["outage"]
            lines.append(
                f"queue after a {o['outage_s']:g} s outage ({name}): {o['messages']:,} accepted"
                f" in {o['accepted_in_s']:.1f} s, drained in {o['drain_s']:.1f} s"
                f" ({_fmt(o['drain_messages_per_s'], 0)} msg/s) once the sink was back"
            )
        if "resend" in row:
            r = row["resend"]
            lines.append(
                f"queue to Resend at {UNBATCHED_RESEND_RATE:g} requests/s ({name}):"
                f" {r['sent']:,} sent in {r['seconds']:.1f} s ="
                f" {_fmt(r['messages_per_s'], 0)} msg/s, {r['batches']} batches,"
                f" {r['requests']} requests, {r['throttled']} answered 429"
            )
        if "failover" in row:
            f = row["failover"]
            lines.append(
                f"failover at {f['rate']:.0f} msg/s ({name}): p50"
                f" {_fmt(f['latency_ms']['p50'], 2)} p99 {_fmt(f['latency_ms']['p99'], 2)} ms,"
                f" added p99 {_fmt(f['added_p99_ms'], 2)} ms against the relay's"
            )
    lines += _hardening_lines(result.get("hardening", {}))
    targets = result.get("targets", [])
    if targets:
        lines.append("")
        lines += _rows(
            ["target", "must be", "measured", "result"],
            [
                [
                    t["name"],
                    t["target"],
                    _fmt(t["value"], 2),
                    {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
                    + (f" ({t['note']})" if t["note"] else ""),
                ]
                for t in targets
            ],
        )
    return "\n".join(lines)
