"""Who may open a session: the relay-wide and per-address connection caps.

Every accepted socket is counted from `accept()` until it closes, so a
connection still in its TLS handshake holds a place under both caps: a client
cannot get around them by opening handshakes it never finishes. A connection
over a cap still gets its TLS handshake and then one `421 4.7.0` line (a client
can only read a reply once TLS is up); one far over its address's cap is
closed at once, without the handshake, so refusing a flood costs no crypto.

A client is counted under its key (`client_key`): an IPv4 address, or an IPv6
address's /64. The relay-wide cap is per process (each worker has its own file
descriptors to protect); with `--workers N` the per-address count is the
host's, kept in `HostCounts`.

    >>> gate = Admission(max_total=2, max_per_address=1)
    >>> gate.admit("192.0.2.1") is None
    True
    >>> str(gate.admit("192.0.2.1"))
    '421 4.7.0 Too many connections from your address'
    >>> gate.release("192.0.2.1"); gate.release("192.0.2.1")
    >>> gate.total
    0
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile

from relay import replies
from relay.replies import Reply

# An address this many times over its cap is not even given a TLS handshake.
DROP_FACTOR = 2


class HostCounts:
    """Per-address connection counts shared by the worker processes of one host.

    Why shared memory: each worker accepts on its own SO_REUSEPORT socket and
    the kernel spreads one client's connections over all of them (it hashes the
    whole 4-tuple), so counts kept per process let an address hold `workers`
    times its cap. The other places a host-wide count could live cost more: the
    store would add a write to every accept and a database round trip before
    every greeting; a parent that accepts and hands sockets to the workers
    would put every connection through one process and need a message back at
    each close; steering each client to one worker (a reuseport BPF program
    hashing the source address) would pin a client's whole pool, usually the
    one application host, to one CPU.

    So the parent maps one anonymous shared table before it forks: a row of
    counters per worker. Each key is hashed twice (BLAKE2b keyed with a secret
    drawn at start, so a client cannot aim at another's counters) into a row's
    two halves, a count-min sketch: a worker counts its connections in its own
    row, and an address's count is the smaller of its two column sums over
    every row. Two keys meet in both counters only by a double collision; when
    they do they share a cap, which errs towards refusing, never towards
    letting an address past its cap. An admission reads the sums and adds its
    connection under a POSIX record lock (`fcntl.lockf`, which the kernel
    releases if its holder dies), so two workers cannot both take an address's
    last place; a release only lowers its own row's counters and takes no lock.
    When a worker exits, the parent zeroes its row (`forget`): the connections
    of a crashed worker do not hold their addresses' places for ever.
    """

    BUCKETS = 1 << 14  # per hash: 2 x 16,384 x 4 bytes = 128 KiB per worker
    HASHES = 2

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.row = -1  # this process's row: set by `serve_as` in each worker
        width = self.HASHES * self.BUCKETS
        self._width = width
        self._memory = mmap.mmap(-1, workers * width * 4)  # MAP_SHARED | MAP_ANONYMOUS
        self._cells = memoryview(self._memory).cast("I")
        self._lock = tempfile.TemporaryFile()  # only its lock is used
        self._secret = os.urandom(16)

    def close(self) -> None:
        self._cells.release()
        self._memory.close()
        self._lock.close()

    def serve_as(self, row: int) -> None:
        """In a worker, after the fork: count this process's connections in `row`."""
        assert 0 <= row < self.workers, row
        self.row = row

    def _columns(self, key: str) -> list[int]:
        digest = hashlib.blake2b(key.encode(), key=self._secret, digest_size=8).digest()
        return [
            n * self.BUCKETS + int.from_bytes(digest[4 * n : 4 * n + 4], "big") % self.BUCKETS
            for n in range(self.HASHES)
        ]

    def _count(self, columns: list[int]) -> int:
        cells, width = self._cells, self._width
        return min(
            sum(cells[row * width + column] for row in range(self.workers)) for column in columns
        )

    def count(self, key: str) -> int:
        """Connections from `key` on the host now."""
        return self._count(self._columns(key))

    def add(self, key: str) -> int:
        """Count one more connection from `key` in this worker; the host's count after it."""
        columns = self._columns(key)
        base = self.row * self._width
        fcntl.lockf(self._lock, fcntl.LOCK_EX)
        try:
            count = self._count(columns) + 1
            for column in columns:
                self._cells[base + column] += 1
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)
        return count

    def remove(self, key: str) -> None:
        """One connection from `key` in this worker ended."""
        base = self.row * self._width
        for column in self._columns(key):
            self._cells[base + column] -= 1

    def forget(self, row: int) -> None:
        """In the parent, once the worker of `row` has exited: its connections are gone."""
        fcntl.lockf(self._lock, fcntl.LOCK_EX)
        try:
            start = row * self._width * 4
            self._memory[start : start + self._width * 4] = bytes(self._width * 4)
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)


class Admission:
    """The caps of one process; `shared` (with workers) makes the per-address one host-wide."""

    def __init__(
        self, max_total: int, max_per_address: int, shared: HostCounts | None = None
    ) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.shared = shared
        self.total = 0
        self.closed = 0  # connections ended since `take_closed`
        self.by_address: dict[str, int] = {}  # this process's connections, by client key

    def admit(self, key: str) -> Reply | None:
        """Count a new connection; None to serve it, or the reply that refuses it."""
        self.total += 1
        count = self.by_address[key] = self.by_address.get(key, 0) + 1
        if self.shared is not None:
            count = self.shared.add(key)
        if count > self.max_per_address:
            return replies.TOO_MANY_FROM_ADDRESS
        if self.total > self.max_total:
            return replies.TOO_MANY_CONNECTIONS
        return None

    def drop_without_reply(self, key: str) -> bool:
        """Whether a refused connection from `key` is closed before TLS."""
        count = self.shared.count(key) if self.shared else self.by_address.get(key, 0)
        return count > self.max_per_address * DROP_FACTOR

    def take_closed(self) -> int:
        """Connections ended since the last call."""
        closed, self.closed = self.closed, 0
        return closed

    def release(self, key: str) -> None:
        self.total -= 1
        self.closed += 1
        if self.shared is not None:
            self.shared.remove(key)
        count = self.by_address[key] - 1
        if count:
            self.by_address[key] = count
        else:
            del self.by_address[key]
