"""A message at the end of DATA, as its delivery record names it."""

from __future__ import annotations

from dataclasses import dataclass

from relay import metrics, policy
from relay.channels.base import Delivery
from relay.replies import Reply
from relay.store.deliveries import (
    Attempt,
    DeliveryRecord,
    outcome_of,
    recipient_outcomes,
)
from relay.store.facade import Principal


@dataclass(frozen=True, slots=True)
class Submitted:
    """A message at the end of DATA: who sent it to whom, as its delivery record names them."""

    principal: Principal
    client: str  # the client's address
    sender: str  # normalized
    recipients: tuple[str, ...]  # as written: the keys of a channel's outcome
    keys: tuple[str, ...]  # normalized, as recorded
    size: int
    message_id: str
    listener: str = "smtps"  # the port it came in on (RelaySession.listener)

    def record(
        self,
        reply: Reply,
        when: int,
        *,
        route: policy.Route | None = None,
        channel: str = "",
        delivery: Delivery | None = None,
        duration: float = 0.0,
        replay: bool = False,
        keep_recipients: int | None = None,
        attempts: tuple[Attempt, ...] = (),
    ) -> DeliveryRecord:
        """The delivery-log record of this message, answered `reply`; with
        `keep_recipients`, only the first that many recipients, and their count."""
        delivery = delivery or Delivery(accepted=())
        outcomes = recipient_outcomes(
            self.recipients, self.keys, delivery.accepted, delivery.refused, reply
        )
        return DeliveryRecord(
            time=when,
            message_id=delivery.message_id or self.message_id,
            account=self.principal.account,
            token_id=self.principal.token_id,
            sender=self.sender,
            recipients=outcomes[:keep_recipients],
            size=self.size,
            channel=channel,
            rule=route.rule if route else None,
            outcome=outcome_of(reply, len(delivery.refused)),
            reply=reply,
            upstream_id=delivery.upstream_id,
            duration=duration,
            client=self.client,
            listener=self.listener,
            replay=replay,
            recipient_count=len(outcomes),
            attempts=attempts,
        )


def count(record: DeliveryRecord) -> None:
    """The message and its recipients in the metrics, by channel and outcome."""
    counts: dict[str, int] = {}
    for rcpt in record.recipients:
        counts[rcpt.outcome] = counts.get(rcpt.outcome, 0) + 1
    metrics.message(record.channel or "none", record.outcome, record.size, counts, record.listener)
