"""The console's first page, once for the admin API: what the relay did over a window
(messages per bucket by outcome, refusals by reply, each channel's errors and
forward times), the busiest senders today, the senders running low, and the queue.

Everything is aggregated in the store (`relay.store.stats`): a few small rows
per query, whatever the delivery log holds."""

from __future__ import annotations

from typing import Any

from relay.errors import Invalid
from relay.store.facade import Store

# Each window: its buckets' width (seconds) and how many. The bucket that holds
# `now` is the last, so the newest minute (or hour) shows as it fills.
WINDOWS = {"1h": (60, 60), "24h": (3600, 24), "7d": (3600, 168)}
# A sender whose balance is this or less is "running low" unless the query says.
LOW_BALANCE = 10
DAY = 86400


def window_bounds(window: str, now: int) -> tuple[int, int, int]:
    """(start, step, count): the window's buckets, aligned to whole steps (UTC)."""
    if window not in WINDOWS:
        raise Invalid(f"window: one of {', '.join(WINDOWS)}", code="bad_window")
    step, count = WINDOWS[window]
    end = (now // step + 1) * step
    return end - step * count, step, count


def overview(
    store: Store, *, window: str = "1h", low: int = LOW_BALANCE, now: int | None = None
) -> dict[str, Any]:
    at = int(store.clock().timestamp()) if now is None else now
    start, step, count = window_bounds(window, at)
    end = start + step * count
    series = store.delivery_series(start, step, count)
    queue = store.queue_stats()
    oldest = queue["oldest"]
    return {
        "window": window,
        "now": at,
        "start": start,
        "step": step,
        "buckets": count,
        "series": series,
        "totals": {outcome: sum(counts) for outcome, counts in series.items()},
        "refusals": store.refusal_reasons(start, end),
        "channels": store.channel_stats(start, end),
        "top_senders": store.top_senders(at - at % DAY, at + 1),
        "low_balances": store.low_balances(low),
        "low_balance": low,
        "queue": {
            "states": queue["states"],
            "depth": sum(queue["states"].values()),
            "oldest_age": None if oldest is None else max(0, at - oldest),
        },
    }
