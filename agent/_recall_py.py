"""The pure-Python twin of native/_recall.pyx: the same API and the same answers, on Envoy's generated messages.

A RecallTable answers a repeated request, a remembered allow, straight from CheckRequest bytes to
CheckResponse bytes: the request is read only as far as the key (Authorization, method, path), the caller's
address and the header names; the token is checked to be still reusable (exp, nbf, the key set, the
revocations); the rate limit's token is taken; the response and the audit record are made; the decision is
counted for /metrics. Anything else, anything unusual, returns None and the engine decides (the engine's own
recall is the reference these answers must equal, byte for byte: tests/unit/test_recall.py).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import os
import random
import time
from bisect import bisect_left
from collections import OrderedDict
from typing import Any

from agent.correlation import parent, request_id, trace_id
from agent.decision import LATENCY_BOUNDS_US, Decision, Recall, RequestView
from agent.errors import WireError
from agent.timefmt import rfc3339_ms

__all__ = ["TRACE_BUFFER", "RecallTable", "TraceRecord", "new_decision_id", "recall_key", "text_digest"]

# A span the table recorded for an answer it sampled (agent.tracing makes it): trace id (16 bytes: the caller's,
# or a new one for a root), the caller's span id (8 bytes; None for a root), trace flags, route, decision id,
# start (wall clock, ns), latency (ns), method, path (the audit record's).
TraceRecord = tuple[bytes, bytes | None, int, str, str, int, int, str, str]
TRACE_BUFFER = 4096  # spans held between two drains; past it they are counted in trace_dropped
_ID_LIMIT = (1 << 64) - 1

# A random prefix per process and a counter: unique across agents and restarts without a getrandom()
# per request (measured at ~27 us in sandboxed kernels, a third of a whole decision).
_ID_PREFIX = base64.urlsafe_b64encode(os.urandom(9)).decode("ascii")
_id_counter = itertools.count(1)


def new_decision_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):x}"


def text_digest(text: str) -> bytes:
    """SHA-256 of a str's UTF-8: the verified-token cache's key."""
    return hashlib.sha256(text.encode()).digest()


# A secret per process hashed first (the C table's slots are the digest's bits; this twin's dict hashes keys with
# its own secret anyway): digests a caller cannot predict.
_SALT = os.urandom(16)


def recall_key(header: bytes, method: bytes, path: bytes) -> bytes:
    """SHA-256 over a per-process secret and the three, each with its length: the table holds no token text."""
    h = hashlib.sha256(_SALT)
    for part in (header, method, path):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def _ascii(*values: str) -> bool:
    return all(v.isascii() for v in values)


class RecallTable:
    """Remembered allows by SHA-256 of (Authorization, method, path); at most `max_entries`, oldest out first."""

    def __init__(
        self,
        max_entries: int,
        audit: Any = None,
        spoofable_prefix: str = "x-authz-",
        spoofable_names: frozenset[str] = frozenset(),
    ) -> None:
        self.max_entries = max_entries
        self._audit = audit  # the audit queue: append(bytes) -> bool
        self._prefix = spoofable_prefix
        self._names = spoofable_names
        self._entries: OrderedDict[bytes, Recall] = OrderedDict()
        self.hits = 0
        self._counts: dict[str, int] = {}
        self._buckets = [0] * (len(LATENCY_BOUNDS_US) + 1)
        self._latency_sum = 0
        self._trace_bound: int | None = None  # tracing off
        self._traces: list[TraceRecord] = []
        self.trace_dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tracing(self) -> bool:
        return self._trace_bound is not None

    def put(self, r: Recall) -> None:
        if self.max_entries <= 0:
            return
        key = recall_key(r.header.encode(), r.method.encode(), r.path.encode())
        entries = self._entries
        if key not in entries and len(entries) >= self.max_entries:
            entries.popitem(last=False)
        entries[key] = r

    def touch(
        self, header: str, method: str, path: str, source: str, observed_at: float, revocation_state: object
    ) -> bool:
        """The engine has just seen this remembered caller (its address, the revocations in force): True when the
        key was here and now carries them, False when it must be put whole."""
        r = self._entries.get(recall_key(header.encode(), method.encode(), path.encode()))
        if r is None:
            return False
        r.source, r.observed_at, r.revocation_state = source, observed_at, revocation_state
        return True

    def clear(self) -> None:
        self._entries.clear()

    def close(self) -> None:
        """Forget everything and answer nothing from now on (the engine that filled it is retired)."""
        self.max_entries = 0
        self._entries.clear()

    def trace(self, ratio: float | None) -> None:
        """Record a span for the answers that are sampled (agent.tracing), as ParentBased(TraceIdRatioBased(ratio))
        decides: the caller's sampled flag when it sent a parent, else a new trace id below ratio * 2^64. None: off.
        """
        if ratio is None:
            self._trace_bound = None
            return
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("a sampling ratio is between 0 and 1")
        self._trace_bound = round(ratio * (_ID_LIMIT + 1))

    def traces(self) -> list[TraceRecord]:
        """The spans recorded since the last call, oldest first; reset."""
        out, self._traces = self._traces, []
        return out

    def _record_span(self, view: RequestView, r: Recall, did: str, now: float, start: int, bound: int) -> None:
        found = parent(view.headers)
        if found is None:
            tid = random.getrandbits(128) or 1 << 64
            if tid & _ID_LIMIT >= bound:
                return
            trace_id, span_id, flags = tid.to_bytes(16, "big"), None, 1
        elif found[2] & 1:
            trace_id, span_id, flags = bytes.fromhex(found[0]), bytes.fromhex(found[1]), found[2]
        else:
            return  # the caller's trace is not sampled
        if len(self._traces) >= TRACE_BUFFER:
            self.trace_dropped += 1
            return
        latency = time.perf_counter_ns() - start
        self._traces.append((trace_id, span_id, flags, r.route, did, int(now * 1e9), latency, r.method, r.trace_path))

    def fold(self) -> tuple[dict[str, int], list[int], int]:
        """The answers counted since the last fold, per route, and their latency histogram and sum; reset."""
        out = (self._counts, self._buckets, self._latency_sum)
        self._counts, self._buckets, self._latency_sum = {}, [0] * (len(LATENCY_BOUNDS_US) + 1), 0
        return out

    def answer(self, message: bytes, now: float = -1.0) -> bytes | None:
        """The CheckResponse for a remembered allow, or None: the engine decides."""
        start = time.perf_counter_ns()
        if not self._entries:
            return None
        from agent._wire_py import decode_check_request, encode_check_response
        from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext

        try:
            view = decode_check_request(message)
        except WireError:
            return None
        req = ext.CheckRequest.FromString(message)
        http = req.attributes.request.http
        if len(http.header_map.headers):
            return None  # raw headers: the engine joins them
        strings = [view.method, view.path, view.host, view.scheme, view.source, view.certificate, http.body]
        if not _ascii(*strings, *view.headers, *view.headers.values()):
            return None
        for name in view.headers:
            n = name.lower().replace("_", "-")
            if n.startswith(self._prefix) or n in self._names:
                return None  # the engine removes it (or overwrites our own)
        header = view.headers.get("authorization")
        if header is None:
            return None
        key = recall_key(header.encode(), view.method.encode(), view.path.encode())
        r = self._entries.get(key)
        if r is None:
            return None
        if now < 0:
            now = time.time()
        if (
            not now < r.exp + r.leeway
            or (r.nbf is not None and not now + r.leeway >= r.nbf)
            or r.store.keys is not r.keys
            or r.revocations.state is not r.revocation_state
        ):
            del self._entries[key]  # never reusable again; the engine decides afresh
            return None
        source = view.source
        if source != r.source or now - r.observed_at >= r.resync_s:
            return None  # the listeners see this one
        if any(c in source for c in '"\\') or not source.isprintable():
            return None
        response_headers: list[tuple[str, str]] = []
        if r.limit is not None:
            limit_key = "\x1f".join(source if p is None else p for p in r.limit_key)
            left = r.limit.take(limit_key, now)
            if left < 0:
                return None  # the engine refuses it with the 429's headers
            reset = r.limit.full_in(left)
            rem = int(left) if left > 0 else 0
            t = math.ceil(reset) if reset > 0 else 0
            response_headers = [("ratelimit-policy", r.limit_policy), ("ratelimit", f"{r.limit_name};r={rem};t={t}")]
        did = new_decision_id()
        upstream = [("x-authz-route", r.route), ("x-authz-decision-id", did), ("x-authz-subject", r.subject)]
        if r.client_id is not None:
            upstream.append(("x-authz-client-id", r.client_id))
        remove = ["authorization"] if r.remove_authorization else []
        d = Decision(did, True, 200, "allowed", "allow", r.route, None, upstream, remove, response_headers)
        out = encode_check_response(d)
        latency = (time.perf_counter_ns() - start) // 1000
        if r.audit is not None and self._audit is not None:
            a = r.audit
            rid, tid = request_id(view.headers), trace_id(view.headers)
            holes = (
                f'"{rfc3339_ms(now)}"',
                f'"{did}"',
                f'"{rid}"' if rid is not None else "null",
                f'"{tid}"' if tid is not None else "null",
                f'"{source}"',
                str(latency),
                "",
            )
            self._audit.append(b"".join(part + hole.encode() for part, hole in zip(a, holes, strict=True)))
        self.hits += 1
        self._counts[r.route] = self._counts.get(r.route, 0) + 1
        self._buckets[bisect_left(LATENCY_BOUNDS_US, latency)] += 1
        self._latency_sum += latency
        if self._trace_bound is not None:
            self._record_span(view, r, did, now, start, self._trace_bound)
        return out
