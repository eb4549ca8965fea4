"""The grpcio transport (reference, always available): Authorization/Check plus grpc.health.v1."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent.decision import Decision
from agent.engine import Engine
from agent.envoyconf import MAX_CHECK_REQUEST_BYTES
from agent.server.envoy_wire import decode, encode
from agent.server.limits import TransportLimits
from agent.server.ratelog import RateLimitedLog

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
log = logging.getLogger("agent.grpcio")


def _parse_check(data: bytes) -> Any:
    """CheckRequest bytes -> message, or None for bytes that are not one: grpcio would log a traceback for
    each and answer UNKNOWN with the parser's error text; the servicer answers INVALID_ARGUMENT instead."""
    try:
        return ext.CheckRequest.FromString(data)
    except DecodeError:
        return None


class AuthorizationServicer:
    """Thin: decode, decide, encode. The engine is fetched per call so a policy swap needs no restart."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        self._engine = engine
        self._ratelog = RateLimitedLog(log)

    async def Check(self, request: Any, context: Any) -> Any:
        if request is None:
            self._ratelog.warning("malformed", "malformed CheckRequest answered INVALID_ARGUMENT: not a CheckRequest")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed CheckRequest")
        decision = self._engine().decide(decode(request))  # an awaitable only when a round trip is needed
        if not isinstance(decision, Decision):
            decision = await decision
        return encode(decision)


class GrpcTransport:
    def __init__(self, engine: Callable[[], Engine], listen: str, limits: TransportLimits | None = None) -> None:
        lim = limits or TransportLimits()
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_CHECK_REQUEST_BYTES),
                ("grpc.max_concurrent_streams", 1024),
                ("grpc.so_reuseport", 0),
                ("grpc.max_allowed_incoming_connections", lim.max_connections),
                ("grpc.max_connection_idle_ms", int(lim.idle_timeout_s * 1000)),
                ("grpc.server_handshake_timeout_ms", int(lim.handshake_timeout_s * 1000)),
            ]
        )
        check = grpc.unary_unary_rpc_method_handler(
            AuthorizationServicer(engine).Check,
            request_deserializer=_parse_check,
            response_serializer=ext.CheckResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": check}),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0 and not listen.startswith("unix:"):
            raise OSError(f"cannot listen on {listen}")

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
