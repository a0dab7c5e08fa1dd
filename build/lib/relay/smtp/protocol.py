"""One client connection: aiosmtpd's protocol, narrowed to the documented endpoint.

`SubmissionProtocol` keeps aiosmtpd's parsing and changes only what the endpoint
needs; aiosmtpd's private names are reached only through
`relay.smtp.aiosmtpd_compat.SMTPBase`:
- AUTH is ours: the token lookup is async (aiosmtpd's authenticator is called
  without await), failures answer 535 5.7.8 instead of hanging, a second AUTH is
  503 5.5.1, the exchange has its own 30 s, and repeated failures end the session.
- every reply goes through `replies.normalize`, so aiosmtpd's built-in replies
  carry enhanced codes too; EHLO advertises exactly the documented extensions;
- a timeout answers 421 4.4.2 before closing instead of dropping silently, and
  so does a session that has delivered no message for `RELAY_SESSION_IDLE_MAX`
  seconds (except while its DATA is uploaded or forwarded);
- DATA is read in large chunks by the pure `relay.smtp.upload.Upload` and kept by
  `relay.smtp.spool`; an upload that cannot be kept is still read to its end.

The MAIL, RCPT and DATA hooks are in `relay.smtp.session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from base64 import b64encode
from collections.abc import Callable, MutableSet
from typing import cast

from aiosmtpd.smtp import Session

from relay import logs, metrics, replies
from relay.config import Settings
from relay.errors import StoreError
from relay.message import parse_path
from relay.network import client_key
from relay.replies import Reply
from relay.smtp import auth
from relay.smtp.aiosmtpd_compat import SMTPBase
from relay.smtp.session import Submission
from relay.smtp.spool import NotStored, Spool
from relay.smtp.transaction import RelayEnvelope, RelaySession
from relay.smtp.upload import Upload
from relay.store.facade import Principal
from relay.store.loop import AsyncStore

log = logging.getLogger("relay.protocol")
logs.redact_aiosmtpd()

# Reads while DATA arrives: an upload holds about this much in flight.
READ_CHUNK = 64 * 1024
# What the kernel and the TLS layer buffer for a connection once it has sent
# DATA (see `_bound_receive_buffers`).
DATA_SOCKET_BUFFER = 32 * 1024
DATA_TLS_QUEUE = 16 * 1024


class SubmissionProtocol(SMTPBase):
    """One connection. Given what it uses: the settings, the handler, the store
    (for AUTH) and the set of open sessions it joins while connected."""

    # The port's name in metrics and the delivery log (relay.smtp.starttls: "submission").
    listener = "smtps"

    def __init__(
        self,
        settings: Settings,
        handler: Submission,
        store: AsyncStore,
        sessions: MutableSet[SubmissionProtocol],
        on_close: Callable[[], None] | None = None,
        *,
        spool: Spool,
    ) -> None:
        self.settings = settings
        self.on_close = on_close
        self.limits = settings.limits
        self.store = store
        self.sessions = sessions
        self._command = ""  # set while aiosmtpd's smtp_MAIL runs
        self._lost = False
        self._idle_commands = 0  # commands since the last delivered message
        # RELAY_SESSION_IDLE_MAX: the session ends at this loop time unless a
        # message is delivered first; the timer checks it.
        self._idle_deadline = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_over = False  # the deadline passed while a DATA was under way
        self._in_data = False  # from our 354 to the reply that ends the DATA
        self.spool = spool  # where DATA uploads are kept while they arrive
        self._buffers_bounded = False
        super().__init__(
            handler,
            data_size_limit=self.limits.max_message_size,
            enable_SMTPUTF8=False,
            decode_data=False,
            hostname=settings.hostname,
            ident="ESMTP Service ready",  # no software version in the greeting
            timeout=self.limits.command_timeout,
            # Every listener is implicit TLS, so session.ssl stays None and the
            # default would hide AUTH (aiosmtpd issues #274, #281).
            auth_require_tls=False,
            loop=asyncio.get_running_loop(),
        )
        # Set after __init__: passing auth_required=True with auth_require_tls=False
        # warns on every connection, a warning that does not apply to implicit TLS.
        self.require_auth()

    def make_session(self) -> RelaySession:
        return RelaySession(self.loop, self.listener)

    def make_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    def parse_path(self, arg: str) -> tuple[str | None, str | None]:
        return parse_path(arg)

    # --- connection lifecycle --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sessions.add(self)
        super().connection_made(transport)
        self._idle_deadline = self.loop.time() + self.settings.session_idle_max
        self._idle_timer = self.loop.call_at(self._idle_deadline, self._idle_check)

    def connection_lost(self, error: Exception | None) -> None:
        self._lost = True
        if self.on_close is not None:
            self.on_close()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.sessions.discard(self)
        super().connection_lost(error)

    def on_timeout(self) -> None:
        self._write_now(replies.TIMEOUT)

    def _idle_check(self) -> None:
        """RELAY_SESSION_IDLE_MAX: a session holds a connection slot only while it
        delivers. Without this, commands that each come just inside the command
        timeout would hold a slot for hours."""
        self._idle_timer = None
        if self._lost or self.closing():
            return
        if self.loop.time() < self._idle_deadline:  # a message was delivered meanwhile
            self._idle_timer = self.loop.call_at(self._idle_deadline, self._idle_check)
        elif self._in_data:
            self._idle_over = True  # an upload or forward is not cut: its reply decides
        else:
            self._end_idle()

    def idle_limit_passed(self) -> bool:
        """Whether RELAY_SESSION_IDLE_MAX passed during the DATA under way (its reply decides)."""
        return self._idle_over

    def _end_idle(self) -> None:
        peer, seconds = _peer(self.relay_session()), self.settings.session_idle_max
        log.info("%s no message delivered in %g s: closing the session", peer, seconds)
        self._write_now(replies.SESSION_IDLE_TOO_LONG)
        self._close()

    def _data_ended(self, reply: str) -> None:
        """The reply that ends a DATA: a delivered message restarts the idle clock."""
        self._in_data = False
        if reply.startswith("250"):
            self._idle_over = False
            self._idle_deadline = self.loop.time() + self.settings.session_idle_max
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_at(self._idle_deadline, self._idle_check)
        elif self._idle_over:
            self._end_idle()

    def timer_allowed(self) -> bool:
        # A handler cancelled by connection_lost must not start a new timer:
        # it would keep this protocol alive, and fire on a closed transport.
        return not self._lost

    def close_for_shutdown(self, *, abort: bool = False) -> None:
        """End the session with 421; the server calls it on idle sessions first.

        `abort` drops the connection without waiting for the client's TLS
        close_notify, for sessions still open when the drain time is over.
        """
        self._write_now(replies.SHUTTING_DOWN)
        if abort and self.transport is not None:
            cast(asyncio.Transport, self.transport).abort()
        else:
            self._close()

    # Methods, not properties: aiosmtpd's __init__ runs inspect.getmembers(self),
    # which evaluates every property before the session exists.
    def in_transaction(self) -> bool:
        return bool(self.envelope is not None and self.envelope.mail_from)

    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def relay_session(self) -> RelaySession:
        session = self.session
        assert isinstance(session, RelaySession)
        return session

    def _write_now(self, reply: Reply) -> None:
        """Write outside the command loop (timer callbacks), before a close."""
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(f"{reply}\r\n".encode())

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- replies -------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        line = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        if line.startswith(replies.AIOSMTPD_MALFORMED_ADDRESS):
            # aiosmtpd says 5.1.3 (a recipient's code) for MAIL too.
            mail = self._command == "MAIL"
            line = str(replies.BAD_SENDER_ADDRESS if mail else replies.BAD_RECIPIENT_ADDRESS)
        line = replies.normalize(line)
        metrics.reply(line)
        await self._push_raw(line)
        if self.closing():
            return
        if line.startswith("421"):
            self._close()  # RFC 5321 section 3.8: 421 closes the channel
        elif line[:1] in ("4", "5"):
            await self._no_progress()  # a refused or unknown command moves nothing

    async def _no_progress(self) -> None:
        """Count a command that moved nothing forward; past the limit, 421 and close.

        NOOP, RSET, HELP, VRFY, a repeated EHLO, and every refused or unknown
        command count; a delivered message starts the count again. Without
        this, a NOOP every few minutes would hold a session (and its slot)
        forever, and a MAIL/RSET loop would cost the relay work for nothing.
        """
        self._idle_commands += 1
        if self._idle_commands > self.limits.max_idle_commands:
            await self._push_raw(str(replies.TOO_MANY_IDLE_COMMANDS))
            self._close()

    async def smtp_NOOP(self, arg: str | None) -> None:
        await super().smtp_NOOP(arg)
        await self._no_progress()

    async def smtp_RSET(self, arg: str | None) -> None:
        await super().smtp_RSET(arg)
        await self._no_progress()

    async def smtp_HELP(self, arg: str | None) -> None:
        await super().smtp_HELP(arg)
        await self._no_progress()

    async def smtp_VRFY(self, arg: str | None) -> None:
        await super().smtp_VRFY(arg)
        await self._no_progress()

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._command = "MAIL"
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._command = ""

    async def _push_raw(self, line: str) -> None:
        """Every reply line goes out here; nothing is written once the session is closing."""
        if self.closing():
            return
        await super().push(line)
        if line.startswith("354"):
            self._in_data = True
        elif self._in_data:
            self._data_ended(line)

    async def reply(self, reply: Reply) -> None:
        await self.push(str(reply))

    # --- greeting and capabilities ---------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._greet("EHLO", hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        await self._greet("HELO", hostname)

    async def _greet(self, verb: str, hostname: str) -> None:
        if not hostname:
            await self.reply(replies.EHLO_SYNTAX if verb == "EHLO" else replies.HELO_SYNTAX)
            return
        self.reset_transaction()
        session = self.relay_session()
        if session.host_name:
            await self._no_progress()  # a greeting again moves nothing
            if self.closing():
                return
        session.extended_smtp = verb == "EHLO"
        session.host_name = hostname
        if verb == "EHLO":
            lines = self.ehlo_lines(hostname)
        else:
            lines = [replies.helo(self.hostname)]
        for line in lines:
            await self._push_raw(line)

    def ehlo_lines(self, client: str) -> list[str]:
        return replies.ehlo(self.hostname, client, auth.MECHANISMS, self.limits.max_message_size)

    # --- AUTH (RFC 4954) -------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        session = self.relay_session()
        if not session.host_name:
            await self.reply(replies.AUTH_NEEDS_EHLO)
            return
        if session.authenticated:
            await self.reply(replies.AUTH_ALREADY)
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.reply(replies.AUTH_SYNTAX)
            return
        mechanism = args[0].upper()
        if mechanism not in auth.MECHANISMS:
            await self.reply(replies.AUTH_UNKNOWN_MECHANISM)
            return
        if await self._client_throttled():
            # Over the limit since this session began (other sessions' failures).
            metrics.auth("throttled")
            await self.reply(replies.AUTH_THROTTLED)
            return
        self.reset_timer(self.limits.auth_timeout)
        try:
            outcome = await auth.check_credentials(
                self.store,
                self._challenge,
                mechanism,
                args[1] if len(args) > 1 else None,
                _peer(session),
                session.peer[0] if isinstance(session.peer, tuple) else "",
            )
        finally:
            self.reset_timer()
        metrics.auth("success" if isinstance(outcome, Principal) else "failure")
        if isinstance(outcome, Principal):
            session.authenticated = True
            session.principal = outcome
            await self.reply(replies.AUTH_OK)
            return
        if outcome == replies.AUTH_FAILED:
            failures = await self._record_auth_failure()
            if failures is not None and failures > self.settings.auth_failure_limit:
                # Sessions that were all mid-exchange when the limit was reached:
                # only `auth_failure_limit` failures were ever answered 535.
                metrics.auth("throttled")
                await self.reply(replies.AUTH_THROTTLED)
                return
        await self.reply(outcome)
        session.auth_failures += 1
        if session.auth_failures >= self.limits.max_auth_failures:
            metrics.auth("throttled")
            await self.reply(replies.TOO_MANY_AUTH_FAILURES)
            self._close()

    def _client_key(self) -> str:
        peer = self.relay_session().peer
        return client_key(peer[0] if isinstance(peer, tuple) else str(peer))

    async def _client_throttled(self) -> bool:
        """Whether the client is over RELAY_AUTH_FAILURE_LIMIT (relay.store.throttle)."""
        try:
            failures = await self.store.auth_failures(self._client_key())
        except StoreError:
            return False  # the token lookup answers 451 while the store is down
        return failures >= self.settings.auth_failure_limit

    async def _record_auth_failure(self) -> int | None:
        """Count the failure against the client for every session: its failures within
        the window, this one included (None when the store could not count it)."""
        key = self._client_key()
        try:
            return await self.store.record_auth_failure(key, self.settings.auth_failure_limit)
        except StoreError as exc:
            if not self.store.logged(exc):
                log.warning("could not record a failed AUTH from %s", key)
            return None

    async def _challenge(self, challenge: bytes) -> bytes | None:
        """One SASL round (RFC 4954 section 4): a 334 challenge, the client's line."""
        await self._push_raw("334 " + b64encode(challenge).decode())
        return await self.read_line()

    # --- DATA --------------------------------------------------------------------

    async def smtp_DATA(self, arg: str | None) -> None:
        """DATA, read in large chunks by `relay.smtp.upload.Upload` instead of line by line."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)
        if envelope.transaction is None:
            await self.reply(replies.NEED_MAIL)
            return
        if not envelope.transaction.recipients:
            await self.reply(replies.NEED_RCPT)
            return
        if arg:
            await self.reply(replies.DATA_SYNTAX)
            return
        handler = cast(Submission, self.event_handler)
        refusal = handler.data_refusal(envelope)
        if refusal is not None:
            await self.reply(refusal)
            return
        if self._storage_refusal(envelope):
            self.end_transaction()  # the client tries again later, from MAIL
            await self.reply(replies.INSUFFICIENT_STORAGE)
            return
        self._bound_receive_buffers()
        await self._push_raw(replies.START_DATA)
        # The documented 300 s for the whole upload.
        self.reset_timer(self.limits.data_timeout)
        received, size = await self._receive()
        self.reset_timer()
        if isinstance(received, Reply):
            # Not kept (too big, or its storage failed): the rest was read and
            # dropped, so no byte of it is taken as a command. One record, one reply.
            tx = envelope.transaction
            self.end_transaction()
            await handler.upload_refused(self.relay_session(), tx, received, size)
            await self.reply(received)
            return
        envelope.content = received
        try:
            status = await handler.handle_DATA(self, self.relay_session(), envelope)
        finally:
            self.end_transaction()  # whatever happened, the next MAIL starts afresh
        self.reset_timer()
        if status.startswith("250"):
            self._idle_commands = 0
        await self.push(status)

    def _storage_refusal(self, envelope: RelayEnvelope) -> bool:
        """Before 354: whether a declared SIZE= (RFC 1870) has no room in the spool now.

        Checked at DATA, with the budget as it is then, so the client uploads
        nothing that would be dropped; RFC 1870 section 6.2 names 452 for it.
        """
        declared = envelope.transaction.declared_size if envelope.transaction else None
        if declared is None or self.spool.fits(declared):
            return False
        self.spool.note_full(f"a declared SIZE={declared} does not fit the spool budget")
        return True

    def _bound_receive_buffers(self) -> None:
        """Keep what the TLS layer buffers for an upload small, once per connection.

        uvloop reads the socket into a 256 KiB buffer and queues ciphertext up
        to 256 KiB before it pauses; OpenSSL's memory BIO then keeps the largest
        size it reached for the life of the connection. With the kernel's
        receive buffer autotuned to megabytes, a client that uploaded and then
        stalled held about 0.8 MiB. A 32 KiB receive buffer (the kernel doubles
        it) and a 16 KiB TLS queue bound each read and the queue: about 240 KiB
        per stalled upload, TLS connection included (the benchmark's row). The
        price is the TCP window: loopback and LAN uploads run as fast, a 5 MiB
        upload over a 100 ms path takes about 15 s of the 300 s DATA allows.
        """
        if self._buffers_bounded or self.transport is None:
            return
        self._buffers_bounded = True
        set_limits = getattr(self.transport, "set_read_buffer_limits", None)
        if set_limits is not None:
            set_limits(high=DATA_TLS_QUEUE)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DATA_SOCKET_BUFFER)

    async def _receive(self) -> tuple[bytes | Reply, int]:
        """The message up to CRLF.CRLF (or the reply for one that cannot be kept), and
        the bytes received.

        Whatever goes wrong while the upload is stored (the spool budget, ENOSPC,
        EIO, EFBIG), the rest is still read to the final dot and dropped: the
        body's bytes must never reach the command loop (SMTP smuggling). If the
        upload ends any other way (the connection lost, the timer's 421), the
        connection closes before anything after it is parsed.
        """
        upload = Upload(self.limits.max_message_size)
        ended = failed = False
        try:
            with self.spool.upload() as stored:
                while not ended:
                    ended = upload.feed(await self._read_data())
                    if not failed:
                        try:
                            stored.write(upload.take())
                        except NotStored:
                            failed = True
                            upload.drop()
                if upload.leftover:
                    # Commands pipelined after the end of data go back to the command loop.
                    self.unread(upload.leftover)
                if upload.too_big:
                    return replies.MESSAGE_TOO_BIG, upload.size
                if not failed:
                    try:
                        return stored.content(), upload.size
                    except NotStored:
                        pass
                return replies.INSUFFICIENT_STORAGE, upload.size
        finally:
            if not ended:
                self._close()

    async def _read_data(self) -> bytes:
        chunk = await self.read(READ_CHUNK)
        if not chunk or self.closing():
            # EOF mid-upload (aiosmtpd's eof_received cancels this task first), or
            # the timer's 421 closed the connection: nothing more is read.
            raise ConnectionResetError("connection closed during DATA")
        return chunk


def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
