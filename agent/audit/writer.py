"""A background writer for audit records: the hot path only appends to a deque; overflow is counted, never silent."""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from typing import IO, TYPE_CHECKING

import orjson

from agent.audit.records import decision_record

if TYPE_CHECKING:
    from agent.config.model import Policy
    from agent.engine import Decision, RequestView

log = logging.getLogger("agent.audit")


class JsonLinesAudit:
    """Writes one JSON object per decision to a file (appending) or to stdout, from its own thread.

    The hot path pays for one deque append (atomic in CPython, no lock); building the record, formatting
    its time and serialising it happen in the writer thread, a batch at a time.
    """

    def __init__(self, path: str | None = None, max_queue: int = 65536, flush_interval_s: float = 0.05) -> None:
        self.path = path
        self.dropped = 0
        self.written = 0
        self.max_queue = max_queue
        self._pending: deque[tuple[RequestView, Decision, Policy, float]] = deque()
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
        self._pending.append((view, decision, policy, now))

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
                lines = []
                while pending:
                    lines.append(orjson.dumps(decision_record(*pending.popleft())))
                if lines:
                    lines.append(b"")
                    out.write(b"\n".join(lines))
                    out.flush()
                    self.written += len(lines) - 1
                if stopping and not pending:
                    return
        except OSError:
            log.exception("audit log %s is not writable; records are being lost", self.path or "stdout")
        finally:
            if self.path:
                out.close()
