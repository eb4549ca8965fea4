"""A span per decision through a real Envoy: the caller's traceparent reaches the agent in the CheckRequest, and a
real OTLP receiver gets an `authz.check` span in that trace, a child of the caller's span; the repeat answered from
a remembered allow (on the native transport, from wire bytes in C) too, marked a cache hit; an unsampled caller's
trace gets none. The native agent exports by OTLP/gRPC, the grpcio one by OTLP/HTTP: both exporters proven."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from agent import reasons as R
from tests.e2e.conftest import Stack
from tests.otlp import GrpcReceiver, HttpReceiver, ReceivedSpan
from tests.wait import until

Traced = tuple[Stack, GrpcReceiver | HttpReceiver]


@pytest.fixture(
    scope="module", params=[("native", "grpc"), ("grpcio", "http")], ids=["native-otlp_grpc", "grpcio-otlp_http"]
)
def traced(make_stack: Callable[..., Stack], request: pytest.FixtureRequest) -> Iterator[Traced]:
    from agent.server.native_transport import available

    transport, otlp = request.param
    if transport == "native" and not available():
        pytest.skip("native extensions not built (AGENT_NO_EXTENSIONS=1)")
    receiver: GrpcReceiver | HttpReceiver = GrpcReceiver() if otlp == "grpc" else HttpReceiver()
    try:
        # The default sampling (0.01) for new traces: the callers' flags below decide their own.
        yield make_stack(transport=transport, agent_args=["--otlp-endpoint", receiver.url]), receiver
    finally:
        receiver.close()


def new_ids() -> tuple[str, str]:
    return os.urandom(16).hex(), os.urandom(8).hex()


def one_span(receiver: GrpcReceiver | HttpReceiver, trace_id: str) -> ReceivedSpan:
    until(lambda: receiver.with_trace(trace_id), f"a span in trace {trace_id}")
    [span] = receiver.with_trace(trace_id)
    return span


def test_a_sampled_callers_trace_gets_the_decisions_span(traced: Traced) -> None:
    stack, receiver = traced
    token = stack.idp.mint(sub="span-subject", client_id="span-client")
    tid, sid = new_ids()
    r = stack.get("/v1/orders?page=1&q=private", token, traceparent=f"00-{tid}-{sid}-01")
    assert r.status == 200
    # The same request again, at once (within the alert monitor's 1 s resync): answered from the remembered allow,
    # on the native transport by the C pass from wire bytes, which records the span itself.
    tid2, sid2 = new_ids()
    r2 = stack.get("/v1/orders?page=1&q=private", token, traceparent=f"00-{tid2}-{sid2}-01")
    assert r2.status == 200
    span = one_span(receiver, tid)
    assert (span.name, span.parent_span_id, span.kind) == ("authz.check", sid, 2)  # SERVER
    assert span.attributes == {
        "authz.route": "list-orders",
        "authz.decision": "allow",
        "authz.reason": R.ALLOWED,
        "authz.authn_method": "jwt",
        "authz.cache_hit": False,
        "authz.decision_id": r.json()["from_agent"]["x-authz-decision-id"],
        "authz.service": "orders",
        "authz.policy_version": span.attributes["authz.policy_version"],
        "http.request.method": "GET",
        "url.path": "/v1/orders",
    }
    assert span.resource["service.name"] == "authz-agent"
    assert 0 < span.end_ns - span.start_ns < 10**9
    again = one_span(receiver, tid2)
    assert again.parent_span_id == sid2 and again.attributes["authz.cache_hit"] is True
    assert again.attributes["authz.decision_id"] == r2.json()["from_agent"]["x-authz-decision-id"]
    assert {k: v for k, v in again.attributes.items() if k not in ("authz.cache_hit", "authz.decision_id")} == {
        k: v for k, v in span.attributes.items() if k not in ("authz.cache_hit", "authz.decision_id")
    }
    text = repr(span) + repr(again)
    for secret in (token, "span-subject", "span-client", "private"):
        assert secret not in text


def test_a_deny_is_traced_and_an_unsampled_trace_is_not(traced: Traced) -> None:
    stack, receiver = traced
    token = stack.idp.mint()
    unsampled, sid = new_ids()
    assert stack.get("/v1/orders", token, traceparent=f"00-{unsampled}-{sid}-00").status == 200
    assert stack.get("/v1/orders", token, traceparent=f"00-{unsampled}-{sid}-00").status == 200  # remembered
    b3, b3_span = new_ids()
    r = stack.get("/v1/orders", None, x_b3_traceid=b3, x_b3_spanid=b3_span, x_b3_sampled="1")
    assert r.status == 401
    deny = one_span(receiver, b3)  # exported after the unsampled ones were decided
    assert deny.parent_span_id == b3_span
    assert (deny.attributes["authz.decision"], deny.attributes["authz.reason"]) == ("deny", R.TOKEN_MISSING)
    assert deny.attributes["authz.authn_method"] == "none" and deny.status_code == 0
    assert receiver.with_trace(unsampled) == []
