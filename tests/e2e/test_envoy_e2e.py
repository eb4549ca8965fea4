"""Through a real Envoy (ext_authz gRPC v3, failure_mode_allow false) to a real upstream, tokens from joserfc."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent import reasons as R
from tests.e2e.conftest import Stack, free_port, request
from tests.wait import until


def test_allowed_request_reaches_the_app_with_identity_headers_only(stack: Stack) -> None:
    token = stack.idp.mint(sub="alice", client_id="web-app")
    r = stack.get("/v1/orders?page=1", token, x_authz_subject="mallory", x_authz_admin="yes")
    assert r.status == 200
    seen = r.json()
    assert seen["from_agent"]["x-authz-subject"] == "alice"
    assert seen["from_agent"]["x-authz-client-id"] == "web-app"
    assert seen["from_agent"]["x-authz-route"] == "list-orders"
    assert "x-authz-admin" not in seen["from_agent"]
    assert seen["authorization_reached_app"] is False


def test_forward_token_route_passes_authorization_on(stack: Stack) -> None:
    r = stack.get("/v1/export", stack.idp.mint())
    assert r.status == 200 and r.json()["authorization_reached_app"] is True


def test_no_token_is_401_with_bearer_challenge_and_problem_json(stack: Stack) -> None:
    r = stack.get("/v1/orders")
    assert r.status == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["reason"] == R.TOKEN_MISSING and body["status"] == 401 and body["decision_id"]


def test_expired_token_is_401_invalid_token(stack: Stack) -> None:
    now = int(time.time())
    r = stack.get("/v1/orders", stack.idp.mint(iat=now - 900, exp=now - 120))
    assert r.status == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert r.json()["reason"] == R.TOKEN_EXPIRED


def test_forged_signature_is_401(stack: Stack) -> None:
    h, _, s = stack.idp.mint().split(".")
    other = stack.idp.mint(sub="admin").split(".")[1]
    r = stack.get("/v1/orders", f"{h}.{other}.{s}")
    assert r.status == 401 and r.json()["reason"] == R.TOKEN_SIGNATURE_INVALID


def test_missing_scope_is_403_insufficient_scope(stack: Stack) -> None:
    r = stack.get("/v1/orders", stack.idp.mint(scope="profile"))
    assert r.status == 403
    assert r.headers["www-authenticate"] == (
        'Bearer error="insufficient_scope", error_description="scope_missing", scope="orders:read"'
    )


def test_object_level_check_through_envoy(stack: Stack) -> None:
    token = stack.idp.mint(tenant_id="acme")
    assert stack.get("/v1/tenants/acme/orders/1", token).status == 200
    r = stack.get("/v1/tenants/globex/orders/1", token)
    assert r.status == 403 and r.json()["reason"] == R.CLAIM_MISMATCH


def test_public_route_and_default_deny(stack: Stack) -> None:
    assert stack.get("/healthz").status == 200
    r = stack.get("/admin/users")
    assert r.status == 403 and r.json()["reason"] == R.NO_ROUTE


def test_path_tricks_never_reach_a_route_they_do_not_match(stack: Stack) -> None:
    token = stack.idp.mint(tenant_id="acme")
    # Envoy normalises (%2e%2e -> ..) before asking; the agent decides on the normalised path.
    r = request(
        stack.port, "GET", "/v1/tenants/acme/orders/%2e%2e/%2e%2e/globex/orders/1", {"authorization": f"Bearer {token}"}
    )
    assert r.status == 403
    assert request(stack.port, "GET", "/v1%2Forders", {"authorization": f"Bearer {token}"}).status == 400
    assert stack.get("/v1//orders", stack.idp.mint()).status == 200  # merged to /v1/orders by Envoy


def test_key_rotation_without_restart(stack: Stack) -> None:
    key = stack.idp.rotate(keep_old=True)
    assert stack.get("/v1/orders", stack.idp.mint(key=key)).status == 200
    assert stack.get("/v1/orders", stack.idp.mint(key=stack.idp.keys[1])).status == 200


def test_idp_down_keeps_serving_with_the_last_good_keys(stack: Stack) -> None:
    token = stack.idp.mint()
    stack.idp.mode = "down"
    try:
        assert stack.get("/v1/orders", token).status == 200
        r = stack.get("/v1/orders", stack.idp.mint(header={"kid": "unknown"}))
        assert r.status == 401 and r.json()["reason"] == R.TOKEN_KID_UNKNOWN
    finally:
        stack.idp.mode = "ok"


def test_audit_log_has_every_decision_and_no_token(stack: Stack) -> None:
    token = stack.idp.mint(jti="audit-jti")
    assert stack.get("/v1/orders?x=secret-query", token).status == 200
    assert stack.get("/v1/orders", token + "x").status == 401

    def audited() -> bool:  # the allow, then the deny after it (one writer keeps the order)
        text = stack.agent.audit.read_text() if stack.agent.audit.exists() else ""
        at = text.find('"jti":"audit-jti"')
        return at != -1 and '"decision":"deny"' in text[at:]

    until(audited, "both decisions are audited")
    logs = stack.agent.logs()
    records = [json.loads(line) for line in stack.agent.audit.read_text().splitlines()]
    mine = [r for r in records if r.get("jti") == "audit-jti"]  # alert records (no jti) are in the stream too
    assert mine and mine[0]["path"] == "/v1/orders" and mine[0]["decision"] == "allow"
    assert mine[0]["source"] == "127.0.0.1"
    assert {"decision", "reason", "route", "subject", "decision_id", "time", "latency_us"} <= set(mine[0])
    for part in token.split("."):
        assert part not in logs
    assert "secret-query" not in logs


def test_agent_on_a_unix_socket_and_fail_closed_when_it_dies(make_stack: Callable[..., Stack], transport: str) -> None:
    # A second stack: a second Envoy beside the first (--use-dynamic-base-id), agent on a unix socket.
    s2 = make_stack(listen_unix=True, transport=transport)
    token = s2.idp.mint()
    assert s2.get("/v1/orders", token).status == 200
    s2.agent.stop()
    r = s2.get("/v1/orders", token)
    assert r.status in (403, 503)  # never 200: failure_mode_allow is false
    assert s2.get("/healthz").status != 200


def test_demo_self_test_passes() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--self-test", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 passed, 0 failed" in run.stdout
    assert "ok  200 DPoP: carol's key-bound token with a fresh proof" in run.stdout
    assert "ok  401 DPoP: the same proof replayed -> dpop_proof_replayed" in run.stdout
    assert "ok  200 RFC 9421: billing-batch signs a request (HMAC, Content-Digest)" in run.stdout
    assert "BAD" not in run.stdout
    assert "curl -i -X GET" in run.stdout


def test_rate_limit_over_real_time_through_envoy(stack: Stack) -> None:
    token = stack.idp.mint(sub=f"limited-{stack.port}")
    start = time.monotonic()
    results = [stack.get("/v1/limited", token) for _ in range(20)]
    elapsed = time.monotonic() - start
    allowed = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status == 429]
    assert len(allowed) + len(refused) == 20
    assert 5 <= len(allowed) <= 5 + 5 * elapsed + 1  # the burst, plus what refilled meanwhile
    assert allowed[0].headers["ratelimit-policy"] == '"limited";q=5;w=1'  # to the client, from the agent
    assert allowed[0].headers["ratelimit"].startswith('"limited";r=4;')
    over = refused[0]
    assert over.json()["reason"] == R.RATE_LIMITED and over.headers["retry-after"] == "1"
    assert over.headers["ratelimit"] == '"limited";r=0;t=1'
    time.sleep(0.5)  # 2.5 tokens back at 5/s
    assert [stack.get("/v1/limited", token).status for _ in range(3)][:2] == [200, 200]
    other = stack.idp.mint(sub=f"other-{stack.port}")
    assert stack.get("/v1/limited", other).status == 200  # one bucket per subject


def test_prometheus_metrics_on_the_admin_port(stack: Stack) -> None:
    import urllib.request

    token = stack.idp.mint()
    assert stack.get("/v1/orders", token).status == 200
    assert stack.get("/v1/orders").status == 401
    with urllib.request.urlopen(f"http://{stack.agent.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert samples['authz_decisions_total{decision="allow",reason="allowed",route="list-orders"}'] >= 1
    assert samples['authz_decisions_total{decision="deny",reason="token_missing",route="list-orders"}'] >= 1
    assert samples["authz_decision_latency_seconds_count"] >= 2
    assert samples['authz_jwks_fetch_ok{provider="corp"}'] in (0.0, 1.0)  # an earlier test took the IdP down
    assert samples['authz_jwks_keys{provider="corp"}'] >= 1
    assert samples["authz_ready"] == 1.0
    assert any(k.startswith("authz_policy_info{") for k in samples)
    assert "authz_audit_records_dropped_total" in samples and token not in text


def test_alerts_fire_through_envoy_and_reach_the_webhook(stack: Stack) -> None:
    import http.client

    for _ in range(6):  # threshold 5 failed authentications from one address within a minute
        assert stack.get("/v1/orders", stack.idp.mint() + "x").status == 401
    token = stack.idp.mint(jti=f"spread-{stack.port}")
    assert stack.get("/v1/orders", token).status == 200
    # The same token from a second address (127.0.0.2 is loopback too): threshold 2 addresses.
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10, source_address=("127.0.0.2", 0))
    conn.request("GET", "/v1/orders", headers={"authorization": f"Bearer {token}"})
    assert conn.getresponse().status == 200
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kinds = {a["alert"] for a in stack.alerts}
        if {"failed_authentication", "token_from_many_addresses"} <= kinds:
            break
        time.sleep(0.1)
    spread = [a for a in stack.alerts if a["alert"] == "token_from_many_addresses"]
    assert spread and spread[-1]["addresses"] == ["127.0.0.1", "127.0.0.2"] and spread[-1]["service"] == "orders"
    assert any(a["alert"] == "failed_authentication" for a in stack.alerts)
    until(lambda: '"alert":"token_from_many_addresses"' in stack.agent.logs(), "the alert is audited")
    audit = stack.agent.audit.read_text()
    assert '"type":"alert","time"' in audit and '"alert":"token_from_many_addresses"' in audit
    assert token.split(".")[2] not in json.dumps(stack.alerts) + audit


TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


def _metrics(stack: Stack) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://{stack.agent.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def test_repeated_requests_are_each_decided_counted_and_audited(stack: Stack, tmp_path: Path) -> None:
    """Through Envoy, a token repeated on one route: after the first decision each is answered from memory (on the
    native transport straight from the CheckRequest bytes), and each still gets its own decision id, upstream
    headers, count and chained audit record."""
    from agent.audit.chain import verify

    token = stack.idp.mint(sub=f"repeat-{stack.port}", jti=f"repeat-{stack.port}")
    allowed = 'authz_decisions_total{decision="allow",reason="allowed",route="list-orders"}'
    before = _metrics(stack)
    ids = []
    for _ in range(40):
        r = stack.get("/v1/orders", token, x_request_id="spoof-me-not", traceparent=TRACEPARENT)
        assert r.status == 200
        seen = r.json()
        assert seen["from_agent"]["x-authz-subject"] == f"repeat-{stack.port}"
        assert seen["from_agent"]["x-authz-route"] == "list-orders" and not seen["authorization_reached_app"]
        ids.append(seen["from_agent"]["x-authz-decision-id"])
    assert len(set(ids)) == 40
    after = _metrics(stack)
    assert after[allowed] - before.get(allowed, 0.0) == 40
    assert after["authz_remembered_allows_total"] - before["authz_remembered_allows_total"] >= 39
    until(lambda: ids[-1] in stack.agent.audit.read_text(), "the last decision is audited")
    data = stack.agent.audit.read_bytes()
    whole = tmp_path / "audit.log"
    whole.write_bytes(data[: data.rindex(b"\n") + 1])  # the writer may be mid-line
    assert verify([whole]).problem is None
    records = [json.loads(line) for line in whole.read_text().splitlines()]
    mine = {r["decision_id"]: r for r in records if r.get("decision_id") in set(ids)}
    assert len(mine) == 40
    assert {(r["route"], r["decision"], r["subject"], r["source"], r["jti"]) for r in mine.values()} == {
        ("list-orders", "allow", f"repeat-{stack.port}", "127.0.0.1", f"repeat-{stack.port}")
    }
    # Joined with Envoy's log (its own fresh x-request-id each time, not the client's) and the caller's trace.
    request_ids = {r["request_id"] for r in mine.values()}
    assert len(request_ids) == 40 and "spoof-me-not" not in request_ids and None not in request_ids
    assert {r["trace_id"] for r in mine.values()} == {TRACEPARENT.split("-")[1]}
    assert {json.dumps(r["params"]) for r in mine.values()} == {"{}"}
    assert token not in whole.read_text()


def _get_from(stack: Stack, source: str, path: str, token: str) -> int:
    """A request from another loopback address: Envoy sees it as the connection's peer."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {token}"})
        return conn.getresponse().status
    finally:
        conn.close()


def _audited_alerts(stack: Stack, kind: str) -> list[dict[str, object]]:
    text = stack.agent.audit.read_text() if stack.agent.audit.exists() else ""
    lines = [line for line in text.splitlines() if f'"alert":"{kind}"' in line]
    return [json.loads(line) for line in lines]


def test_authorization_failures_raised_at_the_threshold_not_below(stack: Stack) -> None:
    """403s of one authenticated client (threshold 3 a minute): two do not raise it, three do, in all three places."""
    metric = 'authz_alerts_total{alert="authorization_failures"}'
    before = _metrics(stack).get(metric, 0.0)
    below = stack.idp.mint(client_id=f"below-{stack.port}", scope="profile")
    for _ in range(2):
        assert stack.get("/v1/orders", below).status == 403
    prober = stack.idp.mint(client_id=f"prober-{stack.port}", sub="mallory", scope="profile")
    assert stack.get("/v1/orders", prober).status == 403  # scope_missing
    assert stack.get("/v1/tenants/t1/orders/1", prober).status == 403
    assert stack.get("/v1/orders", prober).status == 403
    mine = f"prober-{stack.port}"
    until(lambda: any(a.get("client_id") == mine for a in stack.alerts), "the webhook receives the alert")
    hooked = [a for a in stack.alerts if a["alert"] == "authorization_failures" and a["client_id"] == mine]
    assert len(hooked) == 1
    assert hooked[0]["service"] == "orders" and hooked[0]["subject"] == "mallory" and hooked[0]["count"] == 3
    assert hooked[0]["routes"] == ["list-orders", "read-order"] and hooked[0]["reasons"] == [R.SCOPE_MISSING]
    until(lambda: any(r["client_id"] == mine for r in _audited_alerts(stack, "authorization_failures")), "audited")
    # The two below the threshold were decided before the three (and the alert) and raised nothing.
    below_id = f"below-{stack.port}"
    assert not any(a.get("client_id") == below_id for a in stack.alerts)
    assert not any(r["client_id"] == below_id for r in _audited_alerts(stack, "authorization_failures"))
    assert _metrics(stack)[metric] - before == 1
    text = json.dumps(stack.alerts) + stack.agent.audit.read_text()
    assert prober.split(".")[2] not in text and below.split(".")[2] not in text


def test_new_source_network_raised_from_a_new_24_not_from_the_same_one(stack: Stack) -> None:
    """A client's first network is learned; another host of that /24 raises nothing, another /24 raises the alert
    (127.0.0.0/8 is all loopback: 127.0.1.1 is another /24)."""
    metric = 'authz_alerts_total{alert="new_source_network"}'
    before = _metrics(stack).get(metric, 0.0)
    client = f"roamer-{stack.port}"
    token = stack.idp.mint(client_id=client, sub="svc-roamer")
    assert _get_from(stack, "127.0.0.1", "/v1/orders", token) == 200  # learned silently
    assert _get_from(stack, "127.0.0.1", "/v1/orders", token) == 200  # a remembered allow, on native
    assert _get_from(stack, "127.0.0.2", "/v1/orders", token) == 200  # the same /24
    assert _get_from(stack, "127.0.1.1", "/v1/orders", token) == 200
    until(lambda: any(a.get("client_id") == client for a in stack.alerts), "the webhook receives the alert")
    # One alert for the client, and it names 127.0.1.0/24: had 127.0.0.2 raised one, the client's cooldown would
    # have held this one back.
    hooked = [a for a in stack.alerts if a["alert"] == "new_source_network" and a["client_id"] == client]
    assert hooked == [
        {"alert": "new_source_network", "service": "orders", "client_id": client, "subject": "svc-roamer",
         "network": "127.0.1.0/24", "known_networks": 1, "source": "127.0.1.1"}
    ]  # fmt: skip
    until(lambda: any(r["client_id"] == client for r in _audited_alerts(stack, "new_source_network")), "audited")
    assert _metrics(stack)[metric] - before == 1
    assert token.split(".")[2] not in json.dumps(stack.alerts) + stack.agent.audit.read_text()
