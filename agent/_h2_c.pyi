from collections.abc import Awaitable, Callable

MAX_CONNECTION_BUFFER: int

def libnghttp2_version() -> str: ...

Handler = Callable[[bytes, bytes], bytes | int | Awaitable[bytes | int]]

class Limits:
    connection_buffer: int
    total_buffer: int
    stream_timeout: float
    idle_timeout: float
    handshake_timeout: float
    buffered: int
    high_water: int
    calls: int
    refused_over_budget: int
    timed_out_streams: int
    closed_idle: int
    closed_handshake: int
    fast: Callable[[bytes], bytes | None] | None
    fast_path: bytes
    def __init__(
        self,
        connection_buffer: int = ...,
        total_buffer: int = ...,
        stream_timeout: float = ...,
        idle_timeout: float = ...,
        handshake_timeout: float = ...,
    ) -> None: ...
    def trim(self) -> bool: ...

class GrpcProtocol:
    max_message: int
    limits: Limits
    buffered: int
    last_call: int
    connected_at: float
    def __init__(
        self,
        handler: Handler,
        max_message: int = ...,
        max_streams: int = ...,
        on_close: Callable[[GrpcProtocol], None] | None = ...,
        limits: Limits | None = ...,
    ) -> None: ...
    def drain(self) -> None: ...
    def abort(self) -> None: ...
    def sweep(self) -> None: ...
    @property
    def active_streams(self) -> int: ...
