"""Resend's batch sending: many queued messages in one `POST /emails/batch`.

Resend allows 5 requests a second per team (resend.com/docs/api-reference/rate-limit);
`POST /emails/batch` carries up to 100 emails a request (resend-openapi resend.yaml,
`emails/send-batch`: an array of SendEmailRequest, answered CreateBatchEmailsResponse
`{"data": [{"id"}]}`), so the same 5 requests carry up to 500 messages. A batch
takes no attachments and no `scheduled_at` (resend.com/docs/api-reference/emails/
send-batch-emails): such a message, and a Bcc-only message with several recipients
(sent one request per recipient so none sees the others), goes singly.

The relay asks for `x-batch-validation: permissive` (resend.com/changelog/
batch-validation-modes): the valid emails are sent and each invalid one is named
in `errors` by its index, so a refusal refuses only that message; `data` lists
the ids of the emails sent, in order. One Idempotency-Key per batch: Resend keeps
a key 24 hours, answers the same key and the same body with its first answer and
sends nothing, refuses the same key with another body (409
`invalid_idempotent_request`) and a key whose request is still in progress (409
`concurrent_idempotent_requests`) (resend.com/docs/dashboard/emails/
idempotency-keys). So a batch is formed once (`form_batches`), kept by the
caller before it is sent, and after a crash sent again as it was (`send_batch`):
same members, same order, same body, same key. An answer refusing the whole
request (a 429, a 5xx, a rejected key) is each message's answer.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from relay import replies
from relay.channels import pacing
from relay.channels.base import Delivery, Outbound
from relay.channels.resend import (
    IDEMPOTENCY_PREFIX,
    NAME,
    ResendChannel,
    _translate,
    outcome,
)
from relay.errors import DeliveryError, PermanentDelivery, TransientDelivery
from relay.message import domain_of
from relay.replies import one_line

log = logging.getLogger("relay.resend")

# resend-openapi resend.yaml, /emails/batch: "Trigger up to 100 batch emails at once."
MAX_BATCH = 100
VALIDATION = {"x-batch-validation": "permissive"}

Result = Delivery | DeliveryError


def batch_body(channel: ResendChannel, message: Outbound) -> tuple[str, dict[str, Any]] | None:
    """The message's batch item and the API token it goes with, or None when it must
    go singly (attachments, a Bcc-only split, no token, MIME the translation refuses)."""
    token = channel.config.token_for(domain_of(message.sender))
    if not token:
        return None
    try:
        body, hidden = _translate(message)
    except Exception:
        return None  # the single send answers it, with its reason
    if body.get("attachments") or body.get("scheduled_at") or (hidden and len(body["to"]) > 1):
        return None
    return token, body


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch request, formed before it is sent: the caller keeps it (its key, its
    members in order, its body) so a retry after a crash sends exactly it again."""

    key: str
    domain: str  # the senders' domain: which API token sends it
    members: list[int]  # indexes into the messages it was formed from, in order
    body: str  # the JSON request body


def form_batches(channel: ResendChannel, messages: Sequence[Outbound]) -> list[Batch]:
    """The batches `messages` go out in: by API token, up to MAX_BATCH each, of at least
    two (one message goes singly, with its own key). The messages left out go
    singly (`batch_body`). Each batch has a fresh key: a batch is never formed
    twice, it is kept and sent again as it was."""
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for index, message in enumerate(messages):
        item = batch_body(channel, message)
        if item is not None:
            groups.setdefault(item[0], []).append((index, item[1]))
    batches = []
    for items in groups.values():
        for start in range(0, len(items), MAX_BATCH):
            chunk = items[start : start + MAX_BATCH]
            if len(chunk) < 2:
                continue
            batches.append(
                Batch(
                    f"{IDEMPOTENCY_PREFIX}batch-{secrets.token_hex(20)}",
                    domain_of(messages[chunk[0][0]].sender),
                    [i for i, _ in chunk],
                    json.dumps([body for _, body in chunk], ensure_ascii=False),
                )
            )
    return batches


def known(results: Sequence[Result | None]) -> bool:
    """Whether a batch's answer is known: Resend answered it (each email sent or
    refused), or refused the request as a whole in a way that proves nothing was
    sent. Otherwise (a timeout, `concurrent_idempotent_requests`, an answer that
    does not add up) only the same request under the same key may follow."""
    return all(
        not isinstance(r, DeliveryError) or r.not_taken or r.reply.is_permanent for r in results
    )


async def send_batch(
    channel: ResendChannel, batch: Batch, messages: Sequence[Outbound | None]
) -> list[Result]:
    """Send `batch` (again, after a crash: the same body under the same key, so Resend
    answers as it did and sends nothing twice); per member, in order, its Delivery
    or DeliveryError. `messages[i]`: member i, or None when it ended already."""
    token = channel.config.token_for(batch.domain)
    label = f"a batch of {len(batch.members)}"
    if not token:
        reply = replies.upstream_unavailable(NAME, f"no API token for {batch.domain}")
        return [TransientDelivery(NAME, reply, not_taken=True)] * len(messages)
    deadline = pacing.Deadline(channel.budget, channel.timeout)
    started = time.perf_counter()
    try:
        answer = await channel.request(
            channel.url + "/batch",
            json.loads(batch.body),
            batch.key,
            batch.domain,
            token,
            deadline,
            label,
            VALIDATION,
        )
    except DeliveryError as exc:
        return [exc] * len(messages)
    log.info("resend: %s sent in %.3f s", label, time.perf_counter() - started)
    return _answers(answer, messages, label)


def _answers(answer: Any, messages: Sequence[Outbound | None], label: str) -> list[Result]:
    """Each member's outcome in a batch's 200 answer."""
    data = answer.get("data") if isinstance(answer, dict) else None
    errors = answer.get("errors") if isinstance(answer, dict) else None
    refused: dict[int, str] = {}
    for error in errors if isinstance(errors, list) else []:
        if isinstance(error, dict) and isinstance(error.get("index"), int):
            refused[error["index"]] = str(error.get("message") or "")
    ids = [
        str(d.get("id")) for d in (data if isinstance(data, list) else []) if isinstance(d, dict)
    ]
    if len(ids) != len(messages) - len(refused):
        # An answer that does not add up: Resend may have sent any of them, so no
        # message is refused for good (a 4xx, retried under the same key).
        reply = replies.upstream_unavailable(NAME, "unexpected batch answer")
        log.warning("resend: %s: %d ids for %d emails", label, len(ids), len(messages))
        return [TransientDelivery(NAME, reply) for _ in messages]
    out: list[Result] = []
    sent = iter(ids)
    for index, message in enumerate(messages):
        if index in refused:
            # The per-email validation error, read as the same error of a single send.
            body = {"statusCode": 422, "name": "validation_error", "message": refused[index]}
            reply = outcome(422, body, None)
            log.warning("resend refused %s in a batch: %s", message and message.message_id, reply)
            out.append(PermanentDelivery(NAME, reply))
        else:
            upstream_id = one_line(next(sent), 120)
            recipients = message.recipients if message is not None else ()
            out.append(Delivery(accepted=recipients, upstream_id=upstream_id))
    return out
