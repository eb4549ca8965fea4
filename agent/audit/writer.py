"""A background writer for audit records: the hot path serialises one line; disk I/O happens in a thread."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from typing import IO, TYPE_CHECKING

import orjson

from agent.audit.records import decision_record, rfc3339_ms

if TYPE_CHECKING:
    from agent.config.model import Policy
    from agent.engine import Decision, RequestView

log = logging.getLogger("agent.audit")


class JsonLinesAudit:
    """Writes one JSON object per decision to a file (appending) or to stdout.

    The request's thread serialises the record (orjson, about a microsecond) and appends the line to a
    deque; the writer thread takes everything queued at once and writes it with the GIL released. Handing
    the thread objects to format instead made it hold the GIL for whole batches, and the GIL handoffs cost
    more than the formatting (measured: 40% of native throughput).
    """

    def __init__(self, path: str | None = None, max_queue: int = 65536, flush_interval_s: float = 0.05) -> None:
        self.path = path
        self.dropped = 0
        self.written = 0
        self.max_queue = max_queue
        self._pending: deque[bytes] = deque()
        self._interval = flush_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def submit(self, view: RequestView, decision: Decision, policy: Policy, now: float) -> None:
        if len(self._pending) >= self.max_queue:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit queue full: %d records dropped so far", self.dropped)
            return
        self._pending.append(orjson.dumps(decision_record(view, decision, policy, now)))

    def alert(self, kind: str, detail: dict[str, object]) -> None:
        """An `alert` record in the same stream as decisions (never a token or secret in `detail`)."""
        record = {"type": "alert", "time": rfc3339_ms(time.time()), "alert": kind, **detail}
        if len(self._pending) >= self.max_queue:
            self.dropped += 1
            return
        self._pending.append(orjson.dumps(record))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        out: IO[bytes] = open(self.path, "ab") if self.path else sys.stdout.buffer  # noqa: SIM115
        pending = self._pending
        try:
            while True:
                stopping = self._stop.wait(self._interval)
                n = len(pending)
                if n:
                    popleft = pending.popleft
                    lines = [popleft() for _ in range(n)]
                    lines.append(b"")
                    out.write(b"\n".join(lines))  # the GIL is released during the write
                    out.flush()
                    self.written += n
                if stopping and not pending:
                    return
        except OSError:
            log.exception("audit log %s is not writable; records are being lost", self.path or "stdout")
        finally:
            if self.path:
                out.close()
