"""The repeated request answered from wire bytes (agent._recall, both twins) is the engine's own recall, byte for
byte: the same CheckResponse, the same audit record, the same counts; anything the engine would judge differently
(an expired token, new keys, a revocation, another address, a spoofed header, odd bytes) goes back to the engine."""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent._wire_py import decode_check_request
from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent.audit.alerts import AlertMonitor
from agent.audit.chain import verify
from agent.audit.records import decision_record
from agent.audit.stats import DecisionStats
from agent.audit.writer import JsonLinesAudit
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import OVERRIDE_HEADERS, Engine
from agent.server.envoy_wire import encode
from tests.clock import Clock
from tests.conftest import ROUTES, twins
from tests.keys import SigningKey, claims, mint

MODULES = twins("agent._recall_py", "_recall")

LIMITED = """\
routes:
  - name: list-orders
    match: {methods: [GET], path: /v1/orders}
    authn: [jwt]
    allow: {scopes_all: [orders:read]}
    rate_limit: {key: [subject, source_ip], per_second: 1, burst: 3}
  - name: guarded
    match: {methods: [GET], path: /v1/guarded}
    authn: [jwt]
    allow: {}
    deny:
      - {name: office, source_cidrs: [10.9.0.0/16]}
  - name: early
    match: {methods: [GET], path: /v1/early}
    authn: [jwt]
    allow:
      - {roles_any: [ops], source_cidrs: [10.0.0.0/8]}
      - {scopes_all: [orders:read]}
  - name: debug
    match: {methods: [GET], path: /v1/debug}
    authn: [jwt]
    allow: {}
    deny:
      - {name: debug-header, headers: {x-debug: "1"}}
  - name: hours
    match: {methods: [GET], path: /v1/hours}
    authn: [jwt]
    allow: {}
    deny:
      - {name: night, when: 'now.getHours("UTC") == 99'}
default: deny
"""


class Agent:
    """An engine as `run --transport native` builds it (stats, alerts, a real audit file) and a table of one twin."""

    def __init__(self, policy: Path, module: Any, audit_path: Path) -> None:
        self.clock = Clock()
        self.audit = JsonLinesAudit(str(audit_path))
        self.stats = DecisionStats()
        self.alerts: list[tuple[str, dict[str, object]]] = []
        monitor = AlertMonitor(load_policy(policy).alerts, lambda kind, detail: self.alerts.append((kind, detail)))
        self.engine = Engine.for_policy(
            load_policy(policy),
            self.audit,
            clock=self.clock,
            listeners=(self.stats, monitor),
            wire_recall=True,
        )
        assert self.engine.recall is not None
        self.engine.recall = module.RecallTable(64, self.audit.recall_queue, "x-authz-", OVERRIDE_HEADERS)
        self.table = self.engine.recall
        self.audit_path = audit_path
        # The codec of the same kind: protobuf's own writes Struct entries in its map order, ours in the engine's.
        wire = "agent._wire_c" if module.__name__.endswith("_c") else "agent._wire_py"
        self.encode = importlib.import_module(wire).encode_check_response

    def decide(self, message: bytes) -> Decision:
        d = self.engine.decide(decode_check_request(message))
        assert isinstance(d, Decision)
        return d

    def answer(self, message: bytes) -> bytes | None:
        out: bytes | None = self.table.answer(message, self.clock.now)
        return out

    def records(self) -> list[dict[str, Any]]:
        self.audit.close()
        assert verify([self.audit_path]).problem is None
        return [orjson.loads(line) for line in self.audit_path.read_bytes().splitlines()]


@pytest.fixture(params=MODULES)
def module(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


@pytest.fixture
def build(write_policy: Callable[..., Path], module: Any, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(routes: str = ROUTES) -> Agent:
        agent = Agent(write_policy(routes), module, tmp_path / f"audit-{len(made)}.log")
        made.append(agent)
        return agent

    yield make
    for a in made:
        a.audit.close()


async def ready(agent: Agent) -> Agent:
    for s in agent.engine.stores.values():
        assert await s.refresh()
    return agent


def request(
    token: str | None,
    path: str = "/v1/orders",
    method: str = "GET",
    source: str = "10.1.2.3",
    headers: dict[str, str] | None = None,
) -> bytes:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = method, path, "orders.local", "https"
    http.headers["x-request-id"] = "r-1"
    http.headers["user-agent"] = "curl/8"
    if token is not None:
        http.headers["authorization"] = f"Bearer {token}"
    for k, v in (headers or {}).items():
        http.headers[k] = v
    req.attributes.source.address.socket_address.address = source
    req.attributes.source.address.socket_address.port_value = 40000
    return req.SerializeToString()


def did_of(response: bytes) -> str:
    return str(ext.CheckResponse.FromString(response).dynamic_metadata["decision_id"])


def same_as_engine(agent: Agent, message: bytes, answered: bytes) -> None:
    """The answer is the engine's encoding of the engine's own decision for the same request, byte for byte."""
    reference = agent.decide(message)
    did = did_of(answered)
    reference.upstream_headers = [(k, did if k == "x-authz-decision-id" else v) for k, v in reference.upstream_headers]
    reference.decision_id = did
    assert agent.encode(reference) == answered
    assert ext.CheckResponse.FromString(answered) == encode(reference)


async def test_a_repeat_is_answered_from_bytes_as_the_engine_answers_it(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build())
    token = mint(keys["ES256"])
    message = request(token)
    assert agent.answer(message) is None  # nothing remembered yet
    first = agent.decide(message)
    assert first.allowed and len(agent.table) == 1
    answered = agent.answer(message)
    assert answered is not None
    same_as_engine(agent, message, answered)
    assert agent.engine.remembered_hits == 2  # the table's and the engine's recall
    # forward_token: the route keeps the Authorization header
    export = request(token, "/v1/export")
    agent.decide(export)
    answered = agent.answer(export)
    assert answered is not None and b"authorization" not in answered.split(b"x-authz-route")[1].split(b"\x22")[0]
    same_as_engine(agent, export, answered)


async def test_the_audit_record_is_the_engines_and_the_chain_holds(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build())
    token = mint(keys["RS256"], claims(client_id=None, jti="j-audit"))
    message = request(token, source="10.1.2.3")
    agent.decide(message)
    answered = agent.answer(message)
    assert answered is not None
    view = decode_check_request(message)
    reference = agent.decide(message)  # the engine's recall of the same request
    records = agent.records()
    assert len(records) == 3
    table_record, engine_record = records[1], records[2]
    assert table_record["decision_id"] == did_of(answered)
    expected = decision_record(view, reference, agent.engine.policy, agent.clock.now)
    for record in (table_record, engine_record):
        got = {k: v for k, v in record.items() if k not in ("seq", "prev", "decision_id", "latency_us")}
        want = {k: v for k, v in expected.items() if k not in ("decision_id", "latency_us")}
        assert got == want
        assert list(got) == list(want)  # the same fields in the same order
    assert token not in agent.audit_path.read_text()


async def test_the_answers_are_counted_for_metrics(build: Callable[..., Agent], keys: dict[str, SigningKey]) -> None:
    agent = await ready(build())
    message = request(mint(keys["ES256"]))
    agent.decide(message)
    for _ in range(5):
        assert agent.answer(message) is not None
    agent.engine.fold_recalled()
    assert agent.stats.decisions[("list-orders", "allow", "allowed")] == 6
    assert sum(agent.stats.buckets) == 6
    agent.engine.fold_recalled()  # folded once only
    assert agent.stats.decisions[("list-orders", "allow", "allowed")] == 6
    assert agent.engine.remembered_hits == 5


async def test_what_ends_a_token_ends_its_answers(build: Callable[..., Agent], keys: dict[str, SigningKey]) -> None:
    agent = await ready(build())
    now = int(agent.clock.now)
    token = mint(keys["ES256"], claims(iat=now, exp=now + 60, nbf=now))
    message = request(token)
    agent.decide(message)
    assert agent.answer(message) is not None
    agent.clock.now = now + 60 + 30  # exp + leeway: not any more
    assert agent.answer(message) is None
    assert len(agent.table) == 0  # and forgotten
    # A key-set refresh (rotation) ends it too
    agent.clock.now = now
    agent.decide(message)
    assert agent.answer(message) is not None
    store = next(iter(agent.engine.stores.values()))
    assert await store.refresh()
    assert agent.answer(message) is None
    # A revocation list (any new one) ends it; a revoked token is then refused by the engine
    agent.decide(message)
    assert agent.answer(message) is not None
    agent.engine.revocations.replace(2, frozenset({"j-1"}), {})
    assert agent.answer(message) is None
    d = agent.decide(message)
    assert not d.allowed and d.reason == "token_revoked"
    # A revoked client likewise: the table answers no more, and the engine says client_revoked.
    agent.engine.revocations.replace(3, frozenset(), {})
    agent.decide(message)
    assert agent.answer(message) is not None
    agent.engine.revocations.replace(4, frozenset(), {}, frozenset({("", "web-app")}))
    assert agent.answer(message) is None
    d = agent.decide(message)
    assert not d.allowed and d.reason == "client_revoked"


async def test_a_token_not_yet_valid_is_left_to_the_engine(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build())
    now = int(agent.clock.now)
    message = request(mint(keys["ES256"], claims(iat=now, nbf=now + 20, exp=now + 300)))
    assert agent.decide(message).allowed  # within the leeway
    agent.clock.now = now - 20  # before nbf - leeway
    assert agent.answer(message) is None


async def test_another_address_or_a_stale_sighting_goes_to_the_listeners(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build())
    token = mint(keys["ES256"])
    agent.decide(request(token, source="10.1.2.3"))
    assert agent.answer(request(token, source="10.1.2.3")) is not None
    assert agent.answer(request(token, source="10.7.7.7")) is None  # the alerts count addresses per token
    agent.clock.now += 1.0  # the alert monitor's resync
    assert agent.answer(request(token, source="10.1.2.3")) is None
    agent.decide(request(token, source="10.1.2.3"))  # the engine sees it, and hands it back
    assert agent.answer(request(token, source="10.1.2.3")) is not None


async def test_a_client_from_a_new_network_reaches_the_alerts_though_its_allow_is_remembered(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build())
    token = mint(keys["ES256"], claims(client_id="roamer"))
    assert agent.decide(request(token, source="10.1.2.3")).allowed  # its first network: learned silently
    assert agent.answer(request(token, source="10.1.2.3")) is not None
    for source in ("10.1.2.9", "10.1.9.9"):  # another host of the same /24, then another /24
        assert agent.answer(request(token, source=source)) is None
        assert agent.decide(request(token, source=source)).allowed
        assert agent.answer(request(token, source=source)) is not None
    networks = [d["network"] for kind, d in agent.alerts if kind == "new_source_network"]
    assert networks == ["10.1.9.0/24"]


@pytest.mark.parametrize(
    "headers",
    [
        {"x-authz-subject": "mallory"},
        {"X_Authz_Role": "admin"},
        {"x-http-method-override": "DELETE"},
        {"X-Original-URL": "/admin"},
        {"x-note": "caf\u00e9"},  # not ASCII: the engine's decoder judges it
    ],
)
async def test_requests_the_engine_must_rewrite_are_left_to_it(
    build: Callable[..., Agent], keys: dict[str, SigningKey], headers: dict[str, str]
) -> None:
    agent = await ready(build())
    token = mint(keys["ES256"])
    agent.decide(request(token))
    assert agent.answer(request(token)) is not None
    assert agent.answer(request(token, headers=headers)) is None


async def test_raw_header_maps_and_odd_sources_are_left_to_the_engine(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build())
    token = mint(keys["ES256"])
    agent.decide(request(token))
    raw = ext.CheckRequest.FromString(request(token))
    h = raw.attributes.request.http.header_map.headers.add()
    h.key, h.value = "x-other", "1"
    assert agent.answer(raw.SerializeToString()) is None
    assert agent.answer(request(token, method="get")) is None  # another key altogether
    assert agent.answer(request(token, path="/v1/orders?x=1")) is None
    assert agent.answer(request(token.upper())) is None


async def test_mangled_bytes_are_never_answered_otherwise_than_the_engine_would(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build())
    token = mint(keys["ES256"])
    message = request(token)
    agent.decide(message)
    original = decode_check_request(message)
    rng = random.Random(14)
    candidates = [message[:n] for n in range(len(message))]
    for _ in range(1500):
        m = bytearray(message)
        for _ in range(rng.randint(1, 3)):
            m[rng.randrange(len(m))] = rng.randrange(256)
        candidates.append(bytes(m))
    answered = 0
    for m in candidates:
        out = agent.answer(m)
        if out is None:
            continue
        answered += 1
        view = decode_check_request(m)  # the engine's decoder takes it too ...
        assert (view.method, view.path, view.source) == (original.method, original.path, original.source)
        assert view.headers.get("authorization") == original.headers["authorization"]  # ... as the same request
    assert answered > 0  # mutations of the other headers (user-agent, host) keep the same answer


async def test_rate_limited_routes_take_their_tokens_here_and_refuse_in_the_engine(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build(LIMITED))
    token = mint(keys["ES256"])
    message = request(token)
    assert agent.decide(message).allowed  # 2 left
    answered = agent.answer(message)  # 1 left
    assert answered is not None
    same = ext.CheckResponse.FromString(answered).ok_response.response_headers_to_add
    assert [(h.header.key, h.header.value) for h in same] == [
        ("ratelimit-policy", '"list-orders";q=1;w=1'),
        ("ratelimit", '"list-orders";r=1;t=2'),
    ]
    assert agent.answer(message) is not None  # 0 left
    assert agent.answer(message) is None  # none: the engine refuses it
    d = agent.decide(message)
    assert (d.status, d.reason) == (429, "rate_limited")
    # a bucket per address: another address is its own (and first seen by the engine)
    other = request(token, source="10.5.5.5")
    assert agent.decide(other).allowed


async def test_rules_that_read_only_the_address_are_answered_per_address(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build(LIMITED))
    token = mint(keys["ES256"])
    guarded = request(token, "/v1/guarded", source="10.1.2.3")
    assert agent.decide(guarded).allowed  # the deny rule on the address does not hold for this one
    assert agent.answer(guarded) is not None
    office = request(token, "/v1/guarded", source="10.9.1.1")
    assert agent.answer(office) is None  # another address: the engine judges it, and refuses it
    d = agent.decide(office)
    assert (d.allowed, d.deny_rule) == (False, "office")
    assert agent.answer(office) is None
    assert agent.answer(guarded) is not None  # the first address is still answered
    # An earlier alternative that reads the address: each address gets the alternative that holds for it.
    ops = mint(keys["ES256"], claims(roles=["ops"], jti="j-ops"))
    inside, outside = request(ops, "/v1/early", source="10.1.2.3"), request(ops, "/v1/early", source="192.0.2.7")
    assert agent.decide(inside).allow_index == 0  # allowed by what reads the address: not remembered
    assert agent.answer(inside) is None
    assert agent.decide(outside).allow_index == 1  # remembered, alternative 0 judged again on each recall
    assert agent.answer(outside) is not None
    assert agent.answer(inside) is None  # another address: the engine's recall, where alternative 0 holds ...
    assert agent.decide(inside).allow_index == 0
    assert agent.answer(inside) is not None  # ... and so it does here, for this address
    records = agent.records()
    assert [r["allow_index"] for r in records if r.get("route") == "early"] == [0, 1, 1, 0, 0]


async def test_rules_that_read_more_than_the_address_keep_a_route_in_the_engine(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build(LIMITED))
    token = mint(keys["ES256"])
    for path in ("/v1/debug", "/v1/hours"):
        assert agent.decide(request(token, path)).allowed
        assert agent.decide(request(token, path)).allowed
    assert len(agent.table) == 0
    assert agent.engine.remembered_hits == 2  # the engine recalls them, judging the rule again each time


async def test_the_table_is_bounded_oldest_out_first(build: Callable[..., Agent], keys: dict[str, SigningKey]) -> None:
    agent = await ready(build())
    tokens = [mint(keys["ES256"], claims(jti=f"j-{i}")) for i in range(70)]
    for t in tokens:
        agent.decide(request(t))
    assert len(agent.table) == 64
    assert agent.answer(request(tokens[0])) is None
    assert agent.answer(request(tokens[-1])) is not None


async def test_decision_ids_are_unique_across_the_two_paths(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    agent = await ready(build())
    message = request(mint(keys["ES256"]))
    ids = {agent.decide(message).decision_id}
    for _ in range(50):
        out = agent.answer(message)
        assert out is not None
        ids.add(did_of(out))
        ids.add(agent.decide(message).decision_id)
    assert len(ids) == 101


def test_without_summaries_from_every_listener_nothing_is_answered_from_bytes(
    write_policy: Callable[..., Path],
) -> None:
    class Watcher:
        def observe(self, view: RequestView, decision: Decision, now: float) -> None:
            pass

    policy = load_policy(write_policy())
    assert Engine.for_policy(policy, listeners=(DecisionStats(), Watcher()), wire_recall=True).recall is None
    assert Engine.for_policy(policy, listeners=(DecisionStats(),), wire_recall=True).recall is not None
    msgpack = JsonLinesAudit(None, encoding="msgpack")
    try:  # records this pass cannot format: every decision goes to the engine
        assert Engine.for_policy(policy, msgpack, listeners=(DecisionStats(),), wire_recall=True).recall is None
    finally:
        msgpack.close()


async def test_a_limit_whose_headers_this_pass_does_not_write_takes_each_token_once(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    name = "list-orders-with-a-name-much-longer-than-forty-bytes"
    agent = await ready(build(LIMITED.replace("name: list-orders", f"name: {name}", 1)))
    message = request(mint(keys["ES256"]))
    outcomes = [agent.decide(message).status]
    for _ in range(3):  # answered here (the twin writes any length) or left to the engine before taking a token
        out = agent.answer(message)
        outcomes.append(200 if out is not None else agent.decide(message).status)
    assert outcomes == [200, 200, 200, 429]  # the burst of 3, each token taken once


CERT_DENY = """\
routes:
  - name: list-orders
    match: {methods: [GET], path: /v1/orders}
    authn: [jwt]
    allow: {scopes_all: [orders:read]}
    deny:
      - {name: needs-client-cert, when: '!source.certificate_present'}
default: deny
"""


def with_certificate(message: bytes, certificate: str) -> bytes:
    req = ext.CheckRequest.FromString(message)
    req.attributes.source.certificate = certificate
    return req.SerializeToString()


async def test_a_deny_rule_on_the_client_certificate_keeps_the_route_in_the_engine(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    """The table compares the address only: a rule reading whether a client certificate came (one address may send
    with and without one) is judged by the engine on every request (found by the issue 14 review)."""
    agent = await ready(build(CERT_DENY))
    token = mint(keys["ES256"])
    certified = with_certificate(request(token), "-----BEGIN%20CERTIFICATE-----%0Axyz")
    assert agent.decide(certified).allowed
    bare = request(token)  # same token, method, path and address; no client certificate
    engine = agent.decide(bare)
    assert (engine.allowed, engine.deny_rule) == (False, "needs-client-cert")
    assert agent.answer(bare) is None, "the table allowed what the engine denies (deny rule skipped)"


CERT_EARLIER = """\
routes:
  - name: list-orders
    match: {methods: [GET], path: /v1/orders}
    authn: [jwt]
    allow:
      - {when: 'source.certificate_present == true'}
      - {scopes_all: [orders:read]}
default: deny
"""


async def test_an_earlier_alternative_on_the_certificate_keeps_the_route_in_the_engine(
    build: Callable[..., Agent], keys: dict[str, SigningKey]
) -> None:
    """The same on `allow`: a certified request's alternative (0) must not be named in a bare request's record."""
    agent = await ready(build(CERT_EARLIER))
    token = mint(keys["ES256"])
    bare = request(token)
    certified = with_certificate(request(token), "-----BEGIN%20CERTIFICATE-----%0Axyz")
    assert agent.decide(bare).allow_index == 1  # remembered: alternative 0 judged again on each recall
    assert agent.decide(certified).allow_index == 0  # the engine's recall hands the table this one
    answered = agent.answer(bare)
    engine = agent.decide(bare)
    assert engine.allow_index == 1
    table_record = next(r for r in agent.records() if r["decision_id"] == did_of(answered)) if answered else None
    assert table_record is None or table_record["allow_index"] == 1, "the table's record names alternative 0"


def test_the_tables_digests_are_secret_per_process() -> None:
    """The slot is the digest's low bits: a caller who could predict the digests of its own requests (a query string
    per try) could make them share slots and slow every lookup (found by the issue 14 review). A per-process
    secret goes into each digest."""
    import subprocess
    import sys

    code = "from agent._recall import recall_key; print(recall_key(b'Bearer t', b'GET', b'/v1/orders').hex())"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in "ab"
    }
    assert len(runs) == 2


CORRELATED = """\
routes:
  - name: read-order
    match: {methods: [GET], path: "/v1/tenants/{tenant}/orders/{id}"}
    authn: [jwt]
    allow: {scopes_all: [orders:read]}
    audit: {omit_params: [id]}
default: deny
"""
TRACE = "ab" * 15 + "12"  # a trace id (hex of low entropy: not a secret to the scanner)


@pytest.mark.parametrize(
    ("headers", "request_id", "trace_id"),
    [
        ({"x-request-id": "0f5c-11ee:a/b+c=="}, "0f5c-11ee:a/b+c==", None),
        ({"x-request-id": 'a"b'}, None, None),
        ({"x-request-id": "x" * 129}, None, None),
        ({"x-request-id": ""}, None, None),
        ({"traceparent": f"00-{TRACE}-ef01ef01ef01ef01-01"}, "r-1", TRACE),
        ({"traceparent": f"01-{TRACE}-ef01ef01ef01ef01-01-future"}, "r-1", TRACE),
        ({"traceparent": f"00-{TRACE}-ef01ef01ef01ef01-01-x"}, "r-1", None),  # version 00 has no more fields
        ({"traceparent": f"ff-{TRACE}-ef01ef01ef01ef01-01"}, "r-1", None),
        ({"traceparent": f"00-{TRACE.upper()}-ef01ef01ef01ef01-01"}, "r-1", None),
        ({"traceparent": f"00-{'0' * 32}-ef01ef01ef01ef01-01"}, "r-1", None),
        ({"traceparent": "garbage", "x-b3-traceid": TRACE}, "r-1", None),  # an invalid traceparent wins
        ({"x-b3-traceid": "cd" * 8}, "r-1", "0" * 16 + "cd" * 8),
        ({"x-b3-traceid": TRACE}, "r-1", TRACE),
        ({"x-b3-traceid": "cd" * 7 + "c"}, "r-1", None),
        ({"b3": f"{TRACE}-ef01ef01ef01ef01-1"}, "r-1", TRACE),
        ({"b3": "1"}, "r-1", None),
    ],
)
async def test_records_carry_the_request_and_trace_ids_and_path_parameters(
    build: Callable[..., Agent],
    keys: dict[str, SigningKey],
    headers: dict[str, str],
    request_id: str | None,
    trace_id: str | None,
) -> None:
    """Each record joins Envoy's log and the caller's trace, on the table's answers as on the engine's; a parameter
    the route keeps out of audit records is not there."""
    agent = await ready(build(CORRELATED))
    token = mint(keys["ES256"])
    message = request(token, "/v1/tenants/acme/orders/secret-42", headers=headers)
    agent.decide(message)
    answered = agent.answer(message)
    assert answered is not None
    records = agent.records()
    assert len(records) == 2
    for record in records:
        assert (record["request_id"], record["trace_id"]) == (request_id, trace_id)
        assert record["params"] == {"tenant": "acme"}
        assert record["path"] == "/v1/tenants/acme/orders/{id}"
    assert "secret-42" not in json.dumps(records)


# ---- spans for the answers (agent.tracing): the same records from both twins, as agent.correlation decides ----

TID, SID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"  # pragma: allowlist secret (W3C example ids)
ROOT = "root"  # a new trace: recorded at ratio 1, never at ratio 0
PARENTS: list[tuple[dict[str, str], object]] = [
    ({"traceparent": f"00-{TID}-{SID}-01"}, (TID, SID, 1)),
    ({"traceparent": f"00-{TID}-{SID}-03"}, (TID, SID, 3)),
    ({"traceparent": f"00-{TID}-{SID}-00"}, None),  # the caller's trace is not sampled: no span
    ({"traceparent": f"01-{TID}-{SID}-01-later"}, (TID, SID, 1)),
    ({"traceparent": f"00-{TID}-{SID}-01-later"}, ROOT),  # malformed (version 00 has no more fields): no parent
    ({"traceparent": f"ff-{TID}-{SID}-01"}, ROOT),
    ({"traceparent": f"00-{'0' * 32}-{SID}-01"}, ROOT),
    ({"traceparent": f"00-{TID}-{'0' * 16}-01"}, ROOT),
    ({"traceparent": f"00-{TID.upper()}-{SID}-01"}, ROOT),
    ({"traceparent": "00-xyz", "b3": f"{TID}-{SID}-1"}, ROOT),  # traceparent first, as the audit's trace_id
    ({"x-b3-traceid": TID, "x-b3-spanid": SID, "x-b3-sampled": "1"}, (TID, SID, 1)),
    ({"x-b3-traceid": TID[16:], "x-b3-spanid": SID, "x-b3-sampled": "true"}, ("0" * 16 + TID[16:], SID, 1)),
    ({"x-b3-traceid": TID, "x-b3-spanid": SID, "x-b3-flags": "1"}, (TID, SID, 1)),
    ({"x-b3-traceid": TID, "x-b3-spanid": SID}, None),  # no sampling state: the SDK's propagator says unsampled
    ({"x-b3-traceid": TID, "x-b3-spanid": SID, "x-b3-sampled": "0"}, None),
    ({"x-b3-traceid": TID}, ROOT),
    ({"b3": f"{TID}-{SID}"}, (TID, SID, 1)),  # deferred: the SDK's propagator takes it as sampled
    ({"b3": f"{TID}-{SID}-d"}, (TID, SID, 1)),
    ({"b3": f"{TID}-{SID}-True-{SID}"}, (TID, SID, 1)),
    ({"b3": f"{TID}-{SID}-0"}, None),
    ({"b3": f"{TID}-{SID}-1-{SID}-x"}, ROOT),  # five fields
    ({"b3": "1"}, ROOT),
    ({"b3": f"{TID}-{SID[:15]}-1"}, ROOT),
    ({}, ROOT),
]


@pytest.mark.parametrize("ratio", [1.0, 0.0])
async def test_sampled_answers_record_their_spans_as_the_parent_decides(
    build: Callable[..., Agent], keys: dict[str, SigningKey], ratio: float
) -> None:
    agent = await ready(build())
    token = mint(keys["ES256"])
    agent.decide(request(token, "/v1/orders?page=2"))
    table = agent.table
    assert not table.tracing and table.traces() == []
    table.trace(ratio)
    assert table.tracing
    for headers, expected in PARENTS:
        answered = agent.answer(request(token, "/v1/orders?page=2", headers=headers))
        assert answered is not None, headers
        got = table.traces()
        if expected is None or (expected == ROOT and ratio == 0.0):
            assert got == [], headers
            continue
        assert len(got) == 1, headers
        tid, sid, flags, route, did, start_ns, latency_ns, method, path = got[0]
        assert (route, did, method, path) == ("list-orders", did_of(answered), "GET", "/v1/orders")
        assert start_ns == int(agent.clock.now * 1e9) and 0 < latency_ns < 10**9
        if expected == ROOT:
            assert len(tid) == 16 and tid != bytes(16) and sid is None and flags == 1, headers
        else:
            assert (tid.hex(), sid.hex() if sid else None, flags) == expected, headers
    assert table.trace_dropped == 0


async def test_tracing_off_records_nothing_and_a_full_buffer_counts_drops(
    build: Callable[..., Agent], keys: dict[str, SigningKey], module: Any
) -> None:
    agent = await ready(build())
    token = mint(keys["ES256"])
    message = request(token, headers={"traceparent": f"00-{TID}-{SID}-01"})
    agent.decide(message)
    assert agent.answer(message) is not None and agent.table.traces() == []
    with pytest.raises(ValueError):
        agent.table.trace(1.5)
    agent.table.trace(0.5)
    n = module.TRACE_BUFFER if hasattr(module, "TRACE_BUFFER") else 4096
    for _ in range(n + 3):
        assert agent.answer(message) is not None
    assert agent.table.trace_dropped == 3
    got = agent.table.traces()
    assert len(got) == n and len({r[4] for r in got}) == n  # one per answer, each its own decision
    agent.table.trace(None)
    assert agent.answer(message) is not None and agent.table.traces() == []
    agent.table.close()  # a retired table keeps what it recorded until it is drained
    assert agent.table.traces() == []


async def test_root_sampling_follows_the_ratio(build: Callable[..., Agent], keys: dict[str, SigningKey]) -> None:
    """A root is sampled when its new trace id's low 64 bits are below ratio * 2^64 (TraceIdRatioBased)."""
    agent = await ready(build())
    token = mint(keys["ES256"])
    message = request(token)
    agent.decide(message)
    agent.table.trace(0.25)
    n = 2000
    for _ in range(n):
        agent.answer(message)
    got = agent.table.traces()
    assert 0.25 * n * 0.8 < len(got) < 0.25 * n * 1.2
    assert all(int.from_bytes(r[0][8:], "big") < (1 << 62) for r in got)
    assert len({r[0] for r in got}) == len(got)
