"""A background writer for audit records: the hot path only enqueues; overflow is counted, never silent."""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from typing import IO

log = logging.getLogger("agent.audit")
_STOP = object()


class JsonLinesAudit:
    """Writes one JSON object per line to a file (appending) or to stdout, from its own thread."""

    def __init__(self, path: str | None = None, max_queue: int = 65536) -> None:
        self.path = path
        self.dropped = 0
        self.written = 0
        self._q: queue.Queue[object] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def submit(self, record: dict[str, object]) -> None:
        try:
            self._q.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit queue full: %d records dropped so far", self.dropped)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop."""
        self._q.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        out: IO[str] = open(self.path, "a", encoding="utf-8") if self.path else sys.stdout  # noqa: SIM115
        try:
            while True:
                item = self._q.get()
                batch = [item]
                while len(batch) < 512:
                    try:
                        batch.append(self._q.get_nowait())
                    except queue.Empty:
                        break
                stop = False
                for rec in batch:
                    if rec is _STOP:
                        stop = True
                        continue
                    out.write(json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n")
                    self.written += 1
                out.flush()
                if stop:
                    return
        except OSError:
            log.exception("audit log %s is not writable; records are being lost", self.path or "stdout")
        finally:
            if self.path:
                out.close()
