"""What the HTTP channels (Resend, Cloudflare) share: the client, retry-after, failures."""

from __future__ import annotations

import httpx


def client(timeout: float) -> httpx.AsyncClient:
    """One client per upstream, kept alive across messages, every call bounded."""
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), headers={"User-Agent": "relay"})


def retry_after_seconds(header: str | None) -> int | None:
    # RFC 9110 section 10.2.3 also allows an HTTP date; only seconds are worth
    # repeating to an SMTP client.
    if header and header.strip().isdigit():
        return int(header.strip())
    return None


def describe(exc: Exception, url_setting: str) -> str:
    """One clean line for an httpx failure, naming the setting when it is ours."""
    if isinstance(exc, httpx.TimeoutException):
        return "upstream timed out"
    if isinstance(exc, httpx.ConnectError):
        return "upstream unreachable (connection failed)"
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return f"{url_setting} is not a usable URL"
    return f"upstream connection failed ({type(exc).__name__})"
