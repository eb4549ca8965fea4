"""Remembered allows (the repeated-request hot path) decide exactly what the full path would have decided."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent import reasons as R
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.clock import Clock
from tests.keys import SigningKey, claims, mint


@pytest.fixture
async def setup(write_policy: Callable[..., Path]) -> tuple[Engine, Clock]:
    clock = Clock()
    e = Engine.for_policy(load_policy(write_policy()), clock=clock, token_cache_entries=4)
    for s in e.stores.values():
        assert await s.refresh()
    return e, clock


def decide(engine: Engine, method: str, path: str, token: str, **headers: str) -> Decision:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    hdrs["authorization"] = f"Bearer {token}"
    d = engine.decide(RequestView(method=method, path=path, headers=hdrs))
    assert d is not None
    return d


def comparable(d: Decision) -> tuple[object, ...]:
    headers = {k: v for k, v in d.upstream_headers if k != "x-authz-decision-id"}
    return (d.allowed, d.status, d.reason, d.route, headers, sorted(d.remove_headers), d.principal)


async def test_a_repeat_is_recalled_and_decides_the_same(
    setup: tuple[Engine, Clock], keys: dict[str, SigningKey]
) -> None:
    engine, _ = setup
    token = mint(keys["ES256"])
    first = decide(engine, "GET", "/v1/orders", token)
    again = decide(engine, "GET", "/v1/orders", token)
    assert engine.remembered_hits == 1
    assert comparable(first) == comparable(again)
    assert first.decision_id != again.decision_id
    assert dict(again.upstream_headers)["x-authz-decision-id"] == again.decision_id


async def test_spoofed_headers_are_removed_on_a_recall_too(
    setup: tuple[Engine, Clock], keys: dict[str, SigningKey]
) -> None:
    engine, _ = setup
    token = mint(keys["ES256"], claims(client_id=None))
    decide(engine, "GET", "/v1/orders", token)
    d = decide(engine, "GET", "/v1/orders", token, x_authz_client_id="spoofed", x_authz_role="admin")
    assert engine.remembered_hits == 1
    assert set(d.remove_headers) == {"x-authz-client-id", "x-authz-role", "authorization"}
    assert "x-authz-client-id" not in dict(d.upstream_headers)


async def test_a_recalled_allow_still_expires_with_its_token(
    setup: tuple[Engine, Clock], keys: dict[str, SigningKey]
) -> None:
    engine, clock = setup
    now = int(clock.now)
    token = mint(keys["ES256"], claims(iat=now, exp=now + 60))
    assert decide(engine, "GET", "/v1/orders", token).allowed
    clock.now = now + 60 + 31  # past exp + leeway
    d = decide(engine, "GET", "/v1/orders", token)
    assert (d.allowed, d.reason) == (False, R.TOKEN_EXPIRED)
    assert engine.remembered_hits == 0


async def test_a_key_set_refresh_forgets_remembered_allows(
    setup: tuple[Engine, Clock], keys: dict[str, SigningKey]
) -> None:
    engine, _ = setup
    token = mint(keys["ES256"])
    decide(engine, "GET", "/v1/orders", token)
    for s in engine.stores.values():
        assert await s.refresh()  # a new KeySet object, as after any refresh or rotation
    assert decide(engine, "GET", "/v1/orders", token).allowed
    assert engine.remembered_hits == 0 and engine.jwt.misses == 2


async def test_the_path_is_part_of_what_is_remembered(setup: tuple[Engine, Clock], keys: dict[str, SigningKey]) -> None:
    engine, _ = setup
    token = mint(keys["ES256"], claims(tenant_id="acme"))
    assert decide(engine, "GET", "/v1/tenants/acme/orders/1", token).allowed
    d = decide(engine, "GET", "/v1/tenants/globex/orders/1", token)
    assert (d.allowed, d.reason) == (False, R.CLAIM_MISMATCH)
    assert decide(engine, "POST", "/v1/orders", token).reason == R.ROLE_MISSING
    assert engine.remembered_hits == 0


async def test_rules_that_depend_on_the_clock_are_never_remembered(
    setup: tuple[Engine, Clock], keys: dict[str, SigningKey]
) -> None:
    engine, clock = setup
    now = int(clock.now)
    token = mint(keys["ES256"], claims(scope="payouts:write", acr="mfa", auth_time=now))
    assert decide(engine, "POST", "/v1/payouts", token).allowed
    clock.now = now + 301  # max_auth_age_s: 300
    d = decide(engine, "POST", "/v1/payouts", token)
    assert (d.allowed, d.reason, d.status) == (False, R.STEP_UP_REQUIRED, 401)
    assert engine.remembered_hits == 0


async def test_remembered_allows_are_bounded_and_hold_no_token_text(
    setup: tuple[Engine, Clock], keys: dict[str, SigningKey]
) -> None:
    engine, _ = setup
    tokens = [mint(keys["ES256"], claims(jti=f"j{i}")) for i in range(6)]
    for t in tokens:
        decide(engine, "GET", "/v1/orders", t)
    memo = engine._remembered
    assert len(memo) == 4
    for digest, method, path in memo:
        assert len(digest) == 32 and (method, path) == ("GET", "/v1/orders")
        assert not any(t.encode() in digest for t in tokens)


async def test_a_traced_decision_takes_the_full_path(setup: tuple[Engine, Clock], keys: dict[str, SigningKey]) -> None:
    engine, _ = setup
    token = mint(keys["ES256"])
    decide(engine, "GET", "/v1/orders", token)
    trace: list[str] = []
    view = RequestView(method="GET", path="/v1/orders", headers={"authorization": f"Bearer {token}"})
    d = engine.decide(view, trace)
    assert d is not None and d.allowed and engine.remembered_hits == 0
    assert any("allow rule satisfied" in line for line in trace)
