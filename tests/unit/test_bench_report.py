"""The bench report page: well-formed, shows the result's numbers as the table formats them, fetches nothing, runs
nothing, and shows hostile names from users' files as text (in the tables and in the charts)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from agent.bench.report import CSP, render_html
from agent.policytest.report import printable
from tests.bench_results import CASES, HOSTILE, make_result

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr", "source", "area", "base", "embed", "param", "track"}
URL_ATTRS = {"src", "href", "xlink:href", "action", "formaction", "poster", "background", "data", "srcset", "ping"}


class Page(HTMLParser):
    """The page as html.parser reads it: every element properly nested and closed, its tables, texts, comments."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.comments: list[str] = []
        self.text: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str]]]] = {}  # id -> rows -> (cell text, cell class)
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._cell_class = ""
        self.ids: dict[str, str] = {}  # id -> text inside
        self._id_stack: list[tuple[str, int, list[str]]] = []
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed elements: {self.stack}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in VOID:
            return
        self.stack.append(tag)
        if a.get("id"):
            self._id_stack.append((a["id"] or "", len(self.stack), []))
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table or ""] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell, self._cell_class = [], a.get("class") or ""

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        if self._id_stack and self._id_stack[-1][1] == len(self.stack):
            ident, _, parts = self._id_stack.pop()
            self.ids[ident] = "".join(parts)
        self.stack.pop()
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append(("".join(self._cell).strip(), self._cell_class))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        for _, _, parts in self._id_stack:
            parts.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)

    def row(self, table: str, first: str) -> list[tuple[str, str]]:
        """The row of `table` whose cell after the leading number (or first cell) is `first`."""
        for r in self.tables[table]:
            if first in [c for c, _ in r[:3]]:
                return r
        raise AssertionError(f"no row {first!r} in {table}: {[r[:3] for r in self.tables[table]]}")


def ms(v: float) -> str:
    return f"{v:.3f}"


LATENCY_KEYS = ("p50", "p90", "p99", "p999", "max", "mean")
FAIL_IF = (("p99 > 2ms", 0.815, False), ("p50 > 100us", 0.199, True), ("rps < 50000", 3000.0, True))


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return {
        "plain": make_result(),
        "envoy": make_result(envoy=True),
        "compare": make_result(compare=True, fail_if=FAIL_IF),
        "hostile": make_result(hostile=True, wrong="no token", errors=3),
    }  # fmt: skip


@pytest.fixture(scope="module")
def pages(results: dict[str, dict[str, Any]]) -> dict[str, tuple[str, Page]]:
    out = {}
    for name, result in results.items():
        text = render_html(result)
        out[name] = (text, Page(text))
    return out


@pytest.mark.parametrize("name", ["plain", "envoy", "compare", "hostile"])
def test_self_contained_and_inert(pages: dict[str, tuple[str, Page]], name: str) -> None:
    """No script, no fetchable reference (src/href only to #fragments or data:, CSS url() only to #), the CSP."""
    text, page = pages[name]
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text.lower()
    assert not [t for t, _ in page.tags if t in ("script", "iframe", "img", "object", "embed", "link", "base", "form")]
    metas = [a for t, a in page.tags if (a.get("http-equiv") or "").lower() == "content-security-policy"]
    assert [m.get("content") for m in metas] == [CSP]
    assert CSP == "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    for tag, attrs in page.tags:
        for k, v in attrs.items():
            assert not k.startswith("on"), (tag, k)  # no event handlers
            if k in URL_ATTRS:
                assert (v or "").startswith(("#", "data:")), (tag, k, v)
            if k == "style":
                assert all(u.startswith("#") for u in re.findall(r"url\(\s*['\"]?([^)'\"]*)", v or "")), v
    for css in re.findall(r"<style[^>]*>(.*?)</style>", text, re.S):
        assert "@import" not in css and "@font-face" not in css
        assert all(u.startswith("#") for u in re.findall(r"url\(\s*['\"]?([^)'\"]*)", css))
    if name != "hostile":  # the hostile result carries URLs in its texts (escaped); the others none at all
        assert "http://" not in text and "https://" not in text


def test_plain_table_shows_each_case_and_overall(results: dict[str, Any], pages: dict[str, tuple[str, Page]]) -> None:
    fixed = results["plain"]["runs"][0]["phases"]["fixed"]
    _, page = pages["plain"]
    heads = [c for c, _ in page.tables["fixed-1"][0]]
    assert heads[-6:] == ["p50", "p90", "p99", "p99.9", "max", "mean"]
    assert heads[:9] == ["#", "case", "line", "weight", "expect", "answers", "count", "mismatches", "errors"]
    for case in fixed["cases"]:
        row = page.row("fixed-1", case["name"])
        cells = [c for c, _ in row]
        assert cells[2:5] == [str(case["line"]), str(case["weight"]), str(case["expect_status"])]
        assert cells[6] == f"{case['count']:,}" and cells[7] == "0" and cells[8] == "0"
        assert cells[-6:] == [ms(case["latency_ms"][k]) for k in LATENCY_KEYS]
        assert cells[5] == f"{case['expect_status']}\u00d7{case['count']:,}"
    overall = [c for c, _ in page.row("fixed-1", "overall")]
    assert overall[-6:] == [ms(fixed["latency_ms"][k]) for k in LATENCY_KEYS]
    assert overall[6] == f"{fixed['latency_ms']['count']:,}"
    assert page.ids["verdict"].strip().startswith("OK")
    sat = results["plain"]["runs"][0]["phases"]["saturation"]
    row = [c for c, _ in page.row("saturation-table", "policy.yaml (agent)")]
    assert f"{sat['rps']:,.1f}" in row and row[-6:] == [ms(sat["latency_ms"][k]) for k in LATENCY_KEYS]
    assert "4 \u00d7 16" in row
    about = page.ids["about"]
    for fact in ("sha256:3f9a1c2e", "/srv/policies/policy.test.yaml", "0.1.0", "Xeon", "2 CPUs", "6.1.0-28-amd64",
                 "3.11.2", "pinned to separate CPUs", "1,000 req/s", "4 connections \u00d7 16 streams",
                 "transport native", "generator native", "direct gRPC", "2026-12-07T19:30:00Z",
                 results["plain"]["command"]):  # fmt: skip
        assert fact in about, fact


def test_charts_are_inline_svg_one_per_kind_and_deterministic(
    results: dict[str, Any], pages: dict[str, tuple[str, Page]]
) -> None:
    text, page = pages["compare"]
    svgs = [a for t, a in page.tags if t == "svg"]
    assert [a.get("aria-labelledby") for a in svgs] == [
        "chart-cases-title",
        "chart-distribution-title",
        "chart-timeline-title",
    ]
    assert all(re.fullmatch(r"0 0 [0-9.]+ [0-9.]+", a.get("viewbox") or "") for a in svgs)
    ids = [a["id"] for _, a in page.tags if a.get("id")]
    assert len(ids) == len(set(ids)), "element ids repeat across the inline charts"
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text
    assert render_html(results["compare"]) == text  # same result, same bytes (no random ids, no dates)
    # the legends name both runs, as text drawn in the SVG (matplotlib leaves each string as a comment)
    drawn = {c.strip() for c in page.comments}
    assert {"policy.yaml \u00b7 fixed rate", "policy-v2.yaml \u00b7 saturation", "p99.9", "overall"} <= drawn


def test_through_envoy_rows(results: dict[str, Any], pages: dict[str, tuple[str, Page]]) -> None:
    phases = results["envoy"]["runs"][0]["phases"]
    _, page = pages["envoy"]
    alone = [c for c, _ in page.row("fixed-1", "Envoy alone (no agent)")]
    assert alone[-6:] == [ms(phases["envoy_fixed"]["latency_ms"][k]) for k in LATENCY_KEYS]
    added = [c for c, _ in page.row("fixed-1", "added by the agent")]
    assert added[-6:-1] == [ms(phases["added_ms"][k]) for k in LATENCY_KEYS[:-1]]
    mean = phases["fixed"]["latency_ms"]["mean"] - phases["envoy_fixed"]["latency_ms"]["mean"]
    assert added[-1] == ms(mean)
    sat = [c for c, _ in page.row("saturation-table", "Envoy alone (no agent) (envoy-alone)")]
    assert f"{phases['envoy_saturation']['rps']:,.1f}" in sat
    assert "through Envoy" in page.ids["about"]
    headline = " ".join(page.ids["headline"].split())
    assert f"p99 added by the agent {ms(phases['added_ms']['p99'])} ms" in headline


def test_compare_side_by_side_with_signed_coloured_changes_and_failed_banner(
    results: dict[str, Any], pages: dict[str, tuple[str, Page]]
) -> None:
    r = results["compare"]
    _, page = pages["compare"]
    rows = page.tables["compare-table"]
    overall = rows.index(next(x for x in rows if x and x[0][0] == "overall"))
    a, b, change = rows[overall : overall + 3]
    first, second = (run["phases"]["fixed"]["latency_ms"] for run in r["runs"])
    assert [c for c, _ in a[-6:]] == [ms(first[k]) for k in LATENCY_KEYS]
    assert [c for c, _ in b[-6:]] == [ms(second[k]) for k in LATENCY_KEYS]
    for (cell, cls), k in zip(change[-6:], LATENCY_KEYS, strict=True):
        pct = r["compare"]["latency_pct"][k]
        assert cell == f"{pct:+.1f}%"
        assert cell[0] in "+-"
        assert ("worse" if pct >= 1 else "better" if pct <= -1 else "same") in cls
    assert any("better" in cls for x in rows for _, cls in x), "a faster percentile is shown green somewhere"
    sat = page.tables["compare-saturation"][1]
    assert sat[-1][0] == f"{r['compare']['rps_pct']:+.1f}%"
    # the second run's wrong case: its mismatches highlighted, in its own table and the comparison
    no_token = next(x for x in page.tables["fixed-2"] if any(c == CASES[1][0] for c, _ in x))
    assert "alarm" in no_token[7][1] and int(no_token[7][0]) > 0
    assert "alarm" not in page.row("fixed-1", CASES[1][0])[7][1]
    verdict = " ".join(page.ids["verdict"].split())
    assert verdict.startswith("FAILED")
    assert "--fail-if p50 > 100us: measured 0.199 ms, violated" in verdict
    assert "--fail-if rps < 50000: measured 3,000.0 req/s, violated" in verdict
    assert "--fail-if p99 > 2ms: measured 0.815 ms, held" in verdict
    answered = "answered 401\u00d7282, 200\u00d793"
    assert f"case {CASES[1][0]} (line 11): 93 mismatches, 0 errors; expected 401, {answered}" in verdict
    assert "policy-v2.yaml, fixed rate" in verdict


def test_hostile_names_show_as_text(results: dict[str, Any], pages: dict[str, tuple[str, Page]]) -> None:
    text, page = pages["hostile"]
    shown = printable(HOSTILE)  # the ESC shows as \x1b, never reaches a terminal or the page raw
    assert "\x1b" not in text
    assert page.row("fixed-1", shown)  # the table cell's text is exactly the name
    assert "&lt;script&gt;alert(" in text
    assert "&lt;img src=https://evil.example/x.png&gt;" in text and "&lt;iframe src=http://evil.example/&gt;" in text
    # in the chart, matplotlib's SVG keeps each label as an escaped comment: the parser reads it back as one comment
    labels = [c for c in page.comments if "alert(" in c]
    assert labels and all("-->" not in c for c in labels)
    assert all("<script" not in c for c in page.comments)  # escaped inside the comment too
    # errors named: the generator's outcome -1 is a reset
    row = page.row("fixed-1", shown)
    assert "reset\u00d73" in row[5][0] and "alarm" in row[8][1]
    verdict = page.ids["verdict"]
    assert verdict.strip().startswith("FAILED") and shown in verdict


def test_partial_results_render_with_dashes() -> None:
    """--no-saturation, a run cut short, an older or hand-edited JSON: the page shows what is there."""
    r = make_result()
    del r["runs"][0]["phases"]["saturation"]
    del r["runs"][0]["phases"]["fixed"]["cases"][0]["latency_ms"]
    r["runs"][0]["phases"]["fixed"]["timeline"].append([3, 0, None])
    page = Page(render_html(r))
    assert "saturation-table" not in page.tables
    assert [c for c, _ in page.row("fixed-1", CASES[0][0])][-6:] == ["\u2013"] * 6
    assert len([t for t, _ in page.tags if t == "svg"]) == 3
    for minimal in ({}, {"runs": [{}]}, {"runs": [{"phases": {"fixed": {}}}], "ok": False}):
        Page(render_html(minimal))
    assert Page(render_html({"ok": False})).ids["verdict"].strip().startswith("FAILED")


def test_verdict_worked_out_when_ok_is_missing() -> None:
    r = make_result(wrong="no token")
    del r["ok"]
    assert Page(render_html(r)).ids["verdict"].strip().startswith("FAILED")
    r = make_result()
    del r["ok"]
    assert Page(render_html(r)).ids["verdict"].strip().startswith("OK")


def test_a_run_where_every_request_failed() -> None:
    """No latency at all (every answer a bad reply): the page says so in the verdict and draws what it can."""
    r = make_result()
    for ph in r["runs"][0]["phases"].values():
        for holder in [ph, *ph["cases"]]:
            n = holder.get("count", ph["sent"])
            holder["latency_ms"] = {k: None for k in LATENCY_KEYS} | {"count": 0}
            holder["histogram"] = []
            holder["errors"] = n
            if "outcomes" in holder:
                holder["outcomes"] = {"-2": n}
        ph["completed"], ph["rps"] = 0, 0.0
        ph["timeline"] = [[t, 0, None] for t, _, _ in ph["timeline"]]
    r["ok"] = False
    page = Page(render_html(r))
    assert [a.get("aria-labelledby") for t, a in page.tags if t == "svg"] == ["chart-timeline-title"]
    assert [c for c, _ in page.row("fixed-1", "overall")][-6:] == ["\u2013"] * 6
    verdict = " ".join(page.ids["verdict"].split())
    assert "answered bad reply\u00d7" in verdict and verdict.startswith("FAILED")


def test_timeline_partial_last_second() -> None:
    """A 2.5 s phase's third second is half a second long: its count is a rate over that half; a 2.01 s phase's
    sliver of a third second is left out, not drawn as the throughput collapsing."""
    from agent.bench.report import _per_second

    xs, rates, p99 = _per_second({"seconds": 2.5, "timeline": [[0, 1000, 0.4], [1, 990, None], [2, 500, 0.5]]})
    assert xs == [0.5, 1.5, 2.25] and rates == [1000.0, 990.0, 1000.0]
    assert p99[0] == 0.4 and p99[1] != p99[1] and p99[2] == 0.5  # None drawn as a gap (NaN)
    xs, rates, _ = _per_second({"seconds": 2.01, "timeline": [[0, 1000, 0.4], [1, 1000, 0.4], [2, 10, 0.4]]})
    assert xs == [0.5, 1.5] and rates == [1000.0, 1000.0]
