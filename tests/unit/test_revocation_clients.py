"""Client revocation through the engine: a token naming a revoked client (client_id or azp), and an RFC 9421 HMAC
client of a revoked name, are refused with client_revoked; remembered allows end with the list that revokes them."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import reasons as R
from agent.authn.httpsig import HMAC_ISSUER
from agent.authn.revocation import RevocationSet
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.keys import ISSUER, SigningKey, claims, mint
from tests.unit.test_binding import HMAC_KEY, HOST, ROUTES, sign


@pytest.fixture
async def engine(write_policy: Callable[..., Path], tmp_path: Path) -> Engine:
    (tmp_path / "billing.key").write_text(base64.b64encode(HMAC_KEY).decode() + "\n")
    e = Engine.for_policy(load_policy(write_policy(ROUTES)), revocations=RevocationSet())
    for s in e.stores.values():
        assert await s.refresh()
    return e


def decide(engine: Engine, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Decision:
    d = engine.decide(RequestView(method, path, host=HOST, scheme="https", headers=headers, body=body))
    assert isinstance(d, Decision)
    return d


def get(engine: Engine, token: str) -> Decision:
    return decide(engine, "GET", "/v1/orders", {"authorization": f"Bearer {token}"})


def test_a_revoked_client_id_is_refused_even_when_remembered(engine: Engine, keys: dict[str, SigningKey]) -> None:
    token = mint(keys["ES256"], claims(client_id="batch-exporter"))
    assert get(engine, token).allowed and get(engine, token).allowed and engine.remembered_hits == 1
    engine.revocations.replace(1, frozenset(), {}, frozenset({("", "batch-exporter")}))
    d = get(engine, token)
    assert (d.status, d.reason) == (401, R.CLIENT_REVOKED)
    assert dict(d.response_headers)["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert get(engine, mint(keys["ES256"], claims(client_id="web-app"))).allowed  # other clients pass
    # A fresh token of the revoked client is refused as well: revocation is of the client, not of one token.
    assert get(engine, mint(keys["ES256"], claims(client_id="batch-exporter", jti="new"))).reason == R.CLIENT_REVOKED


def test_azp_names_the_client_too(engine: Engine, keys: dict[str, SigningKey]) -> None:
    engine.revocations.replace(1, frozenset(), {}, frozenset({("", "spa")}))
    assert get(engine, mint(keys["ES256"], claims(client_id=None, azp="spa"))).reason == R.CLIENT_REVOKED
    assert get(engine, mint(keys["ES256"], claims(client_id=None, azp="other"))).allowed


def test_an_issuer_scoped_client_revocation_leaves_other_issuers_alone(
    engine: Engine, keys: dict[str, SigningKey]
) -> None:
    token = mint(keys["ES256"], claims(client_id="partner-x"))
    engine.revocations.replace(1, frozenset(), {}, frozenset({("https://other.example", "partner-x")}))
    assert get(engine, token).allowed
    engine.revocations.replace(2, frozenset(), {}, frozenset({(ISSUER, "partner-x")}))
    assert get(engine, token).reason == R.CLIENT_REVOKED


def test_a_revoked_hmac_client_is_refused_with_a_signature_challenge(engine: Engine) -> None:
    body = b'{"run": 1}'
    assert decide(engine, "POST", "/v1/billing/run", sign("POST", "/v1/billing/run", body, "n1"), body).allowed
    engine.revocations.replace(1, frozenset(), {}, frozenset({("", "billing")}))
    d = decide(engine, "POST", "/v1/billing/run", sign("POST", "/v1/billing/run", body, "n2"), body)
    assert (d.status, d.reason) == (401, R.CLIENT_REVOKED)
    assert dict(d.response_headers)["www-authenticate"].startswith('Signature error="invalid_signature"')
    # Revoked for HMAC only (issuer hmac_clients): a token whose client id is "billing" still passes.
    engine.revocations.replace(2, frozenset(), {}, frozenset({(HMAC_ISSUER, "billing")}))
    assert decide(engine, "POST", "/v1/billing/run", sign("POST", "/v1/billing/run", body, "n3"), body).reason == (
        R.CLIENT_REVOKED
    )


def test_the_trace_of_check_says_why(engine: Engine, keys: dict[str, SigningKey]) -> None:
    engine.revocations.replace(1, frozenset(), {}, frozenset({("", "web-app")}))
    view = RequestView("GET", "/v1/orders", host=HOST, headers={"authorization": f"Bearer {mint(keys['ES256'])}"})
    trace: list[str] = []
    d = engine.decide(view, trace)
    assert isinstance(d, Decision) and d.reason == R.CLIENT_REVOKED
    assert "authentication failed: client_revoked" in trace
