"""What the HTTP channels (Resend, Cloudflare) share: the client, one POST, its failures.

`post` is the boundary: httpx exceptions become `TransientDelivery` there and
the answer comes back as a plain `Answer`, so each channel's `outcome` stays a
pure function of status, body and Retry-After. `refusal` logs and raises what
that outcome decided, with one rule for both channels: a rejected relay
credential is the operator's fault (an error in the log), anything else is the
message's (a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import httpx

from relay import replies
from relay.errors import DeliveryError, TransientDelivery, delivery_error
from relay.replies import Refusal, Reply

# httpx failures raised before any byte of the request could reach the
# upstream: no connection, a TLS handshake that failed (ConnectError), no free
# connection in the pool, a URL it cannot use. Any other failure (a read
# timeout, a connection dropped mid-answer) leaves the outcome unknown.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.InvalidURL,
)


def client(timeout: float) -> httpx.AsyncClient:
    """One client per upstream, kept alive across messages, every call bounded."""
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), headers={"User-Agent": "relay"})


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's HTTP answer: the status, the JSON body (None if not JSON), Retry-After."""

    status: int
    body: object
    retry_after: str | None = None
    # draft-ietf-httpapi-ratelimit-headers-06, as Resend sends them
    # (resend.com/docs/api-reference/rate-limit): requests left, seconds to reset.
    ratelimit_remaining: str | None = None
    ratelimit_reset: str | None = None

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300


async def post(
    http: httpx.AsyncClient,
    url: str,
    *,
    channel: str,
    url_setting: str,
    headers: Mapping[str, str],
    content: bytes | None = None,
    json: object = None,
) -> Answer:
    """One POST; its answer, or a `TransientDelivery` when no answer came."""
    try:
        response = await http.post(url, content=content, json=json, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        why = describe(exc, url_setting)
        reply = replies.upstream_unavailable(channel, why)
        raise TransientDelivery(channel, reply, not_taken=isinstance(exc, _NOT_SENT)) from exc
    try:
        body: object = response.json()
    except ValueError:
        body = None
    return Answer(
        response.status_code,
        body,
        response.headers.get("retry-after"),
        response.headers.get("ratelimit-remaining"),
        response.headers.get("ratelimit-reset"),
    )


async def get(
    http: httpx.AsyncClient,
    url: str,
    *,
    params: Mapping[str, str],
    channel: str,
    url_setting: str,
    headers: Mapping[str, str],
) -> Answer:
    """One GET; its answer, or a `TransientDelivery` when no answer came."""
    try:
        response = await http.get(url, params=params, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        why = describe(exc, url_setting)
        raise TransientDelivery(channel, replies.upstream_unavailable(channel, why)) from exc
    try:
        body: object = response.json()
    except ValueError:
        body = None
    return Answer(response.status_code, body, response.headers.get("retry-after"))


def pause_seconds(answer: Answer) -> int | None:
    """How long the upstream asks every sender to hold off, if it says.

    Retry-After when given; else, on a 429 or when no request is left in the
    window, the seconds until the window resets.
    """
    wait = retry_after_seconds(answer.retry_after)
    if wait is not None:
        return wait
    if answer.status == 429 or (answer.ratelimit_remaining or "").strip() == "0":
        return retry_after_seconds(answer.ratelimit_reset)
    return None


class Kind(Enum):
    """What an upstream's documented error means for the message."""

    REFUSED = "refused"  # 5xx: this message will never be taken
    CONFIG = "config"  # 451 4.3.0: the relay's setup is wrong; logged as an error
    CREDENTIALS = "credentials"  # 451 4.3.0: the relay's credential refused; an error
    THROTTLED = "throttled"  # 451 4.7.0: sent too fast; retried while the budget allows
    QUOTA = "quota"  # 451 4.7.0: a daily or monthly quota is spent; never waited for
    DEFERRED = "deferred"  # 451 4.3.0: try again later, the outcome may be unknown


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """One row of a channel's error table."""

    kind: Kind
    refusal: Refusal | None = None  # for REFUSED
    words: str = ""  # the reply's text when the upstream's says no more

    @property
    def config_fault(self) -> bool:
        return self.kind in (Kind.CONFIG, Kind.CREDENTIALS)


def row_reply(
    channel: str, row: ErrorRow, *, status: int, detail: str, retry_after: str | None
) -> Reply:
    """The reply a channel's error-table row becomes; `detail` is the upstream's words."""
    if row.kind is Kind.THROTTLED or row.kind is Kind.QUOTA:
        wait = retry_after_seconds(retry_after)
        return replies.upstream_throttled(channel, row.words or "rate limited", retry_after=wait)
    if row.kind is Kind.CREDENTIALS:
        return replies.upstream_credentials_rejected(channel)
    if row.kind is Kind.CONFIG:
        return replies.upstream_unavailable(channel, row.words)
    if row.kind is Kind.DEFERRED:
        return (
            replies.upstream_unavailable(channel, row.words)
            if row.words
            else upstream_error(channel, status)
        )
    assert row.refusal is not None
    return replies.upstream_refused(channel, row.refusal, detail or row.words)


def retry_after_seconds(header: str | None) -> int | None:
    # RFC 9110 section 10.2.3 also allows an HTTP date; only seconds are worth
    # repeating to an SMTP client.
    if header and header.strip().isdigit():
        return int(header.strip())
    return None


def unexpected_reply(channel: str, status: int) -> Reply:
    """A status or body the upstream does not document: the outcome is unknown."""
    return replies.upstream_unavailable(channel, f"unexpected reply (HTTP {status})")


def upstream_error(channel: str, status: int) -> Reply:
    """The upstream failed (5xx): the message may or may not have gone out."""
    return replies.upstream_unavailable(channel, f"upstream error (HTTP {status})")


def refusal(
    log: logging.Logger,
    channel: str,
    answer: Answer,
    reply: Reply,
    *,
    message_id: str,
    credential: str,
    config_fault: bool = False,
) -> DeliveryError:
    """The error for a refused request, logged; `credential` names the relay's, never its value.

    `config_fault`: the answer blames the relay's setup (a wrong URL, an account
    not entitled), an error in the log like a rejected credential.
    """
    if reply == replies.upstream_credentials_rejected(channel):
        log.error("%s rejected the configured %s (HTTP %d)", channel, credential, answer.status)
    elif config_fault:
        log.error("%s: configuration fault: HTTP %d, %s", channel, answer.status, reply.text)
    else:
        log.warning("%s refused %s: HTTP %d, %s", channel, message_id, answer.status, reply)
    return delivery_error(channel, reply, not_taken=refused_whole(answer))


def refused_whole(answer: Answer) -> bool:
    """Whether an answer refuses the request as a whole, so nothing of it was sent.

    An HTTP error status (RFC 9110 section 15.5, 15.6) is the server's refusal
    to carry out the request: a 429, a 5xx, a rejected credential. Not a 409:
    Resend answers `concurrent_idempotent_requests` while another request
    with the same key is in flight, which may yet send the message; and not a
    2xx whose body the channel could not read (the message may have gone).
    """
    return answer.status >= 400 and answer.status != 409


def describe(exc: Exception, url_setting: str) -> str:
    """One clean line for an httpx failure, naming the setting when it is ours."""
    if isinstance(exc, httpx.TimeoutException):
        return "upstream timed out"
    if isinstance(exc, httpx.ConnectError):
        return "upstream unreachable (connection failed)"
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return f"{url_setting} is not a usable URL"
    return f"upstream connection failed ({type(exc).__name__})"
