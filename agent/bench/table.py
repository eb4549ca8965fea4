"""The terminal table of a bench result, read from the same dict `--json` writes (so the two never disagree)."""

from __future__ import annotations

from typing import Any

from agent.policytest.report import printable

COLUMNS = ("p50", "p90", "p99", "p999", "max")
HEAD = ("p50", "p90", "p99", "p99.9", "max")
NAME_WIDTH = 44
# The generator's outcomes that are not answers (agent._loadgen): said in words, with the code the JSON has.
ERRORS = {"-1": "a reset or failed connection (-1)", "-2": "a bad reply (-2)", "-3": "no answer in time (-3)"}


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _name(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)  # a case name cannot move the cursor
    return text if len(text) <= NAME_WIDTH else text[: NAME_WIDTH - 1] + "~"


def _first(text: str) -> str:
    """A name that starts a row: a line starting "::" in a GitHub Actions log is a command to the runner."""
    return text.replace(":", "\\x3a", 1) if text.lstrip().startswith("::") else text


def _row(name: str, weight: str, expect: str, count: Any, mismatches: Any, errors: Any, lat: dict[str, Any]) -> str:
    cells = " ".join(f"{_ms(lat.get(k)):>8}" for k in COLUMNS)
    first = _first(_name(name))
    return f"{first:<{NAME_WIDTH}} {weight:>6} {expect:>6} {count!s:>8} {mismatches!s:>6} {errors!s:>6} {cells}"


def header() -> str:
    cells = " ".join(f"{h:>8}" for h in HEAD)
    return f"{'':<{NAME_WIDTH}} {'weight':>6} {'expect':>6} {'count':>8} {'mism.':>6} {'errors':>6} {cells}  (ms)"


def _weight(w: float) -> str:
    return f"{w:g}"


def phase_lines(title: str, p: dict[str, Any], per_case: bool) -> list[str]:
    rate = f"at {p['rate']:g}/s" if p.get("rate") else f"closed loop, {p.get('connections')}x{p.get('streams')} streams"
    lines = [
        f"{title} ({p['target']}, {rate}): {p['completed']} answered of {p.get('due', p['sent'])} "
        f"{'due' if 'due' in p else 'sent'} in {p['seconds']:.2f} s = {p['rps']:.1f}/s, "
        f"{p['mismatches']} mismatches, {p['errors']} errors"
    ]
    if p.get("ran_out"):
        lines.append(f"  ended early: {p['ran_out']}")
    if per_case:
        lines.append(header())
        for c in p["cases"]:
            lines.append(_row(c["name"], _weight(c["weight"]), str(c["expect_status"]), c["count"], c["mismatches"],
                              c["errors"], c["latency_ms"]))  # fmt: skip
    lines.append(_row("overall", "", "", p["latency_ms"]["count"], p["mismatches"], p["errors"], p["latency_ms"]))
    return lines


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:+.1f}%"


def lines(result: dict[str, Any]) -> list[str]:
    out: list[str] = []
    s = result["settings"]
    m = result["machine"]
    out.append(f"authz-agent bench {result['agent_version']}: {s['transport']} transport, {s['generator']} load "
               f"generator, {s['connections']} connections x {s['streams']} streams; {m['cpus']} CPUs "
               f"({m['cpu']}), {m['pinning']}")  # fmt: skip
    for run in result["runs"]:
        out.append("")
        out.append(f"== {run['label']} ({run['policy_version']}), cases {run['cases_file']}")
        phases = run["phases"]
        titles = (("fixed", "fixed rate"), ("saturation", "saturation"), ("envoy_fixed", "Envoy alone, fixed rate"),
                  ("envoy_saturation", "Envoy alone, saturation"))  # fmt: skip
        for key, title in titles:
            if key in phases:
                out.append("")
                out += phase_lines(title, phases[key], per_case=key == "fixed")
        if "added_ms" in phases:
            out.append(_row("added by the agent (fixed rate)", "", "", "", "", "", phases["added_ms"]))
    compare = result.get("compare")
    if compare:
        first, second = result["runs"][0], result["runs"][1]
        out.append("")
        out.append(f"== {second['label']} against {first['label']} (fixed rate, overall; saturation rps)")
        out.append(header())
        for run in (first, second):
            fixed = run["phases"]["fixed"]
            out.append(_row(run["label"], "", "", fixed["latency_ms"]["count"], fixed["mismatches"], fixed["errors"],
                            fixed["latency_ms"]))  # fmt: skip
        cells = " ".join(f"{_pct(compare['latency_pct'].get(k)):>8}" for k in COLUMNS)
        out.append(f"{'change':<{NAME_WIDTH}} {'':>6} {'':>6} {'':>8} {'':>6} {'':>6} {cells}")
        sat = [r["phases"].get("saturation") for r in (first, second)]
        if sat[0] and sat[1]:
            out.append(f"saturation: {sat[0]['rps']:.1f}/s -> {sat[1]['rps']:.1f}/s ({_pct(compare['rps_pct'])})")
    bad = [(run["label"], key, c) for run in result["runs"] for key, p in run["phases"].items()
           if isinstance(p, dict) and "cases" in p for c in p["cases"] if c["mismatches"] or c["errors"]]  # fmt: skip
    if bad:
        out.append("")
        out.append("!! WRONG ANSWERS OR ERRORS: a benchmark of wrong answers is not a benchmark")
        for label, key, c in bad:
            got = ", ".join(
                f"{ERRORS.get(o, o)} x{n}" for o, n in c["outcomes"].items() if o != str(c["expect_status"])
            )
            out.append(f"!! {label} {key}: case {_name(c['name'])!r} (line {c['line']}) expected {c['expect_status']}, "
                       f"got {got}")  # fmt: skip
    for f in result.get("fail_if", []):
        verdict = "VIOLATED" if f["violated"] else "ok"
        unit = "/s" if f["expr"].strip().startswith("rps") else " ms"
        measured = "nothing" if f["measured"] is None else f"{f['measured']:g}{unit}"
        out.append(f"--fail-if {f['expr']!r}: measured {measured}: {verdict}")
    if result.get("notes"):
        out.append("")
        out += [f"note: {n}" for n in result["notes"]]
    out.append("")
    out.append("OK" if result["ok"] else "FAILED")
    # Labels, the policy's version (its `service:`), paths and notes are users' text too: none may move the cursor.
    return [printable(piece) for line in out for piece in line.split("\n")]
