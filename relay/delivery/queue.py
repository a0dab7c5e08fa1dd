"""The durable queue's two halves on the relay: keeping a message, and delivering it later.

`keep` is called by the forward (RELAY_QUEUE on-failure: after a walk no channel
could take the message for a transient reason; always: right after the charge):
the message, its envelope, its route and its reservation are committed to disk
together (relay.store.queue) before the 250 is written.

`QueueWorker` claims due messages with a lease, walks their route chain again
(an outage of one channel is routed around), and ends each: delivered (settled,
charged for what was delivered), refused for good, or failed at
RELAY_QUEUE_MAX_AGE (the undelivered part refunded); every end has its final
record with every attempt. Otherwise the message waits: exponential backoff
from RELAY_QUEUE_BACKOFF, doubling to an hour, with jitter, or the upstream's
Retry-After when longer.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from relay import policy, replies
from relay.channels import resend_batch
from relay.channels.base import Channel, Delivery, Outbound
from relay.channels.resend import ResendChannel
from relay.config import QUEUE_BACKOFF_CAP, Settings
from relay.delivery.chain import walk
from relay.delivery.ends import Ends
from relay.delivery.submitted import Submitted, count
from relay.errors import DeliveryError, StoreError, TransientDelivery
from relay.replies import Reply
from relay.store.deliveries import Attempt, DeliveryRecord, attempts_text
from relay.store.facade import Principal, Reservation
from relay.store.loop import AsyncStore
from relay.store.queue import End, QueuedMessage

log = logging.getLogger("relay.queue")
# Messages one claim leases (as many as one Resend batch request carries:
# resend-openapi, /emails/batch); how often an idle worker looks for due ones.
CLAIM_BATCH = 100
POLL_SECONDS = 1.0
# After a claim that took fewer than CLAIM_BATCH, how long the next one waits for more.
CLAIM_GATHER = 0.05
# Claims whose messages are in flight at once (`QueueWorker._run`).
ROUNDS_IN_FLIGHT = 4
# The content those may hold together (one claim is always taken, whatever its size).
ROUNDS_BYTES = 16 * 1024 * 1024
# A final write the store refused is tried again after this long, doubling to the max.
FINISH_RETRY_FIRST = 0.5
FINISH_RETRY_MAX = 30.0
_RETRY_AFTER = re.compile(r"retry after (\d+) s")


def backoff(settings: Settings, tries: int, reply: Reply | None = None) -> float:
    """Seconds before the next attempt: RELAY_QUEUE_BACKOFF doubling per try to an hour,
    within ±20% (so messages queued together do not retry together), never sooner
    than the upstream's Retry-After."""
    base = min(settings.queue_backoff * 2 ** max(tries - 1, 0), QUEUE_BACKOFF_CAP)
    delay: float = base * random.uniform(0.8, 1.2)
    if reply is not None and (m := _RETRY_AFTER.search(reply.text)):
        delay = max(delay, float(m.group(1)))
    return delay


async def keep(
    settings: Settings,
    store: AsyncStore,
    plan: policy.MessagePlan,
    outbound: Outbound,
    reservation: Reservation,
    submitted: Submitted,
    attempts: Sequence[Attempt] = (),
    last: Reply | None = None,
) -> bool:
    """Commit the message to the queue, durably; False when the queue is full (or the
    store failed): the caller answers in session as it would without a queue."""
    message = QueuedMessage(
        submitted.message_id,
        submitted.principal.account,
        submitted.principal.account_id,
        submitted.principal.token_id,
        submitted.client,
        submitted.sender,
        outbound.sender,
        tuple(zip(submitted.recipients, submitted.keys, strict=True)),
        outbound.content,
        submitted.size,
        outbound.idempotency_key,
        tuple((str(r.channel), r.charges, r.rule) for r in plan.routes),
        reservation.id,
        reservation.created,
        submitted.listener,
        events=bool(settings.log_retention_days),
    )
    now = store.now()
    delay = 0 if not attempts else backoff(settings, 1, last)
    try:
        queued = await store.enqueue(
            message,
            next_try=int(now + delay),
            attempts=attempts_text(attempts, keep_one=True) or "[]",
            last_code=last.code if last else None,
            last_text=last.text if last else "",
            max_messages=settings.queue_max_messages,
            max_bytes=settings.queue_max_bytes,
        )
    except StoreError as exc:
        if not store.logged(exc):
            log.warning("could not queue %s: %s", submitted.message_id, exc)
        return False
    if queued is None:
        log.warning("queue full: %s answered in session", submitted.message_id)
        return False
    log.info("message %s queued as %d", submitted.message_id, queued)
    return True


async def _ended(task: asyncio.Task[None]) -> None:
    """Wait for a round; one that failed unexpectedly is logged, its leases run out."""
    try:
        await task
    except Exception:
        log.exception("queue: a round failed unexpectedly")


def _outbound(row: Any) -> Outbound:
    """A claimed row's message, to the recipients not done yet."""
    done = json.loads(row["done"])
    left = tuple(str(w) for w, _ in json.loads(row["recipients"]) if w not in done)
    return Outbound(
        row["envelope_from"], left, bytes(row["content"]), row["message_id"], row["idempotency_key"]
    )


class QueueWorker:
    """Delivers the queue's due messages, one attempt each per claim."""

    def __init__(
        self, settings: Settings, store: AsyncStore, channels: Mapping[policy.Channel, Channel]
    ) -> None:
        self.settings = settings
        self.store = store
        self.channels = channels
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Messages' ends, written a group at a time.
        self._ends = Ends(store, 2 * CLAIM_BATCH)
        # A lease outlives one attempt's forward budget with room to spare.
        self.lease_seconds = int(settings.forward_budget * 2 + 30)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="relay-queue")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """End the attempts in flight within the drain timeout, and give back every lease."""
        if self._task is not None:
            self._task.cancel()
            try:
                await asyncio.wait_for(self._task, self.settings.drain_timeout)
            except (asyncio.CancelledError, TimeoutError):
                pass
            self._task = None
        try:
            async with asyncio.timeout(self.settings.drain_timeout):
                await self._ends.flush()
        except TimeoutError:
            log.warning("queue: ends not written within the drain timeout (leases run out)")
        try:
            await self.store.release_leases()
        except StoreError as exc:
            log.warning("could not release the queue's leases: %s (they run out)", exc)

    async def _run(self) -> None:
        # Claim at once when this process queued a message (woken) or the last claim
        # found work; otherwise a read first: an idle queue costs each process one
        # cheap read a second, never a write transaction (the claim's UPDATE takes
        # the database's write lock, even when it matches nothing).
        #
        # Claims overlap: the next ones are claimed, and their Resend batches kept
        # and sent, while the older ones' messages end (a batch's request waits
        # for Resend's pace, its messages' translation and ends need the CPU).
        # At most ROUNDS_IN_FLIGHT, and another only while those hold less than
        # ROUNDS_BYTES of content (one always). Once that many are out, nothing
        # more is claimed before the oldest ended, so an end the store keeps
        # refusing (`_finish`) stops the claims after the few made right after
        # its own: none of its messages is attempted again meanwhile.
        look = gather = False
        dead_after = self.settings.upkeep.owner_dead_after
        rounds: collections.deque[tuple[asyncio.Task[None], int]] = collections.deque()
        try:
            while True:
                if len(rounds) >= ROUNDS_IN_FLIGHT or sum(n for _, n in rounds) >= ROUNDS_BYTES:
                    await _ended(rounds.popleft()[0])
                elif gather:
                    # The last claim took every due message: the next one waits for
                    # a few more, so messages queued one by one (sessions at full
                    # speed) cost a claim and a transaction of ends per handful,
                    # not per message, and leave the write lock to the sessions.
                    await asyncio.sleep(CLAIM_GATHER)
                rows = []
                try:
                    if not look or await self.store.queue_due(dead_after):
                        rows = await self.store.claim(self.lease_seconds, CLAIM_BATCH, dead_after)
                except StoreError as exc:
                    if not self.store.logged(exc):
                        log.warning("queue claim failed: %s", exc)
                gather = 0 < len(rows) < CLAIM_BATCH
                if rows:
                    task = asyncio.get_running_loop().create_task(self._round(rows))
                    rounds.append((task, sum(len(row["content"]) for row in rows)))
                    look = False
                    continue
                if rounds:
                    await _ended(rounds.popleft()[0])  # it may leave more due: claim again
                    look = False
                    continue
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                    look = False
                except TimeoutError:
                    look = True
        finally:
            for task, _ in rounds:
                task.cancel()
            if rounds:
                await asyncio.gather(*(task for task, _ in rounds), return_exceptions=True)

    async def _round(self, rows: Sequence[Any]) -> None:
        """One claim's messages: their Resend batches first, then each one's walk."""
        firsts, answered = await self._batched(rows)
        await asyncio.gather(
            *(self._attempt(row, first) for row, first in zip(rows, firsts, strict=True))
        )
        await self._forget_batches(answered)

    async def _batched(
        self, rows: Sequence[Any]
    ) -> tuple[list[Delivery | DeliveryError | None], set[str]]:
        """The first channel's outcome for each row whose route starts at Resend, sent
        together through its batch endpoint (relay.channels.resend_batch); None
        for a row that goes the usual way. A batch whose answer is not known (the
        relay stopped, or the answer was lost) is sent again as it was kept.
        And the keys of the batches answered, forgotten once their members ended."""
        firsts: list[Delivery | DeliveryError | None] = [None] * len(rows)
        answered: set[str] = set()
        resend = next((c for c in self.channels.values() if isinstance(c, ResendChannel)), None)
        if resend is None:
            return firsts, answered
        kept: dict[str, list[int]] = {}
        picked = []
        for index, row in enumerate(rows):
            if row["batch_key"]:
                kept.setdefault(row["batch_key"], []).append(index)
                continue
            routes = json.loads(row["routes"])
            if routes and isinstance(
                self.channels.get(policy.Channel(routes[0][0])), ResendChannel
            ):
                picked.append(index)
        bound = [i for indexes in kept.values() for i in indexes]  # never sent alone
        try:
            for key, indexes in kept.items():
                if not await self._resend_kept(resend, key, rows, indexes, firsts, answered):
                    bound = [i for i in bound if i not in indexes]
            outbounds = [_outbound(rows[i]) for i in picked]
            # The translation of a hundred messages takes a while: off the loop, so
            # the requests of the rounds before go out on time meanwhile.
            batches = await asyncio.to_thread(resend_batch.form_batches, resend, outbounds)
            for batch in batches:
                indexes = [picked[m] for m in batch.members]
                ids = [int(rows[i]["id"]) for i in indexes]
                # Kept on disk before the request goes out (see `_resend_kept`).
                if not await self.store.mark_batch(batch.key, batch.domain, ids, batch.body):
                    continue  # a lease lost meanwhile: these go singly, if still ours
                bound += indexes
                members = [outbounds[m] for m in batch.members]
                results = await resend_batch.send_batch(resend, batch, members)
                await self._answered(batch.key, ids, results, indexes, firsts, answered)
        except StoreError as exc:
            if not self.store.logged(exc):
                log.warning("queue: a Resend batch could not be kept: %s", exc)
        except Exception:
            log.exception("queue: Resend batch failed unexpectedly")
        # A message in a kept batch with no answer from it waits (its batch is sent
        # again later): sent alone, under its own key, it could go out twice.
        for index in bound:
            if firsts[index] is None:
                firsts[index] = TransientDelivery(ResendChannel.name, replies.LOCAL_ERROR)
        return firsts, answered

    async def _resend_kept(
        self,
        resend: ResendChannel,
        key: str,
        rows: Sequence[Any],
        indexes: list[int],
        firsts: list[Delivery | DeliveryError | None],
        answered: set[str],
    ) -> bool:
        """Send a kept batch again, exactly as it was; each member still queued gets its
        outcome from the answer (Resend's first answer, when it had one). False when
        the batch was forgotten meanwhile: its members go on as any message."""
        batch = await self.store.queue_batch(key)
        by_id = {int(rows[i]["id"]): i for i in indexes}
        if batch is None:
            await self.store.end_batch(key, list(by_id))
            return False
        members = [by_id.get(queue_id) for queue_id in batch.members]
        outbounds = [_outbound(rows[i]) if i is not None else None for i in members]
        kept = resend_batch.Batch(batch.key, batch.domain, batch.members, batch.body)
        results = await resend_batch.send_batch(resend, kept, outbounds)
        present = [(i, r) for i, r in zip(members, results, strict=True) if i is not None]
        await self._answered(
            key, list(by_id), [r for _, r in present], [i for i, _ in present], firsts, answered
        )
        return True

    async def _answered(
        self,
        key: str,
        ids: list[int],
        results: Sequence[Delivery | DeliveryError],
        indexes: list[int],
        firsts: list[Delivery | DeliveryError | None],
        answered: set[str],
    ) -> None:
        """Each member's first outcome from its batch's answer. A batch refused as a
        whole, provably unsent, is forgotten before its members walk on (another
        channel may deliver them); if that cannot be written they wait, still in it.
        Any other answer keeps the batch until its members ended
        (`_forget_batches`): an answer Resend gave is the one it gives again."""
        if any(isinstance(r, DeliveryError) and r.not_taken for r in results):
            try:
                await self.store.end_batch(key, ids)
            except StoreError:
                wait = TransientDelivery(ResendChannel.name, replies.LOCAL_ERROR)
                results = [wait] * len(results)
        elif resend_batch.known(results):
            answered.add(key)
        for index, result in zip(indexes, results, strict=True):
            firsts[index] = result

    async def _forget_batches(self, answered: set[str]) -> None:
        """Forget each batch answered this round once its members ended; a member still
        queued (its end could not be written) keeps it: the same batch is sent
        again, and Resend gives the same answer."""
        for key in answered:
            try:
                await self.store.end_batch(key)
            except StoreError as exc:
                if not self.store.logged(exc):
                    log.warning("queue: could not forget Resend batch %s: %s", key, exc)

    async def _attempt(self, row: Any, first: Delivery | DeliveryError | None = None) -> None:
        try:
            await self._deliver(row, first)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease runs out and the message is tried again.
            log.exception("queued message %s: attempt failed unexpectedly", row["message_id"])

    async def _deliver(self, row: Any, first: Delivery | DeliveryError | None = None) -> None:
        pairs = [(str(w), str(k)) for w, k in json.loads(row["recipients"])]
        done: dict[str, list[Any]] = json.loads(row["done"])
        attempts = [Attempt(*a) for a in json.loads(row["attempts"])]
        left = tuple(w for w, _ in pairs if w not in done)
        routes = tuple(
            policy.Route(policy.Channel(c), bool(ch), int(rule))
            for c, ch, rule in json.loads(row["routes"])
        )
        outbound = _outbound(row)
        result = await walk(self.channels, routes, outbound, self.settings.forward_budget, first)
        attempts += result.attempts
        for rcpt in result.accepted:
            done[rcpt] = [250, "2.0.0", "Ok"]
        for rcpt, why in result.refused.items():
            done[rcpt] = [why.code, why.enhanced, why.text]
        reply = result.reply
        rest = tuple(w for w in left if w not in done)
        if rest and reply.is_permanent:
            for rcpt in rest:
                done[rcpt] = [reply.code, reply.enhanced, reply.text]
            rest = ()
        now = self.store.now()
        if rest and now - int(row["created"]) < self.settings.queue_max_age:
            delay = backoff(self.settings, int(row["tries"]) + 1, reply)
            await self.store.requeue(
                row["id"],
                done=json.dumps(done),
                attempts=attempts_text(attempts, keep_one=True) or "[]",
                next_try=int(now + delay),
                last_code=reply.code,
                last_text=reply.text,
                events=bool(self.settings.log_retention_days),
            )
            log.info(
                "queued message %s: %s; next attempt in %.0f s", row["message_id"], reply, delay
            )
            return
        if rest:
            expired = replies.QUEUE_EXPIRED.but(
                f"Delivery time expired after {now - int(row['created'])} s; last: {reply}"
            )
            for rcpt in rest:
                done[rcpt] = [expired.code, expired.enhanced, expired.text]
        await self._end(
            row,
            pairs,
            done,
            attempts,
            result.route,
            takers=result.takers,
            upstream_id=result.delivery.upstream_id,
        )

    async def _end(
        self,
        row: Any,
        pairs: list[tuple[str, str]],
        done: dict[str, list[Any]],
        attempts: list[Attempt],
        route: policy.Route,
        takers: Sequence[str],
        upstream_id: str = "",
    ) -> None:
        accepted = tuple(w for w, _ in pairs if done.get(w, [0])[0] == 250)
        refused = {
            w: Reply(int(v[0]), str(v[1]), str(v[2])) for w, v in done.items() if int(v[0]) >= 400
        }
        # The provider's id for it (the last attempt's): its later events find the record.
        delivery = Delivery(accepted, refused, upstream_id)
        if accepted:
            reply = replies.delivered(row["message_id"])
        else:
            reply = next(iter(refused.values()), replies.LOCAL_ERROR)
        submitted = Submitted(
            Principal(row["token_id"], int(row["account_id"]), row["account"], ""),
            row["client"],
            row["sender"],
            tuple(w for w, _ in pairs),
            tuple(k for _, k in pairs),
            int(row["size"]),
            row["message_id"],
            row["listener"],
        )
        record = submitted.record(
            reply,
            self.store.now(),
            route=route,
            channel=self.channels[route.channel].name,
            delivery=delivery,
            duration=sum(a.duration for a in attempts),
            attempts=tuple(attempts),
        )
        idempotent = {c.name for c in self.channels.values() if c.idempotent}
        key = row["idempotency_key"] if takers and all(t in idempotent for t in takers) else None
        kept = record if self.settings.log_retention_days else None
        refund = await self._finish(row, len(accepted), key, kept)
        count(record)
        log.info(
            "queued message %s ended: %s delivered=%d refunded=%s attempts=%d",
            row["message_id"],
            record.outcome,
            len(accepted),
            refund,
            len(attempts),
        )

    async def _finish(
        self, row: Any, delivered: int, key: str | None, record: DeliveryRecord | None
    ) -> int | None:
        """The message's end, written: tried again until the store takes it (the worker
        claims nothing meanwhile, so nothing here attempts the message again).
        Never another attempt for a message already delivered: an SMTP upstream
        has no idempotency key, the copy would be a duplicate. Only a relay that
        stops (or dies) first leaves it to the next attempt."""
        wait = FINISH_RETRY_FIRST
        while True:
            try:
                return await self._ends.write(End(int(row["id"]), delivered, key, record))
            except StoreError as exc:
                if not self.store.logged(exc):
                    log.warning(
                        "queued message %s: its end could not be written (%s);"
                        " trying again in %.1f s",
                        row["message_id"],
                        exc,
                        wait,
                    )
            await asyncio.sleep(wait)
            wait = min(wait * 2, FINISH_RETRY_MAX)
