"""Prometheus /metrics for the admin port, read at scrape time from the counters the agent keeps anyway.

The hot path pays plain counter increments (agent/audit/stats.py); everything here is computed when
Prometheus asks. Label values are bounded: routes from the policy, reasons and outcomes from
agent.reasons, identity providers from the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from agent.decision import LATENCY_BOUNDS_US

if TYPE_CHECKING:
    from agent.audit.sinks import SinkSet
    from agent.server.run import AgentServer


class AgentCollector:
    def __init__(self, server: Callable[[], AgentServer]) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        server = self._server()
        engine = server.engine
        engine.fold_recalled()
        stats = server.stats

        decisions = CounterMetricFamily(
            "authz_decisions", "Decisions by route, outcome (allow, deny, error) and reason code",
            labels=["route", "decision", "reason"],
        )  # fmt: skip
        for (route, outcome, reason), n in list(stats.decisions.items()):
            decisions.add_metric([route, outcome, reason], n)
        yield decisions

        buckets, total = [], 0
        for bound, n in zip((*LATENCY_BOUNDS_US, None), list(stats.buckets), strict=True):
            total += n
            buckets.append(("+Inf" if bound is None else repr(bound / 1e6), total))
        latency = HistogramMetricFamily("authz_decision_latency_seconds", "Time to decide, in the agent")
        latency.add_metric([], buckets, stats.latency_sum_us / 1e6)
        yield latency

        info = GaugeMetricFamily("authz_policy_info", "The policy enforced (1)", labels=["service", "version"])
        info.add_metric([engine.policy.service, engine.policy.version], 1.0 if server.policy_loaded else 0.0)
        yield info
        yield GaugeMetricFamily("authz_ready", "1 when the agent is ready", value=1.0 if server.ready else 0.0)

        keys = GaugeMetricFamily("authz_jwks_keys", "Keys held per identity provider", labels=["provider"])
        age = GaugeMetricFamily("authz_jwks_age_seconds", "Age of the key set held", labels=["provider"])
        ok = GaugeMetricFamily("authz_jwks_fetch_ok", "1 when the last key fetch worked", labels=["provider"])
        for name, store in engine.stores.items():
            st = store.status()
            keys.add_metric([name], float(st["keys"]))  # type: ignore[arg-type]
            if st["age_s"] is not None:
                age.add_metric([name], float(st["age_s"]))  # type: ignore[arg-type]
            ok.add_metric([name], 0.0 if st["error"] else 1.0)
        yield keys
        yield age
        yield ok

        cache = CounterMetricFamily("authz_token_cache", "Verified-token cache lookups", labels=["result"])
        cache.add_metric(["hit"], engine.jwt.hits)
        cache.add_metric(["miss"], engine.jwt.misses)
        yield cache
        yield CounterMetricFamily(
            "authz_remembered_allows", "Decisions answered from a remembered allow", value=engine.remembered_hits
        )

        held = GaugeMetricFamily("authz_ratelimit_buckets", "Token buckets held per limited route", labels=["route"])
        for name, limiter in engine.limiters.items():
            held.add_metric([name], float(len(limiter.table)))
        yield held

        if engine.shared is not None:
            shared = engine.shared
            yield GaugeMetricFamily("authz_shared_state_up", "1 while Redis answers", value=float(shared.up))
            fb = CounterMetricFamily(
                "authz_shared_state_fallbacks", "Decisions that used local state because Redis did not answer",
                labels=["what"],
            )  # fmt: skip
            for what, n in shared.fallbacks.items():
                fb.add_metric([what], n)
            yield fb

        audit = server.audit
        yield CounterMetricFamily("authz_audit_records_written", "Audit records written", value=audit.written)
        yield CounterMetricFamily("authz_audit_records_dropped", "Audit records lost (queue full)", value=audit.dropped)
        if server.sinks is not None:
            yield from _sink_metrics(server.sinks)
        alerts = CounterMetricFamily("authz_alerts", "Alerts raised, by kind", labels=["alert"])
        for kind, n in list(stats.alerts.items()):
            alerts.add_metric([kind], n)
        yield alerts
        yield GaugeMetricFamily(
            "authz_revocations_sequence", "The revocation list in force", value=float(server.revocations.sequence)
        )

        tracer = server.tracer
        if tracer is not None:  # --otlp-endpoint: what became of the sampled decisions' spans
            spans = CounterMetricFamily(
                "authz_trace_spans", "Sampled decisions' spans: exported, failed (the collector refused or was not "
                "reached), dropped (buffers full: the exporter behind)", labels=["result"],
            )  # fmt: skip
            spans.add_metric(["exported"], tracer.exported)
            spans.add_metric(["failed"], tracer.failed)
            spans.add_metric(["dropped"], tracer.dropped)
            yield spans

        transport_stats = getattr(server.transport, "stats", None)
        if transport_stats is not None:  # the native transport's limits (docs/limits.md)
            t = transport_stats()
            yield GaugeMetricFamily("authz_transport_connections", "Open gRPC connections", value=t["connections"])
            yield GaugeMetricFamily(
                "authz_transport_buffered_bytes", "Bytes of unfinished requests held", value=t["buffered_bytes"]
            )
            refused = CounterMetricFamily(
                "authz_transport_refused", "Connections and streams refused or closed by a limit", labels=["what"]
            )
            for what in ("connections_evicted", "streams_refused_over_budget", "streams_timed_out",
                         "connections_closed_idle", "connections_closed_handshake"):  # fmt: skip
                refused.add_metric([what], t[what])
            yield refused


def _sink_metrics(sinks: SinkSet) -> Iterator[Metric]:
    """Per audit sink (labelled scheme://host:port, never credentials): delivered, dropped, spooled, up."""
    sent = CounterMetricFamily("authz_audit_sink_sent", "Audit records a sink's receiver confirmed", labels=["sink"])
    dropped = CounterMetricFamily(
        "authz_audit_sink_dropped", "Audit records not shipped to a sink: its spool was full", labels=["sink"]
    )
    spooled = GaugeMetricFamily("authz_audit_sink_spool_bytes", "Bytes of a sink's spool on disk", labels=["sink"])
    up = GaugeMetricFamily("authz_audit_sink_up", "1 while a sink's receiver is connected", labels=["sink"])
    for sink in sinks.sinks:
        sent.add_metric([sink.label], sink.sent)
        dropped.add_metric([sink.label], sink.dropped)
        spooled.add_metric([sink.label], float(sink.spool.disk_bytes))
        up.add_metric([sink.label], 1.0 if sink.up else 0.0)
    yield sent
    yield dropped
    yield spooled
    yield up


def metrics_text(server: Callable[[], AgentServer]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(server))
    return bytes(generate_latest(registry))
