"""Policies and Revocations as people use them: headless Chromium against a real control plane with the console on
(and --state-dir), the demo identity provider, and a real agent (`authz-agent run --control-plane`) answering real
gRPC Checks.

A viewer reads the revocations but has no forms, and a forged POST of theirs is 403; an admin revokes a token, a
subject and a client in the browser and the real agent refuses each within 2 s (measured and printed); every action
is shown with who made it and is in the hash-chained action log; the Policies page shows the current policy, its
lint warnings, its tests, the history and a diff."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from playwright.sync_api import Browser, Page

from agent import reasons as R
from agent._xds.envoy.service.auth.v3 import external_auth_pb2 as ext
from agent._xds.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from agent.audit.chain import verify
from agent.controlplane.actions import ACTIONS_FILE
from tests.browser.console_fixtures import POLICY, ConsoleStack, login, screenshot, start_console, stop_console
from tests.e2e.conftest import LoopThread, idp_yaml
from tests.wait import until

SHOTS = Path(__file__).parent.parent.parent / "build" / "screenshots"
DEADLINE_S = 2.0  # the bound on a revocation reaching the agents
TESTS = """policy: orders.yaml
cases:
  - name: a reader lists orders
    request: {{method: GET, path: /v1/orders}}
    token: {{claims: {{sub: alice, scope: "{scope}"}}}}
    expect: {{status: 200, route: list-orders}}
  - name: no token is refused
    request: {{method: GET, path: /v1/orders}}
    expect: {{status: 401}}
"""
# A second version: another scope, and a grant that has ended (a lint warning, still published).
CHANGED = POLICY.replace("allow: {{scopes_all: [orders:read]}}", "allow: {{scopes_all: [orders:list]}}").replace(
    "  - name: health",
    "  - name: old-export\n    match: {{methods: [GET], path: /v1/export}}\n    authn: [jwt]\n"
    '    allow: {{scopes_all: [orders:read], not_after: "2020-01-01T00:00:00Z"}}\n  - name: health',
)


@pytest.fixture(scope="module")
def console(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    work = tmp_path_factory.mktemp("console-revoke")
    stack = start_console(work, loop_thread, ["--state-dir", str(work / "cp-state")])
    try:
        yield stack
    finally:
        stop_console(stack)


@pytest.fixture(scope="module")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


def check(stub: ext_grpc.AuthorizationStub, token: str) -> str:
    req = ext.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/v1/orders", "orders.local"
    http.headers["authorization"] = f"Bearer {token}"
    req.attributes.source.address.socket_address.address = "127.0.0.9"
    return str(stub.Check(req, timeout=5).dynamic_metadata["reason"])


def within(stub: ext_grpc.AuthorizationStub, token: str, reason: str, start: float, what: str) -> float:
    """Poll the agent until it answers `reason` for `token`: the seconds since `start`, at most DEADLINE_S."""
    while True:
        got = check(stub, token)
        took = time.monotonic() - start
        if got == reason:
            print(f"\n{what}: the real agent refused it {took * 1000:.0f} ms after the click")
            return took
        assert took < DEADLINE_S, f"{what}: the agent still answers {got} after {took:.2f} s"
        time.sleep(0.01)


def csrf_of(page: Page) -> str:
    return str(page.get_attribute("input[name=csrf]", "value"))


def test_the_policies_page_shows_the_policy_tests_history_and_a_diff(
    console: ConsoleStack, browser: Browser, shots: Path
) -> None:
    orders = console.policies / "orders.yaml"
    (console.policies / "orders.test.yaml").write_text(TESTS.format(scope="orders:read"))
    orders.write_text(POLICY.format(idp=idp_yaml(console.idp.issuer)) + "# tested\n")
    until(lambda: (console.cp.status()["services"]["orders"]["tests"] or {}).get("passed") == 2, "tests run")
    (console.policies / "orders.test.yaml").write_text(TESTS.format(scope="orders:list"))
    orders.write_text(CHANGED.format(idp=idp_yaml(console.idp.issuer)))
    until(lambda: console.cp.status()["services"]["orders"]["sequence"] == 3, "the changed policy published")
    page = console.new_page(browser)
    login(page, console, "vic")  # a viewer reads policies
    page.goto(console.url + "/ui/policies")
    card = page.inner_text("#policy-orders")
    assert "sequence 3" in card and "tests 2 passed" in card and "1 lint warning" in card
    assert "a reader lists orders" in card and "no token is refused" in card and "pass" in card
    assert "old-export" in card and "ended" in card  # the lint warning names the ended grant
    assert "Not covered by any case" in card and "old-export" in page.inner_text("ul.uncovered")
    assert "scopes_all: [orders:list]" in page.inner_text("pre.policy")
    assert page.locator("table.history tbody tr").count() == 3
    assert "history keeps the newest 100" in page.inner_text("main")
    screenshot(page, shots / "console-policies.png")
    page.click("form.diff button[type=submit]")
    page.wait_for_url("**/ui/policies/orders/diff?**")
    diff = page.inner_text("pre.diff")
    assert "-    allow: {scopes_all: [orders:read]}" in diff and "+    allow: {scopes_all: [orders:list]}" in diff
    assert page.locator("pre.diff span.added").count() >= 5 and page.locator("pre.diff span.removed").count() >= 1
    screenshot(page, shots / "console-policy-diff.png")
    page.goto(console.url + "/ui/policies/orders/diff?a=1&b=3&view=side")
    assert page.locator("table.diff.side tr.changed").count() >= 1
    assert page.locator("table.diff.side tr.added").count() >= 4
    screenshot(page, shots / "console-policy-diff-side.png")
    # A version not kept, and a service without history: a plain 404 page.
    assert page.goto(console.url + "/ui/policies/orders/diff?a=99&b=1").status == 404  # type: ignore[union-attr]
    assert page.goto(console.url + "/ui/policies/nope/diff").status == 404  # type: ignore[union-attr]
    page.context.close()
    # Back to the original policy (untested) for the revocation tests that follow.
    (console.policies / "orders.test.yaml").unlink()
    orders.write_text(POLICY.format(idp=idp_yaml(console.idp.issuer)))
    until(lambda: console.cp.status()["services"]["orders"]["sequence"] == 4, "the original policy published again")


def test_a_viewer_sees_the_revocations_without_forms_and_a_forged_post_is_403(
    console: ConsoleStack, browser: Browser, shots: Path
) -> None:
    (console.policies / "revocations.yaml").write_text("jti: [written-by-hand]\n")
    until(lambda: console.cp.status()["revocations"]["sequence"] >= 1, "the hand-written list published")
    page = console.new_page(browser)
    login(page, console, "vic")
    page.goto(console.url + "/ui/revocations")
    assert "written-by-hand" in page.inner_text("table.revoked")
    assert "written into revocations.yaml" in page.inner_text("table.revoked")
    assert page.locator("form.revoke").count() == 0
    assert "revoking needs the console's admin role" in page.inner_text("main")
    screenshot(page, shots / "console-revocations-viewer.png")
    before = console.cp.status()["revocations"]["sequence"]
    for kind, form in (("jti", {"jti": "forged"}), ("client", {"client_id": "forged"})):
        answer = page.request.post(f"{console.url}/ui/revocations/{kind}", form={**form, "csrf": csrf_of(page)},
                                   headers={"Origin": console.url}, max_redirects=0)  # fmt: skip
        assert answer.status == 403 and "admin role" in answer.text()
    assert console.cp.status()["revocations"]["sequence"] == before
    assert "forged" not in (console.policies / "revocations.yaml").read_text()
    page.context.close()


def test_an_admin_revokes_a_token_a_subject_and_a_client_and_a_real_agent_refuses_each_within_2_s(
    console: ConsoleStack, browser: Browser, shots: Path
) -> None:
    agent = console.start_agent()
    stolen = console.idp.mint(jti="stolen-in-browser")
    mallory = console.idp.mint(sub="mallory", iat=int(time.time()) - 5)
    batch = console.idp.mint(client_id="batch-exporter")
    fine = console.idp.mint()
    page = console.new_page(browser)
    login(page, console, "ada")
    page.goto(console.url + "/ui/revocations")
    with grpc.insecure_channel(agent.listen) as channel:
        stub = ext_grpc.AuthorizationStub(channel)
        until(lambda: check(stub, stolen) == R.ALLOWED, "the agent enforcing the policy")
        assert check(stub, mallory) == check(stub, batch) == R.ALLOWED
        # A token, by its jti.
        page.fill("#jti", "stolen-in-browser")
        page.fill("#jti-reason", "pasted in a public ticket")
        start = time.monotonic()
        page.click("form[action='/ui/revocations/jti'] button")
        within(stub, stolen, R.TOKEN_REVOKED, start, "token (jti) revoked in the browser")
        page.wait_for_url("**/ui/revocations?done=jti")
        assert "The token is revoked" in page.inner_text("p.notice")
        # A subject: tokens issued before now.
        page.fill("#subject-issuer", console.idp.issuer)
        page.fill("#subject", "mallory")
        start = time.monotonic()
        page.click("form[action='/ui/revocations/subject'] button")
        within(stub, mallory, R.TOKEN_REVOKED, start, "subject revoked in the browser")
        page.wait_for_url("**/ui/revocations?done=subject")
        # A client: every token naming it.
        page.fill("#client-id", "batch-exporter")
        page.fill("#client-reason", "incident 4711")
        start = time.monotonic()
        page.click("form[action='/ui/revocations/client'] button")
        within(stub, batch, R.CLIENT_REVOKED, start, "client revoked in the browser")
        page.wait_for_url("**/ui/revocations?done=client")
        assert check(stub, fine) == R.ALLOWED  # nobody else
        assert check(stub, console.idp.mint(client_id="batch-exporter")) == R.CLIENT_REVOKED  # a fresh token too
    revoked = page.inner_text("table.revoked")
    for text in ("stolen-in-browser", "mallory", "batch-exporter", "Ada Lovelace", "incident 4711", "written into"):
        assert text in revoked, text
    log = page.inner_text("table.actions-log")
    assert "revoke_jti" in log and "revoke_subject" in log and "revoke_client" in log and "pasted in a public" in log
    screenshot(page, shots / "console-revocations-admin.png")
    # A value the control plane refuses comes back with the reason, and nothing is revoked.
    page.fill("#client-id", "x" * 40)
    page.evaluate("document.getElementById('client-id').removeAttribute('maxlength')")
    page.fill("#client-id", "x" * 300)
    page.click("form[action='/ui/revocations/client'] button")
    assert "Not revoked: client id is longer than 256 characters" in page.inner_text("p.alert")
    page.context.close()
    # The action log on disk: who, what, why, chained; no token anywhere in it or in the logs.
    path = console.work / "cp-state" / ACTIONS_FILE
    assert verify([path]).problem is None and verify([path]).records == 3
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert {r["actor"]["name"] for r in records} == {"Ada Lovelace"}
    assert [r["action"] for r in records] == ["revoke_jti", "revoke_subject", "revoke_client"]
    everything = console.logs() + path.read_text() + (console.policies / "revocations.yaml").read_text()
    for token in (stolen, mallory, batch, fine):
        assert token not in everything
    assert "eyJ" not in path.read_text()
