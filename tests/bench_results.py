"""Realistic `authz-agent bench --json` results (schema authz-agent-bench/1) for the report's tests.

Built from seeded lognormal latencies the way the bench summarises real ones: exact percentiles, ~20 log buckets
per decade, per-second timeline; so the page is tested on numbers shaped like a run's, not on round constants."""

from __future__ import annotations

import math
import random
from typing import Any

HOSTILE = "<script>alert('x')</script> & \"$\\alpha$\" --> ]]> <!-- \x1b[31m"
CASES = (
    # name, line, weight, expected status, median ms
    ("alice lists orders", 7, 3, 200, 0.18),
    ("no token", 11, 1, 401, 0.09),
    ("carol creates an order with a key-bound token and a fresh proof", 46, 2, 200, 0.42),
    ("billing-batch signs a webhook", 64, 1, 200, 0.31),
    ("health is public", 73, 1, 200, 0.07),
)
PER_DECADE = 20


def percentiles(values: list[float]) -> dict[str, float]:
    """Exact (nearest-rank) percentiles, as the bench reports them."""
    s = sorted(values)
    n = len(s)

    def rank(p: float) -> float:
        return round(s[max(0, math.ceil(p * n) - 1)], 4)

    return {
        "count": n,
        "mean": round(sum(s) / n, 4),
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": round(s[-1], 4),
    }


def histogram(values: list[float]) -> list[list[float]]:
    counts: dict[int, int] = {}
    for v in values:
        k = math.ceil(math.log10(v) * PER_DECADE)
        counts[k] = counts.get(k, 0) + 1
    return [[round(10 ** (k / PER_DECADE), 4), n] for k, n in sorted(counts.items())]


def phase(
    rng: random.Random,
    *,
    target: str,
    rate: float | None,
    seconds: float,
    total: int,
    cases: tuple[tuple[str, int, int, int, float], ...],
    slow: float = 1.0,
    wrong: str | None = None,
    errors: int = 0,
) -> dict[str, Any]:
    """One phase: `total` requests over `seconds`, split by weight; the case named `wrong` answers 403."""
    weights = sum(c[2] for c in cases)
    all_lat: list[float] = []
    stamped: list[tuple[float, float]] = []
    out_cases = []
    mismatches_total = 0
    for name, line, weight, status, median in cases:
        n = max(1, round(total * weight / weights))
        lat = [rng.lognormvariate(math.log(median * slow), 0.35) for _ in range(n)]
        lat[rng.randrange(n)] *= 12  # the tail every real run has
        bad = n // 4 if name == wrong else 0
        got = 403 if status == 200 else 200
        outcomes = {str(status): n - bad} | ({str(got): bad} if bad else {})
        err = errors if name == cases[0][0] else 0
        if err:
            outcomes["-1"] = err
        mismatches_total += bad
        all_lat += lat
        stamped += [(rng.uniform(0, seconds), v) for v in lat]
        out_cases.append(
            {
                "name": name,
                "line": line,
                "weight": weight,
                "expect_status": status,
                "count": n,
                "mismatches": bad,
                "errors": err,
                "outcomes": outcomes,
                "latency_ms": percentiles(lat),
                "histogram": histogram(lat),
            }
        )
    timeline = []
    for second in range(math.ceil(seconds)):
        in_it = [v for t, v in stamped if second <= t < second + 1]
        timeline.append([second, len(in_it), percentiles(in_it)["p99"] if in_it else None])
    sent = len(all_lat) + errors
    out: dict[str, Any] = {
        "target": target,
        "rate": rate,
        "seconds": seconds,
        "sent": sent,
        "completed": len(all_lat),
        "rps": round(len(all_lat) / seconds, 1),
        "errors": errors,
        "mismatches": mismatches_total,
        "latency_ms": percentiles(all_lat),
        "histogram": histogram(all_lat),
        "timeline": timeline,
        "cases": out_cases,
    }
    if rate is None:
        out |= {"connections": 4, "streams": 16}
    return out


def run(
    rng: random.Random,
    label: str,
    *,
    envoy: bool,
    slow: float = 1.0,
    wrong: str | None = None,
    cases: tuple[tuple[str, int, int, int, float], ...] = CASES,
    errors: int = 0,
) -> dict[str, Any]:
    target = "envoy+agent" if envoy else "agent"
    phases: dict[str, Any] = {
        "fixed": phase(rng, target=target, rate=1000, seconds=3.0, total=3000, cases=cases, slow=slow, wrong=wrong,
                       errors=errors),
        "saturation": phase(rng, target=target, rate=None, seconds=3.0, total=9000, cases=cases, slow=slow * 2.5,
                            wrong=wrong),
    }  # fmt: skip
    if envoy:
        alone = (("envoy direct response", 0, 1, 200, 0.11),)
        phases["envoy_fixed"] = phase(rng, target="envoy-alone", rate=1000, seconds=3.0, total=3000, cases=alone)
        phases["envoy_saturation"] = phase(rng, target="envoy-alone", rate=None, seconds=3.0, total=24000, cases=alone)
        for p in ("envoy_fixed", "envoy_saturation"):
            phases[p]["cases"] = []
        for k in ("p50", "p90", "p99", "p999", "max"):
            phases["fixed"]["latency_ms"][k] = round(
                phases["fixed"]["latency_ms"][k] + phases["envoy_fixed"]["latency_ms"][k], 4
            )
        phases["added_ms"] = {
            k: round(phases["fixed"]["latency_ms"][k] - phases["envoy_fixed"]["latency_ms"][k], 4)
            for k in ("p50", "p90", "p99", "p999", "max")
        }
    return {
        "label": label,
        "policy": f"/srv/policies/{label}",
        "policy_version": "sha256:3f9a1c2e" if slow == 1.0 else "sha256:77b0d4a1",
        "cases_file": "/srv/policies/policy.test.yaml",
        "phases": phases,
    }


def make_result(
    *,
    envoy: bool = False,
    compare: bool = False,
    fail_if: tuple[tuple[str, float, bool], ...] = (),
    hostile: bool = False,
    wrong: str | None = None,
    errors: int = 0,
    seed: int = 17,
) -> dict[str, Any]:
    """A whole result; `hostile` puts markup and escapes into a case name, the policy path and the command."""
    rng = random.Random(seed)
    cases = CASES
    if hostile:
        cases = ((HOSTILE, 5, 1, 200, 0.2), *CASES[1:])
    runs = [run(rng, "policy.yaml", envoy=envoy, cases=cases, wrong=wrong, errors=errors)]
    command = "authz-agent bench --policy policy.yaml --cases policy.test.yaml --rate 1000 --duration 3"
    if compare:
        runs.append(run(rng, "policy-v2.yaml", envoy=envoy, slow=1.3, cases=cases, wrong=CASES[1][0]))
        command += " --compare policy-v2.yaml"
    if envoy:
        command += " --through-envoy"
    for expr, _, _ in fail_if:
        command += f" --fail-if '{expr}'"
    if hostile:
        runs[0]["policy"] = '/srv/"><img src=https://evil.example/x.png>/policy.yaml'
        command += ' --json "<iframe src=http://evil.example/>"'
    result: dict[str, Any] = {
        "schema": "authz-agent-bench/1",
        "command": command,
        "agent_version": "0.1.0",
        "started": "2026-12-07T19:30:00Z",
        "seconds": 21.4,
        "machine": {
            "cpu": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
            "cpus": 2,
            "kernel": "6.1.0-28-amd64",
            "python": "3.11.2",
            "pinned": True,
        },
        "settings": {
            "rate": 1000,
            "duration_s": 3,
            "saturation_duration_s": 3,
            "connections": 4,
            "streams": 16,
            "transport": "native",
            "through_envoy": envoy,
            "generator": "native",
            "token_cache_entries": 10000,
        },
        "runs": runs,
        "fail_if": [{"expr": e, "measured": m, "violated": v} for e, m, v in fail_if],
        "notes": ["only the status of each answer is checked under load"],
    }
    if compare:
        a, b = (r["phases"] for r in runs)
        result["compare"] = {
            "latency_pct": {
                k: round((b["fixed"]["latency_ms"][k] - a["fixed"]["latency_ms"][k]) / a["fixed"]["latency_ms"][k]
                         * 100, 1)
                for k in ("p50", "p90", "p99", "p999", "max", "mean")
            },
            "rps_pct": round((b["saturation"]["rps"] - a["saturation"]["rps"]) / a["saturation"]["rps"] * 100, 1),
        }  # fmt: skip
    bad = any(r["phases"][p]["mismatches"] or r["phases"][p]["errors"] for r in runs for p in ("fixed", "saturation"))
    result["ok"] = not bad and not any(v for _, _, v in fail_if)
    return result
