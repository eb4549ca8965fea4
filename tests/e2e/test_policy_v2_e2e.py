"""Policy language v2 (issue 12) through a real Envoy to a real upstream, on both transports.

One Envoy and one `authz-agent run` per transport serve a policy holding every route below, with the local IdP's
JWKS fetched over HTTP. The rules are those the issue names: the owner or a support agent, the office network,
business hours, a client blocked on every route, a limit per tenant, and an agent restarted after a grant ended.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from agent import reasons as R
from agent.demo.app import demo_app, start_site
from agent.demo.idp import LocalIdP
from agent.envoyconf import EnvoyProcess, bootstrap
from tests.e2e.conftest import AgentProcess, LoopThread, Response, free_port, idp_yaml, request
from tests.wait import until

POLICY = """version: 1
service: orders
{idp}routes:
  - name: order
    match: {{methods: [GET], path: "/v1/orders/{{id}}"}}
    authn: [jwt]
    allow:
      - claims: {{sub: "{{id}}"}}
      - roles_any: [support]
  - name: office
    match: {{methods: [GET], path: /v1/office/loopback}}
    authn: [jwt]
    allow: {{source_cidrs: [127.0.0.0/8]}}
  - name: office-elsewhere
    match: {{methods: [GET], path: /v1/office/elsewhere}}
    authn: [jwt]
    allow: {{source_cidrs: [198.51.100.0/24]}}
  - name: office-second-address
    match: {{methods: [GET], path: /v1/office/second}}
    authn: [jwt]
    allow: {{source_cidrs: [127.0.0.2/32]}}
  - name: always-open
    match: {{methods: [GET], path: /v1/hours/open}}
    authn: [jwt]
    allow: {{when: 'now.getHours("UTC") >= 0'}}
  - name: never-open
    match: {{methods: [GET], path: /v1/hours/closed}}
    authn: [jwt]
    allow: {{when: 'now.getHours("UTC") < 0'}}
  - name: berlin-open
    match: {{methods: [GET], path: /v1/hours/berlin-open}}
    authn: [jwt]
    allow: {{when: 'now.getHours("Europe/Berlin") in {hours}'}}
  - name: berlin-closed
    match: {{methods: [GET], path: /v1/hours/berlin-closed}}
    authn: [jwt]
    allow: {{when: '!(now.getHours("Europe/Berlin") in {hours})'}}
  - name: reports
    match: {{methods: [GET], path: /v1/reports}}
    authn: [jwt]
    allow: {{}}
    rate_limit: {{key: "claim:tenant_id", per_minute: 2}}
  - name: grant
    match: {{methods: [GET], path: /v1/grant}}
    authn: [jwt]
    allow:
      roles_any: [auditor]
      not_after: "{not_after}"
  - name: health
    match: {{path: /healthz}}
    public: true
deny:
  - name: block-scraper
    when: 'client_id == "scraper"'
default: deny
"""


def berlin_hours() -> list[int]:
    """The hour before, the hour of and the hour after now in Berlin: a window that holds for the whole run."""
    h = datetime.now(ZoneInfo("Europe/Berlin")).hour
    return [(h - 1) % 24, h, (h + 1) % 24]


def write_policy(path: Path, idp: LocalIdP, not_after: datetime) -> None:
    hours = json.dumps(berlin_hours())
    path.write_text(POLICY.format(idp=idp_yaml(idp.issuer), hours=hours, not_after=not_after.isoformat()))


@dataclass
class V2:
    port: int
    idp: LocalIdP
    envoy: EnvoyProcess
    agent: AgentProcess
    transport: str
    policy: Path
    work: Path

    def get(self, path: str, token: str | None = None, headers: dict[str, str] | None = None) -> Response:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["authorization"] = f"Bearer {token}"
        return request(self.port, "GET", path, hdrs)

    def get_from(self, source: str, path: str, token: str) -> Response:
        """A request from another loopback address: Envoy sees it as the connection's peer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(source, 0))
        try:
            conn.request("GET", path, headers={"authorization": f"Bearer {token}"})
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def write_policy(self, not_after: datetime) -> None:
        write_policy(self.policy, self.idp, not_after)

    def audited(self, jti: str) -> list[dict[str, Any]]:
        text = self.agent.audit.read_text() if self.agent.audit.exists() else ""
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [rec for rec in records if rec.get("jti") == jti]

    def audit_of(self, jti: str) -> dict[str, Any]:
        """The one audit record of the request made with the token whose jti is `jti` (waits for the writer)."""
        until(lambda: self.audited(jti), f"the request with jti {jti} is audited")
        [record] = self.audited(jti)
        return record


def reason(r: Response) -> str | None:
    try:
        return str(r.json().get("reason"))
    except ValueError:
        return None


@pytest.fixture(scope="module")
def v2(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[V2]:
    work = tmp_path_factory.mktemp(f"v2-{transport}")
    idp = LocalIdP()
    loop_thread.run(idp.start())
    runner: web.AppRunner
    runner, app_port = loop_thread.run(start_site(demo_app()))
    listen = f"127.0.0.1:{free_port()}"
    port = free_port()
    envoy = EnvoyProcess(bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{app_port}", listen), work)
    policy = work / "policy.yaml"
    write_policy(policy, idp, datetime.now(UTC) + timedelta(days=1))
    stack: V2 | None = None
    try:
        stack = V2(port, idp, envoy, AgentProcess(policy, listen, work, transport), transport, policy, work)
        envoy.start()
        until(lambda: stack.get("/healthz").status == 200, "Envoy reaches the agent")
        yield stack
    finally:
        envoy.stop()
        if stack is not None:
            stack.agent.stop()  # the one running now: the restart test replaces it
        loop_thread.run(runner.cleanup())
        loop_thread.run(idp.stop())


def test_the_owner_or_a_support_agent(v2: V2) -> None:
    owner = v2.idp.mint(sub="alice", jti=f"owner-{v2.transport}")
    r = v2.get("/v1/orders/alice", owner)
    assert r.status == 200, r.body
    assert r.json()["from_agent"]["x-authz-subject"] == "alice"

    support = v2.idp.mint(sub="bob", roles=["support"], jti=f"support-{v2.transport}")
    r = v2.get("/v1/orders/alice", support)  # another's order
    assert r.status == 200, r.body
    assert r.json()["from_agent"]["x-authz-subject"] == "bob"

    other = v2.idp.mint(sub="carol", roles=["customer"], jti=f"other-{v2.transport}")
    r = v2.get("/v1/orders/alice", other)
    assert (r.status, reason(r)) == (403, R.CLAIM_MISMATCH)  # every alternative refused: the first one's refusal
    assert v2.get("/v1/orders/carol", v2.idp.mint(sub="carol")).status == 200  # her own

    # The audit record names the alternative that allowed.
    assert v2.audit_of(f"owner-{v2.transport}")["allow_index"] == 0
    assert v2.audit_of(f"support-{v2.transport}")["allow_index"] == 1
    refused = v2.audit_of(f"other-{v2.transport}")
    assert refused["decision"] == "deny" and "allow_index" not in refused


def test_the_office_network_is_envoys_real_peer_address(v2: V2) -> None:
    token = v2.idp.mint(sub="alice", jti=f"office-{v2.transport}")
    r = v2.get("/v1/office/loopback", token)
    assert r.status == 200, r.body
    assert v2.audit_of(f"office-{v2.transport}")["source"] == "127.0.0.1"  # what the agent saw, from Envoy

    # A client's claim about its address changes nothing: the source is the connection's peer.
    r = v2.get("/v1/office/elsewhere", token, {"x-forwarded-for": "198.51.100.7", "x-real-ip": "198.51.100.7"})
    assert (r.status, reason(r)) == (403, R.CONDITION_FAILED)

    # The address is the real one per connection, not a constant: 127.0.0.2 only from 127.0.0.2.
    r = v2.get("/v1/office/second", token)
    assert (r.status, reason(r)) == (403, R.CONDITION_FAILED)
    second = v2.idp.mint(sub="alice", jti=f"office-second-{v2.transport}")
    assert v2.get_from("127.0.0.2", "/v1/office/second", second).status == 200
    assert v2.audit_of(f"office-second-{v2.transport}")["source"] == "127.0.0.2"


def test_business_hours_against_the_real_clock(v2: V2) -> None:
    token = v2.idp.mint(sub="alice")
    assert v2.get("/v1/hours/open", token).status == 200
    r = v2.get("/v1/hours/closed", token)
    assert (r.status, reason(r)) == (403, R.CONDITION_FAILED)
    # A window in a named time zone: the hour around now in Berlin is open, the rest of the day closed.
    assert v2.get("/v1/hours/berlin-open", token).status == 200
    r = v2.get("/v1/hours/berlin-closed", token)
    assert (r.status, reason(r)) == (403, R.CONDITION_FAILED)


def test_a_blocked_client_is_refused_on_every_route(v2: V2) -> None:
    # The same identity through another client passes: the block is the only difference.
    allowed = v2.idp.mint(sub="alice", roles=["support", "auditor"], tenant_id=f"scrape-{v2.transport}")
    path_route = {
        "/v1/orders/alice": "order",
        "/v1/orders/bob": "order",
        "/v1/office/loopback": "office",
        "/v1/hours/open": "always-open",
        "/v1/reports": "reports",
        "/v1/grant": "grant",
    }
    routes = list(path_route)
    assert [v2.get(p, allowed).status for p in routes] == [200] * len(routes)

    for i, path in enumerate(routes):
        jti = f"scraper-{v2.transport}-{i}"
        scraper = v2.idp.mint(
            sub="alice", client_id="scraper", roles=["support", "auditor"], tenant_id=f"scrape-{v2.transport}", jti=jti
        )
        r = v2.get(path, scraper)
        assert (r.status, reason(r)) == (403, R.DENIED_BY_RULE), path
        record = v2.audit_of(jti)
        assert record["deny_rule"] == "block-scraper" and record["reason"] == R.DENIED_BY_RULE
        assert (record["client_id"], record["route"], record["status"]) == ("scraper", path_route[path], 403)
    # A top-level rule reading credentials is judged only on routes that authenticate (a load warning says so).
    assert v2.get("/healthz", scraper).status == 200


def test_one_bucket_per_tenant(v2: V2) -> None:
    tenant_a, tenant_b = f"acme-{v2.transport}", f"globex-{v2.transport}"
    a1 = v2.idp.mint(sub="a1", tenant_id=tenant_a)
    a2 = v2.idp.mint(sub="a2", tenant_id=tenant_a)  # another user of the same tenant shares its bucket
    b1 = v2.idp.mint(sub="b1", tenant_id=tenant_b)
    assert [v2.get("/v1/reports", t).status for t in (a1, a2)] == [200, 200]
    r = v2.get("/v1/reports", a1)
    assert (r.status, reason(r)) == (429, R.RATE_LIMITED)
    assert v2.get("/v1/reports", a2).status == 429
    assert [v2.get("/v1/reports", b1).status for _ in range(2)] == [200, 200]  # tenant B: its own bucket
    assert v2.get("/v1/reports", b1).status == 429


def test_an_agent_restarted_after_its_grant_ended_serves_again(v2: V2) -> None:
    listen = v2.agent.listen
    auditor = v2.idp.mint(sub="dana", roles=["auditor"])
    # The grant ends a few seconds from now: long enough for the agent to start and answer once. On a machine
    # so loaded that the start takes longer, the same steps run again with a longer grant (never a longer sleep).
    for margin_s in (6, 15, 40):
        v2.agent.stop()
        ends = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=margin_s)
        v2.write_policy(ends)
        v2.agent = AgentProcess(v2.policy, listen, v2.work, v2.transport)
        until(lambda: v2.get("/healthz").status == 200, "Envoy reaches the new agent")
        r = v2.get("/v1/grant", auditor)
        if r.status == 200:
            break
        assert reason(r) == R.GRANT_NOT_ACTIVE, r.body  # only an ended grant may refuse here
    else:
        raise AssertionError("the grant ended before the agent answered, three times")

    until(lambda: datetime.now(UTC) >= ends, "the grant's end", timeout=30)
    # The same token that was just allowed: a clock condition is judged per request, never remembered with it.
    until(lambda: v2.get("/v1/grant", auditor).status == 403, "the ended grant refuses", timeout=5)
    assert reason(v2.get("/v1/grant", auditor)) == R.GRANT_NOT_ACTIVE

    # Restarted with the same file, its not_after now in the past: it starts, warns, and serves.
    v2.agent.stop()
    logged = v2.agent.stderr_path.stat().st_size

    def since_restart() -> str:
        return v2.agent.stderr_path.read_bytes()[logged:].decode()

    v2.agent = AgentProcess(v2.policy, listen, v2.work, v2.transport)  # waits for /readyz
    until(lambda: v2.get("/healthz").status == 200, "Envoy reaches the restarted agent")
    line = next(n for n, text in enumerate(v2.policy.read_text().splitlines(), 1) if "not_after:" in text)
    where = f"{v2.policy}:{line}: warning:"
    until(lambda: where in since_restart(), "the restarted agent logs the ended grant")
    [warning] = [x for x in since_restart().splitlines() if where in x]
    assert "not_after is in the past" in warning

    owner = v2.idp.mint(sub="alice")
    assert [v2.get(p, owner).status for p in ("/v1/orders/alice", "/v1/office/loopback", "/v1/hours/open")] == [
        200,
        200,
        200,
    ]
    r = v2.get("/v1/grant", auditor)
    assert (r.status, reason(r)) == (403, R.GRANT_NOT_ACTIVE)
