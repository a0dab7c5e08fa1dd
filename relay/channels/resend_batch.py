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
the ids of the emails sent, in order. One Idempotency-Key per batch, derived
from its messages' own keys: a batch formed again of the same messages (a retry
after a lost answer) is the same request to Resend, which sends nothing twice.
An answer refusing the whole request (a 429, a 5xx, a rejected key) is each
message's answer.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
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


async def deliver_batch(
    channel: ResendChannel, messages: Sequence[Outbound]
) -> list[Result | None]:
    """Send `messages` in as few batch requests as Resend allows; per message, its
    Delivery or DeliveryError, or None when it must go singly (`batch_body`)."""
    results: list[Result | None] = [None] * len(messages)
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for index, message in enumerate(messages):
        item = batch_body(channel, message)
        if item is not None:
            groups.setdefault(item[0], []).append((index, item[1]))
    for token, items in groups.items():
        for start in range(0, len(items), MAX_BATCH):
            chunk = items[start : start + MAX_BATCH]
            if len(chunk) == 1:
                continue  # one message: the single send, with its own key
            answers = await _send(channel, token, [messages[i] for i, _ in chunk], chunk)
            for (index, _), answer in zip(chunk, answers, strict=True):
                results[index] = answer
    return results


async def _send(
    channel: ResendChannel,
    token: str,
    messages: list[Outbound],
    chunk: list[tuple[int, dict[str, Any]]],
) -> list[Result]:
    keys = sorted(m.idempotency_key for m in messages)
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:48]
    key = f"{IDEMPOTENCY_PREFIX}batch-{digest}"
    label = f"a batch of {len(messages)}"
    deadline = pacing.Deadline(channel.budget, channel.timeout)
    domain = domain_of(messages[0].sender)
    started = time.perf_counter()
    try:
        answer = await channel.request(
            channel.url + "/batch",
            [body for _, body in chunk],
            key,
            domain,
            token,
            deadline,
            label,
            VALIDATION,
        )
    except DeliveryError as exc:
        return [exc] * len(messages)
    log.info("resend: %s sent in %.3f s", label, time.perf_counter() - started)
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
            log.warning("resend refused %s in a batch: %s", message.message_id, reply)
            out.append(PermanentDelivery(NAME, reply))
        else:
            upstream_id = one_line(next(sent), 120)
            out.append(Delivery(accepted=message.recipients, upstream_id=upstream_id))
    return out
