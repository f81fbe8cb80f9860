"""IP masking (DESIGN obligation 5): IPv4 keeps /24, IPv6 keeps /48."""

from __future__ import annotations

import ipaddress

IPV4_PREFIX = 24
IPV6_PREFIX = 48


def mask_ip(raw: str) -> str:
    """Mask an IP address, raising ValueError for anything that is not one."""
    address = ipaddress.ip_address(raw.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return str(network.network_address)
