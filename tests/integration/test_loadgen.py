"""The bench's load generator (both twins) against the real agent in a child process (its native transport when
built, else grpcio): Check calls at a fixed rate and closed-loop, answered as the agent decides them."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent.server.native_transport import available
from tests.conftest import twins
from tests.e2e.conftest import AgentProcess, free_port
from tests.keys import SigningKey, claims, mint

CHECK = b"/envoy.service.auth.v3.Authorization/Check"
MODULES = twins("agent._loadgen_py", "_loadgen")


@pytest.fixture(params=MODULES)
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


@pytest.fixture
def agent(write_policy: Callable[..., Path], tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(
        write_policy(), f"127.0.0.1:{free_port()}", tmp_path, transport="native" if available() else "grpcio"
    )
    try:
        yield proc
    finally:
        proc.stop()


def check_request(token: str | None) -> bytes:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/v1/orders", "orders.example"
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    req.attributes.source.address.socket_address.address = "10.1.2.3"
    return bytes(req.SerializeToString())


def test_checks_at_a_fixed_rate_then_closed_loop(
    mod: ModuleType, agent: AgentProcess, keys: dict[str, SigningKey]
) -> None:
    messages = [
        check_request(mint(keys["ES256"])),  # allowed
        check_request(None),  # no credentials: 401
        check_request(mint(keys["ES256"], claims(scope="orders:write"))),  # missing scope: 403
    ]
    expected = [200, 401, 403]
    items = [(b"POST", CHECK, [], m) for m in messages]
    host, port = agent.listen.rsplit(":", 1)
    order = [k % 3 for k in range(5000)]

    fixed = mod.Load(host, int(port), items, order, grpc=True, authority="authz", rate=500, duration_s=1.0)
    fixed.run()
    n = fixed.sent
    assert 499 <= n <= 501 and fixed.completed == n
    out, lat, intended = fixed.outcomes(), fixed.latencies_ns(), fixed.intended_ns()
    assert [out[k] for k in range(n)] == [expected[order[k]] for k in range(n)]
    assert min(lat[:n]) > 0 and set(lat[n:]) <= {-1}
    assert list(intended[:n]) == [int(k * 1e9 / 500) for k in range(n)]  # 2 ms apart

    closed = mod.Load(host, int(port), items, order, grpc=True, authority="authz", duration_s=1.0)
    closed.run()
    n = closed.sent
    assert n > 200 and closed.completed == n
    out, lat, intended = closed.outcomes(), closed.latencies_ns(), closed.intended_ns()
    assert [out[k] for k in range(n)] == [expected[order[k]] for k in range(n)]
    assert min(lat[:n]) > 0
    assert list(intended[:n]) == sorted(intended[:n]) and intended[0] >= 0  # actual send times, in order
    assert closed.elapsed_ns >= 1e9 or n == len(order)
