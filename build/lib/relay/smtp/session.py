"""The MAIL, RCPT and DATA hooks: a thin layer between the protocol and the core.

They gather inputs, ask the pure core (`relay.policy`) and the store, await the
channel, and turn the result into a reply. The connection itself (AUTH,
replies, timeouts, reading DATA) is `relay.smtp.protocol`; the values they
fill in are `relay.smtp.transaction`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from aiosmtpd.smtp import Session

from relay import logs, metrics, policy, replies
from relay.channels.base import Channel, Outbound
from relay.config import Settings
from relay.delivery import forward, submitted
from relay.errors import StoreError
from relay.message import Prepared, normalize_address, parse_address, prepare
from relay.replies import Reply
from relay.smtp.transaction import (
    RelayEnvelope,
    RelaySession,
    Submitted,
    Transaction,
    declared_size,
)
from relay.store.deliveries import (
    REFUSED_RECIPIENTS_KEPT,
    DeliveryRecord,
    outcome_of,
)
from relay.store.facade import Principal, Refused, Reservation
from relay.store.loop import AsyncStore
from relay.tokenrules import rate_hit

log = logging.getLogger("relay.session")
# Above these, preparing a message can take long enough to delay other sessions.
PREPARE_INLINE_BYTES = 256 * 1024
PREPARE_INLINE_HEADER = 8 * 1024


class Connection(Protocol):
    """What the hooks need of the connection that calls them (`relay.smtp.protocol`)."""

    def reset_timer(self, seconds: float | None = None) -> None: ...


class Submission:
    """The aiosmtpd handler: MAIL, RCPT and DATA for an authenticated session.

    Given what it uses: the settings, the store, the channels, and `spawn`, which
    runs a forward as a task the server tracks and awaits on stop.
    """

    def __init__(
        self,
        settings: Settings,
        store: AsyncStore,
        channels: Mapping[policy.Channel, Channel],
        spawn: Callable[[Coroutine[Any, Any, Reply]], asyncio.Task[Reply]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.channels = channels
        self.spawn = spawn
        self.forwarder = forward.Forwarder(settings, store, channels)
        self.stopping = False  # new transactions get 421 4.3.2 once set

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default puts the exception's text in a 500 reply.
        log.error("session error", exc_info=error)
        return str(replies.LOCAL_ERROR)

    async def handle_MAIL(
        self,
        server: Connection,
        session: RelaySession,
        envelope: RelayEnvelope,
        address: str,
        options: Sequence[str],
    ) -> str:
        if self.stopping:
            return str(replies.SHUTTING_DOWN)
        principal = session.principal
        assert principal is not None  # auth is required: aiosmtpd answered 530 already
        parsed = parse_address(address)
        if parsed is None:
            return str(replies.BAD_SENDER_ADDRESS)
        domain = parsed[1]
        try:
            check = await self.store.check_mail(
                normalize_address(address),
                domain,
                principal.account_id,
                self.settings.default_send_balance,
                principal.role in self.settings.no_limit_roles,
                principal.token_id,
                self.settings.refusal_limit,
            )
        except StoreError as exc:
            if not self.store.logged(exc):
                log.exception("MAIL check failed")
            return str(replies.LOCAL_ERROR)
        if self.settings.refusal_limit and check.refusals >= self.settings.refusal_limit:
            # Each refused message writes a record: a token past its refusals
            # may send no more for a while (relay.store.refusals). 421 closes.
            return str(replies.TOO_MANY_REFUSALS)
        reply = policy.decide_mail(
            self.settings,
            account_id=principal.account_id,
            domain=domain,
            domain_owner=check.domain_owner,
            token_valid=check.token_valid,
            sender=check.sender,
            hit=check.hit,
            scope=check.rules.senders,
            rate=check.rate,
        )
        metrics.refusal(reply, check.hit, check.rate)
        _log_balance_refusal("MAIL FROM", reply, check.sender.balance)
        if reply == replies.TOKEN_NO_LONGER_VALID:
            session.deauthenticate()
        if reply == replies.SENDER_OK:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            envelope.transaction = Transaction(address, check, declared_size=declared_size(options))
        return str(reply)

    async def handle_RCPT(
        self,
        server: Connection,
        session: RelaySession,
        envelope: RelayEnvelope,
        address: str,
        options: Sequence[str],
    ) -> str:
        if parse_address(address) is None:
            return str(replies.BAD_RECIPIENT_ADDRESS)
        tx = envelope.transaction
        assert tx is not None  # aiosmtpd answered 503 to RCPT before MAIL
        rcpt = normalize_address(address)
        early = policy.rcpt_before_lookup(self.settings.limits, tx.keys, rcpt)
        if early is not None:
            return str(early)
        suppressed = await self._suppression(session, rcpt)
        if suppressed is not None:
            return str(suppressed)
        if self.settings.cloudflare is not None:
            try:
                tx.verified |= await self.store.verified_among((rcpt,))
            except StoreError:
                return str(replies.LOCAL_ERROR)
        check = tx.check
        rate = (
            rate_hit(check.rules, check.rate_use, 0, len(tx.keys) + 1, self._now())
            if check.rules.rcpt_rates
            else None
        )
        reply = policy.decide_rcpt(
            self.settings,
            domain=tx.domain,
            recipients=tx.keys,
            rcpt=rcpt,
            verified=tx.verified,
            sender=check.sender,
            headroom=check.headroom,
            rate=rate,
        )
        metrics.refusal(reply, rate=rate)
        _log_balance_refusal("RCPT TO", reply, tx.check.sender.balance)
        if reply == replies.RECIPIENT_OK:
            tx.add(address, rcpt)
        return str(reply)

    async def _suppression(self, session: RelaySession, rcpt: str) -> Reply | None:
        """550 5.1.1 for an address on the account's suppression list, before any
        charge; `recipient.suppressed` goes to its webhooks (relay.store.outbox,
        at most once an hour per address)."""
        principal = session.principal
        assert principal is not None
        try:
            found = await self.store.suppression_for(principal.account_id, rcpt)
            if found is None:
                return None
            await self.store.suppressed_rcpt_event(principal.account_id, rcpt, found.reason)
        except StoreError:
            return replies.LOCAL_ERROR
        since = time.strftime("%Y-%m-%d", time.gmtime(found.created))
        return replies.recipient_suppressed(rcpt, found.reason, since)

    def data_refusal(self, envelope: RelayEnvelope) -> Reply | None:
        """Before 354: a SIZE= the chosen channel cannot carry is refused before the upload."""
        tx = envelope.transaction
        assert tx is not None
        plan = tx.plan = self._plan(tx)
        if isinstance(plan, Reply):
            return None  # the end of DATA answers it, with the message in hand
        return policy.size_refusal(plan.route, tx.declared_size)

    def _plan(self, tx: Transaction) -> policy.MessagePlan | Reply:
        return policy.plan_message(
            self.settings,
            domain=tx.domain,
            recipients=tx.keys,
            verified=tx.verified,
            unlimited=tx.check.sender.unlimited,
        )

    async def handle_DATA(
        self, server: Connection, session: RelaySession, envelope: RelayEnvelope
    ) -> str:
        return str(await self._submit(server, session, envelope))

    async def _submit(
        self, server: Connection, session: RelaySession, envelope: RelayEnvelope
    ) -> Reply:
        """The end of DATA: check the headers, plan, charge, forward."""
        tx, principal, content = envelope.transaction, session.principal, envelope.content
        assert tx is not None and principal is not None and isinstance(content, bytes)
        envelope.original_content = envelope.content = None  # do not hold two copies
        prepared = await self._prepare(content, tx)
        submitted = Submitted(
            principal,
            _client(session),
            tx.check.sender.address,
            tuple(tx.recipients),
            tuple(tx.keys),
            len(content),
            prepared.message_id,
            session.listener,
        )
        refusal = policy.message_refusal(prepared) or await self._header_senders_refusal(
            principal, tx, prepared.header_senders
        )
        if refusal is not None:
            return await self._refused(submitted, refusal)
        plan = tx.plan or self._plan(tx)
        if isinstance(plan, Reply):
            return await self._refused(submitted, plan)
        channel = self.channels[plan.route.channel]
        # Only an upstream that honours an idempotency key sends a retry once.
        idempotency_key = prepared.idempotency_key if channel.idempotent else None
        reservation = await self._reserve(principal, tx, plan, idempotency_key)
        if isinstance(reservation, Reply):
            if reservation == replies.TOKEN_NO_LONGER_VALID:
                session.deauthenticate()
            return await self._refused(submitted, reservation, plan.route, channel.name)
        outbound = Outbound(
            tx.sender,
            tuple(tx.recipients),
            prepared.content,
            prepared.message_id,
            prepared.idempotency_key,
        )
        # The command timer must not fire (and cancel) while the upstream works.
        server.reset_timer(self.settings.forward_budget + 10)
        # Shielded: a client that disconnects mid-forward does not cancel the
        # upstream call half-way, and the charge is always settled. The forward
        # walks the plan's route chain (relay.delivery.chain: failover).
        task = self.spawn(
            self.forwarder.forward(
                plan, outbound, reservation, idempotency_key, submitted, tx.check.queue
            )
        )
        return await asyncio.shield(task)

    async def _refused(
        self,
        submitted: Submitted,
        reply: Reply,
        route: policy.Route | None = None,
        channel: str = "",
    ) -> Reply:
        """A message answered at the end of DATA before any charge: counted and recorded.

        Its record keeps the first REFUSED_RECIPIENTS_KEPT recipients (all share
        the one reply) and their count; a permanent refusal counts against the
        token's RELAY_REFUSAL_LIMIT (relay.store.refusals), in the same write.
        """
        record = submitted.record(
            reply,
            self._now(),
            route=route,
            channel=channel,
            keep_recipients=REFUSED_RECIPIENTS_KEPT,
        )
        self._count(record)
        kept = record if self.settings.log_retention_days else None  # 0: the log is off
        counted = submitted.principal.token_id if reply.is_permanent else None
        if kept is None and counted is None:
            return reply
        try:
            await self.store.record_refused(kept, counted)
        except StoreError as exc:
            if not self.store.logged(exc):
                log.warning("could not record refused message %s: %s", record.message_id, exc)
        return reply

    async def upload_refused(
        self, session: RelaySession, tx: Transaction | None, reply: Reply, size: int
    ) -> None:
        """A DATA upload the protocol did not keep (too big, or its storage failed).

        It reached the end of DATA, so like every such transaction it is counted,
        logged and recorded. The message was dropped unread: its Message-ID is
        one the relay makes up, as for a message that has none (RFC 6409 section 8.3).
        """
        principal = session.principal
        if tx is None or principal is None:
            return
        message_id = f"<{secrets.token_urlsafe(24)}@{self.settings.hostname}>"
        submitted = Submitted(
            principal,
            _client(session),
            tx.check.sender.address,
            tuple(tx.recipients),
            tuple(tx.keys),
            size,
            message_id,
            session.listener,
        )
        await self._refused(submitted, reply)
        log.info(
            "message %s from=%s rcpts=%d size=%d reply=%r outcome=%s: not kept",
            message_id,
            tx.sender,
            len(tx.recipients),
            size,
            f"{reply.code} {reply.enhanced}",
            outcome_of(reply, 0),
            extra={
                logs.FIELDS: {
                    "message_id": message_id,
                    "from": tx.sender,
                    "rcpts": len(tx.recipients),
                    "size": size,
                    "reply": f"{reply.code} {reply.enhanced}",
                    "outcome": str(outcome_of(reply, 0)),
                }
            },
        )

    def _now(self) -> int:
        return self.store.now()

    @staticmethod
    def _count(record: DeliveryRecord) -> None:
        submitted.count(record)

    async def _prepare(self, content: bytes, tx: Transaction) -> Prepared:
        """`message.prepare`, off the event loop when the message could make it slow.

        Small messages are prepared inline (a thread hop costs more than the
        work); a large body or header section, where the address parsing and
        the scans take tens of milliseconds, goes to a thread so no other
        session waits for it.
        """
        call = functools.partial(
            prepare,
            content,
            sender=tx.sender,
            recipients=tuple(tx.recipients),
            hostname=self.settings.hostname,
        )
        heavy = len(content) > PREPARE_INLINE_BYTES or (
            content.find(b"\r\n\r\n", 0, PREPARE_INLINE_HEADER) < 0
        )
        return await asyncio.to_thread(call) if heavy else call()

    async def _header_senders_refusal(
        self, principal: Principal, tx: Transaction, addresses: tuple[str, ...] | None
    ) -> Reply | None:
        """From:/Sender: on the account's domains, and within the token's sender scope."""
        domain, scope = tx.domain, tx.check.rules.senders
        others = policy.foreign_header_domains(domain, addresses or ())
        if addresses is None or not (others or scope):
            return None
        for address in addresses:
            if parse_address(address) is None:
                return policy.header_sender_denied(address.encode("ascii", "replace").decode())
        try:
            owned = (
                await self.store.owned_domains(principal.account_id, tuple(others))
                if others
                else frozenset()
            )
        except StoreError:
            return replies.LOCAL_ERROR
        reply = policy.header_sender_refusal(domain, addresses, owned, scope)
        if reply is not None:
            metrics.refusal(reply)
        return reply

    async def _reserve(
        self,
        principal: Principal,
        tx: Transaction,
        plan: policy.MessagePlan,
        idempotency_key: str | None,
    ) -> Reservation | Reply:
        """Charge the balance and count the send limits, atomically (the store's guarantee)."""
        try:
            return await self.store.reserve(
                tx.check.sender.address,
                account_id=principal.account_id,
                recipients=len(tx.recipients),
                unit=plan.unit,
                default_balance=self.settings.default_send_balance,
                idempotency_key=idempotency_key,
                domain=tx.domain,
                token_id=principal.token_id,
            )
        except Refused as refused:
            reply = policy.reservation_refusal(
                sender=tx.check.sender.address,
                domain=tx.domain,
                recipients=len(tx.recipients),
                balance=refused.balance,
                disabled=refused.disabled,
                hit=refused.hit,
                domain_lost=refused.domain_lost,
                token_invalid=refused.token_invalid,
                out_of_scope=refused.out_of_scope,
                rate=refused.rate,
            )
            metrics.refusal(reply, refused.hit, refused.rate)
            _log_balance_refusal("end of DATA", reply, refused.balance)
            return reply
        except StoreError as exc:
            if not self.store.logged(exc):
                log.exception("reserve failed; refusing to send unmetered")
            return replies.LOCAL_ERROR


def _log_balance_refusal(stage: str, reply: Reply, balance: int | None) -> None:
    """One INFO line for a 550 over a balance, so an operator sees why a sender was refused.

    The reply's text names the sender (as the per-message line does); nothing secret.
    """
    if policy.is_balance_refusal(reply):
        log.info("%s refused (balance %s): %s", stage, balance, reply)


def _client(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
