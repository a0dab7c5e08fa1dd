"""The AUTH exchange (RFC 4954): SASL PLAIN (RFC 4616) and LOGIN, and the token check.

The username is the documented literal `api_token` and the password an API
token. `check_credentials` runs one exchange and answers the principal the
token belongs to, or the reply for why not; the protocol sends the
challenges (`Challenge`) and keeps the counts of failures.
"""

from __future__ import annotations

import binascii
import hmac
import logging
from base64 import b64decode
from collections.abc import Awaitable, Callable

from relay import metrics, replies
from relay.errors import StoreError
from relay.replies import Reply
from relay.store.facade import Principal
from relay.store.loop import AsyncStore
from relay.tokenrules import network_allowed

log = logging.getLogger("relay.protocol")

API_TOKEN_USER = b"api_token"  # the documented literal username
MECHANISMS = ("PLAIN", "LOGIN")

# Sends a 334 challenge and returns the client's answer line (None: too long).
Challenge = Callable[[bytes], Awaitable[bytes | None]]


async def check_credentials(
    store: AsyncStore,
    challenge: Challenge,
    mechanism: str,
    initial: str | None,
    peer: str,
    address: str = "",
) -> Principal | Reply:
    """One AUTH exchange: the principal of a good token, else the reply to send.

    A good token used from outside its client networks (`address`, the
    client's IP address) gets the reply of a wrong one, so the answer tells an
    attacker nothing; only the operator's log says why.
    """
    if mechanism == "PLAIN":
        blob = await _sasl_response(challenge, initial, b"")
        if isinstance(blob, Reply):
            return blob
        parts = blob.split(b"\0")
        if len(parts) != 3:
            return replies.AUTH_PLAIN_UNSPLITTABLE
        authzid, user, token = parts
        # RFC 4616 section 2: an authorization identity other than the
        # authentication one asks to act as someone else; Cyrus and Dovecot
        # refuse it too. Empty or `api_token` is the session's own.
        if authzid and not hmac.compare_digest(authzid, API_TOKEN_USER):
            log.info("%s AUTH failed: authorization identity given", peer)
            return replies.AUTH_FAILED
    else:
        user_blob = await _sasl_response(challenge, initial, b"Username:")
        if isinstance(user_blob, Reply):
            return user_blob
        token_blob = await _sasl_response(challenge, None, b"Password:")
        if isinstance(token_blob, Reply):
            return token_blob
        user, token = user_blob, token_blob
    # Compare the username in constant time too, and look the token up even
    # when the username is wrong, so neither answer is faster than the other.
    user_ok = hmac.compare_digest(user, API_TOKEN_USER)
    try:
        principal = await store.authenticate(token.decode("utf-8", "surrogateescape"))
    except StoreError as exc:
        if not store.logged(exc):
            log.exception("token lookup failed")
        return replies.LOCAL_ERROR
    if principal is None or not user_ok:
        log.info("%s AUTH failed", peer)
        return replies.AUTH_FAILED
    if not network_allowed(principal.networks, address):
        log.info(
            "%s AUTH failed: network: token=%s is not allowed from %s",
            peer,
            principal.token_id,
            address,
        )
        metrics.refused_by("network")
        return replies.AUTH_FAILED
    log.info("%s AUTH ok token=%s account=%s", peer, principal.token_id, principal.account)
    return principal


async def _sasl_response(challenge: Challenge, initial: str | None, prompt: bytes) -> bytes | Reply:
    """Decode an initial response, or send a 334 challenge and decode the answer."""
    if initial is not None:
        text = initial.encode()
    else:
        line = await challenge(prompt)
        if line is None:
            return replies.AUTH_LINE_TOO_LONG
        text = line.strip()
    if text == b"*":
        return replies.AUTH_ABORTED
    if text == b"=":  # RFC 4954 section 4: an empty initial response
        return b""
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return replies.AUTH_BAD_BASE64
