"""`authz-agent policy test` as a service owner uses it: a policy and its `*.test.yaml` on disk, run through
`authz-agent policy test` (agent.cli.main) or `run_file`, judged by what the terminal, the JUnit file and the
results say. Nothing here reaches into the runner, except spies that record what it signed."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from junitparser import Error, Failure, JUnitXml, SystemOut, TestCase, TestSuite

from agent.cli import main
from agent.config import load_policy, load_policy_text
from agent.policytest import CaseResult, FileResult, credentials, run_file, runner

AT = "2026-12-01T10:00:00Z"
AT_EPOCH = int(dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC).timestamp())

# The shared policy: one provider whose keys are on a port where nothing listens (never fetched), a HMAC client
# whose key file is written only by the tests that want it readable, and a route for each thing a case can do.
CORP = """\
  corp:
    issuer: https://idp.invalid
    jwks_uri: http://127.0.0.1:9/jwks.json
    audiences: [shop-api]
    algorithms: [RS256, PS256, ES256, ES384, EdDSA]
    max_token_lifetime_s: 3600
"""
POLICY = f"""\
version: 1
service: shop
identity_providers:
{CORP}
hmac_clients:
  billing:
    key_file: keys/billing.key
    roles: [billing]
deny:
  - {{name: blocked-network, source_cidrs: [203.0.113.0/24]}}
routes:
  - name: list-items
    match: {{methods: [GET], path: /v1/items}}
    authn: [jwt]
    allow: {{scopes_all: ["items:read"]}}
    rate_limit: {{key: subject, per_minute: 60, burst: 1}}
  - name: read-item
    match: {{methods: [GET], path: "/v1/tenants/{{tenant}}/items/{{id}}"}}
    authn: [jwt]
    allow:
      - {{scopes_all: ["items:read"], claims: {{tenant_id: "{{tenant}}"}}}}
      - {{roles_any: [support], source_cidrs: [10.0.0.0/8]}}
    deny:
      - {{name: no-debug, headers: {{x-debug: {{present: true}}}}}}
  - name: create-item
    match: {{methods: [POST], path: /v1/items}}
    authn: [jwt]
    bind: dpop
    allow: {{roles_any: [writer]}}
  - name: replace-item
    match: {{methods: [PUT], path: /v1/items}}
    authn: [jwt]
    bind: mtls
    allow: {{}}
  - name: export
    match: {{methods: [GET], path: /v1/export}}
    authn: [jwt]
    forward_token: true
    allow: {{}}
  - name: hook
    match: {{methods: [POST], path: "/v1/hooks/**"}}
    authn: [hmac]
    allow: {{roles_any: [billing]}}
  - name: health
    match: {{path: /healthz}}
    public: true
"""
TOKEN = '{claims: {sub: alice, scope: "items:read"}}'


# ---------------------------------------------------------------------------------------------------------------
# Writing a policy and its test file, running them, reading the results


class Project:
    """A service owner's folder: SERVICE.yaml and SERVICE.test.yaml side by side."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def policy(self, text: str = POLICY, name: str = "shop") -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    def key(self, name: str = "billing") -> bytes:
        """A readable key file for the HMAC client `name` (base64 on one line); returns the raw key."""
        raw = os.urandom(32)
        (self.root / "keys").mkdir(exist_ok=True)
        (self.root / "keys" / f"{name}.key").write_text(base64.b64encode(raw).decode() + "\n")
        return raw

    def tests(
        self, cases: str, policy: str | None = POLICY, at: str | None = AT, name: str = "shop", top: str = ""
    ) -> Path:
        """Write NAME.test.yaml (and, unless policy is None, NAME.yaml): `cases` is the YAML of the case list."""
        if policy is not None:
            self.policy(policy, name)
        head = f"policy: {name}.yaml\n" + (f'at: "{at}"\n' if at else "") + textwrap.dedent(top)
        path = self.root / f"{name}.test.yaml"
        path.write_text(head + "cases:\n" + textwrap.indent(textwrap.dedent(cases), "  "))
        return path


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def line_of(path: Path, needle: str, after: int = 0) -> int:
    """The 1-based number of the first line after line `after` holding `needle`: where an error must point."""
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if n > after and needle in text:
            return n
    raise AssertionError(f"{needle!r} is not in {path}")


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """`authz-agent policy test ARGS`: its exit code and what it printed (stdout and stderr together)."""
    code = main(["policy", "test", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def case(result: FileResult, name: str) -> CaseResult:
    return next(c for c in result.cases if c.name == name)


def passes(path: Path, **kwargs: Any) -> FileResult:
    """Run a file whose every case must pass (else the problems are the assertion message)."""
    result = run_file(path, **kwargs)
    assert not result.errors, result.errors
    assert [(c.name, c.problems, c.trace) for c in result.cases if not c.ok] == []
    return result


# ---------------------------------------------------------------------------------------------------------------
# token: provider


def test_the_token_provider_defaults_to_the_only_one(project: Project) -> None:
    path = project.tests(f"""\
        - name: no provider named
          request: {{path: /v1/items}}
          token: {TOKEN}
          expect: {{status: 200, route: list-items, upstream_headers: {{x-authz-subject: alice}}}}
        - name: the provider named
          request: {{path: /v1/items}}
          token: {{provider: corp, claims: {{sub: alice, scope: "items:read"}}}}
          expect: {{status: 200}}
    """)
    assert passes(path).passed == 2


TWO_PROVIDERS = f"""\
version: 1
service: shop
identity_providers:
{CORP}
  partner:
    issuer: https://login.partner.invalid
    jwks_uri: https://login.partner.invalid/keys
    audiences: [shop-api]
    algorithms: [ES256]
routes:
  - name: list-items
    match: {{methods: [GET], path: /v1/items}}
    authn: [jwt]
    allow: {{}}
"""


def test_with_several_providers_a_token_names_one(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests(
        """\
        - name: partner
          request: {path: /v1/items}
          token: {provider: partner, claims: {sub: p1}}
          expect: {status: 200, upstream_headers: {x-authz-subject: p1}}
        - name: corp
          request: {path: /v1/items}
          token: {provider: corp, claims: {sub: c1}}
          expect: {status: 200}
    """,
        TWO_PROVIDERS,
    )
    assert passes(path).passed == 2

    path = project.tests(
        """\
        - name: which one
          request: {path: /v1/items}
          token: {claims: {sub: p1}}
          expect: {status: 200}
        - name: nobody
          request: {path: /v1/items}
          token:
            provider: nobody
            claims: {sub: p1}
          expect: {status: 200}
    """,
        TWO_PROVIDERS,
    )
    code, out = cli(capsys, path)
    assert code == 1
    which = line_of(path, "token: {claims: {sub: p1}}")
    assert f"{path}:{which}: case 'which one': name the token's provider (the policy has 2: corp, partner)" in out
    nobody = line_of(path, "provider: nobody")
    assert f"{path}:{nobody}: case 'nobody': no identity provider 'nobody' (known: corp, partner)" in out
    assert "no case was run" in out


# ---------------------------------------------------------------------------------------------------------------
# token: claims, expires_in


CLAIMS_POLICY = f"""\
version: 1
service: shop
identity_providers:
{CORP}
routes:
  - name: filled
    match: {{methods: [GET], path: /v1/filled}}
    authn: [jwt]
    allow:
      when: >-
        claims.iss == "https://idp.invalid" && claims.aud == "shop-api" && claims.iat == {AT_EPOCH}
        && claims.exp > claims.iat && size(string(claims.jti)) >= 16
  - name: given
    match: {{methods: [GET], path: /v1/given}}
    authn: [jwt]
    allow:
      when: 'claims.jti == "order-42" && claims.exp == {AT_EPOCH + 60} && claims.tier == "gold"'
  - name: any
    match: {{methods: [GET], path: /v1/any}}
    authn: [jwt]
    allow: {{}}
"""


def test_claims_are_filled_in_unless_given(project: Project) -> None:
    path = project.tests(
        f"""\
        - name: filled in
          request: {{path: /v1/filled}}
          token: {{claims: {{sub: alice}}}}
          expect: {{status: 200}}
        - name: as given
          request: {{path: /v1/given}}
          token: {{claims: {{sub: alice, jti: order-42, exp: {AT_EPOCH + 60}, tier: gold}}}}
          expect: {{status: 200}}
        - name: another issuer
          request: {{path: /v1/any}}
          token: {{claims: {{sub: alice, iss: "https://evil.invalid"}}}}
          expect: {{status: 401, reason: token_issuer_unknown}}
        - name: another audience
          request: {{path: /v1/any}}
          token: {{claims: {{sub: alice, aud: other-api}}}}
          expect: {{status: 401, reason: token_audience_mismatch}}
        - name: one of its audiences
          request: {{path: /v1/any}}
          token: {{claims: {{sub: alice, aud: [other-api, shop-api]}}}}
          expect: {{status: 200}}
    """,
        CLAIMS_POLICY,
    )
    assert passes(path).passed == 5


def test_a_null_claim_is_left_out(project: Project) -> None:
    path = project.tests(
        """\
        - name: no exp
          request: {path: /v1/any}
          token: {claims: {sub: alice, exp: null}}
          expect: {status: 401, reason: token_claim_missing}
        - name: no iat
          request: {path: /v1/any}
          token: {claims: {sub: alice, iat: null}}
          expect: {status: 401, reason: token_claim_missing}
        - name: no jti is fine
          request: {path: /v1/any}
          token: {claims: {sub: alice, jti: null}}
          expect: {status: 200}
    """,
        CLAIMS_POLICY,
    )
    result = passes(path, explain=True)
    assert "authentication failed: token_claim_missing (exp)" in case(result, "no exp").trace


def test_expires_in(project: Project) -> None:
    path = project.tests(
        """\
        - name: expired two minutes ago, past the leeway
          request: {path: /v1/any}
          token: {claims: {sub: alice}, expires_in: -120}
          expect: {status: 401, reason: token_expired}
        - name: still valid for a second
          request: {path: /v1/any}
          token: {claims: {sub: alice}, expires_in: 1}
          expect: {status: 200}
        - name: longer than the provider allows
          request: {path: /v1/any}
          token: {claims: {sub: alice}, expires_in: 7200}
          expect: {status: 401, reason: token_lifetime_too_long}
    """,
        CLAIMS_POLICY,
    )
    passes(path)


def test_claims_are_judged_by_the_routes_rules(project: Project) -> None:
    path = project.tests("""\
        - name: its own tenant
          request: {path: /v1/tenants/acme/items/1}
          token: {claims: {sub: alice, scope: "items:read", tenant_id: acme}}
          expect: {status: 200, route: read-item}
        - name: another tenant
          request: {path: /v1/tenants/acme/items/1}
          token: {claims: {sub: eve, scope: "items:read", tenant_id: globex}}
          expect: {status: 403, reason: claim_mismatch, route: read-item}
        - name: no scope
          request: {path: /v1/items}
          token: {claims: {sub: alice, scope: "profile"}}
          expect: {status: 403, reason: scope_missing}
    """)
    passes(path)


# ---------------------------------------------------------------------------------------------------------------
# token: alg


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "ES384", "EdDSA"])
def test_each_algorithm_the_provider_lists_signs_an_accepted_token(project: Project, alg: str) -> None:
    path = project.tests(f"""\
        - name: {alg}
          request: {{path: /v1/items}}
          token: {{claims: {{sub: alice, scope: "items:read"}}, alg: {alg}}}
          expect: {{status: 200, route: list-items}}
    """)
    passes(path)


@pytest.mark.parametrize("alg", ["RS384", "ES512", "PS512", "Ed25519", "HS256", "none"])
def test_an_algorithm_the_provider_does_not_list_is_refused(project: Project, alg: str) -> None:
    """Asymmetric ones it does not list, and a shared secret or no signature, which no provider takes."""
    path = project.tests(f"""\
        - name: {alg}
          request: {{path: /v1/items}}
          token: {{claims: {{sub: alice, scope: "items:read"}}, alg: {alg}}}
          expect: {{status: 401, reason: token_alg_not_allowed}}
    """)
    passes(path)


def test_an_algorithm_nothing_can_sign_with_is_a_file_error(project: Project) -> None:
    path = project.tests("""\
        - name: made up
          request: {path: /v1/items}
          token: {claims: {sub: alice}, alg: XS256}
          expect: {status: 401}
    """)
    result = run_file(path)
    assert not result.ok and not result.cases
    assert result.errors[0].startswith(f"{path}:{line_of(path, 'XS256')}: cases[0] (made up).token.alg 'XS256'")


def test_a_claim_no_token_can_carry_is_a_file_error(project: Project) -> None:
    """YAML reads `2026-12-01` as a date and `!!binary` as bytes; a token holds JSON, so the line is named
    (a time with its zone is NumericDate seconds, a quoted date a string)."""
    path = project.tests("""\
        - name: odd claims
          request: {path: /v1/items}
          token:
            claims:
              sub: alice
              scope: "items:read"
              birthdate: 1990-01-01
              blob: !!binary aGVsbG8=
              nbf: 2026-11-30T00:00:00Z
          expect: {status: 200}
    """)
    result = run_file(path)
    where = "cases[0] (odd claims).token.claims"
    assert result.errors == [
        f"{path}:{line_of(path, 'birthdate:')}: {where}.birthdate: the date 1990-01-01 is not a JSON value; quote it, "
        "or write a time with its zone (2026-12-01T00:00:00Z) for seconds since 1970",
        f"{path}:{line_of(path, 'blob:')}: {where}.blob: a YAML bytes value is not a JSON value; quote it, "
        "or write a time with its zone (2026-12-01T00:00:00Z) for seconds since 1970",
    ]
    path.write_text(path.read_text().replace("1990-01-01", '"1990-01-01"').replace("!!binary aGVsbG8=", "aGVsbG8="))
    passes(path)


# ---------------------------------------------------------------------------------------------------------------
# token: dpop, mtls, scheme


def test_a_dpop_bound_token_with_a_fresh_proof(project: Project) -> None:
    path = project.tests("""\
        - name: bound, with a proof
          request: {method: POST, path: /v1/items}
          token: {claims: {sub: carol, roles: [writer]}, dpop: true}
          expect: {status: 200, route: create-item, upstream_headers: {x-authz-subject: carol}}
        - name: a bearer token on a dpop route
          request: {method: POST, path: /v1/items}
          token: {claims: {sub: carol, roles: [writer]}}
          expect: {status: 401, reason: token_not_bound}
        - name: bound, sent as Bearer
          request: {method: POST, path: /v1/items}
          token: {claims: {sub: carol, roles: [writer]}, dpop: true, scheme: Bearer}
          expect: {status: 401, reason: dpop_bound_token_as_bearer}
        - name: bound, on a route that does not ask for it
          request: {path: /v1/items}
          token: {claims: {sub: carol, scope: "items:read"}, dpop: true}
          expect: {status: 200, route: list-items}
    """)
    passes(path)


def test_dpop_with_server_nonces(project: Project) -> None:
    """With use_dpop_nonce the runner puts a nonce of the case's own engine in the proof."""
    policy = POLICY.replace("routes:\n", "dpop: {use_dpop_nonce: true}\nroutes:\n", 1)
    path = project.tests(
        """\
        - name: bound, with a proof and a nonce
          request: {method: POST, path: /v1/items}
          token: {claims: {sub: carol, roles: [writer]}, dpop: true}
          expect: {status: 200, route: create-item}
    """,
        policy,
    )
    passes(path)


def test_an_mtls_bound_token_with_its_certificate(project: Project) -> None:
    path = project.tests("""\
        - name: bound to the certificate
          request: {method: PUT, path: /v1/items}
          token: {claims: {sub: dave}, mtls: true}
          expect: {status: 200, route: replace-item, upstream_headers: {x-authz-subject: dave}}
        - name: a bearer token on an mtls route
          request: {method: PUT, path: /v1/items}
          token: {claims: {sub: dave}}
          expect: {status: 401, reason: token_not_bound}
    """)
    passes(path)


# ---------------------------------------------------------------------------------------------------------------
# signed_by


@pytest.fixture
def signed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, dict[str, str]]]:
    """Records each request signature the runner makes: the key it used and the headers it made."""
    made: list[tuple[bytes, dict[str, str]]] = []
    real = credentials.sign_request  # what the runner calls

    def spy(key: bytes, *args: Any) -> dict[str, str]:
        headers = real(key, *args)
        made.append((key, headers))
        return headers

    monkeypatch.setattr(runner, "sign_request", spy)
    return made


HOOK = """\
- name: signed webhook
  request: {method: POST, path: /v1/hooks/invoices, body: '{"amount": 10}'}
  signed_by: billing
  expect: {status: 200, route: hook, upstream_headers: {x-authz-client-id: billing}}
"""


def test_signed_by_uses_the_configured_key_when_its_file_is_readable(
    project: Project, signed: list[tuple[bytes, dict[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    key = project.key()
    path = project.tests(HOOK)
    result = passes(path)
    assert [k for k, _ in signed] == [key]
    assert not [n for n in result.notes if "billing" in n]
    code, out = cli(capsys, path)
    assert code == 0 and "throwaway" not in out


def test_signed_by_with_an_unreadable_key_file_signs_with_a_throwaway_key_and_says_so(
    project: Project, signed: list[tuple[bytes, dict[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = project.tests(HOOK)  # keys/billing.key is not written
    result = passes(path)
    policy = path.with_name("shop.yaml")
    [note] = [n for n in result.notes if "billing" in n]
    assert note.startswith(f"{policy}:{line_of(policy, 'key_file: keys/billing.key')}: hmac_clients.billing.key_file")
    assert "a throwaway value stands in for it" in note
    code, out = cli(capsys, path)
    assert code == 0
    assert f"note: {note}" in out
    assert len(signed) == 2 and signed[0][0] != signed[1][0]  # a new throwaway key each run


def test_a_signed_body_carries_its_content_digest(project: Project) -> None:
    project.key()
    body = '{"amount": 10}'
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + ":"
    path = project.tests(f"""\
        - name: with a body
          request: {{method: POST, path: /v1/hooks/invoices, body: '{body}'}}
          signed_by: billing
          expect: {{status: 200, upstream_headers: {{content-digest: "{digest}"}}}}
        - name: without a body
          request: {{method: POST, path: /v1/hooks/ping}}
          signed_by: billing
          expect: {{status: 200, upstream_headers: {{content-digest: null}}}}
        - name: not signed
          request: {{method: POST, path: /v1/hooks/invoices, body: '{body}'}}
          expect: {{status: 401, reason: signature_missing}}
    """)
    passes(path)


def test_a_header_the_client_signs_must_be_in_the_request(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    project.key()
    components = '    components: ["@method", "@path", x-tenant]\n'
    policy = POLICY.replace("    roles: [billing]\n", "    roles: [billing]\n" + components)
    path = project.tests(
        """\
        - name: with the header
          request: {method: POST, path: /v1/hooks/invoices, headers: {x-tenant: acme}, body: "{}"}
          signed_by: billing
          expect: {status: 200, upstream_headers: {x-tenant: acme}}
        - name: without it
          request: {method: POST, path: /v1/hooks/invoices, body: "{}"}
          signed_by: billing
          expect: {status: 200}
    """,
        policy,
    )
    result = run_file(path)
    assert case(result, "with the header").ok
    missing = case(result, "without it")
    assert not missing.ok
    why = "hmac client billing signs x-tenant: give it in request.headers"
    assert missing.problems == [f"cannot make the request: {why}"]
    code, out = cli(capsys, path)
    assert code == 1
    assert f"FAIL  without it  (line {line_of(path, 'name: without it')})" in out
    assert why in out
    assert "1 passed, 1 failed" in out


# ---------------------------------------------------------------------------------------------------------------
# at: the frozen clock


CLOCK_POLICY = f"""\
version: 1
service: shop
identity_providers:
{CORP}
deny:
  - name: christmas-freeze
    not_before: 2026-12-24T00:00:00Z
    not_after: 2026-12-27T00:00:00Z
    headers: {{x-change: {{present: true}}}}
routes:
  - name: contractors
    match: {{methods: [GET], path: /v1/reports}}
    authn: [jwt]
    allow:
      roles_any: [contractor]
      not_before: 2026-11-01T00:00:00Z
      not_after: 2027-01-01T00:00:00Z
  - name: office-hours
    match: {{methods: [GET], path: /v1/desk}}
    authn: [jwt]
    allow: {{when: 'now.getHours("UTC") >= 9 && now.getHours("UTC") < 18'}}
  - name: changes
    match: {{methods: [POST], path: /v1/changes}}
    public: true
  - name: minted
    match: {{methods: [GET], path: /v1/minted}}
    authn: [jwt]
    allow: {{when: 'claims.iat == {AT_EPOCH} && claims.exp == {AT_EPOCH + 300}'}}
"""


def test_the_files_at_freezes_the_clock_and_a_case_may_set_its_own(project: Project) -> None:
    path = project.tests(
        """\
        - name: inside the grant
          request: {path: /v1/reports}
          token: {claims: {sub: c1, roles: [contractor]}}
          expect: {status: 200}
        - name: after the grant
          at: "2027-01-01T00:00:00Z"
          request: {path: /v1/reports}
          token: {claims: {sub: c1, roles: [contractor]}}
          expect: {status: 403, reason: grant_not_active}
        - name: before the grant
          at: "2026-10-31T23:59:59Z"
          request: {path: /v1/reports}
          token: {claims: {sub: c1, roles: [contractor]}}
          expect: {status: 403, reason: grant_not_active}
        - name: a change before the freeze
          request: {method: POST, path: /v1/changes, headers: {x-change: "1"}}
          expect: {status: 200, reason: public_route}
        - name: a change during the freeze
          at: "2026-12-25T12:00:00+01:00"
          request: {method: POST, path: /v1/changes, headers: {x-change: "1"}}
          expect: {status: 403, reason: denied_by_rule}
    """,
        CLOCK_POLICY,
    )
    passes(path)


def test_a_when_reading_now_is_judged_at_the_cases_time(project: Project) -> None:
    path = project.tests(
        """\
        - name: at ten
          request: {path: /v1/desk}
          token: {claims: {sub: alice}}
          expect: {status: 200, route: office-hours}
        - name: at eight in the evening
          at: "2026-12-01T20:00:00Z"
          request: {path: /v1/desk}
          token: {claims: {sub: alice}}
          expect: {status: 403, reason: condition_failed}
    """,
        CLOCK_POLICY,
    )
    passes(path)


def test_a_token_is_minted_at_the_frozen_time(project: Project) -> None:
    """iat is the case's time and exp five minutes later; a case years away from now still passes, since the
    engine's clock is frozen at the same moment."""
    path = project.tests(
        """\
        - name: minted at the file's time
          request: {path: /v1/minted}
          token: {claims: {sub: alice}}
          expect: {status: 200}
        - name: long ago
          at: "2001-09-09T01:46:40Z"
          request: {path: /v1/reports}
          token: {claims: {sub: c1, roles: [contractor]}}
          expect: {status: 403, reason: grant_not_active}
        - name: far ahead
          at: "2090-01-01T00:00:00Z"
          request: {path: /v1/desk}
          token: {claims: {sub: alice}}
          expect: {status: 403, reason: condition_failed}
    """,
        CLOCK_POLICY,
    )
    passes(path)


def test_a_time_no_token_or_certificate_can_hold_is_an_error_at_its_line(project: Project) -> None:
    """An `at` at the edge of the calendar (a certificate's dates, a DPoP nonce's stamp, NumericDate) is refused
    at its line, before anything runs (it raised before)."""
    path = project.tests("""\
        - name: the last second
          at: "9999-12-31T23:59:59Z"
          request: {method: PUT, path: /v1/items}
          token: {claims: {sub: dave}, mtls: true}
          expect: {status: 200}
        - name: before X.509
          at: "1900-01-01T00:00:00Z"
          request: {method: PUT, path: /v1/items}
          token: {claims: {sub: dave}, mtls: true}
          expect: {status: 200}
        - name: then
          request: {path: /healthz}
          expect: {status: 200}
    """)
    result = run_file(path)
    assert result.cases == []
    assert [e.split(": ", 1)[0] for e in result.errors] == [
        f"{path}:{line_of(path, '9999-12-31')}",
        f"{path}:{line_of(path, '1900-01-01')}",
    ]
    assert all("at must be between 1970-01-02 and 9999-11-30" in e for e in result.errors)


def test_without_at_the_real_clock_runs(project: Project) -> None:
    """No `at`: the token is minted now and judged now (it authenticates), and a grant of 2000 has ended."""
    path = project.tests(
        """\
        - name: now
          request: {path: /v1/reports}
          token: {claims: {sub: c1, roles: [contractor]}}
          expect: {status: 403, reason: grant_not_active}
    """,
        CLOCK_POLICY.replace("not_after: 2027-01-01T00:00:00Z", "not_after: 2001-01-01T00:00:00Z").replace(
            "not_before: 2026-11-01T00:00:00Z", "not_before: 2000-01-01T00:00:00Z"
        ),
        at=None,
    )
    [result] = passes(path, explain=True).cases
    assert "authenticated by jwt: subject 'c1'" in result.trace[1]


# ---------------------------------------------------------------------------------------------------------------
# request


REQUEST_POLICY = f"""\
version: 1
service: shop
identity_providers:
{CORP}
routes:
  - name: given
    match: {{methods: [PATCH], path: /v1/given}}
    authn: [jwt]
    allow:
      source_cidrs: [10.0.0.0/8]
      headers: {{x-region: eu-west}}
      when: >-
        request.host == "api.example" && request.scheme == "http" && request.query.page == "2"
        && source.address == "10.1.2.3"
  - name: seen
    match: {{methods: [GET], path: /v1/seen}}
    authn: [jwt]
    allow:
      when: 'request.host == "shop" && request.scheme == "https" && source.address == "192.0.2.10"'
"""


def test_request_defaults_and_fields_reach_the_rules(project: Project) -> None:
    path = project.tests(
        """\
        - name: every default
          request: {path: /v1/seen}
          token: {claims: {sub: alice}}
          expect: {status: 200, route: seen}
        - name: every field
          request:
            method: PATCH
            path: /v1/given?page=2
            host: api.example
            scheme: http
            source: 10.1.2.3
            headers: {x-region: eu-west}
          token: {claims: {sub: alice}}
          expect: {status: 200, route: given}
        - name: an IPv6 source
          request: {method: PATCH, path: "/v1/given?page=2", host: api.example, scheme: http, source: "2001:db8::1"}
          token: {claims: {sub: alice}}
          expect: {status: 403, reason: condition_failed}
          weight: 3
    """,
        REQUEST_POLICY,
    )
    passes(path)


def test_a_header_value_is_sent_as_written(project: Project) -> None:
    """YAML reads `010` as 8 and `1.10` as 1.1; a client sends the characters, and a rule compares them."""
    policy = POLICY.replace(
        "  - {name: blocked-network, source_cidrs: [203.0.113.0/24]}\n",
        '  - {name: blocked-network, source_cidrs: [203.0.113.0/24]}\n  - {name: old, headers: {x-api: "010"}}\n',
    )
    path = project.tests(
        """\
        - name: version 010 is refused
          request: {path: /healthz, headers: {x-api: 010}}
          expect: {status: 403, reason: denied_by_rule}
        - name: the app receives 1.10
          request: {path: /healthz, headers: {x-api: 1.10}}
          expect: {status: 200, upstream_headers: {x-api: 1.10}}
        - name: and not 1.1
          request: {path: /healthz, headers: {x-api: 1.10}}
          expect: {status: 200, upstream_headers: {x-api: "1.1"}}
    """,
        policy,
    )
    result = run_file(path)
    assert [(c.name, c.ok) for c in result.cases] == [
        ("version 010 is refused", True),
        ("the app receives 1.10", True),
        ("and not 1.1", False),
    ]
    assert case(result, "and not 1.1").problems == ["upstream header x-api: expected '1.1', got '1.10'"]


def test_a_request_the_agent_never_receives_as_written_is_an_error(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """A case is what the client sends. Envoy (as envoy-config sets it up) refuses some requests and takes headers
    out of others before the agent sees them: a case relying on one would pass here and never hold in production."""
    path = project.tests("""\
        - name: underscore
          request: {path: /v1/items, headers: {x_tenant: acme}}
          expect: {status: 401}
        - name: host
          request: {path: /v1/items, headers: {Host: shop.example}}
          expect: {status: 401}
        - name: internal
          request: {path: /v1/items, headers: {x-envoy-internal: "true"}}
          expect: {status: 401}
        - name: hop by hop
          request: {path: /v1/items, headers: {connection: close}}
          expect: {status: 401}
        - name: client certificate
          request: {path: /v1/items, headers: {x-forwarded-client-cert: "By=spiffe://x"}}
          expect: {status: 401}
        - name: te
          request: {path: /v1/items, headers: {te: gzip}}
          expect: {status: 401}
        - name: te trailers
          request: {path: /v1/items, headers: {te: trailers}}
          expect: {status: 401}
        - name: dot segments
          request: {path: /v1/../v1/items}
          expect: {status: 401}
        - name: a control character
          request: {path: /v1/items, headers: {x-note: "a\\rb"}}
          expect: {status: 401}
    """)
    out = errors_of(capsys, path)
    removed = "Envoy (as envoy-config sets it up) removes it from a client's request before the agent sees it"
    for needle, message in [
        ("x_tenant", "cases[0] (underscore).request.headers: 'x_tenant': Envoy (as envoy-config sets it up) "
                     "refuses header names with underscores"),
        ("Host:", "cases[1] (host).request.headers: 'Host': the host is request.host"),
        ("x-envoy-internal", f"cases[2] (internal).request.headers: 'x-envoy-internal': {removed}"),
        ("connection: close", f"cases[3] (hop by hop).request.headers: 'connection': {removed}"),
        ("x-forwarded-client-cert", f"cases[4] (client certificate).request.headers: 'x-forwarded-client-cert': "
                                    f"{removed}"),
        ("te: gzip", "cases[5] (te).request.headers: 'te': Envoy passes te on only as 'trailers'"),
        ("/v1/../v1/items", "cases[7] (dot segments).request.path '/v1/../v1/items' never reaches the agent"),
        ("a\\rb", "cases[8] (a control character).request.headers.x-note: a header value cannot hold a control"),
    ]:  # fmt: skip
        assert f"{path}:{line_of(path, needle)}: {message}" in out
    assert "te trailers" not in out


# ---------------------------------------------------------------------------------------------------------------
# expect


def test_expect_status_reason_and_route(project: Project) -> None:
    path = project.tests("""\
        - name: no token
          request: {path: /v1/items}
          expect: {status: 401, reason: token_missing, route: list-items}
        - name: no route
          request: {path: /v2/nothing}
          expect: {status: 403, reason: no_route, route: null}
        - name: public
          request: {path: /healthz}
          expect: {status: 200, reason: public_route, route: health}
        - name: only a reason
          request: {path: /v1/items, source: 203.0.113.9}
          expect: {reason: denied_by_rule}
        - name: an authorization header written by hand
          request: {path: /v1/items, headers: {authorization: Bearer not-a-jwt}}
          expect: {status: 401, reason: token_malformed}
    """)
    passes(path)


def test_expect_upstream_headers_a_subset_or_absent(project: Project) -> None:
    path = project.tests("""\
        - name: the agent's headers, and the token removed
          request: {path: /v1/items, headers: {x-tenant: t-1, x-forwarded-host: evil.example}}
          token: {claims: {sub: alice, scope: "items:read"}}
          expect:
            status: 200
            upstream_headers:
              x-authz-subject: alice
              x-authz-route: list-items
              x-tenant: t-1
              x-forwarded-for: 192.0.2.10   # Envoy's: the client's address
              x-forwarded-host: null        # a client's forwarding claim, removed by Envoy's route
              authorization: null
              x-not-sent: null
        - name: a client's x-authz header is replaced
          request: {path: /v1/items, headers: {x-authz-subject: root}}
          token: {claims: {sub: alice, scope: "items:read"}}
          expect: {upstream_headers: {x-authz-subject: alice}}
    """)
    passes(path)


def test_forward_token_keeps_authorization_without_showing_it(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    path = project.tests("""\
        - name: forwarded
          request: {path: /v1/export}
          token: {claims: {sub: alice}}
          expect: {status: 200, upstream_headers: {authorization: null}}
        - name: refused requests reach no upstream
          request: {path: /v1/export}
          expect: {upstream_headers: {x-authz-subject: alice}}
    """)
    result = run_file(path)
    assert case(result, "forwarded").problems == [
        "upstream header authorization: expected absent, got (a credential, not shown)"
    ]
    assert case(result, "refused requests reach no upstream").problems == [
        "upstream_headers: the request was refused (401 token_missing); nothing reached the upstream"
    ]
    code, out = cli(capsys, path)
    assert code == 1 and "0 passed, 2 failed" in out


def test_expect_response_headers(project: Project) -> None:
    """One request per case: a 401's challenge, a 403's scope challenge, an allowed request's quota headers.
    (A 429 needs a second request within the burst: see the rate-limit test, with `repeat`.)"""
    path = project.tests("""\
        - name: challenge
          request: {path: /v1/items}
          expect: {status: 401, headers: {www-authenticate: Bearer, retry-after: null}}
        - name: insufficient scope
          request: {path: /v1/items}
          token: {claims: {sub: alice, scope: profile}}
          expect:
            status: 403
            headers:
              www-authenticate: >-
                Bearer error="insufficient_scope", error_description="scope_missing", scope="items:read"
        - name: quota headers on an allow
          request: {path: /v1/items}
          token: {claims: {sub: alice, scope: "items:read"}}
          expect:
            status: 200
            headers: {ratelimit-policy: '"list-items";q=60;w=60', retry-after: null}
        - name: a dpop challenge
          request: {method: POST, path: /v1/items}
          token: {claims: {sub: carol, roles: [writer]}}
          expect: {status: 401, reason: token_not_bound, headers: {dpop-nonce: null}}
    """)
    result = passes(path)
    challenge = dict(case(result, "a dpop challenge").decisions[-1].response_headers)
    assert challenge["www-authenticate"].startswith("DPoP ")


def test_a_wrong_expectation_fails_with_a_diff_and_the_trace(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    path = project.tests("""\
        - name: passes
          request: {path: /v1/items}
          expect: {status: 401}
        - name: eve reads acme
          request: {path: /v1/tenants/acme/items/1, headers: {x-region: eu}}
          token: {claims: {sub: eve, scope: "items:read", tenant_id: globex}}
          expect:
            status: 200
            reason: allowed
            route: list-items
            headers: {www-authenticate: Bearer}
    """)
    code, out = cli(capsys, path)
    assert code == 1
    policy = path.with_name("shop.yaml")
    expected = [
        "ok    passes",
        f"FAIL  eve reads acme  (line {line_of(path, 'name: eve reads acme')})",
        "      status: expected 200, got 403",
        "      reason: expected allowed, got claim_mismatch",
        "      route: expected list-items, got read-item",
        "      response header www-authenticate: expected 'Bearer', got absent",
        "      decision: 403 claim_mismatch, route read-item",
        f"      - route 'read-item' (line {line_of(policy, '- name: read-item')}) matches GET "
        "/v1/tenants/{tenant}/items/{id}",
        "      - authenticated by jwt: subject 'eve', issuer 'https://idp.invalid', scopes ['items:read'], roles []",
        f"      - allow alternative 0 (line {line_of(policy, 'claims: {tenant_id:')}) refused: claim_mismatch "
        "(claim tenant_id does not match)",
    ]
    lines = out.splitlines()
    start = lines.index(expected[0])
    assert lines[start : start + len(expected)] == expected
    assert lines[-1].startswith("1 passed, 1 failed")
    result = run_file(path)
    assert (result.passed, result.failed, result.ok) == (1, 1, False)
    assert result.summary().startswith("1 passed, 1 failed")


def test_a_passing_file_exits_0_and_counts(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests(f"""\
        - name: one
          request: {{path: /v1/items}}
          token: {TOKEN}
          expect: {{status: 200}}
        - name: two
          request: {{path: /healthz}}
          expect: {{status: 200}}
    """)
    code, out = cli(capsys, path)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{path} (shop@")
    assert "ok    one" in out and "ok    two" in out
    assert out.splitlines()[-1].startswith("2 passed, 0 failed")
    assert "decision:" not in out  # traces of passing cases only with --verbose
    code, out = cli(capsys, path, "--verbose")
    assert code == 0 and "      - authenticated by jwt: subject 'alice'" in out


def test_verbose_prints_traces_and_no_debug_log(project: Project) -> None:
    """`policy test --verbose` is the traces of passing cases; the global -v (debug logging on stderr) stays off.
    A process of its own: in pytest the root logger is already configured."""
    path = project.tests(f"""\
        - name: one
          request: {{path: /v1/items}}
          token: {TOKEN}
          expect: {{status: 200}}
    """)
    run = subprocess.run(
        [sys.executable, "-m", "agent", "policy", "test", str(path), "--verbose"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent.parent)},
    )
    assert run.returncode == 0, run.stderr
    assert "      - allow rule satisfied" in run.stdout
    assert "DEBUG" not in run.stderr


# ---------------------------------------------------------------------------------------------------------------
# Invalid test files: every error at file:line, nothing run


def errors_of(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    """The CLI's report of a file that must not run: exit 1, no case line, the errors."""
    code, out = cli(capsys, path)
    assert code == 1
    assert "no case was run" in out
    assert not [line for line in out.splitlines() if line.startswith(("ok ", "FAIL"))]
    result = run_file(path)
    assert result.errors and not result.cases and not result.ok
    return out


def test_unknown_keys_are_errors_with_a_did_you_mean(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests(
        """\
        - name: typos
          requets: {path: /v1/items}
          request: {methd: GET, path: /v1/items}
          token: {claim: {sub: alice}}
          expect: {stauts: 200}
    """,
        top="case: all\n",
    )
    out = errors_of(capsys, path)
    for needle, message in [
        ("case: all", "tests: unknown key 'case'; did you mean 'cases'?"),
        ("requets:", "cases[0] (typos): unknown key 'requets'; did you mean 'request'?"),
        ("methd:", "cases[0] (typos).request: unknown key 'methd'; did you mean 'method'?"),
        ("claim:", "cases[0] (typos).token: unknown key 'claim'; did you mean 'claims'?"),
        ("stauts:", "cases[0] (typos).expect: unknown key 'stauts'; did you mean 'status'?"),
    ]:
        assert f"error: {path}:{line_of(path, needle)}: {message}" in out


def test_a_reason_that_is_no_reason_code(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests("""\
        - name: expired
          request: {path: /v1/items}
          expect: {status: 401, reason: token_expird}
        - name: made up
          request: {path: /v1/items}
          expect: {reason: "nope, not this"}
    """)
    out = errors_of(capsys, path)
    line = line_of(path, "token_expird")
    did_you_mean = "is not a reason code; did you mean 'token_expired'?"
    assert f"{path}:{line}: cases[0] (expired).expect.reason 'token_expird' {did_you_mean}" in out
    line = line_of(path, "nope")
    assert f"{path}:{line}: cases[1] (made up).expect.reason 'nope, not this' is not a reason code" in out


def test_duplicate_case_names(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests("""\
        - name: twice
          request: {path: /v1/items}
          expect: {status: 401}
        - name: twice
          request: {path: /healthz}
          expect: {status: 200}
    """)
    out = errors_of(capsys, path)
    first = line_of(path, "name: twice")
    second = line_of(path, "name: twice", after=first)
    assert f"{path}:{second}: case name 'twice' is already used at line {first}" in out


def test_missing_parts(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests("""\
        - name: no expect
          request: {path: /v1/items}
        - name: no request
          expect: {status: 401}
        - name: no path
          request: {method: GET}
          expect: {status: 401}
        - request: {path: /v1/items}
          expect: {status: 401}
        - name: an empty expect
          request: {path: /v1/items}
          expect: {}
        - name: a relative path
          request: {path: v1/items}
          expect: {status: 401}
    """)
    out = errors_of(capsys, path)
    for needle, message in [
        ("name: no expect", "cases[0] (no expect): 'expect' is required"),
        ("name: no request", "cases[1] (no request): 'request' is required"),
        ("request: {method: GET}", "cases[2] (no path).request: 'path' is required"),
        ("- request: {path: /v1/items}", "cases[3]: every case needs a non-empty 'name'"),
        ("expect: {}", "cases[4] (an empty expect).expect checks nothing"),
        ("path: v1/items", "cases[5] (a relative path).request.path must start with '/'"),
    ]:
        assert f"{path}:{line_of(path, needle)}: {message}" in out


def test_bad_values(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests(
        """\
        - name: a host name as source
          request: {path: /v1/items, source: client.example}
          expect: {status: 401}
        - name: a status that is none
          request: {path: /v1/items}
          expect: {status: 999}
        - name: a token and an authorization header
          request: {path: /v1/items, headers: {authorization: Bearer x}}
          token: {claims: {sub: a}}
          expect: {status: 401}
        - name: a negative weight
          request: {path: /v1/items}
          expect: {status: 401}
          weight: 0
        - name: both expiries
          request: {path: /v1/items}
          token: {claims: {sub: a, exp: 1}, expires_in: 60}
          expect: {status: 401}
    """,
        at="tomorrow",
    )
    out = errors_of(capsys, path)
    for needle, message in [
        ("at: ", "tests.at"),
        ("client.example", "cases[0] (a host name as source).request.source must be an IP address, got 'client"),
        ("status: 999", "cases[1] (a status that is none).expect.status must be an HTTP status (100-599), got 999"),
        ("token: {claims: {sub: a}}", "cases[2] (a token and an authorization header): give 'token' or an"),
        ("weight: 0", "cases[3] (a negative weight).weight must be above 0"),
        ("expires_in: 60", "cases[4] (both expiries).token: give expires_in or claims.exp, not both"),
    ]:
        assert f"{path}:{line_of(path, needle)}: {message}" in out


def test_names_the_policy_lacks(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests("""\
        - name: a route it lacks
          request: {path: /v1/items}
          expect: {status: 401, route: list-item}
        - name: a client it lacks
          request: {method: POST, path: /v1/hooks/x}
          signed_by: biling
          expect: {status: 200}
        - name: a provider it lacks
          request: {path: /v1/items}
          token: {provider: crop, claims: {sub: a}}
          expect: {status: 200}
    """)
    out = errors_of(capsys, path)
    for needle, message in [
        ("route: list-item}", "case 'a route it lacks': the policy has no route 'list-item'"),
        ("signed_by: biling", "case 'a client it lacks': no hmac client 'biling' (known: billing)"),
        ("provider: crop", "case 'a provider it lacks': no identity provider 'crop' (known: corp)"),
    ]:
        assert f"{path}:{line_of(path, needle)}: {message}" in out


def test_files_that_are_not_test_files(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.root / "list.test.yaml"
    path.write_text("- just\n- a list\n")
    assert f"{path}:1: a test file is a mapping" in errors_of(capsys, path)
    path.write_text("policy: shop.yaml\ncases: []\n")
    assert f"{path}:2: 'cases' must be a non-empty list" in errors_of(capsys, path)
    path.write_text("cases:\n  - {name: x, request: {path: /}, expect: {status: 200}}\n")
    assert f"{path}:1: 'policy' is required" in errors_of(capsys, path)
    path.write_text("policy: shop.yaml\ncases: [\n")
    assert f"{path}:" in errors_of(capsys, path)
    missing = project.root / "missing.test.yaml"
    code, out = cli(capsys, missing)
    assert code == 1 and "cannot read the test file" in out


def test_an_invalid_policy_reports_its_own_errors(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    broken = POLICY.replace("    allow: {roles_any: [writer]}\n", "    alow: {roles_any: [writer]}\n")
    path = project.tests(
        """\
        - name: anything
          request: {path: /v1/items}
          expect: {status: 401}
    """,
        broken,
    )
    policy = path.with_name("shop.yaml")
    out = errors_of(capsys, path)
    assert f"{path}: its policy '{policy}' is not valid:" in out
    line = line_of(policy, "alow:")
    assert f"{policy}:{line}: routes[2] (create-item): unknown key 'alow'; did you mean 'allow'?" in out

    gone = project.tests("- {name: x, request: {path: /}, expect: {status: 200}}\n", policy=None, name="gone")
    assert "cannot read the policy" in errors_of(capsys, gone)


def test_run_file_with_the_control_planes_candidate_policy(project: Project) -> None:
    """The control plane passes the policy it is about to publish: the cases run against that object, and a
    test file of another policy is refused."""
    path = project.tests("""\
        - name: the candidate's rule
          request: {path: /v1/items}
          token: {claims: {sub: alice, scope: "items:write"}}
          expect: {status: 200}
    """)
    project.key()  # the control plane reads the real secrets: no stand-ins
    text = POLICY.replace('allow: {scopes_all: ["items:read"]}', 'allow: {scopes_all: ["items:write"]}')
    candidate = load_policy_text(text, str(path.with_name("shop.yaml")), project.root)
    assert run_file(path, candidate).ok
    assert not run_file(path).ok  # the file on disk still asks for items:read
    other = load_policy(project.policy(POLICY, name="other"))
    result = run_file(path, other)
    assert result.errors == [f"{path}:1: these cases test '{path.with_name('shop.yaml')}', not '{other.source}'"]


# ---------------------------------------------------------------------------------------------------------------
# Coverage


def test_coverage_lists_what_no_case_reached(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = project.tests(f"""\
        - name: list
          request: {{path: /v1/items}}
          token: {TOKEN}
          expect: {{status: 200}}
        - name: read by tenant
          request: {{path: /v1/tenants/acme/items/1}}
          token: {{claims: {{sub: alice, scope: "items:read", tenant_id: acme}}}}
          expect: {{status: 200}}
    """)
    policy = path.with_name("shop.yaml")
    result = run_file(path)
    assert result.ok  # gaps are listed, not failed, without --require-coverage
    gaps = [
        f"route read-item alternative 1 (line {line_of(policy, 'roles_any: [support]')})",
        f"route read-item deny rule no-debug (line {line_of(policy, 'name: no-debug')})",
        f"route create-item (line {line_of(policy, '- name: create-item')})",
        f"route replace-item (line {line_of(policy, '- name: replace-item')})",
        f"route export (line {line_of(policy, '- name: export')})",
        f"route hook (line {line_of(policy, '- name: hook')})",
        f"route health (line {line_of(policy, '- name: health')})",
        f"deny rule blocked-network (line {line_of(policy, 'name: blocked-network')})",
    ]
    assert result.uncovered == gaps
    code, out = cli(capsys, path)
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("not covered: ")] == [
        f"not covered: {g}" for g in gaps
    ]
    assert out.splitlines()[-1] == "2 passed, 0 failed, 8 not covered"

    code, out = cli(capsys, path, "--require-coverage")
    assert code == 1
    assert "--require-coverage: 8 gap(s) fail the run" in out
    assert not run_file(path, require_coverage=True).ok


FULL_COVERAGE = f"""\
- name: list
  request: {{path: /v1/items}}
  token: {TOKEN}
  expect: {{status: 200, route: list-items}}
- name: read by tenant
  request: {{path: /v1/tenants/acme/items/1}}
  token: {{claims: {{sub: alice, scope: "items:read", tenant_id: acme}}}}
  expect: {{status: 200}}
- name: read by support
  request: {{path: /v1/tenants/acme/items/1, source: 10.9.8.7}}
  token: {{claims: {{sub: sam, roles: [support]}}}}
  expect: {{status: 200}}
- name: read in debug mode
  request: {{path: /v1/tenants/acme/items/1, headers: {{x-debug: "1"}}}}
  token: {{claims: {{sub: alice, scope: "items:read", tenant_id: acme}}}}
  expect: {{status: 403, reason: denied_by_rule}}
- name: from a blocked network
  request: {{path: /healthz, source: 203.0.113.7}}
  expect: {{status: 403, reason: denied_by_rule}}
- name: create
  request: {{method: POST, path: /v1/items}}
  token: {{claims: {{sub: carol, roles: [writer]}}, dpop: true}}
  expect: {{status: 200}}
- name: replace
  request: {{method: PUT, path: /v1/items}}
  token: {{claims: {{sub: dave}}, mtls: true}}
  expect: {{status: 200}}
- name: export
  request: {{path: /v1/export}}
  token: {{claims: {{sub: alice}}}}
  expect: {{status: 200}}
- name: hook
  request: {{method: POST, path: /v1/hooks/invoices, body: "{{}}"}}
  signed_by: billing
  expect: {{status: 200}}
- name: health
  request: {{path: /healthz}}
  expect: {{status: 200}}
"""


def test_require_coverage_passes_when_everything_is_reached(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    path = project.tests(FULL_COVERAGE)
    result = passes(path, require_coverage=True)
    assert result.uncovered == [] and result.ok
    code, out = cli(capsys, path, "--require-coverage")
    assert code == 0
    assert "not covered" not in out
    assert out.splitlines()[-1] == "10 passed, 0 failed"


def test_a_refused_request_covers_its_route_but_not_its_alternatives(project: Project) -> None:
    """An alternative counts when a case passed by it; a deny rule when it refused a case."""
    path = project.tests("""\
        - name: refused by the first alternative
          request: {path: /v1/tenants/acme/items/1}
          token: {claims: {sub: eve, scope: "items:read", tenant_id: globex}}
          expect: {status: 403}
    """)
    result = run_file(path)
    assert not [g for g in result.uncovered if g.startswith("route read-item (")]
    assert [g.split(" (line")[0] for g in result.uncovered if g.startswith("route read-item")] == [
        "route read-item alternative 0",
        "route read-item alternative 1",
        "route read-item deny rule no-debug",
    ]


# ---------------------------------------------------------------------------------------------------------------
# JUnit XML, read by a JUnit parser as CI reads it


def suites(path: Path) -> dict[str, TestSuite]:
    xml = JUnitXml.fromfile(str(path))
    return {s.name: s for s in xml}


def test_junit_xml_is_read_by_a_junit_parser(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    good = project.tests(f"""\
        - name: passes
          request: {{path: /v1/items}}
          token: {TOKEN}
          expect: {{status: 200}}
        - name: fails
          request: {{path: /v1/items}}
          expect: {{status: 200, reason: allowed}}
        - name: also passes
          request: {{path: /healthz}}
          expect: {{status: 200}}
    """)
    bad = project.tests(
        """\
        - name: broken
          request: {path: /v1/items}
          expect: {reason: token_expird}
    """,
        name="bad",
    )
    report = project.root / "out" / "r.xml"
    report.parent.mkdir()
    code, _ = cli(capsys, good, bad, "--junit", report)
    assert code == 1

    xml = JUnitXml.fromfile(str(report))
    assert (xml.tests, xml.failures, xml.errors) == (4, 1, 1)
    by_name = suites(report)
    assert set(by_name) == {str(good), str(bad)}

    suite = by_name[str(good)]
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (3, 1, 0, 0)
    cases: dict[str, TestCase] = {c.name: c for c in suite}
    assert list(cases) == ["passes", "fails", "also passes"]
    assert cases["passes"].is_passed and cases["also passes"].is_passed
    [failure] = cases["fails"].result
    assert isinstance(failure, Failure)
    assert failure.message == "status: expected 200, got 401; reason: expected allowed, got token_missing"
    assert "decision: 401 token_missing, route list-items" in (failure.text or "")
    assert cases["fails"].classname == "shop.test"
    properties = suite.properties()  # type: ignore[no-untyped-call]
    assert {p.name: p.value for p in properties}["policy"].startswith("shop@")
    notes = suite.child(SystemOut)  # type: ignore[no-untyped-call]
    assert notes is not None and "not covered: route hook" in (notes.text or "")

    suite = by_name[str(bad)]
    assert (suite.tests, suite.failures, suite.errors) == (1, 0, 1)
    [tc] = list(suite)
    [error] = tc.result
    assert isinstance(error, Error)
    assert (error.message or "").startswith(f"{bad}:{line_of(bad, 'token_expird')}: ")
    assert "did you mean 'token_expired'?" in (error.message or "")


def test_junit_with_require_coverage_fails_a_coverage_case(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    path = project.tests(f"""\
        - name: list
          request: {{path: /v1/items}}
          token: {TOKEN}
          expect: {{status: 200}}
    """)
    report = project.root / "r.xml"
    code, _ = cli(capsys, path, "--junit", report, "--require-coverage")
    assert code == 1
    suite = suites(report)[str(path)]
    assert (suite.tests, suite.failures) == (2, 1)
    coverage = next(c for c in suite if c.name == "coverage")
    [failure] = coverage.result
    assert isinstance(failure, Failure) and (failure.message or "").endswith("not covered")
    assert "not covered: route health" in (failure.text or "")

    path = project.tests(FULL_COVERAGE)
    code, _ = cli(capsys, path, "--junit", report, "--require-coverage")
    assert code == 0
    xml = JUnitXml.fromfile(str(report))
    assert (xml.tests, xml.failures, xml.errors) == (10, 0, 0)


def test_characters_from_the_file_are_escaped_on_the_terminal_and_in_junit(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """A case name may hold what a terminal acts on (ESC, BEL), what XML 1.0 cannot hold, or a lone surrogate
    UTF-8 cannot encode (printing it raised): each is written as an escape, and the JUnit file stays parseable."""
    path = project.tests(r"""
        - name: "bell\x07, \x1b[2J, \ud800 and\nnewline"
          request: {path: /v1/items}
          expect: {status: 200}
    """)
    shown = r"bell\x07, \x1b[2J, \ud800 and\nnewline"
    report = project.root / "r.xml"
    code, out = cli(capsys, path, "--junit", report)
    assert code == 1
    assert f"FAIL  {shown}  (line {line_of(path, '- name:')})" in out
    assert not any(ch in out for ch in "\x07\x1b\ud800")
    [suite] = JUnitXml.fromfile(str(report))
    [tc] = list(suite)
    assert tc.name == shown
    [failure] = tc.result
    assert shown in (failure.text or "")


# ---------------------------------------------------------------------------------------------------------------
# Several files in one run


def test_several_files_in_one_run(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    one = project.tests(f"""\
        - name: a
          request: {{path: /v1/items}}
          token: {TOKEN}
          expect: {{status: 200}}
        - name: b
          request: {{path: /healthz}}
          expect: {{status: 200}}
    """)
    two = project.tests(
        """\
        - name: c
          request: {path: /healthz}
          expect: {status: 200}
    """,
        name="two",
    )
    failing = project.tests(
        """\
        - name: d
          request: {path: /healthz}
          expect: {status: 500}
    """,
        name="failing",
    )
    invalid = project.root / "invalid.test.yaml"
    invalid.write_text("policy: shop.yaml\n")

    code, out = cli(capsys, one, two)
    assert code == 0
    assert out.splitlines()[-1] == "total: 3 passed, 0 failed"
    code, out = cli(capsys, one, two, failing)
    assert code == 1
    assert out.splitlines()[-1] == "total: 3 passed, 1 failed"
    code, out = cli(capsys, one, invalid)
    assert code == 1
    assert out.splitlines()[-1] == "total: 2 passed, 0 failed, 1 file(s) not run"
    assert main(["policy", "test"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# No network: key sources are never read, introspection is answered from the case


NOWHERE = """\
version: 1
service: shop
identity_providers:
  loopback:
    issuer: https://loopback.invalid
    jwks_uri: http://127.0.0.1:9/jwks.json
    audiences: [shop-api]
    algorithms: [ES256]
    ca_file: certs/missing-ca.pem
  discovered:
    issuer: https://idp.invalid
    discovery: true
    audiences: [shop-api]
    algorithms: [RS256]
  on-disk:
    issuer: https://disk.invalid
    jwks_file: keys/does-not-exist.json
    audiences: [shop-api]
    algorithms: [EdDSA]
routes:
  - name: any
    match: {path: /v1/any}
    authn: [jwt]
    allow: {}
"""
NOWHERE_CASES = """\
- name: keys from a port where nothing listens
  request: {path: /v1/any}
  token: {provider: loopback, claims: {sub: a}}
  expect: {status: 200, upstream_headers: {x-authz-subject: a}}
- name: keys from discovery of an issuer that does not resolve
  request: {path: /v1/any}
  token: {provider: discovered, claims: {sub: b}}
  expect: {status: 200, upstream_headers: {x-authz-subject: b}}
- name: keys from a file that does not exist
  request: {path: /v1/any}
  token: {provider: on-disk, claims: {sub: c}}
  expect: {status: 200, upstream_headers: {x-authz-subject: c}}
- name: a token from none of them
  request: {path: /v1/any}
  token: {provider: loopback, claims: {sub: d, iss: "https://unknown.invalid"}}
  expect: {status: 401, reason: token_issuer_unknown}
"""

INTROSPECTION = """\
version: 1
service: shop
identity_providers:
  opaque:
    issuer: https://idp.invalid
    introspection_endpoint: https://idp.invalid/introspect
    client_id: shop
    client_secret_file: secrets/introspection.secret
    audiences: [shop-api]
    algorithms: [ES256]
routes:
  - name: list-items
    match: {methods: [GET], path: /v1/items}
    authn: [jwt]
    allow: {scopes_all: ["items:read"]}
  - name: create-item
    match: {methods: [POST], path: /v1/items}
    authn: [jwt]
    bind: dpop
    allow: {}
"""
INTROSPECTION_CASES = """\
- name: an opaque token with the scope
  request: {path: /v1/items}
  token: {claims: {sub: alice, scope: "items:read"}}
  expect: {status: 200, upstream_headers: {x-authz-subject: alice, authorization: null}}
- name: an opaque token without it
  request: {path: /v1/items}
  token: {claims: {sub: alice, scope: profile}}
  expect: {status: 403, reason: scope_missing}
- name: an expired one
  request: {path: /v1/items}
  token: {claims: {sub: alice, scope: "items:read"}, expires_in: -120}
  expect: {status: 401, reason: token_expired}
- name: for another audience
  request: {path: /v1/items}
  token: {claims: {sub: alice, scope: "items:read", aud: other-api}}
  expect: {status: 401, reason: token_audience_mismatch}
- name: bound to a dpop key
  request: {method: POST, path: /v1/items}
  token: {claims: {sub: alice}, dpop: true}
  expect: {status: 200}
"""


# What a deployed policy reads besides its keys: a CA bundle, secrets mounted in the cluster, Redis, an alert
# webhook (with an alert on the first failure). A test reads and sends none of them.
DEPLOYED = """\
version: 1
service: shop
identity_providers:
  corp:
    issuer: https://idp.invalid
    discovery: true
    audiences: [shop-api]
    algorithms: [ES256]
    ca_file: certs/ca.pem
dpop: {use_dpop_nonce: true, nonce_secret_file: secrets/dpop-nonce.key}
shared_state: {redis: "redis://127.0.0.1:9/0", password_file: secrets/redis.password}
alerts:
  failed_authentication: {count: 1, window_s: 60}
  webhook: https://hooks.invalid/alerts
routes:
  - name: list-items
    match: {methods: [GET], path: /v1/items}
    authn: [jwt]
    allow: {}
    rate_limit: {key: subject, per_second: 1, burst: 1, shared: true}
  - name: create-item
    match: {methods: [POST], path: /v1/items}
    authn: [jwt]
    bind: dpop
    allow: {}
"""
DEPLOYED_CASES = """\
- name: allowed, with a shared limit
  request: {path: /v1/items}
  token: {claims: {sub: a}}
  expect: {status: 200, headers: {ratelimit-policy: '"list-items";q=1;w=1'}}
- name: refused, which would raise an alert
  request: {path: /v1/items}
  token: {claims: {sub: a}, expires_in: -100}
  expect: {status: 401, reason: token_expired}
- name: bound, with a nonce
  request: {method: POST, path: /v1/items}
  token: {claims: {sub: a}, dpop: true}
  expect: {status: 200}
"""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any connect or name lookup raises (and is recorded): a run that needs the network fails loudly."""
    tried: list[str] = []

    def connect(self: socket.socket, address: Any) -> None:
        tried.append(f"connect {address!r}")
        raise OSError("policy test: no network")

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        tried.append(f"getaddrinfo {host!r}")
        raise socket.gaierror(socket.EAI_NONAME, "policy test: no network")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", connect)
    return tried


def test_key_sources_pointing_nowhere_are_never_read(project: Project) -> None:
    path = project.tests(NOWHERE_CASES, NOWHERE)
    result = passes(path)
    assert result.passed == 4
    assert any("ca_file" in n and "a test fetches nothing" in n for n in result.notes)


def test_no_socket_is_opened_and_no_name_resolved(project: Project, no_network: list[str]) -> None:
    path = project.tests(NOWHERE_CASES, NOWHERE)
    assert passes(path).passed == 4
    path = project.tests(INTROSPECTION_CASES, INTROSPECTION, name="opaque")
    assert passes(path).passed == 5
    path = project.tests(DEPLOYED_CASES, DEPLOYED, name="deployed")
    result = passes(path)
    assert result.passed == 3
    policy = path.with_name("deployed.yaml")
    assert result.notes == [
        f"{policy}:9: identity_providers.corp.ca_file: no such file '{project.root}/certs/ca.pem'; "
        "a test fetches nothing",
        f"{policy}:10: dpop.nonce_secret_file: cannot read '{project.root}/secrets/dpop-nonce.key': No such file or "
        "directory; a throwaway value stands in for it",
        f"{policy}:11: shared_state.password_file: cannot read '{project.root}/secrets/redis.password': No such file "
        "or directory; a throwaway value stands in for it",
        "shared_state (Redis) is not used: quotas and replay caches are each case's own",
    ]
    project.key()
    path = project.tests(FULL_COVERAGE, name="full")
    assert passes(path, require_coverage=True).passed == 10
    assert no_network == []


def test_the_network_guard_works(no_network: list[str]) -> None:
    """The guard above would catch a fetch: a real connect attempt through it fails."""
    with pytest.raises(OSError), socket.socket() as s:
        s.connect(("127.0.0.1", 9))
    assert no_network == ["connect ('127.0.0.1', 9)"]


def test_an_introspection_only_provider_is_answered_from_the_cases_claims(project: Project) -> None:
    path = project.tests(INTROSPECTION_CASES, INTROSPECTION)
    result = passes(path)
    assert any("opaque tokens, answered from each case's claims" in n for n in result.notes)
    assert any("client_secret_file" in n and "throwaway" in n for n in result.notes)


# ---------------------------------------------------------------------------------------------------------------
# No token, proof, signature or key in any output


@pytest.fixture
def credentials_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token, proof, signature header and certificate the runner makes in this test."""
    made: list[str] = []

    def record(cls: Any, name: str) -> None:
        real = getattr(cls, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            made.extend(out.values() if isinstance(out, dict) else [out])
            return out

        monkeypatch.setattr(cls, name, spy)

    record(credentials.Keys, "jws")
    record(credentials.DpopClient, "proof")
    record(runner, "sign_request")
    real_cert = credentials.ClientCertificate.__init__

    def cert(self: credentials.ClientCertificate, now: float) -> None:
        real_cert(self, now)
        made.append(self.url_encoded_pem)

    monkeypatch.setattr(credentials.ClientCertificate, "__init__", cert)
    return made


def parts(credential: str) -> Iterator[str]:
    """The credential and each piece of it long enough to be recognised (a JWS's signature, a sig1=:...:)."""
    yield credential
    for piece in credential.replace(":", ".").replace("=", ".").split("."):
        if len(piece) >= 16:
            yield piece


def test_no_credential_appears_in_the_terminal_or_the_junit_file(
    project: Project, capsys: pytest.CaptureFixture[str], credentials_made: list[str]
) -> None:
    key = project.key()
    session = os.urandom(12).hex()
    failing = """\
- name: forwarded, expected absent
  request: {path: /v1/export, headers: {cookie: "session=SESSION"}}
  token: {claims: {sub: alice}}
  expect: {status: 401, upstream_headers: {authorization: null, cookie: null}}
- name: a signed request that fails
  request: {method: POST, path: /v1/hooks/invoices, body: "{}"}
  signed_by: billing
  expect: {status: 401, upstream_headers: {signature: x, signature-input: null}}
- name: dpop that fails
  request: {method: POST, path: /v1/items}
  token: {claims: {sub: carol, roles: [writer]}, dpop: true}
  expect: {status: 403, upstream_headers: {dpop: null}}
"""
    path = project.tests(FULL_COVERAGE + failing.replace("SESSION", session))
    report = project.root / "r.xml"
    code, out = cli(capsys, path, "--verbose", "--junit", report)
    assert code == 1 and "10 passed, 3 failed" in out
    assert "(a credential, not shown)" in out
    assert len(credentials_made) >= 10
    shown = out + report.read_text()
    assert "eyJ" not in shown
    for credential in credentials_made:
        for piece in parts(credential):
            assert piece not in shown
    for secret in (base64.b64encode(key).decode(), key.hex(), session):
        assert secret not in shown


# ---------------------------------------------------------------------------------------------------------------
# Isolation: a fresh engine per case


def test_each_case_gets_a_fresh_engine(project: Project) -> None:
    """The same DPoP case twice passes twice (a fresh replay cache), and a limit of burst 1 is spent anew by
    each case: every case sees a full bucket and leaves it empty."""
    same_dpop = """\
        request: {method: POST, path: /v1/items}
        token: {claims: {sub: carol, roles: [writer], jti: same-token}, dpop: true}
        expect: {status: 200}
    """
    same_limit = """\
        request: {path: /v1/items}
        token: {claims: {sub: alice, scope: "items:read", jti: same-token}}
        expect: {status: 200, headers: {ratelimit: '"list-items";r=0;t=1'}}
    """
    cases = ""
    for n in range(3):
        cases += f"- name: dpop {n}\n" + textwrap.indent(textwrap.dedent(same_dpop), "  ")
        cases += f"- name: limit {n}\n" + textwrap.indent(textwrap.dedent(same_limit), "  ")
    path = project.tests(cases)
    assert passes(path).passed == 6
    assert run_file(path).passed == 6  # and so does a second run of the same file


def test_repeat_reaches_a_rate_limit_and_expect_judges_the_last_request(project: Project) -> None:
    """`repeat: N` sends the same caller's request N times on one engine (a fresh proof each time); the burst of 1
    lets the first through, the second gets the 429 with its Retry-After (one token of 60 a minute: 1 s). Other
    cases still start with full
    buckets."""
    path = project.tests(f"""\
        - name: over the limit
          request: {{path: /v1/items}}
          token: {TOKEN}
          repeat: 2
          expect: {{status: 429, reason: rate_limited, headers: {{retry-after: "1"}}}}
        - name: the next case has its own bucket
          request: {{path: /v1/items}}
          token: {TOKEN}
          expect: {{status: 200}}
    """)
    result = passes(path)
    assert [len(c.decisions) for c in result.cases] == [2, 1]
    assert [d.status for d in result.cases[0].decisions] == [200, 429]


def test_cases_are_decided_as_run_decides_them_and_explained_when_they_fail(project: Project) -> None:
    """A repeated request is answered from the engine's remembered allows, as behind `run` (the traced path never
    uses them); a passing case has no trace unless asked, a failing one always has it."""
    path = project.tests(f"""\
        - name: three times
          request: {{path: /v1/export}}
          token: {TOKEN}
          repeat: 3
          expect: {{status: 200}}
        - name: wrong
          request: {{path: /v1/items}}
          expect: {{status: 200}}
    """)
    result = run_file(path)
    three, wrong = result.cases
    assert three.ok and three.trace == [] and [d.status for d in three.decisions] == [200, 200, 200]
    assert not wrong.ok and any("token_missing" in step for step in wrong.trace)
    assert run_file(path, explain=True).cases[0].trace  # --verbose
