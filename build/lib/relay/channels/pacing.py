"""Pacing an upstream: a token bucket, and waiting only within the forward budget.

An upstream that limits its request rate (Resend: per API key; an SMTP
upstream with a `rate` in its entry) is sent to no faster than that rate, so a
burst of client messages queues here for a moment instead of meeting 429s.
When the upstream asks for a pause anyway (Retry-After, `ratelimit-reset`), the
bucket holds every sender for that long.

A wait is taken only when it fits in what is left of the message's forward
budget with the request's own timeout after it; otherwise the caller answers
`451 4.7.0` naming the wait, and the client retries then. The client's DATA
reply never waits longer than the budget the session allows.

    >>> clock = lambda: 0.0
    >>> bucket = TokenBucket(rate=2.0, clock=clock)
    >>> bucket.reserve(), bucket.reserve(), bucket.reserve()
    (0.0, 0.0, 0.5)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable


class TokenBucket:
    """`rate` requests per second, bursts of up to `burst` (default: one second's worth).

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
        self.burst = max(1.0, burst if burst is not None else rate)
        self.clock = clock
        self._tokens = self.burst
        self._updated = clock()
        self._held_until = 0.0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self) -> float:
        """Take a slot; the seconds to wait before the request may go."""
        now = self.clock()
        self._refill(now)
        self._tokens -= 1.0
        wait = 0.0 if self._tokens >= 0 else -self._tokens / self.rate
        return max(wait, self._held_until - now)

    def release(self) -> None:
        """Give back a slot `reserve` handed out and the caller will not use."""
        self._tokens = min(self.burst, self._tokens + 1.0)

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
        """The wait in whole seconds, for the client's reply."""
        return max(1, math.ceil(self.wait))


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


async def take_slot(bucket: TokenBucket | None, deadline: Deadline) -> None:
    """Wait for the bucket's next slot within the deadline; the slot is given
    back when the wait does not fit (or is cancelled)."""
    if bucket is None:
        return
    wait = bucket.reserve()
    try:
        await deadline.wait(wait)
    except BaseException:
        bucket.release()
        raise
