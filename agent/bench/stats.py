"""Exact summaries of a phase from every request's latency and outcome (the generator returns them all): nearest-rank
percentiles, a log-spaced histogram, a per-second timeline; per case and overall. Errors (outcomes -1 reset or
connection failed, -2 not a valid answer, -3 no answer in time) are counted and kept out of the latencies;
answers with another status than the case expects are counted as mismatches (their latencies are measured)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PERMILLE = (("p50", 500), ("p90", 900), ("p99", 990), ("p999", 999))
KEYS = ("count", "mean", "p50", "p90", "p99", "p999", "max")
BUCKETS_PER_DECADE = 20


@dataclass(frozen=True, slots=True)
class ClassInfo:
    name: str
    line: int
    weight: float
    expect_status: int


def ms(ns: float) -> float:
    return round(ns / 1e6, 4)


def summary(sorted_ns: Sequence[int]) -> dict[str, Any]:
    """count, mean and the nearest-rank p50 p90 p99 p99.9 and max, in milliseconds (None without a latency)."""
    n = len(sorted_ns)
    if n == 0:
        return {"count": 0, **dict.fromkeys(KEYS[1:])}
    out: dict[str, Any] = {"count": n, "mean": ms(sum(sorted_ns) / n)}
    for key, permille in PERMILLE:
        out[key] = ms(sorted_ns[-(-permille * n // 1000) - 1])
    out["max"] = ms(sorted_ns[-1])
    return out


def histogram(sorted_ns: Sequence[int]) -> list[list[float]]:
    """[upper bound in ms, count] of the non-empty log-spaced buckets (BUCKETS_PER_DECADE per decade)."""
    counts: Counter[int] = Counter()
    for v in sorted_ns:
        counts[math.ceil(BUCKETS_PER_DECADE * math.log10(max(v, 1) / 1e6) - 1e-9)] += 1
    return [[float(f"{10 ** (k / BUCKETS_PER_DECADE):.4g}"), c] for k, c in sorted(counts.items())]


def timeline(done: Sequence[tuple[int, int]]) -> list[list[float]]:
    """[second since the start, answers completed in it, p99 ms of them] from (completion offset ns, latency ns)."""
    by_second: dict[int, list[int]] = {}
    for at, latency in done:
        by_second.setdefault(at // 1_000_000_000, []).append(latency)
    out = []
    for second in range(max(by_second, default=-1) + 1):
        values = sorted(by_second.get(second, []))
        p99 = ms(values[-(-990 * len(values) // 1000) - 1]) if values else 0.0
        out.append([second, len(values), p99])
    return out


def phase(
    target: str,
    rate: float | None,
    elapsed_ns: int,
    latencies: Sequence[int],
    outcomes: Sequence[int],
    intended: Sequence[int],
    position_class: Sequence[int],
    classes: Sequence[ClassInfo],
) -> dict[str, Any]:
    """A phase's result in the JSON shape `--json` writes (see agent.bench.run)."""
    per_latency: list[list[int]] = [[] for _ in classes]
    per_outcomes: list[Counter[int]] = [Counter() for _ in classes]
    mismatches = [0] * len(classes)
    errors = [0] * len(classes)
    done: list[tuple[int, int]] = []
    sent = 0
    for k, ci in enumerate(position_class):
        if intended[k] < 0:
            continue  # never sent: the phase ended first
        sent += 1
        outcome = outcomes[k]
        per_outcomes[ci][outcome] += 1
        if outcome < 0:
            errors[ci] += 1
            continue
        per_latency[ci].append(latencies[k])
        done.append((intended[k] + latencies[k], latencies[k]))
        if outcome != classes[ci].expect_status:
            mismatches[ci] += 1
    cases = []
    for ci, info in enumerate(classes):
        values = sorted(per_latency[ci])
        cases.append(
            {
                "name": info.name,
                "line": info.line,
                "weight": info.weight,
                "expect_status": info.expect_status,
                "count": sum(per_outcomes[ci].values()),
                "mismatches": mismatches[ci],
                "errors": errors[ci],
                "outcomes": {str(o): c for o, c in sorted(per_outcomes[ci].items())},
                "latency_ms": summary(values),
                "histogram": histogram(values),
            }
        )
    overall = sorted(v for values in per_latency for v in values)
    seconds = elapsed_ns / 1e9
    completed = len(overall)
    return {
        "target": target,
        "rate": rate,
        "seconds": round(seconds, 3),
        "sent": sent,
        "completed": completed,
        "rps": round(completed / seconds, 1) if seconds > 0 else 0.0,
        "errors": sum(errors),
        "mismatches": sum(mismatches),
        "latency_ms": summary(overall),
        "histogram": histogram(overall),
        "timeline": timeline(done),
        "cases": cases,
    }
