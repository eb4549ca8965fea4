"""The audit writer's costs: linking + writing records, appending one, and what the writer takes from a request thread.

`PYTHONPATH=. python -m benchmarks.auditq [RECORDS]` prints the median of 5 runs (RECORDS, default 100000, of
about 500 bytes each, written to a temporary file):
- drain: records/s of the old Python loop (Chain.link per record, one write) beside JsonChain.drain, C and pure;
- append: µs per RecordQueue.append (C and pure; 256 appended, then drained, as the writer does) beside the old
  deque's length check and append;
- contention: a "request thread" serialising and appending RECORDS records while a writer thread links and
  writes them as they come (the old loop or the C drain): the request thread's wall time, and that alone.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
import timeit
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from agent.audit import _auditq_py
from agent.audit.chain import Chain

try:
    from agent import _auditq_c
except ImportError:  # not built: the pure twin only
    _auditq_c = None  # type: ignore[assignment]


def make_record(i: int) -> dict[str, object]:
    return {
        "type": "decision",
        "time": "2026-01-01T00:00:00.000Z",
        "decision_id": f"{i:032x}",
        "decision": "allow",
        "reason": "ok",
        "route": "list-orders",
        "method": "GET",
        "path": f"/v1/orders?page={i}",
        "subject": f"user-{i % 1000}",
        "client_id": "orders-web",
        "scopes": ["orders:read", "orders:write", "profile", "email"],
        "source": "10.1.2.3",
        "jti": f"jti-{i:016x}",
        "pad": "x" * 190,
    }


def median_of(runs: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(runs))


def python_loop(records: list[bytes], fd: int) -> float:
    """The old writer: link everything in Python, then one write."""
    chain = Chain()
    t = time.perf_counter()
    lines = [chain.link(r) for r in records]
    os.write(fd, b"\n".join(lines) + b"\n")
    return time.perf_counter() - t


def drain(module: Any, records: list[bytes], fd: int) -> float:
    queue, chain = module.RecordQueue(max_records=len(records) + 1, max_bytes=1 << 30), module.JsonChain()
    for r in records:
        queue.append(r)
    t = time.perf_counter()
    while chain.drain(queue, fd, 1 << 62)[0]:
        pass
    return time.perf_counter() - t


def appends(queue: Any, chain: Any, batch: list[bytes], f: Any) -> float:
    """Seconds per append, in the writer's steady state: a batch appended, then drained (not timed)."""
    took = 0.0
    for _ in range(400):
        append = queue.append
        t = time.perf_counter()
        for r in batch:
            append(r)
        took += time.perf_counter() - t
        chain.drain(queue, f.fileno(), 1 << 62)
        f.seek(0)
        f.truncate()
    return took / (400 * len(batch))


def contention(records: int, writer: str) -> tuple[float, float]:
    """The request thread's seconds (wall, its own CPU) to serialise and queue `records` records while a writer
    drains them: wall beyond CPU is time it waited (for the GIL, or for a CPU)."""
    fd, path = tempfile.mkstemp(prefix="auditq-bench-")
    stop = threading.Event()
    if writer == "python":
        pending: deque[bytes] = deque()

        def submit(b: bytes) -> None:
            pending.append(b)

        def write() -> None:
            chain = Chain()
            while True:
                stopping = stop.wait(0.05)
                n = len(pending)
                if n:
                    os.write(fd, b"\n".join([chain.link(pending.popleft()) for _ in range(n)]) + b"\n")
                if stopping and not pending:
                    return

    else:
        module = _auditq_c if writer == "c" else _auditq_py
        queue = module.RecordQueue(max_records=records + 1, max_bytes=1 << 30)
        submit = queue.append  # type: ignore[assignment]

        def write() -> None:
            chain = module.JsonChain()
            while True:
                queue.wait(0.05)
                stopping = stop.is_set()
                chain.drain(queue, fd, 1 << 62)  # as JsonLinesAudit does: one drain a wake, without a size limit
                if stopping and not len(queue):
                    return

    thread = threading.Thread(target=write) if writer != "none" else None
    if thread:
        thread.start()
    dicts = [make_record(i) for i in range(1000)]
    dumps = orjson.dumps
    t, cpu = time.perf_counter(), time.thread_time()
    for i in range(records):
        b = dumps(dicts[i % 1000])
        if writer != "none":
            submit(b)
    took = time.perf_counter() - t, time.thread_time() - cpu
    stop.set()
    if writer not in {"python", "none"}:
        queue.close()
    if thread:
        thread.join(120)
    os.close(fd)
    os.unlink(path)
    return took


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    records = [orjson.dumps(make_record(i)) for i in range(n)]
    size = statistics.mean(map(len, records))
    print(f"{n} records of {size:.0f} bytes on average")
    with tempfile.TemporaryFile() as f:
        fd = f.fileno()
        old = median_of(5, lambda: python_loop(records, fd))
        print(f"drain   Python loop (Chain.link + write): {n / old / 1e6:6.2f} M records/s ({old / n * 1e6:.2f} us)")
        for name, module in (("C", _auditq_c), ("pure", _auditq_py)):
            if module is not None:
                s = median_of(5, lambda module=module: drain(module, records, fd))
                print(f"drain   JsonChain.drain ({name}): {n / s / 1e6:6.2f} M records/s ({s / n * 1e6:.2f} us)")
    batch = records[:256]
    with tempfile.TemporaryFile() as f:
        for name, module in (("C", _auditq_c), ("pure", _auditq_py)):
            if module is not None:
                per = median_of(5, lambda module=module: appends(module.RecordQueue(), module.JsonChain(), batch, f))
                print(f"append  RecordQueue.append ({name}): {per * 1e6:.3f} us")
    d: deque[bytes] = deque()

    def old_append() -> None:
        for r in batch:
            if len(d) < 65536:
                d.append(r)
        d.clear()

    per = min(timeit.repeat(old_append, number=400, repeat=5)) / (400 * len(batch))
    print(f"append  old deque (len check + append): {per * 1e6:.3f} us")
    for writer in ("none", "python", *(["c"] if _auditq_c else []), "pure"):
        runs = sorted(contention(n, writer) for _ in range(5))
        wall, cpu = runs[2]
        print(f"request thread, writer {writer:6s}: {wall / n * 1e6:.2f} us a record, {cpu / n * 1e6:.2f} us of it CPU")


if __name__ == "__main__":
    main()
