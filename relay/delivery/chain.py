"""Failover: one message down its route chain, within one forward budget.

The plan (`relay.policy.plan_message`) lists every channel the documented
priority allows for the message, in order. The first is tried; the next only
when the failure proves the message was not taken (`DeliveryError.not_taken`,
set by each channel where it knows: no connection, a TLS failure, an SMTP
refusal before the data was accepted, an HTTP answer refusing the request as a
whole). Never after a permanent refusal (the truth the client gets), never when
the outcome is unknown (a timeout after the request or the data went out): a
second channel could deliver a duplicate.

Recipients a channel took stay taken; only the rest go on. What comes back is
the whole walk: each attempt, every recipient taken and by which channel, the
refusals, and the reply the client gets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from relay import logs, metrics, policy, replies
from relay.channels.base import Channel, Delivery, Outbound, delivered_reply
from relay.errors import DeliveryError
from relay.replies import Reply
from relay.store.deliveries import Attempt

log = logging.getLogger("relay.delivery")


@dataclass
class Walk:
    """A message's walk down its chain, as far as it went."""

    route: policy.Route  # the last route tried: the one that delivered, if any did
    reply: Reply = replies.LOCAL_ERROR
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, Reply] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    # The channels that took recipients, in order (for the idempotency rule).
    takers: list[str] = field(default_factory=list)
    upstream_ids: list[str] = field(default_factory=list)
    message_id: str = ""
    timed_out: bool = False
    duration: float = 0.0
    # Recipients left without an answer of their own: the reply applies to them.
    left: tuple[str, ...] = ()
    # Whether the last failure proved the rest was not taken (the queue may retry it).
    not_taken: bool = False

    @property
    def delivery(self) -> Delivery:
        """The walk as one channel's outcome, for the record and the log."""
        return Delivery(
            tuple(self.accepted),
            dict(self.refused),
            ",".join(i for i in self.upstream_ids if i)[:120],
            self.message_id,
        )

    @property
    def failed_over(self) -> bool:
        return len(self.attempts) > 1


async def walk(
    channels: Mapping[policy.Channel, Channel],
    routes: Sequence[policy.Route],
    outbound: Outbound,
    budget: float,
    first: Delivery | DeliveryError | None = None,
) -> Walk:
    """Deliver `outbound` down `routes` within `budget` seconds in all; never raises
    for an upstream's failure (it is in the walk). `first`: the first route's
    outcome when it is known already (the queue's batch send to Resend)."""
    assert routes
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    started = time.perf_counter()
    out = Walk(routes[0])
    left = tuple(outbound.recipients)
    for index, route in enumerate(routes):
        channel = channels[route.channel]
        out.route = route
        # Each channel's own size limit, measured as it sends (policy.upstream_limit).
        message = replace(outbound, recipients=left, size_limit=policy.upstream_limit(route))
        began = time.perf_counter()
        error: DeliveryError | None = None
        try:
            if index == 0 and first is not None:
                if isinstance(first, DeliveryError):
                    raise first
                delivery = first
            else:
                async with asyncio.timeout_at(deadline):
                    delivery = await channel.deliver(message)
        except DeliveryError as exc:
            error = exc
        except TimeoutError:
            out.timed_out = True
            error = DeliveryError(
                channel.name, replies.upstream_unavailable(channel.name, "upstream timed out")
            )
        except Exception as exc:
            log.exception("channel %s failed unexpectedly", channel.name)
            error = DeliveryError(channel.name, replies.LOCAL_ERROR)
            error.__cause__ = exc
        seconds = time.perf_counter() - began
        metrics.forwarded(channel.name, seconds)
        if error is None:
            out.accepted += delivery.accepted
            out.refused.update(delivery.refused)
            out.takers.append(channel.name)
            out.upstream_ids.append(delivery.upstream_id)
            out.message_id = out.message_id or delivery.message_id
            done = delivered_reply(
                outbound, Delivery(tuple(out.accepted), message_id=out.message_id)
            )
            out.attempts.append(_attempt(channel.name, done, seconds, len(delivery.accepted)))
            metrics.delivery_attempt(channel.name, "delivered")
            out.reply, out.left, out.not_taken = done, (), False
            break
        taken = tuple(r for r in error.taken if r in left)
        if taken:
            out.accepted += taken
            out.takers.append(channel.name)
            left = tuple(r for r in left if r not in taken)
        out.attempts.append(_attempt(channel.name, error.reply, seconds, len(taken)))
        kind = metrics.upstream_error_kind(error.reply, timed_out=out.timed_out)
        metrics.upstream_error(channel.name, kind)
        out.reply, out.left, out.not_taken = error.reply, left, error.not_taken
        following = routes[index + 1] if index + 1 < len(routes) else None
        if not error.not_taken or following is None:
            # The upstream's own answer for recipients it refused for good: those
            # are done (and a mailbox refusal suppresses its address, store/outbox).
            gone = {r: v for r, v in error.refused.items() if r in left and v.is_permanent}
            if gone:
                out.refused.update(gone)
                out.left = tuple(r for r in left if r not in gone)
            result = (
                "not_taken"
                if error.not_taken
                else ("refused" if error.reply.is_permanent else "deferred")
            )
            metrics.delivery_attempt(channel.name, result)
            break
        metrics.delivery_attempt(channel.name, "not_taken")
        nxt = channels[following.channel].name
        metrics.failover(channel.name, nxt)
        log.info(
            "message %s: %s did not take it (%s %s); trying %s",
            outbound.message_id,
            channel.name,
            error.reply.code,
            error.reply.enhanced,
            nxt,
            extra={
                logs.FIELDS: {
                    "message_id": outbound.message_id,
                    "failover": f"{channel.name}>{nxt}",
                }
            },
        )
    if out.left and out.accepted and out.reply.is_permanent:
        # Some recipients taken, the rest refused for good: delivered to those
        # taken, the others refused (`partial_delivery`'s rule, across channels).
        out.refused.update(dict.fromkeys(out.left, out.reply))
        out.reply = delivered_reply(
            outbound, Delivery(tuple(out.accepted), message_id=out.message_id)
        )
        out.left = ()
    elif out.left and out.accepted:
        # Some taken, the rest deferred: the deferral decides for the whole
        # message, as in `partial_delivery`. Only an idempotent channel names
        # recipients taken before a failure (Resend, one request per
        # recipient), so the client's retry sends those copies once.
        out.left = tuple(outbound.recipients)
        out.accepted, out.takers = [], []
    out.duration = time.perf_counter() - started
    return out


def _attempt(channel: str, reply: Reply, seconds: float, accepted: int) -> Attempt:
    return Attempt(channel, reply.code, reply.enhanced, reply.text, seconds, accepted)
