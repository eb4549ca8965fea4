"""The native transport's own cost per call: pipelined unary calls fed to one GrpcProtocol, no sockets.

`PYTHONPATH=. python -m benchmarks.native_percall [CALLS] [SIZE]` prints the median of 5 runs in µs per call:
CALLS (default 20000) calls of a SIZE-byte message (default 300, about a CheckRequest; 200000 spans many
DATA frames), 100 calls per read (fewer of a large message: 8 MiB a read at most), answered by a handler
that returns a constant. Only the server's data_received is timed: the client's frames are encoded by the
h2 library and the server's answers read back between reads. Compare two trees by running this file with
the other one first on PYTHONPATH.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.events

HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "x"),
    (":path", "/envoy.service.auth.v3.Authorization/Check"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]
BATCH = 100


class Capture:
    """A transport that keeps what the server writes, for the client to read between timed reads."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def take(self) -> bytes:
        data, self.out = b"".join(self.out), []
        return data

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        pass


def one_run(calls: int, size: int) -> float:
    from agent._h2_c import GrpcProtocol

    proto = GrpcProtocol(lambda path, message: b"\x0a\x00", 2 << 20, 1024)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    transport = Capture()
    proto.connection_made(transport)
    proto.data_received(client.data_to_send())
    client.receive_data(transport.take())  # the server's SETTINGS and connection window
    message = b"\x00" + struct.pack(">I", size) + b"\x01" * size
    elapsed = 0.0
    batch = max(1, min(BATCH, (8 << 20) // len(message)))  # within the default per-connection budget
    for start in range(0, calls, batch):
        for _ in range(min(batch, calls - start)):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, HEADERS)
            for i in range(0, len(message), 16384):
                client.send_data(sid, message[i : i + 16384], end_stream=i + 16384 >= len(message))
        data = client.data_to_send()
        t0 = time.perf_counter()
        proto.data_received(data)
        elapsed += time.perf_counter() - t0
        for ev in client.receive_data(transport.take()):  # answers and WINDOW_UPDATEs, untimed
            if isinstance(ev, h2.events.DataReceived):
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
    assert proto.active_streams == 0, "calls left unanswered"
    return elapsed / calls * 1e6


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    runs = [one_run(calls, size) for _ in range(5)]
    print(f"{calls} pipelined calls of {size} B: {statistics.median(runs):.2f} µs per call (median of 5)")


if __name__ == "__main__":
    main()
