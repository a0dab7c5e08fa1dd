"""One exception tree for the relay.

    RelayError                  every error knows the SMTP reply it becomes
    ├── ConfigError             a bad setting; stops the start with one line
    ├── StoreError              the database failed; the relay defers (451 4.3.0)
    │   ├── StoreBusy           another connection holds the write lock
    │   └── BatchBroken         SQLite ended a group commit's transaction by itself
    ├── Refused                 the store refused a charge: balance, limit, domain, token
    ├── AdminError              an admin operation refused (CLI exit 1, admin API 4xx)
    │   ├── Invalid             bad input (HTTP 422)
    │   ├── NotFound            no such account, token, sender, ... (HTTP 404)
    │   └── Conflict            it exists already, or the change breaks a rule (HTTP 409)
    └── DeliveryError           a channel's outcome, translated at its boundary
        ├── TransientDelivery   4xx: the client should retry; `not_taken` when the
        │                       upstream provably took none of it (the next channel may)
        └── PermanentDelivery   5xx: the upstream refused for good (never failed over)

aiosmtplib, httpx and sqlite3 exceptions are translated where they are raised
(`raise ... from exc`) and never escape their module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from relay import replies
from relay.replies import Reply

if TYPE_CHECKING:
    from relay.tokenrules import RateHit
    from relay.windows import LimitHit


class RelayError(Exception):
    reply: Reply = replies.LOCAL_ERROR

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        if reply is not None:
            self.reply = reply


class ConfigError(RelayError):
    """A setting is missing or malformed. The message names the setting."""


class StoreError(RelayError):
    """The database could not answer. Never send unmetered: defer instead."""

    reply = replies.LOCAL_ERROR


class StoreBusy(StoreError):
    """Another connection holds the database's write lock (only seen without a busy timeout)."""


class BatchBroken(StoreError):
    """SQLite ended a group commit's transaction by itself (a full disk, an I/O
    error): none of the batch's writes was committed (`Database.batch`)."""


class Refused(RelayError):
    """`reserve` refused: the balance or a send-limit window cannot cover the message,
    the sender's domain left the account, the session's token is no longer valid,
    the sender left the token's scope, or a token rate window is full.
    `relay.policy.reservation_refusal` words the reply from these fields."""

    def __init__(
        self,
        message: str,
        *,
        balance: int | None = None,
        disabled: bool = False,
        hit: LimitHit | None = None,
        domain_lost: bool = False,
        token_invalid: bool = False,
        out_of_scope: bool = False,
        rate: RateHit | None = None,
    ) -> None:
        super().__init__(message)
        self.token_invalid = token_invalid
        self.out_of_scope = out_of_scope
        self.rate = rate
        self.balance = balance
        self.disabled = disabled
        self.domain_lost = domain_lost
        self.hit = hit


class AdminError(RelayError):
    """An admin operation (relay.admin.operations) refused; the CLI prints it, the API answers it.

    `code` is a stable machine name (`account_exists`), `status` the HTTP status.
    """

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Invalid(AdminError):
    status = 422
    code = "invalid"


class NotFound(AdminError):
    status = 404
    code = "not_found"


class Conflict(AdminError):
    status = 409
    code = "conflict"


class DeliveryError(RelayError):
    """An upstream channel did not take the message.

    `not_taken` is set by the channel at the point it knows: the failure proves
    the upstream took none of the message (no connection, a TLS failure, an
    SMTP refusal before the data was accepted, an HTTP answer refusing the
    request as a whole), so another channel may be tried without sending twice.
    It stays False when the outcome is unknown (a timeout after the request or
    the data went out) and for every permanent refusal. `taken` names the
    recipients the upstream did take before the failure (one request per
    recipient): they stay delivered, only the rest may go on.
    """

    def __init__(
        self,
        channel: str,
        reply: Reply,
        *,
        not_taken: bool = False,
        taken: tuple[str, ...] = (),
    ) -> None:
        super().__init__(f"{channel}: {reply}", reply)
        self.channel = channel
        self.not_taken = not_taken and not reply.is_permanent
        self.taken = taken
        # The upstream's answer per recipient, where it gave one: a refusal of
        # every recipient still says which address was refused and why.
        self.refused: Mapping[str, Reply] = {}


class TransientDelivery(DeliveryError):
    """The outcome is temporary or unknown: the client must retry (4xx).

    Never a 5xx when the message may have gone out: a client that sees a 5xx does
    not retry, one that sees a 4xx does, and the upstream idempotency key makes
    that retry safe where the upstream offers one.
    """

    def __init__(
        self,
        channel: str,
        reply: Reply,
        *,
        not_taken: bool = False,
        taken: tuple[str, ...] = (),
    ) -> None:
        assert 400 <= reply.code < 500, reply
        super().__init__(channel, reply, not_taken=not_taken, taken=taken)


class PermanentDelivery(DeliveryError):
    """The upstream refused the message for good (5xx)."""

    def __init__(self, channel: str, reply: Reply) -> None:
        assert reply.code >= 500, reply
        super().__init__(channel, reply)


def delivery_error(channel: str, reply: Reply, *, not_taken: bool = False) -> DeliveryError:
    """The error a channel raises for an upstream outcome: its class follows the reply.

    `not_taken` (kept only for a 4xx): the upstream provably took none of it."""
    if reply.is_permanent:
        return PermanentDelivery(channel, reply)
    return TransientDelivery(channel, reply, not_taken=not_taken)
