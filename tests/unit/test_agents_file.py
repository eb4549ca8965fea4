"""agents.yaml: read as strictly as a policy (file:line errors), matched exactly against a certificate's SANs."""

from __future__ import annotations

import pytest

from agent.controlplane.agents import PeerIdentity, parse_agents
from agent.controlplane.tls import is_loopback
from agent.errors import ConfigError

GOOD = """agents:
  - identity: spiffe://example.org/ns/shop/sa/orders   # a URI SAN
    services: [orders]
  - identity: orders.shop.svc.cluster.local             # a DNS SAN
    services: [orders, orders-canary]
admins:
  - spiffe://example.org/ns/ops/sa/operator
"""


def test_identities_match_uri_or_dns_sans_exactly() -> None:
    agents = parse_agents(GOOD, "agents.yaml")
    spiffe = PeerIdentity(uris=("spiffe://example.org/ns/shop/sa/orders",), dns=())
    assert agents.services_of(spiffe) == {"orders"}
    both = PeerIdentity(uris=("spiffe://example.org/ns/shop/sa/orders",), dns=("orders.shop.svc.cluster.local",))
    assert agents.services_of(both) == {"orders", "orders-canary"}
    # A DNS name is never matched against URI SANs (and the other way round), nor by prefix or suffix.
    assert agents.services_of(PeerIdentity(uris=("orders.shop.svc.cluster.local",), dns=())) is None
    assert agents.services_of(PeerIdentity(uris=("spiffe://example.org/ns/shop/sa/orders/x",), dns=())) is None
    assert agents.services_of(PeerIdentity(uris=(), dns=("x.orders.shop.svc.cluster.local",))) is None
    assert agents.is_admin(PeerIdentity(uris=("spiffe://example.org/ns/ops/sa/operator",), dns=()))
    assert not agents.is_admin(spiffe)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("agents:\n  - identity: a\n    services: [x]\n    service: [y]\n", 4, "unknown key 'service'"),
        ("agents:\n  - identity: a\n    services: x\n", 3, "must be a non-empty list"),
        ("agents:\n  - identity: a\n    services: []\n", 3, "must be a non-empty list"),
        ("agents:\n  - identity: ''\n    services: [x]\n", 2, "must be a non-empty string"),
        ("agents:\n  - identity: a\n    services: [x]\n  - identity: a\n    services: [y]\n", 4, "listed twice"),
        ("agents:\n  - identity: '*.shop'\n    services: [x]\n", 2, "no wildcards"),
        ("agents:\n  - services: [x]\n", 2, "needs 'identity'"),
        ("agents: {}\n", 1, "must be a list"),
        ("admins: [a, a]\n", 1, "listed twice"),
        ("admins: [a]\nextra: 1\n", 2, "unknown key 'extra'"),
        ("agents:\n  - identity: a\n    identity: b\n", 3, "duplicate key"),
        ("- a\n", 1, "must be a mapping"),
    ],
)
def test_a_bad_file_is_an_error_at_its_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_agents(text, "agents.yaml")
    assert e.value.line == line and message in str(e.value) and str(e.value).startswith(f"agents.yaml:{line}: ")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("10.0.0.1", False), ("::", False), ("cp.internal", False), ("", False)],
)  # fmt: skip
def test_plain_text_is_for_loopback_only(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
