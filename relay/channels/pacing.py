"""Pacing an upstream: a sliding window of requests, and waiting only within the forward budget.

An upstream that limits its request rate (Resend: per API key; an SMTP
upstream with a `rate` in its entry) is sent to no faster than that rate, so a
burst of client messages queues here for a moment instead of meeting 429s.
When the upstream asks for a pause anyway (Retry-After, `ratelimit-reset`), the
bucket holds every sender for that long.

"N requests a second" is kept in every second, not on average: a token bucket
whose burst is one second's worth lets twice the rate through in the second
after an idle one, and an upstream that counts a fixed one-second window
(Resend's 5 a second: resend.com/docs/api-reference/rate-limit) answers the
excess 429 and a Retry-After that stops every sender for a whole second.

A wait is taken only when it fits in what is left of the message's forward
budget with the request's own timeout after it; otherwise the caller answers
`451 4.7.0` naming the wait, and the client retries then. The client's DATA
reply never waits longer than the budget the session allows.

    >>> clock = lambda: 0.0
    >>> bucket = TokenBucket(rate=2.0, clock=clock)
    >>> bucket.reserve(), bucket.reserve(), bucket.reserve()
    (0.0, 0.0, 1.01)
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Callable

# Room between a request and the one `burst` requests later beyond the window itself:
# the upstream counts arrivals, which the network may bring closer than they left.
MARGIN = 0.01


class TokenBucket:
    """`rate` requests per second: at most `burst` (default: one second's worth, at
    least one) in any `burst / rate` seconds, so a burst goes at once and no
    window of that length ever holds more.

    `reserve` takes a slot and says how long to wait before using it; slots
    are handed out in order, so waiters go in the order they came. `release`
    gives back a slot that will not be used. Pure: time comes from `clock`.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert rate > 0, rate
        self.rate = rate
        self.burst = max(1, int(burst if burst is not None else rate))
        self.window = self.burst / rate + MARGIN
        self.clock = clock
        self._slots: list[float] = []  # the slots handed out within a window, in order
        self._held_until = 0.0
        self.last = 0.0  # the slot the last `reserve` handed out (for `release`)

    def reserve(self) -> float:
        """Take a slot; the seconds to wait before the request may go."""
        now = self.clock()
        # A slot a window ago or earlier binds no later one.
        del self._slots[: bisect.bisect_left(self._slots, now - self.window)]
        slot = max(now, self._held_until)
        if len(self._slots) >= self.burst:
            slot = max(slot, self._slots[-self.burst] + self.window)
        self._slots.append(slot)
        self.last = slot
        return round(slot - now, 6)

    def go(self, slot: float) -> float:
        """The request that reserved `slot` is about to go: 0, its send time kept in the
        slot's place, or the seconds it must still wait (then `go` again with
        `last`). A request goes later than its slot when the loop was busy, and
        the upstream counts when requests arrive: so each is checked against
        when the others went, not when they were meant to."""
        now = self.clock()
        self._drop(slot)
        recent = self._slots[
            bisect.bisect_right(self._slots, now - self.window) : bisect.bisect_right(
                self._slots, now
            )
        ]
        ready = max(now, self._held_until)
        if len(recent) >= self.burst:
            ready = max(ready, recent[len(recent) - self.burst] + self.window)
        bisect.insort(self._slots, ready)
        self.last = ready
        return round(ready - now, 6)

    def done(self, slot: float) -> None:
        """The request that went at `slot` has its answer: counted from now on, when
        the upstream has surely counted it (the network and a busy loop can bring
        two requests closer on arrival than they left)."""
        self._drop(slot)
        bisect.insort(self._slots, max(slot, self.clock()))

    def _drop(self, slot: float) -> None:
        at = bisect.bisect_left(self._slots, slot)
        if at < len(self._slots) and self._slots[at] == slot:
            del self._slots[at]

    def release(self, slot: float | None = None) -> None:
        """Give back a slot `reserve` handed out (`last` then) and the caller will not
        use; without one, the latest."""
        if slot is not None:
            self._drop(slot)
        elif self._slots:
            self._slots.pop()

    def hold(self, seconds: float) -> None:
        """The upstream asked for a pause: nothing goes before it is over."""
        self._held_until = max(self._held_until, self.clock() + seconds)


class BudgetExceeded(Exception):
    """The wait the upstream needs does not fit in the message's forward budget."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait

    @property
    def seconds(self) -> int:
        """The wait in whole seconds, for the client's reply (the margin is the relay's
        own caution: a client retrying that much later finds the window free)."""
        return max(1, math.ceil(round(self.wait - MARGIN, 6)))


class Deadline:
    """What is left of one message's forward budget, on the loop's clock."""

    def __init__(self, budget: float, request_timeout: float) -> None:
        self.clock = asyncio.get_running_loop().time
        self.ends = self.clock() + budget
        # A wait must leave the request after it its own timeout.
        self.request_timeout = min(request_timeout, budget / 2)

    def fits(self, wait: float) -> bool:
        return self.clock() + wait + self.request_timeout <= self.ends

    async def wait(self, seconds: float) -> None:
        """Sleep `seconds` (the pace, not a synchronisation), or raise `BudgetExceeded`."""
        if seconds <= 0:
            return
        if not self.fits(seconds):
            raise BudgetExceeded(seconds)
        await asyncio.sleep(seconds)


async def take_slot(bucket: TokenBucket | None, deadline: Deadline) -> float | None:
    """Wait for the bucket's next slot within the deadline; the slot is given
    back when the wait does not fit (or is cancelled). The slot taken, for
    `TokenBucket.done` (None without a bucket)."""
    if bucket is None:
        return None
    wait = bucket.reserve()
    slot = bucket.last
    try:
        while True:
            await deadline.wait(wait)
            wait, slot = bucket.go(slot), bucket.last
            if wait <= 0:
                return slot
    except BaseException:
        bucket.release(slot)
        raise
