"""The pure core: every decision the session makes, as plain functions over values.

Which channel serves a message, whether a sender may send, what a message costs,
and when a send-limit window resets. No I/O, no clock reads: callers pass `now`.
"""

from __future__ import annotations

import calendar
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from relay import replies
from relay.config import Settings
from relay.replies import Reply


class Channel(enum.StrEnum):
    CLOUDFLARE = "cloudflare"
    RESEND = "resend"
    SMTP = "smtp"
    OUTBOX = "outbox"


@dataclass(frozen=True, slots=True)
class Route:
    channel: Channel
    charges: bool  # whether each delivered recipient costs 1 from the sender's balance
    rule: int  # the row of the documented priority table that chose it


def choose_route(
    settings: Settings, domain: str, recipients: Iterable[str], verified: Iterable[str]
) -> Route | None:
    """The documented send-channel priority (temp-email-send-mail-en.txt), per message.

    1. Cloudflare, when configured and every recipient is verified: free.
    2. Resend, when `RESEND_TOKEN` or `RESEND_TOKEN_<DOMAIN>` is set.
    3. Upstream SMTP, when `SMTP_CONFIG` has the sender domain.
    4. Cloudflare, when configured.
    5. The development outbox, only when `RELAY_DEV_OUTBOX` asks for it: free,
       since nothing leaves the machine.
    Otherwise None: the caller answers 451 4.3.0 naming the domain.
    """
    domain = domain.lower()
    rcpts = set(recipients)
    if settings.cloudflare and rcpts and rcpts <= set(verified):
        return Route(Channel.CLOUDFLARE, charges=False, rule=1)
    if settings.resend.token_for(domain):
        return Route(Channel.RESEND, charges=True, rule=2)
    if domain in settings.smtp_config:
        return Route(Channel.SMTP, charges=True, rule=3)
    if settings.cloudflare:
        return Route(Channel.CLOUDFLARE, charges=True, rule=4)
    if settings.dev_outbox:
        return Route(Channel.OUTBOX, charges=False, rule=5)
    return None


def free_channel_possible(settings: Settings, route: Route) -> bool:
    """Whether a message whose route before any RCPT is `route` might go out free.

    Cloudflare's verified-address channel depends on recipients not given yet;
    the development outbox is free whenever it is the domain's channel.
    """
    return settings.cloudflare is not None or not route.charges


def no_channel(domain: str) -> Reply:
    return replies.NO_CHANNEL.but(f"No upstream channel configured for sender domain {domain}")


def sender_domain_denied(domain: str) -> Reply:
    # Matching is exact: the original's users were confused by subdomains.
    return replies.SENDER_DENIED.but(
        f"Sender denied: domain {domain} is not onboarded for this token's account"
        " (domains match exactly; a subdomain needs its own entry)"
    )


def header_sender_denied(address: str) -> Reply:
    return replies.SENDER_DENIED.but(
        f"Sender denied: header address {address} is not on a domain of this token's account"
    )


# --- balances ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SenderState:
    """What the store knows of one envelope sender when MAIL FROM arrives."""

    address: str
    balance: int
    enabled: bool
    unlimited: bool  # on the no-limit list, or the token's role is a no-limit role


def sender_refusal(state: SenderState, free_channel_possible: bool) -> Reply | None:
    """Refuse at MAIL FROM a sender who cannot send anything at all.

    A zero balance is not final while the free verified-address channel may
    still apply (it depends on recipients not yet given): RCPT decides then.
    """
    if state.unlimited:
        return None
    if not state.enabled:
        return sender_disabled(state.address)
    if state.balance <= 0 and not free_channel_possible:
        return balance_exhausted(state.address)
    return None


def sender_disabled(address: str) -> Reply:
    return replies.BALANCE_DENIED.but(
        f"Sending is disabled for {address}; ask the relay admin to enable it"
    )


def recipients_over_limit(allowed: int) -> Reply:
    """RCPT past what the tightest send-limit window lets this message carry."""
    return replies.SEND_LIMIT_REACHED.but(
        f"Send limit allows {allowed} recipients per message now; send the rest later"
    )


def balance_exhausted(address: str) -> Reply:
    return replies.BALANCE_DENIED.but(
        f"Send balance exhausted for {address}; ask the relay admin for a top-up"
    )


def balance_short(address: str, balance: int, needed: int) -> Reply:
    return replies.BALANCE_DENIED.but(
        f"Send balance of {address} ({balance}) does not cover {needed} recipients"
    )


def cost(route: Route, recipients: int, unlimited: bool) -> int:
    """Balance units a message costs: one per recipient on a charging channel."""
    return recipients if route.charges and not unlimited else 0


# --- send limits -------------------------------------------------------------


class Window(enum.StrEnum):
    DAY = "daily"
    MONTH = "monthly"


UNLIMITED = -1


def period_key(window: Window, now: datetime) -> str:
    """The UTC window `now` falls in: 'd:2026-11-21' or 'm:2026-11'."""
    now = now.astimezone(UTC)
    return now.strftime("d:%Y-%m-%d" if window is Window.DAY else "m:%Y-%m")


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
    scope: str  # "relay" or "account NAME"
    window: Window
    limit: int
    reset_at: datetime


def limit_reached(hit: LimitHit) -> Reply:
    reset = hit.reset_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return replies.SEND_LIMIT_REACHED.but(
        f"{hit.window.value.capitalize()} send limit of {hit.limit} reached for the "
        f"{hit.scope}; the window resets at {reset}"
    )


def headroom(limit: int, used: int) -> int | None:
    """Recipients still allowed in a window; None when unlimited."""
    return None if limit == UNLIMITED else max(limit - used, 0)
