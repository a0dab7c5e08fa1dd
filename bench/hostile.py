"""The hardening figures: the write-ahead log under load, RSS after bursts, and stalls.

Each phase gets a fresh relay (memory a process freed but kept would hide what
the next phase measures):

- wal: the 2 KiB load at full speed for `seconds`, the database's `-wal`
  sampled every 0.1 s: its peak, and its size 10 s after the load stops;
- bursts: ten bursts of 2,000 TLS connections (greeting, QUIT); the relay's
  RSS once each burst has closed, the last against the first;
- stall: one session sends the largest message the relay's bounds accept
  (1,000 addresses in From, 100 MIME parts, ~4.9 MiB) over and over while
  another sends NOOP; the NOOP round trips' p99;
- refusals: one client sends only messages the relay refuses at the end of
  DATA (MAIL, 50 pipelined 250-character RCPTs, a message with two From) for
  `seconds`, reconnecting whenever its MAIL gets 421; the database's growth.
- stalled uploads: N sessions each send about 2 MB of DATA and then stall;
  the relay's RSS growth / N once they all hold their upload, from before
  the sessions opened (the whole cost of such a client) and from when they
  were open and authenticated (the upload's share).
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
from pathlib import Path
from typing import Any

from bench import proc, report, stack
from bench.client import Message, Pool, SmtpConnection, Target

WAL_SAMPLE = 0.1
WAL_AFTER = 10.0  # seconds after the load to read the log's size
BURSTS = 10
BURST_CONNECTIONS = 2000
BURST_CONCURRENCY = 500
SETTLE_AFTER_BURST = 4.0  # the relay's TLS close (2 s at most) and an upkeep tick
STALL_NOOPS = 400
NOOPS_PER_SESSION = 80
PHASE_TIMEOUT = 120.0  # one round of the load, or opening its sessions
REFUSED_RECIPIENTS = 50
REFUSAL_SETTLE = 3.0  # seconds for the upkeep to checkpoint and empty the write-ahead log
STALLED_UPLOADS = 150
STALLED_UPLOAD_BYTES = 2_000_000
OPEN_CONCURRENCY = 50  # TLS handshakes at once while opening the stalled sessions
# The relay has read every stalled upload once its RSS moves less than this
# between two reads SETTLE_POLL apart (the client's bytes may still sit in
# socket buffers when its own write buffer is empty).
SETTLE_POLL = 0.5
SETTLE_TOLERANCE = 0.01
SETTLE_MAX = 15.0


def wal_size(database: Path) -> int:
    try:
        return Path(f"{database}-wal").stat().st_size
    except FileNotFoundError:
        return 0


async def wal(target: Target, database: Path, *, seconds: float, sessions: int) -> dict[str, Any]:
    """The log's peak under the 2 KiB load and its size `WAL_AFTER` s after it stops."""
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, wal_size(database))
            await asyncio.sleep(WAL_SAMPLE)

    sampler = asyncio.create_task(sample())
    message = Message.of_size(2 * report.KIB, target.sender)
    deadline = time.monotonic() + seconds
    pool = await Pool.open(target, sessions, deadline=PHASE_TIMEOUT)
    sent = 0
    try:
        while time.monotonic() < deadline:
            outcome = await pool.run_closed(message, 20, deadline=PHASE_TIMEOUT)
            sent += outcome.ok
    finally:
        await pool.close()
    done.set()
    await sampler
    at_stop = wal_size(database)
    await asyncio.sleep(WAL_AFTER)
    return {
        "seconds": seconds,
        "messages": sent,
        "peak_bytes": peak,
        "at_stop_bytes": at_stop,
        "after_bytes": wal_size(database),
        "after_seconds": WAL_AFTER,
    }


async def _greet_and_quit(port: int, tls: ssl.SSLContext, limit: asyncio.Semaphore) -> bool:
    async with limit:
        try:
            async with asyncio.timeout(30):
                reader, writer = await asyncio.open_connection(stack.HOST, port, ssl=tls)
                try:
                    await reader.readline()
                    writer.write(b"QUIT\r\n")
                    await writer.drain()
                    await reader.readline()
                finally:
                    writer.close()
                    try:
                        await writer.wait_closed()
                    except (OSError, ssl.SSLError):
                        pass
            return True
        except (OSError, ssl.SSLError, TimeoutError):
            return False


async def bursts(
    port: int, tls: ssl.SSLContext, pids: list[int], *, connections: int = BURST_CONNECTIONS
) -> dict[str, Any]:
    """RSS after each of ten bursts of TLS connections, once the burst has closed."""
    limit = asyncio.Semaphore(BURST_CONCURRENCY)
    before = proc.usage(pids).rss
    after: list[int] = []
    failed = 0
    for _ in range(BURSTS):
        results = await asyncio.gather(
            *(_greet_and_quit(port, tls, limit) for _ in range(connections))
        )
        failed += results.count(False)
        await asyncio.sleep(SETTLE_AFTER_BURST)
        after.append(proc.usage(pids).rss)
    return {
        "bursts": BURSTS,
        "connections": connections,
        "rss_before": before,
        "rss_after": after,
        "last_over_first": report.ratio(after[-1], after[0]),
        "failed": failed,
    }


def worst_message(sender: str) -> bytes:
    """The largest message every bound accepts: 1,000 From addresses, 100 parts, ~4.9 MiB."""
    addresses = b",\r\n ".join(b"user%d@%s" % (i, stack.DOMAIN.encode()) for i in range(999))
    head = (
        b"From: " + sender.encode() + b",\r\n " + addresses + b"\r\n"
        b"To: sink@bench.test\r\nSubject: worst\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    )
    line = b"w" * 76 + b"\r\n"
    part = b"--b\r\nContent-Type: text/plain\r\n\r\n" + line * 620 + b"\r\n"
    return head + part * 100 + b"--b--\r\n"


async def stall(target: Target, *, noops: int = STALL_NOOPS) -> dict[str, Any]:
    """NOOP round trips of one session while another sends the worst accepted message."""
    content = worst_message(target.sender)
    heavy = await SmtpConnection.open(target)
    stop = asyncio.Event()
    sent = 0

    async def send() -> None:
        nonlocal sent
        while not stop.is_set():
            await heavy.send_raw(target.sender, content)
            sent += 1

    sender = asyncio.create_task(send())
    times: list[int] = []
    try:
        while len(times) < noops:
            # A session may send 100 commands that move nothing forward: a fresh
            # probe session for every batch.
            probe = await SmtpConnection.open(target)
            try:
                for _ in range(min(NOOPS_PER_SESSION, noops - len(times))):
                    started = time.perf_counter_ns()
                    await probe.command(b"NOOP\r\n", 250)
                    times.append(time.perf_counter_ns() - started)
                    await asyncio.sleep(0.01)
            finally:
                probe.close()
    finally:
        stop.set()
        await sender
        heavy.close()
    return {
        "message_bytes": len(content),
        "messages_sent": sent,
        "noops": len(times),
        "noop_ms": report.latency_ms(times),
    }


def database_bytes(database: Path) -> int:
    """The database file and its write-ahead log."""
    return sum(path.stat().st_size for path in (database, Path(f"{database}-wal")) if path.exists())


def refused_message(sender: str) -> bytes:
    # RFC 5322 section 3.6: at most one From field; the relay refuses the rest.
    return (
        f"From: {sender}\r\nFrom: other@{sender.partition('@')[2]}\r\nTo: r@dest.test\r\n"
        "Subject: refused\r\n\r\nTwo From fields.\r\n"
    ).encode()


async def refusals(target: Target, database: Path, *, seconds: float) -> dict[str, Any]:
    """The database's growth while one client sends only refused messages at full speed."""
    rcpts = b"".join(
        f"RCPT TO:<{'r' * 60}{i:02d}@{'d' * 60}.{'e' * 60}.{'f' * 55}.test>\r\n".encode()
        for i in range(REFUSED_RECIPIENTS)
    )
    content = refused_message(target.sender)
    before = database_bytes(database)
    refused = closed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn = await SmtpConnection.open(target)
        try:
            while time.monotonic() < deadline:
                conn._write(f"MAIL FROM:<{target.sender}>\r\n".encode())
                code, _, _ = await conn.reply()
                if code == 421:  # the token's refusals are over the limit: the session ends
                    closed += 1
                    break
                conn._write(rcpts)
                for _ in range(REFUSED_RECIPIENTS):
                    await conn.expect(250)
                await conn.command(b"DATA\r\n", 354)
                conn._write(content, b".\r\n")
                await conn.expect(554)
                refused += 1
        finally:
            conn.close()
    await asyncio.sleep(REFUSAL_SETTLE)
    growth = database_bytes(database) - before
    # The next phases use the same token: forget its refusals.
    with sqlite3.connect(database) as db:
        db.execute("DELETE FROM refusals")
    db.close()
    return {
        "seconds": seconds,
        "refused": refused,
        "closed_at_mail": closed,
        "growth_bytes": growth,
    }


async def _settled_rss(pids: list[int]) -> int:
    """The RSS once it stops moving (or after SETTLE_MAX seconds)."""
    last = proc.usage(pids).rss
    deadline = time.monotonic() + SETTLE_MAX
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_POLL)
        now = proc.usage(pids).rss
        if abs(now - last) <= SETTLE_TOLERANCE * last:
            return now
        last = now
    return last


async def stalled_uploads(
    target: Target,
    pids: list[int],
    *,
    sessions: int = STALLED_UPLOADS,
    upload_bytes: int = STALLED_UPLOAD_BYTES,
) -> dict[str, Any]:
    """RSS growth / N while N sessions each hold an unfinished ~2 MB upload."""
    content = Message.of_size(upload_bytes, target.sender).body
    limit = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def open_one() -> SmtpConnection:
        async with limit:
            return await SmtpConnection.open(target)

    before = await _settled_rss(pids)
    conns: list[SmtpConnection] = []
    try:
        opened = await asyncio.gather(*(open_one() for _ in range(sessions)))
        conns.extend(opened)
        idle = await _settled_rss(pids)
        proc.reset_peak(pids)
        await asyncio.gather(*(c.stall_upload(target.sender, content) for c in conns))
        held = await _settled_rss(pids)
        peak = proc.usage(pids).peak
    finally:
        for conn in conns:
            conn.close()
    return {
        "sessions": sessions,
        "upload_bytes": len(content),
        "rss_before": before,
        "rss_idle": idle,
        "rss_stalled": held,
        "rss_peak": peak,
        "per_stalled_upload": (held - before) / sessions,
        "per_upload_over_idle": (held - idle) / sessions,
    }
