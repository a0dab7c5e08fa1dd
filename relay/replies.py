"""Every reply this server sends, named after what it means.

A reply is a value: code, enhanced status code (RFC 3463) and text. The reply
table in docs/replies.md reads the same (tests/test_reply_table.py checks it).

RFC 2034 section 3: every reply carries an enhanced code except the greeting, the
HELO/EHLO replies and the 334 AUTH continuations. aiosmtpd sends some built-in
replies without one; `normalize` rewrites them in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        assert 200 <= self.code <= 599, self.code
        assert _ENHANCED.fullmatch(self.enhanced), self.enhanced
        assert str(self.code)[0] == self.enhanced[0], (self.code, self.enhanced)
        assert "\r" not in self.text and "\n" not in self.text

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def but(self, text: str) -> Reply:
        """The same code and enhanced code with another (clean, one-line) text."""
        return Reply(self.code, self.enhanced, one_line(text))


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
MAX_REASON = 200


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """Collapse text (often from an upstream) into one printable ASCII line."""
    text = _UNSAFE.sub(" ", text).strip()
    text = text.encode("ascii", "replace").decode("ascii")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# 354 is an intermediate reply: RFC 2034 gives it no enhanced code.
START_DATA = "354 Start mail input; end with <CR><LF>.<CR><LF>"

# --- session ---------------------------------------------------------------
CLOSING = Reply(221, "2.0.0", "Service closing transmission channel")
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "Too many connections from your address")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
# RELAY_SESSION_IDLE_MAX: no message delivered for that long (X.4.2: bad connection).
SESSION_IDLE_TOO_LONG = Reply(421, "4.4.2", "Session idle too long, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
# aiosmtpd closes the session at its fifth unrecognised command with a 502; a
# reply that closes is a 421 (RFC 5321 section 3.8).
TOO_MANY_UNKNOWN_COMMANDS = Reply(421, "4.7.0", "Too many unrecognized commands, closing")
TOO_MANY_IDLE_COMMANDS = Reply(421, "4.7.0", "Too many commands without a message, closing")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts")
AUTH_THROTTLED = TOO_MANY_AUTH_FAILURES.but(
    "Too many failed authentication attempts, try again later"
)
# At MAIL, for a token past RELAY_REFUSAL_LIMIT refused messages (relay.store.refusals);
# 421 closes the channel (RFC 5321 section 3.8), 4.7.0 is a security or policy
# status (RFC 3463 section 3.8).
TOO_MANY_REFUSALS = Reply(421, "4.7.0", "Too many refused messages, try again later")

# --- AUTH (RFC 4954) -------------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
# Also a token of a disabled or deleted account: the same reply as an unknown
# token, so AUTH tells a token holder nothing about the account (no oracle).
AUTH_FAILED = Reply(535, "5.7.8", "Authentication failed")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
# RFC 4954 section 4: the reply to an AUTH line longer than the server accepts.
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
AUTH_PLAIN_UNSPLITTABLE = AUTH_BAD_BASE64.but("Cannot split AUTH PLAIN response")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Send EHLO first")
# RFC 4954 section 6: 530 asks the client to authenticate (again). Also when the
# token's account was disabled or deleted after AUTH (docs/admin.md).
TOKEN_NO_LONGER_VALID = Reply(
    530, "5.7.0", "Authentication required: the token was revoked or expired"
)

# --- syntax and sequence (RFC 5321 section 4.2.4) --------------------------
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
EHLO_SYNTAX = BAD_SYNTAX.but("Syntax: EHLO hostname")
HELO_SYNTAX = BAD_SYNTAX.but("Syntax: HELO hostname")
AUTH_SYNTAX = BAD_SYNTAX.but("Syntax: AUTH mechanism [initial-response]")
DATA_SYNTAX = BAD_SYNTAX.but("Syntax: DATA")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
NEED_MAIL = Reply(503, "5.5.1", "Bad sequence of commands: MAIL first")
NEED_RCPT = Reply(503, "5.5.1", "Bad sequence of commands: RCPT first")
NESTED_MAIL = Reply(503, "5.5.1", "Bad sequence of commands: MAIL already given")
NEED_HELO = Reply(503, "5.5.1", "Bad sequence of commands: send EHLO or HELO first")
PARAMETER_UNKNOWN = Reply(555, "5.5.4", "Parameter not recognized")
BAD_SENDER_ADDRESS = Reply(553, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_ADDRESS = Reply(553, "5.1.3", "Bad recipient address syntax")
# Postfix answers STARTTLS on its implicit-TLS port the same way, and a second
# STARTTLS on its submission port: RFC 3207 names no reply for it, and 554 is what
# Postfix, and the clients written against it, know.
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "TLS already active")

# --- STARTTLS (RFC 3207), on RELAY_STARTTLS_LISTEN only ----------------------
# RFC 3207 section 4: the 220 before the handshake (with an enhanced code, as
# ENHANCEDSTATUSCODES asks of every reply but the greeting), and the 530 a
# server that requires TLS gives any command but NOOP, EHLO, STARTTLS and QUIT.
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
STARTTLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
STARTTLS_SYNTAX = BAD_SYNTAX.but("Syntax: STARTTLS")
# A client that has not finished its TLS handshake within the AUTH timeout of
# connecting: a plaintext session holds a slot no longer than that.
STARTTLS_TIMEOUT = Reply(421, "4.7.0", "Must issue a STARTTLS command first, closing")
CANNOT_VRFY = Reply(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")

# --- policy ----------------------------------------------------------------
SENDER_DENIED = Reply(550, "5.7.1", "Sender denied")
BALANCE_DENIED = Reply(550, "5.7.1", "Send balance exhausted")
TOO_MANY_RECIPIENTS = Reply(
    452, "4.5.3", "Too many recipients: at most 50 per message; send the rest in a new message"
)
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too big")
# RFC 3463 X.1.1: the relay will not send to this mailbox (relay.store.suppressions).
RECIPIENT_SUPPRESSED = Reply(550, "5.1.1", "Recipient suppressed; ask the relay admin")
SEND_LIMIT_REACHED = Reply(451, "4.7.1", "Send limit reached")
# A token's own rules (relay.tokenrules): a sender outside its scope is refused
# for good (X.7.1, "delivery not authorized", RFC 3463 section 3.8); a full rate
# window is transient, as a full send-limit window is.
SENDER_NOT_IN_SCOPE = Reply(550, "5.7.1", "Sender is not allowed for this token")
TOKEN_RATE_LIMITED = Reply(451, "4.7.1", "Token rate limit reached")
BAD_MESSAGE = Reply(554, "5.6.0", "Message rejected")
# What the relay will not forward (relay.message.find_defect says why).
NUL_IN_MESSAGE = BAD_MESSAGE.but(
    "Message contains a NUL octet, which 8BITMIME content must not (RFC 6152 section 3)"
)
NO_HEADER_SECTION = BAD_MESSAGE.but("Message has no header section (RFC 5322 section 2.1)")
HEADER_TOO_BIG = MESSAGE_TOO_BIG.but("Header section over 64 KiB")
BAD_HEADER_FIELD = BAD_MESSAGE.but(
    "Malformed header field: each line must be a name of printable ASCII, a colon"
    " and the value, or a folded continuation (RFC 5322 section 2.2)"
)
TOO_MANY_HEADER_ADDRESSES = BAD_MESSAGE.but("Over 1000 addresses in one header field")
LONG_LINE = BAD_MESSAGE.but(
    "Line over 998 octets (RFC 5322 section 2.1.1); encode the body as quoted-printable or base64"
)
TOO_MANY_MIME_PARTS = BAD_MESSAGE.but("Over 100 MIME parts in one message")
# RFC 5322 section 3.6: exactly one From; and sender fields every parser reads alike.
ONE_FROM_REQUIRED = BAD_MESSAGE.but("Message must have exactly one From header (RFC 5322)")
UNCLEAN_SENDER_HEADER = BAD_MESSAGE.but(
    "From or Sender header is not a clean address list (RFC 5322 section 3.4)"
)
# The id is echoed in the 250 and kept in the delivery log; refused rather than
# replaced, since the application matches replies and bounces by the id it made
# (relay.message.message_id_of says what passes).
BAD_MESSAGE_ID = BAD_MESSAGE.but(
    "Message-ID header is not a valid msg-id of at most 250 octets (RFC 5322 section 3.6.4)"
)
ONE_MESSAGE_ID_ALLOWED = BAD_MESSAGE.but(
    "Message must have at most one Message-ID header (RFC 5322 section 3.6)"
)

# --- delivery --------------------------------------------------------------
DELIVERED = Reply(250, "2.0.0", "Ok")
NO_CHANNEL = Reply(451, "4.3.0", "No upstream channel for this sender domain")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error, message deferred; try again later")
# RFC 3463 4.3.1 (mail system full); RFC 1870 section 6.2 gives 452 for a SIZE
# over what the server can hold now.
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
UPSTREAM_THROTTLED = Reply(451, "4.7.0", "Upstream rate limit, try again later")
UPSTREAM_UNAVAILABLE = Reply(451, "4.3.0", "Upstream unavailable, message deferred")
UPSTREAM_REFUSED = Reply(554, "5.0.0", "Upstream refused the message")
# What the HTTP upstreams refuse for good, as RFC 3463 names it; each channel
# words the text through `upstream_refused` below; the codes stay these.
UPSTREAM_CONTENT_REFUSED = Reply(554, "5.6.0", "Upstream refused the content")  # X.6.0 media
UPSTREAM_BAD_RECIPIENT = Reply(550, "5.1.3", "Upstream refused a recipient address")  # X.1.3
UPSTREAM_BAD_SENDER = Reply(550, "5.1.7", "Upstream refused the sender address")  # X.1.7
UPSTREAM_BOUNCE = Reply(550, "5.1.1", "Upstream reports a permanent bounce")  # X.1.1
UPSTREAM_NOT_AUTHORIZED = Reply(550, "5.7.1", "Upstream does not let this sender send")  # X.7.1
UPSTREAM_TOO_BIG = Reply(552, "5.3.4", "Upstream refused the size")  # X.3.4


def ehlo(
    hostname: str, client: str, mechanisms: tuple[str, ...], size: int, *, starttls: bool = False
) -> list[str]:
    """The EHLO reply: exactly the documented extensions (RFC 2034 section 3: no
    enhanced codes on it). On the STARTTLS port before TLS: STARTTLS and no AUTH
    (`mechanisms` empty), so no client offers its token in plaintext."""
    lines = [
        f"{hostname} greets {one_line(client, 64)}",
        *(["STARTTLS"] if starttls else []),
        *(["AUTH " + " ".join(mechanisms)] if mechanisms else []),
        f"SIZE {size}",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
    ]
    return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]


def helo(hostname: str) -> str:
    return f"250 {hostname}"


# RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets, code and CRLF included.
_MAX_DELIVERED_TEXT = 512 - len("250 2.0.0 \r\n")


# The durable queue took the message (RELAY_QUEUE): committed to disk before this
# is written, delivered in the background, retried until RELAY_QUEUE_MAX_AGE.
QUEUED = Reply(250, "2.0.0", "Queued; delivery will be retried")


# Recorded, never sent: a queued message whose RELAY_QUEUE_MAX_AGE passed (RFC 3463
# X.4.7, delivery time expired). Its client had its 250; the record tells the end.
QUEUE_EXPIRED = Reply(550, "5.4.7", "Delivery time expired")


# Recorded, never sent: a queued message an operator cancelled (`relay queue cancel`).
QUEUE_CANCELLED = Reply(550, "5.0.0", "Cancelled by the relay's operator")


def queued(message_id: str) -> Reply:
    """`250 2.0.0 Queued as <id>; delivery will be retried`."""
    text = f"Queued as {message_id}; delivery will be retried"
    return Reply(QUEUED.code, QUEUED.enhanced, one_line(text, _MAX_DELIVERED_TEXT))


def delivered(message_id: str) -> Reply:
    """`250 2.0.0 Ok <id>`. The id is the client's msg-id (printable ASCII, at most
    250 octets) or an upstream's; `one_line` keeps either to printable ASCII on one
    line, whatever an upstream sent."""
    return Reply(
        DELIVERED.code, DELIVERED.enhanced, one_line(f"Ok {message_id}", _MAX_DELIVERED_TEXT)
    )


# aiosmtpd's built-in replies that carry no enhanced code, mapped to ours. The
# keys are the reply prefixes aiosmtpd 1.4.6 sends (aiosmtpd/smtp.py).
_BUILTIN: tuple[tuple[str, Reply], ...] = (
    ("250 OK", OK),
    ("221 Bye", CLOSING),
    ("500 Command line too long", LINE_TOO_LONG),
    ("500 Line too long", LINE_TOO_LONG),
    ("500 Error: bad syntax", BAD_SYNTAX.but("Syntax error")),
    ("500 Error: strict ASCII mode", BAD_SYNTAX.but("Non-ASCII command arguments")),
    ("500 Error: command", UNKNOWN_COMMAND),
    ("501 ", BAD_SYNTAX),
    ("502 ", NOT_IMPLEMENTED),
    ("503 Error: need MAIL", NEED_MAIL),
    ("503 Error: need RCPT", NEED_RCPT),
    ("503 Error: nested MAIL", NESTED_MAIL),
    ("503 Error: send", NEED_HELO),
    ("503 Already authenticated", AUTH_ALREADY),
    ("552 ", MESSAGE_TOO_BIG),
    ("553 ", BAD_RECIPIENT_ADDRESS),
    ("555 ", PARAMETER_UNKNOWN),
    ("252 ", CANNOT_VRFY),
    ("454 TLS not available", TLS_ALREADY_ACTIVE),
    ("530 Must issue a STARTTLS command first", STARTTLS_REQUIRED),
)
# aiosmtpd's reply to an unparseable MAIL or RCPT address: a recipient's code
# for both; the protocol picks ours by command.
AIOSMTPD_MALFORMED_ADDRESS = "553 5.1.3 Error: malformed address"
AIOSMTPD_TOO_MANY_UNKNOWN = "502 5.5.1 Too many unrecognized commands"
_HAS_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_CLASS_DEFAULT = {"2": "2.0.0", "4": "4.0.0", "5": "5.0.0"}


def normalize(line: str) -> str:
    """Give an aiosmtpd built-in reply its enhanced code (RFC 2034).

    Our own replies pass unchanged; 220 and 334 carry none by definition.
    """
    if line.startswith(AIOSMTPD_TOO_MANY_UNKNOWN):
        return str(TOO_MANY_UNKNOWN_COMMANDS)
    if line[:3] in ("220", "334") or _HAS_ENHANCED.match(line):
        return line
    if line[:3] == "354":
        return START_DATA
    for prefix, reply in _BUILTIN:
        if line.startswith(prefix):
            return str(reply)
    code, text = line[:3], line[4:]
    return f"{code} {_CLASS_DEFAULT.get(code[:1], '5.0.0')} {one_line(text)}"


# --- upstream outcomes -------------------------------------------------------
# Every reply a channel makes of what its upstream answered is built here, one
# function per outcome. The text names the channel first, so a client (and the
# log) can tell which upstream spoke.


class Refusal(Enum):
    """Why an upstream refused a message for good, as RFC 3463 classes it."""

    CONTENT = UPSTREAM_CONTENT_REFUSED  # X.6.0 other or undefined media error
    RECIPIENT = UPSTREAM_BAD_RECIPIENT  # X.1.3 bad destination mailbox address syntax
    SENDER = UPSTREAM_BAD_SENDER  # X.1.7 bad sender's mailbox address syntax
    BOUNCE = UPSTREAM_BOUNCE  # X.1.1 bad destination mailbox address
    NOT_AUTHORIZED = UPSTREAM_NOT_AUTHORIZED  # X.7.1 delivery not authorized
    TOO_BIG = UPSTREAM_TOO_BIG  # X.3.4 message too big for system
    OTHER = UPSTREAM_REFUSED  # X.0.0 other undefined status


def _upstream(base: Reply, channel: str, text: str) -> Reply:
    return Reply(base.code, base.enhanced, one_line(f"{channel}: {text}"))


def upstream_unavailable(channel: str, why: str) -> Reply:
    """451 4.3.0: the upstream could not be reached or its outcome is unknown.

    A 4xx whenever the message may have gone out: a client that sees 5xx does
    not retry.
    """
    return _upstream(UPSTREAM_UNAVAILABLE, channel, why)


def upstream_credentials_rejected(channel: str) -> Reply:
    """451 4.3.0: the upstream refused the relay's own credentials.

    A fault of the relay's configuration, not of the client or its message.
    """
    return upstream_unavailable(channel, "upstream rejected relay credentials")


def upstream_throttled(
    channel: str, why: str = "rate limited", retry_after: int | None = None
) -> Reply:
    """451 4.7.0: the upstream asks to slow down; its wait, in seconds, if it named one."""
    suffix = f"; retry after {retry_after} s" if retry_after is not None else ""
    return _upstream(UPSTREAM_THROTTLED, channel, why + suffix)


def upstream_refused(channel: str, refusal: Refusal, detail: str) -> Reply:
    """5xx: the upstream refused for good; the code says why, the detail in its words."""
    return _upstream(refusal.value, channel, detail)


def upstream_refused_as(channel: str, code: int, enhanced: str, reason: str) -> Reply:
    """5xx: an SMTP upstream's permanent refusal, under its own code.

    An enhanced code missing or not of the 5 class (RFC 3463 section 2: it
    must agree with the reply code) becomes 5.0.0.
    """
    assert 500 <= code < 600, code
    if not enhanced or enhanced[0] != "5":
        enhanced = "5.0.0"
    return Reply(code, enhanced, one_line(f"{channel}: {reason}"))


# The words of an upstream's refusal of a recipient it keeps on its own
# suppression list (Cloudflare's, found through its suppressions API): the relay
# records such a recipient as a `provider` suppression, for as long as the
# provider's shortest one lasts (relay.store.suppressions).
PROVIDER_SUPPRESSED = "recipient on the provider's suppression list"


def recipient_suppressed(address: str, reason: str, since: str) -> Reply:
    """550 5.1.1 at RCPT: the account's suppression list holds the address.

    >>> str(recipient_suppressed("bob@x.org", "hard-bounce", "2026-03-01"))
    '550 5.1.1 <bob@x.org>: suppressed (hard-bounce since 2026-03-01); ask the relay admin'
    """
    return RECIPIENT_SUPPRESSED.but(
        f"<{address}>: suppressed ({reason} since {since}); ask the relay admin"
    )


def local_error(channel: str, why: str) -> Reply:
    """451 4.3.0: the channel failed on this host, not upstream; the client retries."""
    return _upstream(LOCAL_ERROR, channel, why)
