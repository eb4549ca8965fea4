"""The native transport: unary gRPC over libnghttp2 (agent._h2_c) on asyncio/uvloop, the engine in-line.

Its pure twin is the grpcio transport: where the extension is not built, `--transport native` is refused
and grpcio serves. Decoding and encoding use agent._wire (Cython when built). What peers may hold (bytes of
unfinished requests, streams, connections, and for how long) is bounded by TransportLimits: the budgets in
agent._h2_c as DATA arrives, the timeouts by a sweep here about once a second, the connection count at
accept (the least useful connection makes room).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import DecodeError

from agent._wire import WireError, decode_check_request, encode_check_response
from agent.decision import Decision
from agent.engine import Engine
from agent.envoyconf import MAX_CHECK_REQUEST_BYTES
from agent.server.limits import TransportLimits
from agent.server.ratelog import RateLimitedLog

log = logging.getLogger("agent.native")

CHECK = b"/envoy.service.auth.v3.Authorization/Check"
HEALTH = b"/grpc.health.v1.Health/Check"
SERVICE_NAME = "envoy.service.auth.v3.Authorization"
_SERVING, _NOT_SERVING = b"\x08\x01", b"\x08\x02"
INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED = 3, 5, 12


def unavailable_reason() -> str | None:
    """Why the native transport cannot serve in this process, or None when it can.

    setup.py skips agent._h2_c when libnghttp2's headers are missing at build time, so a build may have every
    other extension and still no native transport: the reason tells the cases apart, for `run`'s log line."""
    if os.environ.get("AGENT_NO_EXTENSIONS"):
        return "AGENT_NO_EXTENSIONS=1: the pure-Python path"
    try:
        import agent._h2_c  # noqa: F401
    except ImportError as e:
        if importlib.util.find_spec("agent._h2_c") is not None:
            return f"agent._h2_c does not load: {e}"  # built, but e.g. libnghttp2.so is not installed here
        if importlib.util.find_spec("agent._wire_c") is not None:
            return "agent._h2_c missing: built without libnghttp2 headers"
        return "agent._h2_c missing: the Cython extensions are not built"
    return None


def available() -> bool:
    return unavailable_reason() is None


def transport_line(requested: str | None) -> tuple[str, int, str]:
    """(the transport that serves, a log level, the line `run` logs at start saying which and why).

    A build without the native transport serves on grpcio at a fraction of the throughput: said with a
    WARNING, so that it is not slower unnoticed. `--transport native` there is refused by the caller."""
    why_not = unavailable_reason()
    transport = requested or ("native" if why_not is None else "grpcio")
    if transport == "native":
        from agent._h2_c import libnghttp2_version

        how = "requested with --transport native" if requested else "the default where it is built"
        return transport, logging.INFO, f"transport: native (libnghttp2 {libnghttp2_version()}, {how})"
    if requested:
        return transport, logging.INFO, "transport: grpcio (requested with --transport grpcio)"
    return (
        transport,
        logging.WARNING,
        (
            f"transport: grpcio: this build has no native transport ({why_not}); expect a fraction of the native "
            "throughput; see docs/packaging.md"
        ),
    )


class NativeTransport:
    def __init__(
        self,
        engine: Callable[[], Engine],
        listen: str,
        max_message: int = MAX_CHECK_REQUEST_BYTES,
        max_streams: int = 1024,
        limits: TransportLimits | None = None,
    ) -> None:
        from agent._h2_c import GrpcProtocol, Limits

        self._protocol_cls = GrpcProtocol
        self._engine = engine
        self.listen = listen
        self.max_message = max_message
        self.max_streams = max_streams
        self.limits = limits or TransportLimits()
        self._shared = Limits(
            self.limits.connection_buffer,
            self.limits.total_buffer,
            self.limits.stream_timeout_s,
            self.limits.idle_timeout_s,
            self.limits.handshake_timeout_s,
        )
        self.serving = False
        self.port = 0
        self.evicted_connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[Any] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._ratelog = RateLimitedLog(log)
        self.engine_changed()

    def engine_changed(self) -> None:
        """The server has a new engine: its remembered-allow table answers Checks first, in agent._h2_c (the old
        table is closed by then, so a Check that raced the change goes to the handler, which reads the engine)."""
        recall = self._engine().recall
        self._shared.fast = recall.answer if recall is not None else None
        self._shared.fast_path = CHECK

    def _handle(self, path: bytes, message: bytes) -> bytes | int | Awaitable[bytes | int]:
        if path == CHECK:
            engine = self._engine()
            try:
                view = decode_check_request(message)
            except WireError as e:
                self._ratelog.warning("malformed", f"malformed CheckRequest answered INVALID_ARGUMENT: {e}")
                return INVALID_ARGUMENT
            decision = engine.decide(view)
            if isinstance(decision, Decision):
                return encode_check_response(decision)
            return self._slow(decision)
        if path == HEALTH:
            return self._health(message)
        return UNIMPLEMENTED

    async def _slow(self, decision: Awaitable[Decision]) -> bytes:
        return encode_check_response(await decision)

    def _health(self, message: bytes) -> bytes | int:
        from grpc_health.v1 import health_pb2

        req = health_pb2.HealthCheckRequest()
        try:
            req.ParseFromString(message)
        except DecodeError:
            return INVALID_ARGUMENT
        if req.service not in ("", SERVICE_NAME):
            return NOT_FOUND
        return _SERVING if self.serving else _NOT_SERVING

    def _factory(self) -> Any:
        if len(self._connections) >= self.limits.max_connections:
            self._make_room()
        proto = self._protocol_cls(
            self._handle, self.max_message, self.max_streams, self._connections.discard, self._shared
        )
        self._connections.add(proto)
        return proto

    def _make_room(self) -> None:
        """At the limit, the least useful connection goes: the one whose last completed call is oldest, one
        that never completed a call first (the oldest of those), busy or not. Nothing on the port tells Envoy
        from anyone else, but Envoy completes calls: a peer must too, on every connection, to keep its place.
        (Closing by idleness let connections that each hold a call that never ends push Envoy's out.)"""
        victim = min(self._connections, key=lambda p: (p.last_call, p.connected_at))
        self._connections.discard(victim)
        victim.drain()
        victim.abort()
        self.evicted_connections += 1
        self._ratelog.warning(
            "connections",
            f"connection closed to make room: {len(self._connections) + 1} open, the limit "
            f"(--max-connections {self.limits.max_connections}); the one whose last completed call is oldest "
            f"goes; {self.evicted_connections} so far",
        )

    async def _sweep(self) -> None:
        """Apply the stream, idle and handshake timeouts to every connection, a few times per smallest one."""
        lim = self.limits
        every = max(0.05, min(1.0, lim.stream_timeout_s / 4, lim.idle_timeout_s / 4, lim.handshake_timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            for proto in list(self._connections):
                try:
                    proto.sweep()
                except Exception as e:  # noqa: BLE001 - a bug of ours: one connection must not stop every timeout
                    self._ratelog.warning(
                        "sweep", f"native transport: a connection's timeouts failed ({type(e).__name__}); it is closed"
                    )
                    self._connections.discard(proto)
                    proto.abort()
            self._shared.trim()

    def stats(self) -> dict[str, int]:
        """Counts for /metrics: what the limits refused or closed, and the bytes of unfinished requests now."""
        s = self._shared
        return {
            "connections": len(self._connections),
            "connections_evicted": self.evicted_connections,
            "buffered_bytes": s.buffered,
            "streams_refused_over_budget": s.refused_over_budget,
            "streams_timed_out": s.timed_out_streams,
            "connections_closed_idle": s.closed_idle,
            "connections_closed_handshake": s.closed_handshake,
        }

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.listen.startswith("unix:"):
            path = self.listen[5:]
            if os.path.exists(path):
                os.unlink(path)
            self._server = await loop.create_unix_server(self._factory, path)
        else:
            host, _, port = self.listen.rpartition(":")
            self._server = await loop.create_server(self._factory, host.strip("[]"), int(port), reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving

    async def stop(self, grace: float) -> None:
        """Stop accepting, GOAWAY every connection, let in-flight calls finish for up to `grace` seconds."""
        self.serving = False
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for proto in list(self._connections):
            proto.drain()
        deadline = asyncio.get_running_loop().time() + grace
        while self._connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for proto in list(self._connections):
            proto.abort()
        if self._server is not None:
            await self._server.wait_closed()
