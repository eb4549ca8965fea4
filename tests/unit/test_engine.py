"""The engine's decisions as Envoy and the caller see them: status, challenge, headers, body, audit record."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent import reasons as R
from agent.audit.records import decision_record
from agent.config import Policy, load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.keys import SigningKey, claims, craft, mint


class ListAudit:
    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def submit(self, view: RequestView, decision: Decision, policy: Policy, now: float) -> None:
        self.records.append(decision_record(view, decision, policy, now))


@pytest.fixture
async def engine(write_policy: Callable[..., Path]) -> Engine:
    e = Engine.for_policy(load_policy(write_policy()), ListAudit())
    for s in e.stores.values():
        assert await s.refresh()
    return e


async def check(engine: Engine, method: str, path: str, token: str | None = None, **headers: str) -> Decision:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        hdrs["authorization"] = f"Bearer {token}"
    return await engine.check(RequestView(method=method, path=path, headers=hdrs, source="10.1.2.3"))


def body(d: Decision) -> dict[str, Any]:
    return dict(json.loads(d.body))


async def test_allowed_request_gets_identity_headers_and_loses_spoofed_ones(
    engine: Engine, keys: dict[str, SigningKey]
) -> None:
    d = await check(
        engine, "GET", "/v1/orders?page=2", mint(keys["ES256"]), x_authz_subject="mallory", x_authz_role="admin"
    )
    assert (d.allowed, d.status, d.reason, d.route) == (True, 200, R.ALLOWED, "list-orders")
    assert dict(d.upstream_headers) == {
        "x-authz-subject": "alice",
        "x-authz-client-id": "web-app",
        "x-authz-route": "list-orders",
        "x-authz-decision-id": d.decision_id,
    }
    assert set(d.remove_headers) == {"x-authz-role", "authorization"}


async def test_forward_token_keeps_authorization(engine: Engine, keys: dict[str, SigningKey]) -> None:
    d = await check(engine, "GET", "/v1/export", mint(keys["ES256"]))
    assert d.allowed and "authorization" not in d.remove_headers


async def test_no_token_is_401_with_a_bare_bearer_challenge(engine: Engine) -> None:
    d = await check(engine, "GET", "/v1/orders")
    assert (d.status, d.reason, d.outcome) == (401, R.TOKEN_MISSING, "deny")
    assert dict(d.response_headers)["www-authenticate"] == "Bearer"
    assert body(d) == {
        "type": "urn:authz-agent:reason:token_missing",
        "title": "Authentication required",
        "status": 401,
        "reason": "token_missing",
        "decision_id": d.decision_id,
    }
    assert dict(d.response_headers)["content-type"] == "application/problem+json"


async def test_expired_token_is_401_with_invalid_token(engine: Engine, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    d = await check(engine, "GET", "/v1/orders", mint(keys["ES256"], claims(iat=now - 900, exp=now - 300)))
    assert (d.status, d.reason) == (401, R.TOKEN_EXPIRED)
    assert (
        dict(d.response_headers)["www-authenticate"]
        == 'Bearer error="invalid_token", error_description="token_expired"'
    )


@pytest.mark.parametrize("header", ["Basic YWxpY2U6cHc=", "DPoP abc", "Bearer", "Bearer a b", "Bearer a,b"])
async def test_other_schemes_and_malformed_bearer_are_401(engine: Engine, header: str) -> None:
    d = await check(engine, "GET", "/v1/orders", authorization=header)
    assert d.status == 401 and d.reason in (R.AUTH_SCHEME_UNSUPPORTED, R.TOKEN_MALFORMED)


async def test_missing_scope_is_403_insufficient_scope_naming_the_scope(
    engine: Engine, keys: dict[str, SigningKey]
) -> None:
    d = await check(engine, "GET", "/v1/orders", mint(keys["ES256"], claims(scope="profile")))
    assert (d.status, d.reason) == (403, R.SCOPE_MISSING)
    assert dict(d.response_headers)["www-authenticate"] == (
        'Bearer error="insufficient_scope", error_description="scope_missing", scope="orders:read"'
    )


async def test_role_rule(engine: Engine, keys: dict[str, SigningKey]) -> None:
    writer = await check(engine, "POST", "/v1/orders", mint(keys["ES256"], claims(roles=["writer"])))
    reader = await check(engine, "POST", "/v1/orders", mint(keys["ES256"], claims(roles=["reader"])))
    assert writer.allowed and (reader.status, reader.reason) == (403, R.ROLE_MISSING)
    assert "www-authenticate" not in dict(reader.response_headers)


async def test_object_level_claim_must_equal_the_path_parameter(engine: Engine, keys: dict[str, SigningKey]) -> None:
    token = mint(keys["ES256"], claims(tenant_id="acme"))
    assert (await check(engine, "GET", "/v1/tenants/acme/orders/9", token)).allowed
    other = await check(engine, "GET", "/v1/tenants/globex/orders/9", token)
    assert (other.status, other.reason) == (403, R.CLAIM_MISMATCH)
    # A token without the claim, or with a number where a string is bound, never matches.
    assert not (await check(engine, "GET", "/v1/tenants/7/orders/9", mint(keys["ES256"], claims(tenant_id=7)))).allowed
    assert not (await check(engine, "GET", "/v1/tenants/acme/orders/9", mint(keys["ES256"]))).allowed


async def test_step_up_is_401_insufficient_user_authentication(engine: Engine, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    base = {"scope": "payouts:write"}
    weak = await check(engine, "POST", "/v1/payouts", mint(keys["ES256"], claims(**base, acr="pwd", auth_time=now)))
    assert (weak.status, weak.reason) == (401, R.STEP_UP_REQUIRED)
    assert dict(weak.response_headers)["www-authenticate"] == (
        'Bearer error="insufficient_user_authentication", error_description="step_up_required", '
        'acr_values="mfa", max_age=300'
    )
    stale = await check(
        engine, "POST", "/v1/payouts", mint(keys["ES256"], claims(**base, acr="mfa", auth_time=now - 301))
    )
    assert stale.reason == R.STEP_UP_REQUIRED
    fresh = await check(engine, "POST", "/v1/payouts", mint(keys["ES256"], claims(**base, acr="mfa", auth_time=now)))
    assert fresh.allowed


@pytest.mark.parametrize("field", ["exp", "nbf", "iat", "auth_time"])
@pytest.mark.parametrize("value", ["1" + "0" * 399, "-" + "9" * 400, "-1", "true", "1e308", "Infinity", "NaN"])
async def test_out_of_range_time_claims_are_401_never_500(
    engine: Engine, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture, field: str, value: str
) -> None:
    caplog.set_level(logging.DEBUG)
    now = int(time.time())
    fields = claims(scope="payouts:write", acr="mfa", auth_time=now)
    fields.pop(field, None)
    body = json.dumps(fields)[:-1] + f', "{field}": {value}}}'
    token = craft(keys["ES256"], {"alg": "ES256", "kid": "kid-ES256"}, body)
    for method, path in [("POST", "/v1/payouts"), ("GET", "/v1/orders")]:
        d = await check(engine, method, path, token)
        assert d.status == 401, (d.status, d.reason)
        assert d.reason in (R.TOKEN_CLAIM_INVALID, R.TOKEN_MALFORMED)
    assert "Traceback" not in caplog.text and "OverflowError" not in caplog.text


async def test_auth_time_in_the_future_does_not_satisfy_max_auth_age(
    engine: Engine, keys: dict[str, SigningKey]
) -> None:
    # An auth_time beyond the leeway (30 s) is no authentication that happened: never "fresh enough".
    now = int(time.time())
    for ahead in (60, 3600, 10**9):
        token = mint(keys["ES256"], claims(scope="payouts:write", acr="mfa", auth_time=now + ahead))
        d = await check(engine, "POST", "/v1/payouts", token)
        assert (d.status, d.reason) == (401, R.TOKEN_CLAIM_INVALID)


async def test_time_bound_grant(write_policy: Callable[..., Path], keys: dict[str, SigningKey]) -> None:
    soon = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    later = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    routes = f"""routes:
  - name: partner
    match: {{path: /v1/partner}}
    authn: [jwt]
    allow: {{not_before: "{soon}", not_after: "{later}"}}
"""
    e = Engine.for_policy(load_policy(write_policy(routes)))
    await next(iter(e.stores.values())).refresh()
    d = await check(e, "GET", "/v1/partner", mint(keys["ES256"]))
    assert (d.status, d.reason) == (403, R.GRANT_NOT_ACTIVE)
    e._clock = lambda: time.time() + 86400 * 1.5
    e.jwt._clock = e._clock
    now = int(e._clock())
    assert (await check(e, "GET", "/v1/partner", mint(keys["ES256"], claims(iat=now, exp=now + 60)))).allowed


async def test_unmatched_path_is_denied_by_default_even_without_token(engine: Engine) -> None:
    d = await check(engine, "GET", "/admin")
    assert (d.status, d.reason, d.route) == (403, R.NO_ROUTE, None)


async def test_wrong_method_is_no_route(engine: Engine, keys: dict[str, SigningKey]) -> None:
    assert (await check(engine, "DELETE", "/v1/orders", mint(keys["ES256"]))).reason == R.NO_ROUTE


@pytest.mark.parametrize("path", ["/v1/orders/../admin", "/v1/%2e%2e/x", "/v1//orders", "/v1/a%2Fb"])
async def test_non_normal_paths_are_400(engine: Engine, path: str) -> None:
    d = await check(engine, "GET", path)
    assert (d.status, d.reason) == (400, R.MALFORMED_REQUEST)


async def test_public_route_needs_nothing_and_still_strips_headers(engine: Engine) -> None:
    d = await check(engine, "GET", "/healthz", authorization="Bearer x", x_authz_subject="mallory")
    assert d.allowed and d.reason == R.PUBLIC
    assert "x-authz-subject" in d.remove_headers and "authorization" in d.remove_headers


async def test_every_decision_is_audited_without_token_text(
    engine: Engine, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = mint(keys["ES256"], claims(jti="jti-77"))
    bad = mint(keys["ES256"], claims(scope="x"))
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for method, path, tok in [
        ("GET", "/v1/orders?secret=1", good),
        ("GET", "/v1/orders", bad),
        ("GET", "/v1/orders", forged),
        ("GET", "/nope", good),
    ]:
        await check(engine, method, path, tok)
    audit = engine.audit
    assert isinstance(audit, ListAudit)
    recs = audit.records
    assert [r["decision"] for r in recs] == ["allow", "deny", "deny", "deny"]
    assert [r["reason"] for r in recs] == [R.ALLOWED, R.SCOPE_MISSING, R.TOKEN_SIGNATURE_INVALID, R.NO_ROUTE]
    first = recs[0]
    assert first["path"] == "/v1/orders" and first["jti"] == "jti-77" and first["subject"] == "alice"
    assert first["source"] == "10.1.2.3" and first["authn"] == "jwt" and first["route"] == "list-orders"
    assert str(first["policy_version"]).startswith("orders@") and isinstance(first["latency_us"], int)
    dump = json.dumps(recs) + caplog.text
    for tok in (good, bad, forged):
        for part in tok.split("."):
            assert part not in dump


async def test_check_explains_every_step(engine: Engine, keys: dict[str, SigningKey]) -> None:
    trace: list[str] = []
    view = RequestView(
        "GET", "/v1/orders", headers={"authorization": f"Bearer {mint(keys['ES256'], claims(scope='x'))}"}
    )
    d = await engine.check(view, trace)
    assert d.reason == R.SCOPE_MISSING
    assert trace[0].startswith("route 'list-orders'")
    assert trace[1].startswith("authenticated by jwt: subject 'alice'")
    assert "missing scopes orders:read" in trace[2]
