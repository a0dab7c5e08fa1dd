"""Pacing: the request window as a pure value, and the forward budget's rule."""

from __future__ import annotations

import asyncio

import pytest

from relay.channels.httpapi import Answer, pause_seconds
from relay.channels.pacing import BudgetExceeded, Deadline, TokenBucket, take_slot


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_one_seconds_worth_then_never_more_in_any_second() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, clock=clock)
    # The third a second (and the margin) after the first, never sooner: an upstream
    # counting a fixed window of one second from the first would refuse it.
    assert [bucket.reserve() for _ in range(4)] == [0.0, 0.0, 1.01, 1.01]
    clock.now = 1.0  # the next window's two slots are promised already
    assert bucket.reserve() == 1.02


def test_the_rate_after_an_idle_second_is_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=5.0, clock=clock)
    sent = []
    for tick in range(40):  # a sender asking every 50 ms, after an idle start
        clock.now = tick * 0.05
        sent.append(clock.now + bucket.reserve())
    for first in sent:
        assert sum(1 for t in sent if first <= t < first + 1.0) <= 5


def test_released_slot_is_handed_out_again() -> None:
    bucket = TokenBucket(rate=1.0, clock=Clock())
    assert bucket.reserve() == 0.0
    assert bucket.reserve() == 1.01
    bucket.release()
    assert bucket.reserve() == 1.01


def test_a_hold_delays_every_sender() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=100.0, clock=clock)
    bucket.hold(3.0)
    assert bucket.reserve() == 3.0
    clock.now = 2.5
    assert bucket.reserve() == 0.5
    clock.now = 3.0
    assert bucket.reserve() == 0.0


@pytest.mark.parametrize(
    ("answer", "pause"),
    [
        (Answer(429, None, "7"), 7),
        (Answer(429, None, None, "0", "3"), 3),
        (Answer(200, None, None, "0", "1"), 1),  # the window is spent: wait for it
        (Answer(200, None, None, "4", "1"), None),
        (Answer(429, None, "Wed, 21 Oct 2026 07:28:00 GMT"), None),
        (Answer(200, None), None),
    ],
)
def test_pause_from_the_answer(answer: Answer, pause: int | None) -> None:
    assert pause_seconds(answer) == pause


def test_a_wait_beyond_the_budget_is_refused_and_its_slot_returned() -> None:
    async def run() -> tuple[float, int]:
        bucket = TokenBucket(rate=1.0, clock=Clock())
        deadline = Deadline(budget=1.0, request_timeout=0.5)
        await take_slot(bucket, deadline)  # the burst slot: no wait
        with pytest.raises(BudgetExceeded) as caught:
            await take_slot(bucket, deadline)  # 1 s wait + 0.5 s request > 1 s
        return bucket.reserve(), caught.value.seconds

    wait, seconds = asyncio.run(run())
    assert seconds == 1  # the relay's margin (relay.channels.pacing.MARGIN) aside
    assert wait == 1.01  # the refused slot was given back: still the second one


def test_a_request_that_went_late_is_counted_from_when_it_went() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, clock=clock)
    assert bucket.reserve() == 0.0
    first = bucket.last
    assert bucket.reserve() == 1.01
    second = bucket.last
    clock.now = 0.5  # the loop was busy: the first goes half a second late
    assert bucket.go(first) == 0.0
    clock.now = 1.01
    assert bucket.go(second) == 0.5  # a second (and the margin) after the first went


def test_a_request_is_counted_from_its_answer() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, clock=clock)
    assert bucket.reserve() == 0.0
    slot = bucket.last
    assert bucket.go(slot) == 0.0
    clock.now = 0.4  # the answer: the upstream counted it by then at the latest
    bucket.done(bucket.last)
    clock.now = 0.5
    assert bucket.reserve() == 0.91


def test_a_hold_stops_a_request_waiting_for_its_slot() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, clock=clock)
    bucket.reserve()
    assert bucket.reserve() == 1.01
    waiting = bucket.last
    bucket.hold(3.0)  # a 429 meanwhile: Retry-After 3
    clock.now = 1.01
    assert bucket.go(waiting) == 1.99
