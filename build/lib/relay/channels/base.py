"""The one small interface every upstream channel implements, and the shared outcome type.

A channel delivers one message and says which recipients the upstream took.
It raises `TransientDelivery` or `PermanentDelivery` (relay.errors) when it took
none; foreign exceptions (httpx, aiosmtplib, OSError) are translated inside the
channel and never escape it. A channel tries once: there is no silent fallback to
another channel, so the choice stays predictable.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from relay import replies
from relay.errors import DeliveryError, TransientDelivery, delivery_error
from relay.replies import Reply

log = logging.getLogger("relay.channel")


@dataclass(frozen=True, slots=True)
class Outbound:
    """One message as every channel receives it."""

    sender: str
    recipients: tuple[str, ...]
    content: bytes  # RFC 5322, CRLF line endings, Message-ID and Date present
    message_id: str
    idempotency_key: str
    # The most the upstream takes for this message's route (relay.policy
    # `upstream_limit`), measured as the channel sends it; None: no known limit.
    size_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the upstream took. `refused` maps a recipient to the upstream's reason.

    `message_id` is set only when the upstream sent the message under a
    Message-ID of its own: the id recipients see, which the client is told.
    """

    accepted: tuple[str, ...]
    refused: Mapping[str, Reply] = field(default_factory=dict)
    upstream_id: str = ""
    message_id: str = ""


def delivered_reply(message: Outbound, delivery: Delivery) -> Reply:
    """`250 2.0.0 Ok <id>`, naming the Message-ID the recipients see."""
    return replies.delivered(delivery.message_id or message.message_id)


class Channel(Protocol):
    name: str
    # True only where the upstream honours an idempotency key: a client's retry
    # after a lost reply then goes out once, and is charged once.
    idempotent: bool

    async def deliver(self, message: Outbound) -> Delivery: ...

    async def aclose(self) -> None: ...


def all_refused(channel: str, refused: Mapping[str, Reply]) -> DeliveryError:
    """The error for an upstream that took no recipient: the first refusal decides;
    each recipient's refusal goes with it (`DeliveryError.refused`)."""
    error = delivery_error(channel, next(iter(refused.values()), replies.UPSTREAM_REFUSED))
    error.refused = dict(refused)
    return error


def partial_delivery(
    channel: str,
    accepted: Sequence[str],
    refused: Mapping[str, Reply],
    upstream_id: str = "",
    message_id: str = "",
) -> Delivery:
    """The message's outcome from the upstream's answer for each recipient.

    - a recipient deferred (4xx): the whole message is deferred, the first
      deferral decides. The relay keeps no queue, so a deferral must not hide
      behind a 250; the client retries the message.
    - no recipient accepted: the first refusal decides.
    - otherwise: delivered to those accepted, the refused ones named.

    Raises the `DeliveryError` in the first two cases.
    """
    deferred = {rcpt: reply for rcpt, reply in refused.items() if not reply.is_permanent}
    if deferred:
        raise all_refused(channel, deferred)
    if not accepted:
        raise all_refused(channel, refused)
    return Delivery(tuple(accepted), refused, upstream_id, message_id)


class OutboxChannel:
    """Development only (`RELAY_DEV_OUTBOX`): each message becomes an .eml file.

    Lets a new user see a first message arrive with no upstream account. The
    envelope is written as X-Relay-* lines in front, as a sink would record it.
    """

    name = "outbox"
    idempotent = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def deliver(self, message: Outbound) -> Delivery:
        name = f"{secrets.token_hex(8)}.eml"
        envelope = (
            f"X-Relay-Envelope-From: <{message.sender}>\r\n"
            + "".join(f"X-Relay-Envelope-To: <{r}>\r\n" for r in message.recipients)
        ).encode()
        try:
            # Messages are private: the directory and each file for our user only.
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.directory / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(envelope + message.content)
            os.replace(tmp, self.directory / name)
        except OSError as exc:
            why = f"cannot write ({exc.strerror})"
            raise TransientDelivery(self.name, replies.local_error(self.name, why)) from exc
        return Delivery(accepted=message.recipients, upstream_id=name)

    async def aclose(self) -> None:
        return None
