"""The channels' shared decisions as data: the partial-delivery rule and the upstream replies."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from relay import replies
from relay.channels.base import Delivery, partial_delivery
from relay.errors import DeliveryError, PermanentDelivery, TransientDelivery
from relay.replies import Refusal, Reply

BOUNCE = Reply(550, "5.1.1", "x: no such user")
FULL = Reply(552, "5.2.2", "x: mailbox full")
DEFERRED = Reply(451, "4.3.0", "x: try later")
THROTTLED = Reply(451, "4.7.0", "x: slow down")

# accepted, refused (in the upstream's order): delivered, the refused ones named.
DELIVERED = [
    (("a",), {}),
    (("a", "b"), {}),
    (("a",), {"b": BOUNCE}),
    (("a", "c"), {"b": BOUNCE, "d": FULL}),
]

# accepted, refused, then the error the message gets and the reply that decides it.
NOT_DELIVERED = [
    # none taken: the first refusal decides
    ((), {"b": BOUNCE}, PermanentDelivery, BOUNCE),
    ((), {"b": FULL, "c": BOUNCE}, PermanentDelivery, FULL),
    # a deferral defers the whole message, taken recipients or not
    (("a",), {"b": DEFERRED}, TransientDelivery, DEFERRED),
    ((), {"b": DEFERRED}, TransientDelivery, DEFERRED),
    # ... and wins over a permanent refusal that came first
    (("a",), {"b": BOUNCE, "c": THROTTLED}, TransientDelivery, THROTTLED),
    ((), {"b": BOUNCE, "c": DEFERRED, "d": THROTTLED}, TransientDelivery, DEFERRED),
    # nothing taken and nothing said: the generic refusal
    ((), {}, PermanentDelivery, replies.UPSTREAM_REFUSED),
]


@pytest.mark.parametrize(("accepted", "refused"), DELIVERED)
def test_partial_delivery_delivered(accepted: tuple[str, ...], refused: dict[str, Reply]) -> None:
    delivery = partial_delivery("x", accepted, refused, "id-1")
    assert delivery == Delivery(accepted, refused, "id-1")


@pytest.mark.parametrize(("accepted", "refused", "error", "reply"), NOT_DELIVERED)
def test_partial_delivery_not_delivered(
    accepted: tuple[str, ...],
    refused: dict[str, Reply],
    error: type[DeliveryError],
    reply: Reply,
) -> None:
    with pytest.raises(DeliveryError) as caught:
        partial_delivery("x", accepted, refused)
    assert type(caught.value) is error
    assert (caught.value.channel, caught.value.reply) == ("x", reply)


# Each reply is built in the test body, not here: mutation testing (docs/design.md)
# runs the mutated functions only after collection.
UPSTREAM_REPLIES = [
    (
        replies.upstream_unavailable,
        ("resend", "upstream timed out"),
        {},
        "451 4.3.0 resend: upstream timed out",
    ),
    (
        replies.upstream_credentials_rejected,
        ("smtp",),
        {},
        "451 4.3.0 smtp: upstream rejected relay credentials",
    ),
    (replies.upstream_throttled, ("cloudflare",), {}, "451 4.7.0 cloudflare: rate limited"),
    (
        replies.upstream_throttled,
        ("resend", "daily quota exceeded"),
        {"retry_after": 30},
        "451 4.7.0 resend: daily quota exceeded; retry after 30 s",
    ),
    (
        replies.upstream_throttled,
        ("resend",),
        {"retry_after": 0},
        "451 4.7.0 resend: rate limited; retry after 0 s",
    ),
    (
        replies.upstream_refused,
        ("resend", Refusal.CONTENT, "bad\r\nthing"),
        {},
        "554 5.6.0 resend: bad thing",
    ),
    (replies.upstream_refused, ("x", Refusal.RECIPIENT, "r"), {}, "550 5.1.3 x: r"),
    (replies.upstream_refused, ("x", Refusal.SENDER, "s"), {}, "550 5.1.7 x: s"),
    (replies.upstream_refused, ("x", Refusal.BOUNCE, "b"), {}, "550 5.1.1 x: b"),
    (replies.upstream_refused, ("x", Refusal.NOT_AUTHORIZED, "n"), {}, "550 5.7.1 x: n"),
    (replies.upstream_refused, ("x", Refusal.TOO_BIG, "t"), {}, "552 5.3.4 x: t"),
    (replies.upstream_refused, ("x", Refusal.OTHER, "o"), {}, "554 5.0.0 x: o"),
    (
        replies.upstream_refused_as,
        ("smtp", 550, "5.1.1", "no such user"),
        {},
        "550 5.1.1 smtp: no such user",
    ),
    (replies.upstream_refused_as, ("smtp", 500, "5.5.2", "lowest"), {}, "500 5.5.2 smtp: lowest"),
    (replies.upstream_refused_as, ("smtp", 599, "5.9.9", "highest"), {}, "599 5.9.9 smtp: highest"),
    (replies.upstream_refused_as, ("smtp", 554, "", "no"), {}, "554 5.0.0 smtp: no"),
    (replies.upstream_refused_as, ("smtp", 554, "4.7.1", "odd"), {}, "554 5.0.0 smtp: odd"),
    (replies.upstream_refused_as, ("smtp", 554, "2.0.0", "odder"), {}, "554 5.0.0 smtp: odder"),
    (replies.upstream_refused_as, ("smtp", 552, "5.3.4", "a\r\n  b"), {}, "552 5.3.4 smtp: a b"),
    (
        replies.local_error,
        ("outbox", "cannot write (No space)"),
        {},
        "451 4.3.0 outbox: cannot write (No space)",
    ),
    (replies.local_error, ("outbox", "disk\nfull"), {}, "451 4.3.0 outbox: disk full"),
]


@pytest.mark.parametrize(("build", "args", "kwargs", "text"), UPSTREAM_REPLIES)
def test_upstream_replies(
    build: Callable[..., Reply], args: tuple[object, ...], kwargs: dict[str, object], text: str
) -> None:
    assert str(build(*args, **kwargs)) == text


@pytest.mark.parametrize("code", [499, 600, 250])
def test_upstream_refused_as_takes_only_5xx_codes(code: int) -> None:
    with pytest.raises(AssertionError):
        replies.upstream_refused_as("smtp", code, "5.0.0", "x")
