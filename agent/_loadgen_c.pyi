from array import array
from collections.abc import Sequence

from agent._loadgen_py import Item

MAX_MESSAGE: int
MAX_HEADERS: int
MAX_FAILS: int

class Load:
    def __init__(
        self,
        host: str,
        port: int,
        items: Sequence[Item],
        order: Sequence[int],
        *,
        grpc: bool,
        authority: str,
        connections: int = 4,
        streams: int = 16,
        rate: float = 0.0,
        duration_s: float = 10.0,
        timeout_s: float = 5.0,
    ) -> None: ...
    def run(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def sent(self) -> int: ...
    @property
    def completed(self) -> int: ...
    @property
    def elapsed_ns(self) -> int: ...
    def latencies_ns(self) -> array[int]: ...
    def outcomes(self) -> array[int]: ...
    def intended_ns(self) -> array[int]: ...
