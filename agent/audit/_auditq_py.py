"""The pure-Python twin of native/_auditq.pyx: the audit record queue and the JSON hash chain (same API and
output, without the C producers' capsule: code that wants it checks hasattr(queue, "capsule")).

Here linking and hashing hold the GIL (Chain.link, about 1.75 us a record); only the waits and write(2)
release it.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections import deque

from agent.audit.chain import GENESIS, Chain

CHUNK = 256 * 1024  # lines are written in chunks of about this many bytes
MAX_RECORD = 0xFFFFFFFF
_HEX = frozenset("0123456789abcdef")


class RecordQueue:
    """Serialised audit records on their way to the writer: bounded by count and bytes, oldest first.

    append() refuses (False, counted in `dropped`) when the queue is full, and, for a queue of JSON
    objects (json_objects=True, what JsonChain.drain needs), a record that is not one: shorter than two
    bytes or not starting with '{'. prepend() is never refused (the writer's own alerts). wait() wakes
    when `batch` records are queued (never per record), on close(), or after its timeout; a batch larger
    than max_records never fills, so only the timeout wakes it then.
    """

    __slots__ = (
        "_bytes",
        "_closed",
        "_consumer",
        "_count",
        "_dropped",
        "_filled",
        "_lock",
        "_records",
        "batch",
        "json_objects",
        "max_bytes",
        "max_records",
    )

    def __init__(
        self, max_records: int = 65536, max_bytes: int = 64 << 20, batch: int = 256, *, json_objects: bool = True
    ) -> None:
        if max_records < 1 or max_bytes < 1 or batch < 1:
            raise ValueError("max_records, max_bytes and batch must be at least 1")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.batch = batch
        self.json_objects = json_objects
        self._records: deque[bytes] = deque()
        self._lock = threading.Lock()  # the counts; records in `_records` or being written, until written
        self._filled = threading.Condition(self._lock)
        self._consumer = threading.Lock()  # one drain/take/prepend at a time: they use the left end
        self._count = 0
        self._bytes = 0
        self._dropped = 0
        self._closed = False

    def append(self, record: bytes) -> bool:
        """Queue a record (any thread). False when refused: counted in `dropped`."""
        n = len(record)
        ok = n <= MAX_RECORD and (not self.json_objects or (n >= 2 and record[0] == 0x7B))
        with self._lock:
            if not ok or self._count >= self.max_records or self._bytes + n > self.max_bytes:
                self._dropped += 1
                return False
            self._records.append(record)
            self._count += 1
            self._bytes += n
            if self._count == self.batch:
                self._filled.notify()
        return True

    def prepend(self, record: bytes) -> None:
        """Queue a record ahead of all others; never refused for room (the writer's own alerts)."""
        if len(record) > MAX_RECORD or (self.json_objects and (len(record) < 2 or record[0] != 0x7B)):
            raise ValueError("an audit record must be a JSON object")
        with self._consumer, self._lock:
            self._records.appendleft(record)
            self._count += 1
            self._bytes += len(record)
            if self._count == self.batch:
                self._filled.notify()

    def __len__(self) -> int:
        return self._count

    @property
    def dropped(self) -> int:
        """Records refused (queue full, or not a JSON object) or lost to a failed write."""
        return self._dropped

    def wait(self, timeout_s: float) -> None:
        """Block (the GIL released) until `batch` records are queued, close() is called, or timeout_s."""
        timeout_s = min(timeout_s, 86400.0) if timeout_s > 0 else 0.0
        with self._lock:
            self._filled.wait_for(lambda: self._closed or self._count >= self.batch, timeout_s)

    def close(self) -> None:
        """Wake a waiter now and from now on; append still works (what is queued is drained)."""
        with self._lock:
            self._closed = True
            self._filled.notify_all()

    def take(self) -> list[bytes]:
        """Everything queued, oldest first; the queue is left empty."""
        with self._consumer:
            records = self._records
            out = [records.popleft() for _ in range(len(records))]  # appends go on at the other end
            self._consumed(len(out), sum(map(len, out)), lost=False)
            return out

    def _consumed(self, records: int, nbytes: int, lost: bool) -> None:
        with self._lock:
            self._count -= records
            self._bytes -= nbytes
            if lost:
                self._dropped += records


class JsonChain:
    """The JSON-lines hash chain (agent.audit.chain.Chain.link) applied to queued records.

    drain() writes exactly the bytes Chain.link + b"\\n" make.
    """

    __slots__ = ("_busy", "_chain")

    def __init__(self, seq: int = 0, prev: str = GENESIS) -> None:
        if not -(1 << 63) <= seq < 1 << 63:
            raise OverflowError("seq is a 64-bit signed integer")
        if len(prev) != 64 or not set(prev) <= _HEX:
            raise ValueError("prev must be a SHA-256 digest in lowercase hex")
        self._chain = Chain(seq, prev)
        self._busy = False

    @property
    def seq(self) -> int:
        """The sequence number of the last record linked."""
        return self._chain.seq

    @property
    def prev(self) -> str:
        """The SHA-256 (hex) of the last line linked."""
        return self._chain.prev

    def drain(self, queue: RecordQueue, fd: int, room: int, tee: bytearray | None = None) -> tuple[int, int]:
        """Link and write queued records to fd, oldest first, until the bytes written reach `room` (at
        least one record when any is queued) or the records queued at the call are out (later ones may
        wait for the next call); returns (records, bytes) written. A failed write raises OSError: the
        records of that chunk are lost and counted in queue.dropped. With `tee`, the bytes written are
        also appended to it (what the audit sinks ship); without, nothing is kept.
        """
        if not queue.json_objects:
            raise ValueError("JsonChain.drain needs a queue of JSON objects (json_objects=True)")
        if self._busy:
            raise RuntimeError("JsonChain.drain is already running")
        self._busy = True
        try:
            with queue._consumer:
                return self._drain(queue, fd, room, tee)
        finally:
            self._busy = False

    def _drain(self, queue: RecordQueue, fd: int, room: int, tee: bytearray | None) -> tuple[int, int]:
        records, link = queue._records, self._chain.link
        left = len(records)  # appends go on at the other end; they wait for the next call
        done = done_bytes = 0
        stop = False
        while left and not stop:
            lines: list[bytes] = []
            size = body = 0
            while left and size < CHUNK:
                record = records.popleft()
                left -= 1
                line = link(record)  # cannot fail: append refused what is not a JSON object
                lines.append(line)
                size += len(line) + 1
                body += len(record)
                if done_bytes + size >= room:
                    stop = True
                    break
            lines.append(b"")
            data = b"\n".join(lines)
            try:
                write_all(fd, data)
            except OSError:
                queue._consumed(len(lines) - 1, body, lost=True)
                raise
            if tee is not None:
                tee += data
            queue._consumed(len(lines) - 1, body, lost=False)
            done += len(lines) - 1
            done_bytes += size
        return done, done_bytes


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of data is out (EINTR is retried by Python); a non-blocking fd that stays full
    is waited for with poll, at most 30 s in all."""
    view = memoryview(data)
    full = 0
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            full += 1
            if full > 300:
                raise
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(100)
            continue
        if n <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]
        full = 0
