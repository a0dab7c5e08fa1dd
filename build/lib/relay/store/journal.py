"""The settle journal: settles the database could not take, kept on disk until it can.

A message an upstream accepted is charged by its settle. When the store fails
at that moment (a lock held elsewhere, a full disk, PostgreSQL away),
`AsyncStore` retries the settle in the background; this journal is what makes
the settle outlive the process.

Guarantees:
- A settle is appended here, as one JSON line, and the file is fsync'd, the
  first time the store refuses it, before the client gets its 250. So a stop,
  a SIGKILL or a crash after the 250 loses no settle; only a failure to write
  the journal itself (a full disk holding the database and the journal alike)
  does, and that is logged.
- Each process writes a file of its own, `<owner>.jsonl`, and holds an
  exclusive `flock` on it while it lives; the kernel drops the lock when the
  process ends, however it ends. A journal whose lock can be taken belongs to
  a process that is gone: `orphans` yields only those, so a live process's
  settles, still being retried by it, are never applied behind its back.
- Every relay applies the orphaned journals (`Ledger.apply_settles`) at start
  and before each stale-charge sweep, and sweeps only once they are applied:
  the sweep never refunds a charge an upstream accepted. Applying is
  idempotent (an entry whose pending row is gone changes nothing), so a crash
  between applying and removing a journal does no harm.
- A journal lives beside the SQLite database (`<database>-settles/`), on the
  host of the processes that share that file. On PostgreSQL it is a directory
  on the relay's host (`RELAY_SETTLE_JOURNAL`): another host's sweep cannot see
  it, so a relay stopped there should come back within `stale_after` (three
  minutes by default) to apply its journal before another host's sweep could
  refund the charge.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.replies import Reply
from relay.store.deliveries import (
    DeliveryRecord,
    Outcome,
    RecipientOutcome,
    attempts_from,
    attempts_text,
)

log = logging.getLogger("relay.store")
SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)
class PendingSettle:
    """A settle the store has not taken yet: `Ledger.settle`'s arguments."""

    reservation_id: int
    delivered: int
    idempotency_key: str | None
    record: DeliveryRecord | None
    created: int | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "reservation_id": self.reservation_id,
                "delivered": self.delivered,
                "idempotency_key": self.idempotency_key,
                "created": self.created,
                "record": None if self.record is None else _record_json(self.record),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> PendingSettle:
        raw = json.loads(line)
        record = raw["record"]
        return cls(
            int(raw["reservation_id"]),
            int(raw["delivered"]),
            raw["idempotency_key"],
            None if record is None else _record_from(record),
            raw["created"],
        )


def _record_json(record: DeliveryRecord) -> dict[str, Any]:
    out = {name: getattr(record, name) for name in DeliveryRecord.__slots__}
    out["recipients"] = [
        [r.address, str(r.outcome), r.code, r.enhanced, r.text] for r in record.recipients
    ]
    out["outcome"] = str(record.outcome)
    out["reply"] = [record.reply.code, record.reply.enhanced, record.reply.text]
    out["attempts"] = attempts_text(record.attempts)
    return out


def _record_from(raw: dict[str, Any]) -> DeliveryRecord:
    fields = dict(raw)
    # A line an older relay wrote has no reply text (4 fields).
    fields["recipients"] = tuple(
        RecipientOutcome(address, Outcome(outcome), code, enhanced, str(rest[0]) if rest else "")
        for address, outcome, code, enhanced, *rest in raw["recipients"]
    )
    fields["outcome"] = Outcome(raw["outcome"])
    fields["reply"] = Reply(*raw["reply"])
    fields["attempts"] = attempts_from(raw.get("attempts"))
    return DeliveryRecord(**fields)


class SettleJournal:
    """This process's journal file in `directory`, and the orphaned ones beside it."""

    def __init__(self, directory: Path, owner: str) -> None:
        self.directory = directory
        self.path = directory / f"{owner}{SUFFIX}"
        self._fd: int | None = None
        self._written = False  # this process's file holds entries not yet cleared

    def open(self) -> None:
        """Create the directory (private) and this process's file, and lock it. Raises OSError."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Another process's sweep may have taken the new, empty file for an
            # orphan and removed it between the open and the lock: open again.
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)
        self._fd = fd
        _sync_directory(self.directory)  # the file's name survives a power loss too

    def append(self, entry: PendingSettle) -> None:
        """Write `entry` and fsync it; raises OSError (a full disk, say)."""
        if self._fd is None:
            raise OSError("the settle journal is not open")
        os.write(self._fd, (entry.to_json() + "\n").encode())
        os.fsync(self._fd)
        self._written = True

    def clear(self) -> None:
        """Nothing of this process is pending any more: empty its file."""
        if self._fd is not None and self._written:
            os.ftruncate(self._fd, 0)
            self._written = False

    def close(self) -> None:
        """Release the lock; an empty file is removed, one with entries stays for the next start."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size == 0:
                self.path.unlink()
        os.close(self._fd)  # releases the flock
        self._fd = None

    def orphans(self) -> Iterator[tuple[Path, list[PendingSettle]]]:
        """Each journal of a process that is gone, with its entries, while its lock is held.

        The caller applies the entries, then the file goes (`remove` after the
        loop body returns). A line that cannot be read (a write cut short by a
        crash) is skipped and logged; it was never followed by a 250.
        """
        try:
            paths = sorted(self.directory.glob(f"*{SUFFIX}"))
        except OSError:
            return
        for path in paths:
            if path == self.path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process lives and settles its own
                if not os.fstat(fd).st_nlink:
                    continue  # applied and removed by another process meanwhile
                with os.fdopen(os.dup(fd), encoding="utf-8") as file:
                    text = file.read()
                entries = []
                for line in text.splitlines():
                    try:
                        entries.append(PendingSettle.from_json(line))
                    except (ValueError, KeyError, TypeError, AssertionError):
                        log.error("settle journal %s: skipped an unreadable line", path)
                yield path, entries
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # applied: the caller returned to this loop
                _sync_directory(self.directory)
            finally:
                os.close(fd)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
