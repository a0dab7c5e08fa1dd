"""The STARTTLS submission port (RFC 3207 on RFC 6409's port 587), for clients that
cannot speak implicit TLS.

RFC 8314 prefers implicit TLS (the relay's `RELAY_LISTEN`); this port exists for
the clients that only upgrade (.NET's `SmtpClient` with `EnableSsl`, many
printers and appliances). The session is the implicit-TLS one
(`relay.smtp.protocol.SubmissionProtocol`) with a plaintext start:

- before TLS, EHLO advertises STARTTLS and no AUTH, and every command but NOOP,
  EHLO, STARTTLS and QUIT gets `530 5.7.0` (RFC 3207 section 4): no token and no
  address crosses the network in plaintext;
- STARTTLS drops whatever the client pipelined after it (CVE-2011-0411 and its
  kin: plaintext bytes an attacker slipped in would otherwise be read as
  commands of the encrypted session), then the handshake, bounded in time;
- once TLS is up the session starts again (RFC 3207 section 4.2: the client's
  EHLO, and anything else said in plaintext, is forgotten) and a second
  STARTTLS is refused (`554 5.5.1`);
- the plaintext phase counts like the rest of the session (the connection
  caps, the failed-AUTH screen at accept, the idle limits, the command timer),
  and it and the handshake together last at most the AUTH timeout: a client
  that never upgrades holds its slot no longer than one that never logs in.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, MutableSet
from typing import cast

from relay import metrics, replies
from relay.config import Settings
from relay.smtp.listener import HANDSHAKE_TIMEOUT
from relay.smtp.protocol import SubmissionProtocol
from relay.smtp.session import Submission
from relay.smtp.spool import Spool
from relay.smtp.transaction import RelaySession
from relay.store.loop import AsyncStore

log = logging.getLogger("relay.protocol")

# Below this a handshake cannot finish; the plaintext deadline is then that close.
MIN_HANDSHAKE_TIMEOUT = 0.05


class StartTlsProtocol(SubmissionProtocol):
    """One connection on the STARTTLS port: plaintext until the client upgrades."""

    listener = "submission"

    def __init__(
        self,
        settings: Settings,
        handler: Submission,
        store: AsyncStore,
        sessions: MutableSet[SubmissionProtocol],
        on_close: Callable[[], None] | None = None,
        *,
        spool: Spool,
        tls: ssl.SSLContext,
    ) -> None:
        super().__init__(settings, handler, store, sessions, on_close, spool=spool)
        self.tls = tls
        self._secure = False  # the TLS handshake after STARTTLS is done
        self._upgrading = False  # from our 220 to the end of the handshake
        # The loop time by which TLS must be up (connection + the AUTH timeout).
        self._tls_deadline = 0.0
        self._tls_timer: asyncio.TimerHandle | None = None
        self.require_tls_first()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._tls_deadline = self.loop.time() + self.limits.auth_timeout
        self._tls_timer = self.loop.call_at(self._tls_deadline, self._tls_too_late)

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return  # a failed handshake ended the session already
        if self._upgrading:
            # The handshake failed or timed out; whether the TLS layer reports
            # that here or only to `upgrade_to_tls` differs between event loops.
            metrics.starttls("failed")
            log.debug("%s STARTTLS handshake failed: %s", _peer(self), error)
        self._cancel_tls_timer()
        super().connection_lost(error)

    def _cancel_tls_timer(self) -> None:
        if self._tls_timer is not None:
            self._tls_timer.cancel()
            self._tls_timer = None

    def _tls_too_late(self) -> None:
        """The AUTH timeout passed and the session is still in plaintext: 421 and close.

        A handshake under way has its own timeout, set to end by this deadline.
        """
        self._tls_timer = None
        if self._secure or self._upgrading or self._lost or self.closing():
            return
        metrics.starttls("timeout")
        log.info("%s no STARTTLS within %g s: closing", _peer(self), self.limits.auth_timeout)
        self._write_now(replies.STARTTLS_TIMEOUT)
        self._close()

    def _write_now(self, reply: replies.Reply) -> None:
        if not self._upgrading:  # mid-handshake, a plaintext 421 would be TLS garbage
            super()._write_now(reply)

    def ehlo_lines(self, client: str) -> list[str]:
        if self._secure:
            return super().ehlo_lines(client)
        return replies.ehlo(self.hostname, client, (), self.limits.max_message_size, starttls=True)

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self._secure:
            await self.reply(replies.TLS_ALREADY_ACTIVE)
            return
        if arg:
            await self.reply(replies.STARTTLS_SYNTAX)
            return
        if not self.relay_session().host_name:
            await self.reply(replies.NEED_HELO)  # STARTTLS is an EHLO extension
            return
        await self.reply(replies.READY_FOR_TLS)
        if self.closing():
            return
        self._upgrading = True
        handshake = min(HANDSHAKE_TIMEOUT, self._tls_deadline - self.loop.time())
        try:
            await self.upgrade_to_tls(self.tls, max(handshake, MIN_HANDSHAKE_TIMEOUT))
        except Exception as exc:  # any failed handshake ends the connection
            self._handshake_failed(exc)
            return
        finally:
            self._upgrading = False
        if self._lost:
            return
        self._secure = True
        self._cancel_tls_timer()
        self.require_tls_first(False)
        metrics.starttls("upgraded")
        self._forget_plaintext()

    def _forget_plaintext(self) -> None:
        """RFC 3207 section 4.2: what the client said before TLS is discarded; it
        must send EHLO again. The counts of the connection (idle commands, the
        idle deadline) go on: the plaintext phase was part of the session."""
        transport = self.transport
        assert transport is not None
        session = self.make_session()
        session.peer = transport.get_extra_info("peername")
        # Not None: aiosmtpd's eof_received then answers as over TLS.
        session.ssl = {"cipher": transport.get_extra_info("cipher")}
        self.session = session
        self.reset_transaction()

    def _handshake_failed(self, exc: Exception) -> None:
        """The handshake failed or timed out: drop the connection and end the session.

        The TLS layer may not report the close to this protocol (asyncio's does
        not while it is in the handshake): the session ends here, once, its slot
        released and its timers cancelled.
        """
        if self.transport is not None:
            cast(asyncio.Transport, self.transport).abort()
        self.connection_lost(exc)


def _peer(protocol: SubmissionProtocol) -> str:
    session = protocol.session
    peer = session.peer if isinstance(session, RelaySession) else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
