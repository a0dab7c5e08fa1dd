"""What the commands share: printing a value as text or JSON, tables, times, the store."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from relay.config import load_settings
from relay.store.facade import Store


def emit(args: argparse.Namespace, value: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(value, indent=2, sort_keys=True, default=str))
    else:
        print(text(value))


def when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def open_store() -> Store:
    """The database an admin command works on: it must exist (`relay db init` creates it).

    Creating one silently would hide a wrong `RELAY_DATABASE`: the command would
    succeed on an empty database the relay never reads.
    """
    store = Store(load_settings().database, create=False)
    store.migrate()
    return store
