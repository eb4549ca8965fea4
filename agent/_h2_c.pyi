from collections.abc import Awaitable, Callable

Handler = Callable[[bytes, bytes], bytes | int | Awaitable[bytes | int]]

class GrpcProtocol:
    max_message: int
    def __init__(
        self,
        handler: Handler,
        max_message: int = ...,
        max_streams: int = ...,
        on_close: Callable[[GrpcProtocol], None] | None = ...,
    ) -> None: ...
    def drain(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def active_streams(self) -> int: ...
