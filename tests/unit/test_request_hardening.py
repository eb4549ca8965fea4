"""The agent safe on its own (issue 11): what a hostile client, a lenient framework or a missing proxy makes of a
request. Each test reproduces a way past the rules that worked before, judged by the engine with no Envoy in front."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import reasons as R
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from agent.errors import ConfigErrors
from agent.policy.paths import request_method_ok, split_request_path
from tests.keys import SigningKey, claims, mint

ROUTES = textwrap.dedent("""\
    routes:
      - name: delete-order
        match: {methods: [DELETE], path: "/v1/orders/{id}"}
        authn: [jwt]
        allow: {roles_any: [admin]}
      - name: order
        match: {path: "/v1/orders/{id}"}
        authn: [jwt]
        allow: {scopes_all: [orders:read]}
      - name: public
        match: {path: /v1/public/**}
        public: true
      - name: admin
        match: {path: /admin/**}
        authn: [jwt]
        allow: {roles_any: [admin]}
      - name: files
        match: {methods: [GET], path: /v1/files/**}
        public: true
        allow_double_encoded_path: true
    """)


@pytest.fixture
async def engine(write_policy: Callable[..., Path]) -> Engine:
    e = Engine.for_policy(load_policy(write_policy(ROUTES)))
    for s in e.stores.values():
        assert await s.refresh()
    return e


@pytest.fixture
def reader(keys: dict[str, SigningKey]) -> str:
    return mint(keys["ES256"], claims(scope="orders:read"))


async def decide(engine: Engine, method: str, path: str, token: str | None = None, **headers: str) -> Decision:
    hdrs = dict(headers)
    if token is not None:
        hdrs["authorization"] = f"Bearer {token}"
    return await engine.check(RequestView(method=method, path=path, headers=hdrs, source="10.1.2.3"))


# 1. A method that is not an upper-case RFC 9110 token is never judged as "some other method".


@pytest.mark.parametrize(
    "method", ["delete", "Delete", "dELETE", "get", "", " GET", "GET ", "G ET", "GET\r\n", "DÉLETE"]
)
async def test_a_method_that_is_not_an_upper_case_token_is_refused(engine: Engine, reader: str, method: str) -> None:
    d = await decide(engine, method, "/v1/orders/7", reader)
    assert (d.allowed, d.status, d.reason) == (False, 400, R.METHOD_INVALID)


async def test_invalid_methods_are_refused_on_public_routes_too(engine: Engine) -> None:
    d = await decide(engine, "get", "/v1/public/a")
    assert (d.allowed, d.status, d.reason) == (False, 400, R.METHOD_INVALID)


async def test_upper_case_methods_still_route_as_written(engine: Engine, reader: str) -> None:
    assert (await decide(engine, "DELETE", "/v1/orders/7", reader)).reason == R.ROLE_MISSING
    assert (await decide(engine, "PATCH", "/v1/orders/7", reader)).allowed
    assert (await decide(engine, "M-SEARCH", "/v1/public/x")).allowed  # any token in upper case is a method


def test_request_method_ok() -> None:
    assert all(request_method_ok(m) for m in ("GET", "DELETE", "PROPFIND", "M-SEARCH", "X_1"))
    assert not any(request_method_ok(m) for m in ("", "get", "Get", "GE T", "GET\x00", "Ä", "A" * 65))


# 2. Headers that name one of the agent's own, once "_" reads as "-" and case is ignored, never reach the app.


async def test_forged_identity_headers_with_underscores_or_case_are_removed(engine: Engine, reader: str) -> None:
    forged = {
        "x_authz_subject": "mallory",
        "x-authz_client_id": "evil",
        "X-Authz-Route": "admin",
        "X_AUTHZ_DECISION_ID": "x",
        "x_authz_role": "admin",
    }
    for path, token in (("/v1/public/a", None), ("/v1/orders/7", reader)):
        d = await decide(engine, "GET", path, token, **forged)
        assert d.allowed
        ours = {k for k, _ in d.upstream_headers}
        # Each forged header is removed, or is one the agent sets itself (Envoy overwrites it, names are
        # case-insensitive); what the agent sets is never on the remove list, which Envoy may apply after.
        for name in forged:
            assert name in d.remove_headers or name.lower() in ours, (name, d.remove_headers)
        assert "x_authz_subject" in d.remove_headers and "x_authz_role" in d.remove_headers
        assert not {h.lower() for h in d.remove_headers} & ours


async def test_method_and_path_override_headers_are_removed_before_the_app(engine: Engine, reader: str) -> None:
    override = {
        "x-http-method-override": "DELETE",
        "X-HTTP-Method": "DELETE",
        "x_method_override": "DELETE",
        "x-original-url": "/admin/keys",
        "X-Rewrite-URL": "/admin/keys",
    }
    for path, token in (("/v1/public/a", None), ("/v1/orders/7", reader)):
        d = await decide(engine, "POST", path, token, **override)
        assert d.allowed
        assert set(override) <= set(d.remove_headers)


# Paths that a lenient upstream would read differently from the agent.


@pytest.mark.parametrize(
    "path",
    [
        "/v1/public/%252e%252e/admin/keys",
        "/v1/public/%252E%252e",
        "/v1/public/a%252fb",
        "/v1/orders/%2525",
    ],
)
async def test_double_encoded_paths_are_refused(engine: Engine, reader: str, path: str) -> None:
    d = await decide(engine, "GET", path, reader)
    assert (d.allowed, d.status, d.reason) == (False, 400, R.PATH_DOUBLE_ENCODED)


async def test_a_route_may_opt_in_to_double_encoded_paths(engine: Engine) -> None:
    d = await decide(engine, "GET", "/v1/files/report%2520final.pdf")
    assert d.allowed and d.route == "files"
    # A lone %25 (a literal percent sign) is not a double encoding.
    assert (await decide(engine, "GET", "/v1/public/100%25")).allowed
    assert (await decide(engine, "GET", "/v1/public/a?q=%252e%252e")).allowed  # the query is the app's


@pytest.mark.parametrize(
    "path",
    [
        "/v1/public/..;/admin/keys",
        "/v1/public/.;/admin",
        "/v1/public/..;jsessionid=x/admin/keys",
        "/v1/public/%2e%2e;/admin/keys",
        "/v1/public/.%2e;x/admin",
        "/v1/public/..%3b/admin/keys",
    ],
)
async def test_dot_segments_with_path_parameters_are_refused(engine: Engine, path: str) -> None:
    assert split_request_path(path) is None
    d = await decide(engine, "GET", path)
    assert (d.allowed, d.status, d.reason) == (False, 400, R.MALFORMED_REQUEST)


def test_path_parameters_without_dot_segments_still_match() -> None:
    assert split_request_path("/v1/public/a;v=1/b") == ["v1", "public", "a;v=1", "b"]
    assert split_request_path("/v1/public/...;x") == ["v1", "public", "...;x"]


def test_the_double_encoding_opt_in_is_a_boolean(write_policy: Callable[..., Path]) -> None:
    bad = ROUTES.replace("allow_double_encoded_path: true", "allow_double_encoded_path: yes please")
    with pytest.raises(ConfigErrors) as e:
        load_policy(write_policy(bad))
    assert "policy.yaml:" in str(e.value) and "allow_double_encoded_path" in str(e.value)
