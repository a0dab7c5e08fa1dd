"""The operators' HTTP listener: `/metrics`, `/healthz`, `/readyz` (`RELAY_ADMIN_LISTEN`).

A Starlette application served by uvicorn inside the relay's own event loop:
`AdminServer.start()` runs uvicorn's `Server.serve()` as a task on a socket the
relay bound, `stop()` ends it. Starlette and uvicorn rather than aiohttp or a
hand-written handler because the admin API and console come next on this
listener: routing, middleware (authentication), JSON and form handling,
WebSockets, static files and an in-process test client are there already, and
uvicorn is the ASGI server of the same authors with an explicit lifecycle.

The application is given what it uses: a coroutine that says why the relay is
not ready (None when it is), and the metrics' text. It never sees the `Relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Generator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from relay import metrics
from relay.errors import ConfigError

log = logging.getLogger("relay.admin")
# How long a stopping admin listener lets a scrape in flight finish.
GRACEFUL_SHUTDOWN = 2
# A readiness probe that takes longer than this answers 503: the store is stuck.
READY_TIMEOUT = 2.0

Readiness = Callable[[], Awaitable[str | None]]


def application(readiness: Readiness) -> Starlette:
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                reason = await readiness()
        except TimeoutError:
            reason = "the store did not answer in time"
        if reason is None:
            return Response('{"ready": true}\n', media_type="application/json")
        body = json.dumps({"ready": False, "reason": reason}) + "\n"
        return Response(body, status_code=503, media_type="application/json")

    async def metrics_text(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_text),
        ]
    )


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the relay owns SIGTERM and SIGINT.

    uvicorn's `capture_signals` replaces the process's handlers while it serves
    (in the main thread), which would take the drain away from `relay.server`.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class AdminServer:
    def __init__(self, sock: socket.socket, readiness: Readiness) -> None:
        self.sock = sock
        config = uvicorn.Config(
            application(readiness),
            lifespan="off",
            log_config=None,  # the relay's logging, as configured
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        """Serve on the bound socket; connections wait in its backlog until uvicorn takes it."""
        self._task = asyncio.get_running_loop().create_task(self._server.serve([self.sock]))

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            log.exception("the admin listener failed")
        self.sock.close()


def bind(address: tuple[str, int]) -> socket.socket:
    """The admin listener's socket, or a `ConfigError` naming `RELAY_ADMIN_LISTEN`."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"RELAY_ADMIN_LISTEN: cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock
