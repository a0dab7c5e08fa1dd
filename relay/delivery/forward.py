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

from relay import logs, metrics, policy
from relay.channels.base import Channel, Outbound
from relay.config import Settings
from relay.delivery.chain import Walk, walk
from relay.delivery.submitted import Submitted
from relay.errors import StoreError
from relay.replies import Reply
from relay.store.deliveries import DeliveryRecord
from relay.store.facade import Reservation
from relay.store.loop import AsyncStore

log = logging.getLogger("relay.session")


def count(record: DeliveryRecord) -> None:
    """The message and its recipients in the metrics, by channel and outcome."""
    counts: dict[str, int] = {}
    for rcpt in record.recipients:
        counts[rcpt.outcome] = counts.get(rcpt.outcome, 0) + 1
    metrics.message(record.channel or "none", record.outcome, record.size, counts)


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

    async def forward(
        self,
        plan: policy.MessagePlan,
        outbound: Outbound,
        reservation: Reservation,
        idempotency_key: str | None,
        submitted: Submitted,
    ) -> Reply:
        done = await walk(self.channels, plan.routes, outbound, self.settings.forward_budget)
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
