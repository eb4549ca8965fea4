"""The native transport against clients nobody here wrote: grpcio, and the h2 library speaking raw HTTP/2."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent._xds.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from agent.config import load_policy
from agent.envoyconf import MAX_CHECK_REQUEST_BYTES
from agent.server.native_transport import available
from agent.server.run import AgentServer
from tests.keys import SigningKey, mint
from tests.wait import until_async

pytestmark = pytest.mark.skipif(not available(), reason="native extensions not built (AGENT_NO_EXTENSIONS=1)")
CHECK = "/envoy.service.auth.v3.Authorization/Check"
GRPC_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "x"),
    (":path", CHECK),
    ("content-type", "application/grpc"),
]


def check_request(token: str | None = None, path: str = "/v1/orders") -> bytes:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path = "GET", path
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    return bytes(req.SerializeToString())


def frame(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + struct.pack(">I", len(message)) + message


@pytest.fixture
async def server(write_policy: Callable[..., Path]) -> AsyncIterator[AgentServer]:
    s = AgentServer(load_policy(write_policy()), "127.0.0.1:0", None, None, transport="native")
    await s.start()
    assert await s.wait_ready(5)
    await until_async(lambda: s.transport.serving, "the readiness watcher flips health to SERVING")
    yield s
    await s.stop(0.5)


class RawH2:
    """A blocking HTTP/2 client made with the h2 library, run in a thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def call(self, body: bytes, path: str = CHECK, headers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        sid = self.conn.get_next_available_stream_id()
        hdrs = headers or [*GRPC_HEADERS[:3], (":path", path), ("content-type", "application/grpc"), ("te", "trailers")]
        self.conn.send_headers(sid, hdrs)
        self.conn.send_data(sid, body, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        return self.read(sid)

    def read(self, sid: int) -> dict[str, Any]:
        out: dict[str, Any] = {"headers": {}, "data": b"", "trailers": {}, "reset": None}
        while True:
            data = self.sock.recv(65536)
            if not data:
                out["closed"] = True
                return out
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    out["headers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    out["data"] += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == sid:
                    out["trailers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    out["reset"] = ev.error_code
                    self.sock.sendall(self.conn.data_to_send())
                    return out
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.sock.sendall(self.conn.data_to_send())
                    return out
            self.sock.sendall(self.conn.data_to_send())

    def status(self, result: dict[str, Any]) -> str | None:
        s = result["trailers"].get("grpc-status") or result["headers"].get("grpc-status")
        return str(s) if s is not None else None

    def close(self) -> None:
        self.sock.close()


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


async def test_grpcio_client_check_health_and_unknown_methods(server: AgentServer, keys: dict[str, SigningKey]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = ext_grpc.AuthorizationStub(ch)
        req = ext.CheckRequest.FromString(check_request(mint(keys["ES256"])))
        ok = await stub.Check(req, timeout=5)
        assert ok.status.code == 0 and ok.dynamic_metadata["reason"] == "allowed"
        denied = await stub.Check(ext.CheckRequest.FromString(check_request()), timeout=5)
        assert denied.denied_response.status.code == 401
        results = await asyncio.gather(*(stub.Check(req, timeout=10) for _ in range(300)))
        assert all(r.status.code == 0 for r in results)
        health = health_pb2_grpc.HealthStub(ch)
        h = await health.Check(health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await health.Check(health_pb2.HealthCheckRequest(service="other"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/envoy.service.auth.v3.Authorization/Other")(b"", timeout=5)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_remembered_allows_are_answered_first_and_end_with_their_policy(
    server: AgentServer, write_policy: Callable[..., Path], keys: dict[str, SigningKey]
) -> None:
    """Repeated Checks are answered by the remembered-allow table inside the transport; a new policy is enforced
    on the very next Check, never answered from what the old one remembered."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = ext_grpc.AuthorizationStub(ch)
        req = ext.CheckRequest.FromString(check_request(mint(keys["ES256"])))
        for _ in range(5):
            assert (await stub.Check(req, timeout=5)).status.code == 0
        old = server.engine
        assert old.recall is not None and old.recall.hits == 4
        stricter = write_policy().read_text().replace("scopes_all: [orders:read]}", "scopes_all: [orders:admin]}", 1)
        path = write_policy()
        path.write_text(stricter)
        assert await server.install(load_policy(path), "test") is None
        assert server.engine is not old and old.recall.answer(req.SerializeToString()) is None
        denied = await stub.Check(req, timeout=5)
        assert denied.denied_response.status.code == 403
        assert denied.dynamic_metadata["reason"] == "scope_missing"


async def test_h2_client_gets_grpc_framing_and_trailers(server: AgentServer, keys: dict[str, SigningKey]) -> None:
    c = RawH2(server.port)
    try:
        r = await in_thread(lambda: c.call(frame(check_request(mint(keys["ES256"])))))
        assert r["headers"][":status"] == "200" and r["headers"]["content-type"] == "application/grpc"
        assert c.status(r) == "0"
        flag, length = r["data"][0], struct.unpack(">I", r["data"][1:5])[0]
        resp = ext.CheckResponse.FromString(r["data"][5:])
        assert flag == 0 and length == len(r["data"]) - 5 and resp.status.code == 0
    finally:
        c.close()


@pytest.mark.parametrize(
    "body,expected",
    [
        (frame(check_request(), flag=1), "12"),  # compressed: not supported
        (frame(check_request())[:-1], "13"),  # length prefix says more than sent
        (frame(check_request()) + frame(check_request()), "13"),  # two messages on a unary call
        (b"\x00\x00", "13"),  # no complete prefix
        (frame(b"\x0a\xff"), "3"),  # not a CheckRequest
    ],
)
async def test_bad_grpc_frames_get_a_grpc_status(server: AgentServer, body: bytes, expected: str) -> None:
    c = RawH2(server.port)
    try:
        r = await in_thread(lambda: c.call(body))
        assert c.status(r) == expected
        # The connection stays usable.
        assert c.status(await in_thread(lambda: c.call(frame(check_request())))) == "0"
    finally:
        c.close()


async def test_non_grpc_requests_get_415(server: AgentServer) -> None:
    c = RawH2(server.port)
    try:
        hdrs = [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", CHECK)]
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, hdrs, end_stream=True)
        c.sock.sendall(c.conn.data_to_send())
        r = await in_thread(lambda: c.read(sid))
        assert r["headers"][":status"] == "415"
    finally:
        c.close()


async def test_end_stream_in_a_later_empty_frame_is_served(server: AgentServer) -> None:
    # Some clients send the whole message, then END_STREAM on an empty DATA frame of its own.
    c = RawH2(server.port)
    try:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, GRPC_HEADERS)
        c.conn.send_data(sid, frame(check_request()))
        c.sock.sendall(c.conn.data_to_send())
        c.conn.send_data(sid, b"", end_stream=True)
        c.sock.sendall(c.conn.data_to_send())
        assert c.status(await in_thread(lambda: c.read(sid))) == "0"
        assert server.transport.stats()["buffered_bytes"] == 0  # type: ignore[union-attr]
    finally:
        c.close()


@pytest.mark.parametrize(
    "method,content_type,status",
    [
        ("POST", "text/plain", "415"),
        ("POST", "application/grpc-web", "415"),
        ("GET", "application/grpc", "405"),
        ("PUT", "application/grpc", "405"),
    ],
)
async def test_a_request_that_is_not_a_grpc_call_is_refused_before_its_body(
    server: AgentServer, method: str, content_type: str, status: str
) -> None:
    c = RawH2(server.port)
    try:
        hdrs = [(":method", method), (":scheme", "http"), (":authority", "x"), (":path", CHECK)]
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [*hdrs, ("content-type", content_type)])
        c.conn.send_data(sid, frame(check_request()))  # no END_STREAM: the answer must not wait for it
        c.sock.sendall(c.conn.data_to_send())
        r = await in_thread(lambda: c.read(sid))
        assert r["headers"][":status"] == status
        assert c.status(await in_thread(lambda: c.call(frame(check_request())))) == "0"  # the connection is fine
    finally:
        c.close()


async def test_a_header_list_over_the_limit_is_refused(server: AgentServer) -> None:
    c = RawH2(server.port)
    try:
        # 80 KB of headers in HEADERS + CONTINUATION frames: over the 64 KiB SETTINGS_MAX_HEADER_LIST_SIZE.
        big = [(f"x-filler-{i}", "v" * 4000) for i in range(20)]
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [*GRPC_HEADERS, *big])
        c.conn.send_data(sid, frame(check_request()), end_stream=True)
        c.sock.sendall(c.conn.data_to_send())
        r = await in_thread(lambda: c.read(sid))
        assert c.status(r) == "8" or r["reset"] is not None or r.get("closed"), r
        c2 = RawH2(server.port)  # and others are served
        try:
            assert c2.status(await in_thread(lambda: c2.call(frame(check_request())))) == "0"
        finally:
            c2.close()
    finally:
        c.close()


async def test_one_header_field_over_the_limit_ends_the_connection(server: AgentServer) -> None:
    # nghttp2 refuses a single field over 64 KiB while decoding (HPACK state is then lost): GOAWAY, close.
    c = RawH2(server.port)

    def send() -> list[Any]:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [*GRPC_HEADERS, ("x-big", "v" * 100_000)])
        c.conn.send_data(sid, frame(check_request()), end_stream=True)
        c.sock.sendall(c.conn.data_to_send())
        events: list[Any] = []
        try:
            while data := c.sock.recv(65536):
                events += c.conn.receive_data(data)
        except ConnectionResetError:
            pass
        return events

    try:
        events = await in_thread(send)
        goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway and goaway[0].error_code != 0, events
        assert not any(isinstance(e, h2.events.ResponseReceived) for e in events)
    finally:
        c.close()


async def test_oversized_message_is_resource_exhausted(server: AgentServer) -> None:
    c = RawH2(server.port)

    def send_big() -> dict[str, Any]:
        big = frame(b"\x00" * (MAX_CHECK_REQUEST_BYTES + 1))
        sid = c.conn.get_next_available_stream_id()
        hdrs = GRPC_HEADERS
        c.conn.send_headers(sid, hdrs)
        sent = 0
        while True:
            window = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size, len(big) - sent)
            if window > 0:
                c.conn.send_data(sid, big[sent : sent + window])
                sent += window
                c.sock.sendall(c.conn.data_to_send())
                continue
            data = c.sock.recv(65536)
            assert data, "closed before answering"
            for ev in c.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    return dict(ev.headers)
                assert not isinstance(ev, h2.events.StreamReset), "reset before the grpc-status was sent"
            c.sock.sendall(c.conn.data_to_send())

    try:
        headers = await in_thread(send_big)
        assert headers.get("grpc-status") == "8"
    finally:
        c.close()


async def test_rapid_reset_does_not_stop_service(server: AgentServer, keys: dict[str, SigningKey]) -> None:
    c = RawH2(server.port)
    try:
        hdrs = GRPC_HEADERS
        for _ in range(500):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, hdrs)
            c.conn.reset_stream(sid)
        c.sock.sendall(c.conn.data_to_send())
    finally:
        c.close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        ok = await ext_grpc.AuthorizationStub(ch).Check(
            ext.CheckRequest.FromString(check_request(mint(keys["ES256"]))), timeout=5
        )
        assert ok.status.code == 0


async def test_garbage_instead_of_http2_closes_only_that_connection(server: AgentServer) -> None:
    def garbage() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data

    await in_thread(garbage)  # returns when the server closes it
    c = RawH2(server.port)
    try:
        assert c.status(await in_thread(lambda: c.call(frame(check_request())))) == "0"
    finally:
        c.close()


async def test_drain_sends_goaway_and_closes(write_policy: Callable[..., Path]) -> None:
    s = AgentServer(load_policy(write_policy()), "127.0.0.1:0", None, None, transport="native")
    await s.start()
    assert await s.wait_ready(5)
    c = RawH2(s.port)
    try:
        assert c.status(await in_thread(lambda: c.call(frame(check_request())))) == "0"
        await s.stop(1.0)

        def events() -> list[Any]:
            seen: list[Any] = []
            while data := c.sock.recv(65536):
                seen += c.conn.receive_data(data)
            return seen

        assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 0 for e in await in_thread(events))
    finally:
        c.close()


async def test_unix_socket_listener(
    write_policy: Callable[..., Path], tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    sock = tmp_path / "agent.sock"
    s = AgentServer(load_policy(write_policy()), f"unix:{sock}", None, None, transport="native")
    await s.start()
    try:
        assert await s.wait_ready(5)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            ok = await ext_grpc.AuthorizationStub(ch).Check(
                ext.CheckRequest.FromString(check_request(mint(keys["ES256"]))), timeout=5
            )
            assert ok.status.code == 0
    finally:
        await s.stop(0.5)


async def test_streams_beyond_the_concurrency_limit_are_refused() -> None:
    from agent._h2_c import GrpcProtocol

    release = asyncio.Event()

    async def slow() -> bytes:
        await release.wait()
        return b""

    def handler(path: bytes, message: bytes) -> Any:
        return slow()

    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: GrpcProtocol(handler, 1 << 20, 2), "127.0.0.1", 0)
    c = RawH2(srv.sockets[0].getsockname()[1])
    hdrs = GRPC_HEADERS

    def exceed_the_limit() -> list[tuple[int, int, int]]:
        c.conn.receive_data(c.sock.recv(65536))  # the server's SETTINGS (max 2 concurrent streams)
        c.sock.sendall(c.conn.data_to_send())
        for sid in (1, 3):
            c.conn.send_headers(sid, hdrs)
            c.conn.send_data(sid, frame(b""), end_stream=True)
        c.sock.sendall(c.conn.data_to_send())
        # A client ignoring the limit: h2 would refuse, so the third HEADERS frame is written by hand.
        block = c.conn.encoder.encode(hdrs)
        c.sock.sendall(struct.pack(">I", len(block))[1:] + bytes([0x1, 0x4]) + struct.pack(">I", 5) + block)
        frames: list[tuple[int, int, int]] = []  # (type, stream, error code for RST_STREAM)
        buf = b""
        while not any((t == 3 and sid == 5) or t == 7 for t, sid, _ in frames):
            chunk = c.sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                ftype, sid = buf[3], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                if ftype == 3:  # RST_STREAM: error code
                    frames.append((ftype, sid, int.from_bytes(buf[9:13], "big")))
                elif ftype == 7:  # GOAWAY: last stream id, then error code
                    frames.append((ftype, int.from_bytes(buf[9:13], "big"), int.from_bytes(buf[13:17], "big")))
                else:
                    frames.append((ftype, sid, 0))
                buf = buf[9 + length :]
        return frames

    try:
        frames = await in_thread(exceed_the_limit)
        resets = [code for t, sid, code in frames if t == 3 and sid == 5]
        goaways = [(last, code) for t, last, code in frames if t == 7]
        # RFC 9113 5.1.2: a stream error PROTOCOL_ERROR or REFUSED_STREAM; nghttp2 is stricter once the limit
        # was acknowledged and ends the connection with PROTOCOL_ERROR, never processing stream 5.
        assert (resets and resets[0] in (1, 7)) or (goaways and goaways[0][0] < 5 and goaways[0][1] == 1), frames
    finally:
        release.set()
        c.close()
        srv.close()


async def test_a_client_that_never_reads_is_stopped_not_buffered(
    server: AgentServer, keys: dict[str, SigningKey]
) -> None:
    # HEADERS frames are not flow-controlled, so a client can send requests without end and never read the
    # answers. The server must stop reading (backpressure) so the client's writes block, instead of queueing
    # answers in memory without bound.
    limit = 64 * (1 << 20)

    def flood() -> int:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.initiate_connection()
        for sid in (1, 3):  # body-less requests, each answered "no request message"
            c.send_headers(sid, GRPC_HEADERS, end_stream=True)
        first = c.data_to_send()
        sent = 0
        try:
            sock.sendall(first)
            last = c.data_to_send()
            # Once HPACK's dynamic table holds these headers, every further block is the same bytes: take the
            # block of a second identical request and repeat it under new stream ids, 1000 frames a write.
            c2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            c2.initiate_connection()
            c2.data_to_send()
            c2.send_headers(1, GRPC_HEADERS, end_stream=True)
            c2.data_to_send()
            c2.send_headers(3, GRPC_HEADERS, end_stream=True)
            second = c2.data_to_send()
            payload = second[9:]
            sid = 5
            while sent < limit:
                chunk = bytearray(last)
                last = b""
                for _ in range(1000):
                    chunk += len(payload).to_bytes(3, "big") + bytes([0x1, 0x5]) + sid.to_bytes(4, "big") + payload
                    sid += 2
                sock.sendall(chunk)
                sent += len(chunk)
        except TimeoutError:
            return sent
        finally:
            sock.close()
        return sent

    sent = await in_thread(flood)
    assert sent < limit, f"the server kept reading {sent} bytes from a client that never reads"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:  # and it still serves others
        ok = await ext_grpc.AuthorizationStub(ch).Check(
            ext.CheckRequest.FromString(check_request(mint(keys["ES256"]))), timeout=5
        )
        assert ok.status.code == 0


async def test_grpc_timeout_bounds_a_check_that_waits_on_the_network(tmp_path: Path) -> None:
    from agent.demo.idp import LocalIdP

    idp = LocalIdP()
    await idp.start()
    secret = tmp_path / "secret"
    secret.write_text(idp.client_secret)
    policy = tmp_path / "p.yaml"
    policy.write_text(f"""version: 1
service: orders
identity_providers:
  corp:
    issuer: {idp.issuer}
    introspection_endpoint: {idp.issuer}/introspect
    client_id: {idp.client_id}
    client_secret_file: {secret}
    introspection_timeout_s: 5
    audiences: [orders-api]
    algorithms: [ES256]
routes:
  - {{name: r, match: {{path: /v1/orders}}, authn: [jwt], allow: {{}}}}
""")
    s = AgentServer(load_policy(policy), "127.0.0.1:0", None, None, transport="native")
    await s.start()
    c = RawH2(s.port)
    try:
        idp.mode, idp.slow_s = "slow", 1.5  # the introspection endpoint answers after 1.5 s
        token = idp.mint_opaque()
        hdrs = [*GRPC_HEADERS, ("grpc-timeout", "200m")]
        r = await in_thread(lambda: c.call(frame(check_request(token)), headers=hdrs))
        # DEADLINE_EXCEEDED: the 200 ms deadline ended it, not the IdP's answer 1.5 s later (that would be 0).
        assert c.status(r) == "4"
    finally:
        c.close()
        await s.stop(0.2)
        await idp.stop()


def test_sigterm_sends_goaway_and_exits_cleanly(write_policy: Callable[..., Path], tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    listen = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--transport",
            "native",
            "--policy",
            str(write_policy()),
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
            "--audit-log",
            str(tmp_path / "audit.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                c = RawH2(int(listen.rsplit(":", 1)[1]))
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr and proc.stderr.read()
                time.sleep(0.05)
        assert c.status(c.call(frame(check_request()))) == "0"
        proc.send_signal(signal.SIGTERM)
        events: list[Any] = []
        while data := c.sock.recv(65536):
            events += c.conn.receive_data(data)
        assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 0 for e in events)
        assert proc.wait(20) == 0
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Budgeted:
    """A bare GrpcProtocol server with small budgets, and blocking h2 clients for it (generous deadlines: a loaded
    machine is slow, and every wait below ends on a condition, not a clock)."""

    def __init__(self, limits: Any, port: int) -> None:
        self.limits, self.port = limits, port

    def client(self) -> RawH2:
        c = RawH2(self.port)
        c.sock.settimeout(30)
        # The server's SETTINGS and its connection WINDOW_UPDATE, so sends below may use the whole window.
        while not any(
            isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0 for e in c.conn.receive_data(c.sock.recv(65536))
        ):
            pass
        c.sock.sendall(c.conn.data_to_send())
        return c

    @staticmethod
    def send(c: RawH2, sid: int, data: bytes, end: bool = False) -> None:
        for i in range(0, len(data), 16384):
            c.conn.send_data(sid, data[i : i + 16384], end_stream=end and i + 16384 >= len(data))
        c.sock.sendall(c.conn.data_to_send())

    @staticmethod
    def open(c: RawH2, size: int) -> int:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, GRPC_HEADERS)
        Budgeted.send(c, sid, b"\x00" + struct.pack(">I", size))
        return sid

    @staticmethod
    def sync(c: RawH2) -> None:
        """Return once the server has processed everything sent on `c` so far (it answers a PING in order)."""
        c.conn.ping(b"syncsync")
        c.sock.sendall(c.conn.data_to_send())
        while True:
            data = c.sock.recv(65536)
            assert data, "closed before the PING was answered"
            events = c.conn.receive_data(data)
            c.sock.sendall(c.conn.data_to_send())
            if any(isinstance(e, h2.events.PingAckReceived) for e in events):
                return


@pytest.fixture
async def budgeted() -> AsyncIterator[Budgeted]:
    from agent._h2_c import GrpcProtocol, Limits

    limits = Limits(256 * 1024, 300 * 1024, 30.0, 300.0, 5.0)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: GrpcProtocol(lambda path, msg: b"", 200_000, 64, None, limits), "127.0.0.1", 0
    )
    yield Budgeted(limits, srv.sockets[0].getsockname()[1])
    srv.close()


async def test_a_message_that_does_not_fit_its_connections_budget_is_refused(budgeted: Budgeted) -> None:
    def run() -> tuple[dict[str, Any], dict[str, Any]]:
        c = budgeted.client()
        try:
            first, second = Budgeted.open(c, 200_000), Budgeted.open(c, 200_000)
            Budgeted.send(c, first, b"\x00" * 150_000)
            Budgeted.send(c, second, b"\x00" * 150_000)  # 300 KB received on one connection > 256 KiB
            refused = c.read(second)
            Budgeted.send(c, first, b"\x00" * 50_000, end=True)  # the other one still completes
            return refused, c.read(first)
        finally:
            c.close()

    refused, done = await in_thread(run)
    assert refused["reset"] == h2.errors.ErrorCodes.REFUSED_STREAM
    assert done["trailers"].get("grpc-status") == "0"
    assert budgeted.limits.buffered == 0 and budgeted.limits.refused_over_budget == 1


async def test_over_the_total_budget_the_connection_holding_most_is_refused(budgeted: Budgeted) -> None:
    # Budgets: 256 KiB a connection, 300 KiB in all, counted in bytes received. The older message is on the
    # connection holding less: age does not matter, the connection holding the most makes room.
    def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        small, hog = budgeted.client(), budgeted.client()
        try:
            older = Budgeted.open(small, 200_000)
            Budgeted.send(small, older, b"\x00" * 60_000)
            Budgeted.sync(small)
            big = Budgeted.open(hog, 200_000)
            Budgeted.send(hog, big, b"\x00" * 190_000)
            Budgeted.sync(hog)  # 250 KB held in all
            Budgeted.send(small, older, b"\x00" * 60_000)  # 310 KB > 300 KiB: the hog's 190 KB go
            refused = hog.read(big)
            Budgeted.send(small, older, b"\x00" * 80_000, end=True)
            # Only that message was refused: the hog's connection goes on serving.
            again = Budgeted.open(hog, 150_000)
            Budgeted.send(hog, again, b"\x00" * 150_000, end=True)
            return refused, small.read(older), hog.read(again)
        finally:
            small.close()
            hog.close()

    refused, done, again = await in_thread(run)
    assert refused["reset"] == h2.errors.ErrorCodes.REFUSED_STREAM
    assert done["trailers"].get("grpc-status") == "0" and again["trailers"].get("grpc-status") == "0"
    assert budgeted.limits.refused_over_budget == 1
    await until_async(lambda: budgeted.limits.buffered == 0, "every held byte released")


async def test_a_large_check_in_flight_survives_many_cheap_announcing_connections(budgeted: Budgeted) -> None:
    # The attack on the first total-budget rule (announced lengths reserved, the oldest unfinished message
    # refused): a real 200 KB check in transit (Envoy sends a body-carrying check in several DATA frames),
    # then 5 connections x 8 gRPC prefixes each announcing the largest message, a few hundred bytes in all.
    def run() -> dict[str, Any]:
        envoy = budgeted.client()
        attackers: list[RawH2] = []
        try:
            sid = Budgeted.open(envoy, 200_000)
            Budgeted.send(envoy, sid, b"\x00" * 16_000)
            Budgeted.sync(envoy)
            for _ in range(5):
                a = budgeted.client()
                attackers.append(a)
                for _ in range(8):
                    Budgeted.open(a, 200_000)
                Budgeted.sync(a)
            Budgeted.send(envoy, sid, b"\x00" * 184_000, end=True)
            return envoy.read(sid)
        finally:
            envoy.close()
            for a in attackers:
                a.close()

    done = await in_thread(run)
    assert done["reset"] is None and done["trailers"].get("grpc-status") == "0", done
    assert budgeted.limits.refused_over_budget == 0


async def test_finished_messages_give_their_window_back(budgeted: Budgeted) -> None:
    # The connection window is twice the budget and bytes are acknowledged only when their message is done:
    # 30 messages of 60 KB (1.8 MB, over three windows) on one connection all pass, one after another.
    def run() -> list[str | None]:
        c = budgeted.client()
        try:
            assert c.conn.outbound_flow_control_window == 2 * 256 * 1024
            out = []
            for _ in range(30):
                sid = Budgeted.open(c, 60_000)
                Budgeted.send(c, sid, b"\x00" * 60_000, end=True)
                out.append(c.status(c.read(sid)))
            return out
        finally:
            c.close()

    assert await in_thread(run) == ["0"] * 30
    assert budgeted.limits.buffered == 0


async def test_the_largest_connection_buffer_accepted_still_opens_the_window() -> None:
    # The connection window is twice the buffer and an HTTP/2 window is at most 2^31-1: 1 GiB made it negative,
    # nghttp2 refused it silently, the window stayed 65535, and a 100 KB check stalled.
    from agent._h2_c import GrpcProtocol, Limits
    from agent.server.limits import MAX_CONNECTION_BUFFER

    assert 2 * MAX_CONNECTION_BUFFER <= 2**31 - 1
    with pytest.raises(ValueError, match="window"):
        Limits(1 << 30, 1 << 30)
    limits = Limits(MAX_CONNECTION_BUFFER, MAX_CONNECTION_BUFFER)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: GrpcProtocol(lambda p, m: b"", 200_000, 64, None, limits), "127.0.0.1", 0)
    try:
        c = await in_thread(Budgeted(limits, srv.sockets[0].getsockname()[1]).client)
        try:
            assert c.conn.outbound_flow_control_window == 2 * MAX_CONNECTION_BUFFER

            def call() -> dict[str, Any]:
                sid = Budgeted.open(c, 100_000)
                Budgeted.send(c, sid, b"\x00" * 100_000, end=True)
                return c.read(sid)

            assert c.status(await in_thread(call)) == "0"
        finally:
            c.close()
    finally:
        srv.close()


async def test_a_sweep_that_fails_on_one_connection_does_not_stop_the_timeouts(
    write_policy: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    from agent._h2_c import GrpcProtocol
    from agent.server.limits import TransportLimits

    broken: list[Any] = []

    class OneBroken(GrpcProtocol):  # type: ignore[misc]
        """The first connection's sweep always fails (an internal error); the others are ordinary."""

        def __init__(self, *args: Any) -> None:
            if not broken:
                broken.append(self)

        def sweep(self) -> None:
            if self is broken[0]:
                raise RuntimeError("sweep failed")
            super().sweep()

    s = AgentServer(
        load_policy(write_policy()), "127.0.0.1:0", None, None, transport="native",
        limits=TransportLimits(idle_timeout_s=1.0),
    )  # fmt: skip
    s.transport._protocol_cls = OneBroken  # type: ignore[union-attr]
    await s.start()
    first, second = RawH2(s.port), RawH2(s.port)
    try:

        def goaway(c: RawH2) -> bool:
            c.sock.settimeout(30)
            while True:
                data = c.sock.recv(65536)
                if not data:
                    return False
                if any(isinstance(e, h2.events.ConnectionTerminated) for e in c.conn.receive_data(data)):
                    return True

        with caplog.at_level(logging.WARNING, "agent.native"):
            start = time.monotonic()
            assert await in_thread(lambda: goaway(second))  # its idle timeout still applies
            elapsed = time.monotonic() - start
        lines = [r.getMessage() for r in caplog.records if "timeouts failed" in r.getMessage()]
        assert 1 <= len(lines) <= elapsed + 1, lines
        assert not await in_thread(lambda: goaway(first))  # the connection whose sweep failed is closed
        assert all("Traceback" not in ln and "\n" not in ln for ln in lines)
    finally:
        first.close()
        second.close()
        await s.stop(0.5)
