"""Who may open a session: the relay-wide and per-address connection caps.

Every accepted socket is counted from `accept()` until it closes, so a
connection still in its TLS handshake holds a place under both caps: a client
cannot get around them by opening handshakes it never finishes. A connection
over a cap still gets its TLS handshake and then one `421 4.7.0` line (a client
can only read a reply once TLS is up); one far over its address's cap is
closed at once, without the handshake, so refusing a flood costs no crypto.

The counts are per process: with `--workers N` the kernel spreads one address's
connections over the workers, so an address may hold up to N times its cap.

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

from relay import replies
from relay.replies import Reply

# An address this many times over its cap is not even given a TLS handshake.
DROP_FACTOR = 2


class Admission:
    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.closed = 0  # connections ended since `take_closed`
        self.by_address: dict[str, int] = {}

    def admit(self, address: str) -> Reply | None:
        """Count a new connection; None to serve it, or the reply that refuses it."""
        self.total += 1
        count = self.by_address[address] = self.by_address.get(address, 0) + 1
        if count > self.max_per_address:
            return replies.TOO_MANY_FROM_ADDRESS
        if self.total > self.max_total:
            return replies.TOO_MANY_CONNECTIONS
        return None

    def drop_without_reply(self, address: str) -> bool:
        """Whether a refused connection from `address` is closed before TLS."""
        return self.by_address.get(address, 0) > self.max_per_address * DROP_FACTOR

    def take_closed(self) -> int:
        """Connections ended since the last call."""
        closed, self.closed = self.closed, 0
        return closed

    def release(self, address: str) -> None:
        self.total -= 1
        self.closed += 1
        count = self.by_address[address] - 1
        if count:
            self.by_address[address] = count
        else:
            del self.by_address[address]
