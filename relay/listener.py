"""The accept loop: count each connection before its TLS handshake, then serve it.

asyncio's `create_server` starts the TLS handshake before the application sees
the connection, and says nothing of a handshake that never finishes. This
loop accepts each socket itself, counts it under `relay.admission.Admission`
at once, and hands it to TLS and a protocol with `loop.connect_accepted_socket`
(a documented asyncio API, served by uvloop too). The count is released when
the connection ends, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from relay import metrics, replies
from relay.admission import Admission
from relay.replies import Reply

log = logging.getLogger("relay.listener")

# A client that speaks no TLS, or stalls in the handshake, is dropped after this.
HANDSHAKE_TIMEOUT = 30.0
# After our 221 or 421 the session is over: wait this long at most for the
# client's TLS close_notify before dropping the connection (asyncio waits 30 s).
SHUTDOWN_TIMEOUT = 2.0
# accept() failing (out of file descriptors) is logged at most this often.
ACCEPT_ERROR_LOG_INTERVAL = 60.0

ProtocolFactory = Callable[[Reply | None, Callable[[], None]], asyncio.Protocol]
# An address's refusal that needs a lookup (the failed-AUTH throttle), or None.
Screen = Callable[[str], Awaitable[Reply | None]]


class Listener:
    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLContext,
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
            address = peer[0] if isinstance(peer, tuple) else str(peer)
            refusal = self.admission.admit(address)
            if refusal is not None:
                per_address = refusal == replies.TOO_MANY_FROM_ADDRESS
                metrics.connection("refused_ip" if per_address else "refused_cap")
            if refusal is not None and self.admission.drop_without_reply(address):
                self.admission.release(address)
                conn.close()
                continue
            task = loop.create_task(self._open(conn, address, refusal))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket, address: str, refusal: Reply | None) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release(address)

        try:
            if refusal is None and self.screen is not None:
                refusal = await self.screen(address)
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self.factory(refusal, release),
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
            log.debug("connection from %s dropped in the TLS handshake: %s", address, exc)

    def _log_accept_error(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ACCEPT_ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error("cannot accept connections: %s", exc.strerror or exc)
