"""The pure core: every decision the session makes, as plain functions over values.

Which channel serves a message, whether a sender may send, what a message costs,
and when a send-limit window resets; and the three decisions of a transaction:
`decide_mail`, `decide_rcpt` and `plan_message` (end of DATA). The session
gathers their inputs (from the client and the store), calls them, and does what
they say. No I/O, no clock reads: callers pass `now`.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from relay import replies
from relay.config import Limits, Settings
from relay.message import Defect, Prepared
from relay.replies import Reply
from relay.tokenrules import RateHit, sender_allowed
from relay.windows import LimitHit


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


# The five rows of the table below, made once (a route is a frozen value).
_FREE_CLOUDFLARE = Route(Channel.CLOUDFLARE, charges=False, rule=1)
_RESEND = Route(Channel.RESEND, charges=True, rule=2)
_SMTP = Route(Channel.SMTP, charges=True, rule=3)
_PAID_CLOUDFLARE = Route(Channel.CLOUDFLARE, charges=True, rule=4)
_OUTBOX = Route(Channel.OUTBOX, charges=False, rule=5)


def route_chain(
    settings: Settings, domain: str, recipients: Iterable[str], verified: Iterable[str]
) -> tuple[Route, ...]:
    """Every channel the documented priority (temp-email-send-mail-en.txt) allows, in order.

    1. Cloudflare, when configured and every recipient is verified: free.
    2. Resend, when `RESEND_TOKEN` or `RESEND_TOKEN_<DOMAIN>` is set.
    3. Upstream SMTP, when `SMTP_CONFIG` has the sender domain.
    4. Cloudflare, when configured (not after row 1: the same upstream).
    5. The development outbox, only when `RELAY_DEV_OUTBOX` asks for it and no
       other channel serves the domain: free, since nothing leaves the machine.
    The first serves the message; the others follow when a channel proves it
    did not take it (`relay.delivery.chain`). Empty: the caller answers 451
    4.3.0 naming the domain.
    """
    domain = domain.lower()
    chain: list[Route] = []
    free = False
    if settings.cloudflare:
        rcpts = set(recipients)
        if rcpts and rcpts <= set(verified):
            chain.append(_FREE_CLOUDFLARE)
            free = True
    if settings.resend.configured and settings.resend.token_for(domain):
        chain.append(_RESEND)
    if domain in settings.smtp_config:
        chain.append(_SMTP)
    if settings.cloudflare and not free:
        chain.append(_PAID_CLOUDFLARE)
    if not chain and settings.dev_outbox:
        chain.append(_OUTBOX)
    return tuple(chain)


def choose_route(
    settings: Settings, domain: str, recipients: Iterable[str], verified: Iterable[str]
) -> Route | None:
    """The route that serves a message first (`route_chain`'s head), or None."""
    chain = route_chain(settings, domain, recipients, verified)
    return chain[0] if chain else None


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


def sender_not_allowed(address: str) -> Reply:
    """An address outside the token's sender scope (envelope or header)."""
    return replies.SENDER_NOT_IN_SCOPE.but(f"Sender <{address}> is not allowed for this token")


def is_scope_refusal(reply: Reply) -> bool:
    """A refusal for a sender outside the token's scope (`sender_not_allowed`)."""
    return (reply.code, reply.enhanced) == (
        replies.SENDER_NOT_IN_SCOPE.code,
        replies.SENDER_NOT_IN_SCOPE.enhanced,
    ) and reply.text.endswith("is not allowed for this token")


def token_rate_limited(hit: RateHit) -> Reply:
    return replies.TOKEN_RATE_LIMITED.but(
        f"Token rate limit: {hit.rate.limit} {hit.what} per {hit.rate.unit}; retry in {hit.retry} s"
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


def is_balance_refusal(reply: Reply) -> bool:
    """A refusal for the sender's balance or a disabled sender (the three builders above)."""
    return (reply.code, reply.enhanced) == (
        replies.BALANCE_DENIED.code,
        replies.BALANCE_DENIED.enhanced,
    ) and reply.text.startswith(("Send balance", "Sending is disabled"))


def unit_cost(route: Route, unlimited: bool) -> int:
    """Balance units one delivered recipient costs: 1 on a charging channel, else 0."""
    return 1 if route.charges and not unlimited else 0


def cost(route: Route, recipients: int, unlimited: bool) -> int:
    """Balance units a message costs: one per recipient on a charging channel."""
    return recipients * unit_cost(route, unlimited)


# --- send limits -------------------------------------------------------------


def limit_reached(hit: LimitHit) -> Reply:
    reset = hit.reset_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return replies.SEND_LIMIT_REACHED.but(
        f"{hit.window.value.capitalize()} send limit of {hit.limit} reached for the "
        f"{hit.scope}; the window resets at {reset}"
    )


# --- the transaction's decisions ---------------------------------------------------


def decide_mail(
    settings: Settings,
    *,
    account_id: int,
    domain: str,
    domain_owner: int | None,
    token_valid: bool,
    sender: SenderState,
    hit: LimitHit | None,
    scope: tuple[str, ...] = (),
    rate: RateHit | None = None,
) -> Reply:
    """MAIL FROM: `SENDER_OK` to open the transaction, or the refusal.

    `TOKEN_NO_LONGER_VALID` also means the session must authenticate again.
    `scope` is the token's sender list (empty: its account's domains), `rate`
    the token's message window the message would pass.
    """
    if not token_valid:
        return replies.TOKEN_NO_LONGER_VALID
    if domain_owner != account_id:
        return sender_domain_denied(domain)
    if not sender_allowed(scope, sender.address):
        return sender_not_allowed(sender.address)
    # The route before any recipient: None means no channel serves the domain.
    route = choose_route(settings, domain, (), ())
    if route is None:
        return no_channel(domain)
    refusal = sender_refusal(sender, free_channel_possible(settings, route))
    if refusal is not None:
        return refusal
    if hit is not None:
        return limit_reached(hit)
    if rate is not None:
        return token_rate_limited(rate)
    return replies.SENDER_OK


def rcpt_before_lookup(limits: Limits, recipients: Collection[str], rcpt: str) -> Reply | None:
    """RCPT's answer when it needs no store lookup: over the count, or a duplicate."""
    if len(recipients) >= limits.max_recipients:
        return replies.TOO_MANY_RECIPIENTS
    if rcpt in recipients:
        return replies.RECIPIENT_OK  # a duplicate costs nothing more
    return None


def decide_rcpt(
    settings: Settings,
    *,
    domain: str,
    recipients: Collection[str],
    rcpt: str,
    verified: Collection[str],
    sender: SenderState,
    headroom: int | None,
    rate: RateHit | None = None,
) -> Reply:
    """RCPT TO after `rcpt_before_lookup`: `RECIPIENT_OK` adds `rcpt`, else the refusal.

    The message with this recipient must still have a channel, be covered by
    the sender's balance, fit the tightest send-limit window, and not pass the
    token's recipient windows (`rate`: the one it would pass).
    """
    rcpts = [*recipients, rcpt]
    route = choose_route(settings, domain, rcpts, verified)
    if route is None:
        return no_channel(domain)
    needed = cost(route, len(rcpts), sender.unlimited)
    if needed > sender.balance:
        if sender.balance <= 0:
            return balance_exhausted(sender.address)
        return balance_short(sender.address, sender.balance, needed)
    if headroom is not None and len(rcpts) > headroom:
        return recipients_over_limit(headroom)
    if rate is not None:
        return token_rate_limited(rate)
    return replies.RECIPIENT_OK


_DEFECT_REPLIES = {
    Defect.NUL: replies.NUL_IN_MESSAGE,
    Defect.NO_HEADER_SECTION: replies.NO_HEADER_SECTION,
    Defect.HEADER_TOO_BIG: replies.HEADER_TOO_BIG,
    Defect.BAD_FIELD: replies.BAD_HEADER_FIELD,
    Defect.TOO_MANY_ADDRESSES: replies.TOO_MANY_HEADER_ADDRESSES,
    Defect.LONG_LINE: replies.LONG_LINE,
    Defect.TOO_MANY_PARTS: replies.TOO_MANY_MIME_PARTS,
    Defect.BAD_MESSAGE_ID: replies.BAD_MESSAGE_ID,
    Defect.MESSAGE_IDS: replies.ONE_MESSAGE_ID_ALLOWED,
}


def message_refusal(prepared: Prepared) -> Reply | None:
    """A message the relay will not forward as it is: its defect, or its sender headers."""
    if prepared.defect is not None:
        return _DEFECT_REPLIES[prepared.defect]
    return header_refusal(prepared.from_count, prepared.header_senders)


def header_refusal(from_count: int, header_senders: tuple[str, ...] | None) -> Reply | None:
    """The header section's sender fields must be unambiguous (RFC 5322 section 3.6)."""
    if from_count != 1:
        return replies.ONE_FROM_REQUIRED
    if header_senders is None:
        return replies.UNCLEAN_SENDER_HEADER
    return None


def foreign_header_domains(domain: str, header_senders: Iterable[str]) -> frozenset[str]:
    """Domains in From:/Sender: other than the envelope sender's: the store must own them."""
    return frozenset(a.rpartition("@")[2].lower() for a in header_senders) - {domain}


def header_sender_refusal(
    domain: str, header_senders: Iterable[str], owned: Collection[str], scope: tuple[str, ...] = ()
) -> Reply | None:
    """A token sends only as its own account's domains, and within its sender
    scope (`scope`, empty: no narrower list), in the headers too."""
    for address in header_senders:
        if address.rpartition("@")[2].lower() not in {*owned, domain}:
            return header_sender_denied(address)
        if not sender_allowed(scope, address):
            return sender_not_allowed(address)
    return None


@dataclass(frozen=True, slots=True)
class MessagePlan:
    """What the end of DATA does with a message that passed every check.

    `chain` is the route and the routes that may follow it, in order: only
    those whose recipient costs what `route`'s does, since the charge is
    reserved at `unit` before the forward (a free verified-Cloudflare message
    of a metered sender is not failed over to a charging channel).
    """

    route: Route
    unit: int  # balance units per delivered recipient
    chain: tuple[Route, ...] = ()

    @property
    def routes(self) -> tuple[Route, ...]:
        return self.chain or (self.route,)


def plan_message(
    settings: Settings,
    *,
    domain: str,
    recipients: Collection[str],
    verified: Collection[str],
    unlimited: bool,
) -> MessagePlan | Reply:
    """The channel and the price of a message at the end of DATA, or why it cannot go."""
    chain = route_chain(settings, domain, recipients, verified)
    if not chain:
        return no_channel(domain)
    unit = unit_cost(chain[0], unlimited)
    same = tuple(r for r in chain if unit_cost(r, unlimited) == unit)
    return MessagePlan(chain[0], unit, same)


# The largest message (as its MIME text) each upstream takes, where it is below
# what the relay accepts. Cloudflare: 5 MiB including attachments, 25 MiB to
# verified destination addresses (cloudflare-docs email-service/platform/limits.mdx,
# "Email content limits"); we read it as the size of `mime_message`, not of the
# JSON around it (the JSON's escaping is not documented to count). Resend: 40 MB
# per email after base64 (resend.com/docs/api-reference/emails/send-email,
# `attachments`), far above a 5 MiB message. An SMTP upstream's own SIZE is only
# known on a connection: its 552 is relayed as it comes.
UPSTREAM_MAX_BYTES = {"cloudflare": 5 * 1024 * 1024}
UPSTREAM_MAX_BYTES_VERIFIED = {"cloudflare": 25 * 1024 * 1024}
# What the relay may add before forwarding (message.prepare, RFC 6409 section 8):
# a Message-ID of up to ~300 octets and a Date of ~40.
RELAY_HEADROOM = 1024


def upstream_limit(route: Route) -> int | None:
    """The most the route's upstream takes, as the channel measures what it sends
    (Cloudflare: the MIME text once re-encoded and escaped for JSON).

        >>> upstream_limit(Route(Channel.CLOUDFLARE, charges=True, rule=4))
        5242880
    """
    limits = UPSTREAM_MAX_BYTES_VERIFIED if route.rule == 1 else UPSTREAM_MAX_BYTES
    return limits.get(route.channel)


def max_forwardable(channel: str, *, verified: bool = False) -> int | None:
    """The largest SIZE= a client may declare for a message this channel can carry.

    None when the upstream takes anything the relay accepts. A declared size
    above it gets `552 5.3.4` before the upload (RFC 1870 section 6.1), instead
    of an upstream refusal after it.

        >>> max_forwardable("cloudflare")
        5241856
        >>> max_forwardable("resend") is None
        True
    """
    limits = UPSTREAM_MAX_BYTES_VERIFIED if verified else UPSTREAM_MAX_BYTES
    limit = limits.get(channel)
    return None if limit is None else limit - RELAY_HEADROOM


def size_refusal(route: Route, declared: int | None) -> Reply | None:
    """552 5.3.4 before the upload when SIZE= is more than the route's channel carries."""
    limit = max_forwardable(route.channel, verified=route.rule == 1)
    if declared is not None and limit is not None and declared > limit:
        return replies.MESSAGE_TOO_BIG.but(
            f"Message too big for the {route.channel} channel: at most {limit} octets"
        )
    return None


def reservation_refusal(
    *,
    sender: str,
    domain: str,
    recipients: int,
    balance: int | None,
    disabled: bool,
    hit: LimitHit | None,
    domain_lost: bool,
    token_invalid: bool = False,
    out_of_scope: bool = False,
    rate: RateHit | None = None,
) -> Reply:
    """The reply for a charge the store refused (state changed since MAIL or RCPT)."""
    if token_invalid:
        return replies.TOKEN_NO_LONGER_VALID
    if out_of_scope:
        return sender_not_allowed(sender)
    if rate is not None:
        return token_rate_limited(rate)
    if hit is not None:
        return limit_reached(hit)
    if domain_lost:
        return sender_domain_denied(domain)
    if disabled:
        return sender_disabled(sender)
    return balance_short(sender, balance or 0, recipients)
