"""The page `authz-agent bench --report` writes: one self-contained HTML file, read at a glance, opened offline.

Reports are attached to CI runs and mailed around, so the page fetches nothing: no script, no font, no image file;
the charts are inline SVG drawn by matplotlib (the `bench` extra) and a Content-Security-Policy forbids every load
but inline styles and data: images. Case names, paths and the command line come from users' files: every string
from the result is escaped (and its control characters shown as escapes) before it reaches the page or a chart.
It reads only the JSON `--json` writes (schema authz-agent-bench/1), so a saved JSON can be rendered again."""

from __future__ import annotations

import html
import io
import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.policytest.report import printable

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

Result = Mapping[str, Any]

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
# (key in latency_ms / added_ms, column heading)
PERCENTILES = (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max"), ("mean", "mean"))
PHASE_NAMES = {
    "fixed": "fixed rate",
    "saturation": "saturation",
    "envoy_fixed": "Envoy alone, fixed rate",
    "envoy_saturation": "Envoy alone, saturation",
}
SAME_PCT = 1.0  # a change smaller than this (in percent) is within a run's noise: shown with its sign, uncoloured
RUN_COLOURS = ("#1f5fa8", "#d9650b")
ENVOY_COLOUR = "#6b6b6b"
LABEL_CHARS = 48  # case names in charts are cut to this; the tables show them whole
DASH = "\u2013"
BANNER_CASES = 8  # cases named under a failed phase in the verdict; the tables have them all

# Headless SVG from matplotlib, text drawn as paths (the page needs no font), no LaTeX-like parsing of `$` in case
# names (a name with two dollars would be typeset, a bad one would raise).
CHART_RC: dict[RcKeyType, Any] = {
    "svg.fonttype": "path",
    "text.parse_math": False,
    "text.usetex": False,
    "font.family": "DejaVu Sans",
    "font.size": 10.5,
    "axes.titlesize": 11.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 10.5,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.grid": True,
    "axes.grid.which": "both",
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#888888",
    "figure.facecolor": "white",
}


# --- text -------------------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    """A value from the result as HTML text: control characters as escapes, then HTML-escaped."""
    return html.escape(printable(str(value)), quote=True)


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def fmt_ms(value: object) -> str:
    """Milliseconds with microsecond digits, as every latency cell shows them."""
    v = _num(value)
    return DASH if v is None else f"{v:.3f}"


def fmt_count(value: object) -> str:
    v = _num(value)
    return DASH if v is None else f"{round(v):,}"


def fmt_rps(value: object) -> str:
    v = _num(value)
    return DASH if v is None else f"{v:,.1f}"


def fmt_g(value: object) -> str:
    """A setting or a weight as written (1, 0.5, 2.5), whether the JSON holds it as an int or a float."""
    v = _num(value)
    return _e(value) if v is None else f"{v:g}"


def fmt_pct(value: object) -> str:
    """A change in percent, always signed so it reads without colour."""
    v = _num(value)
    return "n/a" if v is None else f"{v:+.1f}%"


def change_pct(before: object, after: object) -> float | None:
    """(after - before) / before * 100, as the JSON's `compare` computes it; None when it has no meaning."""
    a, b = _num(before), _num(after)
    if a is None or b is None or a == 0:
        return None
    return (b - a) / a * 100.0


def _pct_cell(pct: float | None, higher_is_better: bool = False) -> str:
    if pct is None:
        return '<td class="num">n/a</td>'
    if abs(pct) < SAME_PCT:
        return f'<td class="num same">{fmt_pct(pct)}</td>'
    worse = pct < 0 if higher_is_better else pct > 0
    return f'<td class="num {"worse" if worse else "better"}">{fmt_pct(pct)}</td>'


def _count_cell(value: object, alarm: bool = False) -> str:
    """A count; mismatches and errors are highlighted when not zero."""
    v = _num(value)
    bad = alarm and v is not None and v > 0
    return f'<td class="num{" alarm" if bad else ""}">{fmt_count(value)}</td>'


def _short(name: str, limit: int = LABEL_CHARS) -> str:
    text = printable(name)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else []


def _run_labels(runs: Sequence[Any]) -> list[str]:
    """Each run's label; two runs of same-named files in different directories are told apart."""
    labels = [str(_dict(r).get("label") or f"run {i + 1}") for i, r in enumerate(runs)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} (#{i + 1})" for i, label in enumerate(labels)]
    return labels


# --- what failed ------------------------------------------------------------------------------------------------


def _phase_problems(label: str, key: str, phase: Mapping[str, Any]) -> Iterator[str]:
    """A list item for a phase with mismatches or errors, with one sub-item per case that had them."""
    mismatches, errors = _num(phase.get("mismatches")) or 0, _num(phase.get("errors")) or 0
    if not mismatches and not errors:
        return
    cases = []
    for case in _list(phase.get("cases")):
        c = _dict(case)
        cm, ce = _num(c.get("mismatches")) or 0, _num(c.get("errors")) or 0
        if cm or ce:
            answers = _answers(c.get("outcomes"))
            cases.append(
                f"<li>case <q>{_e(c.get('name', '?'))}</q> (line {_e(c.get('line', '?'))}): "
                f"{fmt_count(cm)} mismatches, {fmt_count(ce)} errors; expected {_e(c.get('expect_status', '?'))}"
                + (f", answered {answers}" if answers else "")
                + "</li>"
            )
    if len(cases) > BANNER_CASES:
        cases[BANNER_CASES:] = [f"<li>and {len(cases) - BANNER_CASES} more cases: see the tables</li>"]
    yield (
        f"<b>{_e(label)}</b>, {_e(PHASE_NAMES.get(key, key))}: "
        f"{fmt_count(mismatches)} mismatch{'es' if mismatches != 1 else ''}, "
        f"{fmt_count(errors)} error{'s' if errors != 1 else ''}" + (f"<ul>{''.join(cases)}</ul>" if cases else "")
    )


def _answers(outcomes: object) -> str:
    """`{"200": 1500, "-1": 2}` as 200 times 1,500, reset times 2: the generator's negative outcomes named."""
    names = {"-1": "reset", "-2": "bad reply", "-3": "timeout"}
    parts = [
        f"{_e(names.get(str(k), k))}\u00d7{fmt_count(n)}"
        for k, n in sorted(_dict(outcomes).items(), key=lambda kv: -(_num(kv[1]) or 0))
    ]
    return ", ".join(parts)


def _fail_if_line(check: Mapping[str, Any]) -> str:
    expr = str(check.get("expr", "?"))
    unit = "req/s" if expr.strip().startswith("rps") else "ms"
    measured = fmt_rps(check.get("measured")) if unit == "req/s" else fmt_ms(check.get("measured"))
    verdict = "violated" if check.get("violated") else "held"
    return f"--fail-if <code>{_e(expr)}</code>: measured {measured} {unit}, <b>{verdict}</b>"


def failed(result: Result) -> bool:
    """The run's verdict: the JSON's `ok` when it says, else worked out from the same facts."""
    if isinstance(result.get("ok"), bool):
        return not result["ok"]
    for run in _list(result.get("runs")):
        for phase in _dict(_dict(run).get("phases")).values():
            p = _dict(phase)
            if (_num(p.get("mismatches")) or 0) or (_num(p.get("errors")) or 0):
                return True
    return any(_dict(c).get("violated") for c in _list(result.get("fail_if")))


def _banner(result: Result) -> str:
    runs = _list(result.get("runs"))
    labels = _run_labels(runs)
    problems: list[str] = []
    for label, run in zip(labels, runs, strict=True):
        for key in PHASE_NAMES:
            problems.extend(_phase_problems(label, key, _dict(_dict(_dict(run).get("phases")).get(key))))
    checks = [_dict(c) for c in _list(result.get("fail_if"))]
    problems.extend(_fail_if_line(c) for c in checks if c.get("violated"))
    held = [_fail_if_line(c) for c in checks if not c.get("violated")]
    if failed(result):
        head = '<div class="banner failed" id="verdict"><span class="verdict">FAILED</span>'
        if not problems:
            problems.append("the run did not complete as expected: see the notes below")
    else:
        head = '<div class="banner ok" id="verdict"><span class="verdict">OK</span>'
        head += " every answer matched its case's expected status; no errors"
    items = "".join(f"<li>{p}</li>" for p in problems + held)
    return head + (f"<ul>{items}</ul>" if items else "") + "</div>"


# --- the facts of the run ---------------------------------------------------------------------------------------


def _about(result: Result) -> str:
    runs = [_dict(r) for r in _list(result.get("runs"))]
    labels = _run_labels(runs)
    machine, s = _dict(result.get("machine")), _dict(result.get("settings"))
    rows: list[tuple[str, str]] = []
    for label, run in zip(labels, runs, strict=True):
        version = run.get("policy_version")
        rows.append(
            (
                "policy" if len(runs) == 1 else f"policy ({_e(label)})",
                f"<b>{_e(run.get('label', label))}</b>"
                + (f" version <code>{_e(version)}</code>" if version else "")
                + f' <span class="path">{_e(run.get("policy", ""))}</span>',
            )
        )
    if runs:
        rows.append(("cases file", f'<span class="path">{_e(runs[0].get("cases_file", DASH))}</span>'))
        left_out = [str(n) for n in _list(runs[0].get("left_out"))]
        if left_out:
            rows.append(("cases left out", ", ".join(f"<q>{_e(n)}</q>" for n in left_out)))
    rows.append(("agent version", _e(result.get("agent_version", DASH))))
    pinning = machine.get("pinning") or (
        "agent and load generator pinned to separate CPUs"
        if machine.get("pinned")
        else "not pinned: agent and load generator share the CPUs"
    )
    rows.append(
        (
            "machine",
            f"{_e(machine.get('cpu', DASH))}, {_e(machine.get('cpus', DASH))} CPUs,"
            f" kernel {_e(machine.get('kernel', DASH))}, Python {_e(machine.get('python', DASH))}; {_e(pinning)}",
        )
    )
    envoy = s.get("through_envoy")
    rows.append(
        (
            "settings",
            f"fixed rate {fmt_rps(s.get('rate')).removesuffix('.0')} req/s for {fmt_g(s.get('duration_s', DASH))} s; "
            f"saturation {fmt_g(s.get('saturation_duration_s', DASH))} s; "
            f"{_e(s.get('connections', DASH))} connections \u00d7 {_e(s.get('streams', DASH))} streams; "
            f"transport {_e(s.get('transport', DASH))}; generator {_e(s.get('generator', DASH))}; "
            + ("through Envoy (HTTP/2 to Envoy, Envoy asks the agent)" if envoy else "direct gRPC Check to the agent")
            + (
                f"; token cache {fmt_count(s.get('token_cache_entries'))} entries"
                if s.get("token_cache_entries") is not None
                else ""
            )
            + (f"; seed {_e(s['seed'])}" if s.get("seed") is not None else ""),
        )
    )
    rows.append(("command", f"<code>{_e(result.get('command', DASH))}</code>"))
    rows.append(("started", f"{_e(result.get('started', DASH))}, took {fmt_g(result.get('seconds', DASH))} s"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="about" id="about">{body}</table>'


def _headline(result: Result) -> str:
    """The few numbers an SRE looks for first, for the --policy run."""
    runs = _list(result.get("runs"))
    if not runs:
        return ""
    phases = _dict(_dict(runs[0]).get("phases"))
    fixed = _dict(_dict(phases.get("fixed")).get("latency_ms"))
    cards = [(f"{k} at fixed rate", fmt_ms(fixed.get(k)), "ms") for k in ("p50", "p99", "p999")]
    sat = _dict(phases.get("saturation"))
    if sat:
        cards.append(("saturation", fmt_rps(sat.get("rps")), "req/s"))
    added = _dict(phases.get("added_ms"))
    if added:
        cards.append(("p99 added by the agent", fmt_ms(added.get("p99")), "ms"))
    out = "".join(
        f'<div class="card"><div class="k">{k.replace("p999", "p99.9")}</div> '
        f'<div class="v">{v}<span class="u"> {u}</span></div></div>'
        for k, v, u in cards
    )
    return f'<div class="cards" id="headline">{out}</div>'


# --- tables -----------------------------------------------------------------------------------------------------


def _latency_cells(latency: Mapping[str, Any]) -> str:
    return "".join(f'<td class="num">{fmt_ms(latency.get(k))}</td>' for k, _ in PERCENTILES)


LATENCY_HEADS = "".join(f'<th class="num">{h}</th>' for _, h in PERCENTILES)


def _phase_caption(phase: Mapping[str, Any]) -> str:
    rate = _num(phase.get("rate"))
    what = f"{fmt_rps(rate).removesuffix('.0')} req/s offered" if rate else "closed loop"
    if phase.get("connections") is not None:
        what += f", {_e(phase.get('connections'))} connections \u00d7 {_e(phase.get('streams', DASH))} streams"
    early = f'; <span class="warn">ended early: {_e(phase["ran_out"])}</span>' if phase.get("ran_out") else ""
    return (
        f"{what} for {fmt_g(phase.get('seconds', DASH))} s to {_e(phase.get('target', DASH))}: "
        f"sent {fmt_count(phase.get('sent'))}, completed {fmt_count(phase.get('completed'))} "
        f"({fmt_rps(phase.get('rps'))} req/s){early}"
    )


def _case_table(phase: Mapping[str, Any], extra: str = "", table_id: str = "") -> str:
    """One phase: a row per case, the overall row, and any rows `extra` adds (Envoy alone, added)."""
    head = (
        '<tr><th class="num">#</th><th>case</th><th class="num">line</th><th class="num">weight</th>'
        '<th class="num">expect</th><th>answers</th><th class="num">count</th><th class="num">mismatches</th>'
        f'<th class="num">errors</th>{LATENCY_HEADS}</tr>'
    )
    rows = []
    totals: dict[str, float] = {}
    for i, case in enumerate(_list(phase.get("cases")), 1):
        c = _dict(case)
        for k, n in _dict(c.get("outcomes")).items():
            totals[str(k)] = totals.get(str(k), 0) + (_num(n) or 0)
        bad = (_num(c.get("mismatches")) or 0) + (_num(c.get("errors")) or 0) > 0
        rows.append(
            f'<tr class="case{" badrow" if bad else ""}"><td class="num">{i}</td>'
            f'<td class="name">{_e(c.get("name", "?"))}</td>'
            f'<td class="num">{_e(c.get("line", DASH))}</td><td class="num">{fmt_g(c.get("weight", DASH))}</td>'
            f'<td class="num">{_e(c.get("expect_status", DASH))}</td><td>{_answers(c.get("outcomes"))}</td>'
            f"{_count_cell(c.get('count'))}{_count_cell(c.get('mismatches'), True)}"
            f"{_count_cell(c.get('errors'), True)}{_latency_cells(_dict(c.get('latency_ms')))}</tr>"
        )
    latency = _dict(phase.get("latency_ms"))
    rows.append(
        f'<tr class="overall"><td></td><td class="name">overall</td><td></td><td></td><td></td>'
        f"<td>{_answers(totals)}</td>{_count_cell(latency.get('count', phase.get('completed')))}"
        f"{_count_cell(phase.get('mismatches'), True)}{_count_cell(phase.get('errors'), True)}"
        f"{_latency_cells(latency)}</tr>"
    )
    ident = f' id="{table_id}"' if table_id else ""
    return (
        f'<div class="scroll"><table class="grid"{ident}><thead>{head}</thead>'
        f"<tbody>{''.join(rows)}{extra}</tbody></table></div>"
    )


def _envoy_rows(phases: Mapping[str, Any]) -> str:
    """With --through-envoy: Envoy alone at the same rate, and the difference the agent makes."""
    envoy = _dict(phases.get("envoy_fixed"))
    if not envoy:
        return ""
    latency = _dict(envoy.get("latency_ms"))
    added = dict(_dict(phases.get("added_ms")))
    agent = _dict(_dict(phases.get("fixed")).get("latency_ms"))
    if "mean" not in added and _num(agent.get("mean")) is not None and _num(latency.get("mean")) is not None:
        added["mean"] = float(agent["mean"]) - float(latency["mean"])  # the same difference, for the mean
    return (
        '<tr class="envoy"><td></td><td class="name">Envoy alone (no agent)</td><td></td><td></td><td></td><td></td>'
        f"{_count_cell(latency.get('count', envoy.get('completed')))}{_count_cell(envoy.get('mismatches'), True)}"
        f"{_count_cell(envoy.get('errors'), True)}{_latency_cells(latency)}</tr>"
        '<tr class="added"><td></td><td class="name">added by the agent</td>'
        f'<td colspan="7" class="hint">overall minus Envoy alone, per percentile (below zero: within the noise)</td>'
        f"{_latency_cells(added)}</tr>"
    )


def _fixed_section(result: Result) -> str:
    runs = [_dict(r) for r in _list(result.get("runs"))]
    out = []
    for i, (label, run) in enumerate(zip(_run_labels(runs), runs, strict=True)):
        phases = _dict(run.get("phases"))
        fixed = _dict(phases.get("fixed"))
        if not fixed:
            continue
        title = f"<h3>{_e(label)}</h3>" if len(runs) > 1 else ""
        out.append(
            f'{title}<p class="caption">{_phase_caption(fixed)}</p>'
            + _case_table(fixed, _envoy_rows(phases), table_id=f"fixed-{i + 1}")
        )
    if not out:
        return ""
    return (
        '<section id="fixed"><h2>Fixed rate: latency per case (ms)</h2>'
        '<p class="hint">Open loop at the offered rate; each latency runs from the moment its request was due, so '
        "time spent queued behind a slow answer counts (no coordinated omission). Errors (resets, bad replies, "
        "timeouts) are counted, never measured as latencies.</p>" + "".join(out) + "</section>"
    )


def _saturation_section(result: Result) -> str:
    runs = [_dict(r) for r in _list(result.get("runs"))]
    head = (
        '<tr><th>run (target)</th><th class="num">conns \u00d7 streams</th><th class="num">seconds</th>'
        '<th class="num">completed</th><th class="num">req/s</th><th class="num">mismatches</th>'
        f'<th class="num">errors</th>{LATENCY_HEADS}</tr>'
    )
    rows, details = [], []
    labels = _run_labels(runs)
    for i, (label, run) in enumerate(zip(labels, runs, strict=True)):
        phases = _dict(run.get("phases"))
        for key, name in (("saturation", label), ("envoy_saturation", "Envoy alone (no agent)")):
            p = _dict(phases.get(key))
            if not p or (key == "envoy_saturation" and i > 0):
                continue  # Envoy alone is the same measurement for both runs of --compare: shown once
            rows.append(
                f'<tr class="{"envoy" if key.startswith("envoy") else "run"}"><td class="name">{_e(name)}'
                f' <span class="hint">({_e(p.get("target", DASH))})</span></td>'
                f'<td class="num">{_e(p.get("connections", DASH))} \u00d7 {_e(p.get("streams", DASH))}</td>'
                f'<td class="num">{fmt_g(p.get("seconds", DASH))}</td>{_count_cell(p.get("completed"))}'
                f'<td class="num strong">{fmt_rps(p.get("rps"))}</td>{_count_cell(p.get("mismatches"), True)}'
                f"{_count_cell(p.get('errors'), True)}{_latency_cells(_dict(p.get('latency_ms')))}</tr>"
            )
        sat = _dict(phases.get("saturation"))
        if sat.get("ran_out"):
            details.append(f'<p class="warn">{_e(label)}: ended early: {_e(sat["ran_out"])}</p>')
        if sat.get("cases"):
            details.append(
                f"<details><summary>per case, {_e(label)}</summary>"
                f"{_case_table(sat, table_id=f'saturation-cases-{i + 1}')}</details>"
            )
    if not rows:
        return ""
    return (
        '<section id="saturation"><h2>Saturation: the highest rate sustained</h2>'
        '<p class="hint">Closed loop: every stream slot kept busy; req/s = completed / elapsed. Latencies here run '
        "from the actual send and include queueing inside the agent at full load.</p>"
        f'<div class="scroll"><table class="grid" id="saturation-table"><thead>{head}</thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>{''.join(details)}</section>"
    )


def _compare_section(result: Result) -> str:
    runs = [_dict(r) for r in _list(result.get("runs"))]
    if len(runs) < 2:
        return ""
    labels = _run_labels(runs)
    a, b = (_dict(r.get("phases")) for r in runs[:2])
    given = _dict(result.get("compare"))
    head = (
        '<tr><th>case</th><th>run</th><th class="num">count</th><th class="num">mismatches</th>'
        f'<th class="num">errors</th>{LATENCY_HEADS}</tr>'
    )

    def group(name: str, x: Mapping[str, Any], y: Mapping[str, Any], pct: Mapping[str, Any] | None) -> str:
        lx, ly = _dict(x.get("latency_ms")), _dict(y.get("latency_ms"))
        bad = any((_num(c.get("mismatches")) or 0) + (_num(c.get("errors")) or 0) > 0 for c in (x, y))
        rows = []
        for i, (label, c, lat) in enumerate(((labels[0], x, lx), (labels[1], y, ly))):
            first = f'<td rowspan="3" class="name">{_e(name)}</td>' if i == 0 else ""
            rows.append(
                f'<tr class="{"badrow" if bad else ""}">{first}<td class="run">{_e(label)}</td>'
                f"{_count_cell(lat.get('count', c.get('count')))}{_count_cell(c.get('mismatches'), True)}"
                f"{_count_cell(c.get('errors'), True)}{_latency_cells(lat)}</tr>"
            )
        cells = "".join(
            _pct_cell(_num(pct.get(k)) if pct and k in pct else change_pct(lx.get(k), ly.get(k)))
            for k, _ in PERCENTILES
        )
        rows.append(f'<tr class="change"><td class="run">change (+ is slower)</td><td colspan="3"></td>{cells}</tr>')
        return "".join(rows)

    fa, fb = _dict(a.get("fixed")), _dict(b.get("fixed"))
    body = [group("overall", fa, fb, _dict(given.get("latency_pct")) or None)]
    cases_b = [_dict(c) for c in _list(fb.get("cases"))]
    by_key = {(c.get("name"), c.get("line")): c for c in cases_b}
    for i, case in enumerate(_list(fa.get("cases"))):
        ca = _dict(case)
        cb = by_key.get((ca.get("name"), ca.get("line"))) or (cases_b[i] if i < len(cases_b) else {})
        body.append(group(str(ca.get("name", "?")), ca, cb, None))
    sa, sb = _dict(a.get("saturation")), _dict(b.get("saturation"))
    sat = ""
    if sa or sb:
        rps_pct = _num(given.get("rps_pct"))
        if rps_pct is None:
            rps_pct = change_pct(sa.get("rps"), sb.get("rps"))
        sat = (
            '<table class="grid narrow" id="compare-saturation"><thead><tr><th>saturation</th>'
            f'<th class="num">{_e(labels[0])}</th><th class="num">{_e(labels[1])}</th><th class="num">change</th>'
            f'</tr></thead><tbody><tr><td>req/s (+ is faster)</td><td class="num">{fmt_rps(sa.get("rps"))}</td>'
            f'<td class="num">{fmt_rps(sb.get("rps"))}</td>{_pct_cell(rps_pct, higher_is_better=True)}</tr>'
            "</tbody></table>"
        )
    return (
        f'<section id="compare"><h2>Compare: {_e(labels[1])} against {_e(labels[0])}</h2>'
        '<p class="hint">The same cases and settings, one run after the other. Change = (second \u2212 first) / first,'
        f" always signed: for latency + is slower (red), for req/s + is faster (green). Changes under"
        f" {SAME_PCT:g}% are within noise and left uncoloured.</p>"
        f'{sat}<div class="scroll"><table class="grid" id="compare-table"><thead>{head}</thead>'
        f"<tbody>{''.join(body)}</tbody></table></div></section>"
    )


# --- charts -----------------------------------------------------------------------------------------------------


class _Series:
    """One line in a chart: a phase of one run (or of Envoy alone) with its colour and dash."""

    def __init__(self, label: str, phase: Mapping[str, Any], colour: str, dashed: bool) -> None:
        self.label, self.phase, self.colour, self.dashed = label, phase, colour, dashed

    @property
    def style(self) -> str:
        return "--" if self.dashed else "-"

    def histogram(self) -> list[tuple[float, float]]:
        out = []
        for bucket in _list(self.phase.get("histogram")):
            pair = _list(bucket)
            if len(pair) == 2:
                upper, n = _num(pair[0]), _num(pair[1])
                if upper is not None and upper > 0 and n is not None and n > 0:
                    out.append((upper, n))
        return sorted(out)


def _series(result: Result, key: str) -> list[_Series]:
    """The --policy run, the --compare run and Envoy alone, for phase `key` ("fixed" or "saturation")."""
    runs = [_dict(r) for r in _list(result.get("runs"))]
    out = []
    for i, (label, run) in enumerate(zip(_run_labels(runs), runs, strict=True)):
        phase = _dict(_dict(run.get("phases")).get(key))
        if phase:
            out.append(_Series(label, phase, RUN_COLOURS[i % len(RUN_COLOURS)], False))
    if runs:
        envoy = _dict(_dict(runs[0].get("phases")).get(f"envoy_{key}"))
        if envoy:
            out.append(_Series("Envoy alone", envoy, ENVOY_COLOUR, False))
    return out


def _log_axis(ax: Axes, axis: str) -> None:
    """A log axis labelled in plain numbers at 1-2-5 steps (0.1, 0.2, 0.5, 1, ...), not 10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _svg(fig: Figure, name: str) -> str:
    """The figure as an <svg> element to inline: no XML prolog, DOCTYPE, metadata or namespace URLs (HTML needs
    none), and every id (glyphs, markers, clip paths) and reference to one prefixed with the chart's name, so that
    the charts' ids stay apart on one page."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text, count=2)
    text = re.sub(r'\s(width|height)="[0-9.]+pt"', "", text, count=2)  # sized by the page's CSS, viewBox kept
    text = re.sub(r'(\bid="|href="#|url\(#)([^")]+)', lambda m: f"{m[1]}{name}-{m[2]}", text)
    return text.replace("<svg", f'<svg role="img" aria-labelledby="{name}-title" class="chart"', 1)


def _chart(name: str, draw: Any, *args: Any) -> str:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(CHART_RC):
        matplotlib.rcParams["svg.hashsalt"] = name  # ids from the chart's name: the same result, the same page
        fig = Figure(layout="constrained")
        draw(fig, *args)
        return _svg(fig, name)


def _draw_cases(fig: Figure, result: Result) -> None:
    """Per case (and overall, and Envoy alone): p50 to p99 as a bar, on to max as a thin line, a mark at each
    percentile; with --compare the two runs one above the other in their colours."""
    runs = [_dict(r) for r in _list(result.get("runs"))][:2]
    labels = _run_labels(runs)
    fixed = [_dict(_dict(r.get("phases")).get("fixed")) for r in runs]
    by_name = [{str(_dict(c).get("name", "?")): _dict(c) for c in _list(f.get("cases"))} for f in fixed]
    # (label, bold, red, [(colour, latency)] one per bar drawn in the row)
    rows: list[tuple[str, bool, bool, list[tuple[str, Mapping[str, Any]]]]] = [
        ("overall", True, False, [(RUN_COLOURS[i], _dict(f.get("latency_ms"))) for i, f in enumerate(fixed)])
    ]
    envoy = _dict(_dict(runs[0].get("phases")).get("envoy_fixed")) if runs else {}
    if envoy:
        rows.append(("Envoy alone (no agent)", True, False, [(ENVOY_COLOUR, _dict(envoy.get("latency_ms")))]))
    for c in _list(fixed[0].get("cases")) if fixed else []:
        name = str(_dict(c).get("name", "?"))
        cases = [names.get(name, {}) for names in by_name]
        bad = any((_num(x.get("mismatches")) or 0) + (_num(x.get("errors")) or 0) > 0 for x in cases)
        rows.append((name, False, bad, [(RUN_COLOURS[i], _dict(x.get("latency_ms"))) for i, x in enumerate(cases)]))
    fig.set_size_inches(11.5, 1.2 + len(rows) * (0.42 if len(runs) > 1 else 0.3))
    ax = fig.add_subplot()
    marks = (("p50", "o", "p50"), ("p90", "|", "p90"), ("p99", "D", "p99"), ("p999", "^", "p99.9"), ("max", "x", "max"))
    for row, (_, bold, _, bars) in enumerate(rows):
        offsets = [0.0] if len(bars) == 1 else [-0.18, 0.18]
        for (colour, lat), offset in zip(bars, offsets, strict=False):
            y = row + offset
            p50, p99, top = _num(lat.get("p50")), _num(lat.get("p99")), _num(lat.get("max"))
            if p50 is None or p50 <= 0:
                continue
            if top is not None:
                ax.plot([p50, top], [y, y], color=colour, lw=1.2, alpha=0.55, solid_capstyle="butt")
            if p99 is not None:
                ax.plot([p50, p99], [y, y], color=colour, lw=8 if bold else 6, alpha=0.35, solid_capstyle="butt")
            for key, marker, _ in marks:
                v = _num(lat.get(key))
                if v is not None and v > 0:
                    ax.plot([v], [y], marker=marker, color=colour, ms=5.5, mew=1.4, ls="none")
    if len(runs) > 1:
        for i, label in enumerate(labels):
            ax.plot([], [], color=RUN_COLOURS[i], lw=6, alpha=0.6, label=label)
    for _key, marker, text in marks:
        ax.plot([], [], marker=marker, color="#333333", ls="none", ms=5.5, label=text)
    ax.set_yticks(range(len(rows)), [_short(name) for name, _, _, _ in rows])
    for tick, (_, bold, bad, _) in zip(ax.get_yticklabels(), rows, strict=True):
        if bad:
            tick.set_color("#b3261e")
        if bold:
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    _log_axis(ax, "x")
    ax.grid(axis="y", visible=False)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_title("Latency per case at fixed rate: bar p50\u2013p99, line to max")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=1.6)


def _percentile_x(p: float, count: float) -> float:
    """HdrHistogram's percentile axis: 1/(1-p), so 90%, 99%, 99.9% are equally spaced; the last request at 1/count."""
    return min(1.0 / (1.0 - p), count) if p < 1 else count


def _draw_distribution(fig: Figure, result: Result) -> None:
    """Left: latency by percentile (from the histogram, exact percentiles marked); right: the histogram itself."""
    fig.set_size_inches(11.5, 5.0)
    left, right = fig.subplots(1, 2)
    xmax = 10.0
    series = [(s, False) for s in _series(result, "fixed")] + [(s, True) for s in _series(result, "saturation")]
    buckets = [b for s, _ in series for b in s.histogram()]
    per_decade = _per_decade([u for u, _ in buckets])
    for s, saturation in series:
        hist = s.histogram()
        total = sum(n for _, n in hist)
        if not total:
            continue
        name = f"{s.label} \u00b7 {'saturation' if saturation else 'fixed rate'}"
        style = "--" if saturation else "-"
        xs, ys, seen = [], [], 0.0
        for upper, n in hist:
            xs += [_percentile_x(seen / total, total), _percentile_x((seen + n) / total, total)]
            ys += [upper, upper]
            seen += n
        xmax = max(xmax, total)
        left.plot(xs, ys, color=s.colour, ls=style, lw=1.8, label=name, alpha=0.8 if saturation else 1.0)
        lat = _dict(s.phase.get("latency_ms"))
        points = [(_percentile_x(p, total), _num(lat.get(k))) for k, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))]
        points += [(_percentile_x(0.999, total), _num(lat.get("p999"))), (total, _num(lat.get("max")))]
        px = [x for x, v in points if v is not None and v > 0]
        py = [v for _, v in points if v is not None and v > 0]
        left.plot(px, py, ls="none", marker="o", ms=4.5, mfc="white", mec=s.colour, mew=1.4)
        edges, shares = _stairs(hist, total, per_decade)
        right.stairs(shares, edges, color=s.colour, ls=style, lw=1.6, label=name, alpha=0.8 if saturation else 1.0)
    left.set_xscale("log")
    ticks = [(1.0, "0%"), (2.0, "50%"), (10.0, "90%")]
    ticks += [(10.0**k, f"{100 - 100 / 10**k:.{k - 2}f}%") for k in range(2, 7) if 10.0**k <= xmax]
    left.set_xticks([t for t, _ in ticks], [t for _, t in ticks])
    left.xaxis.set_minor_formatter(_null_formatter())
    left.set_xlim(1, xmax)
    _log_axis(left, "y")
    left.set_xlabel("percentile (log scale of 1/(1\u2212p))")
    left.set_ylabel("latency (ms, log scale)")
    left.set_title("Latency by percentile (circles: exact p50 p90 p99 p99.9 max)")
    _log_axis(right, "x")
    right.set_xlabel("latency (ms, log scale)")
    right.set_ylabel("share of requests per bucket (%)")
    right.set_ylim(bottom=0)
    right.set_title("Latency distribution")
    handles, names = left.get_legend_handles_labels()
    if handles:  # below both panels: inside, it would hide the curves it names
        fig.legend(handles, names, loc="outside lower center", ncols=min(4, len(handles)))


def _null_formatter() -> Any:
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _per_decade(uppers: list[float]) -> int:
    """The histogram's buckets per decade (the bench writes ~20): from the closest two neighbouring bounds."""
    bounds = sorted(set(uppers))
    steps = sorted({round(math.log10(b / a), 6) for a, b in itertools.pairwise(bounds)})
    if steps and steps[0] > 0:
        guess = round(1 / steps[0])
        if 5 <= guess <= 200:
            return guess
    return 20


def _stairs(hist: list[tuple[float, float]], total: float, per_decade: int) -> tuple[list[float], list[float]]:
    """Bucket shares in percent on a gap-free log grid (empty buckets as zero), with the grid's edges."""
    index = {round(math.log10(u) * per_decade): n for u, n in hist}
    lo, hi = min(index), max(index)
    edges = [10 ** (k / per_decade) for k in range(lo - 1, hi + 1)]
    return edges, [index.get(k, 0) / total * 100.0 for k in range(lo, hi + 1)]


def _per_second(phase: Mapping[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """The timeline as (middle of each second, completed per second, p99): the last second of a phase is partial
    (a 5.02 s phase has 0.02 s in its sixth), so its count is divided by the part inside the phase, and a sliver
    under a fifth of a second, too short to mean anything, is left out rather than drawn as a collapse."""
    length = _num(phase.get("seconds"))
    xs, rates, p99 = [], [], []
    for point in _list(phase.get("timeline")):
        p = _list(point)
        t, n = (_num(p[0]), _num(p[1])) if len(p) >= 3 else (None, None)
        if t is None or n is None:
            continue
        span = 1.0 if length is None else min(1.0, length - t)
        if span < 0.2:
            continue
        xs.append(t + span / 2)
        rates.append(n / span)
        q = _num(p[2])
        p99.append(math.nan if q is None else q)
    return xs, rates, p99


def _draw_timeline(fig: Figure, result: Result) -> None:
    """Completed requests and p99 in each second, fixed rate and saturation side by side."""
    from matplotlib.ticker import MaxNLocator

    phases = [k for k in ("fixed", "saturation") if _series(result, k)]
    fig.set_size_inches(11.5, 6.2)
    grid = fig.subplots(2, len(phases), sharex="col", squeeze=False)
    rate = _num(_dict(result.get("settings")).get("rate"))
    for col, key in enumerate(phases):
        top, bottom = grid[0][col], grid[1][col]
        for s in _series(result, key):
            xs, rates, p99 = _per_second(s.phase)
            top.plot(xs, rates, color=s.colour, lw=1.8, marker=".", label=s.label)
            bottom.plot(xs, p99, color=s.colour, lw=1.8, marker=".", label=s.label)
        if key == "fixed" and rate:
            top.axhline(rate, color="#999999", ls=":", lw=1.2, label="offered rate")
        top.set_title("Fixed rate" if key == "fixed" else "Saturation (closed loop)")
        top.set_ylabel("completed per second (req/s)")
        top.set_ylim(bottom=0)
        bottom.set_ylabel("p99 in that second (ms)")
        bottom.set_ylim(bottom=0)
        bottom.set_xlabel("seconds since the phase started (each point: one second)")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.legend(loc="lower right")


CAPTIONS = {
    "chart-cases": "Latency per case, fixed rate. Log scale: equal distances are equal ratios (0.1 to 0.2 ms is as "
    "far as 1 to 2 ms). Case names in red had mismatches or errors.",
    "chart-distribution": "Latency of all cases together. Left, HdrHistogram style: how slow the slowest x% were "
    "(read up from 99% for p99); a curve bending up at the right is a tail. Right: how the requests spread; two "
    "humps mean two kinds of requests (e.g. cached and not).",
    "chart-timeline": "Each second of each phase. A fixed-rate line below the offered rate, or a p99 that climbs, "
    "means the agent fell behind; a saturation line that sags means it slowed down under load.",
}


def _charts(result: Result) -> str:
    """The charts that have something to show: a run where every request failed has no latency to draw."""
    if not _series(result, "fixed") and not _series(result, "saturation"):
        return ""
    figures = []
    if any((_num(_dict(s.phase.get("latency_ms")).get("p50")) or 0) > 0 for s in _series(result, "fixed")):
        figures.append(("chart-cases", CAPTIONS["chart-cases"], _chart("chart-cases", _draw_cases, result)))
    if any(s.histogram() for k in ("fixed", "saturation") for s in _series(result, k)):
        figures.append(
            (
                "chart-distribution",
                CAPTIONS["chart-distribution"],
                _chart("chart-distribution", _draw_distribution, result),
            )
        )
    figures.append(("chart-timeline", CAPTIONS["chart-timeline"], _chart("chart-timeline", _draw_timeline, result)))
    body = "".join(
        f'<figure id="{name}">{svg}<figcaption id="{name}-title">{title}</figcaption></figure>'
        for name, title, svg in figures
    )
    return f'<section id="charts"><h2>Charts</h2>{body}</section>'


# --- the page ---------------------------------------------------------------------------------------------------

STYLE = """
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #dadce0; --bad: #b3261e; --badbg: #fce8e6; --good: #137333;
  --goodbg: #e6f4ea; --head: #f1f3f4; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "DejaVu Sans", "Liberation Sans", sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 24px 48px; }
h1 { font-size: 28px; margin: 0 0 2px; } h1 small { font-weight: 400; color: var(--muted); font-size: 18px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 18px 0 4px; }
code, .path { font-family: ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace; font-size: 13px;
  word-break: break-all; }
.path { color: var(--muted); }
.banner { margin: 16px 0; padding: 12px 16px; border-radius: 8px; border: 2px solid; }
.banner.ok { border-color: var(--good); background: var(--goodbg); }
.banner.failed { border-color: var(--bad); background: var(--badbg); }
.banner .verdict { font-weight: 800; font-size: 20px; letter-spacing: .04em; margin-right: 10px; }
.banner.ok .verdict { color: var(--good); } .banner.failed .verdict { color: var(--bad); }
.banner ul { margin: 6px 0 0; padding-left: 22px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0 4px; }
.card { flex: 1 1 160px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .k { color: var(--muted); font-size: 13px; } .card .v { font-size: 24px; font-weight: 700;
  font-variant-numeric: tabular-nums; } .card .u { font-size: 14px; font-weight: 400; color: var(--muted); }
table { border-collapse: collapse; }
table.about { margin: 12px 0; } table.about th { text-align: left; vertical-align: top; padding: 3px 16px 3px 0;
  color: var(--muted); font-weight: 600; white-space: nowrap; } table.about td { padding: 3px 0; }
.scroll { overflow-x: auto; }
table.grid { width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; margin: 6px 0 10px; }
table.grid.narrow { width: auto; }
table.grid th { background: var(--head); text-align: left; padding: 6px 6px; border-bottom: 2px solid var(--line);
  white-space: nowrap; }
table.grid td { padding: 5px 6px; border-bottom: 1px solid var(--line); vertical-align: top; }
table.grid .num { text-align: right; white-space: nowrap; }
table.grid td.name { min-width: 160px; max-width: 320px; overflow-wrap: anywhere; }
tr.overall td { font-weight: 700; border-top: 2px solid #9aa0a6; background: #fafafa; }
tr.envoy td { color: #444; background: #f6f6f6; font-style: italic; }
tr.added td { font-weight: 700; background: #eef3fb; }
tr.change td { border-bottom: 2px solid #9aa0a6; }
tr.badrow td.name { color: var(--bad); font-weight: 600; }
table.grid td.alarm { background: var(--badbg); color: var(--bad); font-weight: 800; font-style: normal; }
table.grid td.worse { color: var(--bad); background: var(--badbg); font-weight: 700; }
table.grid td.better { color: var(--good); background: var(--goodbg); font-weight: 700; }
td.same { color: var(--muted); } td.run { white-space: nowrap; }
td.strong { font-weight: 700; } .hint { color: var(--muted); font-size: 13.5px; }
.warn { color: var(--bad); font-weight: 600; }
p.caption { margin: 4px 0; }
details { margin: 4px 0 10px; } summary { cursor: pointer; color: var(--muted); }
figure { margin: 18px 0 28px; } figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; }
svg.chart { display: block; width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
ul.notes li { margin: 2px 0; }
footer { margin-top: 36px; color: var(--muted); font-size: 13px; border-top: 1px solid var(--line);
  padding-top: 10px; }
"""


def _notes(result: Result) -> str:
    notes = [str(n) for n in _list(result.get("notes"))]
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f'<section id="notes"><h2>Notes</h2><ul class="notes">{items}</ul></section>'


def render_html(result: Result) -> str:
    """The whole report page for one `--json` result (any keys missing are shown as a dash, never guessed)."""
    runs = _list(result.get("runs"))
    first = _dict(runs[0]) if runs else {}
    subtitle = str(first.get("label") or "")
    if first.get("policy_version"):
        subtitle += f" ({first['policy_version']})"
    title = "authz-agent bench" + (f" \u2014 {subtitle}" if subtitle else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>authz-agent bench{f' <small>{_e(subtitle)}</small>' if subtitle else ''}</h1>",
        _banner(result),
        _headline(result),
        _about(result),
        _fixed_section(result),
        _saturation_section(result),
        _compare_section(result),
        _charts(result),
        _notes(result),
        f"<footer>Written by authz-agent {_e(__version__)} from a result of schema "
        f"<code>{_e(result.get('schema', DASH))}</code>. Latencies in milliseconds. Only the status of each answer "
        "is checked under load (headers, reasons and routes are what <code>authz-agent policy test</code> checks)."
        "</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
