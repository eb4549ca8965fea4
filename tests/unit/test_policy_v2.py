"""Policy language v2 as the engine decides it: alternatives, deny rules, `when`, networks, headers, claim limit
keys, accepted providers, the clock and the remembered-allow path. Real tokens, the real engine, real CEL."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent import reasons as R
from agent.audit.records import decision_record
from agent.authn.jwks import KeyStore
from agent.config import Policy, load_policy_text
from agent.config.model import Networks
from agent.decision import Decision, RequestView
from agent.engine import Engine
from agent.errors import ConfigErrors
from agent.policy.cel import CelCompileError, compile_when
from agent.policy.conditions import MAX_WHEN_REQUEST_BYTES
from tests.clock import Clock
from tests.conftest import idp_block
from tests.keys import SigningKey, claims, jwks, mint

PARTNER = "https://partner.example.test"
PARTNER_IDP = f"""\
  partner:
    issuer: {PARTNER}
    jwks_file: jwks.json
    audiences: [orders-api]
    algorithms: [ES256]
    min_refetch_s: 0
"""


def policy_text(routes: str, top: str = "", partner: bool = False) -> str:
    """A policy whose provider `corp` (and `partner`) reads jwks.json, which holds every session key."""
    body = "version: 1\nservice: orders\n" + idp_block("jwks_file: jwks.json")
    return body + (PARTNER_IDP if partner else "") + top + routes


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the first line of `text` holding `needle`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


class ListAudit:
    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def submit(self, view: RequestView, decision: Decision, policy: Policy, now: float) -> None:
        self.records.append(decision_record(view, decision, policy, now))


@dataclass
class Agent:
    """One engine over one policy, with a frozen clock, and the helpers the tests call it through."""

    engine: Engine
    policy: Policy
    text: str
    clock: Clock
    key: SigningKey
    audit: ListAudit = field(default_factory=ListAudit)

    def token(self, **overrides: Any) -> str:
        now = int(self.clock.now)
        return mint(self.key, claims(iat=now, exp=now + 300, **overrides))

    def decide(
        self,
        path: str,
        token: str | None = None,
        method: str = "GET",
        source: str = "10.1.2.3",
        trace: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
        **named: str,  # x_debug="1" is the header x-debug
    ) -> Decision:
        hdrs = {**(headers or {}), **{k.replace("_", "-"): v for k, v in named.items()}}
        if token is not None:
            hdrs["authorization"] = f"Bearer {token}"
        d = self.engine.decide(RequestView(method=method, path=path, headers=hdrs, source=source), trace)
        assert isinstance(d, Decision), "a decision with cached keys and local buckets needs no I/O"
        assert d.reason != R.INTERNAL_ERROR
        return d


Build = Callable[..., Awaitable[Agent]]


@pytest.fixture
def build(tmp_path: Path, keys: dict[str, SigningKey]) -> Build:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(*keys.values())))

    async def make(routes: str, top: str = "", partner: bool = False, now: float | None = None) -> Agent:
        text = policy_text(routes, top, partner)
        policy = load_policy_text(text, str(tmp_path / "policy.yaml"), tmp_path)
        clock = Clock(now)
        agent = Agent(Engine.for_policy(policy, clock=clock), policy, text, clock, keys["ES256"])
        agent.engine.audit = agent.audit
        for store in agent.engine.stores.values():
            assert await store.refresh()
        return agent

    return make


def www_authenticate(d: Decision) -> str | None:
    return dict(d.response_headers).get("www-authenticate")


# ---------------------------------------------------------------------------------------------------------------
# Alternatives: a list decides exactly as the OR of one-alternative policies (hypothesis).

TENANT_ROUTE = """\
routes:
  - name: r
    match: {{path: "/v1/tenants/{{tenant}}/orders"}}
    authn: [jwt]
    allow: {allow}
"""

# Conditions an alternative is made of: (key, value), at most one per key in an alternative.
CONDITION_POOL: list[tuple[str, Any]] = [
    ("scopes_any", ["orders:read"]),
    ("scopes_any", ["orders:write"]),
    ("roles_any", ["support"]),
    ("roles_any", ["admin", "support"]),
    ("claims", {"tenant_id": "acme"}),
    ("claims", {"tenant_id": "{tenant}"}),
    ("source_cidrs", ["10.0.0.0/8"]),
    ("source_cidrs", ["2001:db8::/32", "192.0.2.0/24"]),
    ("headers", {"x-env": "prod"}),
    ("headers", {"x-debug": {"present": False}}),
    ("headers", {"x-trace": {"prefix": "t-"}}),
    ("when", "claims.level >= 2"),  # an evaluation error when the claim is absent or a string
    ("when", 'request.method == "GET"'),
    ("when", "subject == params.tenant"),
    ("when", 'request.headers["x-env"] == "prod"'),  # an error when the header is absent
]
# Step-up conditions, judged last: drawn apart so that "fails only on step-up" comes up often.
STEP_UP_POOL: list[tuple[str, Any]] = [("acr_any", ["mfa"]), ("max_auth_age_s", 300)]


@st.composite
def alternative(draw: st.DrawFn) -> tuple[tuple[str, Any], ...]:
    plain = draw(st.lists(st.sampled_from(CONDITION_POOL), max_size=2, unique_by=lambda c: c[0]))
    step_up = draw(st.lists(st.sampled_from(STEP_UP_POOL), min_size=0 if plain else 1, max_size=1))
    return tuple(sorted(plain + step_up, key=lambda c: c[0]))


@dataclass(frozen=True)
class Caller:
    scope: str
    roles: tuple[str, ...]
    tenant_id: Any
    level: Any
    acr: str | None
    authenticated_ago: int | None
    subject: str


callers = st.builds(
    Caller,
    scope=st.sampled_from(["orders:read", "orders:write", "profile", "orders:read orders:write"]),
    roles=st.sampled_from([(), ("support",), ("admin",)]),
    tenant_id=st.sampled_from([None, "acme", "globex", 7]),
    level=st.sampled_from([None, 1, 3, "high"]),
    acr=st.sampled_from([None, "mfa", "pwd"]),
    authenticated_ago=st.sampled_from([None, 10, 1000]),
    subject=st.sampled_from(["acme", "alice"]),
)
requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST"]),
        "tenant": st.sampled_from(["acme", "globex"]),
        "source": st.sampled_from(["10.1.2.3", "::ffff:10.1.2.3", "192.0.2.9", "2001:db8::5", "172.16.0.1", "-"]),
        "x-env": st.sampled_from([None, "prod", "dev"]),
        "x-debug": st.sampled_from([None, "1"]),
        "x-trace": st.sampled_from([None, "t-1", "x-1"]),
    }
)


class Pool:
    """Engines (one per `allow`) and tokens (one per caller), made once and shared by every example."""

    def __init__(self, base: Path, key: SigningKey) -> None:
        self.base, self.key = base, key
        self.clock = Clock()
        self.engines: dict[str, Engine] = {}
        self.tokens: dict[Caller, str] = {}
        first = self._policy(json.dumps({}))
        self.stores = {i.name: KeyStore(i) for i in first.identity_providers}

        async def refresh() -> None:
            for store in self.stores.values():
                assert await store.refresh()

        asyncio.run(refresh())

    def _policy(self, allow: str) -> Policy:
        return load_policy_text(policy_text(TENANT_ROUTE.format(allow=allow)), "p.yaml", self.base)

    def engine(self, allow: Any) -> Engine:
        text = json.dumps(allow)
        if text not in self.engines:
            self.engines[text] = Engine(self._policy(text), self.stores, clock=self.clock)
        return self.engines[text]

    def token(self, c: Caller) -> str:
        if c not in self.tokens:
            now = int(self.clock.now)
            body = claims(iat=now, exp=now + 300, scope=c.scope, sub=c.subject, tenant_id=c.tenant_id, level=c.level)
            body.update({"roles": list(c.roles)} if c.roles else {})
            body.update({"acr": c.acr} if c.acr else {})
            if c.authenticated_ago is not None:
                body["auth_time"] = now - c.authenticated_ago
            self.tokens[c] = mint(self.key, body)
        return self.tokens[c]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> Pool:
    base = tmp_path_factory.mktemp("alternatives")
    (base / "jwks.json").write_text(json.dumps(jwks(*keys.values())))
    return Pool(base, keys["ES256"])


def decide_with(engine: Engine, token: str, req: dict[str, Any], trace: list[str] | None = None) -> Decision:
    headers = {"authorization": f"Bearer {token}"}
    headers.update({k: v for k, v in req.items() if k.startswith("x-") and v is not None})
    view = RequestView(req["method"], f"/v1/tenants/{req['tenant']}/orders", headers=headers, source=req["source"])
    d = engine.decide(view, trace)
    assert isinstance(d, Decision)
    assert d.reason != R.INTERNAL_ERROR
    return d


def answer(d: Decision) -> tuple[object, ...]:
    return (d.allowed, d.status, d.reason, www_authenticate(d))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alternatives=st.lists(alternative(), min_size=1, max_size=4), caller=callers, req=requests)
def test_alternatives_decide_as_the_or_of_one_alternative_policies(
    pool: Pool, alternatives: list[tuple[tuple[str, Any], ...]], caller: Caller, req: dict[str, Any]
) -> None:
    token = pool.token(caller)
    engine = pool.engine([dict(a) for a in alternatives])
    # Engines live across examples, so this may be an allow recalled from an earlier example (the fast path);
    # a traced decision always takes the full path.
    fast = decide_with(engine, token, req)
    listed = decide_with(engine, token, req, trace=[])
    assert answer(fast) == answer(listed)
    singles = [decide_with(pool.engine(dict(a)), token, req) for a in alternatives]
    assert listed.allowed == any(s.allowed for s in singles)
    if listed.allowed:
        assert listed.allow_index == next(i for i, s in enumerate(singles) if s.allowed)
        event(f"allowed by alternative {listed.allow_index}")
        return
    assert listed.allow_index is None
    step_up = [s for s in singles if s.reason == R.STEP_UP_REQUIRED]
    event("refused: " + ("step-up over the first" if step_up and step_up[0] is not singles[0] else "the first"))
    expected = step_up[0] if step_up else singles[0]
    assert answer(listed) == answer(expected)


# ---------------------------------------------------------------------------------------------------------------
# Which alternative allowed: the decision, the audit record and the trace say it.


async def test_the_alternative_that_allowed_is_named_in_decision_audit_and_trace(build: Build) -> None:
    agent = await build("""\
routes:
  - name: order
    match: {path: "/v1/tenants/{tenant}/orders/{id}"}
    authn: [jwt]
    allow:
      - claims: {tenant_id: "{tenant}"}
        scopes_all: [orders:admin]
      - roles_any: [support]
""")
    trace: list[str] = []
    d = agent.decide("/v1/tenants/acme/orders/1", agent.token(tenant_id="acme", roles=["support"]), trace=trace)
    assert (d.allowed, d.allow_index) == (True, 1)
    assert agent.audit.records[-1]["allow_index"] == 1
    first, second = line_of(agent.text, "- claims:"), line_of(agent.text, "- roles_any:")
    assert f"allow alternative 0 (line {first}) refused: scope_missing (missing scopes orders:admin)" in trace
    assert f"allow alternative 1 (line {second}) holds" in trace
    refused = agent.decide("/v1/tenants/acme/orders/1", agent.token(tenant_id="acme"))
    assert (refused.status, refused.reason) == (403, R.SCOPE_MISSING)  # the first alternative's refusal
    assert "allow_index" not in agent.audit.records[-1]


# ---------------------------------------------------------------------------------------------------------------
# Deny beats allow.

DENY_ROUTES = """\
deny:
  - name: blocked-network
    source_cidrs: [192.0.2.0/24]
  - name: debug-header
    headers: {x-debug: {present: true}}
routes:
  - name: orders
    match: {path: /v1/orders}
    authn: [jwt]
    allow: {}
    deny:
      - name: evil-client
        when: 'client_id == "evil-app"'
  - name: health
    match: {path: /healthz}
    public: true
"""


async def test_a_route_deny_rule_beats_an_allow_and_is_named_in_audit_and_trace(build: Build) -> None:
    agent = await build(DENY_ROUTES)
    assert agent.decide("/v1/orders", agent.token()).allowed  # allow: {} admits any caller ...
    trace: list[str] = []
    d = agent.decide("/v1/orders", agent.token(client_id="evil-app"), trace=trace)  # ... but this one
    assert (d.allowed, d.status, d.reason, d.deny_rule) == (False, 403, R.DENIED_BY_RULE, "evil-client")
    assert www_authenticate(d) is None
    record = agent.audit.records[-1]
    assert (record["reason"], record["deny_rule"]) == (R.DENIED_BY_RULE, "evil-client")
    assert record["subject"] == "alice"  # judged after authentication: the caller is known
    assert f"deny rule 'evil-client' (line {line_of(agent.text, '- name: evil-client')}) holds" in trace
    assert not any("allow" in step for step in trace)  # allow was never looked at


async def test_a_top_level_deny_rule_covers_public_routes(build: Build) -> None:
    agent = await build(DENY_ROUTES)
    assert agent.decide("/healthz").reason == R.PUBLIC
    trace: list[str] = []
    d = agent.decide("/healthz", source="192.0.2.77", trace=trace)
    assert (d.status, d.reason, d.deny_rule, d.route) == (403, R.DENIED_BY_RULE, "blocked-network", "health")
    assert agent.audit.records[-1]["deny_rule"] == "blocked-network"
    assert f"deny rule 'blocked-network' (line {line_of(agent.text, '- name: blocked-network')}) holds" in trace
    header = agent.decide("/healthz", x_debug="1")
    assert (header.status, header.deny_rule) == (403, "debug-header")


@pytest.mark.parametrize(
    "credential",
    [None, "Bearer not.a.jwt", "Basic YWxpY2U6cHc=", "expired"],
    ids=["no-token", "invalid-token", "other-scheme", "expired-token"],
)
async def test_a_deny_rule_reading_no_credentials_is_judged_before_authentication(
    build: Build, credential: str | None
) -> None:
    agent = await build(DENY_ROUTES)
    headers: dict[str, str] = {}
    if credential == "expired":
        now = int(agent.clock.now)
        credential = "Bearer " + mint(agent.key, claims(iat=now - 900, exp=now - 300))
    if credential is not None:
        headers["authorization"] = credential
    open_network = agent.decide("/v1/orders", headers=headers)
    assert open_network.status == 401  # the ordinary answer: authentication failed
    d = agent.decide("/v1/orders", source="192.0.2.1", headers=headers)
    assert (d.status, d.reason, d.deny_rule) == (403, R.DENIED_BY_RULE, "blocked-network")
    assert www_authenticate(d) is None and d.principal is None


async def test_a_deny_rule_that_cannot_be_evaluated_holds(build: Build) -> None:
    agent = await build("""\
routes:
  - name: reports
    match: {path: /v1/reports}
    authn: [jwt]
    allow: {}
    deny:
      - name: low-clearance
        when: claims.clearance < 2
""")
    assert agent.decide("/v1/reports", agent.token(clearance=3)).allowed
    for clearance in (1, None, "top", [3], {"level": 3}):  # below, then absent and wrong types: errors
        d = agent.decide("/v1/reports", agent.token(clearance=clearance))
        assert (d.status, d.reason, d.deny_rule) == (403, R.DENIED_BY_RULE, "low-clearance"), clearance


@pytest.mark.parametrize(
    "clearance", [None, "high", [3], {"level": 3}, True], ids=["missing", "string", "list", "map", "bool"]
)
async def test_an_allow_when_that_cannot_be_evaluated_never_allows(build: Build, clearance: Any) -> None:
    agent = await build("""\
routes:
  - name: reports
    match: {path: /v1/reports}
    authn: [jwt]
    allow: {when: "claims.clearance >= 2 || 10 / claims.divisor == 1"}
  - name: either
    match: {path: /v1/either}
    authn: [jwt]
    allow:
      - when: claims.clearance >= 2
      - scopes_any: [orders:read]
""")
    assert agent.decide("/v1/reports", agent.token(clearance=3)).allowed
    d = agent.decide("/v1/reports", agent.token(clearance=clearance, divisor=0))
    assert (d.allowed, d.status, d.reason) == (False, 403, R.CONDITION_FAILED)
    # An alternative that errors does not hold; the next one still may.
    other = agent.decide("/v1/either", agent.token(clearance=clearance))
    assert (other.allowed, other.allow_index) == (True, 1)


async def test_a_claim_past_64_bits_makes_every_read_of_claims_an_error_on_every_request(build: Build) -> None:
    # The runtime cannot convert the claims at all; a `when` handed only the claims it reads (from a token's
    # second request on) must not see them as fine.
    agent = await build("""\
routes:
  - name: reports
    match: {path: /v1/reports}
    authn: [jwt]
    allow:
      - when: claims.sub == "alice"
      - scopes_any: [reports:read]
    deny:
      - name: not-alice
        when: claims.sub != "alice"
""")
    token = agent.token(big=2**70)
    for _ in range(3):
        d = agent.decide("/v1/reports", token)
        assert (d.status, d.reason, d.deny_rule) == (403, R.DENIED_BY_RULE, "not-alice")
    token = agent.token(big=2**63)  # an unsigned integer: converts
    for _ in range(3):
        d = agent.decide("/v1/reports", token)
        assert (d.allowed, d.allow_index) == (True, 0)


# ---------------------------------------------------------------------------------------------------------------
# `now` under a frozen clock.

BUSINESS_HOURS = """\
routes:
  - name: payroll
    match: {path: /v1/payroll}
    authn: [jwt]
    allow:
      when: now.getHours("Europe/Berlin") >= 9 && now.getHours("Europe/Berlin") < 18
"""


@pytest.mark.parametrize(
    ("utc", "allowed"),
    [
        (datetime(2025, 1, 15, 7, 30, tzinfo=UTC), False),  # 08:30 in Berlin (CET, UTC+1)
        (datetime(2025, 7, 15, 7, 30, tzinfo=UTC), True),  # 09:30 in Berlin (CEST, UTC+2)
        (datetime(2025, 7, 15, 15, 59, tzinfo=UTC), True),  # 17:59
        (datetime(2025, 7, 15, 16, 0, tzinfo=UTC), False),  # 18:00
    ],
)
async def test_business_hours_in_berlin_under_a_frozen_clock(build: Build, utc: datetime, allowed: bool) -> None:
    agent = await build(BUSINESS_HOURS, now=utc.timestamp())
    d = agent.decide("/v1/payroll", agent.token())
    assert d.allowed is allowed
    if not allowed:
        assert (d.status, d.reason) == (403, R.CONDITION_FAILED)


# ---------------------------------------------------------------------------------------------------------------
# Networks.

NETWORK_ROUTES = """\
routes:
  - name: office
    match: {path: /v1/office}
    authn: [jwt]
    allow:
      source_cidrs: [10.0.0.0/8, "2001:db8::/32"]
  - name: mapped
    match: {path: /v1/mapped}
    authn: [jwt]
    allow:
      source_cidrs: ["::ffff:10.0.0.0/104"]
  - name: open
    match: {path: /v1/open}
    authn: [jwt]
    allow: {}
    deny:
      - name: quarantine
        source_cidrs: [198.51.100.0/24, "2001:db8:bad::/48"]
"""


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("::ffff:10.1.2.3", True),  # IPv4-mapped IPv6 compares as IPv4
        ("2001:db8::1", True),
        ("2001:db8:ffff::1", True),
        ("11.0.0.1", False),
        ("::ffff:11.0.0.1", False),
        ("::a01:203", False),  # IPv4-compatible (deprecated), not mapped: an IPv6 address outside 2001:db8::/32
        ("2001:db9::1", False),
        ("127.0.0.1", False),
        ("not-an-address", False),
        ("", False),
    ],
)
async def test_source_cidrs_v4_and_v6(build: Build, source: str, allowed: bool) -> None:
    agent = await build(NETWORK_ROUTES)
    d = agent.decide("/v1/office", agent.token(), source=source)
    assert d.allowed is allowed
    if not allowed:
        assert (d.status, d.reason) == (403, R.CONDITION_FAILED)


@pytest.mark.parametrize(
    ("source", "allowed"),
    [("10.9.9.9", True), ("::ffff:10.9.9.9", True), ("11.0.0.1", False), ("::ffff:11.0.0.1", False)],
)
async def test_an_ipv4_mapped_network_matches_ipv4_and_mapped_sources(build: Build, source: str, allowed: bool) -> None:
    agent = await build(NETWORK_ROUTES)
    assert agent.decide("/v1/mapped", agent.token(), source=source).allowed is allowed


async def test_a_source_that_is_no_address_is_in_no_network(build: Build) -> None:
    # Envoy sets the source, not the client (a unix socket, an internal listener): such a source is in no
    # network, so an alternative on source_cidrs refuses it and a deny rule on source_cidrs does not hold.
    agent = await build(NETWORK_ROUTES)
    token = agent.token()
    assert agent.decide("/v1/open", token, source="10.1.2.3").allowed
    for source in ("198.51.100.7", "::ffff:198.51.100.7", "2001:db8:bad::1"):
        blocked = agent.decide("/v1/open", token, source=source)
        assert (blocked.status, blocked.deny_rule) == (403, "quarantine"), source
    for nonsense in ("unix:/run/envoy.sock", "", "10.1.2.3:8080"):
        assert agent.decide("/v1/open", token, source=nonsense).allowed, nonsense
        refused = agent.decide("/v1/mapped", token, source=nonsense)
        assert (refused.status, refused.reason) == (403, R.CONDITION_FAILED), nonsense


# ---------------------------------------------------------------------------------------------------------------
# Headers.

HEADER_ROUTES = """\
routes:
  - name: deploy
    match: {path: /v1/deploy}
    authn: [jwt]
    allow:
      headers:
        x-env: prod
        x-canary: {present: false}
        x-request-id: {present: true}
        x-trace: {prefix: "t-"}
  - name: seen
    match: {path: /v1/seen}
    authn: [jwt]
    allow:
      when: request.headers["x-env"] == "prod" && !("X-Env" in request.headers)
"""
GOOD_HEADERS = {"x-env": "prod", "x-request-id": "r1", "x-trace": "t-42"}


@pytest.mark.parametrize(
    ("change", "allowed"),
    [
        ({}, True),
        ({"x-env": "prod "}, False),  # equals is exact
        ({"x-env": "Prod"}, False),
        ({"x-env": None}, False),
        ({"x-canary": "1"}, False),  # present: false
        ({"x-canary": ""}, False),  # present with an empty value is present
        ({"x-request-id": None}, False),  # present: true
        ({"x-request-id": ""}, True),
        ({"x-trace": "t-"}, True),  # prefix
        ({"x-trace": "T-1"}, False),
        ({"x-trace": "xt-1"}, False),
        ({"x-trace": None}, False),
    ],
)
async def test_header_conditions(build: Build, change: dict[str, str | None], allowed: bool) -> None:
    agent = await build(HEADER_ROUTES)
    headers = {k: v for k, v in {**GOOD_HEADERS, **change}.items() if v is not None}
    d = agent.decide("/v1/deploy", agent.token(), headers=headers)
    assert d.allowed is allowed
    if not allowed:
        assert (d.status, d.reason) == (403, R.CONDITION_FAILED)


async def test_when_reads_header_names_in_lower_case(build: Build) -> None:
    agent = await build(HEADER_ROUTES)
    assert agent.decide("/v1/seen", agent.token(), x_env="prod").allowed
    assert not agent.decide("/v1/seen", agent.token(), x_env="dev").allowed


async def test_envoy_header_names_reach_conditions_in_lower_case(build: Build) -> None:
    from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
    from agent.server.envoy_wire import decode

    agent = await build(HEADER_ROUTES)
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path = "GET", "/v1/seen"
    for name, value in (("Authorization", f"Bearer {agent.token()}"), ("X-Env", "prod")):
        header = http.header_map.headers.add()
        header.key, header.raw_value = name, value.encode()
    view = decode(req)
    assert set(view.headers) == {"authorization", "x-env"}
    d = agent.engine.decide(view)
    assert isinstance(d, Decision) and d.allowed


# ---------------------------------------------------------------------------------------------------------------
# claim: rate-limit keys.

LIMITED = """\
routes:
  - name: by-tenant
    match: {path: /v1/tenant-limited}
    authn: [jwt]
    allow: {}
    rate_limit: {key: "claim:tenant_id", per_minute: 2}
  - name: by-org
    match: {path: /v1/org-limited}
    authn: [jwt]
    allow: {}
    rate_limit: {key: "claim:org.id", per_minute: 2}
"""


async def test_claim_limit_keys_give_each_tenant_its_own_bucket(build: Build) -> None:
    agent = await build(LIMITED)
    acme_alice = agent.token(tenant_id="acme", sub="alice")
    acme_bob = agent.token(tenant_id="acme", sub="bob")
    globex = agent.token(tenant_id="globex")
    assert agent.decide("/v1/tenant-limited", acme_alice).allowed
    assert agent.decide("/v1/tenant-limited", acme_bob).allowed  # the same tenant: the same bucket
    limited = agent.decide("/v1/tenant-limited", acme_alice)
    assert (limited.status, limited.reason) == (429, R.RATE_LIMITED)
    assert agent.decide("/v1/tenant-limited", acme_bob).status == 429
    assert agent.decide("/v1/tenant-limited", globex).allowed  # another tenant is not held back
    assert agent.decide("/v1/tenant-limited", globex).allowed
    assert agent.decide("/v1/tenant-limited", globex).status == 429


async def test_a_nested_claim_limit_key(build: Build) -> None:
    agent = await build(LIMITED)
    o1, o2 = agent.token(org={"id": "o1"}), agent.token(org={"id": "o2"})
    assert [agent.decide("/v1/org-limited", o1).status for _ in range(3)] == [200, 200, 429]
    assert [agent.decide("/v1/org-limited", o2).status for _ in range(3)] == [200, 200, 429]


async def test_callers_without_the_claim_share_one_bucket(build: Build) -> None:
    agent = await build(LIMITED)
    absent, other, listed = agent.token(), agent.token(sub="bob"), agent.token(tenant_id=["acme"])
    assert agent.decide("/v1/tenant-limited", absent).allowed
    assert agent.decide("/v1/tenant-limited", other).allowed
    assert agent.decide("/v1/tenant-limited", listed).status == 429  # not a scalar: the same "" bucket


# ---------------------------------------------------------------------------------------------------------------
# Accepted identity providers.

PROVIDER_ROUTES = """\
routes:
  - name: employees
    match: {path: /v1/staff}
    authn: [jwt]
    providers: [corp]
    allow: {}
  - name: partners
    match: {path: /v1/partners}
    authn: [jwt]
    allow: {}
"""


async def test_a_token_from_a_provider_the_route_does_not_list_is_refused(build: Build) -> None:
    agent = await build(PROVIDER_ROUTES, partner=True)
    partner = agent.token(iss=PARTNER)
    assert agent.decide("/v1/staff", agent.token()).allowed
    d = agent.decide("/v1/staff", partner)
    assert (d.status, d.reason) == (401, R.TOKEN_ISSUER_NOT_ACCEPTED)
    assert www_authenticate(d) == 'Bearer error="invalid_token", error_description="token_issuer_not_accepted"'
    assert agent.decide("/v1/partners", partner).allowed  # a route naming none (and no default): any provider
    assert any("takes tokens from every identity provider" in m for _, m in agent.policy.warnings)


async def test_the_top_level_providers_are_the_default_for_routes_naming_none(build: Build) -> None:
    agent = await build(PROVIDER_ROUTES, top="providers: [partner]\n", partner=True)
    assert agent.policy.warnings == ()
    assert agent.decide("/v1/partners", agent.token(iss=PARTNER)).allowed
    assert agent.decide("/v1/partners", agent.token()).reason == R.TOKEN_ISSUER_NOT_ACCEPTED
    assert agent.decide("/v1/staff", agent.token()).allowed  # a route's own list wins over the default
    assert agent.decide("/v1/staff", agent.token(iss=PARTNER)).reason == R.TOKEN_ISSUER_NOT_ACCEPTED


# ---------------------------------------------------------------------------------------------------------------
# Step-up among alternatives.

STEP_UP_ROUTES = """\
routes:
  - name: payout
    match: {path: /v1/payouts}
    authn: [jwt]
    allow:
      - scopes_any: [payouts:write]
      - roles_any: [treasurer]
        acr_any: [mfa]
"""


async def test_an_alternative_failing_only_on_step_up_gives_the_challenge(build: Build) -> None:
    agent = await build(STEP_UP_ROUTES)
    d = agent.decide("/v1/payouts", agent.token(roles=["treasurer"], acr="pwd"))
    assert (d.status, d.reason) == (401, R.STEP_UP_REQUIRED)
    assert www_authenticate(d) == (
        'Bearer error="insufficient_user_authentication", error_description="step_up_required", acr_values="mfa"'
    )
    passed = agent.decide("/v1/payouts", agent.token(roles=["treasurer"], acr="mfa"))
    assert (passed.allowed, passed.allow_index) == (True, 1)
    neither = agent.decide("/v1/payouts", agent.token(roles=["viewer"], acr="pwd"))
    assert (neither.status, neither.reason) == (403, R.SCOPE_MISSING)  # step-up would not help: the first's refusal


# ---------------------------------------------------------------------------------------------------------------
# The remembered-allow fast path.

REMEMBERED_ROUTES = """\
routes:
  - name: static-when
    match: {path: "/v1/tenants/{tenant}/static"}
    authn: [jwt]
    allow:
      when: claims.tenant_id == params.tenant && request.method == "GET" && "orders:read" in scopes
  - name: clock-when
    match: {path: /v1/clock}
    authn: [jwt]
    allow:
      when: now.getHours("UTC") >= 0
  - name: header-when
    match: {path: /v1/header}
    authn: [jwt]
    allow:
      when: '!("x-block" in request.headers)'
  - name: source-when
    match: {path: /v1/source}
    authn: [jwt]
    allow:
      when: source.address != "192.0.2.1"
  - name: list
    match: {path: /v1/list}
    authn: [jwt]
    allow:
      - scopes_any: [nope]
      - claims: {client_id: web-app}
  - name: guarded
    match: {path: /v1/guarded}
    authn: [jwt]
    allow: {}
    deny:
      - name: no-debug
        headers: {x-debug: {present: true}}
      - name: not-from-lab
        when: source.address == "192.0.2.66"
"""


async def test_alternatives_reading_only_the_token_and_request_line_are_remembered(build: Build) -> None:
    agent = await build(REMEMBERED_ROUTES)
    token = agent.token(tenant_id="acme")
    first = agent.decide("/v1/tenants/acme/static", token)
    again = agent.decide("/v1/tenants/acme/static", token)
    assert first.allowed and again.allowed and agent.engine.remembered_hits == 1
    assert (agent.decide("/v1/list", token).allow_index, agent.decide("/v1/list", token).allow_index) == (1, 1)
    assert agent.engine.remembered_hits == 2


@pytest.mark.parametrize(
    ("path", "headers", "source", "refused"),
    [
        ("/v1/clock", {}, "10.1.2.3", None),
        ("/v1/header", {"x-block": "1"}, "10.1.2.3", R.CONDITION_FAILED),
        ("/v1/source", {}, "192.0.2.1", R.CONDITION_FAILED),
    ],
)
async def test_alternatives_reading_now_headers_or_source_are_judged_every_time(
    build: Build, path: str, headers: dict[str, str], source: str, refused: str | None
) -> None:
    agent = await build(REMEMBERED_ROUTES)
    token = agent.token()
    assert agent.decide(path, token).allowed
    assert agent.decide(path, token).allowed
    assert agent.engine.remembered_hits == 0
    if refused is not None:  # the same token, method and path, now refused: it was not remembered
        assert agent.decide(path, token, source=source, headers=headers).reason == refused


async def test_a_per_request_deny_rule_is_judged_on_a_recalled_allow(build: Build) -> None:
    agent = await build(REMEMBERED_ROUTES)
    token = agent.token()
    assert agent.decide("/v1/guarded", token).allowed
    assert agent.decide("/v1/guarded", token).allowed
    assert agent.engine.remembered_hits == 1
    debug = agent.decide("/v1/guarded", token, x_debug="1")
    assert (debug.status, debug.reason, debug.deny_rule) == (403, R.DENIED_BY_RULE, "no-debug")
    lab = agent.decide("/v1/guarded", token, source="192.0.2.66")
    assert (lab.status, lab.deny_rule) == (403, "not-from-lab")
    assert agent.decide("/v1/guarded", token).allowed
    assert agent.engine.remembered_hits == 2


async def test_a_recalled_allow_names_the_alternative_the_full_path_would(build: Build) -> None:
    agent = await build("""\
routes:
  - name: r
    match: {path: /v1/x}
    authn: [jwt]
    allow:
      - source_cidrs: [10.0.0.0/8]
      - scopes_any: [orders:read]
""")
    token = agent.token()
    assert agent.decide("/v1/x", token, source="192.0.2.1").allow_index == 1
    assert agent.decide("/v1/x", token, source="10.1.1.1", trace=[]).allow_index == 0  # the full path
    assert agent.decide("/v1/x", token, source="10.1.1.1").allow_index == 0


# ---------------------------------------------------------------------------------------------------------------
# The clock never breaks a policy.


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_an_ended_grant_loads_with_a_warning_and_refuses_per_request(build: Build) -> None:
    ended = stamp(datetime.now(UTC) - timedelta(days=1))
    agent = await build(f"""\
routes:
  - name: partner
    match: {{path: /v1/partner}}
    authn: [jwt]
    allow: {{not_after: "{ended}"}}
""")
    ((line, message),) = agent.policy.warnings
    assert line == line_of(agent.text, "allow:") and "in the past" in message
    d = agent.decide("/v1/partner", agent.token())
    assert (d.status, d.reason) == (403, R.GRANT_NOT_ACTIVE)


async def test_a_grant_not_yet_begun_loads_with_a_warning_and_holds_once_it_begins(build: Build) -> None:
    begins = datetime.now(UTC) + timedelta(days=1)
    agent = await build(f"""\
routes:
  - name: partner
    match: {{path: /v1/partner}}
    authn: [jwt]
    allow:
      - not_before: "{stamp(begins)}"
""")
    ((line, message),) = agent.policy.warnings
    assert line == line_of(agent.text, "not_before:") and "in the future" in message
    assert agent.decide("/v1/partner", agent.token()).reason == R.GRANT_NOT_ACTIVE
    agent.clock.now = begins.timestamp() + 60
    assert agent.decide("/v1/partner", agent.token()).allowed


# ---------------------------------------------------------------------------------------------------------------
# `authz-agent check` names the rule.


@pytest.fixture
def policy_file(tmp_path: Path, keys: dict[str, SigningKey]) -> Iterator[Path]:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(*keys.values())))
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(DENY_ROUTES))
    yield path


def test_check_names_the_deny_rule_that_holds(policy_file: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "check",
            "--policy",
            str(policy_file),
            "--path",
            "/healthz",
            "-H",
            "X-Debug: 1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    line = line_of(policy_file.read_text(), "- name: debug-header")
    assert f"- deny rule 'debug-header' (line {line}) holds" in r.stdout
    out = json.loads(r.stdout[r.stdout.index("\n{") :])
    assert (out["status"], out["reason"]) == (403, R.DENIED_BY_RULE)


# ---------------------------------------------------------------------------------------------------------------
# What a hostile review of policy v2 found, each as the request that slipped past or the input that cost too
# much: repeated query names and headers, an oversized request, the host's spelling, long network lists, a
# `contains()` over two request values, deny rules that hold on every plain request, opaque tokens sent to a
# provider the route does not take.

HARDENING_ROUTES = """\
deny:
  - name: debug-mode
    when: 'has(request.query.mode) && request.query.mode == "debug"'
  - name: bad-client
    headers: {x-client: "evil"}
  - name: internal-host
    when: 'request.host.startsWith("internal.")'
routes:
  - name: open
    match: {path: /v1/open}
    authn: [jwt]
    allow: {}
  - name: by-header
    match: {path: /v1/by-header}
    authn: [jwt]
    allow: {when: 'request.headers["x-team"] == "blue"'}
"""


async def test_a_repeated_query_name_cannot_hide_a_value_from_a_deny_rule(build: Build) -> None:
    agent = await build(HARDENING_ROUTES)
    token = agent.token()
    assert agent.decide("/v1/open?mode=x", token).allowed
    assert agent.decide("/v1/open?mode=debug", token).deny_rule == "debug-mode"
    # PHP reads the last `mode`, Django the last, Express both: the rule must not read only the first.
    d = agent.decide("/v1/open?mode=x&mode=debug", token)
    assert (d.status, d.reason, d.deny_rule) == (403, R.DENIED_BY_RULE, "debug-mode")


async def test_a_header_sent_twice_cannot_hide_its_value_from_a_deny_rule(build: Build) -> None:
    agent = await build(HARDENING_ROUTES)
    token = agent.token()
    assert agent.decide("/v1/open", token, x_client="good").allowed
    # Envoy joins a repeated header with commas.
    for joined in ("evil", "evil,evil", "good,evil", "good, evil"):
        assert agent.decide("/v1/open", token, x_client=joined).deny_rule == "bad-client", joined


async def test_the_host_is_judged_as_spelled_in_lower_case_without_a_trailing_dot(build: Build) -> None:
    agent = await build(HARDENING_ROUTES)
    token = agent.token()
    from agent.decision import Decision, RequestView

    for host in ("internal.example.com", "INTERNAL.example.com", "Internal.Example.Com.:8443"):
        view = RequestView("GET", "/v1/open", host, {"authorization": f"Bearer {token}"}, "10.1.2.3")
        d = agent.engine.decide(view)
        assert isinstance(d, Decision) and d.deny_rule == "internal-host", host


async def test_an_oversized_request_is_not_judged_by_when(build: Build) -> None:
    agent = await build(HARDENING_ROUTES)
    token = agent.token()
    big = "x" * (MAX_WHEN_REQUEST_BYTES + 1)
    assert agent.decide("/v1/by-header", token, x_team="blue").allowed
    # Past the bound the request's fields are null: a deny rule reading them holds, an alternative does not.
    d = agent.decide("/v1/by-header", token, x_team="blue", x_pad=big)
    assert (d.status, d.reason) == (403, R.DENIED_BY_RULE)
    assert d.deny_rule == "debug-mode"


def test_contains_takes_a_literal_of_bounded_size() -> None:
    compile_when('request.headers["x-a"].contains("admin")')
    with pytest.raises(CelCompileError, match="must be a string literal"):
        compile_when('request.headers["x-a"].contains(request.headers["x-b"])')
    with pytest.raises(CelCompileError, match="longer than"):
        compile_when(f'request.path.contains("{"a" * 300}")')


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), min_size=1, max_size=20),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
)
def test_network_ranges_answer_as_the_networks_do(nets: list[tuple[int, int]], addresses: list[int]) -> None:
    networks = [ipaddress.ip_network((n, p), strict=False) for n, p in nets]
    v6 = [ipaddress.ip_network((n << 96, p + 96), strict=False) for n, p in nets]
    table = Networks([*networks, *v6])
    for a in addresses:
        four, six = ipaddress.IPv4Address(a), ipaddress.IPv6Address(a << 96)
        assert table.contains(four) is any(four in n for n in networks)
        assert table.contains(six) is any(six in n for n in v6)


def test_a_deny_rule_that_cannot_be_evaluated_on_a_plain_request_is_warned_of() -> None:
    top = """\
deny:
  - name: tenant-one
    when: 'params.tenant == "t1"'
  - name: scanners
    when: 'request.headers["user-agent"].startsWith("sqlmap")'
  - name: guarded
    when: 'has(request.headers.x) && request.headers.x == "1"'
"""
    routes = "routes:\n  - name: health\n    match: {path: /healthz}\n    public: true\n"
    policy = load_policy_text(policy_text(routes, top))
    warned = [message for _, message in policy.warnings]
    assert len(warned) == 2, warned
    assert "tenant-one" in warned[0] and "holds (it fails closed)" in warned[0]
    assert "scanners" in warned[1]


def test_alternatives_after_one_that_admits_everyone_are_warned_of() -> None:
    routes = (
        "routes:\n  - name: r\n    match: {path: /x}\n    authn: [jwt]\n"
        "    allow:\n      - {}\n      - scopes_any: [a]\n"
    )
    ((_, message),) = load_policy_text(policy_text(routes)).warnings
    assert "admits every caller" in message


def test_a_header_condition_on_host_is_refused() -> None:
    routes = "routes:\n  - name: r\n    match: {path: /x}\n    authn: [jwt]\n    allow: {headers: {host: a}}\n"
    with pytest.raises(ConfigErrors, match=":authority"):
        load_policy_text(policy_text(routes))


async def test_an_opaque_token_is_never_sent_to_a_provider_the_route_does_not_take(
    tmp_path: Path, build: Build
) -> None:
    # The introspecting provider points at a closed port: were the token sent, the answer would be 503.
    secret = tmp_path / "secret"
    secret.write_text("s3cret-for-introspection")
    introspecting = f"""\
  opaque:
    issuer: https://opaque.example.test
    introspection_endpoint: http://127.0.0.1:1/introspect
    client_id: agent
    client_secret_file: {secret}
    audiences: [orders-api]
    algorithms: [ES256]
"""
    body = "version: 1\nservice: orders\n" + idp_block("jwks_file: jwks.json") + introspecting
    routes = "routes:\n  - name: r\n    match: {path: /x}\n    authn: [jwt]\n    providers: [corp]\n    allow: {}\n"
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": []}))
    from agent.decision import RequestView
    from agent.engine import Engine

    engine = Engine.for_policy(load_policy_text(body + routes, str(tmp_path / "p.yaml"), tmp_path))
    d = await engine.check(RequestView("GET", "/x", headers={"authorization": "Bearer opaque-token-value"}))
    assert (d.status, d.reason) == (401, R.TOKEN_ISSUER_NOT_ACCEPTED)
    await engine.close()


async def test_a_header_spelled_with_underscores_cannot_slip_past_a_deny_rule(build: Build) -> None:
    # Behind an Envoy that does not refuse underscores in names, Django and Flask read `x_client` as X-Client
    # (HTTP_X_CLIENT): the deny rule reads it so too, in `headers:` and in a `when`.
    agent = await build(
        HARDENING_ROUTES.replace(
            "routes:\n",
            "  - name: by-when\n    when: '\"x-scanner\" in request.headers'\nroutes:\n",
            1,
        )
    )
    token = agent.token()
    assert agent.decide("/v1/open", token, headers={"x-client": "good"}).allowed
    for headers in ({"x_client": "evil"}, {"x-client": "good", "x_client": "evil"}):
        assert agent.decide("/v1/open", token, headers=headers).deny_rule == "bad-client", headers
    assert agent.decide("/v1/open", token, headers={"x_scanner": "1"}).deny_rule == "by-when"
