"""`source_cidrs` networks as the loader reads them: a zone id, which nothing would compare, is refused."""

from __future__ import annotations

import pytest

from agent.config import load_policy_text
from agent.errors import ConfigErrors
from tests.unit.test_when_positions import HEAD


@pytest.mark.parametrize("network", ["fe80::%eth0/64", "fe80::%1/10"])
def test_a_network_with_a_zone_id_is_refused(network: str) -> None:
    # Python's ipaddress keeps the zone but `in` ignores it: "only eth0's link-local hosts" would admit every
    # interface's. A source address carries no zone from Envoy anyway.
    with pytest.raises(ConfigErrors) as caught:
        load_policy_text(HEAD + f'    allow: {{source_cidrs: ["{network}"]}}\n', "p.yaml")
    (error,) = caught.value.errors
    assert error.line == 9 and "zone" in error.message


def test_networks_without_a_zone_load() -> None:
    policy = load_policy_text(HEAD + '    allow: {source_cidrs: ["fe80::/10", 10.0.0.0/8, "::ffff:10.0.0.0/104"]}\n')
    assert [str(n) for n in policy.routes[0].allow[0].source_cidrs] == ["fe80::/10", "10.0.0.0/8", "10.0.0.0/8"]
