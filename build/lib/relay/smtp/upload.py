"""The DATA upload as a pure state machine: bytes in, the message out (RFC 5321 section 4.5.2).

aiosmtpd reads DATA one line at a time into a bytearray per line and joins them:
about 25 ms of CPU per MB and, at the join, nearly four times the message in
memory. `Upload` takes the stream in large chunks instead and finds the end
with one `find` per chunk. What it has unstuffed can be taken as it arrives
(`take`), so the session can spool a large upload to disk and hold only a
chunk in memory, however slow or large the client's upload.

Only CRLF "." CRLF ends the data: a bare LF before the dot does not (SMTP
smuggling, CVE-2023-51766 and kin). The stream is treated as if preceded by a
CRLF, so an upload of just ".\\r\\n" is an empty message.
"""

from __future__ import annotations

END = b"\r\n.\r\n"
# The last three bytes of END are not message: the CRLF before the dot ends the
# last line. The limit counts message bytes only (dot-stuffing included).
_DOT_CRLF = 3
# Bytes held back at the end of the buffer: END may start in them.
_TAIL = len(END) - 1
_VIRTUAL_CRLF = b"\r\n"


class Upload:
    """Feed chunks until `feed` returns True; meanwhile `take()` what is ready.

    After the end, `take()` (or `message()`, which is all of it when nothing was
    taken) gives the rest of the message and `leftover` the bytes after the end.
    Past `limit` bytes the data is dropped as it arrives (and `too_big` is set)
    while the end is still looked for, so the session stays in step; `drop()`
    does the same for a message that cannot be kept (its storage failed).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self.too_big = False
        self.dropped = False
        self.leftover = b""  # bytes after the end: the client's next command
        self._buf = bytearray(_VIRTUAL_CRLF)  # not yet looked at in full
        self._out = bytearray()  # unstuffed message bytes not yet taken
        self._skip = len(_VIRTUAL_CRLF)  # of the virtual CRLF, still to drop
        self._scan = 0

    def feed(self, chunk: bytes) -> bool:
        self._buf += chunk
        end = self._buf.find(END, self._scan)
        if end < 0:
            self.received += len(chunk)
            if self.received - _DOT_CRLF > self.limit:
                self.too_big = True
                self._out.clear()
            cut = len(self._buf) - _TAIL
            # A "\r\n." cut in two would escape the unstuffing.
            if self._buf.endswith(b"\r\n", 0, max(cut, 0)):
                cut -= 2
            elif self._buf.endswith(b"\r", 0, max(cut, 0)):
                cut -= 1
            if cut > 0:
                self._emit(cut)
            self._scan = max(len(self._buf) - _TAIL, 0)
            return False
        self.leftover = bytes(self._buf[end + len(END) :])
        self.received += len(chunk) - len(self.leftover)
        if self.received - _DOT_CRLF > self.limit:
            self.too_big = True
            self._out.clear()
        self._emit(end + 2)  # keep the CRLF that ends the last line
        self._buf.clear()
        return True

    @property
    def size(self) -> int:
        """The message bytes received so far (dot-stuffing included), kept or not."""
        return max(self.received - _DOT_CRLF, 0)

    def drop(self) -> None:
        """From now on drop the message bytes, and keep looking for the end."""
        self.dropped = True
        self._out.clear()

    def take(self) -> bytes:
        """The message bytes ready since the last `take`, dot-unstuffed (section 4.5.2)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def message(self) -> bytes:
        """What is left of the message after the end (all of it if nothing was taken)."""
        assert not self.too_big and not self.dropped
        return self.take()

    def _emit(self, count: int) -> None:
        """Move the first `count` bytes of the buffer out, unstuffed; dropped if too big."""
        if not self.too_big and not self.dropped:
            piece = self._buf[:count]
            if b"\r\n." in piece:
                piece = piece.replace(b"\r\n.", b"\r\n")
            if self._skip:
                skipped = min(self._skip, len(piece))
                del piece[:skipped]
                self._skip -= skipped
            self._out += piece
        del self._buf[:count]
