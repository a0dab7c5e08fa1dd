"""Pure message handling: addresses, line endings, and the submission fix-ups.

No I/O here. The session hands the bytes aiosmtpd collected to `prepare`, which
returns the exact bytes every channel forwards.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import HeaderRegistry
from email.utils import format_datetime, getaddresses
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WSP = b" \t"  # RFC 5322 section 2.2.2: folding white space is made of these
# A dot-atom domain (RFC 5321 section 4.1.2) or an address literal; labels of
# letters, digits and hyphens. Internationalised names arrive as A-labels.
_DOMAIN = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9-]+")
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_HEADER_END = b"\r\n\r\n"


def parse_address(address: str) -> tuple[str, str] | None:
    """Split an envelope address into (local part, lower-cased domain), or None if unusable.

    Refuses control characters (aiosmtpd would take `"b\\rDATA"@y` as `b\\rDATA@y`,
    a header-injection vector), non-ASCII (no SMTPUTF8 here) and a bad domain.
    """
    if not address or _CONTROL.search(address) or not address.isascii():
        return None
    local, at, domain = address.rpartition("@")
    # RFC 5321 section 4.5.3.1: 64-octet local part, 254-octet path.
    if not at or not local or len(local) > 64 or len(address) > 254:
        return None
    if not _DOMAIN.fullmatch(domain):
        return None
    return local, domain.lower()


# RFC 5321 section 4.1.2: a local part is a Dot-string or a Quoted-string. The
# dots are not checked for placement (`a.@x`, `a..b@x` exist in the wild, and
# the upstream decides); the domain is checked by `parse_address`.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_MAILBOX = rf"((?:{_ATEXT}+|{_QUOTED})@[!-;=?A-~]+)"  # printable ASCII but <, > and @
_PATH = re.compile(r"<(?:@[^:<>\s]+:)?" + _MAILBOX + ">")  # a source route is ignored
_BARE_PATH = re.compile(_MAILBOX)
_DOT_STRING = re.compile(rf"{_ATEXT}+")


def parse_path(arg: str) -> tuple[str | None, str | None]:
    """Split a MAIL or RCPT argument into (address, parameters) (RFC 5321 section 4.1.2).

    `<local@domain> PARAMS`, the null path `<>`, and a bare `local@domain` (which
    clients still send) are taken; anything else, comments and control
    characters included, is (None, None). A quoted local part that needs no
    quotes loses them, so `"john"@x` and `john@x` are one address.

        >>> parse_path("<a@b.test> SIZE=10")
        ('a@b.test', 'SIZE=10')
        >>> parse_path('<"jo hn"@b.test>')
        ('"jo hn"@b.test', '')
        >>> parse_path("<a(comment)@b.test>")
        (None, None)
    """
    arg = arg.strip()
    if not arg:
        return "", ""
    if arg.startswith("<>"):
        return "<>", arg[2:].strip()
    match = (_PATH if arg.startswith("<") else _BARE_PATH).match(arg)
    if match is None:
        return None, None
    rest = arg[match.end() :]
    if rest and not arg.startswith("<") and not rest[0].isspace():
        return None, None  # `a@b.test>`: a closing bracket with no opening one
    address = match.group(1)
    local, _, domain = address.rpartition("@")
    if local.startswith('"') and _DOT_STRING.fullmatch(unquoted := local[1:-1]):
        address = f"{unquoted}@{domain}"
    return address, rest.strip()


def normalize_address(address: str) -> str:
    """The key an address is metered and listed under.

    Lower-cased whole: Foo@x and foo@x reach the same mailbox at every real
    provider, so they must not get two default balances.
    """
    return address.strip().lower()


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def to_crlf(content: bytes) -> bytes:
    """Every line ending CRLF (RFC 5322 section 2.3). Bare CR or LF are rewritten.

    aiosmtpd only ends DATA on CRLF.CRLF (so a bare LF cannot smuggle a second
    message), but bare CR and LF still reach us inside lines.
    """
    crlf = content.count(b"\r\n")
    if crlf == content.count(b"\n") == content.count(b"\r"):
        return content
    return _LINE_ENDINGS.sub(b"\r\n", content)


# --- what the relay refuses to forward ----------------------------------------------

# Bounds on what one message may make the relay parse (each parse is linear in
# these, and a parser that reads a field differently from the next hop is how
# a sender check is bypassed).
MAX_HEADER_SECTION = 64 * 1024
MAX_HEADER_ADDRESSES = 1000  # per address field (From, To, Cc, ...)
MAX_MIME_PARTS = 100
MAX_LINE = 998  # octets before CRLF (RFC 5322 section 2.1.1)

# RFC 5322 section 3.6.8: a field name is printable ASCII but the colon.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_ADDRESS_FIELDS = frozenset({b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc"})
_CHECKED_FIELDS = _ADDRESS_FIELDS | {b"content-type", b"message-id"}
_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)


class Defect(enum.Enum):
    """Why a message cannot be forwarded as it is; `relay.policy` words the reply."""

    NUL = "a NUL octet"
    NO_HEADER_SECTION = "no header section"
    HEADER_TOO_BIG = "a header section over 64 KiB"
    BAD_FIELD = "a malformed header field"
    TOO_MANY_ADDRESSES = "an address field with over 1000 addresses"
    LONG_LINE = "a line over 998 octets"
    TOO_MANY_PARTS = "over 100 MIME parts"
    BAD_MESSAGE_ID = "a Message-ID that is not a msg-id"
    MESSAGE_IDS = "more than one Message-ID field"


def _head(content: bytes) -> bytes:
    """The header section: up to the first empty line, without the CRLF that ends it."""
    end = content.find(_HEADER_END)
    return content[:end] if end >= 0 else content.removesuffix(b"\r\n")


def find_defect(content: bytes, fields: dict[bytes, list[str]] | None = None) -> Defect | None:
    """The first reason `content` (CRLF line endings) cannot be forwarded, or None.

    - NUL: RFC 6152 section 3 (and RFC 5322) allow none, and a next hop that
      drops NUL before looking for the end of data would see `CRLF NUL . CRLF`
      as the end: SMTP smuggling.
    - The header section must be there and read the same to every parser: each
      line a field (a printable name, then the colon, no space between) or the
      folded continuation of one (RFC 5322 sections 2.2 and 3.6.8). A message
      that starts with an empty line has no header at all.
    - At most one Message-ID (RFC 5322 section 3.6), and that one a msg-id
      (`message_id_of`); an empty one is as good as none: the relay adds its own.
    - Bounds on the work a message can cause: header size, addresses per field,
      MIME parts; and the 998-octet line of RFC 5322 section 2.1.1, which an
      upstream would refuse after the relay charged for the message.
    """
    if b"\0" in content:
        return Defect.NUL
    head = _head(content)
    if not head or content.startswith(b"\r\n"):
        return Defect.NO_HEADER_SECTION
    if len(head) > MAX_HEADER_SECTION:
        return Defect.HEADER_TOO_BIG
    current = b""
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not current:
                return Defect.BAD_FIELD  # a continuation of nothing
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            return Defect.BAD_FIELD
        current = name.lower()
    if fields is None:
        fields = header_fields(head, _CHECKED_FIELDS)
    if any(
        value.count("@") > MAX_HEADER_ADDRESSES
        for name in _ADDRESS_FIELDS
        for value in fields.get(name, ())
    ):
        return Defect.TOO_MANY_ADDRESSES
    ids = fields.get(b"message-id", [])
    if len(ids) > 1:
        return Defect.MESSAGE_IDS
    if ids and not _blank(ids[0]) and message_id_of(ids[0]) is None:
        return Defect.BAD_MESSAGE_ID
    if max(map(len, content.split(b"\r\n"))) > MAX_LINE:
        return Defect.LONG_LINE
    # Parts exist only under a multipart (or an attached message) at the top:
    # a text message needs no scan of its body for boundaries.
    kinds = " ".join(fields.get(b"content-type", ())).lower()
    if ("multipart" in kinds or "message/" in kinds) and _mime_parts(content) > MAX_MIME_PARTS:
        return Defect.TOO_MANY_PARTS
    return None


def _mime_parts(content: bytes) -> int:
    """Body parts of every multipart (RFC 2046 section 5.1.1): delimiters less closings."""
    parts = 0
    for quoted, bare in set(_BOUNDARY.findall(content)):
        delimiter = b"\r\n--" + (quoted or bare)
        parts += content.count(delimiter) - content.count(delimiter + b"--")
    return parts


@dataclass(frozen=True, slots=True)
class Prepared:
    """A message ready to forward, with what the policy needs to know about it."""

    content: bytes
    message_id: str
    # Addresses in From: and Sender:, or None when a field is not a clean
    # address list that every parser reads the same way.
    header_senders: tuple[str, ...] | None
    from_count: int
    idempotency_key: str  # stable across a client's retry of the same message
    defect: Defect | None = None  # set: nothing else here is meaningful


def prepare(
    content: bytes,
    *,
    sender: str,
    recipients: tuple[str, ...],
    hostname: str,
    now: datetime | None = None,
) -> Prepared:
    """Normalize line endings and add `Message-ID` and `Date` when missing.

    RFC 6409 section 8.2 and 8.3: a submission server may add the Date and
    Message-ID a client left out.
    """
    content = to_crlf(content)
    fields = header_fields(_head(content), _WANTED)  # parsed once, for both uses
    defect = find_defect(content, fields)
    if defect is not None:
        return Prepared(content, "", None, 0, "", defect)

    digest = hashlib.sha256()
    digest.update(sender.encode() + b"\0" + b"\0".join(r.encode() for r in recipients) + b"\0")
    digest.update(content)

    added = []
    replaced: set[bytes] = set()  # fields present but empty: ours replace them
    # find_defect let through only one Message-ID, and that one empty or a msg-id.
    message_id = message_id_of(fields.get(b"message-id", [""])[0]) or ""
    if not message_id:
        message_id = f"<{secrets.token_urlsafe(24)}@{hostname}>"
        added.append(b"Message-ID: " + message_id.encode() + b"\r\n")
        # The client gave no identity of its own: this send is unique, mix in ours.
        digest.update(message_id.encode())
        if b"message-id" in fields:
            replaced.add(b"message-id")
    if not _clean_header(fields.get(b"date")):
        date = format_datetime(now or datetime.now(UTC))
        added.append(b"Date: " + date.encode() + b"\r\n")
        if b"date" in fields:
            replaced.add(b"date")
    if replaced:
        content = _without_fields(content, replaced)
    if added:
        content = b"".join(added) + content

    senders: list[str] | None = []
    from_values = fields.get(b"from", [])
    for value in [*from_values, *fields.get(b"sender", [])]:
        found = mailbox_addresses(value)
        if found is None or senders is None:
            senders = None
            continue
        senders.extend(found)
    return Prepared(
        content=content,
        message_id=message_id,
        header_senders=None if senders is None else tuple(senders),
        from_count=len(from_values),
        idempotency_key=digest.hexdigest(),
    )


_FIELDS = frozenset({b"from", b"sender", b"message-id", b"date"})
_WANTED = _FIELDS | _CHECKED_FIELDS
_ATOM_ADDR = r"([^\s<>()\[\]\\,;:@\"]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
_BARE = re.compile(r"\s*" + _ATOM_ADDR + r"\s*")
_NAMED = re.compile(r'\s*(?:[^<>()\[\]\\,;:@"]*|"[^"\\]*")\s*<' + _ATOM_ADDR + r">\s*")
_REGISTRY = HeaderRegistry()


def mailbox_addresses(value: str) -> list[str] | None:
    """The addresses of a From: or Sender: field, or None unless they are unambiguous.

    The sender check and the channels must see the same addresses: a field
    that two parsers read differently (`x@victim.test y@own.test`, stray
    specials, comments nested thousands deep) could pass the check as one
    address and reach an upstream as another. The common forms match a strict
    pattern; anything else must parse without defects, identically, with both
    the email package's header registry (what the Resend translation uses) and
    `getaddresses`.
    """
    if simple := _BARE.fullmatch(value) or _NAMED.fullmatch(value):
        return [simple.group(1)]
    try:
        # The registry makes an AddressHeader for "from" (typeshed cannot say so).
        header: Any = _REGISTRY("from", value)
        strict = [a.addr_spec for a in header.addresses]
        loose = [addr for _, addr in getaddresses([value])]
    except (RecursionError, ValueError, IndexError, TypeError, AttributeError):
        return None
    if header.defects or not strict or strict != loose:
        return None
    if any(parse_address(address) is None for address in strict):
        return None
    return strict


def header_fields(head: bytes, wanted: frozenset[bytes] = _FIELDS) -> dict[bytes, list[str]]:
    """The header fields prepare() needs, unfolded (RFC 5322 section 2.2.3), by lower-cased name.

    Only WSP (space and tab, RFC 5322 section 2.2.2) is trimmed: a form feed or
    vertical tab is part of the value, for the checks to see.

    A scan of the header block instead of the email package's parser, which
    cost more than the rest of preparing a small message together.
    """
    pieces: dict[bytes, list[list[bytes]]] = {}
    current: list[bytes] | None = None
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line.strip(_WSP))  # joined once below: linear however folded
            continue
        name, colon, value = line.partition(b":")
        key = name.strip().lower()
        if colon and key in wanted:
            current = [value.strip(_WSP)]
            pieces.setdefault(key, []).append(current)
        else:
            current = None
    return {
        key: [b" ".join(p).decode("utf-8", "replace") for p in values]
        for key, values in pieces.items()
    }


def _without_fields(content: bytes, names: set[bytes]) -> bytes:
    """`content` without the header fields named (lower-cased), folded lines included.

    RFC 5322 section 3.6 allows one Message-ID and one Date: an empty one the
    relay replaces must go, or the message would carry two.
    """
    end = content.find(_HEADER_END)
    head, rest = (content[:end], content[end:]) if end >= 0 else (content, b"")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.partition(b":")[0].strip().lower() in names
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + rest


def _clean_header(values: list[str] | None) -> str:
    text = " ".join(values[0].split()) if values else ""
    return text if text and not _CONTROL.search(text) else ""


# --- Message-ID -----------------------------------------------------------------------

# RFC 5322 section 3.6.4: msg-id = [CFWS] "<" id-left "@" id-right ">" [CFWS], where
# id-left = dot-atom-text and id-right = dot-atom-text / no-fold-literal.
_ATOM_TEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # atext, RFC 5322 section 3.2.3
_DOT_ATOM_TEXT = rf"{_ATOM_TEXT}(?:\.{_ATOM_TEXT})*"
_NO_FOLD_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]*\]"  # "[" *dtext "]"
_MSG_ID = re.compile(rf"<{_DOT_ATOM_TEXT}@(?:{_DOT_ATOM_TEXT}|{_NO_FOLD_LITERAL})>")
# RFC 5536 section 3.1.3 (Netnews): a msg-id, brackets included, is at most 250
# octets. RFC 5322 sets no bound but the 998-octet line; this one keeps the id
# the relay echoes in its 250 reply well inside RFC 5321's 512-octet reply line.
MAX_MESSAGE_ID = 250


def message_id_of(value: str) -> str | None:
    """The msg-id of a Message-ID field's unfolded value, without the CFWS around it.

    None unless the value is one RFC 5322 section 3.6.4 msg-id of at most
    `MAX_MESSAGE_ID` octets, with only white space and comments around it.

        >>> message_id_of(" <1.2@host.example> (sent by cron)")
        '<1.2@host.example>'
        >>> message_id_of('<x"><img src=x>@example.com>') is None
        True

    Refused, not repaired: the id is the application's (it keeps it to match
    replies and bounces), so a relay-made replacement would break that match
    without telling anyone, where a 554 tells the developer. What every client
    that generates ids sends passes (email.utils.make_msgid, Nodemailer,
    PHPMailer, Jakarta Mail, Thunderbird, Outlook, Gmail: dot-atom-text on
    both sides). The obsolete forms of RFC 5322 section 4.5.4 (a quoted-string
    or comments inside the brackets) are refused: section 4 says they must not
    be generated, and they are what would carry quotes, spaces and angle
    brackets into the reply, the log and the delivery log.
    """
    start = _skip_cfws(value, 0)
    match = _MSG_ID.match(value, start) if start >= 0 else None
    if match is None or match.end() - match.start() > MAX_MESSAGE_ID:
        return None
    if _skip_cfws(value, match.end()) != len(value):
        return None
    return match.group()


def _skip_cfws(text: str, at: int) -> int:
    """Where the CFWS (RFC 5322 section 3.2.2) starting at `at` ends; -1 if a comment
    is left open or holds anything but printable ASCII and WSP.

    One pass with a depth counter: comments nest, and no recursion bounds how deep.
    """
    depth = 0
    while at < len(text):
        char = text[at]
        if depth and not (" " <= char <= "~" or char == "\t"):
            return -1  # obs-ctext (controls) and 8-bit text: no client needs them here
        if depth and char == "\\":
            at += 1  # a quoted-pair: the next character is taken literally
            if at < len(text) and not (" " <= text[at] <= "~" or text[at] == "\t"):
                return -1
        elif char == "(":
            depth += 1
        elif depth and char == ")":
            depth -= 1
        elif not depth and char not in " \t":
            break
        at += 1
    return -1 if depth else at


def _blank(value: str) -> bool:
    return not value.strip(" \t")
