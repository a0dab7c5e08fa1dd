"""The upstream SMTP channel (`SMTP_CONFIG`), with authenticated connections reused.

A TLS handshake and AUTH per message would cost the upstream and us more than
the message itself, so each upstream keeps a few idle, authenticated
connections. A reused connection the upstream has meanwhile closed is noticed at
MAIL, before anything of the message was accepted, and replaced once by a fresh
one: that is recovery, not a retry of a send.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus

from relay import replies
from relay.channels import aiosmtplib_compat as compat
from relay.channels import pacing
from relay.channels.aiosmtplib_compat import Replies
from relay.channels.base import Delivery, Outbound, partial_delivery
from relay.errors import ConfigError, DeliveryError, TransientDelivery, delivery_error
from relay.message import domain_of
from relay.replies import Reply, one_line
from relay.upstreams import UPSTREAM_AUTH_TYPES, SmtpUpstream

log = logging.getLogger("relay.smtp")

NAME = "smtp"
# Idle connections kept per upstream, and how long one may idle: most servers
# drop an idle client after 60 s or more (RFC 5321 section 4.5.3.2.7 asks 5 min).
MAX_IDLE = 32
IDLE_SECONDS = 30.0
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")
_UPSTREAM_AUTH_CODES = frozenset({530, 535, 538})
_AUTH = {"plain": "auth_plain", "login": "auth_login", "cram-md5": "auth_crammd5"}


def upstream_reply(code: int, message: str) -> Reply:
    """An upstream SMTP refusal as our reply: its code, a clean one-line reason.

    4xx never stays a bare 4xx of the upstream's choosing: throttling (an
    enhanced 4.7.x) becomes 451 4.7.0, anything else 451 4.3.0, so clients see
    only the documented deferrals.
    """
    lines = message.splitlines() or [""]
    match = _ENHANCED.match(lines[0])
    enhanced = match.group(0).strip() if match else ""
    # A multi-line reply repeats its enhanced code on every line: keep the words.
    reason = one_line(" ".join(_ENHANCED.sub("", line, count=1) for line in lines))
    if code in _UPSTREAM_AUTH_CODES:
        # The upstream wants AUTH the relay was not configured for, or refused
        # it: the relay's configuration fault, never the client's (RFC 4954).
        why = f"upstream requires authentication the relay does not have ({code})"
        return replies.upstream_unavailable(NAME, why)
    if 400 <= code < 500:
        why = f"upstream deferred ({code} {enhanced} {reason})".replace("  ", " ")
        if enhanced.startswith("4.7"):
            return replies.upstream_throttled(NAME, why)
        return replies.upstream_unavailable(NAME, why)
    if 500 <= code < 600:
        return replies.upstream_refused_as(NAME, code, enhanced, reason)
    return replies.upstream_unavailable(NAME, f"unexpected upstream reply {code}")


class _Conn:
    __slots__ = ("client", "idle_since")

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client
        self.idle_since = time.monotonic()


class SmtpChannel:
    name = NAME
    idempotent = False

    def __init__(
        self,
        upstreams: Mapping[str, SmtpUpstream],
        *,
        timeout: float,
        local_hostname: str,
        budget: float | None = None,
    ) -> None:
        """`budget`: the time one message may spend here, waits included (the
        session's forward budget, twice `timeout` by default)."""
        self.upstreams = upstreams
        self.timeout = timeout
        self.budget = budget if budget is not None else timeout * 2
        self.local_hostname = local_hostname
        # An entry's `rate` (messages per second) paces its upstream.
        self._buckets = {
            domain: pacing.TokenBucket(u.rate) for domain, u in upstreams.items() if u.rate
        }
        self._idle: dict[str, deque[_Conn]] = {}
        # Built now, so a missing or bad `tls.ca` stops the start (ConfigError)
        # instead of failing every message later.
        self._tls = {domain: tls_context(domain, u) for domain, u in upstreams.items()}
        # Upstreams already logged as refusing cleartext credentials: once each.
        self._cleartext_logged: set[str] = set()
        # Upstreams already logged as advertising no AUTH: once each.
        self._no_auth_logged: set[str] = set()

    async def deliver(self, message: Outbound) -> Delivery:
        domain = domain_of(message.sender)
        upstream = self.upstreams[domain]
        deadline = pacing.Deadline(self.budget, self.timeout)
        try:
            await pacing.take_slot(self._buckets.get(domain), deadline)
        except pacing.BudgetExceeded as exc:
            why = f"upstream rate of {upstream.rate:g}/s"
            raise TransientDelivery(
                NAME, replies.upstream_throttled(NAME, why, exc.seconds), not_taken=True
            ) from None
        conn, reused = self._take_idle(domain), True
        if conn is None:
            conn, reused = await self._connect(domain, upstream), False
        try:
            try:
                answers = await self._envelope(conn.client, message)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPResponseException) as exc:
                # A pooled connection the upstream closed (or 421s) while idle.
                stale = isinstance(exc, aiosmtplib.SMTPServerDisconnected) or exc.code in (421, 503)
                if not (reused and stale):
                    raise
                conn.client.close()
                conn = await self._connect(domain, upstream)
                answers = await self._envelope(conn.client, message)
            delivery = await self._transaction(conn.client, message, answers)
        except DeliveryError:
            self._release(domain, conn)
            raise
        except aiosmtplib.SMTPResponseException as exc:
            # Refused at MAIL, at the DATA command or after the data: end the
            # transaction before the connection goes back to the pool, or the
            # next message's MAIL would meet "nested MAIL" (503).
            await self._reset(conn)
            self._release(domain, conn)
            # An answer refusing at MAIL, DATA or the end of the data: the
            # upstream said it did not take the message (RFC 5321 section 4.2.5).
            reply = upstream_reply(exc.code, exc.message)
            raise delivery_error(NAME, reply, not_taken=True) from exc
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            # Lost before the data was sent (`_transaction` answers for a loss
            # after): nothing of the message is with the upstream.
            conn.client.close()
            why = _describe(exc)
            raise TransientDelivery(
                NAME, replies.upstream_unavailable(NAME, why), not_taken=True
            ) from exc
        except BaseException:
            # Cancelled mid-command (the forward's time ran out, or shutdown):
            # the connection is out of step with the upstream, never reuse it.
            conn.client.close()
            raise
        self._release(domain, conn)
        return delivery

    @staticmethod
    async def _envelope(client: aiosmtplib.SMTP, message: Outbound) -> Replies:
        """MAIL FROM and every RCPT TO; the RCPT replies, in order.

        Raises only what MAIL met, so `deliver` can tell a stale pooled
        connection (nothing of the message accepted yet) from a later failure,
        which `recipient_outcomes` raises. With PIPELINING the commands go in one
        write (RFC 2920 section 3.1: MAIL and RCPT may appear anywhere in a
        group) and their replies are read in order.
        """
        # RFC 6152: 8-bit content is declared where the upstream takes it; we
        # advertise 8BITMIME to our clients, so such content does arrive.
        eight_bit = not message.content.isascii() and client.supports_extension("8bitmime")
        options = ["BODY=8BITMIME"] if eight_bit else []
        if not client.supports_extension("pipelining"):
            # The same bytes as `client.mail`, whose address quoting (the email
            # package's parser) cost ~40 us an address in the profile.
            response = await client.execute_command(compat.mail_command(message.sender, options))
            if response.code != SMTPStatus.completed:
                raise aiosmtplib.SMTPSenderRefused(response.code, response.message, message.sender)
            return await _one_by_one(client, message.recipients)
        group = await compat.pipeline(
            client,
            [
                compat.mail_command(message.sender, options),
                *(compat.rcpt_command(rcpt) for rcpt in message.recipients),
            ],
        )
        if not group.replies:
            assert group.ended is not None
            raise group.ended
        mail, *rcpts = group.replies
        if mail.code != SMTPStatus.completed:
            # Every RCPT was answered too (a server refuses RCPT without a
            # transaction), or a 421 closed the connection: in step either way.
            raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, message.sender)
        return Replies(tuple(rcpts), group.ended)

    async def _transaction(
        self, client: aiosmtplib.SMTP, message: Outbound, answers: Replies
    ) -> Delivery:
        accepted, refused = recipient_outcomes(message.recipients, answers)
        try:
            delivery = partial_delivery(NAME, accepted, refused)
        except DeliveryError as exc:
            # Nothing was sent yet: end the transaction before the connection
            # goes back to the pool. A recipient deferred with none refused for
            # good: no recipient took the message, another channel may.
            if client.is_connected:
                await client.rset()
            permanent = any(r.is_permanent for r in refused.values())
            error = delivery_error(NAME, exc.reply, not_taken=not permanent)
            error.refused = exc.refused  # each recipient's own answer goes on
            raise error from exc
        try:
            response = await compat.data(client, message.content, self.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            # Lost once the data may have gone: the upstream may have the
            # message, so no other channel may try it (the outcome is unknown).
            client.close()
            why = _describe(exc)
            raise TransientDelivery(NAME, replies.upstream_unavailable(NAME, why)) from exc
        return replace(delivery, upstream_id=queue_id(response.message))

    async def _reset(self, conn: _Conn) -> None:
        if not conn.client.is_connected:
            return
        try:
            await conn.client.rset()
        except (aiosmtplib.SMTPException, OSError):
            conn.client.close()

    def _take_idle(self, domain: str) -> _Conn | None:
        idle = self._idle.get(domain)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.client.is_connected and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.client.close()
        return None

    def _release(self, domain: str, conn: _Conn) -> None:
        idle = self._idle.setdefault(domain, deque())
        if not conn.client.is_connected or len(idle) >= MAX_IDLE:
            conn.client.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def _connect(self, domain: str, upstream: SmtpUpstream) -> _Conn:
        client = aiosmtplib.SMTP(
            hostname=upstream.host,
            port=upstream.port,
            use_tls=upstream.secure,
            start_tls=None if upstream.start_tls else False,
            tls_context=self._tls[domain],
            local_hostname=self.local_hostname,
            timeout=self.timeout,
        )
        try:
            await client.connect()
            # aiosmtplib greets only when STARTTLS or AUTH needs it; the
            # extensions (8BITMIME, PIPELINING) must be known before MAIL.
            await _greet(client)
            if upstream.username and upstream.password:
                if client.supports_extension("auth"):
                    self._refuse_cleartext_credentials(domain, upstream, client)
                    await self._login(client, upstream)
                else:
                    self._note_no_auth(domain, upstream)
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            # The relay's own credentials: a configuration fault, not the client's.
            log.error("smtp upstream %s rejected the configured credentials", upstream.host)
            raise TransientDelivery(
                NAME, replies.upstream_credentials_rejected(NAME), not_taken=True
            ) from exc
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            # No connection, TLS, greeting or AUTH: nothing of the message sent.
            client.close()
            why = _describe(exc)
            raise TransientDelivery(
                NAME, replies.upstream_unavailable(NAME, why), not_taken=True
            ) from exc
        except BaseException:
            # Cancelled while connecting or greeting (the forward's time ran out,
            # or shutdown): close it, or the socket is left to the garbage collector.
            client.close()
            raise
        return _Conn(client)

    def _refuse_cleartext_credentials(
        self, domain: str, upstream: SmtpUpstream, client: aiosmtplib.SMTP
    ) -> None:
        """No AUTH on a connection without TLS, unless the entry allows it.

        RFC 8314 section 3 and RFC 4954 section 4: PLAIN and LOGIN put the
        password on the wire as it is. An upstream that offers no STARTTLS
        (or `startTls: false`) would get it in cleartext.
        """
        if upstream.allow_plaintext_auth or client.get_transport_info("sslcontext") is not None:
            return
        client.close()
        why = "upstream offers no TLS; credentials not sent in cleartext"
        if domain not in self._cleartext_logged:
            self._cleartext_logged.add(domain)
            log.error(
                "smtp upstream %s:%d for %s offers no TLS: credentials are not sent; set "
                'secure, or "tls": {"allowPlaintextAuth": true} to allow it',
                upstream.host,
                upstream.port,
                domain,
            )
        raise TransientDelivery(NAME, replies.upstream_unavailable(NAME, why), not_taken=True)

    def _note_no_auth(self, domain: str, upstream: SmtpUpstream) -> None:
        """An upstream that advertises no AUTH gets none, as worker-mailer does
        (src/mailer.ts `auth()`: no AUTH keyword in EHLO, no authentication).
        Logged once per upstream: the credentials in its entry go unused."""
        if domain in self._no_auth_logged:
            return
        self._no_auth_logged.add(domain)
        log.warning(
            "smtp upstream %s:%d for %s advertises no AUTH: sending without authenticating",
            upstream.host,
            upstream.port,
            domain,
        )

    async def _login(self, client: aiosmtplib.SMTP, upstream: SmtpUpstream) -> None:
        """The first of the entry's `authType` the upstream offers, in the entry's
        order; without `authType`, the first of PLAIN, LOGIN, CRAM-MD5 offered
        (worker-mailer's order of preference, src/mailer.ts `auth()`). None
        offered: 451, as worker-mailer fails ("No supported auth method found")."""
        assert upstream.username and upstream.password
        offered = set(client.server_auth_methods)
        wanted = upstream.auth_types or UPSTREAM_AUTH_TYPES
        for kind in wanted:
            method = _AUTH.get(kind)
            if method and kind in offered:
                await getattr(client, method)(upstream.username, str(upstream.password))
                return
        client.close()
        why = f"upstream offers none of authType {', '.join(wanted)}"
        log.error("smtp upstream %s: %s (it offers %s)", upstream.host, why,
                  ", ".join(sorted(offered)) or "none")  # fmt: skip
        raise TransientDelivery(NAME, replies.upstream_unavailable(NAME, why))

    async def aclose(self) -> None:
        conns = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()

        async def quit_one(conn: _Conn) -> None:
            try:
                await asyncio.wait_for(conn.client.quit(), 2)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                conn.client.close()

        await asyncio.gather(*(quit_one(c) for c in conns))


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO once per connection, HELO if the upstream does not know EHLO (RFC 5321
    section 4.1.4)."""
    if not client.is_ehlo_or_helo_needed:
        return
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


async def _one_by_one(client: aiosmtplib.SMTP, recipients: Sequence[str]) -> Replies:
    """RCPT TO for each recipient, each reply awaited: an upstream without PIPELINING."""
    replies: list[SMTPResponse] = []
    for rcpt in recipients:
        try:
            replies.append(await client.execute_command(compat.rcpt_command(rcpt)))
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            return Replies(tuple(replies), exc)
        if not client.is_connected:
            break  # a 421 closed it (aiosmtplib closes on it)
    return Replies(tuple(replies))


def recipient_outcomes(
    recipients: Sequence[str], answers: Replies
) -> tuple[list[str], dict[str, Reply]]:
    """Each recipient accepted, or refused with our reply for the upstream's.

    Recipients left unanswered after a 421 (RFC 5321 section 3.8: the upstream
    closes) share its deferral rather than a vaguer "connection closed"; left
    unanswered otherwise, the loss that ended the exchange is raised.
    """
    accepted: list[str] = []
    refused: dict[str, Reply] = {}
    closing: Reply | None = None
    for index, rcpt in enumerate(recipients):
        if index < len(answers.replies):
            reply = answers.replies[index]
            if reply.code in (SMTPStatus.completed, SMTPStatus.will_forward):
                accepted.append(rcpt)
                continue
            refused[rcpt] = upstream_reply(reply.code, reply.message)
            if reply.code == SMTPStatus.domain_unavailable:
                closing = refused[rcpt]
        elif closing is not None:
            refused[rcpt] = closing
        else:
            raise answers.ended or aiosmtplib.SMTPServerDisconnected("Connection lost")
    return accepted, refused


def tls_context(domain: str, upstream: SmtpUpstream) -> ssl.SSLContext:
    """The context for one upstream: verified by default, or against its own CA."""
    try:
        if not upstream.verify_tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif upstream.ca and "-----BEGIN" in upstream.ca:
            ctx = ssl.create_default_context(cadata=upstream.ca)
        elif upstream.ca:
            ctx = ssl.create_default_context(cafile=str(Path(upstream.ca)))
        else:
            ctx = ssl.create_default_context()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"SMTP_CONFIG[{domain!r}].tls.ca: cannot load ({exc})") from None
    return ctx


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return "upstream timed out"
    cause = exc.__cause__
    if isinstance(exc, ssl.SSLError) or isinstance(cause, ssl.SSLError):
        tls_error = exc if isinstance(exc, ssl.SSLError) else cause
        assert isinstance(tls_error, ssl.SSLError)
        return f"TLS with upstream failed ({tls_error.reason or 'handshake'})"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return "upstream closed the connection"
    if isinstance(exc, ConnectionRefusedError) or isinstance(exc.__cause__, ConnectionRefusedError):
        return "upstream refused the connection"
    return f"upstream unreachable ({type(exc).__name__})"


# How MTAs name the queue id in their 250 to DATA: Postfix and aiosmtpd-based
# sinks "2.0.0 Ok: queued as 4Bq1x2", Exim "OK id=1rXyZ-000Abc-Qm".
_QUEUE_ID = re.compile(r"(?:queued as|\bid=)\s*<?([A-Za-z0-9][A-Za-z0-9._@:+-]{0,100})")


def queue_id(text: str) -> str:
    """The upstream's queue id from its reply to DATA, or the reply's text when it names none.

    >>> queue_id("2.0.0 Ok: queued as 4Bq1x2Z")
    '4Bq1x2Z'
    >>> queue_id("OK id=1rXyZ-000Abc-Qm")
    '1rXyZ-000Abc-Qm'
    >>> queue_id("2.0.0 Accepted")
    '2.0.0 Accepted'
    """
    found = _QUEUE_ID.search(text)
    return found.group(1) if found else one_line(text, 120)
