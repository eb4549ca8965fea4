"""Denial counts: what each agent refused, per (route, reason), and the control plane's hour of them per service.

Agent side (`DenialTally`): the counts are not kept anew. Every decision an agent makes already reaches
DecisionStats (agent.audit.stats) through the engine's `_finish`, denials included: the native transport's C pass
(agent._recall) answers remembered allows only, anything else, every denial among it, is decided by the engine.
So a report is the difference between DecisionStats' counts now and at the last report: nothing is added to the
hot path, and the work of a report is bounded by DecisionStats' own cap on series.

Control-plane side (`DenialWindow`): an agent is not trusted to send sane strings or numbers. Route and reason are
escaped and bounded, a reason must look like a reason code, counts are capped, and what was cut or dropped is
counted per identity (shown in /status). Counts are summed across agents per service per minute, over the last
60 minutes (a ring of 60 slots), each slot bounded in distinct (route, reason) pairs.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.controlplane.tls import _printable

REPORT_EVERY_S = 10.0  # an agent with denials to report sends a Status this often
MAX_PER_REPORT = 200  # (route, reason) pairs in one report; the rest is summed into route OTHER
OTHER = "*other*"
MINUTES = 60  # the window the control plane keeps, one slot per minute
MAX_ROUTE = 128  # a route name as kept and shown (escaped; "..." marks a cut)
MAX_REASON = 64
MAX_COUNT = 100_000_000  # one entry of one report: far above what an agent refuses in REPORT_EVERY_S
MAX_PAIRS_PER_MINUTE = 1000  # distinct (route, reason) of one service in one minute; more go to route OTHER
MAX_SERVICES = 1024  # services with denials kept; an agent can name any service on a plain-text channel
MAX_IDENTITIES = 1024  # identities whose rejected entries are counted one by one
INVALID_REASON = "*invalid*"
_REASON = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

Entry = tuple[str, str, int]  # (route, reason, count)


class DenialTally:
    """The denials an agent made since its last report, read from its decision counts (route, outcome, reason)."""

    def __init__(self, counts: Callable[[], Mapping[tuple[str, str, str], int]]) -> None:
        self._counts = counts
        self._reported: dict[tuple[str, str], int] = {}

    def _totals(self) -> dict[tuple[str, str], int]:
        totals: dict[tuple[str, str], int] = {}
        for (route, outcome, reason), n in list(self._counts().items()):
            if outcome != "allow":  # a deny or an error: either way the request was refused
                totals[route, reason] = totals.get((route, reason), 0) + n
        return totals

    def pending(self) -> bool:
        """Whether a report would carry anything (cheap enough for every REPORT_EVERY_S)."""
        return any(n > self._reported.get(k, 0) for k, n in self._totals().items())

    def take(self) -> list[Entry]:
        """The denials since the last take, bounded to MAX_PER_REPORT entries; they count as reported."""
        totals = self._totals()
        fresh = {k: n - self._reported.get(k, 0) for k, n in totals.items() if n > self._reported.get(k, 0)}
        self._reported = totals
        return bounded([(route, reason, n) for (route, reason), n in fresh.items()], MAX_PER_REPORT)


def bounded(entries: list[Entry], limit: int) -> list[Entry]:
    """At most `limit` entries: the largest kept, the rest summed per reason into route OTHER (and, should the
    reasons alone be too many, the smallest of those into (OTHER, OTHER))."""
    if len(entries) <= limit:
        return sorted(entries, key=lambda e: (-e[2], e[0], e[1]))
    ordered = sorted(entries, key=lambda e: (-e[2], e[0], e[1]))
    reasons = len({e[1] for e in ordered})
    head = ordered[: limit - min(reasons, limit // 4)]
    rest: Counter[str] = Counter()
    for _, reason, n in ordered[len(head) :]:
        rest[reason] += n
    room = limit - len(head)
    grouped = rest.most_common()
    if len(grouped) > room:
        grouped = [*grouped[: room - 1], (OTHER, sum(n for _, n in grouped[room - 1 :]))]
    return head + [(OTHER, reason, n) for reason, n in grouped]


@dataclass
class _Slot:
    minute: int = -1  # unix minute this slot holds; another one means it is stale
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)


class DenialWindow:
    """Denials per service per minute over the last MINUTES minutes, summed across agents."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._services: dict[str, list[_Slot]] = {}
        self.rejected: Counter[str] = Counter()  # entries cut, capped or dropped, per identity
        self.reports = 0

    def record(self, service: str, identity: str, entries: Iterable[Any], now: float | None = None) -> None:
        """Add one Status' denials (DenialCount messages, or anything with route, reason and count)."""
        now = self._clock() if now is None else now
        minute = int(now // 60)
        service = _printable(service, MAX_ROUTE)
        rejected = 0
        slots = self._services.get(service)
        taken = 0
        for entry in entries:
            taken += 1
            if taken > MAX_PER_REPORT:
                rejected += 1
                continue
            route, reason, count, bad = _checked(entry)
            rejected += bad
            if count <= 0:
                continue
            if slots is None:
                if len(self._services) >= MAX_SERVICES:
                    rejected += 1
                    continue
                slots = self._services[service] = [_Slot() for _ in range(MINUTES)]
            slot = slots[minute % MINUTES]
            if slot.minute != minute:
                slot.minute, slot.counts = minute, Counter()
            key = (route, reason)
            if key not in slot.counts and len(slot.counts) >= MAX_PAIRS_PER_MINUTE:
                key = (OTHER, reason if (OTHER, reason) in slot.counts else OTHER)
                rejected += 1
            slot.counts[key] += count
        self.reports += 1
        if rejected:
            who = identity if identity in self.rejected or len(self.rejected) < MAX_IDENTITIES else OTHER
            self.rejected[who] += rejected

    def services(self) -> list[str]:
        return sorted(self._services)

    def _live(self, service: str, now: float) -> list[_Slot]:
        """The slots of the last MINUTES minutes (the current one included), oldest first."""
        minute = int(now // 60)
        slots = self._services.get(service, [])
        return [s for s in sorted(slots, key=lambda s: s.minute) if minute - MINUTES < s.minute <= minute]

    def totals(self, service: str, now: float | None = None) -> list[Entry]:
        """(route, reason, count) over the last hour, the largest first."""
        now = self._clock() if now is None else now
        total: Counter[tuple[str, str]] = Counter()
        for slot in self._live(service, now):
            total.update(slot.counts)
        return sorted(((r, why, n) for (r, why), n in total.items()), key=lambda e: (-e[2], e[0], e[1]))

    def per_minute(self, service: str, now: float | None = None) -> tuple[list[int], dict[str, list[int]]]:
        """The last MINUTES unix minutes (oldest first) and, per reason, its denials in each of them."""
        now = self._clock() if now is None else now
        last = int(now // 60)
        minutes = list(range(last - MINUTES + 1, last + 1))
        series: dict[str, list[int]] = {}
        for slot in self._live(service, now):
            i = slot.minute - minutes[0]
            for (_, reason), n in slot.counts.items():
                series.setdefault(reason, [0] * MINUTES)[i] += n
        return minutes, series

    def status(self, now: float | None = None) -> dict[str, Any]:
        """For /status: each service's denials in the last hour, and what agents sent that was not taken as sent."""
        now = self._clock() if now is None else now
        hour = {s: sum(n for _, _, n in self.totals(s, now)) for s in self.services()}
        return {
            "last_hour": {s: n for s, n in hour.items() if n},
            "reports": self.reports,
            "rejected_entries": dict(self.rejected),
        }


def _checked(entry: Any) -> tuple[str, str, int, int]:
    """(route, reason, count, 1 when anything had to be changed else 0) of one untrusted entry."""
    bad = 0
    raw_route, raw_reason, count = str(entry.route), str(entry.reason), int(entry.count)
    route = _printable(raw_route, MAX_ROUTE)
    if route != raw_route:
        bad = 1
    reason = raw_reason if _REASON.fullmatch(raw_reason) else INVALID_REASON
    if reason != raw_reason:
        bad = 1
    if count > MAX_COUNT:
        count, bad = MAX_COUNT, 1
    return route, reason, count, bad
