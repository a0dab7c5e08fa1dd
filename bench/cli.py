"""`python -m bench`: arguments onto a `Plan`, the run, then the JSON and the table.

Exit status: 0 when the run completed (whether or not every target passed;
the table and the JSON say which), 1 when the bench itself could not run, 2 on
bad arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from bench import report, run, stack
from bench.client import SmtpFailure, Target

DEFAULT_JSON = stack.REPO / "bench" / "results" / "latest.json"
UNITS = {"": 1, "b": 1, "k": report.KIB, "kib": report.KIB, "m": report.MIB, "mib": report.MIB}
# Small enough to finish in about 2 minutes, large enough to exercise every phase.
QUICK = {
    "sessions": 10,
    "large_sessions": 2,
    "rounds": 1,
    "idle": (100, 500),
    "latency_seconds": 3.0,
    "wal_seconds": 5.0,
    "burst_connections": 200,
    "stall_noops": 100,
    "stalled_uploads": 50,
    # The delivery rows small and on SQLite only: PostgreSQL's start and the rows
    # again there would double their share of a quick run.
    "outage_messages": 300,
    "outage_seconds": 2.0,
    "resend_messages": 300,
    "delivery_postgres": False,
    "baseline": "",  # the earlier relay's pair: two more relays and their rounds
}


def parse_size(text: str) -> int:
    value = text.strip().lower()
    number = value.rstrip("kmib")
    unit = value[len(number) :]
    if not number or unit not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2k, 100k, 5m)")
    try:
        size = int(float(number) * UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if not 256 <= size <= run.MAX_MESSAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text}: sizes run from 256 bytes to 5 MiB")
    return size


def parse_sizes(text: str) -> tuple[int, ...]:
    return tuple(parse_size(part) for part in text.split(",") if part.strip())


def parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 1000,5000: {text!r}") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError("counts are at least 1")
    return counts


def parse_idle(text: str) -> tuple[int, ...]:
    # "0" or "" turns the idle-session phase off.
    return () if text.strip() in ("", "0") else parse_counts(text)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, int(port))}
    except socket.gaierror as exc:
        raise argparse.ArgumentTypeError(f"{host}: {exc.strerror}") from None
    # A load generator: it must never be pointed at someone else's server.
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise argparse.ArgumentTypeError(f"{host} is not a loopback address; only loopback")
    return host, int(port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load benchmark: the relay against a bare aiosmtpd ceiling, on loopback.",
    )
    p.add_argument(
        "--quick", action="store_true", help="a short run (about 2 minutes) of every phase"
    )
    p.add_argument("--sizes", type=parse_sizes, help="message sizes (default 2k,100k,5m)")
    p.add_argument("--sessions", type=positive, help="concurrent sessions (default 50)")
    p.add_argument(
        "--large-sessions", type=positive, help="sessions for sizes of 1 MiB and more (default 4)"
    )
    p.add_argument("--messages", type=positive, help="messages per session (default by size)")
    p.add_argument("--rounds", type=positive, help="ceiling/relay rounds per size (default 3)")
    p.add_argument(
        "--idle", type=parse_idle, help="idle sessions to hold, e.g. 1000,5000 (0: skip)"
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        help="length of the open-loop run at half the max rate (default 10; 0: skip)",
    )
    p.add_argument(
        "--workers", type=parse_counts, help="relay worker counts to compare (default 1,2)"
    )
    p.add_argument(
        "--phase-timeout", type=float, help="seconds one load phase may take (default 180)"
    )
    p.add_argument(
        "--wal-seconds",
        type=float,
        help="length of the full-load run that watches the write-ahead log (default 60; 0: skip"
        " the hardening phases: WAL, connection bursts, stall)",
    )
    p.add_argument(
        "--delivery-log",
        type=positive,
        metavar="N",
        help="only the delivery-log step: fill N records, time `relay log`'s queries",
    )
    p.add_argument(
        "--burst-connections", type=positive, help="TLS connections per burst (default 2000)"
    )
    p.add_argument(
        "--stall-noops", type=positive, help="NOOPs timed beside the worst message (default 400)"
    )
    p.add_argument(
        "--stalled-uploads",
        type=positive,
        help="sessions that each stall mid-DATA after ~2 MB, for the RSS row (default 150)",
    )
    p.add_argument(
        "--postgres",
        type=lambda text: list(parse_counts(text)),
        metavar="N,N,...",
        help="only the PostgreSQL step: N relay processes on one database, beside SQLite",
    )
    p.add_argument(
        "--json-out",
        default=str(DEFAULT_JSON),
        help=f"where the JSON goes; '-' for stdout (default {DEFAULT_JSON})",
    )
    p.add_argument(
        "--outage-messages",
        type=int,
        help="messages queued through the upstream outage (default 10000, 300 with --quick;"
        " 0 skips the delivery rows)",
    )
    p.add_argument(
        "--outage-seconds",
        type=float,
        help="the upstream outage's length (default 60, 2 with --quick)",
    )
    p.add_argument(
        "--resend-messages",
        type=positive,
        help="messages drained to the rate-limited Resend (default 3000, 300 with --quick)",
    )
    p.add_argument(
        "--no-delivery-postgres",
        dest="delivery_postgres",
        action="store_const",
        const=False,
        help="the delivery rows on SQLite only (not also on a throwaway PostgreSQL;"
        " --quick runs them on SQLite only)",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="the git revision of the relay the queue-off pair compares with (default"
        f" {run.Plan.baseline}, the last before failover and the queue; '' skips the pair)",
    )
    target = p.add_argument_group("another server (no relay, sink or ceiling is started)")
    target.add_argument("--target", type=parse_target, metavar="HOST:PORT", help="loopback only")
    target.add_argument("--token", help="AUTH PLAIN password (username api_token)")
    target.add_argument("--sender", default=stack.SENDER, help=f"(default {stack.SENDER})")
    target.add_argument("--insecure", action="store_true", help="do not verify its certificate")
    target.add_argument("--ca", help="a CA file to verify its certificate with")
    target.add_argument(
        "--target-pid", type=int, help="its process id, for CPU, RSS and idle-session figures"
    )
    return p


def plan_from(args: argparse.Namespace) -> run.Plan:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in (
        "sizes",
        "sessions",
        "large_sessions",
        "messages",
        "rounds",
        "idle",
        "latency_seconds",
        "workers",
        "phase_timeout",
        "wal_seconds",
        "burst_connections",
        "stall_noops",
        "stalled_uploads",
        "outage_messages",
        "outage_seconds",
        "resend_messages",
        "delivery_postgres",
        "baseline",
    ):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    return run.Plan(**values)


def target_tls(args: argparse.Namespace) -> ssl.SSLContext:
    if args.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=args.ca)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.target and not args.token:
        p.error("--target needs --token")
    if args.token and not args.target:
        p.error("--token goes with --target")
    if args.postgres:
        from bench import postgres

        result = postgres.run(args.postgres)
        print(postgres.table(result))
        report.write_json(
            result, None if args.json_out == "-" else Path(args.json_out).with_name("postgres.json")
        )
        return 0
    if args.delivery_log:
        from bench import deliveries

        result = deliveries.run(args.delivery_log)
        print(deliveries.table(result))
        if args.json_out == "-":
            print(json.dumps(result, indent=2))
        return 0
    plan = plan_from(args)
    try:
        if args.target:
            host, port = args.target
            target = Target(host, port, args.token, args.sender, target_tls(args))
            result = uvloop.run(run.run_target(plan, target, args.target_pid))
        else:
            result = uvloop.run(run.run_relay(plan))
    except (stack.BenchError, SmtpFailure, OSError, TimeoutError) as exc:
        print(f"bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    to_stdout = args.json_out == "-"
    text = report.write_json(result, None if to_stdout else Path(args.json_out))
    print(report.table(result), file=sys.stderr if to_stdout else sys.stdout)
    if to_stdout:
        print(text)
    else:
        print(f"\nJSON: {args.json_out}")
    return 0
