"""The one place the relay touches aiosmtplib's internals, checked when imported.

aiosmtplib has no pipelining API (RFC 2920): each command is written and its
reply read under the connection's command lock, one round trip per command.
`pipeline` writes a group of commands (MAIL FROM and every RCPT TO) in one write
and reads their replies in order, holding that same lock so no other command of
the client can come between. It touches:

- `SMTP.protocol`, the connection's `SMTPProtocol`, and its `transport` and `write`;
- `SMTPProtocol._command_lock` (private), assigned in `connection_made`;
- `aiosmtplib.email.quote_address`, so the commands carry the addresses exactly
  as `SMTP.mail` and `SMTP.rcpt` would write them.

The replies are not read through aiosmtplib's reply waiter: it parses one reply
per `data_received` and drops bytes that arrive while a parsed reply waits to be
picked up, so replies to pipelined commands that arrive in one segment would be
lost. For the length of the group the transport is handed to a small reader
(`BaseTransport.set_protocol`, public asyncio) that keeps every byte, parses
replies as aiosmtplib does, and passes the connection's loss on; then it is
handed back.

`check` runs at import: on an aiosmtplib this module was not read against, or
one missing a name, the relay refuses to start with one line.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import aiosmtplib
import aiosmtplib.email
import aiosmtplib.protocol
from aiosmtplib import SMTPResponse, SMTPStatus

from relay.errors import ConfigError

# The series this module was read against (5.1.2 and 5.1.3) and is tested with;
# pyproject.toml pins the same. 5.1.2 fixes command and STARTTLS injection.
TESTED_SERIES = (5, 1)
MINIMUM = (5, 1, 2)
PIN = ">=5.1.2,<5.2"
# Names this module uses, each with the method that assigns it.
ATTRIBUTES = (
    ("SMTP", "protocol", "__init__"),
    ("SMTPProtocol", "_command_lock", "connection_made"),
    ("SMTPProtocol", "transport", "connection_made"),
)
METHODS = (
    ("SMTPProtocol", "write"),
    ("SMTPProtocol", "read_response"),
    ("SMTPProtocol", "connection_lost"),
    ("SMTPProtocol", "pause_writing"),
    ("SMTPProtocol", "resume_writing"),
)
# The limits aiosmtplib's own reader applies (protocol.py): a line, a whole reply.
MAX_LINE_LENGTH = 8192
MAX_REPLY_LENGTH = MAX_LINE_LENGTH * 4
# Every C0 control and DEL: CR, LF and NUL would let an address inject a command
# (the check aiosmtplib 5.1.2 added to each command it writes).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# A dot-atom address (RFC 5321 section 4.1.2, no quoting, no route): what
# `quote_address` returns as it is, in angle brackets. Its email.utils.parseaddr
# costs ~40 us an address, about 5% of the relay's CPU per message (profiled).
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)
SERVICE_CLOSING = 421  # RFC 5321 section 3.8: the server closes after this reply
# A line that starts with a dot gets another (RFC 5321 section 4.5.2).
_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")


class IncompatibleAiosmtplib(ConfigError):
    """The installed aiosmtplib is not one this module knows."""


def _parse_version(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split(".")[:3])
    except ValueError:
        return ()


def check(module: ModuleType, version: str) -> None:
    """Raise `IncompatibleAiosmtplib` (one line) unless `module` has what `pipeline` uses.

    `module` is the `aiosmtplib` package, or a stand-in with the same `SMTP`,
    `protocol.SMTPProtocol` and `email.quote_address`.
    """
    parsed = _parse_version(version)
    if parsed[:2] != TESTED_SERIES or parsed < MINIMUM:
        raise IncompatibleAiosmtplib(
            f"aiosmtplib {version} is installed; the relay is tested with 5.1.x from 5.1.2"
            f" (pip install 'aiosmtplib{PIN}')"
        )
    classes = {
        "SMTP": getattr(module, "SMTP", None),
        "SMTPProtocol": getattr(getattr(module, "protocol", None), "SMTPProtocol", None),
    }
    for owner, cls in classes.items():
        if cls is None:
            raise IncompatibleAiosmtplib(f"aiosmtplib {version}: {owner} is missing")
    for owner, name in METHODS:
        if not callable(getattr(classes[owner], name, None)):
            raise IncompatibleAiosmtplib(f"aiosmtplib {version}: {owner}.{name} is missing")
    for owner, name, setter in ATTRIBUTES:
        code = getattr(getattr(classes[owner], setter, None), "__code__", None)
        if code is None or name not in code.co_names:
            raise IncompatibleAiosmtplib(
                f"aiosmtplib {version}: {owner}.{setter} no longer sets {name}"
            )
    if not callable(getattr(getattr(module, "email", None), "quote_address", None)):
        raise IncompatibleAiosmtplib(f"aiosmtplib {version}: email.quote_address is missing")


check(aiosmtplib, aiosmtplib.__version__)


def quote(address: str) -> bytes:
    """`<address>` exactly as aiosmtplib's `quote_address` writes it."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>".encode("ascii")
    return aiosmtplib.email.quote_address(address).encode("ascii")


def mail_command(sender: str, options: Sequence[str] = ()) -> bytes:
    """`MAIL FROM:<sender> options`, as `SMTP.mail` writes it (without the CRLF)."""
    return b" ".join([b"MAIL", b"FROM:" + quote(sender), *(o.encode("ascii") for o in options)])


def rcpt_command(recipient: str) -> bytes:
    """`RCPT TO:<recipient>`, as `SMTP.rcpt` writes it (without the CRLF)."""
    return b"RCPT TO:" + quote(recipient)


@dataclass(frozen=True)
class Replies:
    """The replies to a pipelined group, in the order of its commands.

    Fewer replies than commands when the group ended early: after a 421 (the
    upstream closes the connection, RFC 5321 section 3.8), or with `ended`, the
    loss or timeout that left the rest unanswered. Either way the client is closed.
    """

    replies: tuple[SMTPResponse, ...]
    ended: aiosmtplib.SMTPException | None = None


async def pipeline(client: aiosmtplib.SMTP, commands: Sequence[bytes]) -> Replies:
    """Write `commands` (each without its CRLF) in one write; read one reply each, in order.

    The client's `timeout` bounds the wait for each reply, as it bounds each command's.
    The caller checks that the upstream advertised PIPELINING. Raises ValueError
    for a command with a control character, `SMTPServerDisconnected` when the
    client is not connected, `SMTPResponseException` (code -1) for a malformed
    reply; then nothing, or the group, was sent and the client is closed.
    """
    for command in commands:
        if _CONTROL.search(command):
            raise ValueError("Command arg contains a prohibited control character")
    protocol = client.protocol
    lock = protocol._command_lock if protocol is not None else None
    transport = protocol.transport if protocol is not None else None
    if protocol is None or lock is None or transport is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    replies: list[SMTPResponse] = []
    ended: aiosmtplib.SMTPException | None = None
    try:
        async with lock:
            reader = _ReplyReader(protocol, asyncio.get_running_loop())
            transport.set_protocol(reader)
            try:
                protocol.write(b"".join(command + b"\r\n" for command in commands))
                while len(replies) < len(commands):
                    reply = await reader.next_reply(client.timeout)
                    replies.append(reply)
                    if reply.code == SERVICE_CLOSING:
                        break
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
                ended = exc
            finally:
                if transport.get_protocol() is reader:
                    # Bytes left in the reader answer nothing that was asked:
                    # dropped, as aiosmtplib drops unsolicited data.
                    transport.set_protocol(protocol)
    except BaseException:
        # A malformed reply, or cancelled mid-group: out of step with the upstream.
        client.close()
        raise
    if len(replies) < len(commands):
        client.close()
    return Replies(tuple(replies), ended)


class _ReplyReader(asyncio.Protocol):
    """Takes a connection's bytes for the length of a group; parses each reply."""

    def __init__(self, owner: aiosmtplib.protocol.SMTPProtocol, loop: asyncio.AbstractEventLoop):
        self._owner = owner
        self._loop = loop
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._error: aiosmtplib.SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def next_reply(self, seconds: float | None) -> SMTPResponse:
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, seconds)
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from exc
            finally:
                self._waiter = None
        return self._replies.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer.extend(data)
        try:
            while (reply := self._parse()) is not None:
                self._replies.append(reply)
        except aiosmtplib.SMTPResponseException as exc:
            self._error = exc
        self._wake()

    def _parse(self) -> SMTPResponse | None:
        """The first whole reply in the buffer, removed from it (as aiosmtplib parses)."""
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset : end + 1])
            if len(line) > MAX_LINE_LENGTH:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            try:
                code = int(line[:3])
            except ValueError:
                text = line.decode("utf-8", errors="ignore")
                raise aiosmtplib.SMTPResponseException(
                    -1, f"Malformed SMTP response line: {text}"
                ) from None
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buffer[:offset]
                return SMTPResponse(code, b"\n".join(lines).decode("utf-8", "surrogateescape"))
        if len(self._buffer) > MAX_REPLY_LENGTH:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        return None

    def eof_received(self) -> bool:
        if self._error is None:
            self._error = aiosmtplib.SMTPServerDisconnected("Unexpected EOF received")
        self._wake()
        return False  # close the transport, as aiosmtplib does

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = aiosmtplib.SMTPServerDisconnected("Connection lost")
            self._error.__cause__ = exc
        self._wake()
        # The client learns of the loss as it would have without the group.
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()


async def data(client: aiosmtplib.SMTP, content: bytes, timeout: float) -> SMTPResponse:  # noqa: ASYNC109 - per reply, as aiosmtplib bounds each
    """DATA with `content` (CRLF line endings already), under the client's command lock.

    `client.data()` rewrites line endings and dot-stuffs with two regex passes
    over the whole message, each a full copy: a 5 MiB message peaked at 3.5x its
    size in the benchmark, and a 100 KiB one cost 1.3 ms more of CPU. The
    relay's content has CRLF endings already (`message.prepare`), so only
    dot-stuffing is left, and most messages have no line that starts with a
    dot: no copy at all then. This is `SMTPProtocol.execute_data_command` less
    those passes: the same lock, the same writes, the same replies.
    """
    protocol = client.protocol
    lock = protocol._command_lock if protocol is not None else None
    if protocol is None or lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    if content.startswith(b".") or b"\r\n." in content:
        content = _DOT_AT_LINE_START.sub(b"..", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    try:
        async with lock:
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            protocol.write(content)
            protocol.write(b".\r\n")
            response = await protocol.read_response(timeout=timeout)
    except aiosmtplib.SMTPTimeoutError:
        client.close()  # a reply we gave up on would pair with the next command
        raise
    if response.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response
