"""Denial counts travel from a real agent (both transports, real gRPC Checks) to a real control plane's hour."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import reasons as R
from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent._xds.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.controlplane.client import PolicyClient
from agent.controlplane.denials import DenialTally
from agent.controlplane.server import SYNC_METHOD, ControlPlane
from agent.demo.idp import LocalIdP
from agent.server.native_transport import available
from agent.server.run import AgentServer
from tests.wait import until_async

POLICY = """version: 1
service: orders
identity_providers:
  corp:
    issuer: {issuer}
    discovery: true
    audiences: [orders-api]
    algorithms: [ES256]
routes:
  - name: list-orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
  - name: health
    match: {{path: /healthz}}
    public: true
default: deny
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def idp() -> AsyncIterator[LocalIdP]:
    i = LocalIdP()
    await i.start()
    yield i
    await i.stop()


async def check(stub: Any, path: str, token: str | None = None) -> str:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", path, "orders.local"
    if token is not None:
        http.headers["authorization"] = f"Bearer {token}"
    req.attributes.source.address.socket_address.address = "127.0.0.9"
    resp = await stub.Check(req, timeout=5)
    return str(resp.dynamic_metadata["reason"])


async def status(cp: ControlPlane) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{cp.admin_listen}/status") as r:
        return dict(await r.json())


@pytest.mark.parametrize("transport", ["grpcio", "native"])
async def test_denials_reach_the_control_plane_per_route_and_reason(
    idp: LocalIdP, tmp_path: Path, transport: str
) -> None:
    if transport == "native" and not available():
        pytest.skip("the native transport is not built here")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY.format(issuer=idp.issuer))
    key = Ed25519PrivateKey.generate()
    cp = ControlPlane(policies, key, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", poll_s=0.05)
    await cp.start()
    server = AgentServer(None, "127.0.0.1:0", None, str(tmp_path / "audit.log"), transport=transport)
    await server.start()
    client = PolicyClient(cp.listen, "orders", tmp_path / "state", [key.public_key()], server.install,
                          server.apply_revocations, denials=DenialTally(lambda: server.stats.decisions),
                          report_every_s=0.2)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(client.run(stop))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = ext_grpc.AuthorizationStub(channel)
    try:
        assert await server.wait_ready(10)
        token = idp.mint(scope="orders:read")
        narrow = idp.mint(scope="orders:write")
        # Allows (the remembered ones answered by the native C pass too) are never counted as denials.
        for _ in range(20):
            assert await check(stub, "/v1/orders", token) == R.ALLOWED
        for _ in range(3):
            assert await check(stub, "/v1/orders") == R.TOKEN_MISSING
        for _ in range(2):
            assert await check(stub, "/v1/orders", narrow) == R.SCOPE_MISSING
        assert await check(stub, "/nowhere") == R.NO_ROUTE
        expected = [("list-orders", R.TOKEN_MISSING, 3), ("list-orders", R.SCOPE_MISSING, 2), ("", R.NO_ROUTE, 1)]
        await until_async(lambda: cp.publisher.denials.totals("orders") == expected, "the denials reported")
        # Reported once: further reports (there are none to make) add nothing, new denials add to the same hour.
        assert await check(stub, "/v1/orders") == R.TOKEN_MISSING
        expected[0] = ("list-orders", R.TOKEN_MISSING, 4)
        await until_async(lambda: cp.publisher.denials.totals("orders") == expected, "the next denial reported")
        body = await status(cp)
        assert body["denials"]["last_hour"] == {"orders": 7}
        assert body["denials"]["rejected_entries"] == {}
        assert client.connected and client.last_error is None
    finally:
        stop.set()
        await task
        await channel.close()
        await server.stop(0.1)
        await cp.stop()


async def test_a_hostile_agent_cannot_forge_log_lines_or_flood_the_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    await cp.start()
    outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()

    async def messages() -> AsyncIterator[pb.AgentMessage]:
        while (m := await outbox.get()) is not None:
            yield m

    try:
        async with grpc.aio.insecure_channel(cp.listen) as channel:
            call = channel.stream_stream(
                SYNC_METHOD,
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.ControlMessage.FromString,
            )(messages())
            outbox.put_nowait(pb.AgentMessage(hello=pb.Hello(service="orders", agent_id="mallory")))
            flood = [pb.DenialCount(route=f"r{i}\nERROR forged", reason="token_missing", count=1) for i in range(500)]
            refused = pb.Status(error="bundle refused", denials=flood)
            for _ in range(3):  # the same refusal repeated by periodic reports: logged once
                outbox.put_nowait(pb.AgentMessage(status=refused))
            window = cp.publisher.denials
            await until_async(lambda: window.reports == 3, "the three reports read")
            totals = window.totals("orders")
            assert len(totals) == 200 and all("\n" not in r for r, _, _ in totals)
            assert window.status()["rejected_entries"] == {"(no certificate) mallory": 3 * 500}
            assert sum("refused a bundle" in r.getMessage() for r in caplog.records) == 1
            outbox.put_nowait(None)
            call.cancel()
    finally:
        await cp.stop()
