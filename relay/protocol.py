"""One client connection: aiosmtpd's protocol, narrowed to the documented endpoint.

`SubmissionProtocol` keeps aiosmtpd's parsing and changes only what the endpoint
needs (../shared/reference/aiosmtpd-notes.md explains each trap):
- AUTH is ours: the token lookup is async (aiosmtpd's authenticator is called
  without await), failures answer 535 5.7.8 instead of hanging, a second AUTH is
  503 5.5.1, the exchange has its own 30 s, and repeated failures end the session.
- every reply goes through `replies.normalize`, so aiosmtpd's built-in replies
  carry enhanced codes too; EHLO advertises exactly the documented extensions;
- a timeout answers 421 4.4.2 before closing instead of dropping silently;
- DATA is read in large chunks by the pure `relay.upload.Upload`.

The MAIL, RCPT and DATA hooks are in `relay.session`.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import logging
from base64 import b64decode, b64encode
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import SMTP, Session

from relay import replies
from relay.errors import StoreError
from relay.replies import Reply
from relay.session import RelaySession
from relay.store import Principal
from relay.upload import Upload

if TYPE_CHECKING:
    from relay.server import Relay

log = logging.getLogger("relay.protocol")

API_TOKEN_USER = b"api_token"  # the documented literal username
MECHANISMS = ("PLAIN", "LOGIN")
READ_CHUNK = 256 * 1024


class SubmissionProtocol(SMTP):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.limits = relay.settings.limits
        self._command = ""  # set while aiosmtpd's smtp_MAIL runs
        self._lost = False
        super().__init__(
            relay.handler,
            data_size_limit=self.limits.max_message_size,
            enable_SMTPUTF8=False,
            decode_data=False,
            hostname=relay.settings.hostname,
            ident="ESMTP Service ready",  # no software version in the greeting
            timeout=self.limits.command_timeout,
            # Every listener is implicit TLS, so session.ssl stays None and the
            # default would hide AUTH (aiosmtpd issues #274, #281).
            auth_require_tls=False,
            loop=asyncio.get_running_loop(),
        )
        # Set after __init__: passing auth_required=True with auth_require_tls=False
        # warns on every connection, a warning that does not apply to implicit TLS.
        self._auth_required = True

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    # --- connection lifecycle --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.relay.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._lost = True
        self.relay.sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if len(self.relay.sessions) > self.relay.settings.max_connections:
            await self.push(str(replies.TOO_MANY_CONNECTIONS))
            self._close()
            return
        await super()._handle_client()

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return  # closed already: a timer restarted after the client left
        self._write_now(replies.TIMEOUT)
        super()._timeout_cb()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # A handler cancelled by connection_lost must not start a new timer:
        # it would keep this protocol alive, and fire on a closed transport.
        if not self._lost:
            super()._reset_timeout(duration)

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
        await super().push(line)
        if line.startswith("421"):
            self._close()  # RFC 5321 section 3.8: 421 closes the channel

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._command = "MAIL"
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._command = ""

    async def _push_raw(self, line: str) -> None:
        await super().push(line)

    async def reply(self, reply: Reply) -> None:
        await self.push(str(reply))

    # --- greeting and capabilities ---------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._greet("EHLO", hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        await self._greet("HELO", hostname)

    async def _greet(self, verb: str, hostname: str) -> None:
        if not hostname:
            await self.reply(replies.BAD_SYNTAX.but(f"Syntax: {verb} hostname"))
            return
        self._set_rset_state()
        session = self.relay_session()
        session.extended_smtp = verb == "EHLO"
        session.host_name = hostname
        if verb == "EHLO":
            lines = replies.ehlo(self.hostname, hostname, MECHANISMS, self.limits.max_message_size)
        else:
            lines = [replies.helo(self.hostname)]
        for line in lines:
            await self._push_raw(line)

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
            await self.reply(replies.BAD_SYNTAX.but("Syntax: AUTH mechanism [initial-response]"))
            return
        mechanism = args[0].upper()
        if mechanism not in MECHANISMS:
            await self.reply(replies.AUTH_UNKNOWN_MECHANISM)
            return
        self._reset_timeout(self.limits.auth_timeout)
        try:
            outcome = await self._check_credentials(mechanism, args[1] if len(args) > 1 else None)
        finally:
            self._reset_timeout()
        if isinstance(outcome, Principal):
            session.authenticated = True
            session.principal = outcome
            await self.reply(replies.AUTH_OK)
            return
        await self.reply(outcome)
        session.auth_failures += 1
        if session.auth_failures >= self.limits.max_auth_failures:
            await self.reply(replies.TOO_MANY_AUTH_FAILURES)
            self._close()

    # Not `_authenticate` nor `auth_*`: aiosmtpd gives both names a meaning.
    async def _check_credentials(self, mechanism: str, initial: str | None) -> Principal | Reply:
        if mechanism == "PLAIN":
            blob = await self._sasl_response(initial, b"")
            if isinstance(blob, Reply):
                return blob
            parts = blob.split(b"\0")
            if len(parts) != 3:
                return replies.AUTH_BAD_BASE64.but("Cannot split AUTH PLAIN response")
            _authzid, user, token = parts
        else:
            user_blob = await self._sasl_response(initial, b"Username:")
            if isinstance(user_blob, Reply):
                return user_blob
            token_blob = await self._sasl_response(None, b"Password:")
            if isinstance(token_blob, Reply):
                return token_blob
            user, token = user_blob, token_blob
        # Compare the username in constant time too, and look the token up even
        # when the username is wrong, so neither answer is faster than the other.
        user_ok = hmac.compare_digest(user, API_TOKEN_USER)
        try:
            principal = await self.relay.store.run(
                self.relay.store.sync.authenticate, token.decode("utf-8", "surrogateescape")
            )
        except StoreError:
            log.exception("token lookup failed")
            return replies.LOCAL_ERROR
        if principal is None or not user_ok:
            log.info("%s AUTH failed", _peer(self.relay_session()))
            return replies.AUTH_FAILED
        log.info(
            "%s AUTH ok token=%s account=%s",
            _peer(self.relay_session()),
            principal.token_id,
            principal.account,
        )
        return principal

    async def _sasl_response(self, initial: str | None, challenge: bytes) -> bytes | Reply:
        """Decode an initial response, or send a 334 challenge and decode the answer."""
        if initial is not None:
            text = initial.encode()
        else:
            await self._push_raw("334 " + b64encode(challenge).decode())
            text = (await self._reader.readline()).strip()
        if text == b"*":
            return replies.AUTH_ABORTED
        if text == b"=":  # RFC 4954 section 4: an empty initial response
            return b""
        try:
            return b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return replies.AUTH_BAD_BASE64

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Parse `<address> params` as aiosmtpd does, minus its per-call cost.

        aiosmtpd 1.4.6 defines a typing.Protocol class inside this method on every
        MAIL and RCPT; the profile of the load benchmark shows it at ~16% of the
        loop's time. Same parser, same results: (None, None) when unparseable.
        """
        if not arg:
            return "", ""
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        try:
            address, rest = parse(arg)
        except HeaderParseError:
            return None, None
        return str(address.addr_spec), rest

    # --- DATA --------------------------------------------------------------------

    async def smtp_DATA(self, arg: str | None) -> None:
        """DATA, read in large chunks by `relay.upload.Upload` instead of line by line."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.mail_from:
            await self.reply(replies.NEED_MAIL)
            return
        if not envelope.rcpt_tos:
            await self.reply(replies.NEED_RCPT)
            return
        if arg:
            await self.reply(replies.BAD_SYNTAX.but("Syntax: DATA"))
            return
        await self._push_raw(replies.START_DATA)
        # The documented 300 s for the whole upload.
        self._reset_timeout(self.limits.data_timeout)
        upload = Upload(self.limits.max_message_size)
        while not upload.feed(await self._reader.read(READ_CHUNK) or _closed()):
            pass
        if upload.leftover:
            # Commands pipelined after the end of data go back to the command loop.
            cast(Any, self._reader)._buffer[0:0] = upload.leftover
        self._reset_timeout()
        if upload.too_big:
            self._set_post_data_state()
            await self.reply(replies.MESSAGE_TOO_BIG)
            return
        envelope.content = envelope.original_content = upload.message()
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self._set_post_data_state()  # whatever happened, the next MAIL starts afresh
        self._reset_timeout()
        await self.push(status)


def _closed() -> bytes:
    # EOF mid-upload: aiosmtpd's eof_received cancels this task first; if a read
    # still returns nothing, the connection is gone.
    raise ConnectionResetError("connection closed during DATA")


def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
