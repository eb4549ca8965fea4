"""Hostile requests: whatever arrives, the engine answers with a reason code and never crashes or allows by accident."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import reasons as R
from agent.config import load_policy
from agent.decision import RequestView
from agent.engine import Engine
from tests.keys import SigningKey, b64, claims, craft

KNOWN = {v for k, v in vars(R).items() if k.isupper()}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 2**64, -1, 253402300800])  # beyond float() and NumericDate
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def engine_factory(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> Callable[[], Engine]:
    from tests.conftest import ROUTES, idp_block
    from tests.keys import jwks

    d = tmp_path_factory.mktemp("hostile")
    (d / "jwks.json").write_text(json.dumps(jwks(*keys.values())))
    (d / "policy.yaml").write_text("version: 1\nservice: orders\n" + idp_block("jwks_file: jwks.json") + ROUTES)
    policy = load_policy(d / "policy.yaml")

    def make() -> Engine:
        return Engine.for_policy(policy)

    return make


async def ready(make: Callable[[], Engine]) -> Engine:
    e = make()
    for s in e.stores.values():
        await s.refresh()
    return e


def assert_sane(d: Any) -> None:
    assert d.reason in KNOWN
    assert d.reason != R.INTERNAL_ERROR
    if not d.allowed:
        body = json.loads(d.body)
        assert body["reason"] == d.reason and body["status"] == d.status


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.text(max_size=10),
    path=st.text(max_size=60),
    auth=st.one_of(
        st.none(), st.text(max_size=200), st.from_regex(r"Bearer [A-Za-z0-9._~+/=-]{0,300}", fullmatch=True)
    ),
    extra=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5),
)
async def test_random_requests_get_a_reason_never_a_crash(
    engine_factory: Callable[[], Engine], method: str, path: str, auth: str | None, extra: dict[str, str]
) -> None:
    e = await ready(engine_factory)
    headers = dict(extra)
    if auth is not None:
        headers["authorization"] = auth
    d = await e.check(RequestView(method=method, path=path, headers=headers))
    assert_sane(d)
    assert not d.allowed or d.reason == R.PUBLIC


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=8), json_values, max_size=5), body=json_values)
async def test_validly_signed_garbage_is_refused_with_a_reason(
    engine_factory: Callable[[], Engine], keys: dict[str, SigningKey], header: dict[str, Any], body: Any
) -> None:
    e = await ready(engine_factory)
    token = craft(keys["ES256"], {**header, "alg": "ES256", "kid": "kid-ES256"}, json.dumps(body))
    d = await e.check(RequestView("GET", "/v1/orders", headers={"authorization": f"Bearer {token}"}))
    assert_sane(d)
    assert not d.allowed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    overrides=st.dictionaries(
        st.sampled_from(
            ["sub", "scope", "roles", "aud", "exp", "iat", "nbf", "client_id", "tenant_id", "jti", "acr", "auth_time"]
        ),
        json_values,
        max_size=4,
    )
)
async def test_claims_of_any_shape_never_crash_the_rules(
    engine_factory: Callable[[], Engine], keys: dict[str, SigningKey], overrides: dict[str, Any]
) -> None:
    e = await ready(engine_factory)
    token = craft(keys["ES256"], {"alg": "ES256", "kid": "kid-ES256"}, claims(**overrides))
    for method, path in [("GET", "/v1/orders"), ("GET", "/v1/tenants/acme/orders/1"), ("POST", "/v1/payouts")]:
        assert_sane(await e.check(RequestView(method, path, headers={"authorization": f"Bearer {token}"})))


async def test_huge_and_deep_inputs_are_refused_cheaply(engine_factory: Callable[[], Engine]) -> None:
    e = await ready(engine_factory)
    deep = b64(("[" * 5000).encode())  # under the size cap, past the JSON parser's nesting limit
    deep_obj = b64(('{"a":' * 1200 + "1" + "}" * 1200).encode())
    for auth in [
        "Bearer " + "a" * 100_000,
        f"Bearer {deep}.e30.AA",
        f"Bearer e30.{deep_obj}.AA",
        "Bearer " + "a." * 5000,
    ]:
        d = await e.check(RequestView("GET", "/v1/orders", headers={"authorization": auth}))
        assert_sane(d)
        assert d.status == 401
    d = await e.check(RequestView("GET", "/" + "a/" * 10_000))
    assert (d.status, d.reason) == (400, R.MALFORMED_REQUEST)


@pytest.fixture(scope="module")
def pop_engine_factory(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> Callable[[], Engine]:
    from tests.conftest import idp_block
    from tests.keys import jwks
    from tests.unit.test_binding import ROUTES as POP_ROUTES

    d = tmp_path_factory.mktemp("hostile-pop")
    (d / "jwks.json").write_text(json.dumps(jwks(*keys.values())))
    (d / "billing.key").write_text("cXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXFxcXE=\n")
    (d / "policy.yaml").write_text("version: 1\nservice: orders\n" + idp_block("jwks_file: jwks.json") + POP_ROUTES)
    policy = load_policy(d / "policy.yaml")
    return lambda: Engine.for_policy(policy)


sf_text = st.one_of(
    st.text(max_size=120),
    st.from_regex(
        r'sig[0-9]=\("@method"( "[a-z@-]{1,12}"){0,4}\)(;[a-z]{1,7}=("[a-z0-9]{0,8}"|[0-9]{1,12})){0,5}', fullmatch=True
    ),
    st.from_regex(r"sig[0-9]=:[A-Za-z0-9+/]{0,60}={0,2}:", fullmatch=True),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    signature_input=sf_text,
    signature=sf_text,
    digest=st.one_of(st.none(), sf_text),
    body=st.binary(max_size=64),
    dpop=st.one_of(
        st.none(),
        st.text(max_size=100),
        st.from_regex(r"[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,20}", fullmatch=True),
    ),
    certificate=st.one_of(st.just(""), st.text(max_size=80)),
    scheme=st.sampled_from(["", "http", "https", "ftp"]),
    host=st.text(max_size=20),
)
async def test_hostile_proofs_signatures_and_certificates_get_a_reason(
    pop_engine_factory: Callable[[], Engine],
    keys: dict[str, SigningKey],
    signature_input: str,
    signature: str,
    digest: str | None,
    body: bytes,
    dpop: str | None,
    certificate: str,
    scheme: str,
    host: str,
) -> None:
    e = await ready(pop_engine_factory)
    signed = {"signature-input": signature_input, "signature": signature, "content-length": str(len(body))}
    if digest is not None:
        signed["content-digest"] = digest
    d = await e.check(RequestView("POST", "/v1/billing/x", host, signed, scheme=scheme, body=body))
    assert_sane(d)
    assert not d.allowed
    bound = craft(keys["ES256"], {"alg": "ES256", "kid": "kid-ES256"}, claims(cnf={"jkt": "x" * 43}))
    for scheme_word in ("DPoP", "Bearer"):
        headers = {"authorization": f"{scheme_word} {bound}"}
        if dpop is not None:
            headers["dpop"] = dpop
        view = RequestView("POST", "/v1/orders", host, headers, scheme=scheme, certificate=certificate)
        d = await e.check(view)
        assert_sane(d)
        assert not d.allowed
