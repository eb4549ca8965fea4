"""An OpenTelemetry span per decision (`authz.check`), a child of the caller's span (W3C traceparent, else B3),
sampled ParentBased(TraceIdRatioBased(ratio)) and exported by OTLP (gRPC or HTTP) off the hot path.

Off unless `authz-agent run --otlp-endpoint URL`: then, and only then, a SpanListener joins the engine's listeners
and OpenTelemetry is imported (by Tracer; nothing at this module's level). On the hot path a decision pays the
parse of its trace headers (agent.correlation.parent) and the sampling decision; a sampled one appends a tuple.
The spans are made with the SDK on the tracer's own thread, and its BatchSpanProcessor's thread exports them: a
collector that is slow or down costs no decision anything (what does not fit is dropped and counted). Allows
answered from wire bytes (agent._recall) decide and record their sampled spans in C; the same thread drains them.

A span holds the decision's shape (route, outcome, reason, how the caller authenticated, whether a remembered
allow answered, the method and the audit record's path), never the caller's material: no token, header value,
claim, subject, client id or address. Spans go to a collector, usually with weaker access control than the audit.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent.correlation import parent

if TYPE_CHECKING:
    from agent.config.model import Policy
    from agent.decision import Decision, RequestView

__all__ = ["DEFAULT_RATIO", "Endpoint", "SpanListener", "Tracer", "authn_method", "check_ratio", "parse_endpoint"]

log = logging.getLogger("agent.tracing")

DEFAULT_RATIO = 0.01
# Spans made per second at most (--trace-max-rate). A caller sets the sampled flag of its own traceparent, and a
# proxy in front that passes it on unchanged lets a hostile client ask for a span on every request: each costs the
# agent ~25 us of Python on its one core to make and more to export, so past this budget they are dropped, counted.
DEFAULT_MAX_RATE = 1000.0
_ID_LIMIT = (1 << 64) - 1
PENDING_MAX = 4096  # engine decisions' spans waiting for the tracer's thread; past it they are dropped, counted
SPAN_NAME = "authz.check"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where spans go: OTLP over gRPC (`grpc://` plaintext, `grpcs://` TLS) or HTTP (`http://`, `https://`)."""

    transport: str  # "grpc" or "http"
    url: str  # the exporter's endpoint: scheme://host:port for gRPC, the whole URL (with /v1/traces) for HTTP
    insecure: bool  # gRPC without TLS


def parse_endpoint(url: str) -> Endpoint:
    """The --otlp-endpoint URL, checked at start: a clear error (that never repeats credentials) or the endpoint."""
    where = "--otlp-endpoint"
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        raise ValueError(f"{where}: not a URL with a valid port") from None
    scheme = u.scheme.lower()
    if scheme not in ("http", "https", "grpc", "grpcs"):
        raise ValueError(
            f"{where}: the scheme must be http:// or https:// (OTLP/HTTP, e.g. http://collector:4318), "
            "or grpc:// (plaintext) or grpcs:// (TLS) for OTLP/gRPC (e.g. grpc://collector:4317)"
        )
    if u.username is not None or u.password is not None:
        raise ValueError(f"{where}: credentials in the URL are not taken (they would show in process listings)")
    if not u.hostname:
        raise ValueError(f"{where}: the URL needs a host")
    if u.query or u.fragment:
        raise ValueError(f"{where}: the URL takes no query or fragment")
    netloc = u.netloc
    if scheme in ("grpc", "grpcs"):
        if u.path not in ("", "/"):
            raise ValueError(f"{where}: an OTLP/gRPC endpoint has no path (the service name is the path)")
        if port is None:
            netloc += ":4317"
        return Endpoint("grpc", ("http" if scheme == "grpc" else "https") + "://" + netloc, scheme == "grpc")
    path = u.path if u.path not in ("", "/") else "/v1/traces"
    return Endpoint("http", f"{scheme}://{netloc}{path}", scheme == "http")


def check_max_rate(rate: float) -> float:
    if not (rate >= 1.0 and rate < float("inf")):
        raise ValueError(f"--trace-max-rate must be at least 1 span a second, got {rate}")
    return rate


def check_ratio(ratio: float) -> float:
    """--trace-sample: the share of new traces sampled, 0..1 (a caller's sampled flag always decides its own)."""
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise ValueError("--trace-sample: a ratio from 0 to 1 (e.g. 0.01 samples one new trace in a hundred)")
    return ratio


def authn_method(decision: Decision) -> str:
    """How the caller authenticated, as the principal tells: jwt, introspection, dpop, mtls-bound, hmac, or none."""
    who = decision.principal
    if who is None:
        return "none"
    if who.cnf_jkt is not None:
        return "dpop"
    if who.cnf_x5t is not None:
        return "mtls-bound"
    return who.method


# What the tracer's thread makes a span from: (service, policy version, trace id, parent span id (0: a root), trace
# flags, route, decision id, start ns, latency ns, method, path, outcome, reason, authn method, cache hit).
_Pending = tuple[str, str, int, int, int, str, str, int, int, str, str, str, str, str, bool]


class SpanListener:
    """The engine's listener for one policy (its service and version go on its spans); all share one Tracer."""

    __slots__ = ("_bound", "_tracer", "service", "version")

    # Allows answered from wire bytes record their own spans (RecallTable.trace): this one need not see them.
    recall_resync_s = float("inf")

    def __init__(self, tracer: Tracer, service: str, version: str) -> None:
        self._tracer = tracer
        self._bound = round(tracer.ratio * (_ID_LIMIT + 1))
        self.service = service
        self.version = version

    def observe(self, view: RequestView, decision: Decision, now: float) -> None:
        """Sampled as ParentBased(TraceIdRatioBased) would: the caller's flag, else a new trace id under the bound."""
        found = parent(view.headers)
        if found is None:
            trace_id = random.getrandbits(128) or 1 << 64
            if trace_id & _ID_LIMIT >= self._bound:
                return
            span_id, flags = 0, 1
        elif found[2] & 1:
            trace_id, span_id, flags = int(found[0], 16), int(found[1], 16), found[2]
        else:
            return
        latency = decision.latency_us * 1000
        start = time.time_ns() - latency
        path = decision.audit_path
        if path is None:
            path = view.path.split("?", 1)[0].split("#", 1)[0]
        self._tracer.submit(
            (
                self.service,
                self.version,
                trace_id,
                span_id,
                flags,
                decision.route or "",
                decision.decision_id,
                start,
                latency,
                view.method,
                path,
                decision.outcome,
                decision.reason,
                authn_method(decision),
                decision.cache_hit,
            )
        )

    def recalled(self, counts: dict[str, int], buckets: list[int], latency_sum_us: int) -> None:
        """Allows answered from wire bytes were folded (a scrape, a retired engine): drain their spans now."""
        self._tracer.wake()

    def wire(self, table: Any) -> None:
        """A RecallTable of this policy's engine: it records the spans of the answers it samples."""
        table.trace(self._tracer.ratio)
        self._tracer.add_table(table, self)


class Tracer:
    """The SDK's provider, exporter and batch processor, and the thread that turns recorded decisions into spans."""

    def __init__(
        self,
        endpoint: Endpoint,
        ratio: float = DEFAULT_RATIO,
        exporter: Any = None,
        drain_every_s: float = 0.5,
        schedule_delay_ms: float = 1000.0,
        max_queue_size: int = 2048,
        export_timeout_s: float = 5.0,
        max_rate: float = DEFAULT_MAX_RATE,
    ) -> None:
        from opentelemetry import trace as api
        from opentelemetry.context import Context
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        class ChosenTraceIds(RandomIdGenerator):
            """Span ids at random; a root's trace id is the one the sampling decision was made on, so the sampler
            (TraceIdRatioBased, a function of the trace id) comes to the same decision and never draws again."""

            next_trace_id = 0

            def generate_trace_id(self) -> int:
                return self.next_trace_id or super().generate_trace_id()

        class Counting(SpanExporter):
            """The exporter, counting what it sent and what failed (for /metrics and the backlog bound)."""

            def __init__(self, inner: SpanExporter) -> None:
                self.inner = inner
                self.exported = 0
                self.failed = 0

            def export(self, spans: Any) -> SpanExportResult:
                try:
                    result = self.inner.export(spans)
                except Exception:
                    self.failed += len(spans)
                    raise
                if result is SpanExportResult.SUCCESS:
                    self.exported += len(spans)
                else:
                    self.failed += len(spans)
                return result

            def shutdown(self) -> None:
                self.inner.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return bool(self.inner.force_flush(timeout_millis))

        self.endpoint = endpoint
        self.ratio = check_ratio(ratio)
        self._api = api
        self._empty = Context()
        self._ids = ChosenTraceIds()
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(ratio)),
            resource=Resource.create({"service.name": "authz-agent"}),
            id_generator=self._ids,
            shutdown_on_exit=False,  # close() flushes, bounded; an atexit flush could hold the exit 30 s
        )
        self._exporter = Counting(exporter if exporter is not None else _otlp_exporter(endpoint, export_timeout_s))
        self._max_queue = max_queue_size
        self.provider.add_span_processor(
            BatchSpanProcessor(
                self._exporter,
                max_queue_size=max_queue_size,
                schedule_delay_millis=schedule_delay_ms,
                max_export_batch_size=min(512, max_queue_size),
            )
        )
        self._tracer = self.provider.get_tracer("authz-agent")
        self._pending: deque[_Pending] = deque()
        self._tables: list[tuple[weakref.ref[Any], SpanListener]] = []
        self._drain_every_s = drain_every_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one drain at a time (the thread's, close's)
        self._thread = threading.Thread(target=self._run, name="authz-tracing", daemon=True)
        self.ended = 0  # spans handed to the batch processor
        self.max_rate = max_rate
        self._error_logged = float("-inf")
        self._budget = max_rate  # a token bucket refilled by max_rate a second, holding a second's worth at most
        self._budget_at = time.monotonic()
        self._dropped = 0  # dropped here: the pending queue full, or the exporter's backlog at the queue's size
        self._dropped_tables = 0  # counts of tables no longer drained

    # -- the hot path's side ------------------------------------------------------------------------------

    def listener(self, policy: Policy) -> SpanListener:
        return SpanListener(self, policy.service, policy.version)

    def submit(self, pending: _Pending) -> None:
        if len(self._pending) >= PENDING_MAX:
            self._dropped += 1
            return
        self._pending.append(pending)

    def wake(self) -> None:
        self._wake.set()

    def add_table(self, table: Any, listener: SpanListener) -> None:
        # Weakly: an engine built for a reload that was refused is never retired, and must not be kept.
        self._tables.append((weakref.ref(table), listener))

    # -- counts -----------------------------------------------------------------------------------------

    @property
    def exported(self) -> int:
        return self._exporter.exported

    @property
    def failed(self) -> int:
        return self._exporter.failed

    @property
    def dropped(self) -> int:
        tables = (ref() for ref, _ in list(self._tables))
        return self._dropped + self._dropped_tables + sum(int(t.trace_dropped) for t in tables if t is not None)

    # -- the tracer's thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._drain_every_s)
            self._wake.clear()
            self.drain()

    def drain(self) -> int:
        """Make the spans recorded since the last drain; returns how many were handed to the batch processor."""
        made = 0
        with self._lock:
            for ref, listener in list(self._tables):
                table = ref()
                if table is None:
                    self._tables.remove((ref, listener))
                    continue
                for t in table.traces():
                    # (trace id, parent span id, flags, route, decision id, start, latency, method, path)
                    trace_id, span_id = int.from_bytes(t[0], "big"), int.from_bytes(t[1], "big") if t[1] else 0
                    wired = (listener.service, listener.version, trace_id, span_id, t[2], t[3], t[4], t[5], t[6])
                    made += self._span((*wired, t[7], t[8], "allow", "allowed", "jwt", True))
                if table.max_entries == 0:  # retired: it answers nothing more
                    self._tables.remove((ref, listener))
                    self._dropped_tables += int(table.trace_dropped)
            pending = self._pending
            for _ in range(len(pending)):
                made += self._span(pending.popleft())
        return made

    def _span(self, p: _Pending) -> int:
        (service, version, trace_id, span_id, flags, route, did, start, latency, method, path, outcome, reason,
         authn, cache_hit) = p  # fmt: skip
        exporter = self._exporter
        now = time.monotonic()
        self._budget = min(self.max_rate, self._budget + (now - self._budget_at) * self.max_rate)
        self._budget_at = now
        if self._budget < 1.0:
            self._dropped += 1  # over --trace-max-rate (a flood of sampled parents): the agent's CPU comes first
            return 0
        self._budget -= 1.0
        if self.ended - exporter.exported - exporter.failed >= self._max_queue:
            self._dropped += 1  # the exporter is behind by a whole queue (a collector slow or down)
            return 0
        api = self._api
        try:
            if span_id:
                self._ids.next_trace_id = 0
                caller = api.SpanContext(trace_id, span_id, is_remote=True, trace_flags=api.TraceFlags(flags))
                context = api.set_span_in_context(api.NonRecordingSpan(caller), self._empty)
            else:
                self._ids.next_trace_id = trace_id
                context = self._empty
            attributes: dict[str, str | bool] = {
                "authz.decision": outcome,
                "authz.reason": reason,
                "authz.authn_method": authn,
                "authz.cache_hit": cache_hit,
                "authz.decision_id": did,
                "authz.service": service,
                "authz.policy_version": version,
                "http.request.method": method,
                "url.path": path,
            }
            if route:
                attributes["authz.route"] = route
            span = self._tracer.start_span(
                SPAN_NAME, context, api.SpanKind.SERVER, attributes, start_time=start, record_exception=False
            )
            sampled = span.get_span_context().trace_flags.sampled  # always: the sampler agrees by construction
            if outcome == "error":
                span.set_status(api.Status(api.StatusCode.ERROR, reason))
            span.end(end_time=start + latency)
        except Exception:
            self._dropped += 1
            now = time.monotonic()
            if now - self._error_logged >= 60.0:  # a fault that repeats on every span: one traceback a minute
                self._error_logged = now
                log.exception("could not make the span of %s (counted as dropped; logged once a minute)", did)
            return 0
        finally:
            self._ids.next_trace_id = 0
        self.ended += sampled
        return int(sampled)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, make what is recorded, and flush it to the collector: all within timeout_s."""
        end = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(max(0.0, end - time.monotonic()) / 2)
        self.drain()

        def flush() -> None:
            try:
                self.provider.force_flush(int(max(0.0, end - time.monotonic()) * 1000))
                self.provider.shutdown()
            except Exception:
                log.exception("flushing spans")

        # The SDK's own shutdown may wait 30 s on a collector that is down: it runs aside, waited for until the end.
        flusher = threading.Thread(target=flush, name="authz-tracing-flush", daemon=True)
        flusher.start()
        flusher.join(max(0.0, end - time.monotonic()))
        if flusher.is_alive():
            log.warning("spans not flushed within %.1f s (the collector at %s)", timeout_s, self.endpoint.url)


def _otlp_exporter(endpoint: Endpoint, timeout_s: float) -> Any:
    if endpoint.transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint.url, insecure=endpoint.insecure, timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

    return HttpSpanExporter(endpoint=endpoint.url, timeout=timeout_s)
