"""The TLS front's internal loopback ports, reached directly by someone on the host: never a verified peer; open
streams ended when the client CA is replaced or their certificate expires; the agents table bounded.

The front maps a forwarding connection's local port to its verified peer. A local process that binds another
loopback address (127.0.0.2) to that same port number and connects to the internal port must not be taken for
that peer: the port number alone is not the forwarding connection."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.controlplane.server import (
    AGENT_TTL_S,
    AGENTS_PER_IDENTITY,
    MAX_AGENT_ID,
    MAX_ERROR_SHOWN,
    SYNC_METHOD,
    ControlPlane,
)
from agent.controlplane.tls import ServerChannel, ServerTlsFiles
from tests.certs import ORDERS_ID, Pki, issue
from tests.wait import DEADLINE_S, until_async

POLICY = textwrap.dedent("""\
    version: 1
    service: orders
    routes:
      - {name: health, match: {path: /healthz}, public: true}
    """)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_status_from(source: tuple[str, int], port: int) -> bytes:
    """GET /status on the internal admin port, from `source` (a plain socket: what a local attacker has)."""
    with socket.socket() as s:
        s.settimeout(5)
        s.bind(source)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_a_local_process_reusing_an_admins_forwarding_port_number_is_refused(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY)
    cert, key = pki.paths("server")
    channel = ServerChannel(ServerTlsFiles(cert, key, pki.ca_path, pki.agents))
    # Port 0 (the ports bound are read back): a port picked free beforehand can be taken by the plane's own
    # internal listeners, bound on port 0 in between.
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), "127.0.0.1:0", "127.0.0.1:0", channel=channel)
    await cp.start()
    try:
        front = cp._admin_front
        assert front is not None
        # An admin's keep-alive connection through the front (a dashboard polling /status).
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", cp.admin_port, ssl=pki.client_context("admin"), server_hostname="127.0.0.1"
        )
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert b" 200 " in await reader.readline()
        await until_async(lambda: bool(front._peers), "the forwarding connection mapped")
        # What `ss -tn` shows any local user: 127.0.0.1:<forwarding port> -> 127.0.0.1:<internal port>.
        forwarding_port = next(iter(front._peers))
        internal_port = front._internal
        answer = await asyncio.to_thread(_get_status_from, ("127.0.0.2", forwarding_port), internal_port)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b" 403 " in head.split(b"\r\n")[0], head.split(b"\r\n")[0]
        assert "refusals" not in json.loads(body or b"{}")
        writer.close()
    finally:
        await cp.stop()


class Agent:
    """A Sync stream from the test itself (grpc.aio, TLS with a certificate of the test's PKI), held open."""

    def __init__(self, pki: Pki, port: int, name: str, service: str = "orders", agent_id: str = "a1") -> None:
        crt, k = pki.paths(name)
        creds = grpc.ssl_channel_credentials(pki.ca_path.read_bytes(), k.read_bytes(), crt.read_bytes())
        self.channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
        self.outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self.outbox.put_nowait(pb.AgentMessage(hello=pb.Hello(service=service, agent_id=agent_id)))
        sync = self.channel.stream_stream(SYNC_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                          response_deserializer=pb.ControlMessage.FromString)  # fmt: skip
        self.call = sync(self._requests())

    async def _requests(self) -> AsyncIterator[pb.AgentMessage]:
        while (m := await self.outbox.get()) is not None:
            yield m

    async def read(self) -> pb.ControlMessage:
        return await asyncio.wait_for(self.call.read(), DEADLINE_S)

    async def ended(self) -> grpc.StatusCode:
        """Read until the stream ends (bounded: every read has a deadline); its status code."""
        for _ in range(100):
            try:
                msg = await self.read()
            except grpc.aio.AioRpcError as e:
                return e.code()
            assert msg is not grpc.aio.EOF, "the stream ended with OK"
        raise AssertionError("the stream was not ended")

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        self.call.cancel()
        await self.channel.close()


async def _plane(tmp_path: Path, pki: Pki, poll_s: float = 0.1) -> tuple[ControlPlane, ServerChannel, Path]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY)
    cert, key = pki.paths("server")
    channel = ServerChannel(ServerTlsFiles(cert, key, pki.ca_path, pki.agents))
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), "127.0.0.1:0", None, poll_s=poll_s, channel=channel)
    await cp.start()
    return cp, channel, policies


def _refusals(channel: ServerChannel, reason: str) -> list[dict[str, Any]]:
    return [r for r in channel.refusals.status()["last"] if r["reason"] == reason]


async def test_a_stream_opened_under_a_replaced_client_ca_is_ended(tmp_path: Path) -> None:
    """The client CA rotated away from an agent's issuer (the way to cut off a compromised CA) ends that agent's
    open stream; an agent whose issuer is still in the new CA file keeps its stream."""
    pki = Pki(tmp_path)
    pki.leaf("orders", ORDERS_ID)
    cp, channel, policies = await _plane(tmp_path, pki)
    cut, kept = Agent(pki, cp.port, "orders"), None
    try:
        assert (await cut.read()).WhichOneof("kind") == "bundle"
        # A second agent from a new CA; the operator's new CA file holds the new CA only.
        new_ca = trustme.CA()
        pki.leaf("orders-new", ORDERS_ID, ca=new_ca)
        both = pki.ca_path.with_name("both.pem")
        both.write_bytes(pki.ca_path.read_bytes() + new_ca.cert_pem.bytes())
        reloaded = channel.reloaded_at
        both.replace(pki.ca_path)  # first both CAs (a rotation's overlap): nobody is cut off
        await until_async(lambda: channel.reloaded_at != reloaded, "the overlapping CA file taken")
        kept = Agent(pki, cp.port, "orders-new", agent_id="a2")
        assert (await kept.read()).WhichOneof("kind") == "bundle"
        generation = channel.ca_generation
        await until_async(lambda: cp._ca_generation == generation, "open connections verified again")
        assert not _refusals(channel, "certificate_invalid")
        only_new = pki.ca_path.with_name("new.pem")
        only_new.write_bytes(new_ca.cert_pem.bytes())
        only_new.replace(pki.ca_path)  # then the old CA removed: its agent's stream ends
        assert await cut.ended() == grpc.StatusCode.UNAVAILABLE
        [refusal] = _refusals(channel, "certificate_invalid")
        assert refusal["identity"] == ORDERS_ID and refusal["service"] == "orders"
        assert "client CA replaced" in refusal["detail"]
        # The agent under the new CA still gets what is published.
        (policies / "orders.yaml").write_text(POLICY + "  - {name: h2, match: {path: /h2}, public: true}\n")
        assert (await kept.read()).WhichOneof("kind") == "bundle"
    finally:
        await cut.close()
        if kept is not None:
            await kept.close()
        await cp.stop()


async def test_a_stream_is_ended_when_its_certificate_expires(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    issue(pki.ca, ORDERS_ID, valid_for=datetime.timedelta(seconds=4)).write(*pki.paths("short"))
    cp, channel, _ = await _plane(tmp_path, pki)
    agent = Agent(pki, cp.port, "short")
    try:
        assert (await agent.read()).WhichOneof("kind") == "bundle"
        assert await agent.ended() == grpc.StatusCode.UNAVAILABLE
        [refusal] = _refusals(channel, "certificate_expired")
        assert refusal["identity"] == ORDERS_ID and refusal["service"] == "orders"
        assert "expired at" in refusal["detail"]
        await until_async(lambda: not [a for a in cp.publisher.agents.values() if a.connected], "agent disconnected")
    finally:
        await agent.close()
        await cp.stop()


async def test_the_agents_table_is_bounded_and_shows_what_agents_sent_escaped(tmp_path: Path) -> None:
    """Hellos with fresh agent ids cannot grow the table without bound; an agent id of any length is refused,
    the ids and errors an agent sends are escaped and bounded; disconnected agents are forgotten after a TTL."""
    pki = Pki(tmp_path)
    pki.leaf("orders", ORDERS_ID)
    cp, channel, _ = await _plane(tmp_path, pki, poll_s=0.5)
    crt, k = pki.paths("orders")
    creds = grpc.ssl_channel_credentials(pki.ca_path.read_bytes(), k.read_bytes(), crt.read_bytes())
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{cp.port}", creds) as ch:
            sync = ch.stream_stream(SYNC_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                    response_deserializer=pb.ControlMessage.FromString)  # fmt: skip
            huge = pb.AgentMessage(hello=pb.Hello(service="orders", agent_id="x" * (1 << 20)))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(sync(iter([huge])).read(), DEADLINE_S)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _refusals(channel, "bad_hello")[-1]["detail"] == f"agent_id longer than {MAX_AGENT_ID} characters"
            assert not cp.publisher.agents
            for i in range(AGENTS_PER_IDENTITY + 20):  # short streams, each with a fresh id
                call = sync(iter([pb.AgentMessage(hello=pb.Hello(service="orders", agent_id=f"id-{i}"))]))
                await asyncio.wait_for(call.read(), DEADLINE_S)  # the bundle: the Hello was taken
                call.cancel()
            await until_async(lambda: not any(a.connected for a in cp.publisher.agents.values()), "all ended")
            assert len(cp.publisher.agents) == AGENTS_PER_IDENTITY
            assert "orders/id-0" not in cp.publisher.agents  # the oldest disconnected went first
            # An id and an error with control characters: one line each in the log and /status, bounded.
            forged = "a\nINFO agent forged connected"
            report = pb.Status(version="v\r1", error="bad\nERROR forged" + "e" * 5000)
            msgs = [pb.AgentMessage(hello=pb.Hello(service="orders", agent_id=forged)), pb.AgentMessage(status=report)]
            outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
            for m in msgs:
                outbox.put_nowait(m)

            async def requests() -> AsyncIterator[pb.AgentMessage]:
                while (m := await outbox.get()) is not None:
                    yield m

            call = sync(requests())
            await asyncio.wait_for(call.read(), DEADLINE_S)
            shown = "a\\nINFO agent forged connected"
            await until_async(lambda: cp.publisher.agents.get(f"orders/{shown}", None) is not None
                              and cp.publisher.agents[f"orders/{shown}"].error, "the status report taken")  # fmt: skip
            info = cp.publisher.agents[f"orders/{shown}"]
            assert info.version == "v\\r1" and info.error.startswith("bad\\nERROR forged")
            assert len(info.error) <= MAX_ERROR_SHOWN + 3
            outbox.put_nowait(None)
            call.cancel()
            await until_async(lambda: not info.connected, "the last stream ended")
        cp.publisher.prune_agents(time.time() + AGENT_TTL_S + 1)
        assert not cp.publisher.agents
    finally:
        await cp.stop()
