"""The bench report as an SRE sees it: opened from disk (file://) in headless Chromium (Debian's `chromium`,
driven by Playwright), it loads nothing else, the tables show the result's cases and numbers, and the charts are
drawn (non-empty boxes whose pixels hold the runs' colours, not one flat colour)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from agent.bench.report import ENVOY_COLOUR, RUN_COLOURS, render_html
from agent.policytest.report import printable
from tests.bench_results import CASES, HOSTILE, make_result

ROOT = Path(__file__).parent.parent.parent
WIDTH = 1200  # the report must read well at this width
LATENCY_KEYS = ("p50", "p90", "p99", "p999", "max", "mean")


def chromium_path() -> str:
    """Debian's chromium; installed here when missing and apt can (as `make test` does), else the test skips."""
    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=300, check=False)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("no chromium and it cannot be installed here: `apt-get install chromium` (make test does)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    with sync_playwright() as p:
        # Playwright's own browser download needs the network; the system binary is the one users have.
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            yield b
        finally:
            b.close()


class Opened:
    """A report file opened in a fresh page, with everything the page asked the network for or complained of."""

    def __init__(self, browser: Browser, path: Path) -> None:
        self.requests: list[str] = []
        self.console: list[str] = []
        self.dialogs: list[str] = []
        self.context = browser.new_context(viewport={"width": WIDTH, "height": 900}, device_scale_factor=1)
        self.page: Page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(path.as_uri(), wait_until="load")
        self.url = path.as_uri()

    def rows(self, selector: str) -> list[list[str]]:
        return self.page.eval_on_selector_all(
            f"{selector} tbody tr", "rows => rows.map(r => Array.from(r.cells, c => c.innerText.trim()))"
        )

    def row(self, selector: str, name: str) -> list[str]:
        found = [r for r in self.rows(selector) if name in r[:3]]
        assert found, f"no row {name!r} in {selector}"
        return found[0]

    def screenshot(self, path: Path) -> Image.Image:
        self.page.screenshot(path=str(path), full_page=True)
        return Image.open(path).convert("RGB")

    def charts(self) -> list[tuple[str, list[float]]]:
        """Each chart's name and its box on the page (x, y, width, height) from the top of the document."""
        return self.page.eval_on_selector_all(
            "svg.chart",
            "els => els.map(e => { const r = e.getBoundingClientRect();"
            " return [e.getAttribute('aria-labelledby'), [r.x + scrollX, r.y + scrollY, r.width, r.height]]; })",
        )

    def close(self) -> None:
        self.context.close()


def open_report(browser: Browser, tmp_path: Path, result: dict[str, Any], name: str) -> Opened:
    path = tmp_path / f"{name}.html"
    path.write_text(render_html(result), encoding="utf-8")
    return Opened(browser, path)


def pixels(shot: Image.Image, box: list[float]) -> np.ndarray:
    """The RGB pixels of `box` (x, y, width, height) of the screenshot, one row each."""
    x, y, w, h = box
    return np.asarray(shot.crop((int(x), int(y), int(x + w), int(y + h)))).reshape(-1, 3).astype(int)


def near(px: np.ndarray, colour: str, tolerance: int = 60) -> int:
    """How many of `px` are within `tolerance` (sum of channel differences) of `colour` (#rrggbb)."""
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(px - target).sum(axis=1) <= tolerance).sum())


def check_drawn(shot: Image.Image, opened: Opened, colours: tuple[str, ...]) -> None:
    """Three charts, each a readable size, each holding many colours and the lines of every run in `colours`."""
    charts = opened.charts()
    assert [n for n, _ in charts] == ["chart-cases-title", "chart-distribution-title", "chart-timeline-title"]
    for name, box in charts:
        assert box[2] >= 1000 and box[3] >= 250, (name, box)
        px = pixels(shot, box)
        distinct = len(np.unique(px, axis=0))
        assert distinct > 50, f"{name}: {distinct} colours - not drawn"
        inked = int((px.sum(axis=1) < 600).sum())
        assert inked > 0.01 * len(px), f"{name}: almost blank ({inked} of {len(px)} pixels)"
        for colour in colours:
            assert near(px, colour) > 100, f"{name}: {near(px, colour)} pixels of {colour}"


def test_plain_report_in_chromium(browser: Browser, tmp_path: Path) -> None:
    result = make_result()
    opened = open_report(browser, tmp_path, result, "plain")
    try:
        fixed = result["runs"][0]["phases"]["fixed"]
        assert opened.page.title() == "authz-agent bench \u2014 policy.yaml (sha256:3f9a1c2e)"
        assert opened.page.inner_text("#verdict").startswith("OK")
        for case in fixed["cases"]:
            cells = opened.row("#fixed-1", case["name"])
            assert cells[-6:] == [f"{case['latency_ms'][k]:.3f}" for k in LATENCY_KEYS]
            assert cells[6] == f"{case['count']:,}" and cells[7] == "0"
        overall = opened.row("#fixed-1", "overall")
        assert overall[-6:] == [f"{fixed['latency_ms'][k]:.3f}" for k in LATENCY_KEYS]
        sat = result["runs"][0]["phases"]["saturation"]
        assert f"{sat['rps']:,.1f}" in opened.page.inner_text("#saturation-table")
        about = opened.page.inner_text("#about")
        assert result["command"] in about and "Xeon" in about and "sha256:3f9a1c2e" in about
        shot = opened.screenshot(tmp_path / "plain.png")
        assert shot.width == WIDTH
        check_drawn(shot, opened, RUN_COLOURS[:1])
        assert opened.requests == [opened.url], "the page fetched something"
        assert opened.console == [] and opened.dialogs == []
    finally:
        opened.close()


def test_compare_through_envoy_in_chromium(browser: Browser, tmp_path: Path) -> None:
    result = make_result(envoy=True, compare=True, fail_if=(("p99 > 2ms", 1.069, False), ("p50 > 100us", 0.308, True)))
    opened = open_report(browser, tmp_path, result, "compare")
    try:
        verdict = opened.page.inner_text("#verdict")
        assert verdict.startswith("FAILED") and "p50 > 100us: measured 0.308 ms, violated" in verdict
        phases = result["runs"][0]["phases"]
        added = opened.row("#fixed-1", "added by the agent")
        assert added[-6:-1] == [f"{phases['added_ms'][k]:.3f}" for k in LATENCY_KEYS[:-1]]
        alone = opened.row("#fixed-1", "Envoy alone (no agent)")
        assert alone[-6:] == [f"{phases['envoy_fixed']['latency_ms'][k]:.3f}" for k in LATENCY_KEYS]
        rows = opened.rows("#compare-table")
        change = rows[2]
        assert change[0] == "change (+ is slower)"
        assert change[-6:] == [f"{result['compare']['latency_pct'][k]:+.1f}%" for k in LATENCY_KEYS]
        # worse in red, better in green: the computed colour of the change cells
        colours = opened.page.eval_on_selector_all(
            "#compare-table tr.change td.worse, #compare-table tr.change td.better",
            "els => els.map(e => [e.className, getComputedStyle(e).color])",
        )
        assert {c for cls, c in colours if "worse" in cls} == {"rgb(179, 38, 30)"}
        assert {c for cls, c in colours if "better" in cls} <= {"rgb(19, 115, 51)"}
        mismatch = opened.page.eval_on_selector_all(
            "#fixed-2 td.alarm", "els => els.map(e => [e.innerText, getComputedStyle(e).backgroundColor])"
        )
        assert mismatch and all(bg == "rgb(252, 232, 230)" for _, bg in mismatch)
        shot = opened.screenshot(tmp_path / "compare.png")
        check_drawn(shot, opened, RUN_COLOURS)
        # Envoy alone is drawn in the distribution and timeline charts
        charts = dict(opened.charts())
        assert near(pixels(shot, charts["chart-timeline-title"]), ENVOY_COLOUR, 20) > 100
        assert opened.requests == [opened.url] and opened.console == [] and opened.dialogs == []
    finally:
        opened.close()


def test_hostile_names_are_text_in_chromium(browser: Browser, tmp_path: Path) -> None:
    result = make_result(hostile=True, wrong=CASES[1][0], errors=3)
    opened = open_report(browser, tmp_path, result, "hostile")
    try:
        assert opened.page.locator("script, img, iframe, object, embed").count() == 0
        cells = opened.row("#fixed-1", printable(HOSTILE))
        assert cells[1] == printable(HOSTILE)
        assert "<img src=https://evil.example/x.png>" in opened.page.inner_text("#about")
        shot = opened.screenshot(tmp_path / "hostile.png")
        check_drawn(shot, opened, RUN_COLOURS[:1])
        assert opened.requests == [opened.url], "a hostile name made the page fetch"
        assert opened.dialogs == [] and opened.console == []
    finally:
        opened.close()


def test_a_real_bench_run_in_chromium(browser: Browser, tmp_path: Path) -> None:
    """`authz-agent bench` on the demo policy and its cases, for real (agent child, load generator): the page shows
    that run's numbers, as its own JSON has them."""
    out_html, out_json = tmp_path / "out.html", tmp_path / "out.json"
    command = ["bench", "--policy", "agent/demo/policy.yaml", "--cases", "agent/demo/policy.test.yaml",
               "--duration", "1", "--rate", "200", "--report", str(out_html), "--json", str(out_json)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "agent", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out_json.read_text())
    opened = Opened(browser, out_html)
    try:
        assert opened.page.inner_text("#verdict").startswith("OK")
        fixed = result["runs"][0]["phases"]["fixed"]
        assert len(fixed["cases"]) == 17
        for case in fixed["cases"]:
            cells = opened.row("#fixed-1", case["name"])
            assert cells[2:5] == [str(case["line"]), f"{case['weight']:g}", str(case["expect_status"])]
            assert cells[6] == f"{case['count']:,}" and cells[7] == "0" and cells[8] == "0"
            assert cells[-6:] == [f"{case['latency_ms'][k]:.3f}" for k in LATENCY_KEYS]
        overall = opened.row("#fixed-1", "overall")
        assert overall[-6:] == [f"{fixed['latency_ms'][k]:.3f}" for k in LATENCY_KEYS]
        assert overall[6] == f"{fixed['completed']:,}"
        sat = result["runs"][0]["phases"]["saturation"]
        assert f"{sat['rps']:,.1f}" in opened.row("#saturation-table", "policy.yaml (agent)")
        about = opened.page.inner_text("#about")
        assert result["command"] in about and result["runs"][0]["policy_version"] in about
        assert result["machine"]["kernel"] in about and f"generator {result['settings']['generator']}" in about
        shot = opened.screenshot(tmp_path / "real.png")
        check_drawn(shot, opened, RUN_COLOURS[:1])
        assert opened.requests == [opened.url] and opened.console == [] and opened.dialogs == []
    finally:
        opened.close()
