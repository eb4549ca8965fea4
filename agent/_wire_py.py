"""The pure-Python twin of native/_wire.pyx: the same API, built on Envoy's generated messages (agent/_xds)."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from agent.decision import Decision, RequestView
from agent.errors import WireError

__all__ = ["WireError", "decode_check_request", "encode_check_response"]


def decode_check_request(data: bytes) -> RequestView:
    from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
    from agent.server.envoy_wire import decode

    req = ext.CheckRequest()
    try:
        req.ParseFromString(data)
    except DecodeError:
        raise WireError("not a CheckRequest") from None
    return decode(req)


def encode_check_response(d: Decision) -> bytes:
    from agent.server.envoy_wire import encode

    return bytes(encode(d).SerializeToString())
