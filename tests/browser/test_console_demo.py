"""`authz-agent demo` (what `make run` starts) as its user meets the console: the printed URL and admin login
work in a real browser, through the demo IdP's login page, and the Fleet page shows the demo's own agent enforcing
the policy the demo's control plane published."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from agent.envoyconf import stop_process
from tests.browser.console_fixtures import WIDTH, screenshot, session_cookie
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.e2e
DEADLINE_S = 90.0
SHOTS = Path(__file__).parent.parent.parent / "build" / "screenshots"


def _line(lines: queue.Queue[str | None], pattern: str, seen: list[str]) -> re.Match[str]:
    """The first line of the demo's output matching `pattern`, within the deadline."""
    end = time.monotonic() + DEADLINE_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r} within {DEADLINE_S} s: {seen[-20:]}") from None
        if line is None:
            raise AssertionError(f"the demo exited without a line matching {pattern!r}: {seen[-20:]}")
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found


def test_the_demo_prints_a_console_login_that_works(browser: Browser, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "agent", "demo", "--port", str(free_port()), "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        login = r"console: (http://127\.0\.0\.1:\d+/ui/)\s+sign in as ada \(admin\), password (\S+);"
        found = _line(lines, login, seen)
        url, password = found.group(1), found.group(2)
        _line(lines, r"Ctrl-C to stop", seen)
        context = browser.new_context(viewport={"width": WIDTH, "height": 900})
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("select#user")
        page.select_option("select#user", "ada")
        page.fill("input#password", password)
        page.click("button[type=submit]")
        page.wait_for_url(url)
        page.wait_for_selector("#service-orders table.agents")
        assert "Ada Lovelace" in page.inner_text("header.top")
        row = page.inner_text("#service-orders tbody tr")
        assert "orders@" in row and "current" in row
        assert session_cookie(page) is not None
        SHOTS.mkdir(parents=True, exist_ok=True)
        screenshot(page, SHOTS / "console-demo-fleet.png")
        context.close()
    finally:
        stop_process(proc)
    assert proc.returncode == 0, seen[-20:]
