"""Processes: one relay process, or several workers sharing the port under a parent.

    workers.run(settings)   # `relay serve`: blocks until SIGTERM or SIGINT

With `workers > 1` the parent checks the settings, migrates and binds once (so
a bad setting stops the start before any fork), then forks the workers. Each
worker binds its own socket (SO_REUSEPORT; a second for `RELAY_STARTTLS_LISTEN`),
and dies with its parent: Linux's PR_SET_PDEATHSIG sends it SIGTERM, and a
watchdog notices a parent that died before that took effect. The parent
forwards SIGTERM and SIGINT to every worker and exits with the first failing
worker's status. The workers count each client's connections together
(`relay.smtp.admission.HostCounts`, mapped by the parent before the fork), so
`RELAY_MAX_CONNECTIONS_PER_IP` holds for the host, on both ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from relay import metrics
from relay.admin import app as admin
from relay.channels.smtp_upstream import tls_context as smtp_tls_context
from relay.config import Settings
from relay.server import Relay, open_database
from relay.smtp.admission import HostCounts
from relay.smtp.listener import bind, check_fd_limit, tls_context
from relay.smtp.spool import Spool
from relay.store.facade import Store

log = logging.getLogger("relay.server")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The cyclic garbage collector's thresholds for a serving process (Python's
# default is 700, 10, 10). Each message allocates a few hundred containers that
# die young, so the default ran a young collection every couple of messages and
# a full one, which walks every live object of every session, every few hundred.
# Measured (2 KiB, 50 sessions, same run): 0.54 ms of CPU a message with the
# default, 0.52 with these; memory held by cyclic garbage waits a little longer.
GC_THRESHOLDS = (5000, 20, 20)


def tune_gc() -> None:
    """Before serving: what the start allocated (modules, settings, the TLS
    context) moves out of the collector's sight for good (`gc.freeze`), and the
    collections become rarer (GC_THRESHOLDS)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    ready: Callable[[Relay], Awaitable[None] | None] | None = None,
    parent: int | None = None,
    admin_sock: socket.socket | None = None,
    serves_admin: bool = True,
    host_counts: HostCounts | None = None,
    starttls_sock: socket.socket | None = None,
) -> None:
    """Run one relay process until SIGTERM or SIGINT (or, for a worker, until its
    `parent` process is gone), then drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = Relay(settings, serves_admin=serves_admin, host_counts=host_counts)
    await relay.start(sock, admin_sock, starttls_sock)
    watchdog = loop.create_task(_watch_parent(parent, stop)) if parent else None
    if ready is not None:
        result = ready(relay)
        if result is not None:
            await result
    await stop.wait()
    if watchdog is not None:
        watchdog.cancel()
    log.info("stopping: draining sessions (up to %gs)", settings.drain_timeout)
    await relay.stop()


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Where PR_SET_PDEATHSIG is missing: notice the parent's death within a second."""
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells a parent died
        await asyncio.sleep(1.0)
    log.warning("the parent process is gone: stopping this worker")
    stop.set()


def _die_with_parent(parent: int) -> None:
    """A worker gets SIGTERM when its parent dies (Linux), so none outlives a `kill -9`."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def run(settings: Settings, ready: Callable[[Relay], Any] | None = None) -> None:
    """The foreground server: one process, or `workers` processes sharing the port."""
    check_fd_limit(settings)
    if settings.workers == 1:
        _run_loop(serve(settings, ready=ready))
        return
    # Check, bind and migrate once in the parent so a bad setting stops the start here.
    tls_context(settings)
    for domain, upstream in settings.smtp_config.items():
        smtp_tls_context(domain, upstream)
    store = Store(settings.database)
    open_database(store)
    store.close()
    Spool(settings).open()
    bind(settings, reuse_port=True).close()
    if settings.starttls_listen is not None:
        bind(settings, reuse_port=True, starttls=True).close()
    # The first worker serves the admin listener, on a socket bound here so a
    # bad RELAY_ADMIN_LISTEN stops the start before any fork. The workers'
    # metrics meet in a private directory this process removes at exit.
    admin_sock = admin.bind(settings.admin_listen) if settings.admin_listen else None
    metrics_dir = metrics.private_directory()
    try:
        _run_workers(settings, ready, admin_sock, metrics_dir)
    finally:
        if admin_sock is not None:
            admin_sock.close()
        metrics.remove_directory(metrics_dir)


def _run_workers(
    settings: Settings,
    ready: Callable[[Relay], Any] | None,
    admin_sock: socket.socket | None,
    metrics_dir: str,
) -> None:
    children: list[int] = []
    stopping: list[int] = []
    host_counts = HostCounts(settings.workers)  # mapped before the forks: shared by all

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    # Installed before the first fork: a SIGTERM during the start reaches every
    # worker started so far, and no more are started.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    parent = os.getpid()
    # SIGTERM and SIGINT are blocked across each fork: a signal that arrives
    # before the new worker has reset its handlers waits for it (and then stops
    # it) instead of running the parent's `forward` in the worker.
    signals = {signal.SIGTERM, signal.SIGINT}
    for index in range(settings.workers):
        if stopping:
            break
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            code = 0
            try:
                _die_with_parent(parent)
                metrics.use_multiprocess(metrics_dir)
                host_counts.serve_as(index)
                sock = bind(settings, reuse_port=True)
                starttls_sock = (
                    bind(settings, reuse_port=True, starttls=True)
                    if settings.starttls_listen is not None
                    else None
                )
                _run_loop(
                    serve(
                        settings,
                        sock=sock,
                        starttls_sock=starttls_sock,
                        ready=ready,
                        parent=parent,
                        admin_sock=admin_sock if index == 0 else None,
                        serves_admin=index == 0,
                        host_counts=host_counts,
                    )
                )
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        if index == 0 and admin_sock is not None:
            admin_sock.close()  # the first worker has it; the others need not inherit it
    if stopping:  # a signal that came between a fork and its `append`
        forward(stopping[0], None)
    status = 0
    rows = {child: index for index, child in enumerate(children)}
    while rows:
        # Whichever worker ends first, its connections leave the host's counts
        # then, not when the workers started before it end; and before it is
        # reaped, so a worker gone from the process table is gone from the counts.
        ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        assert ended is not None  # None only with WNOHANG
        child = ended.si_pid
        if child in rows:
            host_counts.forget(rows.pop(child))
        _, code = os.waitpid(child, 0)
        metrics.worker_gone(metrics_dir, child)
        status = status or os.waitstatus_to_exitcode(code)
    host_counts.close()
    if status:
        sys.exit(status)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    tune_gc()
    try:
        import uvloop
    except ImportError:  # not on Linux: stdlib asyncio works, with larger TLS buffers
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
