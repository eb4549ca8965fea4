"""atheris target: the native HTTP/2 + gRPC framing layer survives any bytes after a valid client preface.

The real nghttp2 session runs; the transport is an in-memory sink, so the fuzzer drives data_received
directly. Passing means: no crash, no exception out of the protocol, every write is bytes-like, and the bytes counted
against the budgets are those held (none once the connection is gone).
"""

from __future__ import annotations

from typing import Any

import atheris
from native_coverage import run

GrpcProtocol: Any = None

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # magic + empty SETTINGS


class Sink:
    def __init__(self) -> None:
        self.out = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        assert isinstance(data, (bytes, bytearray))  # asyncio transports take any bytes-like object
        self.out += len(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def handler(path: bytes, message: bytes) -> bytes | int:
    if len(message) % 3 == 0:
        return 12
    return b"\x0a\x00"


def test_one(data: bytes) -> None:
    proto = GrpcProtocol(handler, 4096, 16)
    sink = Sink()
    proto.connection_made(sink)
    fdp = atheris.FuzzedDataProvider(data)
    proto.data_received(PREFACE)
    while fdp.remaining_bytes() and not sink.closed:
        proto.data_received(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 512)))
        assert 0 <= proto.buffered == proto.limits.buffered  # what is counted is what this connection holds
    proto.connection_lost(None)
    assert proto.limits.buffered == 0


def seeds() -> list[bytes]:
    import struct

    import h2.config
    import h2.connection

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.data_to_send()
    c.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "x"),
            (":path", "/envoy.service.auth.v3.Authorization/Check"),
            ("content-type", "application/grpc"),
        ],
    )
    c.send_data(1, b"\x00" + struct.pack(">I", 2) + b"\x0a\x00", end_stream=True)
    return [c.data_to_send()]


def load() -> None:
    global GrpcProtocol
    from agent._h2_c import GrpcProtocol as protocol

    GrpcProtocol = protocol


if __name__ == "__main__":
    run(test_one, seeds, load)
