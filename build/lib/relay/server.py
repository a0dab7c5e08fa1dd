"""One relay in its event loop: start, serve, drain on shutdown, upkeep (processes: relay.workers).

    relay = Relay(settings)
    await relay.start()          # migrate, settle stale charges, bind, listen
    await stop_event.wait()
    await relay.stop()           # stop accepting, let transactions finish, close

Background work (each forward, the stale-charge sweep) is tracked and awaited on
stop; the channels' HTTP and SMTP clients are closed last. The admin listener
(`RELAY_ADMIN_LISTEN`, relay.admin.app) starts with the relay and stops after the
drain, so `/readyz` answers 503 while the relay drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from relay import metrics, replies
from relay.admin import app as admin
from relay.admin import calls
from relay.channels import build_channels
from relay.channels.base import Channel
from relay.config import Settings, no_channel, start_warnings
from relay.delivery.queue import QueueWorker
from relay.errors import ConfigError, RelayError, StoreError
from relay.events.sender import WebhookSender
from relay.policy import Channel as ChannelName
from relay.replies import Reply
from relay.smtp.admission import Admission, HostCounts
from relay.smtp.listener import Listener, bind, tls_context
from relay.smtp.protocol import SubmissionProtocol
from relay.smtp.session import Submission
from relay.smtp.spool import Spool
from relay.smtp.starttls import StartTlsProtocol
from relay.store.db import expected_failure
from relay.store.deliveries import PRUNE_BATCH
from relay.store.facade import Store
from relay.store.loop import AsyncStore
from relay.store.queue import STATES as QUEUE_STATES

log = logging.getLogger("relay.server")
T = TypeVar("T")
# After this many connections closed since the last upkeep tick that trimmed,
# give freed memory back to the system (see `release_freed_memory`).
TRIM_AFTER_CLOSED = 64
# A full collection walks every live object, thousands of sessions' worth: while
# connections come and go it runs at most this often; once all are closed, at once.
COLLECT_EVERY = 30.0
# A failing database is logged at most this often: a full disk must not flood the log.
TROUBLE_LOG_INTERVAL = 60.0
# Delivery-log records deleted per upkeep tick at most: PRUNE_BATCHES_PER_TICK
# transactions of PRUNE_BATCH rows, each a few milliseconds of write lock.
PRUNE_BATCHES_PER_TICK = 10


def open_database(store: Store) -> None:
    """Migrate the schema and prove the database writable, or stop the start with one line."""
    try:
        store.migrate()
        store.check_writable()
    except StoreError as exc:
        if str(exc).startswith("RELAY_DATABASE:"):
            raise ConfigError(str(exc)) from None
        reason = exc.__cause__ or exc
        raise ConfigError(f"RELAY_DATABASE: cannot write {store.location}: {reason}") from None


class Relay:
    def __init__(
        self,
        settings: Settings,
        *,
        channels: Mapping[ChannelName, Channel] | None = None,
        serves_admin: bool = True,
        host_counts: HostCounts | None = None,
    ) -> None:
        """`serves_admin`: whether this process serves `RELAY_ADMIN_LISTEN` (one worker does);
        `host_counts`: the per-address counts the workers of this host share."""
        self.settings = settings
        self.store = AsyncStore(Store(settings.database), settings.settle_journal_dir)
        self.channels = dict(channels) if channels is not None else build_channels(settings)
        self.handler = Submission(settings, self.store, self.channels, self.spawn)
        # The durable queue's deliveries (relay.delivery.queue): runs whatever
        # RELAY_QUEUE says now, so messages a past setting queued still go out.
        self.queue = QueueWorker(settings, self.store, self.channels)
        self.handler.forwarder.worker = self.queue
        self.spool = Spool(settings)
        self.sessions: set[SubmissionProtocol] = metrics.SessionSet()
        self.serves_admin = serves_admin
        self._admin: admin.AdminServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # The webhook outbox's sender (relay.events.sender), one per process.
        self._webhooks: WebhookSender | None = None
        self._webhook_task: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        self._starttls_listener: Listener | None = None
        self.admission = Admission(
            settings.max_connections, settings.max_connections_per_ip, host_counts
        )
        self._next_sweep = self._next_heartbeat = self._next_prune = 0.0
        self._next_collect = self._next_queue_stats = 0.0
        # The queue's depth and oldest age, as the upkeep last read them (/readyz).
        self.queue_state: dict[str, Any] = {}
        self._database_identity: tuple[int, int] | None = None
        self._quiet_until: dict[str, float] = {}  # what failed -> when it may be logged again
        self._port = 0
        self._starttls_port: int | None = None
        self._stopped = False

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def stopping(self) -> bool:
        """Set by `stop()`: new transactions get 421 4.3.2 from then on."""
        return self.handler.stopping

    @property
    def port(self) -> int:
        """The bound port (useful when `RELAY_LISTEN` asked for port 0)."""
        return self._port

    @property
    def starttls_port(self) -> int | None:
        """The STARTTLS port's bound port, when `RELAY_STARTTLS_LISTEN` is set."""
        return self._starttls_port

    @property
    def admin_port(self) -> int | None:
        """The admin listener's port, when this process serves it."""
        return self._admin.port if self._admin is not None else None

    async def start(
        self,
        sock: socket.socket | None = None,
        admin_sock: socket.socket | None = None,
        starttls_sock: socket.socket | None = None,
    ) -> None:
        ctx = tls_context(self.settings)
        await self.store.in_thread(open_database, self.store.sync)
        self.spool.open()  # after the database, whose private directory it may share
        await self.store.upkeep(lambda s: s.heartbeat())
        self._next_heartbeat = time.monotonic() + self.settings.upkeep.heartbeat_interval
        self._database_identity = _identity(self.settings.database)
        self._open_journal()
        await self._sweep()  # applies the journals stopped processes left, then sweeps
        if self.serves_admin and self.settings.admin_listen and admin_sock is None:
            admin_sock = admin.bind(self.settings.admin_listen)
        try:
            admin_tls = self._admin_tls() if admin_sock is not None else None
            sock = sock or bind(self.settings)
            if self.settings.starttls_listen is not None and starttls_sock is None:
                try:
                    starttls_sock = bind(self.settings, starttls=True)
                except ConfigError:
                    sock.close()
                    raise
        except ConfigError:
            if admin_sock is not None:
                admin_sock.close()
            raise
        self._port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_handshake_failures)
        self._listener = Listener(sock, ctx, self.admission, self._protocol, self._screen)
        self._listener.start()
        if starttls_sock is not None:
            # The same caps (one Admission) and the same failed-AUTH screen; no TLS
            # at accept: the session upgrades (relay.smtp.starttls).
            self._starttls_port = starttls_sock.getsockname()[1]
            self._starttls_listener = Listener(
                starttls_sock,
                None,
                self.admission,
                functools.partial(self._starttls_protocol, ctx),
                self._screen,
            )
            self._starttls_listener.start()
        self._sweeper = loop.create_task(self._sweep_forever())
        self.queue.start()
        self._webhooks = WebhookSender(
            self.store,
            backoff=self.settings.webhook_backoff,
            allow_private=self.settings.webhook_allow_private,
        )
        self._webhook_task = loop.create_task(self._webhooks.run_forever())
        if self.serves_admin:  # one process of the relay (the first worker) says it once
            for warning in start_warnings(self.settings):
                log.warning("%s", warning)
        log.info("relay listening on %s:%d (implicit TLS)", self.settings.listen[0], self.port)
        if self.settings.starttls_listen is not None:
            log.info(
                "relay listening on %s:%d (STARTTLS)",
                self.settings.starttls_listen[0],
                self._starttls_port,
            )
        log.info("%s", self.spool.describe())
        if admin_sock is not None:
            await self._read_queue_state()
            self._start_admin(admin_sock, admin_tls)

    def _open_journal(self) -> None:
        """The settle journal: a directory set on purpose must be writable; the default
        may not be (a read-only working directory beside PostgreSQL): then one warning."""
        try:
            self.store.open_journal()
        except OSError as exc:
            where = self.settings.settle_journal_dir
            if self.settings.settle_journal is not None:
                raise ConfigError(
                    f"RELAY_SETTLE_JOURNAL: cannot write {where}: {exc.strerror or exc}"
                ) from None
            log.warning(
                "the settle journal %s cannot be written (%s; set RELAY_SETTLE_JOURNAL): a"
                " settle the database cannot take when the relay stops is refunded by a sweep",
                where,
                exc.strerror or exc,
            )
            self.store.journal = None

    def _admin_tls(self) -> tuple[Path, Path] | None:
        settings = self.settings
        return admin.tls_files(
            self._admin_host,
            settings.admin_tls_cert or settings.tls_cert,
            settings.admin_tls_key or settings.tls_key,
        )

    @property
    def _admin_host(self) -> str:
        return self.settings.admin_listen[0] if self.settings.admin_listen else "127.0.0.1"

    def _start_admin(self, sock: socket.socket, tls: tuple[Path, Path] | None) -> None:
        settings, host = self.settings, self._admin_host
        self._admin = admin.AdminServer(
            sock,
            self.readiness,
            calls.ApiContext(
                self.store,
                settings.auth_failure_limit,
                settings.default_send_balance,
                settings.webhook_allow_private,
                settings.resend_webhook_secret,
            ),
            admin.Console(settings.hostname, self.port),
            tls,
            lambda: self.queue_state,
        )
        self._admin.start()
        scheme = "https" if tls else "http"
        log.info(
            "admin listener on %s://%s:%d (%s; /api/v1, console at /, /metrics, /healthz, /readyz)",
            scheme,
            host,
            self._admin.port,
            "TLS: not a loopback address" if tls else "plain HTTP: loopback only",
        )

    async def readiness(self) -> str | None:
        """Why this relay should get no new traffic, or None when it should (`/readyz`)."""
        if self.stopping:
            return "draining: the relay is stopping"
        if self._listener is None:
            return "not listening yet"
        if not self.channels:
            return no_channel(self.settings) or "no channel configured"
        if _identity(self.settings.database) != self._database_identity:
            return f"the database file {self.settings.database} was deleted or replaced"
        try:
            await self.store.ping()
        except RelayError as exc:
            return f"the store does not answer: {exc}"
        return None

    def _protocol(self, on_close: Callable[[], None]) -> SubmissionProtocol:
        return SubmissionProtocol(
            self.settings, self.handler, self.store, self.sessions, on_close, spool=self.spool
        )

    def _starttls_protocol(
        self, tls: ssl.SSLContext, on_close: Callable[[], None]
    ) -> StartTlsProtocol:
        return StartTlsProtocol(
            self.settings,
            self.handler,
            self.store,
            self.sessions,
            on_close,
            spool=self.spool,
            tls=tls,
        )

    async def _screen(self, key: str) -> Reply | None:
        """Before TLS: a client over the failed-AUTH limit gets 421 at the greeting."""
        try:
            failures = await self.store.auth_failures(key)
        except RelayError as exc:
            # AUTH itself answers 451 while the store is down: nothing to guess.
            self._trouble("failed-AUTH lookup", exc)
            return None
        if failures >= self.settings.auth_failure_limit:
            metrics.auth("throttled")
            return replies.AUTH_THROTTLED
        return None

    async def _sweep(self) -> None:
        self._next_sweep = time.monotonic() + self.settings.upkeep.sweep_interval
        try:
            await self.store.upkeep(self.store.apply_journals)
        except RelayError as exc:
            # A charge a journal holds must not be refunded: no sweep until it is applied.
            self._trouble("settle journal", exc)
            return
        try:
            stale_after = self.settings.stale_after
            dead_after = self.settings.upkeep.owner_dead_after
            settled = await self.store.upkeep(lambda s: s.settle_stale(stale_after, dead_after))
        except RelayError as exc:
            self._trouble("stale charge sweep", exc)
            return
        for row in settled:
            log.warning(
                "refunded a charge left pending by a stopped process: sender=%s recipients=%d",
                row["sender"],
                row["count"],
            )
        try:
            await self.store.upkeep(lambda s: s.prune_auth_failures())
        except RelayError as exc:
            self._trouble("failed-AUTH pruning", exc)
        try:
            await self.store.upkeep(lambda s: s.prune_refusals())
        except RelayError as exc:
            self._trouble("refusal pruning", exc)
        # Expired suppressions, and webhook events settled (delivered or failed)
        # longer ago than the delivery log keeps its records (at least a day).
        keep = max(1, self.settings.log_retention_days) * 86400
        try:
            await self.store.upkeep(lambda s: s.prune_suppressions())
            await self.store.upkeep(lambda s: s.prune_webhook_events(keep))
        except RelayError as exc:
            self._trouble("suppression and webhook pruning", exc)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.upkeep.checkpoint_interval)
            await self.upkeep()

    async def upkeep(self) -> None:
        """One tick of upkeep (every second): check the database file is still the one
        opened, checkpoint the write-ahead log, refresh this process's heartbeat, and
        sweep stale charges when a sweep is due. Failures are logged, at most once
        a minute each."""
        self._check_database_file()
        closed = self.admission.closed
        if closed >= TRIM_AFTER_CLOSED or (closed and not self.admission.total):
            self.admission.take_closed()
            now = time.monotonic()
            collect = not self.admission.total or now >= self._next_collect
            if collect:
                self._next_collect = now + COLLECT_EVERY
            # On the upkeep thread: the store's write thread must not wait for it.
            await self.store.upkeep(lambda _: release_freed_memory(collect=collect))
        try:
            await self.store.checkpoint()
        except RelayError as exc:
            self._trouble("WAL checkpoint", exc)
        if time.monotonic() >= self._next_heartbeat:
            try:
                await self.store.upkeep(lambda s: s.heartbeat())
                self._next_heartbeat = time.monotonic() + self.settings.upkeep.heartbeat_interval
            except RelayError as exc:
                self._trouble("heartbeat", exc)
        if time.monotonic() >= self._next_sweep:
            await self._sweep()
        if time.monotonic() >= self._next_prune:
            await self._prune()
        if self.serves_admin and time.monotonic() >= self._next_queue_stats:
            await self._read_queue_state()

    async def _read_queue_state(self) -> None:
        """The durable queue's depth by state and its oldest message's age, for
        `/metrics` and `/readyz`, every heartbeat interval. One process reads it (the
        one serving the admin listener): the figures are the database's."""
        self._next_queue_stats = time.monotonic() + self.settings.upkeep.heartbeat_interval
        try:
            stats = await self.store.queue_stats()
        except RelayError as exc:
            self._trouble("queue statistics", exc)
            return
        states = {state: int(stats["states"].get(state, 0)) for state in QUEUE_STATES}
        oldest = stats["oldest"]
        age = max(0, self.store.now() - int(oldest)) if oldest is not None else 0
        metrics.queue(states, age)
        self.queue_state = {"queue": {"mode": self.settings.queue, **states, "oldest_seconds": age}}

    async def _prune(self) -> None:
        """Delete delivery-log records past the retention, then the oldest while the log
        is past RELAY_LOG_MAX_MB, a few short batches a tick.

        While whole batches go, the next tick prunes again; once the log is
        within its retention and its cap, the next prune is a sweep interval away.
        """
        now = self.store.now()
        before = now - self.settings.log_retention_days * 86400
        budget = PRUNE_BATCHES_PER_TICK
        done = True
        try:
            while budget:
                budget -= 1
                deleted = await self.store.upkeep(lambda s: s.prune_deliveries(before, PRUNE_BATCH))
                if deleted < PRUNE_BATCH:
                    break
            else:
                done = False
            cap = self.settings.log_max_mb * 1024 * 1024
            while cap and budget:
                budget -= 1
                size, records = await self.store.upkeep(lambda s: s.log_size())
                if size <= cap or not records:
                    break
                # The oldest records' share of the excess, as if all were of a size.
                excess = -(-records * (size - cap) // size)
                deleted = await self.store.upkeep(
                    functools.partial(Store.prune_oldest_deliveries, count=excess)
                )
                if not deleted:
                    break
            else:
                done = done and not cap
        except RelayError as exc:
            self._trouble("delivery log prune", exc)
        if done:
            self._next_prune = time.monotonic() + self.settings.upkeep.sweep_interval

    def _check_database_file(self) -> None:
        """A database deleted or replaced under the relay loses every later write."""
        if self._database_identity is None:
            return
        path = self.settings.database
        if _identity(path) != self._database_identity:
            self._trouble(
                "database file check",
                StoreError(
                    f"RELAY_DATABASE: {path} was deleted or replaced while the relay runs;"
                    " what it records now is lost at the next start: restore the file"
                    " and restart the relay"
                ),
            )

    def _trouble(self, what: str, exc: RelayError) -> None:
        """Log a failure of `what`, once a minute at most; a traceback only when unexpected."""
        now = time.monotonic()
        if now < self._quiet_until.get(what, 0.0):
            return
        self._quiet_until[what] = now + TROUBLE_LOG_INTERVAL
        unexpected = exc.__cause__ is not None and not expected_failure(exc)
        log.error("%s failed: %s (logged at most once a minute)", what, exc, exc_info=unexpected)

    async def stop(self) -> None:
        """Stop accepting, let transactions in flight finish, then close everything."""
        if self._stopped:
            return
        self._stopped = self.handler.stopping = True
        if self._listener is not None:
            await self._listener.close()
        if self._starttls_listener is not None:
            await self._starttls_listener.close()
        for session in list(self.sessions):
            if not session.in_transaction():
                session.close_for_shutdown()
        await self._drained(self.settings.drain_timeout)
        for session in list(self.sessions):
            session.close_for_shutdown(abort=True)
        await self._drained(1.0)
        await self.queue.stop()  # its attempts end, its leases go back
        if self._admin is not None:
            await self._admin.stop()
        background = [t for t in (self._sweeper, self._webhook_task) if t is not None]
        tasks = [*self._tasks, *background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._webhooks is not None:
            await self._webhooks.aclose()
        await asyncio.gather(*(c.aclose() for c in self.channels.values()), return_exceptions=True)
        await self.store.aclose()

    async def _drained(self, seconds: float) -> None:
        """Wait until no session and no forward is left, for at most `seconds`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                # A session already closing only waits for the client's TLS
                # close_notify: nothing of ours is left in it.
                while self._tasks or any(not s.closing() for s in self.sessions):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)


def _identity(path: Any) -> tuple[int, int] | None:
    """A SQLite file's device and inode (None for PostgreSQL: no file to watch)."""
    if not isinstance(path, str | os.PathLike):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def release_freed_memory(*, collect: bool) -> None:
    """Collect the cycles closed sessions left (with `collect`), and return the C heap's free
    pages to the system (glibc's malloc_trim).

    A closed session's protocol, transport and TLS objects refer to each other: only the
    cyclic collector frees them, and a serving process runs it rarely
    (`relay.workers.GC_THRESHOLDS`), so after a burst of connections it runs here (at
    most every COLLECT_EVERY seconds while others stay open). Each TLS connection also
    allocates its buffers and OpenSSL state in native memory; after a burst they are
    freed but glibc keeps the pages, and the next burst does not reuse all of them: RSS
    went 106 -> 222 MB over ten bursts of 2,000 connections, with Python's object counts
    back at baseline. Trimming after each burst keeps it near the first burst's figure
    (see the benchmark's burst row). The trim is a no-op where the C library is not
    glibc.
    """
    if collect:
        gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return


def _quiet_handshake_failures(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client speaking plaintext or bad TLS is its own problem: one debug line."""
    exc = context.get("exception")
    if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
        log.debug("connection dropped: %s", exc)
        return
    loop.default_exception_handler(context)
