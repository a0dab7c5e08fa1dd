"""The accept loop: count each connection before its TLS handshake, then serve it.

asyncio's `create_server` starts the TLS handshake before the application sees
the connection, and says nothing of a handshake that never finishes. This
loop accepts each socket itself, counts it under `relay.smtp.admission.Admission`
at once, and hands it to TLS and a protocol with `loop.connect_accepted_socket`
(a documented asyncio API, served by uvloop too). The count is released when
the connection ends, whichever way it ends. A STARTTLS listener (`tls` None)
hands the plaintext connection to its protocol at once, which upgrades it
(`relay.smtp.starttls`); it is counted the same way.

A refused connection is answered by `Refused`, not by an SMTP session: one
421 line and the close; what its client sends after is dropped unread. It is
logged once a minute at most per client key
(`relay.smtp.admission.client_key`): a flood from one address is one line, and one
from many addresses at most REFUSAL_LOG_KEYS lines and a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import cast

from relay import logs, metrics, replies
from relay.config import Settings
from relay.errors import ConfigError
from relay.network import client_key
from relay.replies import Reply
from relay.smtp.admission import Admission

log = logging.getLogger("relay.listener")

# A client that speaks no TLS, or stalls in the handshake, is dropped after this.
HANDSHAKE_TIMEOUT = 30.0
# After our 221 or 421 the session is over: wait this long at most for the
# client's TLS close_notify before dropping the connection (asyncio waits 30 s).
SHUTDOWN_TIMEOUT = 2.0
# accept() failing (out of file descriptors) is logged at most this often.
ACCEPT_ERROR_LOG_INTERVAL = 60.0
# Refused connections are logged once per client key per interval, for at most
# this many keys per interval (a few hundred KiB of log a minute at worst).
REFUSAL_LOG_INTERVAL = 60.0
REFUSAL_LOG_KEYS = 1000

# A session's protocol, given what to call when its connection ends.
ProtocolFactory = Callable[[Callable[[], None]], asyncio.Protocol]
# A client key's refusal that needs a lookup (the failed-AUTH throttle), or None.
Screen = Callable[[str], Awaitable[Reply | None]]


class Refused(asyncio.Protocol):
    """A connection over a cap or from a throttled client: its 421, then the close."""

    def __init__(self, reply: Reply, on_close: Callable[[], None]) -> None:
        self.reply = reply
        self.on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(f"{self.reply}\r\n".encode())
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass  # the client was answered; the connection is closing

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_close()


class Listener:
    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLContext | None,
        admission: Admission,
        factory: ProtocolFactory,
        screen: Screen | None = None,
    ) -> None:
        self.sock = sock
        self.tls = tls
        self.admission = admission
        self.factory = factory
        self.screen = screen
        self._accepting: asyncio.Task[None] | None = None
        self._opening: set[asyncio.Task[None]] = set()
        self._last_error_log = 0.0
        self._refusals = logs.OncePer(REFUSAL_LOG_INTERVAL, REFUSAL_LOG_KEYS)

    def start(self) -> None:
        self._accepting = asyncio.get_running_loop().create_task(self._accept_forever())

    async def close(self) -> None:
        """Stop accepting; connections still in their handshake are dropped."""
        tasks = [*([self._accepting] if self._accepting else []), *self._opening]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.sock.close()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as exc:
                self._log_accept_error(exc)
                await asyncio.sleep(0.1)  # out of descriptors: let sessions end
                continue
            key = client_key(peer[0] if isinstance(peer, tuple) else str(peer))
            refusal = self.admission.admit(key)
            if refusal is not None:
                per_address = refusal == replies.TOO_MANY_FROM_ADDRESS
                metrics.connection("refused_ip" if per_address else "refused_cap")
                self._log_refusal(key, refusal)
            if refusal is not None and self.admission.drop_without_reply(key):
                self.admission.release(key)
                conn.close()
                continue
            task = loop.create_task(self._open(conn, key, refusal))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket, key: str, refusal: Reply | None) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release(key)

        try:
            if refusal is None and self.screen is not None:
                refusal = await self.screen(key)
                if refusal is not None:
                    self._log_refusal(key, refusal)
            loop = asyncio.get_running_loop()

            def protocol() -> asyncio.Protocol:
                return self.factory(release) if refusal is None else Refused(refusal, release)

            if self.tls is None:
                # The STARTTLS port: plaintext until the session upgrades it.
                await loop.connect_accepted_socket(protocol, conn)
            else:
                await loop.connect_accepted_socket(
                    protocol,
                    conn,
                    ssl=self.tls,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                    ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
                )
            if refusal is None:
                metrics.connection("accepted")
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError) as exc:
            # The handshake failed or timed out (a plaintext client, a port
            # scanner): no protocol saw the connection, so release it here.
            release()
            if refusal is None and not isinstance(exc, asyncio.CancelledError):
                metrics.connection("tls_failed")
            with contextlib.suppress(OSError):
                conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.debug("connection from %s dropped in the TLS handshake: %s", key, exc)

    def _log_refusal(self, key: str, refusal: Reply) -> None:
        if self._refusals.allow(key):
            log.warning(
                "refused connections from %s: %s (logged at most once a minute per address)",
                key,
                refusal,
            )
        elif unlogged := self._refusals.unlogged():
            log.warning("refused %d more connections from other addresses, not logged", unlogged)

    def _log_accept_error(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ACCEPT_ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error("cannot accept connections: %s", exc.strerror or exc)


# File descriptors a process needs besides its sessions: the database (four
# connections, each with its -wal and -shm), pooled upstream SMTP and HTTP
# connections, the listening socket, the event loop's own.
FD_HEADROOM = 256


def tls_context(settings: Settings) -> ssl.SSLContext:
    for name, path in (("RELAY_TLS_CERT", settings.tls_cert), ("RELAY_TLS_KEY", settings.tls_key)):
        if not path.is_file():
            raise ConfigError(
                f"{name}: {path} does not exist (create one with `relay certs generate`)"
            )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_passphrase() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal for the
        # pass phrase, and a service has nobody to answer.
        raise ConfigError(
            f"RELAY_TLS_KEY: {settings.tls_key} is encrypted; the relay needs an unencrypted key"
            " (readable by its user only)"
        )

    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key, password=no_passphrase)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"RELAY_TLS_CERT: cannot load {settings.tls_cert} with {settings.tls_key}: {exc}"
        ) from exc
    return ctx


def check_fd_limit(settings: Settings) -> None:
    """Refuse a `RELAY_MAX_CONNECTIONS` the file-descriptor limit cannot serve.

    The soft limit is raised towards the hard one first, as far as needed (any
    process may); past the hard limit only the administrator can help.
    """
    need = settings.max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        raise ConfigError(
            f"RELAY_MAX_CONNECTIONS: {settings.max_connections} sessions need {need} file"
            f" descriptors, the limit (ulimit -n) is {soft}: lower RELAY_MAX_CONNECTIONS"
            " or raise the limit"
        )


def bind(settings: Settings, *, reuse_port: bool = False, starttls: bool = False) -> socket.socket:
    """The listening socket of RELAY_LISTEN, or with `starttls` of RELAY_STARTTLS_LISTEN."""
    name = "RELAY_STARTTLS_LISTEN" if starttls else "RELAY_LISTEN"
    address = settings.starttls_listen if starttls else settings.listen
    assert address is not None, name
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        # One listening socket per worker; the kernel spreads connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except PermissionError:
        sock.close()
        raise ConfigError(
            f"{name}: port {port} needs privileges (run with CAP_NET_BIND_SERVICE,"
            " or choose a port above 1023)"
        ) from None
    except OSError as exc:
        sock.close()
        why = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"{name}: cannot listen on {host}:{port}: {why}") from None
    sock.listen(settings.listen_backlog)
    sock.setblocking(False)
    return sock
