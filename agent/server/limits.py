"""What one agent lets its peers hold: connections, buffered bytes, and how long a request or a connection may idle."""

from __future__ import annotations

from dataclasses import dataclass

from agent.envoyconf import MAX_CHECK_REQUEST_BYTES

MIB = 1 << 20
FRAME = 16384  # one default-size HTTP/2 frame
# A connection's window is twice its buffer, and an HTTP/2 window is at most 2^31-1 (RFC 9113 6.9.1).
MAX_CONNECTION_BUFFER = (2**31 - 1) // 2


@dataclass(frozen=True)
class TransportLimits:
    """Defaults sized so Envoy's own use never meets them: a CheckRequest is at most MAX_CHECK_REQUEST_BYTES
    (2 MiB) and Envoy sends each whole at once, so a connection holds an unfinished message only while its
    bytes are on the way. The native transport enforces all of them; grpcio the connection count and the
    idle and handshake timeouts (its own flow control bounds what it buffers). The connection limit is a
    memory backstop, not access control: only Envoy should reach the port (docs/limits.md)."""

    max_connections: int = 1024
    connection_buffer: int = 16 * MIB  # bytes of unfinished messages per connection (its HTTP/2 window: twice)
    total_buffer: int = 64 * MIB  # ... across all connections
    stream_timeout_s: float = 10.0  # a request must arrive whole within this of its headers
    idle_timeout_s: float = 300.0  # a connection without streams this long is closed (GOAWAY)
    handshake_timeout_s: float = 5.0  # a new connection must send the HTTP/2 preface and SETTINGS within this

    def __post_init__(self) -> None:
        least = MAX_CHECK_REQUEST_BYTES + 5 + FRAME
        if self.max_connections < 1:
            raise ValueError("max connections must be at least 1")
        if not least <= self.connection_buffer <= MAX_CONNECTION_BUFFER:
            raise ValueError(
                f"the per-connection buffer must be between {least} bytes (one largest CheckRequest) and "
                f"{MAX_CONNECTION_BUFFER} bytes (its HTTP/2 window, twice the buffer, must be at most 2^31-1)"
            )
        if self.total_buffer < self.connection_buffer:
            raise ValueError("the total buffer must be at least the per-connection buffer")
        for name in ("stream_timeout_s", "idle_timeout_s", "handshake_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.removesuffix('_s').replace('_', ' ')} must be positive")


def parse_bytes(text: str) -> int:
    """`16777216`, `16MiB`, `512KiB`, `1GiB` (binary units; `MB`/`KB`/`GB` read the same)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if scale != 1 else t
    if not digits.isdigit():
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 16MiB)")
    return int(digits) * scale
