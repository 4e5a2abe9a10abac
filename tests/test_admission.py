"""What the relay's per-source limits count by."""

from __future__ import annotations

import pytest

from hatchway.relay.server import source_key


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),  # the same host's /64: one source
        ("2001:db8:1:3::9", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client on a dual-stack socket
        ("not an address", "not an address"),
    ],
)
def test_an_ipv6_host_is_one_source_whatever_address_of_its_64_it_uses(
    address: str, key: str
) -> None:
    assert source_key(address) == key
