"""Audit records as RFC 5424 syslog messages over TCP or TLS, octet-counted (RFC 6587), with delivery judged from
the kernel's view of the connection (TCP has no application acknowledgement).

One message per chained line: `<PRI>1 TIMESTAMP HOSTNAME authz-agent PROCID MSGID [authz@32473 seq="N"
service="S"] MSG`, facility 13 (log audit), severity info for decisions and warning for alerts, MSG the
line itself. 32473 is the enterprise number RFC 5612 reserves for documentation: the SD-ID says what it is
without claiming an assigned number.

Delivery: a batch is acknowledged when the socket's send queue is empty (SIOCOUTQ == 0: the receiver's
kernel acknowledged every byte). That alone is not receipt: a receiver that stops with bytes it never read
resets the connection. So an acknowledged batch counts as delivered once the connection stayed up for
`SETTLE_S` after it, or the receiver closed cleanly (a FIN: a socket closed with unread bytes sends a reset
instead), or our own close was answered by the receiver's (it read to the end). A reset or a timeout sends
again from the first batch not delivered: at least once, in order; `seq` tells a repeat.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import socket
import ssl
import struct
import termios
import time

import orjson

from agent.timefmt import rfc3339_ms

FACILITY_AUDIT = 13
SEVERITY_INFO = 6
SEVERITY_WARNING = 4
ENTERPRISE = 32473  # RFC 5612: the documentation enterprise number
APP_NAME = b"authz-agent"
SETTLE_S = 1.0  # an acknowledged batch is delivered once the connection stayed up this long after it
_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info
RESET_GRACE_S = 0.05  # after an end of stream, how long a reset that follows it is waited for
ACK_TIMEOUT_S = 30.0  # a receiver that acknowledges nothing for this long is dropped (and sent to again)
_TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")
_PRINTUS = re.compile(rb"[^\x21-\x7e]")


class PeerClosed(ConnectionError):
    """The receiver closed the connection cleanly (a FIN): what it acknowledged before, it read. `acked` is how
    many lines of the batch being sent were acknowledged before the close (they count as delivered too)."""

    def __init__(self, acked: int = 0) -> None:
        super().__init__("the receiver closed the connection")
        self.acked = acked


def pri(severity: int, facility: int = FACILITY_AUDIT) -> int:
    return facility * 8 + severity


def header_token(text: str | bytes, limit: int) -> bytes:
    """A HOSTNAME, APP-NAME, PROCID or MSGID: printable US-ASCII without spaces, at most `limit`; "-" when empty."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    out = _PRINTUS.sub(b"_", raw)[:limit]
    return out or b"-"


def sd_value(value: object) -> bytes:
    """An SD-PARAM value: UTF-8 with `"`, `\\` and `]` escaped (RFC 5424 6.3.3)."""
    text = str(value).encode("utf-8", "replace")
    return text.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"]", b"\\]")


def record_fields(line: bytes) -> dict[str, object]:
    """The fields a sink reads from a chained line (its seq, type, service, time); {} for a line not a JSON object."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def message(line: bytes, hostname: bytes, procid: bytes, now: float | None = None) -> bytes:
    """The RFC 5424 message of one chained audit line (the line is MSG, byte for byte)."""
    record = record_fields(line)
    kind = record.get("type")
    severity = SEVERITY_WARNING if kind == "alert" else SEVERITY_INFO
    stamp = record.get("time")
    ts = stamp.encode() if isinstance(stamp, str) and _TIME.fullmatch(stamp.encode()) else b""
    if not ts:
        ts = rfc3339_ms(time.time() if now is None else now).encode()
    msgid = header_token(kind, 32) if isinstance(kind, str) else b"-"
    params = []
    seq = record.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool):
        params.append(b'seq="%d"' % seq)
    service = record.get("service")
    if isinstance(service, str):
        params.append(b'service="%s"' % sd_value(service))
    sd = b"[authz@%d %s]" % (ENTERPRISE, b" ".join(params)) if params else b"-"
    return b"<%d>1 %s %s %s %s %s %s %s" % (pri(severity), ts, hostname, APP_NAME, procid, msgid, sd, line)


def frame(msg: bytes) -> bytes:
    """RFC 6587 octet counting: `MSG-LEN SP SYSLOG-MSG`."""
    return b"%d %s" % (len(msg), msg)


def unframe(data: bytes) -> list[bytes]:
    """The messages of an octet-counted stream (tests and tools); a partial message at the end raises ValueError."""
    out, i = [], 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        if n < 1 or sp + 1 + n > len(data):
            raise ValueError("a partial or empty frame")
        out.append(data[sp + 1 : sp + 1 + n])
        i = sp + 1 + n
    return out


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue that the peer has not acknowledged (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def acked_bytes(sock: socket.socket) -> int:
    """Bytes of this connection the peer acknowledged (tcp_info.tcpi_bytes_acked, Linux 4.2+); kept after a reset."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < _BYTES_ACKED + 8:
        raise OSError("the kernel's tcp_info has no bytes_acked (Linux 4.2 or later is needed)")
    return int(struct.unpack_from("=Q", info, _BYTES_ACKED)[0])


def handed_bytes(sock: socket.socket) -> int:
    """Bytes written to this connection so far (acknowledged + still queued), from a consistent pair of reads."""
    for _ in range(100):
        before = unsent_bytes(sock)
        acked = acked_bytes(sock)
        if unsent_bytes(sock) == before:  # no acknowledgement came between: the pair adds up
            return acked + before
    return acked + unsent_bytes(sock)


class SyslogConnection:
    """One TCP (or TLS) connection to a syslog receiver."""

    settle_s = SETTLE_S

    def __init__(self, sock: socket.socket, hostname: str) -> None:
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.peer_closed = False
        self.hostname = header_token(hostname, 255)
        self.procid = header_token(str(os.getpid()), 128)

    @classmethod
    def open(
        cls, host: str, port: int, hostname: str, tls: ssl.SSLContext | None = None, timeout_s: float = 5.0
    ) -> SyslogConnection:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            sock.settimeout(timeout_s)
        except BaseException:
            sock.close()
            raise
        return cls(sock, hostname)

    def send(self, lines: list[bytes]) -> None:
        """Send the lines and wait until the receiver's kernel acknowledged every byte. Raises PeerClosed on a
        clean close (with the lines acknowledged before it), OSError on a reset or timeout (then nothing of
        this batch counts as delivered)."""
        self.check()
        frames = [frame(message(line, self.hostname, self.procid)) for line in lines]
        start = handed_bytes(self.sock)
        try:
            self.sock.sendall(b"".join(frames))
        except BrokenPipeError:  # a reset after the receiver's FIN: it closed cleanly before this batch
            raise PeerClosed(self._acked_lines(frames, start, None)) from None
        target = handed_bytes(self.sock)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        pause = 0.0005
        while acked_bytes(self.sock) < target:
            try:
                self.check()
            except PeerClosed as e:
                e.acked = self._acked_lines(frames, start, target)
                if e.acked == len(lines):
                    return  # acknowledged, then a clean close: it was read (the next check says closed)
                raise
            if time.monotonic() > deadline:
                raise TimeoutError("the receiver acknowledged nothing")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _acked_lines(self, frames: list[bytes], start: int, target: int | None) -> int:
        """How many of the batch's frames the receiver acknowledged whole (with TLS: all or none; and none when
        the batch was not written whole)."""
        got = acked_bytes(self.sock) - start
        if self.tls:
            return len(frames) if target is not None and got >= target - start else 0
        n = 0
        for f in frames:
            got -= len(f)
            if got < 0:
                break
            n += 1
        return n

    def check(self) -> None:
        """Raise PeerClosed when the receiver closed the connection cleanly, OSError when it reset it; a
        receiver sends nothing else (TLS session tickets and the like are read and let be)."""
        if self.peer_closed:
            raise PeerClosed()
        sock = self.sock
        if not select.select([sock], [], [], 0)[0] and not (self.tls and isinstance(sock, ssl.SSLSocket)
                                                            and sock.pending()):  # fmt: skip
            return
        sock.settimeout(0)
        try:
            for _ in range(64):
                data = sock.recv(65536) if self.tls else sock.recv(65536, socket.MSG_DONTWAIT)
                if not data:
                    self._closed_cleanly()
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except BrokenPipeError:  # Linux: a reset in CLOSE_WAIT, i.e. after the receiver's FIN
            self.peer_closed = True
            raise PeerClosed() from None
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(5.0)

    def _closed_cleanly(self) -> None:
        """An end of stream: PeerClosed, unless a reset without a FIN follows at once (a TLS receiver that says
        close_notify and then closes a socket with bytes it never read: its kernel resets the connection).
        Linux reports a reset after the FIN as EPIPE, one instead of it as ECONNRESET."""
        deadline = time.monotonic() + RESET_GRACE_S
        while True:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err and err != errno.EPIPE:
                raise ConnectionResetError(err, os.strerror(err))
            if err or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        self.peer_closed = True
        raise PeerClosed()

    def finish(self, timeout_s: float = 2.0) -> bool:
        """Close our side and wait for the receiver's close: True when it read everything (a clean close)."""
        sock = self.sock
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(timeout_s)
                sock.unwrap()  # our close_notify, then the receiver's (or its FIN: SSLEOFError)
                return True
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                if not sock.recv(65536):
                    return True
        except ssl.SSLEOFError:
            return True
        except OSError:
            return False
        finally:
            self.close()
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
