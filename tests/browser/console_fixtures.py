"""The console as a browser meets it: a real `authz-agent control-plane --console-issuer ...` process, the demo
identity provider (real HTTP, its login page and code flow) and headless Chromium (Debian's, driven by Playwright).

The IdP listens on `localhost` and the console on `127.0.0.1`: two sites, as in production, so the IdP's redirect
back to the console is a cross-site navigation and the cookies' SameSite rules are exercised for real.

Its fixtures (`browser`, `loop_thread`, `console`) are in tests/browser/conftest.py; in a test module:

    from tests.browser.console_fixtures import ConsoleStack, login

    def test_x(console: ConsoleStack, browser: Browser) -> None:
        page = console.new_page(browser)
        login(page, console, "ada")            # ada: authz-admin, vic: authz-viewer, nora: no console role
        agent = console.start_agent()          # optional: a real `authz-agent run --control-plane` of "orders"
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from agent.demo.idp import LocalIdP
from tests.e2e.conftest import AgentProcess, LoopThread, free_port, idp_yaml
from tests.wait import until

CLIENT_ID = "authz-console"
WIDTH = 1280  # pages must read well at this width
SERVICE = "orders"
POLICY = """version: 1
service: orders
{idp}routes:
  - name: list-orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
  - name: health
    match: {{path: /healthz}}
    public: true
default: deny
"""


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
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


class ControlPlaneProcess:
    """`authz-agent control-plane` with the console on, plain text on loopback; its stdout+stderr in `log_path`."""

    def __init__(self, policies: Path, key: Path, workdir: Path, console_args: Sequence[str]) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = workdir / "control-plane.log"
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "control-plane", "--policies", str(policies), "--signing-key", str(key),
             "--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}", "--insecure",
             *console_args],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        until(lambda: self._exited() or self._up(), "the control plane answers /status")
        assert self.proc.poll() is None, self.logs()

    def _exited(self) -> bool:
        return self.proc.poll() is not None

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/status", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/status", timeout=5) as r:
            return dict(json.load(r))

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@dataclass
class ConsoleStack:
    work: Path
    loop: LoopThread
    idp: LocalIdP
    cp: ControlPlaneProcess
    policies: Path
    verify_key: Path
    passwords: dict[str, str]
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The console's origin (http://127.0.0.1:PORT); its pages are under /ui/."""
        return self.cp.url

    def new_page(self, browser: Browser) -> Page:
        """A page in a fresh context (its own cookies): one browser, one user."""
        context: BrowserContext = browser.new_context(viewport={"width": WIDTH, "height": 900}, device_scale_factor=1)
        return context.new_page()

    def start_agent(self, service: str = SERVICE, transport: str = "grpcio") -> AgentProcess:
        """A real agent taking `service`'s policy from this control plane (plain text, loopback); ready on return."""
        i = len(self.agents)
        work = self.work / f"agent-{i}"
        work.mkdir()
        args = ["--control-plane", f"127.0.0.1:{self.cp.port}", "--insecure", "--service", service,
                "--state-dir", str(work / "state"), "--bundle-key", str(self.verify_key)]  # fmt: skip
        agent = AgentProcess(args, f"127.0.0.1:{free_port()}", work, transport)
        self.agents.append(agent)
        return agent

    def logs(self) -> str:
        """Everything the control plane and the agents wrote (for the never-logged checks)."""
        return self.cp.logs() + "".join(a.logs() for a in self.agents)


def start_console(work: Path, loop: LoopThread, extra_args: Sequence[str] = ()) -> ConsoleStack:
    """The IdP (users ada, vic, nora; the console registered as a public client) and the control plane."""
    subprocess.run([sys.executable, "-m", "agent", "control-plane", "--keygen", str(work / "keys")], check=True,
                   capture_output=True)  # fmt: skip
    idp = LocalIdP(host="localhost", port=free_port())
    loop.run(idp.start())
    passwords = idp.demo_users()
    passwords["nora"] = idp.add_user("nora", ("sales",), "Nora Norole")
    policies = work / "policies"
    policies.mkdir()
    (policies / f"{SERVICE}.yaml").write_text(POLICY.format(idp=idp_yaml(idp.issuer)))
    args = ["--console-issuer", idp.issuer, "--console-client-id", CLIENT_ID, *extra_args]
    cp = ControlPlaneProcess(policies, work / "keys" / "bundle-signing.pem", work, args)
    idp.register_client(CLIENT_ID, [f"{cp.url}/ui/callback"])
    return ConsoleStack(work, loop, idp, cp, policies, work / "keys" / "bundle-verify.pem", passwords)


def stop_console(stack: ConsoleStack) -> None:
    for agent in stack.agents:
        agent.stop()
    stack.cp.stop()
    stack.loop.run(stack.idp.stop())


@pytest.fixture(scope="module")
def console(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    stack = start_console(tmp_path_factory.mktemp("console"), loop_thread)
    try:
        yield stack
    finally:
        stop_console(stack)


def idp_sign_in(page: Page, stack: ConsoleStack, user: str, password: str | None = None) -> None:
    """On the IdP's login page: pick `user`, type the password (theirs unless given), submit."""
    page.wait_for_selector("select#user", timeout=15_000)
    page.select_option("select#user", user)
    page.fill("input#password", stack.passwords[user] if password is None else password)
    page.click("button[type=submit]")


def login(page: Page, stack: ConsoleStack, user: str) -> None:
    """Sign `user` in through the real IdP page and wait for the Fleet page with their name in the header."""
    page.goto(stack.url + "/ui/")
    idp_sign_in(page, stack, user)
    page.wait_for_url(stack.url + "/ui/", timeout=15_000)
    page.wait_for_selector("header.top .user", timeout=15_000)


def session_cookie(page: Page) -> dict[str, Any] | None:
    found = [c for c in page.context.cookies() if c["name"] == "authz_console"]
    return dict(found[0]) if found else None


def screenshot(page: Page, path: Path) -> Image.Image:
    """A full-page screenshot, checked not blank (many colours, not one flat background)."""
    page.screenshot(path=str(path), full_page=True)
    image = Image.open(path).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 8, f"{path} looks blank"
    return image


__all__ = [
    "ConsoleStack",
    "browser",
    "chromium_path",
    "console",
    "idp_sign_in",
    "login",
    "loop_thread",
    "screenshot",
    "session_cookie",
    "start_console",
    "stop_console",
]
