"""Policy loading: every mistake is refused with file:line and a fix; nothing unsupported is silently accepted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.config import load_policy_text
from agent.errors import ConfigErrors

FIXTURES = Path(__file__).parent.parent / "fixtures"
PUBLIC = "routes:\n  - {name: r, match: {path: /}, public: true}\n"
IDP = """\
version: 1
service: orders
identity_providers:
  corp:
    issuer: https://idp.example.com
    jwks_uri: https://idp.example.com/jwks.json
    audiences: [orders-api]
    algorithms: [RS256]
"""


def errors(text: str) -> list[tuple[int, str]]:
    with pytest.raises(ConfigErrors) as e:
        load_policy_text(textwrap.dedent(text), "p.yaml")
    return [(err.line, err.message) for err in e.value.errors]


def only_error(text: str) -> tuple[int, str]:
    errs = errors(text)
    assert len(errs) == 1, errs
    return errs[0]


def test_designs_policy_loads_as_written() -> None:
    lines = (FIXTURES / "design_policy.yaml").read_text().splitlines()
    policy = load_policy_text("\n".join(lines), "design.yaml", FIXTURES)  # as DESIGN.md writes it
    names = ["list-orders", "read-order", "create-order", "read-order-support", "billing-webhook", "health"]
    assert [r.name for r in policy.routes] == names
    assert policy.identity_providers[0].algorithms == {"RS256", "ES256", "EdDSA"}
    assert policy.version.startswith("orders@")
    assert [r.bind for r in policy.routes] == [None, None, "dpop", None, None, None]
    # Policy v2 as DESIGN writes it: alternatives, a route deny rule, a claim: limit key, a top-level deny.
    support = policy.routes[3]
    assert len(support.allow) == 3 and [a.when is not None for a in support.allow] == [True, False, True]
    assert [d.name for d in support.deny] == ["frozen-partner"]
    assert support.rate_limit is not None and support.rate_limit.key == ("claim:tenant_id",)
    assert [d.name for d in policy.deny] == ["blocked-network"]
    limit = policy.routes[0].rate_limit
    assert limit is not None and (limit.key, limit.rate, limit.burst) == (("subject",), 50.0, 100.0)
    (client,) = policy.hmac_clients
    assert (client.name, client.roles, len(client.keys[0])) == ("billing-batch", {"billing"}, 32)


def test_unknown_key_names_its_line_and_suggests_the_fix() -> None:
    line, msg = only_error(
        IDP + "routes:\n  - name: r\n    match: {path: /x}\n    authn: [jwt]\n    alow: {}\n    allow: {}\n"
    )
    assert line == 13 and "unknown key 'alow'" in msg and "did you mean 'allow'" in msg


def test_wrong_types_are_named() -> None:
    line, msg = only_error(IDP + "    leeway_s: soon\nroutes:\n  - {name: r, match: {path: /x}, public: true}\n")
    assert line == 9 and "leeway_s must be a number" in msg


@pytest.mark.parametrize("alg,why", [("HS256", "shared-secret"), ("none", "unsigned"), ("RS257", "unknown")])
def test_unusable_algorithms_are_refused(alg: str, why: str) -> None:
    line, msg = only_error(IDP.replace("[RS256]", f"[RS256, {alg}]") + PUBLIC)
    assert line == 8 and why in msg


def test_same_shape_and_methods_shadow_each_other() -> None:
    text = IDP + textwrap.dedent("""\
        routes:
          - name: a
            match: {methods: [GET, POST], path: "/v1/{id}"}
            authn: [jwt]
            allow: {}
          - name: b
            match: {methods: [POST], path: "/v1/{name}"}
            authn: [jwt]
            allow: {}
        """)
    line, msg = only_error(text)
    assert line == 14 and "'b' matches the same requests as 'a' (line 10) for POST" in msg


def test_route_that_can_never_match_is_refused() -> None:
    line, msg = only_error(IDP + "routes:\n  - {name: r, match: {methods: [], path: /x}, public: true}\n")
    assert line == 10 and "can never match" in msg


def test_route_without_authn_is_not_public_by_omission() -> None:
    _, msg = only_error(IDP + "routes:\n  - {name: r, match: {path: /x}, allow: {}}\n")
    assert "needs 'authn'" in msg


def test_route_without_allow_must_say_so() -> None:
    _, msg = only_error(IDP + "routes:\n  - {name: r, match: {path: /x}, authn: [jwt]}\n")
    assert "needs 'allow'" in msg


def test_claim_bound_to_a_missing_path_parameter_is_refused() -> None:
    text = (
        IDP + "routes:\n  - name: r\n    match: {path: '/t/{tenant}'}\n    authn: [jwt]\n"
        "    allow: {claims: {tenant_id: '{tenantt}'}}\n"
    )
    line, msg = only_error(text)
    assert line == 13 and "{tenantt} is not a parameter" in msg and "tenant" in msg


def test_duplicate_yaml_keys_are_refused() -> None:
    line, msg = only_error(IDP + "    audiences: [x]\nroutes:\n  - {name: r, match: {path: /}, public: true}\n")
    assert line == 9 and "duplicate key 'audiences' (first at line 7)" in msg


def test_invalid_yaml_names_its_line() -> None:
    line, msg = only_error(IDP + "routes:\n  - name: [unclosed\n")
    assert "not valid YAML" in msg and line >= 10


def test_an_ended_grant_loads_with_a_warning() -> None:
    # The clock never makes a policy unloadable: an agent restarted after a grant ended must still start.
    text = (
        IDP + "routes:\n  - name: r\n    match: {path: /x}\n    authn: [jwt]\n"
        "    allow: {not_after: 2020-01-01T00:00:00Z}\n"
    )
    policy = load_policy_text(text)
    ((line, msg),) = policy.warnings
    assert line == 13 and "in the past" in msg


def test_plain_http_key_sources_are_refused_except_loopback() -> None:
    line, msg = only_error(
        IDP.replace("https://idp.example.com/jwks.json", "http://idp.example.com/jwks.json") + PUBLIC
    )
    assert line == 6 and "https://" in msg
    load_policy_text(IDP.replace("https://idp.example.com/jwks.json", "http://127.0.0.1:9/jwks.json") + PUBLIC)


def test_two_introspecting_providers_are_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    block = textwrap.dedent("""\
          {name}:
            issuer: https://{name}.example.com
            introspection_endpoint: https://{name}.example.com/introspect
            client_id: agent
            client_secret_file: secret
            audiences: [a]
            algorithms: [RS256]
        """)
    text = (
        "version: 1\nservice: s\nidentity_providers:\n"
        + textwrap.indent(block.format(name="a"), "  ")
        + textwrap.indent(block.format(name="b"), "  ")
        + PUBLIC
    )
    with pytest.raises(ConfigErrors) as e:
        load_policy_text(text, "p.yaml", tmp_path)
    assert "only one identity provider may introspect" in str(e.value)
    assert "s3cret" not in str(e.value)


def test_the_secret_never_appears_in_the_policys_repr(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret-value\n")
    text = (
        IDP.replace(
            "    jwks_uri: https://idp.example.com/jwks.json\n",
            "    introspection_endpoint: https://idp.example.com/i\n    client_id: agent\n"
            "    client_secret_file: secret\n",
        )
        + PUBLIC
    )
    policy = load_policy_text(text, "p.yaml", tmp_path)
    assert policy.identity_providers[0].introspection is not None
    assert "s3cret-value" not in repr(policy)


INTROSPECTING = IDP.replace(
    "    jwks_uri: https://idp.example.com/jwks.json\n",
    "    introspection_endpoint: https://idp.example.com/i\n    client_id: agent\n    client_secret_file: secret\n",
)


def test_introspection_requires_aud_unless_the_provider_opts_out(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    strict = load_policy_text(INTROSPECTING + PUBLIC, "p.yaml", tmp_path).identity_providers[0].introspection
    assert strict is not None and strict.require_audience is True
    text = INTROSPECTING + "    introspection_require_audience: false\n" + PUBLIC
    lax = load_policy_text(text, "p.yaml", tmp_path).identity_providers[0].introspection
    assert lax is not None and lax.require_audience is False


def test_introspection_require_audience_typos_and_misuse_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")

    def load_errors(text: str) -> list[tuple[int, str]]:
        with pytest.raises(ConfigErrors) as e:
            load_policy_text(text, "p.yaml", tmp_path)
        return [(err.line, err.message) for err in e.value.errors]

    typo = load_errors(INTROSPECTING + "    introspection_require_audiences: false\n" + PUBLIC)
    assert typo == [
        (
            11,
            "identity_providers.corp: unknown key 'introspection_require_audiences'; "
            "did you mean 'introspection_require_audience'?",
        )
    ]
    wrong_type = load_errors(INTROSPECTING + "    introspection_require_audience: 'no'\n" + PUBLIC)
    assert wrong_type[0][0] == 11 and "must be true or false" in wrong_type[0][1]
    without = load_errors(IDP + "    introspection_require_audience: false\n" + PUBLIC)
    assert without[0][0] == 9 and "only for introspection_endpoint" in without[0][1]


def test_policy_lint_prints_file_line_and_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(IDP + "routes:\n  - {name: r, match: {path: /x}, authn: [jwt], allow: {scopes_al: [a]}}\n")
    run = subprocess.run([sys.executable, "-m", "agent", "policy", "lint", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1
    assert f"{bad}:10: routes[0] (r).allow: unknown key 'scopes_al'; did you mean 'scopes_all'?" in run.stderr
    good = tmp_path / "good.yaml"
    good.write_text(IDP + "routes:\n  - {name: r, match: {path: /x}, authn: [jwt], allow: {scopes_all: [a]}}\n")
    run = subprocess.run([sys.executable, "-m", "agent", "policy", "lint", str(good)], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout


def pop_errors(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    (tmp_path / "good.key").write_text("cXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXE=\n")  # 32 bytes
    (tmp_path / "short.key").write_text("c2hvcnQ=\n")
    (tmp_path / "text.key").write_text("not base64 at all!\n")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        with pytest.raises(ConfigErrors) as e:
            load_policy_text(IDP + textwrap.dedent(body), "p.yaml", tmp_path)
    return [(err.line, err.message) for err in e.value.errors]


def test_binding_and_signature_mistakes_are_refused_with_their_line(tmp_path: Path) -> None:
    got = pop_errors(
        tmp_path,
        """\
        dpop: {algorithms: [HS256], replay_cache_entries: 10}
        hmac_clients:
          short: {key_file: short.key}
          text: {key_file: text.key}
          both: {key_file: good.key, key_env: K}
          unset: {key_env: AUTHZ_TEST_UNSET_KEY}
          comps: {key_file: good.key, components: ["@status", "Content-Type"]}
        routes:
          - {name: a, match: {path: /a}, authn: [dpop], allow: {}}
          - {name: b, match: {path: /b}, authn: [jwt], bind: tls, allow: {}}
          - {name: c, match: {path: /c}, authn: [hmac], bind: mtls, allow: {}}
          - {name: d, match: {path: /d}, public: true, bind: dpop}
        """,
    )
    text = "\n".join(f"{line}: {msg}" for line, msg in got)
    expected = [
        (9, "dpop.algorithms: 'HS256' is not an asymmetric JWS algorithm"),
        (9, "dpop.replay_cache_entries must be at least 1024"),
        (11, "hmac_clients.short: key_file holds 5 bytes; an hmac-sha256 key needs at least 32"),
        (12, "hmac_clients.text: key_file must hold the key base64-encoded on one line"),
        (13, "hmac_clients.both: give exactly one of key_file or key_env"),
        (14, "hmac_clients.unset.key_env: the environment variable AUTHZ_TEST_UNSET_KEY is unset or empty"),
        (15, "hmac_clients.comps.components: '@status' is not a derived component"),
        (15, "hmac_clients.comps.components: 'Content-Type' is not a lower-case header field name"),
        (17, "'dpop' is not an authn kind; a DPoP-bound token is a JWT: write 'authn: [jwt]' and 'bind: dpop'"),
        (18, "bind must be dpop or mtls, got 'tls'"),
        (19, "bind: mtls binds a token to its caller, so the route needs 'authn: [jwt]'"),
        (19, "authn: hmac needs at least one entry in hmac_clients"),
        (20, "a public route takes no 'bind'"),
    ]
    for line, fragment in expected:
        assert any(ln == line and fragment in msg for ln, msg in got), f"missing {line}: {fragment}\n{text}"
    assert "cXFx" not in text and "not base64 at all" not in text  # keys never echoed


def test_hmac_keys_from_env_and_rotation_lists_load(tmp_path: Path) -> None:
    (tmp_path / "good.key").write_text("cXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXE=\n")
    body = """\
    hmac_clients:
      batch:
        keys: [{key_file: good.key}, {key_env: AUTHZ_TEST_KEY}]
        roles: [billing]
        components: ["@method", "@target-uri", "content-type"]
        require_nonce: false
    routes:
      - {name: s, match: {path: /s}, authn: [jwt, hmac], allow: {}}
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTHZ_TEST_KEY", "cnJycnJycnJycnJycnJycnJycnJycnJycnJycnJycnI=")
        policy = load_policy_text(IDP + textwrap.dedent(body), "p.yaml", tmp_path)
    (client,) = policy.hmac_clients
    assert client.keys == (b"q" * 32, b"r" * 32)
    assert client.components == ("@method", "@target-uri", "content-type") and not client.require_nonce
    assert "qqqq" not in repr(policy) and "rrrr" not in repr(policy)


def test_shared_state_mistakes_are_refused(tmp_path: Path) -> None:
    body = """\
    shared_state: {redis: "redis://:hunter2@10.0.0.5:6379/0", timeout: 5}
    routes:
      - name: q
        match: {path: /q}
        authn: [jwt]
        allow: {}
        rate_limit: {key: subject, per_second: 5, shared: true}
    """
    got = pop_errors(tmp_path, body)
    text = "\n".join(f"{line}: {msg}" for line, msg in got)
    assert "9: shared_state.redis carries credentials; put the password in password_file" in text
    assert "9: shared_state: unknown key 'timeout'; did you mean 'timeout_ms'?" in text
    assert "hunter2" not in text
    without = "\n".join(line for line in body.splitlines() if "shared_state" not in line) + "\n"
    got = pop_errors(tmp_path, without)
    assert any("'shared: true' needs shared_state: {redis: URL}" in msg for _, msg in got)
    got = pop_errors(tmp_path, body.replace("redis://:hunter2@10.0.0.5:6379/0", "http://10.0.0.5"))
    assert any("shared_state.redis must be a redis://, rediss:// or unix:// URL" in msg for _, msg in got)


def test_audit_omit_params_names_parameters_of_the_path() -> None:
    route = "routes:\n  - {name: r, match: {path: '/t/{tenant}/x/{id}'}, authn: [jwt], allow: {}, audit: %s}\n"
    line, msg = only_error(IDP + route % "{omit_params: [ssn]}")
    assert line == 10 and "'ssn' is not a parameter of the path (id, tenant)" in msg
    _, msg = only_error(IDP + route % "{omit: [id]}")
    assert "omit" in msg
    policy = load_policy_text(IDP + route % "{omit_params: [id]}")
    assert policy.routes[0].audit_omit_params == frozenset({"id"})
