"""The PostgreSQL step: 1, 2 and 4 relay processes on one database, beside SQLite.

    python -m bench --postgres 1,2,4

Starts a throwaway PostgreSQL cluster (tests/pg_cluster.py: Debian's
`postgresql` package, fsync off), configures the relay in it, and for each
count N starts N `relay serve` processes (one worker each, as N hosts would
run) and spreads the 2 KiB closed-loop load over them. The same on one SQLite
file, for the figure beside it. Every message passes the relay-wide daily and
monthly windows, one row each: the hot rows. While the load runs, this
process samples `pg_stat_activity` every 10 ms and reports how many of the
relays' backends wait on a lock (`wait_event_type = 'Lock'`): the serialisation
the hot rows cost. CPU is shared by the client, the relays, the sink and
PostgreSQL on this machine, so the throughput is a floor, not a cluster's.

The CPU each message cost is read from /proc around the measured load: the
relay processes' (user + system, all threads), and on PostgreSQL the server's
(the postmaster and every process it forked: the relays' backends, the WAL
writer, the checkpointer), so the two backends compare in what a message costs
the machine, whoever spends it.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bench import proc, stack
from bench.client import Message, Pool, Target

SIZE = 2048
SESSIONS = 48
MESSAGES = 40  # per session
SAMPLE_EVERY = 0.01
PHASE_TIMEOUT = 300.0


async def _load(setup: stack.Setup, ports: list[int]) -> tuple[int, int, float]:
    """SESSIONS sessions spread over `ports`, MESSAGES each: (ok, failed, seconds)."""
    tls = setup.client_tls()
    targets = [Target(stack.HOST, port, setup.token, setup.sender, tls) for port in ports]
    share = SESSIONS // len(ports)
    pools = [await Pool.open(t, share, deadline=60.0) for t in targets]
    message = Message.of_size(SIZE, setup.sender)
    started = time.monotonic()
    try:
        outcomes = await asyncio.gather(
            *(p.run_closed(message, MESSAGES, deadline=PHASE_TIMEOUT) for p in pools)
        )
    finally:
        for pool in pools:
            await pool.close()
    seconds = time.monotonic() - started
    return sum(o.ok for o in outcomes), sum(o.failed for o in outcomes), seconds


async def _sample_lock_waits(url: str, samples: list[int], stop: asyncio.Event) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            row = await cursor.fetchone()
            samples.append(int(row[0]) if row else 0)
            await asyncio.sleep(SAMPLE_EVERY)


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc.cpu_seconds(pid)
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
    return total


async def _measure(
    setup: stack.Setup,
    sink: stack.ReferenceServer,
    count: int,
    url: str | None,
    server: int | None = None,
) -> dict[str, Any]:
    """`server`: the postmaster's pid (its tree's CPU counts as the database's)."""
    async with AsyncExitStack() as stack_:
        relays = [
            await stack_.enter_async_context(
                stack.Relay.start(setup, sink.port, workers=1, max_connections=1000)
            )
            for _ in range(count)
        ]
        ports = [r.port for r in relays]
        await _load(setup, ports)  # warm-up: connections, prepared statements
        samples: list[int] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_lock_waits(url, samples, stop)) if url else None
        relay_pids = [pid for r in relays for pid in r.pids]
        server_pids = proc.tree(server) if server else []
        relay_cpu, server_cpu = _cpu(relay_pids), _cpu(server_pids)
        ok, failed, seconds = await _load(setup, ports)
        relay_cpu, server_cpu = _cpu(relay_pids) - relay_cpu, _cpu(server_pids) - server_cpu
        stop.set()
        if sampler is not None:
            await sampler
    figure: dict[str, Any] = {
        "backend": "postgresql" if url else "sqlite",
        "relays": count,
        "messages_per_s": round(ok / seconds, 1) if seconds else None,
        "ok": ok,
        "failed": failed,
        # CPU milliseconds per message: the relays', the database server's, both.
        "relay_cpu_ms": round(relay_cpu * 1000 / ok, 3) if ok else None,
        "server_cpu_ms": round(server_cpu * 1000 / ok, 3) if ok else None,
        "cpu_ms": round((relay_cpu + server_cpu) * 1000 / ok, 3) if ok else None,
    }
    if samples:
        figure["lock_waiting_mean"] = round(statistics.fmean(samples), 3)
        figure["lock_waiting_share"] = round(sum(1 for s in samples if s) / len(samples), 3)
        figure["lock_waiting_max"] = max(samples)
    return figure


async def measure(counts: list[int]) -> dict[str, Any]:
    sys.path.insert(0, str(stack.REPO / "tests"))
    from pg_cluster import Cluster

    cluster = Cluster()
    cluster.start()
    figures: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-pg-") as directory:
            async with stack.sink() as sink:
                sqlite = await stack.configure(Path(directory) / "sqlite")
                for count in counts:
                    figures.append(await _measure(sqlite, sink, count, None))
                    print(_line(figures[-1]), file=sys.stderr)
                url = cluster.new_database()
                postgres = await stack.configure(Path(directory) / "postgres", url)
                server = int((cluster.data / "postmaster.pid").read_text().split()[0])
                for count in counts:
                    figures.append(await _measure(postgres, sink, count, url, server))
                    print(_line(figures[-1]), file=sys.stderr)
    finally:
        cluster.remove()
    return {"postgres": figures, "size": SIZE, "sessions": SESSIONS, "messages": MESSAGES}


def _line(f: dict[str, Any]) -> str:
    waits = (
        f"  lock waits: mean {f['lock_waiting_mean']:.3f} backends,"
        f" {f['lock_waiting_share']:.0%} of samples, max {f['lock_waiting_max']}"
        if "lock_waiting_mean" in f
        else ""
    )
    cpu = (
        f"  CPU/msg {f['cpu_ms']:.2f} ms (relays {f['relay_cpu_ms']:.2f}"
        f" + database {f['server_cpu_ms']:.2f})"
        if f.get("cpu_ms") is not None
        else ""
    )
    return (
        f"{f['backend']:<10} {f['relays']} relay(s)  {f['messages_per_s'] or 0:>7,.0f} msg/s"
        f"{cpu}  ok {f['ok']} failed {f['failed']}{waits}"
    )


def table(result: dict[str, Any]) -> str:
    head = (
        f"2 KiB x {result['sessions']} sessions x {result['messages']} messages,"
        " spread over N relay processes on one database"
    )
    return "\n".join([head, *(_line(f) for f in result["postgres"])])


def run(counts: list[int]) -> dict[str, Any]:
    import uvloop

    return uvloop.run(measure(counts))
