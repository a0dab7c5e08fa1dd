"""Where a DATA upload is kept while it arrives: memory first, then a private spool file.

    spool = Spool(settings)
    spool.open()                         # at start: the directory, the budget
    with spool.upload() as stored:
        stored.write(chunk)              # raises NotStored, never OSError
        content = stored.content()

Guarantees:
- An upload up to `MEMORY_BYTES` stays in memory; past that it moves to a file
  in `RELAY_SPOOL_DIR` that has no name (O_TMPFILE; where the filesystem lacks
  it, a 0600 file unlinked as soon as it is created), so the file goes with its
  descriptor however the upload ends, a crash included. A start removes what
  the fallback may have left (`relay-spool-*` names only).
- Every byte an upload in progress holds counts against one budget:
  `RELAY_SPOOL_MAX_BYTES` is the host's, shared out evenly among the
  `RELAY_WORKERS` processes of one `relay serve`, each accounting its own share
  (no lock between processes). A write past the share, or one the disk refuses
  (ENOSPC, EIO, EFBIG, a directory that is gone), raises `NotStored`: the
  session drains the rest of DATA and answers `452 4.3.1` (RFC 3463: mail
  system storage full).
- Nothing here blocks for long: writes go to the page cache, on the event loop
  as any socket write does; the directory and the budget are set at start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import time
from types import TracebackType

from relay.config import MIN_SPOOL_BYTES, Settings
from relay.errors import ConfigError

log = logging.getLogger("relay.spool")
# A small upload (most messages) never touches the disk; a larger one holds at
# most this much of itself in memory.
MEMORY_BYTES = 64 * 1024
# The default budget: this share of the free space of the spool directory's
# filesystem at start, at most DEFAULT_BUDGET_CAP (a thousand uploads at the
# documented 5 MiB need 5 GiB; a tenth of a small disk leaves the rest to the
# database and the system), at least the smallest RELAY_SPOOL_MAX_BYTES.
DEFAULT_BUDGET_SHARE = 10
DEFAULT_BUDGET_CAP = 1024 * 1024 * 1024
FALLBACK_PREFIX = "relay-spool-"
# A full spool must not flood the log: one line a minute says it is full.
FULL_LOG_INTERVAL = 60.0


class NotStored(Exception):
    """The upload cannot be kept: the budget is spent, or the disk refused a write."""


class Spool:
    """The spool directory and the budget of one relay process."""

    def __init__(self, settings: Settings) -> None:
        self.directory = settings.spool_dir
        self._configured = settings.spool_max_bytes
        self._workers = max(settings.workers, 1)
        self.budget = 0  # set by `open`: this process's share
        self.used = 0  # bytes held by uploads in progress
        self._tmpfile = hasattr(os, "O_TMPFILE")
        self._quiet_until = 0.0

    def open(self) -> None:
        """Create the directory (0700), remove what a crash left, set the budget.

        Raises `ConfigError` (one line) when the directory cannot be made or written.
        """
        directory = self.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for leftover in directory.glob(FALLBACK_PREFIX + "*"):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            os.close(self._create())
            free = os.statvfs(directory)
        except OSError as exc:
            raise ConfigError(
                f"RELAY_SPOOL_DIR: cannot use {directory}: {exc.strerror or exc}"
            ) from None
        total = self._configured or default_budget(free.f_bavail * free.f_frsize)
        self.budget = total // self._workers

    def describe(self) -> str:
        """One line for the start's log."""
        origin = "RELAY_SPOOL_MAX_BYTES" if self._configured else "a tenth of the free space"
        share = f", this process's share of {self._workers}" if self._workers > 1 else ""
        return f"spool {self.directory}: {self.budget:,} bytes for uploads ({origin}{share})"

    def fits(self, size: int) -> bool:
        """Whether an upload of `size` bytes has room now (MAIL FROM's SIZE=, RFC 1870)."""
        return self.used + size <= self.budget

    def upload(self) -> Stored:
        return Stored(self)

    def full(self, why: str) -> NotStored:
        """The refusal of an upload (`note_full` logs it)."""
        self.note_full(why)
        return NotStored(why)

    def note_full(self, why: str) -> None:
        """Log that an upload was refused for `why`, at most once a minute."""
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + FULL_LOG_INTERVAL
            log.warning(
                "uploads refused with 452 4.3.1: %s (spool %s, %d of %d bytes in use;"
                " logged at most once a minute)",
                why,
                self.directory,
                self.used,
                self.budget,
            )

    def _create(self) -> int:
        """A new spool file with no name, readable by this process's user only."""
        if self._tmpfile:
            try:
                return os.open(self.directory, os.O_TMPFILE | os.O_RDWR, 0o600)
            except OSError as exc:
                # The filesystem has no O_TMPFILE: named, then unlinked at once.
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile = False
        fd, name = tempfile.mkstemp(prefix=FALLBACK_PREFIX, dir=self.directory)
        with contextlib.suppress(FileNotFoundError):  # another process's start took it
            os.unlink(name)
        return fd


def default_budget(free: int) -> int:
    """`RELAY_SPOOL_MAX_BYTES` when unset, from the free bytes of the spool's filesystem.

    >>> default_budget(50 * 1024**3) // 1024**2, default_budget(2 * 1024**3) // 1024**2
    (1024, 204)
    """
    return max(min(free // DEFAULT_BUDGET_SHARE, DEFAULT_BUDGET_CAP), MIN_SPOOL_BYTES)


class Stored:
    """One upload's bytes: in memory up to `MEMORY_BYTES`, then in a spool file."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.size = 0
        self._memory = bytearray()
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        spool = self.spool
        if not spool.fits(len(data)):
            raise spool.full("the spool budget (RELAY_SPOOL_MAX_BYTES) is spent")
        spool.used += len(data)
        self.size += len(data)
        try:
            if self._fd is None and len(self._memory) + len(data) <= MEMORY_BYTES:
                self._memory += data
                return
            if self._fd is None:
                self._fd = spool._create()
                _write_all(self._fd, self._memory)
                self._memory = bytearray()
            _write_all(self._fd, data)
        except OSError as exc:
            raise spool.full(f"spool write failed: {exc.strerror or exc}") from exc

    def content(self) -> bytes:
        """Everything written, in one piece (the message, for the session to forward)."""
        if self._fd is None:
            return bytes(self._memory)
        try:
            parts = []
            offset = 0
            while offset < self.size:
                part = os.pread(self._fd, self.size - offset, offset)
                if not part:
                    raise OSError(errno.EIO, "spool file shorter than written")
                parts.append(part)
                offset += len(part)
        except OSError as exc:
            raise self.spool.full(f"spool read failed: {exc.strerror or exc}") from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Give the bytes back to the budget and the file to the system (idempotent)."""
        self.spool.used -= self.size
        self.size = 0
        self._memory = bytearray()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Stored:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
