"""Denials and Explain as people use them: headless Chromium against a real control plane with the console on, the
demo identity provider, and a real agent (`authz-agent run --control-plane`) refusing real gRPC Checks.

The denials an agent makes reach the page (table and chart) through its status reports; Explain names the deny
rule that refuses a request and the allow alternative that lets another through, with a real token of the demo IdP;
the pasted token is in no response, log or form; explanations are rate limited and need the CSRF token."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import grpc
import pytest
from playwright.sync_api import Browser, Page

from agent import reasons as R
from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent._xds.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from agent.controlplane.explainer import PER_MINUTE
from tests.browser.console_fixtures import ConsoleStack, login, screenshot
from tests.e2e.conftest import idp_yaml
from tests.wait import until

SHOTS = Path(__file__).parent.parent.parent / "build" / "screenshots"
REPORT_WAIT_S = 40.0  # an agent reports every 10 s while it has denials
SHOP = """version: 1
service: shop
{idp}routes:
  - name: read-cart
    match: {{methods: [GET], path: "/v1/carts/{{id}}"}}
    authn: [jwt]
    allow:
      - {{scopes_all: [cart:read]}}
      - {{roles_any: [support]}}
    deny:
      - {{name: no-interns, when: 'subject == "intern"'}}
default: deny
"""


@pytest.fixture(scope="module")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


@pytest.fixture(scope="module")
def shop(console: ConsoleStack) -> str:
    (console.policies / "shop.yaml").write_text(SHOP.format(idp=idp_yaml(console.idp.issuer)))
    until(lambda: "shop" in console.cp.status()["services"], "the shop policy published")
    return "shop"


def check(stub: ext_grpc.AuthorizationStub, path: str, token: str | None = None) -> str:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", path, "orders.local"
    if token is not None:
        http.headers["authorization"] = f"Bearer {token}"
    req.attributes.source.address.socket_address.address = "127.0.0.9"
    return str(stub.Check(req, timeout=5).dynamic_metadata["reason"])


def csrf_of(page: Page) -> str:
    return str(page.get_attribute("input[name=csrf]", "value"))


def test_denials_of_a_real_agent_appear_on_the_page(console: ConsoleStack, browser: Browser, shots: Path) -> None:
    agent = console.start_agent()
    until(lambda: any(a["connected"] and a["version"] for a in console.cp.status()["agents"]), "the agent enforces")
    token = console.idp.mint(scope="orders:read")
    narrow = console.idp.mint(scope="orders:write")
    with grpc.insecure_channel(agent.listen) as channel:
        stub = ext_grpc.AuthorizationStub(channel)
        for _ in range(10):
            assert check(stub, "/v1/orders", token) == R.ALLOWED
        for _ in range(7):
            assert check(stub, "/v1/orders") == R.TOKEN_MISSING
        for _ in range(4):
            assert check(stub, "/v1/orders", narrow) == R.SCOPE_MISSING
        for _ in range(2):
            assert check(stub, "/v1/nowhere", token) == R.NO_ROUTE
    until(lambda: console.cp.status()["denials"]["last_hour"].get("orders") == 13, "the agent reported 13 denials",
          REPORT_WAIT_S)  # fmt: skip
    page = console.new_page(browser)
    login(page, console, "vic")  # a viewer reads the page
    page.click("header.top nav a:has-text('Denials')")
    page.wait_for_selector("#denials-orders table.denials")
    card = page.locator("#denials-orders")
    assert "13 denials in the last hour" in card.inner_text()
    rows = [[c.strip() for c in r.split("\t")] for r in card.locator("tbody tr").all_inner_texts()]
    assert rows == [
        ["list-orders", R.TOKEN_MISSING, "7", "54%"],
        ["list-orders", R.SCOPE_MISSING, "4", "31%"],
        ["(no route)", R.NO_ROUTE, "2", "15%"],
    ]
    # The chart: an SVG image with the reasons in its legend, drawn (its box not empty).
    src = str(card.locator("img.chart").get_attribute("src"))
    assert src.startswith("data:image/svg+xml;base64,")
    svg = base64.b64decode(src.split(",", 1)[1]).decode()
    assert R.TOKEN_MISSING in svg and R.SCOPE_MISSING in svg and "denials per minute" in svg
    box = card.locator("img.chart").bounding_box()
    assert box is not None and box["width"] > 800 and box["height"] > 150
    screenshot(page, shots / "console-denials.png")
    # One service alone.
    page.goto(console.url + "/ui/denials?service=orders")
    assert page.locator("section.denials").count() == 1


def test_explain_names_the_refusing_rule_and_the_allowing_alternative(
    console: ConsoleStack, browser: Browser, shots: Path, shop: str
) -> None:
    page = console.new_page(browser)
    login(page, console, "vic")
    page.click("header.top nav a:has-text('Explain')")
    page.wait_for_selector("form.explain")
    denied_token = console.idp.mint(sub="intern", scope="cart:read")
    page.select_option("select#service", shop)
    page.fill("input#path", "/v1/carts/42")
    page.fill("textarea#headers", "x-request-id: abc-123")
    page.fill("input#token", denied_token)
    page.click("form.explain button[type=submit]")
    page.wait_for_selector("section.result")
    verdict = page.inner_text(".verdict")
    assert "DENIED" in verdict and "no-interns" in verdict and "status 403" in verdict
    steps = page.locator("ol.steps li").all_inner_texts()
    assert any(s.startswith("route 'read-cart'") for s in steps)
    assert any(re.fullmatch(r"deny rule 'no-interns' \(line \d+\) holds", s) for s in steps)
    assert page.locator("ol.steps li.fail").count() >= 1
    # What was pasted does not come back: the token and headers fields are empty, the token nowhere in the page.
    html = page.content()
    assert denied_token not in html and "abc-123" not in page.input_value("textarea#headers")
    assert page.input_value("input#token") == "" and page.input_value("input#path") == "/v1/carts/42"
    screenshot(page, shots / "console-explain-denied.png")

    allowed_token = console.idp.mint(sub="sam", scope="cart:write", roles=["support"])
    page.fill("input#token", allowed_token)
    page.click("form.explain button[type=submit]")
    page.wait_for_selector("section.result")
    verdict = page.inner_text(".verdict")
    assert "ALLOWED" in verdict and "allow alternative 1" in verdict
    steps = page.locator("ol.steps li").all_inner_texts()
    assert any(re.fullmatch(r"allow alternative 1 \(line \d+\) holds", s) for s in steps)
    assert '"reason": "allowed"' in page.inner_text("pre.summary")
    assert allowed_token not in page.content()
    screenshot(page, shots / "console-explain-allowed.png")

    logs = console.logs()
    for token in (denied_token, allowed_token):
        assert token not in logs
        assert token.split(".")[2] not in logs  # not even the signature alone


def test_explain_wants_the_csrf_token_and_is_rate_limited(console: ConsoleStack, browser: Browser, shop: str) -> None:
    page = console.new_page(browser)
    login(page, console, "ada")
    page.goto(console.url + "/ui/explain")
    form = {"service": shop, "method": "GET", "path": "/v1/carts/1", "headers": "", "token": "", "source": "10.0.0.1"}
    origin = {"Origin": console.url}
    forged = page.request.post(console.url + "/ui/explain", form=form, headers=origin)
    assert forged.status == 403 and "CSRF" in forged.text()
    form["csrf"] = csrf_of(page)
    statuses = [page.request.post(console.url + "/ui/explain", form=form, headers=origin).status
                for _ in range(PER_MINUTE + 1)]  # fmt: skip
    assert statuses[-1] == 429, statuses
    last = page.request.post(console.url + "/ui/explain", form=form, headers=origin)
    assert last.status == 429 and "explanations a minute" in last.text()
    assert last.headers["cache-control"] == "no-store"
