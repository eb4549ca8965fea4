"""Proof of possession and signed requests through a real Envoy on a TLS 1.3 listener, with clients nobody here
wrote: DPoP proofs from joserfc, client certificates from trustme, signatures from http-message-signatures."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import http_message_signatures as hms
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc import jws
from joserfc.jwk import ECKey

from agent import reasons as R
from agent.demo.app import demo_app, start_site
from agent.demo.idp import LocalIdP
from agent.envoyconf import EnvoyProcess, ListenerTls, bootstrap
from tests.e2e.conftest import AgentProcess, LoopThread, Response, free_port, idp_yaml
from tests.wait import until

pytestmark = pytest.mark.e2e

POLICY = """version: 1
service: orders
{idp}hmac_clients:
  billing:
    key_file: billing.key
    roles: [billing]
routes:
  - name: list-orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow: {{scopes_all: [orders:read]}}
  - name: create-order
    match: {{methods: [POST], path: /v1/orders}}
    authn: [jwt]
    bind: dpop
    allow: {{}}
  - name: payouts
    match: {{methods: [POST], path: /v1/payouts}}
    authn: [jwt]
    bind: mtls
    allow: {{}}
  - name: billing
    match: {{methods: [POST], path: "/v1/billing/**"}}
    authn: [hmac]
    allow: {{roles_any: [billing]}}
default: deny
"""
HMAC_KEY = b"e2e-billing-key-of-32-bytes-long!"
HOST = "localhost"


@dataclass
class TlsStack:
    idp: LocalIdP
    agent: AgentProcess
    envoy: EnvoyProcess
    port: int
    ca: trustme.CA
    client_cert: trustme.LeafCert

    def call(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b"", cert: trustme.LeafCert | None = None
    ) -> Response:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        conn = http.client.HTTPSConnection(HOST, self.port, context=ctx, timeout=10)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    @property
    def origin(self) -> str:
        return f"https://{HOST}:{self.port}"


@pytest.fixture(scope="module")
def tls_stack(transport: str, loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    work = tmp_path_factory.mktemp("pop")
    ca = trustme.CA()
    server = ca.issue_cert(HOST)
    server.private_key_and_cert_chain_pem.write_to_path(str(work / "server.pem"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    idp = LocalIdP()
    loop_thread.run(idp.start())
    runner, app_port = loop_thread.run(start_site(demo_app()))
    (work / "billing.key").write_text(base64.b64encode(HMAC_KEY).decode() + "\n")
    policy = work / "policy.yaml"
    policy.write_text(POLICY.format(idp=idp_yaml(idp.issuer)))
    listen = f"127.0.0.1:{free_port()}"
    agent = AgentProcess(policy, listen, work, transport)
    port = free_port()
    tls = ListenerTls(str(work / "server.pem"), str(work / "server.pem"), str(work / "ca.pem"))
    envoy = EnvoyProcess(
        bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{app_port}", listen, request_body=True, tls=tls), work
    )
    envoy.start()
    try:
        yield TlsStack(idp, agent, envoy, port, ca, ca.issue_cert("client@example.test"))
    finally:
        envoy.stop()
        agent.stop()
        loop_thread.run(runner.cleanup())
        loop_thread.run(idp.stop())


class DpopClient:
    """A client holding a DPoP key, making proofs with joserfc."""

    def __init__(self) -> None:
        self.key = ECKey.generate_key("P-256", private=True)
        self.jkt = self.key.thumbprint()

    def proof(self, method: str, url: str, token: str, **extra: Any) -> str:
        jwk = self.key.as_dict(private=False)
        claims = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(time.time())}
        claims["ath"] = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()
        claims.update(extra)
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}
        return jws.serialize_compact(header, json.dumps(claims).encode(), self.key, algorithms=["ES256"])


def test_dpop_through_envoy(tls_stack: TlsStack) -> None:
    client = DpopClient()
    token = tls_stack.idp.mint(cnf={"jkt": client.jkt}, roles=["writer"])
    url = tls_stack.origin + "/v1/orders"
    headers = {"authorization": f"DPoP {token}", "dpop": client.proof("POST", url, token)}
    ok = tls_stack.call("POST", "/v1/orders", headers)
    assert ok.status == 200, ok.body
    assert ok.json()["from_agent"]["x-authz-route"] == "create-order"
    replay = tls_stack.call("POST", "/v1/orders", headers)
    assert replay.status == 401 and replay.json()["reason"] == R.DPOP_PROOF_REPLAYED
    assert replay.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    stolen = tls_stack.call("GET", "/v1/orders", {"authorization": f"Bearer {token}"})
    assert stolen.status == 401 and stolen.json()["reason"] == R.DPOP_BOUND_TOKEN_AS_BEARER
    thief = DpopClient()
    forged = {"authorization": f"DPoP {token}", "dpop": thief.proof("GET", url, token)}
    r = tls_stack.call("GET", "/v1/orders", forged)
    assert r.status == 401 and r.json()["reason"] == R.DPOP_KEY_MISMATCH
    # RFC 9449 §4.3 compares htu after RFC 3986 normalisation, dot segments included (§6.2.2.3).
    dotted = {"authorization": f"DPoP {token}", "dpop": client.proof("GET", url.replace("/v1/", "/v1/x/../"), token)}
    r = tls_stack.call("GET", "/v1/orders", dotted)
    assert r.status == 200, r.body
    plain = tls_stack.call("POST", "/v1/orders", {"authorization": f"Bearer {tls_stack.idp.mint(roles=['writer'])}"})
    assert plain.status == 401 and plain.headers["www-authenticate"].startswith('DPoP error="invalid_token"')


def thumbprint(cert: trustme.LeafCert) -> str:
    der = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def test_certificate_bound_token_through_envoy(tls_stack: TlsStack) -> None:
    token = tls_stack.idp.mint(cnf={"x5t#S256": thumbprint(tls_stack.client_cert)})
    bearer = {"authorization": f"Bearer {token}"}
    ok = tls_stack.call("POST", "/v1/payouts", bearer, cert=tls_stack.client_cert)
    assert ok.status == 200, ok.body
    no_cert = tls_stack.call("POST", "/v1/payouts", bearer)
    assert no_cert.status == 401 and no_cert.json()["reason"] == R.CERTIFICATE_MISSING
    other = tls_stack.ca.issue_cert("other@example.test")
    r = tls_stack.call("POST", "/v1/payouts", bearer, cert=other)
    assert r.status == 401 and r.json()["reason"] == R.CERTIFICATE_MISMATCH
    spoof = {**bearer, "x-forwarded-client-cert": f"Hash={thumbprint(tls_stack.client_cert)}"}
    r = tls_stack.call("POST", "/v1/payouts", spoof)
    assert r.status == 401 and r.json()["reason"] == R.CERTIFICATE_MISSING
    # A certificate from a CA Envoy does not trust never reaches the agent: the handshake fails.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_stack.call("POST", "/v1/payouts", bearer, cert=trustme.CA().issue_cert("x@example.test"))


class Signed:
    def __init__(self, method: str, url: str, headers: dict[str, str]) -> None:
        self.method, self.url, self.headers = method, url, headers


def signed_headers(stack: TlsStack, path: str, body: bytes, key: bytes = HMAC_KEY) -> dict[str, str]:
    msg = Signed("POST", stack.origin + path, {"content-type": "application/json", "content-length": str(len(body))})
    hms.HTTPMessageSigner(
        signature_algorithm=hms.algorithms.HMAC_SHA256,
        key_resolver=hms.MappingKeyResolver(public_keys={}, private_keys={"billing": key}),
    ).sign(msg, key_id="billing", nonce=uuid.uuid4().hex, covered_component_ids=("@method", "@authority", "@path"),
           body=body)  # fmt: skip
    return dict(msg.headers)


def test_signed_request_through_envoy(tls_stack: TlsStack) -> None:
    body = b'{"run": "2026-11"}'
    headers = signed_headers(tls_stack, "/v1/billing/runs", body)
    ok = tls_stack.call("POST", "/v1/billing/runs", headers, body)
    assert ok.status == 200, ok.body
    assert ok.json()["from_agent"]["x-authz-subject"] == "billing"
    replay = tls_stack.call("POST", "/v1/billing/runs", headers, body)
    assert replay.status == 401 and replay.json()["reason"] == R.SIGNATURE_REPLAYED
    tampered = signed_headers(tls_stack, "/v1/billing/runs", body)
    r = tls_stack.call("POST", "/v1/billing/runs", tampered, b'{"run": "2026-12"}')
    assert r.status == 401 and r.json()["reason"] == R.CONTENT_DIGEST_MISMATCH
    wrong_key = signed_headers(tls_stack, "/v1/billing/runs", body, key=b"k" * 32)
    r = tls_stack.call("POST", "/v1/billing/runs", wrong_key, body)
    assert r.status == 401 and r.json()["reason"] == R.SIGNATURE_INVALID
    # Far above Envoy's 32 KiB per-connection buffer limit, within what it buffers for the agent: checked whole.
    large = b"y" * (300 << 10)
    r = tls_stack.call("POST", "/v1/billing/runs", signed_headers(tls_stack, "/v1/billing/runs", large), large)
    assert r.status == 200, r.body
    # Larger than Envoy buffers for the agent (1 MiB): sent truncated and marked, so it fails closed.
    big = b"x" * ((1 << 20) + 10)
    r = tls_stack.call("POST", "/v1/billing/runs", signed_headers(tls_stack, "/v1/billing/runs", big), big)
    assert r.status == 401 and r.json()["reason"] == R.BODY_UNAVAILABLE


def test_no_proof_signature_or_key_in_the_logs(tls_stack: TlsStack) -> None:
    records = tls_stack.agent.audit.read_text().count("\n") if tls_stack.agent.audit.exists() else 0
    body = b'{"run": "logs"}'
    headers = signed_headers(tls_stack, "/v1/billing/runs", body)
    assert tls_stack.call("POST", "/v1/billing/runs", headers, body).status == 200
    client = DpopClient()
    token = tls_stack.idp.mint(cnf={"jkt": client.jkt})
    proof = client.proof("GET", tls_stack.origin + "/v1/orders", token)
    assert tls_stack.call("GET", "/v1/orders", {"authorization": f"DPoP {token}", "dpop": proof}).status == 200
    # Both decisions' records written (the writer thread flushes them): the logs then hold all they ever will.
    until(lambda: tls_stack.agent.audit.read_text().count("\n") >= records + 2, "both decisions audited")
    logs = tls_stack.agent.logs()
    signature = headers["Signature"].split("=", 1)[1].strip(":")
    for secret in (*token.split("."), *proof.split("."), signature, base64.b64encode(HMAC_KEY).decode()):
        assert secret not in logs
