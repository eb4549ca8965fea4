"""A background writer for the audit log: the hot path serialises one record; chaining and disk I/O happen in
a thread. Records are hash-chained (agent/audit/chain.py), files rotate by size with the chain continued."""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import orjson

from agent.audit._auditq import JsonChain, RecordQueue
from agent.audit._auditq_py import write_all
from agent.audit.chain import Chain, rotate
from agent.audit.records import decision_record, record_template
from agent.timefmt import rfc3339_ms

if TYPE_CHECKING:
    from agent.audit.sinks import SinkSet
    from agent.config.model import Policy
    from agent.decision import Decision, RequestView

log = logging.getLogger("agent.audit")

ROUNDS = 1000  # drains (and rotations) per wake at most; then the writer waits again (at once if a batch is queued)


class JsonLinesAudit:
    """Writes one JSON object per decision to a file (appending) or to stdout.

    The request's thread serialises the record (orjson, about a microsecond) and appends its bytes to a
    RecordQueue (agent/audit/_auditq.py); the writer thread wakes when a batch is queued or every
    flush_interval_s, and JsonChain.drain links, hashes and writes them in C with the GIL released, so
    the request threads do not wait for the writer's GIL time. Handing the thread objects to format
    instead made it hold the GIL for whole batches, and the GIL handoffs cost more than the formatting
    (measured: 40% of native throughput). A record accepted is written or counted in `dropped`.
    Native producers append to `queue` through its capsule (native/includes/auditq_api.h).
    """

    def __init__(
        self,
        path: str | None = None,
        max_queue: int = 65536,
        flush_interval_s: float = 0.05,
        max_bytes: int = 100 << 20,
        keep: int = 5,
        encoding: str = "json",
        sinks: SinkSet | None = None,
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError("audit encoding is json or msgpack")
        if sinks is not None and encoding != "json":
            raise ValueError("audit sinks ship JSON lines: use --audit-format json with --audit-sink")
        self.path = path
        self.sinks = sinks  # each drained batch's chained lines are offered to them (agent/audit/sinks.py)
        self.encoding = encoding
        self._dumps = orjson.dumps if encoding == "json" else _packb
        self.max_bytes = max_bytes
        self.keep = keep
        self._dropped_reported = 0
        self._lost = 0  # msgpack records taken off the queue and not written (JSON ones: queue.dropped)
        self.written = 0
        self.rotations = 0
        self.max_queue = max_queue
        self.queue = RecordQueue(max_queue, json_objects=encoding == "json")
        self._fd = -1  # the writer thread's
        self._rotating = False  # a regular file: sized and rotated
        self._interval = flush_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        if sinks is not None:
            sinks.start()
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Records lost: refused because the queue was full, or lost to a failed write."""
        return self.queue.dropped + self._lost

    def submit(self, view: RequestView, decision: Decision, policy: Policy, now: float) -> None:
        self.queue.append(self._dumps(decision_record(view, decision, policy, now)))  # a refusal is counted

    @property
    def recall_queue(self) -> RecordQueue | None:
        """Where agent._recall puts the records of the allows it answers (JSON lines only: msgpack has none)."""
        return self.queue if self.encoding == "json" else None

    def recall_template(self, view: RequestView, decision: Decision, policy: Policy) -> tuple[bytes, ...] | None:
        """The record of a remembered allow, split where each recall fills it in; None: not in this encoding."""
        return record_template(view, decision, policy) if self.encoding == "json" else None

    def alert(self, kind: str, detail: dict[str, object]) -> None:
        """An `alert` record in the same stream as decisions (never a token or secret in `detail`)."""
        self.queue.append(self._dumps(alert_dict(kind, detail)))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop; then the sinks send what they can within `timeout` (the rest stays
        in their spools for the next start)."""
        self._stop.set()
        self.queue.close()
        self._thread.join(timeout)
        if self.sinks is not None:
            self.sinks.close(timeout)

    def _open_fd(self) -> int:
        assert self.path
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def _open(self) -> tuple[int, int, Chain]:
        """(fd, its size, the chain there). Stdout is fd 1 (what Python buffered for it goes out first)."""
        if not self.path:
            try:
                sys.stdout.flush()
                fd = sys.stdout.buffer.fileno()
            except (AttributeError, OSError, ValueError):  # replaced by an object without a file
                fd = 1
            return fd, 0, Chain()
        path = Path(self.path)
        fd = self._open_fd()
        try:
            # Only a regular file is resumed, sized and rotated: rotating /dev/null would rename the device.
            self._rotating = stat.S_ISREG(os.fstat(fd).st_mode)
            if not self._rotating:
                return fd, 0, Chain()
            chain, partial = Chain.resume(path) if self.encoding == "json" else Chain.resume_msgpack(path)
            if partial:
                # A crash mid-write (or an edit) left a partial record; `audit verify` names it. The chain goes
                # on from the last complete record (JSON: on a fresh line).
                if self.encoding == "json":
                    write_all(fd, b"\n")
                self.queue.prepend(self._dumps(alert_dict("audit_tail_truncated", {"file": str(path)})))
            return fd, os.fstat(fd).st_size, chain
        except BaseException:
            os.close(fd)
            raise

    def _json_chain(self, chain: Chain) -> JsonChain:
        try:
            return JsonChain(chain.seq, chain.prev)
        except (ValueError, OverflowError):  # a last record edited to an absurd seq
            log.error("audit log %s ends in a record the chain cannot go on from; a new chain starts", self.path)
            return JsonChain()

    def _report_drops(self) -> None:
        # Never silent: logged, counted, and an `alert` record at the front of the queue (never refused).
        total = self.dropped
        lost = total - self._dropped_reported
        if not lost:
            return
        if self._dropped_reported == 0 or total // 1000 > self._dropped_reported // 1000:
            log.error("audit queue full: %d records dropped so far", total)
        self._dropped_reported = total
        self.queue.prepend(self._dumps(alert_dict("audit_records_dropped", {"count": lost, "total": total})))

    def _run(self) -> None:
        queue = self.queue
        try:
            self._fd, size, chain = self._open()
        except OSError:
            log.exception("audit log %s cannot be opened; records are being lost", self.path)
            self._discard()
            return
        json_chain = self._json_chain(chain) if self.encoding == "json" else None
        tee = bytearray() if self.sinks is not None else None
        try:
            while True:
                queue.wait(self._interval)
                stopping = self._stop.is_set()
                self._report_drops()
                if json_chain is not None:
                    for _ in range(ROUNDS):
                        room = self.max_bytes - size if self._rotating else 1 << 62
                        n, nbytes = json_chain.drain(queue, self._fd, room, tee)  # in C: with the GIL released
                        self.written += n
                        if tee:
                            self._ship(tee)
                        size = self._rotated(size + nbytes)
                        if nbytes < room:  # all it found is out: what came since waits for a batch or the timer
                            break
                else:
                    size = self._write_msgpack(size, chain)
                if stopping and not len(queue):
                    return
        except OSError:
            log.exception("audit log %s is not writable; records are being lost", self.path or "stdout")
        else:
            return
        finally:
            if self.path and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self._discard()

    def _ship(self, tee: bytearray) -> None:
        """The lines just written, to every sink's spool (a sink's trouble never stops the local file)."""
        assert self.sinks is not None
        self.sinks.offer(tee)  # counts and alerts what a sink could not take; raises nothing
        del tee[:]

    def _discard(self) -> None:
        """Once nothing can be written: what is queued is counted in `dropped` (never left in limbo) until close()."""
        queue = self.queue
        while True:
            queue.wait(self._interval)
            stopping = self._stop.is_set()
            self._lost += len(queue.take())
            if stopping and not len(queue):
                return

    def _rotated(self, size: int) -> int:
        """The size of the file to go on with: a new one once this one reached max_bytes (the chain goes on)."""
        if not self._rotating or size < self.max_bytes:
            return size
        assert self.path
        fd, self._fd = self._fd, -1
        os.close(fd)
        rotate(Path(self.path), self.keep)
        self.rotations += 1
        self._fd = self._open_fd()
        return 0

    def _write_msgpack(self, size: int, chain: Chain) -> int:
        """Everything queued, framed in Python, in as many files as the size limit makes."""
        frames = [chain.link_msgpack(record) for record in self.queue.take()]
        while frames:
            # As many frames as fit before the size limit (at least one), then rotate.
            take, room = 0, self.max_bytes - size if self._rotating else 1 << 62
            while take < len(frames) and (take == 0 or room > 0):
                room -= len(frames[take])
                take += 1
            data = b"".join(frames[:take])
            try:
                write_all(self._fd, data)
            except OSError:
                self._lost += len(frames)
                raise
            del frames[:take]
            self.written += take
            size = self._rotated(size + len(data))
        return size


def alert_dict(kind: str, detail: dict[str, object]) -> dict[str, object]:
    """An `alert` record in the same stream as decisions (never a token or secret in `detail`)."""
    return {"type": "alert", "time": rfc3339_ms(time.time()), "alert": kind, **detail}


def _packb(record: dict[str, object]) -> bytes:
    return bytes(msgpack.packb(record, use_bin_type=True))
