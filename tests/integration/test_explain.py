"""Explain against a real control plane's published policy, with a real identity provider's keys over HTTP."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import reasons as R
from agent.controlplane.explainer import PER_MINUTE, Explainer, ExplainRefused, RateLimited
from agent.controlplane.server import Publisher
from agent.demo.idp import LocalIdP

POLICY = """version: 1
service: orders
identity_providers:
  corp:
    issuer: {issuer}
    discovery: true
    audiences: [orders-api]
    algorithms: [ES256]
routes:
  - name: list-orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow:
      - {{scopes_all: [orders:read]}}
      - {{roles_any: [auditor]}}
    deny:
      - {{name: no-interns, when: 'subject == "intern"'}}
default: deny
"""


@pytest.fixture
async def idp() -> AsyncIterator[LocalIdP]:
    i = LocalIdP()
    await i.start()
    yield i
    await i.stop()


@pytest.fixture
async def explainer(idp: LocalIdP, tmp_path: Path) -> AsyncIterator[Explainer]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY.format(issuer=idp.issuer))
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    assert "orders" in pub.published
    e = Explainer(pub)
    yield e
    await e.close()
    await pub.close()


async def test_the_explanation_is_exactly_what_check_prints(
    idp: LocalIdP, explainer: Explainer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = idp.mint(scope="orders:write", roles=["auditor"])
    out = await explainer.explain("orders", "get", "/v1/orders", "x-request-id: 7\n", token)
    assert out.allowed and out.version == explainer.publisher.published["orders"].version
    assert out.summary["reason"] == R.ALLOWED and out.summary["allow_index"] == 1  # the alternative that let it in
    assert any("allow alternative 1" in line and "holds" in line for line in out.lines)
    # The same request through `authz-agent check` against the same policy file prints the same steps.
    policy = tmp_path / "policies" / "orders.yaml"
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "check", "--policy", str(policy), "--path", "/v1/orders",
        "-H", "x-request-id: 7", "-H", f"authorization: Bearer {token}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, stderr.decode()
    printed = [line for line in stdout.decode().splitlines() if line.startswith("- ")]
    assert printed == out.lines
    # The token is nowhere in what is shown or logged.
    assert token not in repr(out) and token not in caplog.text


async def test_a_refusing_deny_rule_is_named(idp: LocalIdP, explainer: Explainer) -> None:
    out = await explainer.explain("orders", "GET", "/v1/orders", token=idp.mint(sub="intern", scope="orders:read"))
    assert not out.allowed and out.summary["deny_rule"] == "no-interns" and out.summary["status"] == 403
    assert any("deny rule 'no-interns'" in line for line in out.lines)
    missing = await explainer.explain("orders", "GET", "/v1/orders")
    assert missing.summary["reason"] == R.TOKEN_MISSING
    assert "authentication failed: token_missing" in " ".join(missing.lines)


async def test_a_key_fetch_failure_is_the_first_line(idp: LocalIdP, explainer: Explainer) -> None:
    token = idp.mint(scope="orders:read")
    await idp.stop()
    out = await explainer.explain("orders", "GET", "/v1/orders", token=f"Bearer {token}")
    assert out.lines[0].startswith("identity provider corp: keys not loaded:")
    assert not out.allowed and token not in repr(out)


async def test_input_is_bounded_and_explanations_are_rate_limited(idp: LocalIdP, explainer: Explainer) -> None:
    with pytest.raises(ExplainRefused, match="header lines"):
        await explainer.explain("orders", "GET", "/v1/orders", "a: b\n" * 100)
    with pytest.raises(ExplainRefused, match="the token may be"):
        await explainer.explain("orders", "GET", "/v1/orders", token="x" * 20_000)
    with pytest.raises(ExplainRefused, match="name: value"):
        await explainer.explain("orders", "GET", "/v1/orders", "no colon here")
    with pytest.raises(ExplainRefused, match="no policy of service 'billing'"):
        await explainer.explain("billing", "GET", "/v1/orders")
    for _ in range(PER_MINUTE):
        explainer.admit("alice")
    with pytest.raises(RateLimited):
        explainer.admit("alice")
    explainer.admit("bob")  # per user


async def test_a_token_the_output_would_echo_is_hidden(idp: LocalIdP, explainer: Explainer) -> None:
    # A malformed token whose text reaches a step's detail is still not shown.
    weird = "not-a-jwt-but-long-enough-to-matter"
    out = await explainer.explain("orders", "GET", "/v1/orders", token=weird)
    assert weird not in repr(out) and not out.allowed


async def test_credential_headers_pasted_with_the_request_are_hidden(idp: LocalIdP, explainer: Explainer) -> None:
    """A proof, a signature or a cookie pasted among the headers is a credential too: never shown. (No step echoes
    these headers today; the explainer cuts their values out of what it shows all the same, as it does the token,
    and this guards both.)"""
    proof = "eyJhbGciOiJFUzI1NiJ9.not-a-real-proof-but-long.sig"  # pragma: allowlist secret
    signature = "sig1=:bm90LWEtcmVhbC1zaWduYXR1cmUtYnV0LWxvbmc=:"  # pragma: allowlist secret
    bearer = "opaque-pasted-bearer-value-0123456789"  # pragma: allowlist secret
    headers = (
        f"dpop: {proof}\nsignature: {signature}\ncookie: session=s3cr3t-cookie-value\nauthorization: Bearer {bearer}"
    )
    out = await explainer.explain("orders", "POST", "/v1/orders", headers_text=headers)
    shown = repr(out)
    for secret in (proof, signature, "session=s3cr3t-cookie-value", bearer):
        assert secret not in shown, secret
