"""What one session and one mail transaction know: the values the hooks fill in.

`RelaySession` is aiosmtpd's session with the principal AUTH found;
`Transaction` is what MAIL, RCPT and the plan before 354 learned;
`Submitted` (`relay.delivery.submitted`) is a message at the end of DATA.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import Envelope, Session

from relay import policy
from relay.delivery.submitted import Submitted
from relay.message import domain_of
from relay.replies import Reply
from relay.store.facade import MailCheck, Principal

__all__ = ["RelayEnvelope", "RelaySession", "Submitted", "Transaction", "declared_size"]


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
