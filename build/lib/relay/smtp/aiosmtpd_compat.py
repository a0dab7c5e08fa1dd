"""The one place the relay touches aiosmtpd's private names, checked when imported.

aiosmtpd documents handler hooks (`handle_MAIL`, `handle_RCPT`, `handle_DATA`,
`handle_exception`) and overriding its `smtp_*` command methods; the relay uses
those. A few things it needs have no documented hook:

- the command timer (`_reset_timeout`, `_timeout_cb`): the documented 30 s for
  AUTH and 300 s for the whole DATA upload, and a 421 before a timeout closes;
- the transaction resets (`_set_rset_state`, `_set_post_data_state`) and the
  session and envelope factories (`_create_session`, `_create_envelope`);
- the stream (`_reader`, and its `_buffer` to give back bytes read past the end
  of DATA: the command loop must see a client's pipelined commands);
- the address parser (`_getaddr`), replaced by the relay's own RFC 5321 one;
- `_auth_required`, set after `__init__` (passing it warns on every connection
  under implicit TLS, aiosmtpd issues #274 and #281);
- for the STARTTLS port: the stream writer (`_writer`), whose documented
  `start_tls` upgrades the connection, and the reader's `_buffer`, emptied
  first. aiosmtpd's own STARTTLS builds `asyncio.sslproto.SSLProtocol` by hand,
  with no handshake timeout and beside uvloop's; the relay does not use it, only
  its gate (`require_starttls`: 530 to any command but NOOP, EHLO, STARTTLS and
  QUIT, RFC 3207 section 4), a public attribute.

`SMTPBase` turns each into a public name the relay calls or overrides. Nothing
else in the relay imports a private aiosmtpd name. `check` runs at import: on
an aiosmtpd version this module was not tested with, or one missing a name, the
relay refuses to start with one line instead of misbehaving silently.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

import aiosmtpd
import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.errors import ConfigError

# The versions whose private behaviour this module was read against and tested
# with; pyproject.toml pins the same.
TESTED_VERSIONS = ("1.4.6",)
# Methods of aiosmtpd.smtp.SMTP this module calls or overrides.
METHODS = (
    "_reset_timeout",
    "_timeout_cb",
    "_set_rset_state",
    "_set_post_data_state",
    "_create_session",
    "_create_envelope",
    "_getaddr",
    "smtp_MAIL",
    "smtp_AUTH",
    "smtp_DATA",
    "check_helo_needed",
    "check_auth_needed",
)
# Instance attributes, each with the method that assigns it.
ATTRIBUTES = (
    ("_auth_required", "__init__"),
    ("_reader", "_cb_client_connected"),
    ("_handler_coroutine", "connection_made"),
    ("_timeout_handle", "_reset_timeout"),
)
# What the STARTTLS port uses, each with the method that assigns or reads it.
STARTTLS_NAMES = (
    ("_writer", "_cb_client_connected"),
    ("require_starttls", "_handle_client"),
)
# The commands aiosmtpd's STARTTLS gate lets through before TLS (RFC 3207 section 4).
BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})


class IncompatibleAiosmtpd(ConfigError):
    """The installed aiosmtpd is not one this module knows."""


def check(module: ModuleType, version: str) -> None:
    """Raise `IncompatibleAiosmtpd` (one line) unless `module` has what `SMTPBase` uses."""
    if version not in TESTED_VERSIONS:
        raise IncompatibleAiosmtpd(
            f"aiosmtpd {version} is installed; the relay is tested with"
            f" {', '.join(TESTED_VERSIONS)} (pip install 'aiosmtpd=={TESTED_VERSIONS[-1]}')"
        )
    smtp = getattr(module, "SMTP", None)
    if smtp is None:
        raise IncompatibleAiosmtpd(f"aiosmtpd {version}: aiosmtpd.smtp.SMTP is missing")
    for name in METHODS:
        if not callable(getattr(smtp, name, None)):
            raise IncompatibleAiosmtpd(f"aiosmtpd {version}: SMTP.{name} is missing")
    for name, setter in ATTRIBUTES:
        code = getattr(getattr(smtp, setter, None), "__code__", None)
        if code is None or name not in code.co_names:
            raise IncompatibleAiosmtpd(f"aiosmtpd {version}: SMTP.{setter} no longer sets {name}")
    for name, method in STARTTLS_NAMES:
        code = getattr(getattr(smtp, method, None), "__code__", None)
        if code is None or name not in code.co_names:
            raise IncompatibleAiosmtpd(f"aiosmtpd {version}: SMTP.{method} no longer uses {name}")
    if getattr(module, "ALLOWED_BEFORE_STARTTLS", None) != BEFORE_STARTTLS:
        raise IncompatibleAiosmtpd(f"aiosmtpd {version}: ALLOWED_BEFORE_STARTTLS changed")
    if not callable(getattr(asyncio.StreamWriter, "start_tls", None)):
        raise IncompatibleAiosmtpd("asyncio.StreamWriter has no start_tls (Python 3.11+)")
    # The StreamReader's buffer, to give back bytes read past the end of DATA.
    if "_buffer" not in asyncio.StreamReader.__init__.__code__.co_names:
        raise IncompatibleAiosmtpd("asyncio.StreamReader no longer has a _buffer")


check(aiosmtpd.smtp, aiosmtpd.__version__)


class SMTPBase(SMTP):
    """aiosmtpd's `SMTP` with its private seams under public names.

    Subclasses override `make_session`, `make_envelope`, `parse_path`,
    `timer_allowed` and `on_timeout`, and call `require_auth`, `reset_timer`,
    `reset_transaction`, `end_transaction`, `read_line`, `read` and `unread`;
    tests ask `command_loop_done` and `timer_pending`.
    """

    # --- what subclasses override ------------------------------------------------

    def make_session(self) -> Session:
        return Session(self.loop)

    def make_envelope(self) -> Envelope:
        return Envelope()

    def parse_path(self, arg: str) -> tuple[str | None, str | None]:
        """`<address> params` -> (address, params); (None, None) when unparseable."""
        raise NotImplementedError

    def timer_allowed(self) -> bool:
        """False once the connection is gone: no timer may outlive it."""
        return True

    def on_timeout(self) -> None:
        """Called when the command timer fires, before aiosmtpd closes the transport."""

    # --- what subclasses call ------------------------------------------------------

    def require_auth(self) -> None:
        self._auth_required = True

    def reset_timer(self, seconds: float | None = None) -> None:
        """Restart the command timer: `seconds`, or the `timeout` given to __init__."""
        self._reset_timeout(seconds)

    def reset_transaction(self) -> None:
        """RSET state: a new envelope (RFC 5321 section 4.1.1.5)."""
        self._set_rset_state()

    def end_transaction(self) -> None:
        """The state after DATA, whatever its outcome: the next MAIL starts afresh."""
        self._set_post_data_state()

    async def read_line(self) -> bytes | None:
        """One line from the client, or None when it was longer than the stream allows.

        An over-long line is read to its end and dropped whole, so no part of it
        is taken as a command afterwards (asyncio's readline would drop only
        what it had buffered).
        """
        reader = self._reader
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("connection closed mid-line") from exc
        except asyncio.LimitOverrunError as overrun:
            await reader.read(overrun.consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return None
            except asyncio.IncompleteReadError as exc:
                raise ConnectionResetError("connection closed mid-line") from exc
            except asyncio.LimitOverrunError as overrun:
                await reader.read(overrun.consumed)

    async def read(self, size: int) -> bytes:
        return await self._reader.read(size)

    def command_loop_done(self) -> bool:
        """Whether aiosmtpd's command loop for this connection has ended."""
        loop = self._handler_coroutine
        return loop is not None and bool(loop.done())

    def timer_pending(self) -> bool:
        """Whether a command timer is set and not cancelled."""
        handle = self._timeout_handle
        return handle is not None and not handle.cancelled()

    def unread(self, data: bytes) -> None:
        """Give back bytes read past the end of DATA to the command loop."""
        cast(Any, self._reader)._buffer[0:0] = data

    def require_tls_first(self, required: bool = True) -> None:
        """aiosmtpd's STARTTLS gate: 530 to every command but NOOP, EHLO, STARTTLS, QUIT."""
        self.require_starttls = required

    async def upgrade_to_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> None:
        """Drop what the client sent after STARTTLS, then the TLS handshake (server side).

        RFC 3207 section 4.2 and CVE-2011-0411: bytes the client pipelined after
        STARTTLS came in plaintext, so none may be read as a command once TLS is
        up. They are in the reader's buffer now; the buffer is emptied with no
        await between it and the moment the socket's bytes start going to TLS
        (the writer is drained first, so `start_tls`'s own drain does not wait;
        `loop.start_tls` pauses reading and swaps the protocol before its first
        await). A byte that arrives later is TLS input: a plaintext one fails the
        handshake. Raises what the handshake raised; the caller closes.
        """
        writer = self._writer
        await writer.drain()
        cast(Any, self._reader)._buffer.clear()
        await writer.start_tls(context, ssl_handshake_timeout=handshake_timeout)
        self.transport = writer.transport

    # --- the private names, routed ------------------------------------------------

    def _create_session(self) -> Session:
        return self.make_session()

    def _create_envelope(self) -> Envelope:
        return self.make_envelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return self.parse_path(arg)

    def _reset_timeout(self, duration: float | None = None) -> None:
        if self.timer_allowed():
            super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return  # closed already: a timer restarted after the client left
        self.on_timeout()
        cast(Callable[[], None], super()._timeout_cb)()
