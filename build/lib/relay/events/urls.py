"""Which URL a webhook may reach: the relay must not become a way into its own network.

An endpoint is `https://`; plain `http://` only to a loopback host (a test
receiver), which the relay warns about. Every address its host resolves to
must be public: loopback, private (RFC 1918, RFC 4193), link-local (which holds
the clouds' metadata service, 169.254.169.254 and fd00:ec2::254), shared,
reserved, multicast and unspecified ranges are refused, at creation and again
at each send (a name may resolve elsewhere by then: DNS rebinding), unless
RELAY_WEBHOOK_ALLOW_PRIVATE=true. The send then connects to the address that
was checked, never to a second resolution.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from relay.errors import Invalid
from relay.network import is_loopback

MAX_URL = 2000
# Metadata services outside the link-local range (AWS's IPv6 one, Alibaba's).
METADATA = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)


@dataclass(frozen=True, slots=True)
class Target:
    """A checked endpoint: where to connect, and what to call the host there."""

    url: str
    scheme: str
    host: str
    port: int
    address: str  # the checked IP the request goes to


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an endpoint URL, or `Invalid` (never echoing the URL:
    its path may hold a receiver's secret)."""
    if len(url) > MAX_URL or any(c.isspace() or not c.isprintable() for c in url):
        raise Invalid("webhook URL: at most 2000 printable characters", code="bad_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Invalid(
            "webhook URL: not a URL (expected https://host/path)", code="bad_url"
        ) from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("https", "http") or not host:
        raise Invalid("webhook URL: expected https://host/path", code="bad_url")
    if "@" in parts.netloc:
        raise Invalid("webhook URL: credentials in the URL are refused", code="bad_url")
    if parts.fragment:
        raise Invalid("webhook URL: takes no #fragment", code="bad_url")
    if scheme == "http" and not is_loopback(host):
        raise Invalid(
            "webhook URL: plain http:// only to a loopback host (a test receiver); use https://",
            code="bad_url",
        )
    return scheme, host, port or (443 if scheme == "https" else 80)


def refused_address(address: str) -> str | None:
    """Why an endpoint may not be reached at `address`, or None when it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA:
        return "a metadata service"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata)"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
        return "private or reserved"
    if not ip.is_global:
        return "not public"
    return None


async def resolve(url: str, *, allow_private: bool) -> Target:
    """The endpoint checked and resolved, every address public (unless allowed), or `Invalid`."""
    scheme, host, port = parse(url)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise Invalid(f"webhook URL: {host[:100]} does not resolve", code="bad_url") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise Invalid(f"webhook URL: {host[:100]} does not resolve", code="bad_url")
    if not allow_private:
        for address in addresses:
            why = refused_address(address)
            if why is not None:
                raise Invalid(
                    f"webhook URL: {host[:100]} resolves to {why} address {address}"
                    " (RELAY_WEBHOOK_ALLOW_PRIVATE=true allows it)",
                    code="private_address",
                )
    return Target(url, scheme, host, port, addresses[0])
