"""A hostile review of `authz-agent policy test` (issue 13, branch lead13): each test is a bug found there, and
fails until it is fixed. Expectations that check nothing or vanish, coverage credited to the wrong rule, test
files that crash the run or multiply memory, a policy file that stops the control plane, revocations held
behind a test run, and the engine's fast path deciding otherwise than the traced path `policy test` uses."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import load_policy
from agent.controlplane.server import Publisher
from agent.decision import RequestView
from agent.engine import Engine
from agent.errors import ConfigErrors
from agent.policytest import run_file
from agent.policytest.cases import TokenSpec, read_test_file
from agent.policytest.runner import Run

ROOT = Path(__file__).parent.parent.parent

POLICY = textwrap.dedent("""\
    version: 1
    service: orders
    identity_providers:
      corp:
        issuer: https://idp.example.com
        jwks_uri: https://idp.example.com/.well-known/jwks.json
        audiences: [orders-api]
        algorithms: [ES256]
    hmac_clients:
      billing-batch:
        key_file: billing.key
        roles: [billing]
        components: ["@method", "@path", "x-batch"]
    dpop:
      use_dpop_nonce: true
    deny:
      - {name: blocked, source_cidrs: [203.0.113.0/24]}
    routes:
      - name: list-orders
        match: {methods: [GET], path: /v1/orders}
        authn: [jwt]
        allow: {}
        deny:
          - {name: blocked, when: 'has(claims.tenant) && claims.tenant == "evil"'}
      - name: create-order
        match: {methods: [POST], path: /v1/orders}
        authn: [jwt]
        bind: dpop
        allow: {}
      - name: mixed
        match: {methods: [POST], path: /v1/mixed}
        authn: [jwt, hmac]
        allow: {}
      - name: billing-webhook
        match: {methods: [POST], path: "/v1/billing/**"}
        authn: [hmac]
        allow: {roles_any: [billing]}
      - name: health
        match: {path: /healthz}
        public: true
    default: deny
    """)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    (tmp_path / "orders.yaml").write_text(POLICY)
    (tmp_path / "billing.key").write_text(base64.b64encode(os.urandom(32)).decode())
    return tmp_path


def write_tests(d: Path, cases: str, head: str = "") -> Path:
    p = d / "orders.test.yaml"
    p.write_text("policy: orders.yaml\n" + head + "cases:\n" + textwrap.indent(textwrap.dedent(cases), "  "))
    return p


# -- expectations that silently check nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        # `expect:` written and not filled in: the case vanishes (no line, no count) and the file passes
        "- name: admin is refused\n  request: {method: GET, path: /v1/admin}\n  expect:\n",
        # `token:` written and not filled in: the case runs without a token, and an expected 401 passes for it
        "- name: an expired token is refused\n  request: {method: GET, path: /v1/orders}\n  token:\n"
        "  expect: {status: 401}\n",
    ],
    ids=["expect-null", "token-null"],
)
def test_a_key_left_empty_is_an_error_at_its_line(policy_dir: Path, case: str) -> None:
    result = run_file(write_tests(policy_dir, case))
    assert result.errors, f"ran as {[(c.name, c.ok) for c in result.cases]}, passed={result.ok}"
    assert any(":3:" in e or ":5:" in e for e in result.errors)


@pytest.mark.parametrize("expect", ["{headers: {}}", "{headers: null}"])
def test_an_expect_that_checks_nothing_is_an_error(policy_dir: Path, expect: str) -> None:
    # docs: "expect (any of them; at least one)"; the file's own error says "expect at least a status or a reason"
    case = f"- name: mallory cannot list orders\n  request: {{method: GET, path: /v1/orders}}\n  expect: {expect}\n"
    result = run_file(write_tests(policy_dir, case))
    assert result.errors, "a case that checks nothing passed: " + str([(c.name, c.ok) for c in result.cases])


# -- coverage --------------------------------------------------------------------------------------------


def test_a_top_level_deny_rule_does_not_cover_a_route_rule_of_the_same_name(policy_dir: Path) -> None:
    cases = """\
        - name: from the blocked network
          request: {method: GET, path: /v1/orders, source: 203.0.113.9}
          token: {claims: {sub: a, tenant: good}}
          expect: {status: 403, reason: denied_by_rule}
        - name: health from the blocked network
          request: {method: GET, path: /healthz, source: 203.0.113.9}
          expect: {status: 403, reason: denied_by_rule}
        """
    result = run_file(write_tests(policy_dir, cases))
    assert result.errors == [] and result.failed == 0
    # Only the top-level rule (line 18) ever held; the route's own `blocked` (line 25, tenant evil) never did.
    assert any(g.startswith("route list-orders deny rule blocked") for g in result.uncovered), result.uncovered


# -- a test file must give errors, never a traceback, and never stop the other cases -----------------------


@pytest.mark.parametrize(
    ("head", "case"),
    [
        # claims nested deeper than Python's recursion limit: RecursionError from the YAML reader
        (
            "",
            "- name: deep\n  request: {path: /v1/orders}\n  token: {claims: {sub: a, x: "
            + "[" * 3000
            + "]" * 3000
            + "}}\n  expect: {status: 401}\n",
        ),
        # a clock before 1970 on a policy with DPoP nonces: struct.error from Nonces.issue
        (
            'at: "1960-01-01T00:00:00Z"\n',
            "- name: before 1970\n  request: {method: POST, path: /v1/orders}\n"
            "  token: {claims: {sub: carol}, dpop: true}\n  expect: {status: 401}\n",
        ),
        # a signed header holding a line break: AuthnError raised by signature_base while signing
        (
            "",
            '- name: line break\n  request: {method: POST, path: /v1/billing/x, headers: {x-batch: "a\\nb"}}\n'
            "  signed_by: billing-batch\n  expect: {status: 401}\n",
        ),
    ],
    ids=["deep-claims", "nonce-before-1970", "signed-line-break"],
)
def test_a_hostile_test_file_is_reported_not_raised(policy_dir: Path, head: str, case: str) -> None:
    result = run_file(write_tests(policy_dir, case, head))  # raises on lead13
    assert not result.ok and (result.errors or result.failed)


def test_yaml_aliases_of_a_long_string_cost_its_size_once(policy_dir: Path) -> None:
    """load_yaml (test files and policies alike, so the control plane too) copies an aliased string's source text
    into a TextSpan at every alias: 1 MiB aliased 150 times is a 1 MiB file and ~150 MiB of memory; the 200,000
    aliases MAX_VALUES allows are ~200 GiB from a 3 MB file."""
    big = "a" * (1 << 20)
    junk = "".join(f"  k{i}: *b\n" for i in range(150))
    path = policy_dir / "orders.test.yaml"
    path.write_text(f'policy: orders.yaml\nanchor: &b "{big}"\njunk:\n{junk}cases: []\n')
    tracemalloc.start()
    try:
        with pytest.raises(ConfigErrors):
            read_test_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"peak {peak >> 20} MiB to read a {path.stat().st_size >> 20} MiB file"


def test_a_policy_path_that_never_ends_fails_in_bounded_time(tmp_path: Path) -> None:
    fifo = tmp_path / "orders.yaml"
    os.mkfifo(fifo)  # as hostile as /dev/zero (which eats memory until MemoryError), without the danger
    t = tmp_path / "orders.test.yaml"
    t.write_text("policy: orders.yaml\ncases:\n  - {name: x, request: {path: /}, expect: {status: 200}}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-m", "agent", "policy", "test", str(t)], env=env, capture_output=True,
                              timeout=20)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("`policy test` still waiting on the policy file after 20 s")
    assert done.returncode == 1 and b"Traceback" not in done.stderr


# -- the control plane ----------------------------------------------------------------------------------


async def test_a_policy_nested_too_deep_does_not_stop_the_control_plane(policy_dir: Path) -> None:
    pub = Publisher(policy_dir, Ed25519PrivateKey.generate())
    await pub.scan()
    assert "orders" in pub.published
    (policy_dir / "evil.yaml").write_text("version: 1\nservice: evil\nroutes: " + "[" * 3000 + "]" * 3000 + "\n")
    (policy_dir / "revocations.yaml").write_text("jti: [stolen]\n")
    # On lead13 RecursionError escapes scan(); in ControlPlane._poll it ends the poll task for good, silently:
    # no policy of any service and no revocation is published again.
    await pub.scan()
    assert "evil" in pub.errors and pub.revocations.sequence == 1


# -- `policy test` decides on the traced path; `run` remembers allows ---------------------------------------


async def test_the_fast_path_decides_a_signed_request_as_the_traced_path_does(policy_dir: Path) -> None:
    """A route taking [jwt, hmac] judges a request carrying Signature-Input by its signature alone. `run` recalls
    an allow by the Authorization header, method and path only, so the same token with a bogus signature passes
    in production while `policy test` (always traced, never recalled) says 401."""
    policy = load_policy(policy_dir / "orders.yaml")
    run = Run(policy)
    token, _, _ = run.mint(TokenSpec(claims={"sub": "alice"}), time.time(), {})
    bogus = {"signature-input": 'sig1=("@method");keyid="billing-batch";alg="hmac-sha256";created=1',
             "signature": "sig1=:AAAA:"}  # fmt: skip
    plain = RequestView("POST", "/v1/mixed", "orders", {"authorization": f"Bearer {token}"}, "192.0.2.1", "https")
    signed = RequestView("POST", "/v1/mixed", "orders", {**plain.headers, **bogus}, "192.0.2.1", "https")
    traced = await Engine(policy, run.stores()).check(signed, [])
    production = Engine(policy, run.stores())
    assert (await production.check(plain)).status == 200
    recalled = await production.check(signed)
    assert (recalled.status, recalled.reason) == (traced.status, traced.reason)
