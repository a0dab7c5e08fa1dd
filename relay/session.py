"""The MAIL, RCPT and DATA hooks: a thin layer between the protocol and the core.

They gather inputs, ask the pure core (`relay.policy`) and the store, await the
channel, and turn the result into a reply. The connection itself (AUTH,
replies, timeouts, reading DATA) is `relay.protocol`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import Envelope, Session

from relay import config, policy, replies
from relay.channel import Delivery, Outbound
from relay.errors import DeliveryError, StoreError
from relay.message import domain_of, normalize_address, parse_address, prepare
from relay.replies import Reply
from relay.store import MailCheck, Principal, Refused, Reservation

if TYPE_CHECKING:
    from relay.protocol import SubmissionProtocol
    from relay.server import Relay

log = logging.getLogger("relay.session")


class RelaySession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.principal: Principal | None = None
        self.auth_failures = 0
        self.transaction: Transaction | None = None

    # aiosmtpd's setter logs a deprecation warning on every AUTH; we never use it.
    @property
    def login_data(self) -> Any:
        return None

    @login_data.setter
    def login_data(self, value: Any) -> None:
        pass


@dataclass
class Transaction:
    """What one mail transaction (MAIL to end of DATA) has learned so far."""

    check: MailCheck
    # Recipients as metered and matched (lower-cased); the envelope keeps them
    # as the client wrote them, since a local part is case-sensitive (RFC 5321
    # section 2.4) and is forwarded unchanged.
    rcpt_keys: list[str] = field(default_factory=list)
    verified: set[str] = field(default_factory=set)


class Submission:
    """The aiosmtpd handler: MAIL, RCPT and DATA for an authenticated session."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.settings = relay.settings

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default puts the exception's text in a 500 reply.
        log.error("session error", exc_info=error)
        return str(replies.LOCAL_ERROR)

    async def handle_MAIL(
        self,
        server: SubmissionProtocol,
        session: RelaySession,
        envelope: Envelope,
        address: str,
        options: Sequence[str],
    ) -> str:
        if self.relay.stopping:
            return str(replies.SHUTTING_DOWN)
        principal = session.principal
        assert principal is not None  # auth_required=True: aiosmtpd answered 530 already
        parsed = parse_address(address)
        if parsed is None:
            return str(replies.BAD_SENDER_ADDRESS)
        domain = parsed[1]
        sender = normalize_address(address)
        unlimited = principal.role in self.settings.no_limit_roles
        try:
            check = await self.relay.store.run(
                self.relay.store.sync.check_mail,
                sender,
                domain,
                principal.account_id,
                self.settings.default_send_balance,
                unlimited,
                principal.token_id,
            )
        except StoreError:
            log.exception("MAIL check failed")
            return str(replies.LOCAL_ERROR)
        if not check.token_valid:
            session.authenticated = False
            session.principal = None
            return str(replies.TOKEN_NO_LONGER_VALID)
        if check.domain_owner != principal.account_id:
            return str(policy.sender_domain_denied(domain))
        # The route before any recipient: None means no channel serves the domain.
        route = policy.choose_route(self.settings, domain, (), ())
        if route is None:
            return str(policy.no_channel(domain))
        refusal = policy.sender_refusal(
            check.sender, policy.free_channel_possible(self.settings, route)
        )
        if refusal is not None:
            return str(refusal)
        if check.hit is not None:
            return str(policy.limit_reached(check.hit))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        session.transaction = Transaction(check)
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self,
        server: SubmissionProtocol,
        session: RelaySession,
        envelope: Envelope,
        address: str,
        options: Sequence[str],
    ) -> str:
        if parse_address(address) is None:
            return str(replies.BAD_RECIPIENT_ADDRESS)
        rcpt = normalize_address(address)
        if len(envelope.rcpt_tos) >= config.MAX_RECIPIENTS:
            return str(replies.TOO_MANY_RECIPIENTS)
        tx = session.transaction
        assert tx is not None  # aiosmtpd answered 503 to RCPT before MAIL
        if rcpt in tx.rcpt_keys:
            return str(replies.RECIPIENT_OK)  # a duplicate costs nothing more
        if self.settings.cloudflare is not None:
            try:
                found = await self.relay.store.run(self.relay.store.sync.verified_among, (rcpt,))
            except StoreError:
                return str(replies.LOCAL_ERROR)
            tx.verified |= found
        rcpts = [*tx.rcpt_keys, rcpt]
        assert envelope.mail_from is not None
        domain = domain_of(envelope.mail_from)
        route = policy.choose_route(self.settings, domain, rcpts, tx.verified)
        if route is None:
            return str(policy.no_channel(domain))
        sender = tx.check.sender
        needed = policy.cost(route, len(rcpts), sender.unlimited)
        if needed > sender.balance:
            if sender.balance <= 0:
                return str(policy.balance_exhausted(sender.address))
            return str(policy.balance_short(sender.address, sender.balance, needed))
        if tx.check.headroom is not None and len(rcpts) > tx.check.headroom:
            return str(policy.recipients_over_limit(tx.check.headroom))
        envelope.rcpt_tos.append(address)
        tx.rcpt_keys.append(rcpt)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(
        self, server: SubmissionProtocol, session: RelaySession, envelope: Envelope
    ) -> str:
        reply = await self._submit(server, session, envelope)
        return str(reply)

    async def _submit(
        self, server: SubmissionProtocol, session: RelaySession, envelope: Envelope
    ) -> Reply:
        principal = session.principal
        tx = session.transaction
        assert tx is not None
        assert (
            principal is not None and envelope.mail_from and envelope.original_content is not None
        )
        sender, rcpts = envelope.mail_from, tuple(envelope.rcpt_tos)
        sender_key = tx.check.sender.address
        domain = domain_of(sender)
        prepared = prepare(
            envelope.original_content,
            sender=sender,
            recipients=rcpts,
            hostname=self.settings.hostname,
        )
        envelope.original_content = envelope.content = None  # do not hold two copies
        if prepared.from_count != 1:
            return replies.BAD_MESSAGE.but("Message must have exactly one From header (RFC 5322)")
        if prepared.header_senders is None:
            return replies.BAD_MESSAGE.but(
                "From or Sender header is not a clean address list (RFC 5322 section 3.4)"
            )
        denied = await self._header_senders_denied(principal, domain, prepared.header_senders)
        if denied is not None:
            return denied
        route = policy.choose_route(self.settings, domain, tx.rcpt_keys, tx.verified)
        if route is None:
            return policy.no_channel(domain)
        unit = 1 if route.charges and not tx.check.sender.unlimited else 0
        # Only an upstream that honours an idempotency key sends a retry once.
        idempotent = route.channel is policy.Channel.RESEND
        idempotency_key = prepared.idempotency_key if idempotent else None
        try:
            reservation = await self.relay.store.run(
                self.relay.store.sync.reserve,
                sender_key,
                account_id=principal.account_id,
                recipients=len(rcpts),
                unit=unit,
                default_balance=self.settings.default_send_balance,
                idempotency_key=idempotency_key,
                domain=domain,
            )
        except Refused as refused:
            if refused.hit is not None:
                return policy.limit_reached(refused.hit)
            if refused.domain_lost:
                return policy.sender_domain_denied(domain)
            if refused.disabled:
                return policy.sender_disabled(sender_key)
            return policy.balance_short(sender_key, refused.balance or 0, len(rcpts))
        except StoreError:
            log.exception("reserve failed; refusing to send unmetered")
            return replies.LOCAL_ERROR
        outbound = Outbound(
            sender, rcpts, prepared.content, prepared.message_id, prepared.idempotency_key
        )
        # The command timer must not fire (and cancel) while the upstream works.
        server._reset_timeout(self.relay.forward_budget + 10)
        # Shielded: a client that disconnects mid-forward does not cancel the
        # upstream call half-way, and the charge is always settled.
        task = self.relay.spawn(self._forward(route, outbound, reservation, idempotency_key))
        return await asyncio.shield(task)

    async def _header_senders_denied(
        self, principal: Principal, domain: str, addresses: tuple[str, ...]
    ) -> Reply | None:
        """A token may send only as its own account's domains, in the headers too."""
        others = {domain_of(a) for a in addresses} - {domain}
        if not others:
            return None
        for address in addresses:
            if parse_address(address) is None:
                return policy.header_sender_denied(address.encode("ascii", "replace").decode())
        try:
            owned = await self.relay.store.run(
                self.relay.store.sync.owned_domains, principal.account_id, tuple(others)
            )
        except StoreError:
            return replies.LOCAL_ERROR
        for address in addresses:
            if domain_of(address) not in owned | {domain}:
                return policy.header_sender_denied(address)
        return None

    async def _forward(
        self,
        route: policy.Route,
        outbound: Outbound,
        reservation: Reservation,
        idempotency_key: str | None,
    ) -> Reply:
        channel = self.relay.channels[route.channel]
        delivery = Delivery(accepted=())
        try:
            async with asyncio.timeout(self.relay.forward_budget):
                delivery = await channel.deliver(outbound)
            reply = replies.delivered(outbound.message_id)
        except DeliveryError as exc:
            reply = exc.reply
        except TimeoutError:
            reply = replies.UPSTREAM_UNAVAILABLE.but(f"{channel.name}: upstream timed out")
        except Exception:
            log.exception("channel %s failed unexpectedly", channel.name)
            reply = replies.LOCAL_ERROR
        try:
            # A replay reserved nothing and its key is recorded already.
            refund = (
                0
                if reservation.replay
                else await self.relay.store.settle(
                    reservation.id,
                    len(delivery.accepted),
                    idempotency_key,
                )
            )
        except StoreError:
            # The pending row stays; the stale sweep refunds it in full later.
            log.exception("settling reservation %s failed", reservation.id)
            refund = -1
        log.info(
            "message %s from=%s rcpts=%d channel=%s rule=%d reply=%r upstream_id=%s"
            " refused=%s refunded=%d%s",
            outbound.message_id,
            outbound.sender,
            len(outbound.recipients),
            channel.name,
            route.rule,
            f"{reply.code} {reply.enhanced}",
            delivery.upstream_id or "-",
            ",".join(f"{r}:{v.code}" for r, v in delivery.refused.items()) or "-",
            refund,
            " replay=not-charged" if reservation.replay else "",
        )
        return reply
