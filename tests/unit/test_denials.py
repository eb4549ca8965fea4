"""Denial counts: the agent's tally read from its decision counts, and the control plane's hostile-input-proof hour."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from agent.audit.stats import DecisionStats
from agent.controlplane.denials import (
    INVALID_REASON,
    MAX_COUNT,
    MAX_PAIRS_PER_MINUTE,
    MAX_PER_REPORT,
    MAX_ROUTE,
    MINUTES,
    OTHER,
    DenialTally,
    DenialWindow,
    bounded,
)

T0 = 1_700_000_000.0 - 1_700_000_000.0 % 60  # the start of a minute


@dataclass
class Sent:
    """What an agent's DenialCount carries (the window reads route, reason and count)."""

    route: str
    reason: str
    count: int


def test_the_tally_reports_refusals_since_the_last_report_and_never_allows() -> None:
    stats = DecisionStats()
    tally = DenialTally(lambda: stats.decisions)
    assert not tally.pending() and tally.take() == []
    for _ in range(3):
        stats.record("list-orders", "deny", "token_missing", 10)
    stats.record(None, "deny", "no_route", 10)
    stats.record("list-orders", "error", "jwks_unavailable", 10)
    stats.record("list-orders", "allow", "allowed", 10)
    stats.recalled({"list-orders": 50}, [0] * 14, 0)  # allows the C pass answered: never denials
    assert tally.pending()
    assert tally.take() == [
        ("list-orders", "token_missing", 3),
        ("", "no_route", 1),
        ("list-orders", "jwks_unavailable", 1),
    ]
    assert not tally.pending() and tally.take() == []
    stats.record("list-orders", "deny", "token_missing", 10)
    assert tally.take() == [("list-orders", "token_missing", 1)]


def test_a_report_holds_at_most_its_bound_the_rest_summed_into_other() -> None:
    entries = [(f"route-{i}", f"reason_{i % 7}", 1000 - i) for i in range(600)]
    out = bounded(entries, MAX_PER_REPORT)
    assert len(out) <= MAX_PER_REPORT
    assert sum(n for *_, n in out) == sum(n for *_, n in entries)  # nothing lost, only summed
    assert out[0] == ("route-0", "reason_0", 1000)  # the largest kept as they are
    others = {reason: n for route, reason, n in out if route == OTHER}
    assert set(others) == {f"reason_{i}" for i in range(7)}
    # Even with more reasons than room, the bound holds.
    many = [(f"r{i}", f"why_{i}", 1) for i in range(1000)]
    out = bounded(many, MAX_PER_REPORT)
    assert len(out) == MAX_PER_REPORT and sum(n for *_, n in out) == 1000
    assert (OTHER, OTHER) in {(r, why) for r, why, _ in out}


def test_the_window_sums_agents_per_minute_and_forgets_after_an_hour() -> None:
    window = DenialWindow(clock=lambda: T0)
    window.record("orders", "spiffe://a", [Sent("list-orders", "token_missing", 4)], T0)
    window.record("orders", "spiffe://b", [Sent("list-orders", "token_missing", 6), Sent("", "no_route", 1)], T0 + 5)
    window.record("orders", "spiffe://a", [Sent("list-orders", "insufficient_scope", 2)], T0 + 61)
    assert window.totals("orders", T0 + 61) == [
        ("list-orders", "token_missing", 10),
        ("list-orders", "insufficient_scope", 2),
        ("", "no_route", 1),
    ]
    minutes, series = window.per_minute("orders", T0 + 61)
    assert len(minutes) == MINUTES and minutes[-1] == int(T0 // 60) + 1
    assert series["token_missing"][-2:] == [10, 0] and series["insufficient_scope"][-1] == 2
    # An hour later the first minute is gone, the second still counts; the ring slot is reused for a new minute.
    later = T0 + 60 * MINUTES + 1
    assert window.totals("orders", later) == [("list-orders", "insufficient_scope", 2)]
    window.record("orders", "spiffe://a", [Sent("list-orders", "token_expired", 1)], later)
    assert window.totals("orders", later) == [
        ("list-orders", "insufficient_scope", 2),
        ("list-orders", "token_expired", 1),
    ]
    assert window.status(later)["last_hour"] == {"orders": 3}
    assert window.totals("billing", later) == [] and window.per_minute("billing", later)[1] == {}


def test_hostile_strings_and_counts_are_escaped_capped_and_counted_per_identity() -> None:
    window = DenialWindow(clock=lambda: T0)
    evil = [
        Sent("list-orders\n2024-01-01 INFO forged line", "token_missing", 1),
        Sent("x" * 10_000, "token_missing", 1),
        Sent("<script>alert(1)</script>", "<b>reason</b>", 1),
        Sent("list-orders", "token_missing", 2**63),
        Sent("list-orders", "no_route", 0),
    ]
    window.record("orders", "spiffe://mallory", evil, T0)
    totals = window.totals("orders", T0)
    assert all("\n" not in r and len(r) <= MAX_ROUTE + 3 for r, _, _ in totals)
    assert ("list-orders\\n2024-01-01 INFO forged line", "token_missing", 1) in totals
    assert ("<script>alert(1)</script>", INVALID_REASON, 1) in totals  # HTML is escaped by the page, not here
    assert ("list-orders", "token_missing", MAX_COUNT) in totals
    assert window.status(T0)["rejected_entries"] == {"spiffe://mallory": 4}
    # More entries than a report may hold: the extra are dropped and counted.
    window.record("orders", "spiffe://mallory", [Sent("r", "token_missing", 1)] * (MAX_PER_REPORT + 5), T0)
    assert window.status(T0)["rejected_entries"] == {"spiffe://mallory": 9}


def test_distinct_pairs_per_minute_are_bounded() -> None:
    window = DenialWindow(clock=lambda: T0)
    for batch in range(MAX_PAIRS_PER_MINUTE // MAX_PER_REPORT + 2):
        window.record("orders", "a", [Sent(f"r{batch}-{i}", "token_missing", 1) for i in range(MAX_PER_REPORT)], T0)
    totals = window.totals("orders", T0)
    assert len(totals) <= MAX_PAIRS_PER_MINUTE + 2
    assert sum(n for *_, n in totals) == (MAX_PAIRS_PER_MINUTE // MAX_PER_REPORT + 2) * MAX_PER_REPORT
    assert Counter(r for r, _, _ in totals)[OTHER] >= 1


def test_a_service_name_with_dollar_signs_is_drawn_as_text() -> None:
    """Before, matplotlib read "$...$" in the chart's title as mathtext: a service an agent named "a$\\frac{$b"
    raised ValueError and a deeply nested one RecursionError, failing the Denials page for everyone."""
    from agent.controlplane.console.denials import chart_svg

    minutes = list(range(60))
    for name in ("a$\\frac{$b", "x$\\undefinedmacro$y", "$" + "{" * 60 + "x" + "}" * 60 + "$"):
        svg = chart_svg(minutes, {"token_missing": [1] * 60}, f"{name}: denials per minute")
        assert svg.startswith(b"<?xml")


def test_past_the_chart_limit_a_service_keeps_its_table_but_is_not_drawn() -> None:
    """A hostile agent can name up to MAX_SERVICES services: the page draws only the MAX_CHARTS with the most
    denials (matplotlib costs tens of milliseconds a chart), the others keep their counts."""
    from agent.controlplane.console.denials import MAX_CHARTS, service_denials

    assert 1 <= MAX_CHARTS <= 20
    rows = [("/v1/x", "token_missing", 3)]
    drawn = service_denials("a", rows, list(range(60)), {"token_missing": [1] * 60}, True)
    skipped = service_denials("b", rows, list(range(60)), {"token_missing": [1] * 60}, True, draw=False)
    assert drawn.chart is not None and drawn.chart.startswith("data:image/svg+xml;base64,")
    assert skipped.chart is None and skipped.total == 3 and skipped.rows == rows
