"""`authz-agent policy test --init`: the starter file is a valid test file that passes as written, with one
allowed and one refused case per route, for the demo's policy, the design's and one that uses every condition."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from agent.errors import ConfigErrors
from agent.policytest import FileResult, run_file
from agent.policytest.cases import Case, read_test_file
from agent.policytest.cases import TestFile as Suite  # renamed: pytest would collect a Test* name
from agent.policytest.init import starter_file

ROOT = Path(__file__).parent.parent.parent

# Every kind of route the generator meets: alternatives, claims from path parameters, nested claim names, networks,
# headers, step-up, DPoP and certificate binding, a second provider with a key file and a third that only
# introspects (neither is ever read), HMAC clients (one signing a header), a route taking both, a `when` the
# generator cannot satisfy, grant windows that ended and that have not begun, shadow mode, public routes, and deny
# rules, one of them blocking the runner's default source address.
SHOP = textwrap.dedent("""\
    version: 1
    service: shop
    identity_providers:
      corp:
        issuer: https://idp.example.com
        jwks_uri: https://127.0.0.1:9/jwks.json        # points nowhere: a policy test never fetches
        audiences: [shop-api]
        algorithms: [ES256]
        claims: {roles: realm_access.roles, scopes: scp}
      partner:
        issuer: https://partner.example.net
        jwks_file: keys/partner-jwks.json              # not there: a policy test never reads it
        audiences: [shop-api]
        algorithms: [RS256]
      legacy:
        issuer: https://as.example.org
        introspection_endpoint: https://127.0.0.1:9/introspect
        client_id: shop
        client_secret_file: keys/legacy-secret         # not there: a throwaway value stands in
        audiences: [shop-api]
        algorithms: [ES256]
    providers: [corp]
    dpop: {use_dpop_nonce: true}
    hmac_clients:
      batch:
        key_file: keys/batch.key
        roles: [billing]
        components: ["@method", "@authority", "@path", x-batch-run]
      reporter:
        key_file: keys/reporter.key
        scopes: ["reports:write"]
    deny:
      - {name: test-net, source_cidrs: [192.0.2.0/24]}
      - {name: flagged, headers: {x-flagged: "yes"}}
    routes:
      - name: list-items
        match: {methods: [GET], path: /v1/items}
        authn: [jwt]
        allow: {scopes_any: ["items:read", "items:all"]}
      - name: tenant-item
        match: {methods: [GET, PUT], path: "/v1/tenants/{tenant}/items/{id}"}
        authn: [jwt]
        allow:
          - {when: 'claims.level > 3'}
          - {scopes_all: ["items:read"], claims: {org.id: "{tenant}", verified: true, tier: 2}}
          - {roles_all: [support, eu], source_cidrs: [10.20.0.0/16]}
      - name: support-item
        match: {methods: [GET], path: "/v1/support/{id}"}
        authn: [jwt]
        allow:
          - {roles_all: [support, eu], source_cidrs: [10.20.0.0/16, "2001:db8:5::/48"]}
      - name: admin
        match: {methods: [DELETE, POST], path: "/v1/admin/**"}
        authn: [jwt]
        allow:
          roles_any: [admin]
          acr_any: [mfa]
          max_auth_age_s: 300
          headers: {x-console: {present: true}, x-env: prod, x-trace: {prefix: "t-"}}
      - name: partner-feed
        match: {methods: [GET], path: /v1/feed}
        authn: [jwt]
        providers: [partner]
        allow: {claims: {partner: true}}
      - name: legacy-orders
        match: {methods: [GET], path: /v1/legacy/orders}
        authn: [jwt]
        providers: [legacy]
        allow: {scopes_all: [legacy]}
      - name: write-items
        match: {methods: [POST], path: /v1/items}
        authn: [jwt]
        bind: dpop
        allow: {roles_any: [writer]}
      - name: replace-items
        match: {methods: [PUT], path: /v1/items}
        authn: [jwt]
        bind: mtls
        allow: {}
      - name: settle
        match: {methods: [POST], path: "/v1/settle/{batch}"}
        authn: [jwt, hmac]
        allow: {roles_any: [billing]}
      - name: reports
        match: {methods: [POST], path: /v1/reports}
        authn: [hmac]
        allow: {scopes_any: ["reports:write"]}
      - name: level-check
        match: {methods: [GET], path: /v1/levels}
        authn: [jwt]
        allow: {when: 'claims.level > 3'}
      - name: contractor-ended
        match: {methods: [GET], path: /v1/contracts}
        authn: [jwt]
        allow: {roles_any: [contractor], not_before: "2020-01-01T00:00:00Z", not_after: "2020-02-01T00:00:00Z"}
      - name: contractor-future
        match: {methods: [POST], path: /v1/contracts}
        authn: [jwt]
        allow: {roles_any: [contractor], not_before: "2099-01-01T00:00:00Z"}
      - name: beta
        match: {methods: [GET], path: /v1/beta}
        authn: [jwt]
        mode: shadow
        allow: {roles_any: [beta]}
      - name: status
        match: {methods: [GET], path: /status}
        public: true
      - name: health
        match: {path: /healthz}
        public: true
    default: deny
    """)


def starter(policy: Path) -> tuple[str, Suite, FileResult]:
    """Make the starter beside the policy, read it as `policy test` does, and run it."""
    text = starter_file(str(policy))
    out = policy.with_name(policy.stem + ".test.yaml")
    out.write_text(text, encoding="utf-8")
    tests = read_test_file(out)
    result = run_file(out)
    assert not result.errors, result.errors
    failed = [(c.name, c.problems) for c in result.cases if not c.ok]
    assert not failed and result.passed == len(tests.cases) > 0
    return text, tests, result


def by_route(tests: Suite) -> dict[str, list[Case]]:
    """The cases of each route (a case that matched no route is named after the route it was made for)."""
    out: dict[str, list[Case]] = {}
    for c in tests.cases:
        route = c.expect.route if c.expect.route is not None else c.name.split(" ")[0]
        out.setdefault(route, []).append(c)
    return out


def one_allowed_one_refused(cases: list[Case], route: str) -> tuple[Case, Case]:
    assert len(cases) == 2, [c.name for c in cases]
    allowed, refused = cases
    assert allowed.expect.status == 200 and allowed.expect.route == route and allowed.name.startswith(route)
    assert refused.expect.status in (401, 403) and refused.expect.reason
    return allowed, refused


@pytest.fixture
def shop(tmp_path: Path) -> tuple[str, Suite, FileResult]:
    policy = tmp_path / "shop.yaml"
    policy.write_text(SHOP, encoding="utf-8")
    return starter(policy)


def test_design_policy(tmp_path: Path) -> None:
    shutil.copy(ROOT / "tests/fixtures/design_policy.yaml", tmp_path)
    shutil.copytree(ROOT / "tests/fixtures/keys", tmp_path / "keys")
    text, tests, _ = starter(tmp_path / "design_policy.yaml")
    routes = by_route(tests)
    assert set(routes) == {"list-orders", "read-order", "create-order", "read-order-support", "billing-webhook",
                           "health"}  # fmt: skip
    for name in routes.keys() - {"health"}:
        one_allowed_one_refused(routes[name], name)
    allowed, refused = routes["read-order"]
    assert allowed.token is not None and allowed.token.claims["tenant_id"] == allowed.path.split("/")[3]
    assert refused.expect.reason == "scope_missing"
    # Alternative 0 is a `when` over claims it cannot guess: the next one, with its network, is taken.
    support, _ = routes["read-order-support"]
    assert ipaddress.ip_address(support.source) in ipaddress.ip_network("10.0.0.0/8")
    assert "not met by the generated request: alternative 0 (line 43)" in text
    assert routes["create-order"][0].token is not None and routes["create-order"][0].token.dpop
    assert routes["billing-webhook"][0].signed_by == "billing-batch"
    health_ok, health_refused = routes["health"]
    assert health_ok.expect.status == 200 and health_refused.expect.reason == "denied_by_rule"
    assert ipaddress.ip_address(health_refused.source) in ipaddress.ip_network("203.0.113.0/24")
    assert text.startswith("# Starter tests for design_policy.yaml") and "\npolicy: design_policy.yaml\n" in text


def test_demo_policy(tmp_path: Path) -> None:
    text = (ROOT / "agent/demo/policy.yaml").read_text(encoding="utf-8")
    # The demo fills in its local identity provider when it starts; any loopback URL loads (nothing is fetched).
    policy = tmp_path / "policy.yaml"
    policy.write_text(text.replace("__ISSUER__", "http://127.0.0.1:9"), encoding="utf-8")
    _, tests, result = starter(policy)
    routes = by_route(tests)
    for name in ("list-orders", "read-order", "create-order", "billing-webhook"):
        one_allowed_one_refused(routes[name], name)
    assert routes["health"][0].expect.status == 200
    assert any("billing-batch" in n and "throwaway" in n for n in result.notes)


def test_every_kind_of_route(shop: tuple[str, Suite, FileResult]) -> None:
    text, tests, result = shop
    routes = by_route(tests)
    refusals = {
        "list-items": "scope_missing",
        "tenant-item": "condition_failed",  # every alternative refuses: the first one's refusal is the answer
        "support-item": "role_missing",
        "admin": "role_missing",
        "partner-feed": "claim_mismatch",
        "legacy-orders": "scope_missing",
        "write-items": "role_missing",
        "replace-items": "token_missing",  # `allow: {}` reads no credentials: refused without any
        "settle": "role_missing",
        "reports": "scope_missing",
        "contractor-ended": "role_missing",
        "contractor-future": "role_missing",
        "beta": "token_missing",  # shadow mode passes any token; only authentication refuses
    }
    cases = {}
    for name, reason in refusals.items():
        allowed, refused = one_allowed_one_refused(routes[name], name)
        assert refused.expect.reason == reason, (name, refused.expect)
        cases[name] = (allowed, refused)
    for allowed, refused in cases.values():
        for c in (allowed, refused):  # the default source is in a deny rule's network: another one is used
            assert ipaddress.ip_address(c.source) not in ipaddress.ip_network("192.0.2.0/24")

    def claims(c: Case) -> dict[str, object]:
        assert c.token is not None
        return c.token.claims

    tenant = cases["tenant-item"][0]
    assert tenant.name == "tenant-item allowed (alternative 1)" and tenant.path == "/v1/tenants/tenant-1/items/id-1"
    assert claims(tenant) == {"sub": "alice", "scp": "items:read", "org": {"id": "tenant-1"}, "verified": True,
                              "tier": 2}  # fmt: skip
    assert claims(cases["tenant-item"][1])["org"] == {"id": "not-tenant-1"}
    support = cases["support-item"][0]
    assert claims(support)["realm_access"] == {"roles": ["eu", "support"]} and support.source == "10.20.0.1"
    admin, admin_refused = cases["admin"]
    assert admin.method == "DELETE" and admin.path == "/v1/admin/example"
    assert admin.headers == {"x-console": "1", "x-env": "prod", "x-trace": "t-example"}
    assert claims(admin)["acr"] == "mfa" and isinstance(claims(admin)["auth_time"], int)
    assert claims(admin_refused) == {"sub": "alice"}
    assert cases["partner-feed"][0].token is not None and cases["partner-feed"][0].token.provider == "partner"
    assert cases["legacy-orders"][0].token is not None and cases["legacy-orders"][0].token.provider == "legacy"
    assert cases["write-items"][0].token is not None and cases["write-items"][0].token.dpop
    assert cases["replace-items"][0].token is not None and cases["replace-items"][0].token.mtls
    reports, reports_refused = cases["reports"]
    assert reports.signed_by == "reporter" and reports_refused.signed_by == "batch"
    assert reports_refused.headers == {"x-batch-run": "example"}  # batch's signatures cover it
    ended, future = cases["contractor-ended"][0], cases["contractor-future"][0]
    assert ended.at is not None and ended.at.isoformat() == "2020-01-01T00:00:00+00:00"
    assert future.at is not None and future.at.year == 2099
    # A `when` it cannot satisfy: the case says so and expects what the policy decides today.
    level = routes["level-check"]
    assert [c.expect.status for c in level] == [403, 401]
    assert level[0].name == "level-check (no allowed request found)"
    assert "# no allowed request was found" in text
    # Public routes: another method matches no route; a deny rule refuses a route that takes every method.
    status_ok, status_refused = routes["status"]
    assert status_ok.expect.status == 200 and status_refused.method == "DELETE"
    assert status_refused.expect.reason == "no_route" and status_refused.expect.route is None
    assert routes["health"][1].expect.reason == "denied_by_rule" and routes["health"][1].source == "192.0.2.1"
    assert any("opaque tokens" in n for n in result.notes)
    assert len(tests.cases) == 2 * len(routes)


def test_the_file_reads_as_plain_yaml_with_the_values_it_means(shop: tuple[str, Suite, FileResult]) -> None:
    text, _, _ = shop
    doc = yaml.safe_load(text)
    assert doc["policy"] == "shop.yaml" and isinstance(doc["at"], str) and doc["at"].endswith("Z")
    by_name = {c["name"]: c for c in doc["cases"]}
    assert by_name["list-items allowed"]["token"]["claims"]["scp"] == "items:all"  # quoted: 'a:b' stays a string
    assert by_name["admin allowed"]["request"]["headers"]["x-console"] == "1"  # a string, not the number 1
    assert "  # route tenant-item (line 40): GET,PUT /v1/tenants/{tenant}/items/{id}; authn: jwt; 3 alternatives" in (
        text.splitlines()
    )
    assert all(len(line) <= 120 for line in text.splitlines() if line.lstrip().startswith("#"))


def test_a_public_route_nothing_refuses(tmp_path: Path) -> None:
    policy = tmp_path / "open.yaml"
    policy.write_text("version: 1\nservice: open\nroutes:\n  - {name: all, match: {path: /**}, public: true}\n")
    text, tests, _ = starter(policy)
    assert [(c.path, c.expect.status) for c in tests.cases] == [("/example", 200)]
    assert "# nothing refuses a request to this public route" in text


def test_header_conditions_as_a_request_can_meet_them(tmp_path: Path) -> None:
    """A rule's `x_client` is the x-client header a request sends (underscored names never reach the agent), and
    a condition on a header Envoy removes before the agent sees it is met by no request: the file still passes."""
    policy = tmp_path / "hdr.yaml"
    policy.write_text(
        textwrap.dedent("""\
        version: 1
        service: hdr
        deny:
          - {name: evil-client, headers: {x_client: evil}}
        routes:
          - name: inside
            match: {path: /inside}
            public: true
            deny:
              - {name: not-from-the-mesh, headers: {x-envoy-internal: {present: true}}}
        """)
    )
    text, tests, result = starter(policy)
    assert "x_client" not in text and "x-envoy-internal" not in text
    assert [(c.name, c.headers, c.expect.status) for c in tests.cases] == [
        ("inside allowed", {}, 200),
        ("inside refused by deny rule evil-client", {"x-client": "evil"}, 403),
    ]
    assert result.uncovered == ["route inside deny rule not-from-the-mesh (line 10)"]


def test_an_invalid_policy_raises_its_errors(tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 1\nservice: bad\nroutes:\n  - {name: x, match: {path: /x}, authn: [jwt], allow: {}}\n")
    with pytest.raises(ConfigErrors) as e:
        starter_file(str(policy))
    assert str(e.value.errors[0]).startswith(f"{policy}:4: ")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # run from the policy's folder, as a service owner does
    return subprocess.run([sys.executable, "-m", "agent", "policy", "test", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)  # fmt: skip


def test_cli_init_then_test(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text(SHOP, encoding="utf-8")
    made = cli("--init", "shop.yaml", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    (tmp_path / "shop.test.yaml").write_text(made.stdout, encoding="utf-8")
    ran = cli("shop.test.yaml", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "32 passed, 0 failed" in ran.stdout and "FAIL" not in ran.stdout


def test_cli_init_usage_and_errors(tmp_path: Path) -> None:
    (tmp_path / "shop.yaml").write_text(SHOP, encoding="utf-8")
    both = cli("--init", "shop.yaml", "other.test.yaml", cwd=tmp_path)
    assert both.returncode == 2 and not both.stdout and "--init" in both.stderr
    (tmp_path / "bad.yaml").write_text("version: 1\nservice: bad\nroutes: []\n", encoding="utf-8")
    bad = cli("--init", "bad.yaml", cwd=tmp_path)
    assert bad.returncode == 1 and not bad.stdout
    assert "bad.yaml:3: " in bad.stderr and "no starter file was made" in bad.stderr
    missing = cli("--init", "nowhere.yaml", cwd=tmp_path)
    assert missing.returncode == 1 and "cannot read the policy" in missing.stderr
