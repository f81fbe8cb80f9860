"""Recorded IPs are masked (DESIGN obligation 5): IPv4 keeps /24, IPv6 keeps /48."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer.masking import mask_ip


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("192.0.2.41", "192.0.2.0"),
        (" 10.1.2.255 ", "10.1.2.0"),
        ("2001:db8:1234:5678::9", "2001:db8:1234::"),
        ("::ffff:10.1.2.3", "10.1.2.0"),
    ],
)
def test_examples(raw: str, masked: str) -> None:
    assert mask_ip(raw) == masked


@given(st.ip_addresses())
def test_masking_equals_the_network_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return
    prefix = 24 if address.version == 4 else 48
    expected = ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address
    assert mask_ip(str(address)) == str(expected)


def test_not_an_address() -> None:
    with pytest.raises(ValueError):
        mask_ip("999.1.1.1")
