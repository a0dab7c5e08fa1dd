"""The process log: one format, nothing secret, nothing a terminal would act on.

- `configure` sets the format once for the process (`relay serve`, `relay dev`):
  human-readable lines, or with `RELAY_LOG_FORMAT=json` one JSON object per
  line. A record's structured fields (`extra={FIELDS: {...}}`, as the
  per-message line has) become keys of that object.
- `Printable` rewrites control characters (NUL, ESC, CR, ...) in every record as
  `\\xNN`, so an address or a host name a client chose cannot forge log lines
  or drive a terminal.
- `OncePer` lets a line about one key (a client's address) through at most
  once per interval, remembering a bounded number of keys: a flood from many
  addresses costs a bounded log and bounded memory.
- `RedactAiosmtpd` keeps client input out of aiosmtpd's own records: it logs
  each command line at INFO and an unrecognised command at WARNING, which is
  where a token typed as a command, or AUTH data pipelined after a refusal,
  would land. Only the command verb is kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but tab
_VERB = re.compile(rb"[A-Za-z]{1,12}")
# aiosmtpd 1.4.6's records that carry a client's line or command (aiosmtpd/smtp.py).
_LINE_RECORDS = frozenset({"%r >> %r", "_handle_client readline: %r"})
_COMMAND_RECORDS = frozenset({"%r unrecognised: %s"})
NOT_LOGGED = "[not logged]"
FIELDS = "fields"  # the `extra` key of a record's structured fields
# A record's own keys, which its fields must not overwrite in a JSON line.
_RESERVED = frozenset({"time", "level", "logger", "message", "pid", "exception"})


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Printable(logging.Filter):
    """Render the record's message now, with control characters escaped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = _escape(message)
        if escaped is not message:
            record.msg, record.args = escaped, None
        return True


class OncePer:
    """Which lines about a key may be logged: each key at most once per `interval`,
    and at most `max_keys` keys per interval; lines about keys past that are only
    counted (`unlogged`), so neither the log nor this object's memory grows
    with the number of keys.

        >>> now = [0.0]
        >>> gate = OncePer(60.0, max_keys=2, clock=lambda: now[0])
        >>> gate.allow("a"), gate.allow("a"), gate.allow("b"), gate.allow("c")
        (True, False, True, False)
        >>> gate.unlogged()  # once per interval: lines about keys it had no room for
        1
        >>> now[0] = 60.0
        >>> gate.allow("a"), gate.allow("c")
        (True, True)
    """

    def __init__(
        self, interval: float, max_keys: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._logged: OrderedDict[str, float] = OrderedDict()  # key -> when, oldest first
        self._unlogged = 0
        self._unlogged_reported = float("-inf")

    def allow(self, key: str) -> bool:
        now = self.clock()
        logged = self._logged
        while logged and next(iter(logged.values())) <= now - self.interval:
            logged.popitem(last=False)
        if key in logged:
            return False
        if len(logged) >= self.max_keys:
            self._unlogged += 1
            return False
        logged[key] = now
        return True

    def unlogged(self) -> int:
        """Lines dropped for want of room since the last report, once per interval (else 0)."""
        now = self.clock()
        if not self._unlogged or now - self._unlogged_reported < self.interval:
            return 0
        count, self._unlogged, self._unlogged_reported = self._unlogged, 0, now
        return count


class RedactAiosmtpd(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or not args:
            return True
        if record.msg in _LINE_RECORDS:
            line = args[-1]
            verb = _VERB.match(line) if isinstance(line, bytes) else None
            record.args = (*args[:-1], verb.group().upper().decode() if verb else NOT_LOGGED)
        elif record.msg in _COMMAND_RECORDS:
            record.args = (*args[:-1], NOT_LOGGED)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),  # which worker, with --workers N
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, Mapping):
            out.update({k: v for k, v in fields.items() if k not in _RESERVED})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_REDACT = RedactAiosmtpd()


def redact_aiosmtpd() -> None:
    """Install the aiosmtpd filter (once); the protocol module does this on import."""
    logger = logging.getLogger("mail.log")
    if _REDACT not in logger.filters:
        logger.addFilter(_REDACT)


def configure(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(Printable())
    logging.basicConfig(level=level, handlers=[handler])
    # aiosmtpd logs every command line at INFO; keep its chatter out.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # psycopg_pool logs each reconnect attempt while PostgreSQL is away; the
    # store logs the outage once a minute and its end once (relay.store.facade).
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    redact_aiosmtpd()
