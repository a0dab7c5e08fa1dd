"""The memory of messages an idempotent upstream (Resend) took, by idempotency key.

A client that lost the reply to a delivered message retries it; the upstream
sends nothing the second time, and `reserve` must not charge it either. Keys
are remembered from the first delivery for a window shorter than the upstream's.
"""

from __future__ import annotations

from relay.store.db import Connection

# Resend keeps an idempotency key for 24 hours from its first request; a retry
# within them sends nothing. Ours is shorter, so it never outlasts theirs.
IDEMPOTENCY_WINDOW = 23 * 3600


def delivered_recently(db: Connection, key: str, now: int) -> bool:
    row = db.execute(
        "SELECT 1 FROM delivered_keys WHERE key = ? AND created > ?",
        (key, now - IDEMPOTENCY_WINDOW),
    ).fetchone()
    return row is not None


def remember_delivered(db: Connection, key: str, now: int) -> None:
    # DO NOTHING: the window runs from the first delivery, as Resend's does.
    db.execute(
        "INSERT INTO delivered_keys (key, created) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
        (key, now),
    )


def forget_expired(db: Connection, now: int) -> None:
    db.execute("DELETE FROM delivered_keys WHERE created <= ?", (now - IDEMPOTENCY_WINDOW,))
