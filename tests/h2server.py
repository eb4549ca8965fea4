"""A small HTTP/2 (h2c) server whose answers the request path chooses, run as a child process by the load
generator's tests: well-behaved answers, gRPC answers with given bytes, a stall, and hostile ones (a huge body,
huge trailers, resets, closed connections). `python -m tests.h2server [--stall-after N --stall-ms MS]
[--goaway-at-once]` prints `port NNN` once it listens on loopback.

Paths: /status/NNN (that status, a short body); /grpc/<grpc-status|none>/<hex message> (a gRPC answer: the hex
bytes as DATA, then trailers with that grpc-status, or none); /grpc-only/<grpc-status> (trailers-only);
/huge-body (a gRPC message announcing and sending 4 MiB); /huge-trailers/N (N KiB of trailers);
/goaway (a GOAWAY naming this stream the last, then its answer); /reset (RST_STREAM); /close (the connection
is closed unanswered); anything else: 200 "ok".
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import GoAwayFrame

HUGE = 4 << 20


class Stall:
    """Holds every answer, on every connection, for `ms` once `after` requests have come in."""

    def __init__(self, after: int, ms: float) -> None:
        self.after, self.ms = after, ms
        self.count = 0
        self.until = 0.0
        self.lock = threading.Lock()

    def arrived(self) -> None:
        with self.lock:
            self.count += 1
            if self.after and self.count == self.after:
                self.until = time.monotonic() + self.ms / 1e3

    def wait(self) -> None:
        left = self.until - time.monotonic()
        if left > 0:
            time.sleep(left)


def grpc_head() -> list[tuple[bytes, bytes]]:
    return [(b":status", b"200"), (b"content-type", b"application/grpc")]


def serve(sock: socket.socket, stall: Stall, refuse: bool) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    if refuse:  # a server shutting down: GOAWAY before any stream, then it only waits for the client to leave
        goaway = GoAwayFrame(0)
        sock.sendall(goaway.serialize())
        with sock:
            while sock.recv(65536):
                pass
        return
    paths: dict[int, bytes] = {}
    pending: dict[int, tuple[memoryview, list[tuple[bytes, bytes]] | None]] = {}  # body left, trailers

    def pump() -> None:
        for sid in list(pending):
            body, trailers = pending[sid]
            try:
                while body:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    conn.send_data(sid, bytes(body[:window]))
                    body = body[window:]
                if body:
                    pending[sid] = (body, trailers)
                    continue
                if trailers:
                    conn.send_headers(sid, trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
            except h2.exceptions.StreamClosedError:
                pass
            del pending[sid]

    def answer(sid: int, path: bytes) -> bool:
        parts = path.split(b"/")
        if path == b"/close":
            return False
        if path == b"/goaway":  # "no streams after this one", then this one answered: a graceful shutdown
            sock.sendall(conn.data_to_send())
            goaway = GoAwayFrame(0)
            goaway.last_stream_id = sid
            sock.sendall(goaway.serialize())
            conn.send_headers(sid, [(b":status", b"200")])
            pending[sid] = (memoryview(b"bye"), None)
        elif path == b"/reset":
            conn.reset_stream(sid, 2)
        elif parts[1] == b"status":
            conn.send_headers(sid, [(b":status", parts[2])])
            pending[sid] = (memoryview(b"answer"), None)
        elif parts[1] == b"grpc":
            conn.send_headers(sid, grpc_head())
            trailers = None if parts[2] == b"none" else [(b"grpc-status", parts[2])]
            pending[sid] = (memoryview(bytes.fromhex(parts[3].decode())), trailers)
        elif parts[1] == b"grpc-only":
            conn.send_headers(sid, [*grpc_head(), (b"grpc-status", parts[2])], end_stream=True)
        elif path == b"/huge-body":
            conn.send_headers(sid, grpc_head())
            pending[sid] = (memoryview(b"\x00" + HUGE.to_bytes(4, "big") + bytes(HUGE)), [(b"grpc-status", b"0")])
        elif parts[1] == b"huge-trailers":
            conn.send_headers(sid, grpc_head())
            trailers = [(b"grpc-status", b"0")] + [(b"x-pad-%d" % i, b"v" * 1024) for i in range(int(parts[2]))]
            pending[sid] = (memoryview(b"\x00\x00\x00\x00\x00"), trailers)
        else:
            conn.send_headers(sid, [(b":status", b"200")])
            pending[sid] = (memoryview(b"ok"), None)
        return True

    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                return
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    paths[ev.stream_id] = dict(ev.headers).get(b":path", b"/")
                    stall.arrived()
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    stall.wait()
                    if not answer(ev.stream_id, paths.pop(ev.stream_id, b"/")):
                        return
                elif isinstance(ev, h2.events.StreamReset):
                    pending.pop(ev.stream_id, None)
            pump()
            sock.sendall(conn.data_to_send())
    except OSError:
        return
    finally:
        sock.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stall-after", type=int, default=0)
    ap.add_argument("--stall-ms", type=float, default=200.0)
    ap.add_argument("--goaway-at-once", action="store_true")
    args = ap.parse_args()
    stall = Stall(args.stall_after, args.stall_ms)
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"port {listener.getsockname()[1]}", flush=True)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(sock, stall, args.goaway_at_once), daemon=True).start()


if __name__ == "__main__":
    main()
