"""The policy reference lists every reason code and every policy key the loader accepts."""

from __future__ import annotations

from pathlib import Path

from agent import reasons as R
from agent.config import loader

DOC = (Path(__file__).parent.parent.parent / "docs" / "policy.md").read_text()


def test_every_reason_code_is_documented() -> None:
    codes = {v for k, v in vars(R).items() if k.isupper()}
    assert {c for c in codes if f"`{c}`" not in DOC} == set()


def test_every_policy_key_is_documented() -> None:
    keys = loader.TOP_KEYS | loader.IDP_KEYS | loader.ROUTE_KEYS | loader.ALLOW_KEYS | {"path", "methods"}
    keys |= loader.DPOP_KEYS | loader.HMAC_CLIENT_KEYS | loader.RATE_LIMIT_KEYS | loader.SHARED_STATE_KEYS
    keys |= loader.ALERT_KEYS
    assert {k for k in keys if f"`{k}" not in DOC and f"{k}`" not in DOC} == set()
