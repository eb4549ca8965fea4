"""Shared fixtures: keys made once per session, policies written to real files."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.keys import AUDIENCE, ISSUER, SigningKey, jwks, make_key


@pytest.fixture(scope="session")
def keys() -> dict[str, SigningKey]:
    return {alg: make_key(alg, f"kid-{alg}") for alg in ("ES256", "RS256", "PS256", "EdDSA", "ES384")}


def idp_block(source: str, algorithms: str = "[ES256, RS256, PS256, EdDSA, ES384]", extra: str = "") -> str:
    return textwrap.dedent(f"""\
        identity_providers:
          corp:
            issuer: {ISSUER}
            {source}
            audiences: [{AUDIENCE}, other-api]
            algorithms: {algorithms}
            leeway_s: 30
            max_token_lifetime_s: 3600
            min_refetch_s: 0
        """) + textwrap.indent(textwrap.dedent(extra), "    ")


ROUTES = textwrap.dedent("""\
    routes:
      - name: list-orders
        match: {methods: [GET], path: /v1/orders}
        authn: [jwt]
        allow: {scopes_all: [orders:read]}
      - name: read-order
        match: {methods: [GET], path: "/v1/tenants/{tenant}/orders/{id}"}
        authn: [jwt]
        allow:
          scopes_all: [orders:read]
          claims: {tenant_id: "{tenant}"}
      - name: create-order
        match: {methods: [POST], path: /v1/orders}
        authn: [jwt]
        allow: {roles_any: [writer, admin]}
      - name: export
        match: {methods: [GET], path: /v1/export}
        authn: [jwt]
        forward_token: true
        allow: {}
      - name: payout
        match: {methods: [POST], path: /v1/payouts}
        authn: [jwt]
        allow: {scopes_any: [payouts:write], acr_any: [mfa], max_auth_age_s: 300}
      - name: health
        match: {path: /healthz}
        public: true
    default: deny
    """)


@pytest.fixture
def write_policy(tmp_path: Path, keys: dict[str, SigningKey]) -> Callable[..., Path]:
    """Write a policy whose identity provider reads a JWKS file holding every session key."""

    def write(routes: str = ROUTES, source: str | None = None, extra_idp: str = "") -> Path:
        jwks_path = tmp_path / "jwks.json"
        jwks_path.write_text(json.dumps(jwks(*keys.values())))
        body = "version: 1\nservice: orders\n" + idp_block(source or "jwks_file: jwks.json", extra=extra_idp)
        path = tmp_path / "policy.yaml"
        path.write_text(body + routes)
        return path

    return write


def twins(pure: str, native: str) -> list[str]:
    """The module names a twin-parametrised fixture runs over: the pure twin, and the native one when built."""
    import os

    return [pure] + ([] if os.environ.get("AGENT_NO_EXTENSIONS") else [f"agent.{native}_c"])


def native_module(name: str) -> object | None:
    """The Cython twin of agent.<name>, or None where extensions are off (AGENT_NO_EXTENSIONS=1)."""
    import importlib
    import os

    if os.environ.get("AGENT_NO_EXTENSIONS"):
        return None
    return importlib.import_module(f"agent.{name}_c")
