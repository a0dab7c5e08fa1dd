"""The background task that sends the webhook outbox (relay.store.outbox).

Each due event is claimed for a lease (so relays and workers sharing a
database do not send it twice at once; one that dies mid-send leaves it to be
sent again when the lease ends: at least once), signed (relay.events.signing),
and POSTed to the address its endpoint resolves to now (relay.events.urls),
with no redirect followed and a 10 s bound. A 2xx delivers it; anything else
is retried after RELAY_WEBHOOK_BACKOFF seconds, doubling to an hour, until 24
hours after the event; then it is failed. Every attempt is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

import httpx

from relay.errors import Invalid, StoreError
from relay.events import signing, urls
from relay.store.loop import AsyncStore
from relay.store.outbox import ANSWER_KEPT, DueEvent

log = logging.getLogger("relay.webhooks")

TIMEOUT = 10.0  # seconds for one attempt, connection to answer
MAX_DELAY = 3600  # a retry waits at most an hour
RETRY_FOR = 24 * 3600  # then the event is failed
TICK = 1.0  # seconds between looks at the outbox when it is empty
BATCH = 50  # events claimed at once


def next_attempt(event: DueEvent, now: int, backoff: float) -> int | None:
    """When to try a failed event again, or None when its 24 hours are over.

    >>> e = DueEvent(1, "evt", "wh", "u", "s", "t", "{}", attempts=0, created=1000)
    >>> late = DueEvent(1, "evt", "wh", "u", "s", "t", "{}", attempts=7, created=1000)
    >>> next_attempt(e, 1000, 30), next_attempt(late, 1000, 30), next_attempt(late, 90000, 30)
    (1030, 4600, None)
    """
    delay = min(backoff * 2**event.attempts, MAX_DELAY)
    when = now + max(1, round(delay))
    return when if when <= event.created + RETRY_FOR else None


def pinned(target: urls.Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL with its host replaced by the checked address, the Host header, and
    the TLS server name: the request cannot go where a second lookup would send it."""
    parts = httpx.URL(target.url)
    host = f"[{target.address}]" if ":" in target.address else target.address
    url = str(parts.copy_with(host=host.strip("[]"), port=target.port))
    default = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default else f"{target.host}:{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return url, {"host": host_header}, extensions


class WebhookSender:
    def __init__(self, store: AsyncStore, *, backoff: float, allow_private: bool) -> None:
        self.store = store
        self.backoff = backoff
        self.allow_private = allow_private
        # No redirects: a 3xx is an answer (a failure), never a second request
        # to a place no one checked.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(TIMEOUT),
            follow_redirects=False,
            headers={"User-Agent": "relay-webhooks"},
            trust_env=False,
        )

    async def run_forever(self) -> None:
        while True:
            try:
                sent = await self.tick()
            except StoreError as exc:
                log.warning("webhook outbox not readable: %s", exc)
                sent = 0
            if not sent:
                await asyncio.sleep(TICK)

    async def tick(self) -> int:
        """Claim and send the due events; how many were attempted."""
        due = await self.store.due_webhook_events(BATCH)
        if due:
            due = await self.store.claim_webhook_events(due)
        await asyncio.gather(*(self.send(event) for event in due))
        return len(due)

    async def send(self, event: DueEvent) -> None:
        started = time.perf_counter()
        status: int | None = None
        try:
            target = await urls.resolve(event.url, allow_private=self.allow_private)
            url, host, extensions = pinned(target)
            body = event.payload.encode("utf-8")
            headers = {**signing.headers(event.secret, event.event_id, int(time.time()), body)}
            request = self._client.build_request(
                "POST", url, content=body, headers={**headers, **host}, extensions=extensions
            )
            response = await self._client.send(request, stream=True)
            try:
                status = response.status_code
                answer = await _first_bytes(response)
            finally:
                await response.aclose()
        except Invalid as exc:
            answer = str(exc)
        except httpx.TimeoutException:
            answer = f"timed out after {TIMEOUT:g} s"
        except httpx.HTTPError as exc:
            answer = f"no answer ({type(exc).__name__})"
        duration = round((time.perf_counter() - started) * 1000)
        ok = status is not None and 200 <= status < 300
        now = int(time.time())
        retry = None if ok else next_attempt(event, now, self.backoff)
        disabled = await self.store.record_webhook_attempt(
            event.id,
            event.endpoint_id,
            status=status,
            duration_ms=duration,
            answer=answer,
            next_attempt=retry,
        )
        if ok:
            log.info(
                "webhook %s %s to %s: %d", event.type, event.event_id, event.endpoint_id, status
            )
        else:
            log.warning(
                "webhook %s %s to %s failed (%s): %s",
                event.type,
                event.event_id,
                event.endpoint_id,
                status if status is not None else "no answer",
                "retrying" if retry is not None else "given up after 24 h",
            )
        if disabled:
            log.warning("webhook endpoint %s disabled: failing for 3 days", event.endpoint_id)

    async def aclose(self) -> None:
        with suppress(Exception):
            await self._client.aclose()


async def _first_bytes(response: httpx.Response) -> str:
    """The first ANSWER_KEPT bytes of the answer, read no further."""
    kept = b""
    async for chunk in response.aiter_raw():
        kept += chunk
        if len(kept) >= ANSWER_KEPT:
            break
    return kept[:ANSWER_KEPT].decode("utf-8", "replace")
