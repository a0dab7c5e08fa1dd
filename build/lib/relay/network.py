"""Client addresses: which traffic stays on the machine, and whom a connection counts for."""

from __future__ import annotations

import ipaddress

# RFC 4291 section 2.5.4: an IPv6 unicast address is a 64-bit prefix and a
# 64-bit interface identifier the host picks itself (and rotates: RFC 8981
# temporary addresses), so one host holds a whole /64.
IPV6_CLIENT_PREFIX = 64


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1: traffic that never leaves the machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_key(address: str) -> str:
    """What one client's connections and failed AUTH are counted under.

    An IPv4 address is its own key; an IPv6 one is its /64, so a host rotating
    through its interface identifiers gains nothing; an IPv4-mapped IPv6
    address (an IPv4 client of a dual-stack listener, RFC 4291 section
    2.5.5.2) is its IPv4 address. Anything else (no IP address) is kept as is.

    >>> client_key("2001:db8::1"), client_key("::ffff:192.0.2.1")
    ('2001:db8::/64', '192.0.2.1')
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    host_bits = 128 - IPV6_CLIENT_PREFIX
    prefix = ipaddress.IPv6Address(int(ip) >> host_bits << host_bits)
    return f"{prefix}/{IPV6_CLIENT_PREFIX}"
