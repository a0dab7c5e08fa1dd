"""What one session and one mail transaction know: the values the hooks fill in.

`RelaySession` is aiosmtpd's session with the principal AUTH found;
`Transaction` is what MAIL, RCPT and the plan before 354 learned;
`Submitted` is a message at the end of DATA, as its delivery record names it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import Envelope, Session

from relay import policy
from relay.channels.base import Delivery
from relay.message import domain_of
from relay.replies import Reply
from relay.store.deliveries import (
    DeliveryRecord,
    outcome_of,
    recipient_outcomes,
)
from relay.store.facade import MailCheck, Principal


class RelaySession(Session):
    def __init__(self, loop: asyncio.AbstractEventLoop, listener: str = "smtps") -> None:
        super().__init__(loop)
        self.principal: Principal | None = None
        self.auth_failures = 0
        # The port the client came in on, as metrics and the delivery log name it:
        # "smtps" (implicit TLS, RELAY_LISTEN) or "submission" (STARTTLS).
        self.listener = listener

    # aiosmtpd's setter logs a deprecation warning on every AUTH; we never use it.
    @property
    def login_data(self) -> Any:
        return None

    @login_data.setter
    def login_data(self, value: Any) -> None:
        pass

    def deauthenticate(self) -> None:
        self.authenticated = False
        self.principal = None


@dataclass
class Transaction:
    """What one mail transaction (MAIL to end of DATA) has learned so far.

    The one state of a transaction: aiosmtpd's envelope only carries it (and
    `mail_from`, which aiosmtpd's command sequencing reads), so RSET, a new
    EHLO and the end of DATA drop it with the envelope.
    """

    sender: str  # as the client wrote it
    check: MailCheck
    # Recipients as written, forwarded unchanged since a local part is
    # case-sensitive (RFC 5321 section 2.4), and as metered and matched.
    recipients: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    verified: set[str] = field(default_factory=set)
    declared_size: int | None = None  # MAIL FROM's SIZE= (RFC 1870)
    # The plan made before 354: the recipients cannot change during the upload.
    plan: policy.MessagePlan | Reply | None = None

    @property
    def domain(self) -> str:
        return domain_of(self.sender)

    def add(self, address: str, key: str) -> None:
        if key not in self.keys:
            self.recipients.append(address)
            self.keys.append(key)


def declared_size(options: Sequence[str]) -> int | None:
    """SIZE=n among MAIL FROM's parameters (aiosmtpd checked it against our limit)."""
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class RelayEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.transaction: Transaction | None = None


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
        )
