"""`--fail-if` checks for CI: `p99 > 2ms`, `max >= 1s`, `rps < 5000`. Parsed strictly before anything runs, judged
on the overall fixed-rate latencies (rps on the saturation phase) of the --policy run."""

from __future__ import annotations

import re
from dataclasses import dataclass

LATENCY_METRICS = ("p50", "p90", "p99", "p999", "max", "mean")
# Microseconds as written: ASCII, the micro sign (U+00B5) or the Greek mu (U+03BC); the two look alike.
_UNITS_MS = {"us": 0.001, "\u00b5s": 0.001, "\u03bcs": 0.001, "ms": 1.0, "s": 1000.0}
_EXPR = re.compile(
    r"\s*(?P<metric>[a-z0-9.]+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[a-z\u00b5\u03bc/]*)\s*"
)
GRAMMAR = "'p50|p90|p99|p999|max|mean > N(us|ms|s)' (or >=), or 'rps < N' (or <=)"


@dataclass(frozen=True, slots=True)
class FailIf:
    expr: str  # as written
    metric: str  # p50 .. max, mean, or rps
    op: str
    limit: float  # milliseconds for a latency, requests per second for rps

    def violated(self, measured: float) -> bool:
        if self.op == ">":
            return measured > self.limit
        if self.op == ">=":
            return measured >= self.limit
        if self.op == "<":
            return measured < self.limit
        return measured <= self.limit


def parse(expr: str) -> FailIf:
    """One --fail-if expression; ValueError naming it and saying what is accepted."""
    m = _EXPR.fullmatch(expr)
    if m is None:
        raise ValueError(f"--fail-if {expr!r}: not an expression; write {GRAMMAR}")
    metric, op, value, unit = m["metric"], m["op"], float(m["value"]), m["unit"]
    metric = "p999" if metric == "p99.9" else metric
    if metric == "rps":
        if op not in ("<", "<="):
            raise ValueError(f"--fail-if {expr!r}: rps fails when it is too low: write 'rps < N' (or <=)")
        if unit not in ("", "rps", "/s"):
            raise ValueError(f"--fail-if {expr!r}: rps is requests per second: write the number alone, 'rps < 5000'")
        return FailIf(expr, metric, op, value)
    if metric not in LATENCY_METRICS:
        raise ValueError(f"--fail-if {expr!r}: unknown measure {metric!r}; write {GRAMMAR}")
    if op not in (">", ">="):
        raise ValueError(f"--fail-if {expr!r}: a latency fails when it is too high: write '{metric} > N' (or >=)")
    if unit not in _UNITS_MS:
        raise ValueError(f"--fail-if {expr!r}: give the latency a unit, us, ms or s (e.g. '{metric} > 2ms')")
    return FailIf(expr, metric, op, value * _UNITS_MS[unit])
