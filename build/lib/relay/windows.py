"""Send-limit windows: the UTC day and month a charge counts in, and a full one.

Plain values and functions shared by the pure core (`relay.policy` words the
reply), the error tree (`relay.errors.Refused` carries a hit) and the store
(`relay.store.facade.limits` counts the windows).
"""

from __future__ import annotations

import calendar
import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


class Window(enum.StrEnum):
    DAY = "daily"
    MONTH = "monthly"


UNLIMITED = -1


def period_key(window: Window, now: datetime) -> str:
    """The UTC window `now` falls in: 'd:2026-11-21' or 'm:2026-11'."""
    now = now.astimezone(UTC)
    # Formatted by hand: strftime ran five times a message and showed in the profile.
    if window is Window.DAY:
        return f"d:{now.year:04d}-{now.month:02d}-{now.day:02d}"
    return f"m:{now.year:04d}-{now.month:02d}"


def window_reset(window: Window, now: datetime) -> datetime:
    """When the UTC window that holds `now` ends."""
    now = now.astimezone(UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window is Window.DAY:
        return start + timedelta(days=1)
    days = calendar.monthrange(now.year, now.month)[1]
    return start.replace(day=1) + timedelta(days=days)


@dataclass(frozen=True, slots=True)
class LimitHit:
    scope: str  # "relay" or "account" (the store's wording for the reply)
    window: Window
    limit: int
    reset_at: datetime


def headroom(limit: int, used: int) -> int | None:
    """Recipients still allowed in a window; None when unlimited."""
    return None if limit == UNLIMITED else max(limit - used, 0)
