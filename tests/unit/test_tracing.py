"""A span per decision (agent.tracing): sampled as ParentBased(TraceIdRatioBased) decides, a child of the caller's
span, with the decision's shape and nothing of the caller's material, exported by OTLP over gRPC and HTTP to real
receivers; and with tracing off, nothing of OpenTelemetry imported."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agent import reasons as R
from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent.config import Policy, load_policy
from agent.correlation import parent, trace_id
from agent.decision import Decision, RequestView
from agent.engine import OVERRIDE_HEADERS, Engine
from agent.tracing import Endpoint, SpanListener, Tracer, check_ratio, parse_endpoint
from tests.conftest import twins
from tests.keys import SigningKey, claims, mint
from tests.otlp import GrpcReceiver, HttpReceiver
from tests.wait import until

TID, SID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"  # pragma: allowlist secret (W3C example ids)
SAMPLED = {"traceparent": f"00-{TID}-{SID}-01"}
ROOT = Path(__file__).parent.parent.parent


# ---- the endpoint and the ratio, checked at start --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://collector:4318", Endpoint("http", "http://collector:4318/v1/traces", True)),
        ("http://collector:4318/", Endpoint("http", "http://collector:4318/v1/traces", True)),
        (
            "https://otel.example.com/ingest/v1/traces",
            Endpoint("http", "https://otel.example.com/ingest/v1/traces", False),
        ),
        ("grpc://127.0.0.1:4317", Endpoint("grpc", "http://127.0.0.1:4317", True)),
        ("grpc://collector", Endpoint("grpc", "http://collector:4317", True)),
        ("grpcs://[::1]:4317", Endpoint("grpc", "https://[::1]:4317", False)),
        ("GRPCS://collector:4317/", Endpoint("grpc", "https://collector:4317", False)),
    ],
)
def test_the_url_scheme_picks_the_exporter(url: str, expected: Endpoint) -> None:
    assert parse_endpoint(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("collector:4317", "the scheme must be"),
        ("ftp://collector", "the scheme must be"),
        ("udp://collector:4317", "the scheme must be"),
        ("http://", "needs a host"),
        ("grpc://collector:4317/v1/traces", "has no path"),
        ("http://collector:99999", "valid port"),
        ("http://collector:4318/v1/traces?x=1", "no query"),
        ("https://user:s3cret-pass@collector/v1/traces", "credentials in the URL"),  # pragma: allowlist secret
    ],
)
def test_a_bad_endpoint_is_refused_clearly_without_its_credentials(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as e:
        parse_endpoint(url)
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("ratio", [-0.01, 1.01, float("nan"), float("inf")])
def test_a_ratio_outside_0_to_1_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match="from 0 to 1"):
        check_ratio(ratio)
    assert check_ratio(0.0) == 0.0 and check_ratio(1.0) == 1.0


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def test_run_refuses_a_bad_endpoint_or_ratio_before_starting(write_policy: Callable[..., Path]) -> None:
    policy = str(write_policy())
    r = run_cli("run", "--policy", policy, "--otlp-endpoint", "tcp://collector:4317")
    assert r.returncode == 2 and "--otlp-endpoint: the scheme must be" in r.stderr
    r = run_cli("run", "--policy", policy, "--otlp-endpoint", "grpc://127.0.0.1:4317", "--trace-sample", "2")
    assert r.returncode == 2 and "--trace-sample: a ratio from 0 to 1" in r.stderr
    r = run_cli("run", "--policy", policy, "--trace-sample", "0.5")
    assert r.returncode == 2 and "--trace-sample needs --otlp-endpoint" in r.stderr


def test_tracing_off_imports_nothing_of_opentelemetry_tracing(
    write_policy: Callable[..., Path], tmp_path: Path
) -> None:
    """Off, the agent as `run` builds it decides without a listener for spans, and without OpenTelemetry loaded."""
    code = f"""
import asyncio, sys
TRACING = {TRACING!r}
import agent.cli, agent.tracing
from agent.config import load_policy
from agent.decision import RequestView
from agent.server.run import AgentServer

async def main():
    server = AgentServer(load_policy({str(write_policy())!r}), "127.0.0.1:0", None, {str(tmp_path / "a.log")!r},
                         transport="native")
    d = await server.engine.check(RequestView("GET", "/v1/orders", headers={{"traceparent": "00-{TID}-{SID}-01"}}))
    assert d.reason == "token_missing", d.reason
    assert server.tracer is None and len(server.engine.listeners) == 2
    assert server.engine.recall is None or not server.engine.recall.tracing
    server.audit.close()

asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith(TRACING)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# What tracing would load. (redis-py 8 imports OpenTelemetry's API and metrics SDK for its own observability when
# they are installed, whatever the agent does: those are not the agent's.)
TRACING = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter",
    "opentelemetry.proto",
    "opentelemetry.trace.propagation.tracecontext",
    "opentelemetry.propagators",
)


# ---- the parent: the SDK's propagator is the reference ----------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TID}-{SID}-01",
        f"00-{TID}-{SID}-00",
        f"00-{TID}-{SID}-09",
        f"01-{TID}-{SID}-01-more",
        f"01-{TID}-{SID}-01",
        f"00-{TID}-{SID}-01-more",
        f"ff-{TID}-{SID}-01",
        f"00-{'0' * 32}-{SID}-01",
        f"00-{TID}-{'0' * 16}-01",
        f"00-{TID.upper()}-{SID}-01",
        f"00-{TID}-{SID}-1",
        f"00-{TID[:-1]}-{SID}-01",
        "00-xyz",
        "",
    ],
)
def test_traceparent_is_read_as_the_sdk_reads_it(value: str) -> None:
    context = get_current_span(TraceContextTextMapPropagator().extract({"traceparent": value})).get_span_context()
    expected = (f"{context.trace_id:032x}", f"{context.span_id:016x}", int(context.trace_flags))
    assert parent({"traceparent": value}) == (expected if context.is_valid else None)
    if context.is_valid:  # the span's trace is the audit record's
        assert trace_id({"traceparent": value}) == expected[0]


# ---- spans from the engine's decisions ---------------------------------------------------------------------------


class Traced:
    """An engine with a Tracer's listener, its spans kept by the SDK's in-memory exporter (or sent by OTLP)."""

    def __init__(self, policy: Policy, ratio: float, endpoint: Endpoint | None = None, wire: bool = False) -> None:
        self.memory = InMemorySpanExporter()
        self.tracer = Tracer(
            endpoint or Endpoint("grpc", "http://127.0.0.1:1", True),
            ratio,
            exporter=None if endpoint is not None else self.memory,
            schedule_delay_ms=50,
        )
        self.engine = Engine.for_policy(policy, listeners=(self.tracer.listener(policy),), wire_recall=wire)

    async def ready(self) -> Traced:
        for s in self.engine.stores.values():
            assert await s.refresh()
        return self

    async def check(self, path: str = "/v1/orders", token: str | None = None, **headers: str) -> Decision:
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            hdrs["authorization"] = f"Bearer {token}"
        hdrs.setdefault("user-agent", "curl/8-secret-ua")
        hdrs.setdefault("x-request-id", "rid-secret-1")
        return await self.engine.check(RequestView("GET", path, "orders.local", hdrs, "10.1.2.3", "https"))

    def spans(self) -> list[Any]:
        self.tracer.drain()
        self.tracer.provider.force_flush()
        return sorted(self.memory.get_finished_spans(), key=lambda s: s.start_time)


@pytest.fixture
def traced(write_policy: Callable[..., Path]) -> Iterator[Callable[..., Traced]]:
    made: list[Traced] = []

    def make(ratio: float = 0.0, **kw: Any) -> Traced:
        made.append(Traced(load_policy(write_policy()), ratio, **kw))
        return made[-1]

    yield make
    for t in made:
        t.tracer.close(2.0)


async def test_a_sampled_parent_gets_a_child_span_with_the_decisions_shape(
    traced: Callable[..., Traced], keys: dict[str, SigningKey]
) -> None:
    t = await traced(0.0).ready()  # new traces never sampled: the caller's flag decides its own
    token = mint(keys["ES256"], claims(sub="alice-subject", client_id="web-app-client", tenant_id="acme"))
    d = await t.check("/v1/orders?page=2&secret=q", token, **SAMPLED)
    assert d.allowed
    [span] = t.spans()
    assert span.name == "authz.check" and span.kind == SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TID and span.parent is not None
    assert f"{span.parent.span_id:016x}" == SID and span.parent.is_remote
    assert span.end_time - span.start_time == d.latency_us * 1000
    assert abs(span.end_time - time.time_ns()) < 5 * 10**9
    assert dict(span.attributes) == {
        "authz.route": "list-orders",
        "authz.decision": "allow",
        "authz.reason": R.ALLOWED,
        "authz.authn_method": "jwt",
        "authz.cache_hit": False,
        "authz.decision_id": d.decision_id,
        "authz.service": "orders",
        "authz.policy_version": t.engine.policy.version,
        "http.request.method": "GET",
        "url.path": "/v1/orders",
    }
    assert span.status.status_code == StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "authz-agent"
    # Nothing of the caller's material: the token, its claims, the subject, other headers' values, the query.
    text = json.dumps({**dict(span.attributes), **dict(span.resource.attributes)})
    for secret in (token, token.split(".")[2], "alice-subject", "web-app-client", "acme", "curl/8-secret-ua",
                   "rid-secret-1", "secret=q", "10.1.2.3"):  # fmt: skip
        assert secret not in text


async def test_unsampled_parents_and_roots_follow_the_ratio(
    traced: Callable[..., Traced], keys: dict[str, SigningKey]
) -> None:
    token = mint(keys["ES256"])
    never = await traced(0.0).ready()
    await never.check("/v1/orders", token)  # a root at ratio 0
    await never.check("/v1/orders", token, traceparent=f"00-{TID}-{SID}-00")
    await never.check("/v1/orders", token, b3=f"{TID}-{SID}-0")
    assert never.spans() == []
    always = await traced(1.0).ready()
    await always.check("/v1/orders", token)  # a root at ratio 1: a new trace
    await always.check("/v1/orders", token, traceparent=f"00-{TID}-{SID}-00")  # the caller said no
    await always.check("/v1/orders", token, b3=f"{TID[16:]}-{SID}-1")  # B3 single, 64-bit trace id
    await always.check("/v1/orders", token, x_b3_traceid=TID, x_b3_spanid=SID, x_b3_sampled="1")
    root, single, multi = always.spans()
    assert root.parent is None and root.context.trace_id != int(TID, 16)
    assert f"{single.context.trace_id:032x}" == "0" * 16 + TID[16:] and single.parent.span_id == int(SID, 16)
    assert f"{multi.context.trace_id:032x}" == TID and multi.parent.span_id == int(SID, 16)


async def test_denies_errors_and_remembered_allows_are_told_apart(
    traced: Callable[..., Traced], keys: dict[str, SigningKey]
) -> None:
    t = await traced(1.0).ready()
    token = mint(keys["ES256"])
    await t.check("/v1/orders", None)
    await t.check("/v1/orders", token)
    await t.check("/v1/orders", token)  # the engine's remembered allow
    await t.check("/nowhere", token)
    deny, first, again, nowhere = t.spans()
    assert (deny.attributes["authz.decision"], deny.attributes["authz.reason"]) == ("deny", R.TOKEN_MISSING)
    assert deny.attributes["authz.authn_method"] == "none" and deny.status.status_code == StatusCode.UNSET
    assert first.attributes["authz.cache_hit"] is False and again.attributes["authz.cache_hit"] is True
    assert "authz.route" not in nowhere.attributes and nowhere.attributes["authz.reason"] == R.NO_ROUTE
    empty = Policy(service="", identity_providers=(), routes=(), version="")
    e = Traced(empty, 1.0)
    try:
        d = await e.check("/v1/orders")
        assert d.outcome == "error"
        [error] = e.spans()
        assert error.status.status_code == StatusCode.ERROR and error.status.description == R.POLICY_UNAVAILABLE
    finally:
        e.tracer.close(2.0)


# ---- spans for allows answered from wire bytes (agent._recall) ------------------------------------------------


@pytest.fixture(params=twins("agent._recall_py", "_recall"))
def recall_module(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


def check_request(token: str, path: str = "/v1/orders", headers: dict[str, str] | None = None) -> bytes:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", path, "orders.local", "https"
    http.headers["authorization"] = f"Bearer {token}"
    for k, v in (headers or {}).items():
        http.headers[k] = v
    req.attributes.source.address.socket_address.address = "10.1.2.3"
    return req.SerializeToString()


async def test_allows_answered_from_wire_bytes_get_their_spans(
    traced: Callable[..., Traced], keys: dict[str, SigningKey], recall_module: Any
) -> None:
    from agent._wire_py import decode_check_request

    t = traced(0.0, wire=True)
    policy = t.engine.policy
    table = recall_module.RecallTable(64, None, "x-authz-", OVERRIDE_HEADERS)
    t.engine.recall = table
    t.tracer.listener(policy).wire(table)  # as Engine._wire_recall hands its table to the listeners
    await t.ready()
    token = mint(keys["ES256"])
    sampled = check_request(token, "/v1/orders?page=1", SAMPLED)
    unsampled = check_request(token, "/v1/orders?page=1", {"traceparent": f"00-{TID}-{SID}-00"})
    d = t.engine.decide(decode_check_request(sampled))
    assert isinstance(d, Decision) and d.allowed
    answered = table.answer(sampled)
    assert answered is not None and table.answer(unsampled) is not None
    did = str(ext.CheckResponse.FromString(answered).dynamic_metadata["decision_id"])
    engine_span, wire_span = t.spans()
    assert engine_span.attributes["authz.cache_hit"] is False
    assert f"{wire_span.context.trace_id:032x}" == TID and wire_span.parent.span_id == int(SID, 16)
    assert dict(wire_span.attributes) == {
        "authz.route": "list-orders",
        "authz.decision": "allow",
        "authz.reason": R.ALLOWED,
        "authz.authn_method": "jwt",
        "authz.cache_hit": True,
        "authz.decision_id": did,
        "authz.service": "orders",
        "authz.policy_version": policy.version,
        "http.request.method": "GET",
        "url.path": "/v1/orders",
    }
    assert 0 < wire_span.end_time - wire_span.start_time < 10**9
    table.close()  # retired: drained once more, then forgotten
    t.tracer.drain()
    assert all(ref() is not table for ref, _ in t.tracer._tables)
    another = recall_module.RecallTable(64, None, "x-authz-", OVERRIDE_HEADERS)
    t.tracer.listener(policy).wire(another)  # an engine built for a reload that was refused: never retired
    del another
    t.tracer.drain()
    assert t.tracer._tables == []


def test_the_engine_hands_its_table_to_the_tracer(write_policy: Callable[..., Path]) -> None:
    policy = load_policy(write_policy())
    tracer = Tracer(Endpoint("grpc", "http://127.0.0.1:1", True), 0.25, exporter=InMemorySpanExporter())
    try:
        listener = tracer.listener(policy)
        assert isinstance(listener, SpanListener)
        engine = Engine.for_policy(policy, listeners=(listener,), wire_recall=True)
        assert engine.recall is not None and engine.recall.tracing
        assert Engine.for_policy(policy, wire_recall=True).recall.tracing is False  # type: ignore[union-attr]
    finally:
        tracer.close(2.0)


# ---- OTLP to real receivers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("receiver_type", [GrpcReceiver, HttpReceiver])
async def test_spans_reach_a_real_otlp_receiver(
    write_policy: Callable[..., Path], keys: dict[str, SigningKey], receiver_type: Any
) -> None:
    receiver = receiver_type()
    t = Traced(load_policy(write_policy()), 0.0, endpoint=parse_endpoint(receiver.url))
    try:
        await t.ready()
        d = await t.check("/v1/orders", mint(keys["ES256"]), **SAMPLED)
        t.tracer.start()
        until(lambda: receiver.with_trace(TID), "the span is exported")
        [span] = receiver.with_trace(TID)
        assert (span.name, span.parent_span_id, span.kind) == ("authz.check", SID, 2)
        assert span.attributes["authz.decision_id"] == d.decision_id and span.attributes["authz.cache_hit"] is False
        assert span.resource["service.name"] == "authz-agent"
        if isinstance(receiver, HttpReceiver):
            assert receiver.paths == ["/v1/traces"]
        # The receiver holds the span before the exporter's call returns and counts it: wait for the count.
        until(lambda: t.tracer.exported == 1, "the export counted")
        assert t.tracer.failed == 0 and t.tracer.dropped == 0
    finally:
        t.tracer.close(2.0)
        receiver.close()


async def test_a_collector_that_is_down_costs_decisions_nothing(
    write_policy: Callable[..., Path], keys: dict[str, SigningKey]
) -> None:
    from tests.e2e.conftest import free_port

    t = Traced(load_policy(write_policy()), 1.0, endpoint=parse_endpoint(f"grpc://127.0.0.1:{free_port()}"))
    t.tracer.start()
    try:
        await t.ready()
        token = mint(keys["ES256"])
        await t.check("/v1/orders", token)
        start = time.perf_counter()
        for _ in range(200):
            await t.check("/v1/orders", token)
        # ~20 us each; an exporter waited on would hold each for its retries (seconds): a wide bound, not a speed goal
        assert time.perf_counter() - start < 10.0
    finally:
        start = time.monotonic()
        t.tracer.close(1.0)
        assert time.monotonic() - start < 5.0  # the flush is bounded (the SDK alone would wait up to 30 s)


async def test_spans_past_the_max_rate_are_dropped_and_counted(
    write_policy: Callable[..., Path], keys: dict[str, SigningKey]
) -> None:
    """A caller that sets the sampled flag on every request gets at most --trace-max-rate spans a second."""
    t = Traced(load_policy(write_policy()), 0.0)
    t.tracer.max_rate = t.tracer._budget = 5.0
    try:
        await t.ready()
        token = mint(keys["ES256"])
        start = time.monotonic()
        for _ in range(40):
            assert (await t.check("/v1/orders", token, **SAMPLED)).allowed
        made = len(t.spans())
        elapsed = time.monotonic() - start
        assert 5 <= made <= 5 + 5 * elapsed + 1  # the budget, plus what refilled meanwhile
        assert t.tracer.dropped == 40 - made
    finally:
        t.tracer.close(2.0)


def test_a_max_rate_below_one_span_a_second_is_refused(write_policy: Callable[..., Path]) -> None:
    run = run_cli("run", "--policy", str(write_policy()), "--otlp-endpoint", "grpc://127.0.0.1:4317",
                  "--trace-max-rate", "0")  # fmt: skip
    assert run.returncode == 2 and "--trace-max-rate must be at least 1 span a second" in run.stderr
    run = run_cli("run", "--policy", str(write_policy()), "--trace-max-rate", "10")
    assert run.returncode == 2 and "--trace-max-rate needs --otlp-endpoint" in run.stderr
