"""IP masking (DESIGN obligation 5): IPv4 keeps /24, IPv6 keeps /48."""

from __future__ import annotations

import ipaddress

IPV4_PREFIX = 24
IPV6_PREFIX = 48
# masking the integer is several times cheaper than building an ip_network per address
_IPV4_MASK = ((1 << IPV4_PREFIX) - 1) << (32 - IPV4_PREFIX)
_IPV6_MASK = ((1 << IPV6_PREFIX) - 1) << (128 - IPV6_PREFIX)


def mask_ip(raw: str) -> str:
    """Mask an IP address, raising ValueError for anything that is not one."""
    address = ipaddress.ip_address(raw.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 4:
        return str(ipaddress.IPv4Address(int(address) & _IPV4_MASK))
    return str(ipaddress.IPv6Address(int(address) & _IPV6_MASK))
