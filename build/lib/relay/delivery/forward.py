"""The forward: a charged message down its route chain, then its settle and its record.

The session calls `Forwarder.forward` as a shielded task once the charge is
reserved: a client that disconnects mid-forward does not cancel the upstream
call half-way, and the charge is always settled. The charge follows what was
delivered: every route of a plan costs the reserved unit per recipient
(`relay.policy.plan_message`), so the settle keeps it for the recipients taken,
by whichever channel took them, and refunds the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from relay import logs, policy, replies
from relay.channels.base import Channel, Outbound
from relay.config import Settings
from relay.delivery import queue
from relay.delivery.chain import Walk, walk
from relay.delivery.submitted import Submitted, count
from relay.errors import StoreError
from relay.replies import Reply
from relay.store.deliveries import DeliveryRecord
from relay.store.facade import Reservation
from relay.store.loop import AsyncStore

log = logging.getLogger("relay.session")


def remembered_key(
    channels: Mapping[policy.Channel, Channel], done: Walk, key: str | None
) -> str | None:
    """The idempotency key to remember with the settle: only when every channel that
    took recipients honours it. A message another channel delivered must not make
    a retry look like a replay: the idempotent upstream never saw it taken."""
    if key is None or not done.takers:
        return None
    idempotent = {c.name for c in channels.values() if c.idempotent}
    return key if all(name in idempotent for name in done.takers) else None


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        store: AsyncStore,
        channels: Mapping[policy.Channel, Channel],
    ) -> None:
        self.settings = settings
        self.store = store
        self.channels = channels
        self.worker: queue.QueueWorker | None = None  # woken when a message is queued

    async def _keep(
        self,
        plan: policy.MessagePlan,
        outbound: Outbound,
        reservation: Reservation,
        submitted: Submitted,
        done: Walk | None = None,
    ) -> Reply | None:
        """The message queued (RELAY_QUEUE): `250 ... Queued as`, or None when the queue
        cannot take it (full, or the store failed): answered in session then."""
        attempts = done.attempts if done is not None else ()
        last = done.reply if done is not None else None
        kept = await queue.keep(
            self.settings, self.store, plan, outbound, reservation, submitted, attempts, last
        )
        if not kept:
            return None
        if self.worker is not None and done is None:
            self.worker.wake()
        return replies.queued(submitted.message_id)

    async def forward(
        self,
        plan: policy.MessagePlan,
        outbound: Outbound,
        reservation: Reservation,
        idempotency_key: str | None,
        submitted: Submitted,
        mode: str | None = None,
    ) -> Reply:
        """`mode`: the account's own RELAY_QUEUE (None: the relay's setting)."""
        mode = mode or self.settings.queue
        # A replay reserved nothing: it goes in session, as the upstream's key demands.
        queueing = mode != "off" and not reservation.replay
        if queueing and mode == "always":
            queued = await self._keep(plan, outbound, reservation, submitted)
            if queued is not None:
                return queued
        done = await walk(self.channels, plan.routes, outbound, self.settings.forward_budget)
        if queueing and done.not_taken and not done.accepted and not done.reply.is_permanent:
            # No channel could take it now, and none took any of it: kept and retried.
            # An unknown outcome (a timeout after the request) is not queued: it is
            # answered 451 as without a queue, so nothing is sent twice behind a 250.
            queued = await self._keep(plan, outbound, reservation, submitted, done)
            if queued is not None:
                return queued
        reply, delivery = done.reply, done.delivery
        record = submitted.record(
            reply,
            self.store.now(),
            route=done.route,
            channel=self.channels[done.route.channel].name,
            delivery=delivery,
            duration=done.duration,
            replay=reservation.replay,
            attempts=tuple(done.attempts) if done.failed_over else (),
        )
        # The record goes in the settle's transaction. A replay reserved nothing
        # and its key is recorded already: one write of its own. A settle the
        # store cannot make now is retried in the background (-1 here).
        kept = record if self.settings.log_retention_days else None  # 0: the log is off
        if reservation.replay:
            refund = 0
            if kept is not None:
                await self._record(kept, "replay")
        else:
            refund = await self.store.settle(
                reservation.id,
                len(delivery.accepted),
                remembered_key(self.channels, done, idempotency_key),
                kept,
                reservation.created,
            )
        count(record)
        if log.isEnabledFor(logging.INFO):  # the fields cost a few microseconds
            _log_forward(outbound, done, refund, record, reservation.replay)
        return reply

    async def _record(self, record: DeliveryRecord, what: str) -> None:
        """One delivery-log record in a write of its own (nothing to settle with it)."""
        try:
            await self.store.record_delivery(record)
        except StoreError as exc:
            if not self.store.logged(exc):
                log.warning("could not record %s %s: %s", what, record.message_id, exc)


def _log_forward(
    outbound: Outbound, done: Walk, refund: int, record: DeliveryRecord, replay: bool
) -> None:
    reply, delivery = done.reply, done.delivery
    fields: dict[str, object] = {
        "message_id": record.message_id,
        "from": outbound.sender,
        "rcpts": len(outbound.recipients),
        "channel": record.channel,
        "rule": done.route.rule,
        "reply": f"{reply.code} {reply.enhanced}",
        "upstream_id": delivery.upstream_id or "-",
        "refused": ",".join(f"{r}:{v.code}" for r, v in delivery.refused.items()) or "-",
        "refunded": refund,
        "outcome": str(record.outcome),
        "duration_ms": round(done.duration * 1000),
    }
    tail = ""
    if done.failed_over:
        fields["attempts"] = ",".join(f"{a.channel}:{a.code}" for a in done.attempts)
        tail += f" attempts={fields['attempts']}"
    if replay:
        fields["replay"] = "not-charged"
        tail += " replay=not-charged"
    log.info(
        "message %s from=%s rcpts=%d channel=%s rule=%d reply=%r upstream_id=%s"
        " refused=%s refunded=%d outcome=%s duration_ms=%d%s",
        *(fields[k] for k in list(fields)[:11]),
        tail,
        extra={logs.FIELDS: fields},
    )
