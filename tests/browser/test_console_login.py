"""The console's login as people use it: headless Chromium against a real `authz-agent control-plane` with the
console on and the demo identity provider on another site (localhost vs 127.0.0.1), signing in on the IdP's own
page. Admin and viewer get in with their role, a user with no console role does not, logout ends the session for
good, a write without the session's CSRF token or from another origin is refused (even one on the same host), the
cookies carry their flags, and the control plane's log holds no session id, code, state or token."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from playwright.sync_api import Browser, Page, Request

from tests.browser.console_fixtures import ConsoleStack, idp_sign_in, login, screenshot, session_cookie
from tests.e2e.conftest import LoopThread, free_port
from tests.wait import until

SHOTS = Path(__file__).parent.parent.parent / "build" / "screenshots"


@pytest.fixture(scope="module")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


class Seen:
    """What the browser sent and got: the codes and states of callbacks, every cookie value (checked absent from
    the logs at the end of the module)."""

    secrets: set[str] = set()

    @classmethod
    def watch(cls, page: Page) -> None:
        def on_request(request: Request) -> None:
            query = parse_qs(urlsplit(request.url).query)
            for key in ("code", "state", "nonce", "code_challenge"):
                cls.secrets.update(v for v in query.get(key, []) if len(v) >= 16)

        page.on("request", on_request)

    @classmethod
    def cookies(cls, page: Page) -> None:
        cls.secrets.update(c["value"] for c in page.context.cookies() if len(c["value"]) >= 16)


def test_an_admin_signs_in_on_the_idp_page_and_sees_the_fleet(console: ConsoleStack, browser: Browser,
                                                              shots: Path) -> None:  # fmt: skip
    agent = console.start_agent()
    until(lambda: any(a["connected"] and a["version"] for a in console.cp.status()["agents"]),
          "the agent reported its version")  # fmt: skip
    page = console.new_page(browser)
    Seen.watch(page)
    page.goto(console.url + "/ui/")
    # Not signed in: straight to the identity provider's login page (another site).
    page.wait_for_selector("select#user")
    assert page.url.startswith(console.idp.issuer + "/authorize?")
    assert "authz-console asks you to sign in" in page.inner_text("main")
    assert {"ada", "vic", "nora"} <= set(page.eval_on_selector_all("option", "os => os.map(o => o.value)"))
    screenshot(page, shots / "console-idp-login.png")
    idp_sign_in(page, console, "ada")
    page.wait_for_url(console.url + "/ui/")
    page.wait_for_selector("#service-orders table.agents")
    header = page.inner_text("header.top")
    assert "Ada Lovelace" in header and "admin" in header.lower()
    service = page.inner_text("#service-orders")
    version = console.cp.status()["services"]["orders"]["version"]
    assert "orders" in service and version in service
    row = page.inner_text("#service-orders tbody tr")
    assert version in row and "current" in row and "none (plain text)" in row
    assert "1 agents connected" in " ".join(page.inner_text(".summary").split())
    image = screenshot(page, shots / "console-fleet.png")
    assert image.size[0] == 1280
    # The session cookie: HttpOnly, SameSite=Strict, only for /ui; not Secure on a plain-http loopback console.
    cookie = session_cookie(page)
    assert cookie is not None
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui" and not cookie["secure"]
    assert len(cookie["value"]) >= 43  # 256 bits, base64url
    # The login attempt's own cookie is gone once used.
    assert not [c for c in page.context.cookies() if c["name"] == "authz_console_login"]
    assert page.evaluate("document.cookie") == ""  # nothing a script could read
    Seen.cookies(page)
    agent.stop()
    console.agents.remove(agent)
    page.context.close()


def test_a_viewer_signs_in_as_a_viewer(console: ConsoleStack, browser: Browser) -> None:
    page = console.new_page(browser)
    Seen.watch(page)
    login(page, console, "vic")
    header = page.inner_text("header.top")
    assert "Vic Viewer" in header and "viewer" in header.lower() and "admin" not in header.lower()
    Seen.cookies(page)
    page.context.close()


def test_a_user_without_a_console_role_is_refused_and_gets_no_session(console: ConsoleStack, browser: Browser,
                                                                      shots: Path) -> None:  # fmt: skip
    page = console.new_page(browser)
    Seen.watch(page)
    page.goto(console.url + "/ui/")
    idp_sign_in(page, console, "nora")
    page.wait_for_selector("h1:has-text('No console role')")
    assert "Nora Norole has neither the authz-admin nor the authz-viewer role" in page.inner_text("main")
    assert session_cookie(page) is None
    screenshot(page, shots / "console-no-role.png")
    # Still not let in.
    page.goto(console.url + "/ui/")
    page.wait_for_selector("select#user")
    page.context.close()


def test_a_wrong_password_stays_at_the_idp(console: ConsoleStack, browser: Browser) -> None:
    page = console.new_page(browser)
    page.goto(console.url + "/ui/")
    idp_sign_in(page, console, "ada", password="not-her-password")  # pragma: allowlist secret (a wrong one)
    page.wait_for_selector(".error")
    assert "Wrong user or password" in page.inner_text("main")
    assert session_cookie(page) is None
    page.context.close()


def test_logout_ends_the_session_for_good(console: ConsoleStack, browser: Browser, shots: Path) -> None:
    page = console.new_page(browser)
    Seen.watch(page)
    login(page, console, "ada")
    old = session_cookie(page)
    assert old is not None
    Seen.cookies(page)
    page.click("text=Sign out")
    page.wait_for_url(console.url + "/ui/login?signed_out=1")
    assert "You are signed out" in page.inner_text("main")
    assert session_cookie(page) is None
    screenshot(page, shots / "console-signed-out.png")
    # The old id, put back into the browser, is worth nothing: the server deleted the session.
    page.context.add_cookies([{k: old[k] for k in ("name", "value", "domain", "path", "httpOnly", "sameSite")}])
    page.goto(console.url + "/ui/")
    page.wait_for_selector("select#user")
    assert page.url.startswith(console.idp.issuer + "/authorize?")
    page.context.close()


def test_a_new_login_replaces_the_session_id(console: ConsoleStack, browser: Browser) -> None:
    page = console.new_page(browser)
    login(page, console, "ada")
    first = session_cookie(page)
    Seen.cookies(page)
    # Signed in, the sign-in link leads back to the console: a GET ends no session (see the attacker test).
    page.goto(console.url + "/ui/login/start")
    page.wait_for_url(console.url + "/ui/")
    assert "Ada Lovelace" in page.inner_text("header.top")
    page.click("text=Sign out")  # signing in as another user: sign out (a CSRF-checked POST), then in
    page.wait_for_url(console.url + "/ui/login?signed_out=1")
    page.goto(console.url + "/ui/login/start")
    idp_sign_in(page, console, "vic")
    page.wait_for_url(console.url + "/ui/")
    second = session_cookie(page)
    assert first is not None and second is not None and first["value"] != second["value"]
    assert "Vic Viewer" in page.inner_text("header.top")
    Seen.cookies(page)
    # The first session is gone for good.
    page.context.add_cookies([{k: first[k] for k in ("name", "value", "domain", "path", "httpOnly", "sameSite")}])
    page.goto(console.url + "/ui/")
    page.wait_for_selector("select#user")
    page.context.close()


@pytest.fixture(scope="module")
def attacker(loop_thread: LoopThread) -> Iterator[str]:
    """Another origin on the same host (127.0.0.1, another port: the same site, so SameSite does not help) that
    serves a form posting to whatever URL it is given, with whatever fields."""

    async def page(request: web.Request) -> web.Response:
        target = request.query["target"]
        fields = "".join(f'<input name="{k}" value="{v}">' for k, v in request.query.items() if k != "target")
        form = f'<form method="post" action="{target}">{fields}<button id="go" type="submit">go</button></form>'
        return web.Response(text=form, content_type="text/html")

    async def link(request: web.Request) -> web.Response:
        target = request.query["target"]
        return web.Response(
            text=f'<img src="{target}" alt=""><a id="go" href="{target}">go</a>', content_type="text/html"
        )

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/link", link)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner, port

    runner, port = loop_thread.run(start())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop_thread.run(runner.cleanup())


def _csrf(page: Page) -> str:
    return str(page.get_attribute("form[action='/ui/logout'] input[name=csrf]", "value"))


def test_a_write_without_the_csrf_token_is_refused(console: ConsoleStack, browser: Browser) -> None:
    page = console.new_page(browser)
    login(page, console, "ada")
    Seen.cookies(page)
    token = _csrf(page)
    Seen.secrets.add(token)
    origin = {"Origin": console.url}
    for form in ({}, {"csrf": ""}, {"csrf": "x" + token[1:]}):
        answer = page.request.post(console.url + "/ui/logout", form=form, headers=origin, max_redirects=0)
        assert answer.status == 403, form
        assert "CSRF token" in answer.text()
    # Another session's token is no better.
    other = console.new_page(browser)
    login(other, console, "vic")
    Seen.cookies(other)
    answer = page.request.post(console.url + "/ui/logout", form={"csrf": _csrf(other)}, headers=origin,
                               max_redirects=0)  # fmt: skip
    assert answer.status == 403
    # Still signed in, both of them.
    page.goto(console.url + "/ui/")
    assert "Ada Lovelace" in page.inner_text("header.top")
    other.goto(console.url + "/ui/")
    assert "Vic Viewer" in other.inner_text("header.top")
    page.context.close()
    other.context.close()


def test_a_forged_cross_origin_post_is_refused_even_with_the_token(console: ConsoleStack, browser: Browser,
                                                                   attacker: str) -> None:  # fmt: skip
    page = console.new_page(browser)
    login(page, console, "ada")
    Seen.cookies(page)
    token = _csrf(page)  # say it leaked: the Origin check still holds
    page.goto(f"{attacker}/?target={console.url}/ui/logout&csrf={token}")
    with page.expect_navigation():
        page.click("#go")
    assert "/ui/logout" in page.url
    assert "sent from another site" in page.inner_text("main")
    page.goto(console.url + "/ui/")
    assert "Ada Lovelace" in page.inner_text("header.top")  # the forged logout did nothing
    # A script-free POST without Origin or Referer (what some old clients send) is refused too.
    answer = page.request.post(console.url + "/ui/logout", form={"csrf": token}, max_redirects=0,
                               headers={"Referer": ""})  # fmt: skip
    assert answer.status == 403
    page.context.close()


def test_a_page_elsewhere_cannot_sign_a_user_out(console: ConsoleStack, browser: Browser, attacker: str) -> None:
    """Before: GET /ui/login/start ended the session it came with and cleared the cookie, so a same-site page's
    <img> or link (here 127.0.0.1 on another port: the same site, so the Strict cookie is sent) signed users out."""
    page = console.new_page(browser)
    login(page, console, "ada")
    Seen.cookies(page)
    before = session_cookie(page)
    with page.expect_response(lambda r: r.url == console.url + "/ui/login/start"):
        page.goto(f"{attacker}/link?target={console.url}/ui/login/start")  # its <img> asks at once
    with page.expect_navigation():
        page.click("#go")
    page.wait_for_url(console.url + "/ui/")  # sent to the console, not to the IdP
    assert "Ada Lovelace" in page.inner_text("header.top")
    assert session_cookie(page) == before
    page.context.close()


def test_the_console_pages_carry_the_security_headers(console: ConsoleStack, browser: Browser) -> None:
    page = console.new_page(browser)
    responses = []
    page.on("response", lambda r: responses.append(r) if r.url.startswith(console.url + "/ui") else None)
    login(page, console, "ada")
    assert responses
    for r in responses:
        headers = r.all_headers()
        assert "script-src 'self'" in headers["content-security-policy"], r.url
        assert "frame-ancestors 'none'" in headers["content-security-policy"], r.url
        assert headers["cache-control"] == "no-store", r.url
        assert headers["referrer-policy"] == "same-origin", r.url  # not no-referrer: Origin would be "null"
        assert headers["x-content-type-options"] == "nosniff", r.url
    Seen.cookies(page)
    page.context.close()


def test_nothing_secret_in_the_control_planes_log(console: ConsoleStack) -> None:
    """Run after the others in this module: every code, state, nonce, cookie and CSRF token the browsers saw."""
    logs = console.logs()
    assert "signed in as admin" in logs  # the log is the one written by those logins
    assert len(Seen.secrets) >= 10
    leaked = [s[:6] + "..." for s in Seen.secrets if s in logs]
    assert not leaked, f"found in the control plane's log: {leaked}"
    assert not re.search(r"eyJ[\w-]+\.[\w-]+\.", logs), "a JWT in the log"


def _control_plane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "control-plane", "--policies", ".", "--signing-key",
                           "missing.pem", *args], capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_console_refuses_plain_http_off_loopback() -> None:
    issuer = ["--console-issuer", "http://127.0.0.1:9/", "--console-client-id", "c"]
    r = _control_plane("--insecure", "--admin", "0.0.0.0:9301", *issuer)
    assert r.returncode == 2 and "loopback" in r.stderr, r.stderr
    r = _control_plane("--insecure", "--console-url", "http://console.example.com", *issuer)
    assert r.returncode == 2 and "refuses plain http on a non-loopback address" in r.stderr, r.stderr
    r = _control_plane("--insecure", "--console-url", "https://console.example.com", *issuer)
    assert r.returncode == 2 and "plain text" in r.stderr, r.stderr
    r = _control_plane("--insecure", "--console-issuer", "http://idp.example.com", "--console-client-id", "c")
    assert r.returncode == 2 and "https" in r.stderr, r.stderr
    r = _control_plane("--insecure", "--console-issuer", "http://127.0.0.1:9/")
    assert r.returncode == 2 and "--console-client-id" in r.stderr, r.stderr
    r = _control_plane("--tls-cert", "c.pem", "--tls-key", "k.pem", "--client-ca", "ca.pem", "--agents", "a.yaml",
                       "--admin", "0.0.0.0:9301", *issuer)  # fmt: skip
    assert r.returncode == 2 and "give --console-url" in r.stderr, r.stderr
    r = _control_plane("--insecure", "--console-client-id", "c")
    assert r.returncode == 2 and "goes with --console-issuer" in r.stderr, r.stderr
