"""The delivery phases: the durable queue after an upstream outage, Resend batches under
Resend's rate limit, and the cost of a failover; on SQLite and on PostgreSQL.

- outage: a relay with RELAY_QUEUE=always whose SMTP upstream refuses connections;
  N messages are accepted (each queued, tried, waiting), the outage lasts its
  seconds from the first message, then the sink comes up on that port: the time
  from then until the sink has every message. RELAY_QUEUE_BACKOFF is 1 s (the
  first retry's delay; it doubles per try), so a message's next try is at most
  about as far as the outage was long.
- resend: N messages queued for Resend while it is unreachable, all made due
  (`relay queue retry --all`), then a relay drains them to a fake Resend that
  allows 5 requests a second (resend.com/docs/api-reference/rate-limit) and
  answers `POST /emails/batch` (up to 100 emails a request, resend-openapi): the
  messages per second from its first request to its last email.
- failover: the open loop at half the relay's 2 KiB maximum, through a relay
  whose first channel (Resend, at a port that refuses connections, its pacing
  lifted) fails every message over to the second (the SMTP sink): its p99
  against the plain relay's in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench import stack
from bench.client import Message, Pool, Target

RESEND_RATE = 5  # requests a second (resend.com/docs/api-reference/rate-limit)
OUTAGE_BACKOFF = "1"


def _upstream(port: int) -> str:
    return json.dumps(
        {stack.DOMAIN: {"host": stack.HOST, "port": port, "secure": False, "startTls": False}}
    )


async def _submit(
    setup: stack.Setup, relay: stack.Relay, messages: int, sessions: int, limit: float
) -> tuple[int, int]:
    """`messages` 2 KiB messages over `sessions` sessions: (accepted, failed)."""
    target = Target(stack.HOST, relay.port, setup.token, setup.sender, setup.client_tls())
    sessions = max(1, min(sessions, messages))
    pool = await Pool.open(target, sessions, deadline=60.0)
    try:
        outcome = await pool.run_closed(
            Message.of_size(2048, setup.sender), math.ceil(messages / sessions), deadline=limit
        )
    finally:
        await pool.close()
    return outcome.ok, outcome.failed


async def _count(read: Any, until: int, limit: float) -> int:
    deadline = time.monotonic() + limit
    while True:
        count = int(await read())
        if count >= until or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.02)


async def outage(
    setup: stack.Setup, messages: int, seconds: float, sessions: int, limit: float
) -> dict[str, Any]:
    """The time to drain `messages` queued messages once a `seconds` outage ends."""
    port = stack.free_port()
    env = {
        "RELAY_QUEUE": "always",
        "RELAY_QUEUE_BACKOFF": OUTAGE_BACKOFF,
        "RELAY_QUEUE_MAX_MESSAGES": str(messages * 2),
    }
    async with stack.Relay.start(
        setup, port, workers=1, max_connections=sessions + 10, extra_env=env
    ) as relay:
        started = time.monotonic()
        ok, failed = await _submit(setup, relay, messages, sessions, limit)
        accepted_in = time.monotonic() - started
        await asyncio.sleep(max(0.0, seconds - accepted_in))
        async with stack.reference("sink", "--port", str(port)) as sink:
            back = time.monotonic()
            drained = await _count(lambda: _messages(sink), ok, limit)
            drain_seconds = time.monotonic() - back
    return {
        "messages": ok,
        "failed": failed,
        "outage_s": seconds,
        "accepted_in_s": round(accepted_in, 2),
        "drained": drained,
        "drain_s": round(drain_seconds, 2),
        "drain_messages_per_s": round(drained / drain_seconds, 1) if drain_seconds else None,
        "delivered_all": drained == ok and failed == 0,
    }


async def _messages(sink: stack.ReferenceServer) -> int:
    return int((await sink.stats())["messages"])


async def resend(setup: stack.Setup, messages: int, sessions: int, limit: float) -> dict[str, Any]:
    """The rate the queue drains `messages` to a Resend that allows 5 requests a second."""
    closed = stack.free_port()
    env = {
        "RELAY_QUEUE": "always",
        "RELAY_QUEUE_BACKOFF": "3600",
        "RELAY_QUEUE_MAX_MESSAGES": str(messages * 2),
        "SMTP_CONFIG": "",  # Resend only: no failover to the sink
        "RESEND_TOKEN": "re_bench",
    }
    async with stack.Relay.start(
        setup,
        closed,
        workers=1,
        max_connections=sessions + 10,
        extra_env={**env, "RESEND_API_URL": f"http://{stack.HOST}:{closed}"},
    ) as relay:
        ok, failed = await _submit(setup, relay, messages, sessions, limit)
    await stack.run_cli(setup, "queue", "retry", "--all")
    async with FakeResend.serve(RESEND_RATE) as fake:
        async with stack.Relay.start(
            setup,
            closed,
            workers=1,
            max_connections=10,
            extra_env={**env, "RESEND_API_URL": f"http://{stack.HOST}:{fake.port}"},
        ):
            sent = await _count(lambda: _now(fake.emails), ok, limit)
    # From the first request to the last, plus the last one's share of a second
    # (n requests at 5 a second take n / 5 seconds, not (n - 1) / 5).
    span = (fake.last - fake.first) + 1 / RESEND_RATE if fake.first else 0.0
    return {
        "messages": ok,
        "failed": failed,
        "sent": sent,
        "requests": fake.requests,
        "throttled": fake.throttled,
        "batches": fake.batches,
        "seconds": round(span, 2),
        "messages_per_s": round(sent / span, 1) if span else None,
        "delivered_all": sent == ok and failed == 0,
    }


async def _now(value: int) -> int:
    return value


class FakeResend:
    """`POST /emails` and `POST /emails/batch` as Resend answers them, at most `rate`
    requests a second (a fixed one-second window, past it the documented 429 with
    `retry-after`), each Idempotency-Key answered once (its first answer again)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.port = 0
        self.requests = self.throttled = self.batches = self.emails = 0
        self.first = self.last = 0.0
        self._window = (0.0, 0)
        self._keys: dict[str, bytes] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def serve(cls, rate: int) -> AsyncIterator[FakeResend]:
        fake = cls(rate)
        server = await asyncio.start_server(fake._client, stack.HOST, 0)
        fake.port = server.sockets[0].getsockname()[1]
        try:
            yield fake
        finally:
            server.close()

    def _admit(self) -> bool:
        now = time.monotonic()
        start, count = self._window
        if now - start >= 1.0:
            start, count = now, 0
        if count >= self.rate:
            self._window = (start, count)
            return False
        self._window = (start, count + 1)
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                path = line.split()[1].decode() if len(line.split()) > 1 else "/"
                headers = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, answer, extra = self._answer(path, headers, body)
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(answer)}\r\n{extra}\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        self.requests += 1
        if not self._admit():
            self.throttled += 1
            error = {"statusCode": 429, "name": "rate_limit_exceeded", "message": "Too many"}
            return 429, json.dumps(error).encode(), "retry-after: 1\r\n"
        key = headers.get("idempotency-key", "")
        if key in self._keys:
            return 200, self._keys[key], ""
        items = json.loads(body)
        now = time.monotonic()
        self.first = self.first or now
        if path.endswith("/batch"):
            self.batches += 1
            answer = json.dumps({"data": [{"id": str(uuid.uuid4())} for _ in items]}).encode()
            self.emails += len(items)
        else:
            answer = json.dumps({"id": str(uuid.uuid4())}).encode()
            self.emails += 1
        self.last = now
        if key:
            self._keys[key] = answer
        return 200, answer, ""


async def failover(
    runner: Any, setup: stack.Setup, sink: stack.ReferenceServer, rate: float, count: int
) -> dict[str, Any]:
    """The open loop at `rate` through a relay whose first channel refuses connections."""
    from bench import run

    closed = stack.free_port()
    env = {
        "RESEND_TOKEN": "re_bench",
        "RESEND_API_URL": f"http://{stack.HOST}:{closed}",
        # Its pacing lifted: the row measures a refused connection, not the wait for
        # Resend's 5 requests a second (which would fail every message over after
        # the whole forward budget).
        "RESEND_RATE_LIMIT": "10000",
    }
    async with stack.Relay.start(
        setup, sink.port, workers=1, max_connections=runner.max_connections, extra_env=env
    ) as relay:
        side = run.Side(
            "failover",
            Target(stack.HOST, relay.port, setup.token, setup.sender, setup.client_tls()),
            lambda: relay.pids,
        )
        await runner.closed(side, 2048, 2, 2)  # warm-up
        before = await _messages(sink)
        record = await runner.paced(side, 2048, runner.plan.sessions, rate, count)
        forwarded = await _count(lambda: _messages(sink), before + record["messages_ok"], 30)
    return {
        "rate": rate,
        "messages": record["messages_ok"],
        "failed": record["messages_failed"],
        "latency_ms": record["latency_ms"],
        "forwarded_all": forwarded - before == record["messages_ok"]
        and record["messages_failed"] == 0,
    }


@contextlib.asynccontextmanager
async def postgres(directory: Path) -> AsyncIterator[stack.Setup | None]:
    """A relay configuration in a throwaway PostgreSQL database (tests/pg_cluster.py, as
    `--postgres` starts it), or None when PostgreSQL is not installed here."""
    sys.path.insert(0, str(stack.REPO / "tests"))
    try:
        from pg_cluster import Cluster

        cluster = Cluster()
        cluster.start()
    except Exception as exc:  # no PostgreSQL here: the rows say n/a
        print(f"bench: no PostgreSQL for the delivery rows ({exc})", file=sys.stderr)
        yield None
        return
    try:
        yield await stack.configure(directory, cluster.new_database())
    finally:
        cluster.remove()
