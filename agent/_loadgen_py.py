"""The load generator's pure twin (AGENT_NO_EXTENSIONS=1, or no libnghttp2 headers at build time): the same API
and outcomes as native/_loadgen.pyx (read its docstring for why the bench has its own generator and what the
numbers mean), with HTTP/2 by the `h2` package on plain non-blocking sockets and select(2).

It holds the GIL and costs tens of microseconds of Python per request, so it tops out at a few thousand requests
a second and adds that to every latency: good for the bench's tests and for a machine without the extension,
not for measuring a fast agent. The argument checks and the CheckResponse reader here are the C twin's too.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import time
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import h2.connection

Item = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]  # (method, path, headers, body)

# What one stream may make us keep: its gRPC message (plus the 5-byte prefix) and its header fields (counted as
# HTTP/2 counts them: name + value + 32 each). Over either, the stream is reset and its outcome is -2.
MAX_MESSAGE = 65536
MAX_HEADERS = 65536
# Consecutive failed (re)connects of one connection before it is given up; the wait doubles from 5 ms to 500 ms.
MAX_FAILS = 20
WAKE_NS = 10_000_000  # the loop looks at the stop flag at least this often
RECV_CHUNK = 65536
DOWN, CONNECTING, UP = 0, 1, 2


def check_args(
    items: Sequence[Item], order: Sequence[int], connections: int, streams: int, rate: float, duration_s: float,
    timeout_s: float, port: int,
) -> None:  # fmt: skip
    """The arguments both twins refuse alike (ValueError, TypeError)."""
    if not 1 <= connections <= 1000:
        raise ValueError("connections must be between 1 and 1000")
    if not 1 <= streams <= 1000:
        raise ValueError("streams must be between 1 and 1000")
    if not 0 < port < 65536:
        raise ValueError("port must be between 1 and 65535")
    for name, value in (("rate", rate), ("duration_s", duration_s), ("timeout_s", timeout_s)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0")
    if not items:
        raise ValueError("items must not be empty")
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 4):
            raise TypeError("an item is (method, path, headers, body)")
        method, path, headers, body = item
        if not (isinstance(method, bytes) and method and isinstance(path, bytes) and path and isinstance(body, bytes)):
            raise TypeError("an item's method and path are non-empty bytes, its body bytes")
        for h in headers:
            if not (
                isinstance(h, tuple)
                and len(h) == 2
                and isinstance(h[0], bytes)
                and isinstance(h[1], bytes)
                and h[0]
                and not h[0].startswith(b":")
            ):
                raise TypeError("an item's headers are (name, value) bytes pairs without pseudo-headers")
    n = len(items)
    for i in order:
        if not 0 <= i < n:
            raise ValueError(f"order holds {i}, not an index of items")


def request_fields(item: Item, grpc: bool, authority: bytes) -> list[tuple[bytes, bytes]]:
    """One request's header fields, pseudo-headers first, names lower-cased; gRPC adds its content-type and te
    unless the item has them."""
    method, path, headers, _ = item
    fields = [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path)]
    names = set()
    for name, value in headers:
        fields.append((name.lower(), value))
        names.add(name.lower())
    if grpc:
        if b"content-type" not in names:
            fields.append((b"content-type", b"application/grpc"))
        if b"te" not in names:
            fields.append((b"te", b"trailers"))
    return fields


def request_body(item: Item, grpc: bool) -> bytes:
    """What goes out as DATA: gRPC frames the item's body (a CheckRequest) as one uncompressed message."""
    body = item[3]
    return b"\x00" + len(body).to_bytes(4, "big") + body if grpc else body


# --- the CheckResponse, read as Envoy reads it (protobuf wire format by hand) ---


class _Malformed(Exception):
    pass


def _varint(p: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while shift < 70:
        if pos >= len(p):
            raise _Malformed
        b = p[pos]
        pos += 1
        if shift < 64:
            v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
    raise _Malformed  # more than 10 bytes


def _scan(p: bytes, want: int, length_delimited: bool) -> int | bytes | None:
    """Walk one message's fields; the last `want` (varint or bytes), None when absent; _Malformed when the message
    is, or `want` has another wire type than asked."""
    pos, found = 0, None
    found_value: int | bytes | None = None
    while pos < len(p):
        key, pos = _varint(p, pos)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise _Malformed
        if wt == 0:
            v, pos = _varint(p, pos)
            if field == want:
                if length_delimited:
                    raise _Malformed
                found, found_value = True, v
        elif wt == 2:
            ln, pos = _varint(p, pos)
            if ln > len(p) - pos:
                raise _Malformed
            if field == want:
                if not length_delimited:
                    raise _Malformed
                found, found_value = True, p[pos : pos + ln]
            pos += ln
        elif wt in (1, 5):
            end = 8 if wt == 1 else 4
            if end > len(p) - pos or field == want:
                raise _Malformed
            pos += end
        else:
            raise _Malformed
    return found_value if found else None


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def check_response_status(message: bytes) -> int:
    """CheckResponse -> status code 0: 200; else denied_response.status.code, 403 when absent; -2 malformed."""
    try:
        status = _scan(message, 1, True)
        code = _scan(status, 1, False) if isinstance(status, bytes) else None
        denied = _scan(message, 2, True)
        http = None
        if isinstance(denied, bytes):
            hs = _scan(denied, 1, True)
            http = _scan(hs, 1, False) if isinstance(hs, bytes) else None
    except _Malformed:
        return -2
    if _int32(code if isinstance(code, int) else 0) == 0:
        return 200
    if denied is not None and _int32(http if isinstance(http, int) else 0) != 0:
        return _int32(http if isinstance(http, int) else 0)
    return 403


def grpc_outcome(status: int, grpc_status: int, message: bytes) -> int:
    """What Envoy makes of a Check answer: the status it would send, or -2 for a gRPC error or a bad message."""
    if status != 200 or grpc_status != 0 or len(message) < 5 or message[0] != 0:
        return -2
    if int.from_bytes(message[1:5], "big") != len(message) - 5:
        return -2
    return check_response_status(message[5:])


def _digits(v: bytes) -> int:
    return int(v) if 1 <= len(v) <= 9 and v.isdigit() else -1


# --- the run ---


class _Slot:
    __slots__ = ("bad", "body", "buf", "grpc_status", "hdr_bytes", "k", "start", "status")

    def __init__(self, k: int, start: int, body: bytes) -> None:
        self.k, self.start = k, start
        self.status, self.grpc_status, self.bad, self.hdr_bytes = 0, -1, 0, 0
        self.buf = bytearray()
        self.body = memoryview(body)  # what is left to send


class _Conn:
    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.h2: Any = None
        self.state = DOWN
        self.goaway = False
        self.slots: dict[int, _Slot] = {}
        self.fails = 0
        self.given_up = False
        self.answered = 0  # answers on this connection since it was made
        self.retry_at = 0
        self.connect_by = 0
        self.out = b""


def _client_class() -> type[h2.connection.H2Connection]:
    import h2.connection
    import h2.events

    class Client(h2.connection.H2Connection):
        """h2 closes the whole connection on a GOAWAY and refuses every frame after it; a GOAWAY only says which
        streams the server will still answer (RFC 9113 6.8), and nghttp2 reads it so: keep receiving them."""

        def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
            ev = h2.events.ConnectionTerminated()
            ev.error_code = frame.error_code
            ev.last_stream_id = frame.last_stream_id
            return [], [ev]

    return Client


class Load:
    """One run of load (see the module docstring); run() once, from any thread."""

    def __init__(
        self, host: str, port: int, items: Sequence[Item], order: Sequence[int], *, grpc: bool, authority: str,
        connections: int = 4, streams: int = 16, rate: float = 0.0, duration_s: float = 10.0, timeout_s: float = 5.0,
    ) -> None:  # fmt: skip
        check_args(items, order, connections, streams, rate, duration_s, timeout_s, port)
        auth = authority.encode("ascii")
        self._host, self._port = host, port
        self._items = [(request_fields(it, grpc, auth), request_body(it, grpc)) for it in items]
        self._order = list(order)
        self._grpc = grpc
        self._nconn, self._streams = connections, streams
        self._rate = float(rate)
        self._duration_ns, self._timeout_ns = int(duration_s * 1e9), int(timeout_s * 1e9)
        n = len(self._order)
        self._lat = array("q", [-1]) * n
        self._outc = array("i", [0]) * n
        self._intended = array("q", [-1]) * n
        self._sent = self._completed = self._inflight = 0
        self._stop = False
        self._ran = False
        self._rr = 0  # where the next pick starts looking
        self._t0 = 0
        self.elapsed_ns = 0

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def completed(self) -> int:
        return self._completed

    def stop(self) -> None:
        """End run() early (from any thread): nothing more is sent; what is in flight is abandoned (-3)."""
        self._stop = True

    def latencies_ns(self) -> array[int]:
        """Per request position: completion minus due (open loop) or send time (closed loop); -1 if unfinished."""
        return self._lat

    def outcomes(self) -> array[int]:
        """Per request position: HTTP status (gRPC: as Envoy would answer), -1 reset/connection failed, -2 gRPC
        error or malformed/oversized answer, -3 not finished in time, 0 never due."""
        return self._outc

    def intended_ns(self) -> array[int]:
        """Per request position: its due time (open loop) or send time (closed loop) from t0; -1 if neither."""
        return self._intended

    def run(self) -> None:
        """Connect, send, wait for the stragglers; blocks until done. ConnectionError when the first connections
        cannot be made."""
        if self._ran:
            raise RuntimeError("a Load runs once")
        self._ran = True
        try:
            info = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)[0]
        except OSError as e:
            raise ConnectionError(f"cannot connect to {self._host}:{self._port}: {e.strerror or e}") from None
        self._family, self._sockaddr = info[0], info[4]
        self._client = _client_class()
        conns = [_Conn() for _ in range(self._nconn)]
        try:
            self._connect_all(conns)
            self._loop(conns)
        finally:
            for c in conns:
                if c.sock is not None:
                    c.sock.close()

    # --- connections ---

    def _open(self, c: _Conn, now: int) -> None:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex(self._sockaddr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(rc, os.strerror(rc))
        c.sock, c.state = sock, CONNECTING
        c.connect_by = now + max(self._timeout_ns, 1_000_000_000)

    def _start_session(self, c: _Conn) -> None:
        import h2.config
        import h2.settings

        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        conn = self._client(h2.config.H2Configuration(client_side=True, header_encoding=None))
        # Our own cap (MAX_HEADERS, per stream) decides, as in the C twin: h2's would end the whole connection.
        conn.decoder.max_header_list_size = 1 << 20
        conn.initiate_connection()
        codes = h2.settings.SettingCodes
        conn.update_settings({codes.ENABLE_PUSH: 0, codes.INITIAL_WINDOW_SIZE: 1 << 20})
        conn.increment_flow_control_window((1 << 24) - 65535)
        c.h2, c.state, c.goaway, c.out, c.answered = conn, UP, False, b"", 0

    def _connect_all(self, conns: list[_Conn]) -> None:
        now = time.monotonic_ns()
        try:
            for c in conns:
                self._open(c, now)
            deadline = now + max(self._timeout_ns, 1_000_000_000)
            while pending := [c for c in conns if c.state == CONNECTING]:
                left = deadline - time.monotonic_ns()
                if left <= 0:
                    raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
                socks = [c.sock for c in pending if c.sock is not None]
                _, ready, failed = select.select([], socks, socks, min(left, WAKE_NS) / 1e9)
                for c in pending:
                    if c.sock in ready or c.sock in failed:
                        self._start_session(c)
        except OSError as e:
            raise ConnectionError(f"cannot connect to {self._host}:{self._port}: {e.strerror or e}") from None

    def _drop(self, c: _Conn, now: int, failed: bool, again: bool) -> None:
        """Close it: its streams in flight are failed (-1); with `again`, reconnect after a back-off (none after a
        graceful GOAWAY), unless it failed MAX_FAILS times in a row."""
        for slot in list(c.slots.values()):
            self._finish(c, slot, -1)
        c.slots.clear()
        if c.sock is not None:
            c.sock.close()
        c.sock, c.h2, c.state, c.out = None, None, DOWN, b""
        if failed:
            c.fails += 1
        if not again or c.fails >= MAX_FAILS:
            c.given_up = True
            return
        c.retry_at = now + (min(5_000_000 << min(c.fails - 1, 7), 500_000_000) if c.fails else 0)

    def _finish(self, c: _Conn, slot: _Slot, outcome: int) -> None:
        self._lat[slot.k] = time.monotonic_ns() - slot.start
        self._outc[slot.k] = outcome
        self._inflight -= 1
        self._completed += 1
        if outcome != -1:
            c.fails = 0  # the server answers here: a later failure starts its back-off afresh
            c.answered += 1

    def _flush(self, c: _Conn) -> None:
        """Write what h2 has queued, as far as the socket takes it (OSError when the connection is gone)."""
        assert c.sock is not None
        if not c.out:
            c.out = c.h2.data_to_send()
        while c.out:
            try:
                w = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            c.out = c.out[w:]
            if not c.out:
                c.out = c.h2.data_to_send()

    def _pick(self, conns: list[_Conn]) -> _Conn | None:
        """The up connection with the fewest streams in flight and a free slot (ties: round-robin)."""
        best = None
        n = len(conns)
        for i in range(n):
            c = conns[(self._rr + i) % n]
            if c.state != UP or c.goaway:
                continue
            limit = min(self._streams, c.h2.remote_settings.max_concurrent_streams)
            if len(c.slots) < limit and (best is None or len(c.slots) < len(best.slots)):
                best = c
        if best is not None:
            self._rr = conns.index(best) + 1
        return best

    def _submit(self, c: _Conn, k: int, start: int) -> None:
        import h2.exceptions

        fields, body = self._items[self._order[k]]
        slot = _Slot(k, start, body)
        self._intended[k] = start - self._t0
        self._inflight += 1
        self._sent += 1
        try:
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, fields, end_stream=not body)
        except h2.exceptions.H2Error:  # out of stream ids or the session is going away: this connection is done
            self._finish(c, slot, -1)
            c.goaway = True
            return
        c.slots[sid] = slot
        self._pump(c, sid, slot)

    def _pump(self, c: _Conn, sid: int, slot: _Slot) -> None:
        """Send what flow control lets through of the request's body."""
        while slot.body:
            window = min(c.h2.local_flow_control_window(sid), c.h2.max_outbound_frame_size)
            if window <= 0:
                return
            chunk = slot.body[:window]
            slot.body = slot.body[window:]
            c.h2.send_data(sid, bytes(chunk), end_stream=not slot.body)

    def _refuse(self, c: _Conn, sid: int, slot: _Slot) -> None:
        """Too much to keep: the stream is failed (-2) and reset, unless it has just ended anyway."""
        import h2.errors
        import h2.exceptions

        del c.slots[sid]
        self._finish(c, slot, -2)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)

    def _receive(self, c: _Conn) -> None:
        """Feed what the socket has to h2 (a bounded number of reads); OSError or h2's ProtocolError end it."""
        import h2.errors
        import h2.events
        import h2.exceptions

        assert c.sock is not None
        for _ in range(16):
            try:
                data = c.sock.recv(RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                raise ConnectionResetError("closed by the server")
            for ev in c.h2.receive_data(data):
                sid = getattr(ev, "stream_id", None)
                slot = c.slots.get(sid) if sid is not None else None
                if isinstance(ev, h2.events.DataReceived):
                    c.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if slot is not None and self._grpc:
                        if len(slot.buf) + len(ev.data) > MAX_MESSAGE + 5:
                            self._refuse(c, ev.stream_id, slot)
                            continue
                        slot.buf += ev.data
                elif isinstance(
                    ev,
                    h2.events.ResponseReceived | h2.events.InformationalResponseReceived | h2.events.TrailersReceived,
                ):
                    if slot is None:
                        continue
                    for name, value in ev.headers:
                        slot.hdr_bytes += len(name) + len(value) + 32
                        if name == b":status":
                            slot.status = _digits(value)
                        elif name == b"grpc-status":
                            slot.grpc_status = _digits(value)
                    if slot.hdr_bytes > MAX_HEADERS:
                        self._refuse(c, ev.stream_id, slot)
                if isinstance(ev, h2.events.StreamEnded):
                    slot = c.slots.pop(ev.stream_id, None)
                    if slot is None:
                        continue
                    if slot.body:  # answered before we finished sending: the rest is not wanted
                        with contextlib.suppress(h2.exceptions.StreamClosedError):
                            c.h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.CANCEL)
                    if self._grpc:
                        self._finish(c, slot, grpc_outcome(slot.status, slot.grpc_status, bytes(slot.buf)))
                    else:
                        self._finish(c, slot, slot.status if slot.status > 0 else -1)
                elif isinstance(ev, h2.events.StreamReset):
                    slot = c.slots.pop(ev.stream_id, None)
                    if slot is not None:
                        self._finish(c, slot, -1)
                elif isinstance(ev, h2.events.WindowUpdated):
                    for s_id, s in list(c.slots.items()):
                        if s.body:
                            self._pump(c, s_id, s)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    c.goaway = True  # no new streams here; what the server will not answer is failed now
                    for s_id in [s for s in c.slots if s > (ev.last_stream_id or 0)]:
                        self._finish(c, c.slots.pop(s_id), -1)
            if len(data) < RECV_CHUNK:
                return

    def _loop(self, conns: list[_Conn]) -> None:
        import h2.exceptions

        self._rr = 0
        k, n = 0, len(self._order)
        stopping = False
        drain_by = sending_ended = 0
        t0 = self._t0 = time.monotonic_ns()
        rate = self._rate
        while True:
            now = time.monotonic_ns()
            if self._stop:
                if not stopping:
                    sending_ended = now
                break
            if not stopping and (k >= n or now - t0 >= self._duration_ns or all(c.given_up for c in conns)):
                stopping = True
                sending_ended = min(now, t0 + self._duration_ns)
                drain_by = now + self._timeout_ns
            if stopping and (self._inflight == 0 or now >= drain_by):
                break
            if not stopping:
                while k < n:
                    d = t0 + int(k * 1e9 / rate) if rate > 0 else now
                    if d > now:
                        break
                    c = self._pick(conns)
                    if c is None:
                        break
                    self._submit(c, k, d)
                    k += 1
                for c in conns:
                    if c.state == DOWN and not c.given_up and now >= c.retry_at:
                        try:
                            self._open(c, now)
                        except OSError:
                            self._drop(c, now, True, True)
            wait = WAKE_NS
            rlist: list[socket.socket] = []
            wlist: list[socket.socket] = []
            owner: dict[socket.socket, _Conn] = {}
            for c in conns:
                if c.state == UP:
                    try:
                        self._flush(c)
                    except OSError:
                        self._drop(c, now, True, not stopping)
                        continue
                    if c.goaway and not c.slots:  # a graceful end; a failure if it answered nothing (back-off)
                        self._drop(c, now, c.answered == 0, not stopping)
                        continue
                    assert c.sock is not None
                    rlist.append(c.sock)
                    if c.out:
                        wlist.append(c.sock)
                elif c.state == CONNECTING:
                    if now >= c.connect_by:
                        self._drop(c, now, True, not stopping)
                        continue
                    assert c.sock is not None
                    wlist.append(c.sock)
                else:
                    if not c.given_up and not stopping:
                        wait = min(wait, c.retry_at - now)
                    continue
                owner[c.sock] = c
            if stopping:
                wait = min(wait, drain_by - now)
            elif rate > 0 and k < n:
                wait = min(wait, t0 + int(k * 1e9 / rate) - now)
            readable, writable, _ = select.select(rlist, wlist, [], max(wait, 0) / 1e9)
            now = time.monotonic_ns()
            for sock in {*readable, *writable}:
                c = owner[sock]
                if c.state == DOWN:
                    continue
                try:
                    if c.state == CONNECTING:
                        self._start_session(c)
                        continue
                    if sock in readable:
                        self._receive(c)
                    if sock in writable and c.state == UP:
                        self._flush(c)
                except (OSError, h2.exceptions.ProtocolError):
                    self._drop(c, now, True, not stopping)
        now = time.monotonic_ns()
        self.elapsed_ns = now - t0
        # what never finished: in flight at the end (-3), due but never sent (open loop: -3), never due (0)
        for c in conns:
            for slot in c.slots.values():
                self._outc[slot.k] = -3
            c.slots.clear()
            self._drop(c, now, False, False)
        self._inflight = 0
        if rate > 0:
            while k < n:
                d = t0 + int(k * 1e9 / rate)
                if d > sending_ended or d - t0 >= self._duration_ns:
                    break
                self._intended[k] = d - t0
                self._outc[k] = -3
                k += 1
