"""What the console's overview shows, aggregated in the database: the delivery log
counted by time bucket and outcome, refusals by reply, each channel's messages,
errors and forward times, the busiest senders, and the senders running low.

Guarantees:
- Every query of the delivery log is bounded by its time column: `created >= ?
  AND created < ?`, a range of the `deliveries_created` index, so it reads the
  window's records, never the whole log (tests/test_overview.py checks SQLite's
  query plan at 1M records). No index is added for it: each costs every message
  a write, and the log may cost at most 5% of the throughput.
- Every answer is small whatever the log holds: counts grouped by bucket and
  outcome (at most WINDOWS' buckets times four outcomes), by channel and
  forward-time band (channels times LATENCY_BANDS), and the rest capped by
  `LIMIT` (TOP_ROWS).
- Forward times are counted in bands, as a Prometheus histogram is, so a
  percentile is the upper bound of the band it falls in (exact to the band),
  computed from a few rows rather than by sorting the window's records.
"""

from __future__ import annotations

from typing import Any

from relay.store.db import Database, read_only

# The rows a ranked list (refusal reasons, top senders, low balances) returns at most.
TOP_ROWS = 10
# The upper bounds (milliseconds) of the forward-time bands; the last is open.
LATENCY_BANDS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
PERCENTILES = (50, 90, 99)

# Each statement as the test explains it (EXPLAIN QUERY PLAN): the window's bounds first.
SERIES_SQL = (
    "SELECT (created - ?) / ? AS bucket, outcome, count(*) AS n FROM deliveries"
    " WHERE created >= ? AND created < ? GROUP BY 1, 2"
)
REASONS_SQL = (
    "SELECT outcome, reply_code, reply_enhanced, count(*) AS n FROM deliveries"
    " WHERE created >= ? AND created < ? AND outcome IN ('refused', 'deferred')"
    " GROUP BY 1, 2, 3 ORDER BY 4 DESC, 2, 3 LIMIT ?"
)
_BAND = "CASE " + " ".join(f"WHEN duration_ms <= {b} THEN {b}" for b in LATENCY_BANDS) + " END"
CHANNELS_SQL = (
    f"SELECT channel, {_BAND} AS band, count(*) AS n,"  # noqa: S608 - constants only
    " sum(CASE WHEN outcome IN ('refused', 'deferred') THEN 1 ELSE 0 END) AS errors"
    " FROM deliveries WHERE created >= ? AND created < ? AND channel <> ''"
    " GROUP BY 1, 2"
)
SENDERS_SQL = (
    "SELECT sender, count(*) AS n FROM deliveries WHERE created >= ? AND created < ?"
    " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?"
)
LOW_SQL = (
    "SELECT address, balance FROM senders WHERE enabled = 1 AND balance <= ?"
    " AND address NOT IN (SELECT address FROM nolimit) ORDER BY balance, address LIMIT ?"
)


def percentile(bands: dict[int | None, int], share: int) -> int | None:
    """The upper bound (ms) of the band holding the `share`th percentile, None past the
    last band (or for no records).

    >>> percentile({10: 5, 100: 4, None: 1}, 50), percentile({10: 5, 100: 4, None: 1}, 90)
    (10, 100)
    >>> percentile({10: 5, 100: 4, None: 1}, 99) is None
    True
    """
    total = sum(bands.values())
    if not total:
        return None
    rank = -(-total * share // 100)  # the nearest-rank method: ceil(total * p / 100)
    seen = 0
    for bound in (*LATENCY_BANDS, None):
        seen += bands.get(bound, 0)
        if seen >= rank:
            return bound
    return None


class Stats(Database):
    @read_only
    def delivery_series(self, start: int, step: int, count: int) -> dict[str, list[int]]:
        """Records per outcome in `count` buckets of `step` seconds from `start`."""
        end = start + step * count
        series: dict[str, list[int]] = {}
        for row in self._read(SERIES_SQL, (start, step, start, end)):
            counts = series.setdefault(row["outcome"], [0] * count)
            counts[int(row["bucket"])] += int(row["n"])
        return series

    @read_only
    def refusal_reasons(self, start: int, end: int) -> list[dict[str, Any]]:
        """The most frequent replies of refused and deferred messages, most first."""
        rows = self._read(REASONS_SQL, (start, end, TOP_ROWS))
        return [
            {
                "outcome": r["outcome"],
                "code": int(r["reply_code"]),
                "enhanced": r["reply_enhanced"],
                "messages": int(r["n"]),
            }
            for r in rows
        ]

    @read_only
    def channel_stats(self, start: int, end: int) -> list[dict[str, Any]]:
        """Per channel (the one each record names: the last tried): messages, those
        refused or deferred, their share, and forward-time percentiles (ms)."""
        channels: dict[str, dict[str, Any]] = {}
        for r in self._read(CHANNELS_SQL, (start, end)):
            entry = channels.setdefault(r["channel"], {"messages": 0, "errors": 0, "bands": {}})
            entry["messages"] += int(r["n"])
            entry["errors"] += int(r["errors"])
            band = None if r["band"] is None else int(r["band"])
            entry["bands"][band] = entry["bands"].get(band, 0) + int(r["n"])
        return [
            {
                "channel": name,
                "messages": e["messages"],
                "errors": e["errors"],
                "error_rate": round(e["errors"] / e["messages"], 4),
                **{f"p{p}_ms": percentile(e["bands"], p) for p in PERCENTILES},
            }
            for name, e in sorted(channels.items())
        ]

    @read_only
    def top_senders(self, start: int, end: int) -> list[dict[str, Any]]:
        return [
            {"sender": r["sender"], "messages": int(r["n"])}
            for r in self._read(SENDERS_SQL, (start, end, TOP_ROWS))
        ]

    @read_only
    def low_balances(self, at_most: int) -> list[dict[str, Any]]:
        """Enabled senders (not on the no-limit list) whose balance is `at_most` or less,
        lowest first. The senders table is one row per sender, far smaller than the log."""
        return [
            {"address": r["address"], "balance": int(r["balance"])}
            for r in self._read(LOW_SQL, (at_most, TOP_ROWS))
        ]
