"""The load client: a minimal SMTPS client on a bare asyncio protocol, and the load shapes.

Why not aiosmtplib: on a 2-core machine the client competes with the server it
measures, and a raw `asyncio.Protocol` that parses replies in `data_received` and
writes each command in one call costs a fraction of aiosmtplib's stream, lock and
parsing layers per message. No pipelining: each command waits for its reply, as
most submission clients do.

Latency is the time from handing the end-of-DATA dot to the transport to
parsing the 250 reply, both stamped inside the protocol so the client's own
scheduling does not count. A large body is flushed to the socket first, so the
clock starts when only the dot is left to send.

    target = Target("127.0.0.1", 465, token, sender="bench@bench.test", tls=ctx)
    pool = await Pool.open(target, sessions=50, deadline=60)
    message = Message.of_size(2048, target.sender)
    outcome = await pool.run_closed(message, per_session=40, deadline=120)
    await pool.close()
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import ssl
import time
from collections import Counter, deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, cast

# Every message's one envelope recipient: the sink accepts any, and one
# recipient keeps the per-message cost what a transactional sender pays.
RECIPIENT = "sink@dest.test"
LINE = 76  # body line length, as base64 bodies use (RFC 2045 section 6.8)
_TEXT = base64.b64encode(bytes(range(256)))  # 344 characters, none of them a dot
# A body larger than this is flushed before the dot is written, so the dot's
# timestamp is not taken while megabytes still wait in the transport's buffer.
FLUSH_BEFORE_DOT = 64 * 1024
FLUSH_POLL = 0.0005  # seconds; small against a large body's ~100 ms on the wire
CONNECT_CONCURRENCY = 100  # TLS handshakes in flight while a pool opens
# A paced send that starts this far behind its release waited for a free session
# (the release timer itself is only accurate to about a millisecond).
LATE = 0.005
REPLY_TIMEOUT = 120.0  # one command's reply; a 5 MiB message through a relay takes ~1 s


class SmtpFailure(Exception):
    """A reply other than the one expected, or a lost connection."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    token: str
    sender: str
    tls: ssl.SSLContext


@dataclass(frozen=True)
class Message:
    """A message of exactly `size` bytes on the wire (headers + body, before the dot).

    The body is shared by every send; only a short header block differs (a
    unique Message-ID), so a 5 MiB message is never copied per send. Its lines
    never start with a dot, so no dot-stuffing changes the size.
    """

    size: int
    sender: str
    body: bytes  # everything after the per-message headers, without the final dot

    @classmethod
    def of_size(cls, size: int, sender: str) -> Message:
        # Date and Message-ID are present, as real clients send them, so the
        # relay's submission fix-ups (RFC 6409 section 8) add nothing.
        fixed = (
            f"From: Bench <{sender}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench {size} bytes\r\n"
            f"Date: {format_datetime(datetime.now(UTC))}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()
        room = size - _header_size(sender) - len(fixed)
        if room < 2:
            raise ValueError(f"a {size}-byte message cannot hold its headers")
        return cls(size, sender, fixed + _body(room))

    def header(self, number: int) -> bytes:
        domain = self.sender.rpartition("@")[2]
        # Fixed width, so every message has the same size whatever its number.
        return f"Message-ID: <bench.{number:012d}@{domain}>\r\n".encode()


def _header_size(sender: str) -> int:
    return len(Message(0, sender, b"").header(0))


def _body(room: int) -> bytes:
    """`room` bytes (at least 2) of CRLF-terminated lines of base64-alphabet text."""
    line = _TEXT[:LINE] + b"\r\n"
    whole, rest = divmod(room, len(line))
    if rest == 1:  # no line is one byte long: lengthen the last whole line instead
        return line * (whole - 1) + _TEXT[: LINE + 1] + b"\r\n"
    return line * whole + (_TEXT[: rest - 2] + b"\r\n" if rest else b"")


class SmtpConnection(asyncio.Protocol):
    """One client session. Replies are parsed as they arrive; commands wait for them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost: SmtpFailure | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[tuple[int, bytes, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = bytes(self._buffer[start : end + 1])
            start = end + 1
            self._lines.append(line)
            # "250-..." continues a multiline reply; "250 ..." ends it (RFC 5321 4.2.1).
            if len(line) < 5 or line[3:4] != b"-":
                arrived = time.perf_counter_ns()
                self._replies.append((_code(line), b"".join(self._lines), arrived))
                self._lines = []
        del self._buffer[:start]
        if self._replies:
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = SmtpFailure(f"connection lost: {exc or 'closed by the server'}")
        self._wake()

    def _wake(self) -> None:
        # A plain result, never an exception: a waiter nobody awaits any more
        # must not log "exception was never retrieved". Waiters check `lost`.
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- commands --------------------------------------------------------------

    async def reply(self) -> tuple[int, bytes, int]:
        """The next reply: (code, raw text, arrival time in ns)."""
        if not self._replies and self.lost is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(REPLY_TIMEOUT):
                    await self._waiter
            except TimeoutError:
                # The session's state is unknown now: it is over.
                self.lost = SmtpFailure(f"no reply in {REPLY_TIMEOUT:g}s")
                self.close()
            finally:
                self._waiter = None
        if not self._replies:
            raise self.lost or SmtpFailure("no reply")
        return self._replies.popleft()

    async def expect(self, code: int) -> tuple[bytes, int]:
        got, text, arrived = await self.reply()
        if got != code:
            raise SmtpFailure(text.decode("ascii", "replace").strip())
        return text, arrived

    async def command(self, line: bytes, code: int) -> bytes:
        self._write(line)
        text, _ = await self.expect(code)
        return text

    async def flush(self) -> None:
        """Wait until the transport has handed every buffered byte to the kernel.

        Polled: uvloop's TLS transport signals "below the low-water mark" but
        never "empty", so flow-control callbacks cannot say when the body is out.
        """
        assert self.transport is not None
        for _ in range(int(REPLY_TIMEOUT / FLUSH_POLL)):
            if self.lost is not None:
                raise self.lost
            if self.transport.get_write_buffer_size() == 0:
                return
            await asyncio.sleep(FLUSH_POLL)
        raise SmtpFailure("the message body did not leave the write buffer")

    def _write(self, *chunks: bytes) -> None:
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        if len(chunks) == 1:
            self.transport.write(chunks[0])
        else:
            self.transport.writelines(chunks)

    async def login(self, target: Target) -> None:
        await self.expect(220)
        await self.command(b"EHLO bench.localhost\r\n", 250)
        plain = base64.b64encode(b"\0api_token\0" + target.token.encode())
        await self.command(b"AUTH PLAIN " + plain + b"\r\n", 235)

    async def send(self, message: Message, number: int) -> int:
        """Send one message; returns the latency in ns from the dot to the 250."""
        try:
            return await self._transaction(message, number)
        except SmtpFailure:
            if self.lost is None:
                # A refused MAIL or RCPT leaves the transaction open: end it, so the
                # next message is not refused for a state this one left behind.
                await self.command(b"RSET\r\n", 250)
            raise

    async def _transaction(self, message: Message, number: int) -> int:
        # SIZE= as real clients send it (RFC 1870), so the server's size check runs.
        await self.command(f"MAIL FROM:<{message.sender}> SIZE={message.size}\r\n".encode(), 250)
        await self.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        await self.command(b"DATA\r\n", 354)
        header = message.header(number)
        if len(message.body) > FLUSH_BEFORE_DOT:
            self._write(header, message.body)
            await self.flush()
            sent = time.perf_counter_ns()
            self._write(b".\r\n")
        else:
            # Small enough to leave at once: the dot goes out with the body.
            sent = time.perf_counter_ns()
            self._write(header, message.body, b".\r\n")
        _, arrived = await self.expect(250)
        return arrived - sent

    @classmethod
    async def open(cls, target: Target) -> SmtpConnection:
        """One authenticated session."""
        _, conn = await asyncio.get_running_loop().create_connection(
            cls, target.host, target.port, ssl=target.tls
        )
        await conn.login(target)
        return conn

    async def send_raw(self, sender: str, content: bytes) -> None:
        """Send `content` (CRLF lines, no line starting with a dot) as one message."""
        await self.command(f"MAIL FROM:<{sender}>\r\n".encode(), 250)
        await self.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        await self.command(b"DATA\r\n", 354)
        self._write(content, b".\r\n")
        await self.expect(250)

    async def stall_upload(self, sender: str, content: bytes) -> None:
        """Start a message, send `content` and never end it: the client that stalls mid-DATA."""
        await self.command(f"MAIL FROM:<{sender}>\r\n".encode(), 250)
        await self.command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        await self.command(b"DATA\r\n", 354)
        self._write(content)
        await self.flush()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _code(line: bytes) -> int:
    try:
        return int(line[:3])
    except ValueError:
        return 0


@dataclass
class Outcome:
    """What one load run produced, as seen by the client."""

    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)
    seconds: float = 0.0
    client_cpu: float = 0.0
    late: int = 0  # paced runs: sends that started behind schedule (all sessions busy)

    def fail(self, exc: BaseException) -> None:
        self.failed += 1
        text = str(exc) or type(exc).__name__
        self.errors[text[:120]] += 1


# Numbers the Message-IDs, unique across every pool of a run.
_MESSAGE_NUMBERS = itertools.count()


class Pool:
    """N authenticated sessions to one target, opened before any clock starts."""

    def __init__(self, target: Target, connections: list[SmtpConnection]) -> None:
        self.target = target
        self.connections = connections

    @classmethod
    async def open(cls, target: Target, sessions: int, *, deadline: float) -> Pool:
        """Connect, EHLO and AUTH `sessions` sessions, at most CONNECT_CONCURRENCY at once."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        opened: list[SmtpConnection] = []

        async def one() -> None:
            async with gate:
                _, conn = await loop.create_connection(
                    SmtpConnection, target.host, target.port, ssl=target.tls
                )
                opened.append(conn)
                await conn.login(target)

        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*(one() for _ in range(sessions)))
        except BaseException:
            for conn in opened:
                conn.close()
            raise
        return cls(target, opened)

    async def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.connections = []
        # Let the transports send close_notify and release their sockets.
        await asyncio.sleep(0)

    async def run_closed(self, message: Message, per_session: int, *, deadline: float) -> Outcome:
        """Closed loop: every session sends `per_session` messages back to back."""
        outcome = Outcome()

        async def session(conn: SmtpConnection) -> None:
            for _ in range(per_session):
                try:
                    outcome.latencies_ns.append(await conn.send(message, next(_MESSAGE_NUMBERS)))
                    outcome.ok += 1
                except SmtpFailure as exc:
                    outcome.fail(exc)
                    if conn.lost is not None:
                        return

        await self._timed(outcome, (session(c) for c in self.connections), deadline)
        return outcome

    async def run_paced(
        self, message: Message, rate: float, count: int, *, deadline: float
    ) -> Outcome:
        """Open loop: `count` sends released at `rate` per second to whichever session is free.

        Arrivals do not wait for replies, as real traffic does not; a send that
        starts more than LATE after its release (every session was busy) is
        counted as late. Its queueing time is not in its latency, which stays
        dot-to-250.
        """
        outcome = Outcome()
        due: asyncio.Queue[float | None] = asyncio.Queue()

        async def release() -> None:
            start = time.perf_counter()
            for i in range(count):
                wait = start + i / rate - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                due.put_nowait(start + i / rate)
            for _ in self.connections:
                due.put_nowait(None)

        async def session(conn: SmtpConnection) -> None:
            while (scheduled := await due.get()) is not None:
                if time.perf_counter() - scheduled > LATE:
                    outcome.late += 1
                try:
                    outcome.latencies_ns.append(await conn.send(message, next(_MESSAGE_NUMBERS)))
                    outcome.ok += 1
                except SmtpFailure as exc:
                    outcome.fail(exc)
                    if conn.lost is not None:
                        return

        sessions = [session(c) for c in self.connections]
        await self._timed(outcome, [release(), *sessions], deadline)
        return outcome

    @staticmethod
    async def _timed(
        outcome: Outcome, work: Iterable[Coroutine[Any, Any, None]], deadline: float
    ) -> None:
        cpu = time.process_time()
        start = time.perf_counter()
        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*work)
        except TimeoutError:
            outcome.errors["bench deadline reached"] += 1
        outcome.seconds = time.perf_counter() - start
        outcome.client_cpu = time.process_time() - cpu
