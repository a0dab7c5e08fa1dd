"""The operators' HTTP listener (`RELAY_ADMIN_LISTEN`): `/metrics`, `/healthz`, `/readyz`,
the admin API under `/api/v1` (`relay.admin.api`) and the web console at `/`
(`relay/admin/console`).

A Starlette application served by uvicorn inside the relay's own event loop:
`AdminServer.start()` runs uvicorn's `Server.serve()` as a task on a socket the
relay bound, `stop()` ends it. Starlette and uvicorn rather than aiohttp or a
hand-written handler because the admin API and console on this listener need
routing, middleware (security headers), JSON handling, static files and an
in-process test client, which Starlette has, and uvicorn is the ASGI server of
the same authors with an explicit lifecycle.

The application is given what it uses: a coroutine that says why the relay is
not ready (None when it is), the API's context (the store and the throttle's
limit), and what the console shows a new token's user (the SMTP host and port).
It never sees the `Relay`.

`/metrics`, `/healthz` and `/readyz` take no token: Prometheus and orchestrators
poll them, and they reveal counts, never an address or a secret. The API takes
an admin token (`relay.admin.api`). The console's files are public too: it holds no
data until its user signs in with an admin token, kept in the tab's
sessionStorage only, and sent as a bearer token (never a cookie, so no request
another site makes carries it).

Plain HTTP on a loopback address; on any other address the listener serves
TLS only (`RELAY_ADMIN_TLS_CERT`/`RELAY_ADMIN_TLS_KEY`, by default the SMTP
certificate), so an admin token never crosses a network in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay import metrics
from relay.admin import api, calls
from relay.admin.openapi import PREFIX
from relay.errors import ConfigError
from relay.network import is_loopback

log = logging.getLogger("relay.admin")
# How long a stopping admin listener lets a scrape in flight finish.
GRACEFUL_SHUTDOWN = 2
# A readiness probe that takes longer than this answers 503: the store is stuck.
READY_TIMEOUT = 2.0

Readiness = Callable[[], Awaitable[str | None]]
# What `/readyz` reports beside its verdict (the durable queue's depth and oldest age).
Details = Callable[[], dict[str, Any]]

# Every answer carries these. The console loads only its own files (no inline
# script, no other origin), is never framed, and the API's JSON is never sniffed
# into something a browser would run.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        b" connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none';"
        b" frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
CONSOLE_FILES = {
    **{
        f"/console/{name}": (name, "text/javascript; charset=utf-8")
        for name in ("app.js", "overview.js", "accounts.js", "log.js")
    },
    "/console/style.css": ("style.css", "text/css; charset=utf-8"),
    # uPlot, the overview's charts (vendor/README.md: its version and license).
    "/console/vendor/uPlot.iife.min.js": (
        "vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
    ),
    "/console/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
}


@dataclass(frozen=True)
class Console:
    """What the console shows a new token's user: where mail clients connect."""

    smtp_host: str
    smtp_port: int


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response (replacing any already set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = kept + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


def _console_routes(console: Console) -> list[Route]:
    files = resources.files("relay.admin") / "console"
    page = (
        (files / "index.html")
        .read_text("utf-8")
        .replace("{{smtp_host}}", html.escape(console.smtp_host))
        .replace("{{smtp_port}}", str(console.smtp_port))
    )

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    def static(name: str, media_type: str) -> Route:
        body = files.joinpath(*name.split("/")).read_bytes()

        async def serve(request: Request) -> Response:
            return Response(body, media_type=media_type)

        return Route(f"/console/{name}", serve)

    return [Route("/", index), *(static(n, t) for n, t in CONSOLE_FILES.values())]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods: JSON under the API, plain text elsewhere."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith(PREFIX):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return calls.error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
    return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)


async def _crash(request: Request, exc: Exception) -> Response:
    log.error("admin listener: %s %s failed", request.method, request.url.path, exc_info=exc)
    return calls.error(500, "internal", "the relay failed to answer; see its log")


def application(
    readiness: Readiness,
    context: calls.ApiContext | None = None,
    console: Console | None = None,
    details: Details | None = None,
) -> Starlette:
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                reason = await readiness()
        except TimeoutError:
            reason = "the store did not answer in time"
        answer: dict[str, Any] = {"ready": reason is None}
        if reason is not None:
            answer["reason"] = reason
        if details is not None:
            answer.update(details())
        body = json.dumps(answer) + "\n"
        return Response(body, status_code=503 if reason else 200, media_type="application/json")

    async def metrics_text(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_text),
    ]
    if context is not None:
        routes += api.routes(context)
    if console is not None:
        routes += _console_routes(console)
    app = Starlette(
        routes=routes, exception_handlers={HTTPException: _http_error, Exception: _crash}
    )
    app.add_middleware(SecurityHeaders)
    return app


def tls_files(host: str, cert: Path, key: Path) -> tuple[Path, Path] | None:
    """The certificate and key the listener on `host` serves, None on loopback (plain).

    Loaded once here, so a missing or bad file stops the start with one line."""
    if is_loopback(host):
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"RELAY_ADMIN_TLS_CERT/RELAY_ADMIN_TLS_KEY: the admin listener on {host} (not"
            f" loopback) serves TLS only, and cannot load {cert} and {key}: {exc}"
        ) from None
    return cert, key


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the relay owns SIGTERM and SIGINT.

    uvicorn's `capture_signals` replaces the process's handlers while it serves
    (in the main thread), which would take the drain away from `relay.server`.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class AdminServer:
    def __init__(
        self,
        sock: socket.socket,
        readiness: Readiness,
        context: calls.ApiContext | None = None,
        console: Console | None = None,
        tls: tuple[Path, Path] | None = None,
        details: Details | None = None,
    ) -> None:
        self.sock = sock
        self.tls = tls
        config = uvicorn.Config(
            application(readiness, context, console, details),
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
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
