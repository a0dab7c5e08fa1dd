"""What one token may do: the senders it may use, how fast it may send, and from where.

Pure values and functions. The store keeps a token's rules (one JSON column)
and counts its rates; the wire checks them at AUTH (networks), MAIL, RCPT and
the end of DATA (senders, rates); the admin surface parses what an operator
gives with the `parse_*` functions, which raise `BadRule` with one clean line
(the admin operations answer it as `Invalid`: exit 1, or HTTP 422).

- A sender entry is an exact address (`billing@example.com`) or every address
  of a domain (`*@example.com`, or just `example.com`). With no entry the token
  sends as any address of its account's domains; entries only narrow that.
- A rate is N messages, or N recipients, per minute, hour or day: the fixed UTC
  window the time falls in (minute 10:05, hour 10:00, day 2026-11-21), as the
  send limits' day and month are. Fixed windows make a count one row per window
  that every relay on the database agrees on.
- A network is a CIDR range, IPv4 or IPv6; a bare address is its /32 or /128.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from relay.message import parse_address


class BadRule(ValueError):
    """An operator's rule that cannot be used; `code` is the admin API's error code."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class Unit(enum.StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"


SECONDS = {Unit.MINUTE: 60, Unit.HOUR: 3600, Unit.DAY: 86400}
_UNIT_NAMES = {
    "m": Unit.MINUTE,
    "min": Unit.MINUTE,
    "minute": Unit.MINUTE,
    "h": Unit.HOUR,
    "hour": Unit.HOUR,
    "d": Unit.DAY,
    "day": Unit.DAY,
}
# A rate above this is no limit at all (and stays far inside SQLite's integers).
MAX_RATE = 1_000_000_000
# An operator's lists are short; a longer one is a mistake (and a slower MAIL).
MAX_ENTRIES = 100
_RATE = re.compile(r"(\d{1,12})\s*/\s*([A-Za-z]+)")


@dataclass(frozen=True, slots=True)
class Rate:
    limit: int
    unit: Unit

    def __str__(self) -> str:
        return f"{self.limit}/{self.unit}"


@dataclass(frozen=True, slots=True)
class RateUse:
    """A token's counts in the window of `unit` that began at `start` (unix seconds)."""

    start: int
    messages: int
    recipients: int


@dataclass(frozen=True, slots=True)
class RateHit:
    """A full window: `what` is `messages` or `recipients`; `retry` the seconds to its end."""

    what: str
    rate: Rate
    retry: int


@dataclass(frozen=True, slots=True)
class TokenRules:
    senders: tuple[str, ...] = ()  # lower case; `*@domain` or `domain` for a whole domain
    networks: tuple[str, ...] = ()  # normalized CIDR ranges
    rates: tuple[Rate, ...] = ()  # messages, at most one per unit
    rcpt_rates: tuple[Rate, ...] = ()  # recipients, at most one per unit

    @property
    def counted(self) -> bool:
        """Whether the store counts this token's messages (it has a rate)."""
        return bool(self.rates or self.rcpt_rates)

    def as_json(self) -> dict[str, list[str]]:
        """What the CLI's `--json` and the API show, and what they take back."""
        return {
            "senders": list(self.senders),
            "networks": list(self.networks),
            "rates": [str(r) for r in self.rates],
            "rcpt_rates": [str(r) for r in self.rcpt_rates],
        }

    def dump(self) -> str:
        """The store's column: '' for a token without rules."""
        if self == NO_RULES:
            return ""
        return json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"))


NO_RULES = TokenRules()


@lru_cache(maxsize=1024)
def load_rules(text: str | None) -> TokenRules:
    """A token's rules from the store's column (written by `dump`, so trusted)."""
    if not text:
        return NO_RULES
    data = json.loads(text)
    return rules_of(
        data.get("senders", ()),
        data.get("networks", ()),
        data.get("rates", ()),
        data.get("rcpt_rates", ()),
    )


def rules_of(
    senders: Iterable[str] = (),
    networks: Iterable[str] = (),
    rates: Iterable[str] = (),
    rcpt_rates: Iterable[str] = (),
) -> TokenRules:
    """Rules from the lists `TokenRules.as_json` shows (so already checked)."""
    return TokenRules(
        senders=tuple(senders),
        networks=tuple(networks),
        rates=tuple(_rate(r) for r in rates),
        rcpt_rates=tuple(_rate(r) for r in rcpt_rates),
    )


def _rate(text: str) -> Rate:
    limit, _, unit = text.partition("/")
    return Rate(int(limit), Unit(unit))


# --- parsing an operator's input -----------------------------------------------------


def _entries(values: Iterable[str], what: str) -> list[str]:
    values = list(values)
    if len(values) > MAX_ENTRIES:
        raise BadRule(f"{what}: at most {MAX_ENTRIES} entries", code=f"bad_{what}")
    for value in values:
        if not isinstance(value, str):
            raise BadRule(f"{what}: a list of strings", code=f"bad_{what}")
    return values


def parse_rate(text: str, what: str = "rate") -> Rate:
    """`60/min`, `1000/day`, `5 / hour`: a whole number from 1 and a unit.

    >>> str(parse_rate("60/min")), str(parse_rate("2 / H"))
    ('60/minute', '2/hour')
    """
    match = _RATE.fullmatch(text.strip())
    unit = _UNIT_NAMES.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise BadRule(
            f"{what} {text!r}: N/minute, N/hour or N/day (also N/min, N/m, N/h, N/d)",
            code="bad_rate",
        )
    limit = int(match.group(1))
    if not 1 <= limit <= MAX_RATE:
        raise BadRule(
            f"{what} {text!r}: from 1 to {MAX_RATE} per {unit} (leave it out: no limit)",
            code="bad_rate",
        )
    return Rate(limit, unit)


def parse_rates(texts: Iterable[str], what: str = "rate") -> tuple[Rate, ...]:
    """At most one rate per unit, kept in the order minute, hour, day."""
    rates: dict[Unit, Rate] = {}
    for text in _entries(texts, what):
        rate = parse_rate(text, what)
        if rate.unit in rates:
            raise BadRule(f"{what}: two limits per {rate.unit}", code="bad_rate")
        rates[rate.unit] = rate
    return tuple(rates[u] for u in Unit if u in rates)


def parse_network(text: str) -> str:
    """A CIDR range, normalized; host bits set are an error (a typo more often than not).

    >>> parse_network("10.0.0.0/8"), parse_network("2001:DB8::/32"), parse_network("192.0.2.7")
    ('10.0.0.0/8', '2001:db8::/32', '192.0.2.7/32')
    """
    try:
        network = ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise BadRule(f"network {text!r}: not a CIDR range ({exc})", code="bad_network") from None
    return str(network)


def parse_networks(texts: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(parse_network(t) for t in _entries(texts, "network")))


def parse_sender(text: str, domains: Iterable[str]) -> str:
    """One sender entry, lower-cased; its domain must be one of the account's `domains`."""
    entry = text.strip().lower()
    if entry.startswith("*@"):
        domain = entry[2:]
        usable = parse_address(f"x@{domain}") is not None
    elif "@" in entry:
        parsed = parse_address(entry)
        usable, domain = parsed is not None, parsed[1] if parsed else ""
    else:
        domain = entry
        usable = parse_address(f"x@{domain}") is not None
    if not usable:
        raise BadRule(f"sender {text!r}: an address, *@domain or a domain", code="bad_sender")
    if domain not in set(domains):
        raise BadRule(
            f"sender {text!r}: {domain} is not a domain of the token's account"
            " (a scope only narrows the account's domains)",
            code="bad_sender",
        )
    return entry


def parse_senders(texts: Iterable[str], domains: Iterable[str]) -> tuple[str, ...]:
    owned = set(domains)
    return tuple(dict.fromkeys(parse_sender(t, owned) for t in _entries(texts, "sender")))


# --- the checks ------------------------------------------------------------------------


def sender_allowed(senders: tuple[str, ...], address: str) -> bool:
    """Whether the token may send as `address` (always, without a list).

    >>> sender_allowed(("billing@example.com",), "Billing@Example.com")
    True
    >>> sender_allowed(("*@example.com",), "ceo@example.com")
    True
    >>> sender_allowed(("a.test",), "x@b.test")
    False
    """
    if not senders:
        return True
    address = address.strip().lower()
    domain = address.rpartition("@")[2]
    return address in senders or domain in senders or f"*@{domain}" in senders


def network_allowed(networks: tuple[str, ...], address: str) -> bool:
    """Whether a client at `address` may use the token (always, without a list).

    An IPv4-mapped IPv6 address (a dual-stack listener's IPv4 client, RFC 4291
    section 2.5.5.2) is matched as the IPv4 address it is; anything that is not
    an IP address matches no range.
    """
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in _network(n) for n in networks)


@lru_cache(maxsize=1024)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def window_start(unit: Unit, now: int) -> int:
    """The start of the UTC window of `unit` that holds `now` (unix seconds)."""
    return now - now % SECONDS[unit]


def rate_hit(
    rules: TokenRules, used: Mapping[Unit, RateUse], messages: int, recipients: int, now: int
) -> RateHit | None:
    """The window `messages` more messages and `recipients` more recipients would pass.

    Counts of a window that has ended are 0. Of several full windows, the one
    that ends last: waiting for it is what helps.
    """
    hits = []
    for what, rates, more in (
        ("messages", rules.rates, messages),
        ("recipients", rules.rcpt_rates, recipients),
    ):
        if not more:
            continue
        for rate in rates:
            start = window_start(rate.unit, now)
            use = used.get(rate.unit)
            count = 0 if use is None or use.start != start else getattr(use, what)
            if count + more > rate.limit:
                hits.append(RateHit(what, rate, start + SECONDS[rate.unit] - now))
    return max(hits, key=lambda h: h.retry) if hits else None
