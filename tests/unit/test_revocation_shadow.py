"""Revocations (by jti, by subject before a time) and rules in shadow mode, through the engine."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import reasons as R
from agent.audit.records import decision_record
from agent.authn.revocation import RevocationSet
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.keys import ISSUER, SigningKey, claims, mint

ROUTES = textwrap.dedent("""\
    routes:
      - name: list-orders
        match: {methods: [GET], path: /v1/orders}
        authn: [jwt]
        allow: {scopes_all: [orders:read]}
      - name: new-rule
        match: {methods: [GET], path: /v1/reports}
        authn: [jwt]
        mode: shadow
        allow: {roles_any: [auditor]}
    default: deny
    """)


@pytest.fixture
async def engine(write_policy: Callable[..., Path]) -> Engine:
    e = Engine.for_policy(load_policy(write_policy(ROUTES)), revocations=RevocationSet())
    for s in e.stores.values():
        assert await s.refresh()
    return e


def get(engine: Engine, path: str, token: str) -> Decision:
    d = engine.decide(RequestView("GET", path, headers={"authorization": f"Bearer {token}"}))
    assert isinstance(d, Decision)
    return d


def test_a_revoked_jti_is_refused_even_when_remembered(engine: Engine, keys: dict[str, SigningKey]) -> None:
    token = mint(keys["ES256"], claims(jti="stolen-1"))
    assert get(engine, "/v1/orders", token).allowed
    assert get(engine, "/v1/orders", token).allowed and engine.remembered_hits == 1
    engine.revocations.replace(1, frozenset({"stolen-1"}), {})
    d = get(engine, "/v1/orders", token)
    assert (d.status, d.reason) == (401, R.TOKEN_REVOKED)
    assert 'error="invalid_token"' in dict(d.response_headers)["www-authenticate"]
    assert get(engine, "/v1/orders", mint(keys["ES256"], claims(jti="other"))).allowed


def test_a_subject_revoked_before_a_time(engine: Engine, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    old = mint(keys["ES256"], claims(sub="mallory", iat=now - 100, jti="a"))
    new = mint(keys["ES256"], claims(sub="mallory", iat=now, jti="b"))
    engine.revocations.replace(2, frozenset(), {(ISSUER, "mallory"): now - 10})
    assert get(engine, "/v1/orders", old).reason == R.TOKEN_REVOKED
    assert get(engine, "/v1/orders", new).allowed  # issued after the revocation: a fresh login
    assert get(engine, "/v1/orders", mint(keys["ES256"], claims(sub="alice", iat=now - 100))).allowed


def test_a_shadow_rule_is_audited_as_would_deny_and_never_enforced(engine: Engine, keys: dict[str, SigningKey]) -> None:
    token = mint(keys["ES256"])
    d = get(engine, "/v1/reports", token)
    assert d.allowed and d.shadow == R.ROLE_MISSING
    record = decision_record(RequestView("GET", "/v1/reports"), d, engine.policy, time.time())
    assert record["decision"] == "allow" and record["shadow"] == {"decision": "deny", "reason": R.ROLE_MISSING}
    auditor = get(engine, "/v1/reports", mint(keys["ES256"], claims(roles=["auditor"])))
    assert auditor.allowed and auditor.shadow is None
    assert "shadow" not in decision_record(RequestView("GET", "/v1/reports"), auditor, engine.policy, 0.0)
    # Authentication is never shadowed: a bad token is still refused.
    assert get(engine, "/v1/reports", token + "x").status == 401
