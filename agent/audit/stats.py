"""Decision counts and latencies, kept on the hot path as plain counters and read by /metrics at scrape time.

Label values are bounded by construction (route names come from the policy, reasons and outcomes from
agent.reasons), and capped anyway: past MAX_SERIES distinct combinations new ones count as route "_other".
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING

from agent.decision import LATENCY_BOUNDS_US

if TYPE_CHECKING:
    from agent.decision import Decision, RequestView

__all__ = ["LATENCY_BOUNDS_US", "MAX_SERIES", "DecisionStats"]
MAX_SERIES = 5000


class DecisionStats:
    """Shared by every engine a server builds, so a policy reload does not reset the counts."""

    __slots__ = ("alerts", "buckets", "decisions", "latency_sum_us")

    def __init__(self) -> None:
        self.decisions: Counter[tuple[str, str, str]] = Counter()
        self.buckets = [0] * (len(LATENCY_BOUNDS_US) + 1)  # the last one is +Inf
        self.latency_sum_us = 0
        self.alerts: Counter[str] = Counter()

    def record(self, route: str | None, outcome: str, reason: str, latency_us: int) -> None:
        key = (route or "", outcome, reason)
        decisions = self.decisions
        if key not in decisions and len(decisions) >= MAX_SERIES:
            key = ("_other", outcome, reason)
        decisions[key] += 1
        self.buckets[bisect_left(LATENCY_BOUNDS_US, latency_us)] += 1
        self.latency_sum_us += latency_us

    def observe(self, view: RequestView, decision: Decision, now: float) -> None:
        """A listener on the engine's finished decisions."""
        self.record(decision.route, decision.outcome, decision.reason, decision.latency_us)

    # Counts need no sight of each decision: allows answered by agent._recall arrive in summary.
    recall_resync_s = float("inf")

    def recalled(self, counts: dict[str, int], buckets: list[int], latency_sum_us: int) -> None:
        """Allows answered from remembered decisions (agent._recall): how many per route, and their latencies
        (counts per LATENCY_BOUNDS_US bucket, and their sum)."""
        for route, count in counts.items():
            key = (route, "allow", "allowed")
            if key not in self.decisions and len(self.decisions) >= MAX_SERIES:
                key = ("_other", "allow", "allowed")
            self.decisions[key] += count
        for i, n in enumerate(buckets):
            self.buckets[i] += n
        self.latency_sum_us += latency_sum_us
