"""Sender-constrained tokens and signed requests through the engine: what Envoy and the caller see."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent import reasons as R
from agent.audit.records import decision_record
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.keys import SigningKey, b64, claims, dpop_proof, jkt, make_key, mint, rsa_with_exponent

ROUTES = textwrap.dedent("""\
    hmac_clients:
      billing:
        key_file: billing.key
        roles: [billing]
    routes:
      - name: list-orders
        match: {methods: [GET], path: /v1/orders}
        authn: [jwt]
        allow: {scopes_all: [orders:read]}
      - name: create-order
        match: {methods: [POST], path: /v1/orders}
        authn: [jwt]
        bind: dpop
        allow: {}
      - name: payouts
        match: {methods: [POST], path: /v1/payouts}
        authn: [jwt]
        bind: mtls
        allow: {}
      - name: billing
        match: {methods: [POST], path: "/v1/billing/**"}
        authn: [hmac]
        allow: {roles_any: [billing]}
    default: deny
    """)
HOST = "api.example.test"
HMAC_KEY = b"q" * 32


@pytest.fixture
async def engine(write_policy: Callable[..., Path], tmp_path: Path) -> Engine:
    (tmp_path / "billing.key").write_text(base64.b64encode(HMAC_KEY).decode() + "\n")
    e = Engine.for_policy(load_policy(write_policy(ROUTES)))
    for s in e.stores.values():
        assert await s.refresh()
    return e


@pytest.fixture(scope="module")
def client_key() -> SigningKey:
    return make_key("ES256", "client")


def decide(engine: Engine, method: str, path: str, headers: dict[str, str], **kw: str | bytes) -> Decision:
    view = RequestView(method=method, path=path, host=HOST, scheme="https", headers=headers, **kw)  # type: ignore[arg-type]
    d = engine.decide(view)
    assert d is not None
    return d


def dpop_request(
    key: SigningKey, token: str, method: str = "GET", path: str = "/v1/orders", **claims_: object
) -> dict[str, str]:
    return {
        "authorization": f"DPoP {token}",
        "dpop": dpop_proof(key, method, f"https://{HOST}{path}", token, **claims_),
    }


def test_a_dpop_bound_token_passes_with_a_fresh_proof_on_every_route(
    engine: Engine, keys: dict[str, SigningKey], client_key: SigningKey
) -> None:
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    assert decide(engine, "GET", "/v1/orders", dpop_request(client_key, token)).allowed
    again = dpop_request(client_key, token)
    assert decide(engine, "GET", "/v1/orders", again).allowed
    replay = decide(engine, "GET", "/v1/orders", again)
    assert (replay.status, replay.reason) == (401, R.DPOP_PROOF_REPLAYED)
    assert dict(replay.response_headers)["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    assert decide(engine, "POST", "/v1/orders", dpop_request(client_key, token, "POST")).allowed
    assert engine.remembered_hits == 0  # a bound token is never decided from memory


def test_a_stolen_dpop_bound_token_is_useless(
    engine: Engine, keys: dict[str, SigningKey], client_key: SigningKey
) -> None:
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    thief = make_key("ES256", "thief")
    as_bearer = decide(engine, "GET", "/v1/orders", {"authorization": f"Bearer {token}"})
    assert (as_bearer.status, as_bearer.reason) == (401, R.DPOP_BOUND_TOKEN_AS_BEARER)
    no_proof = decide(engine, "GET", "/v1/orders", {"authorization": f"DPoP {token}"})
    assert no_proof.reason == R.DPOP_PROOF_MISSING
    own_proof = decide(engine, "GET", "/v1/orders", dpop_request(thief, token))
    assert own_proof.reason == R.DPOP_KEY_MISMATCH
    other_route = dpop_request(client_key, token, path="/v1/elsewhere")
    assert decide(engine, "GET", "/v1/orders", other_route).reason == R.DPOP_PROOF_INVALID


def test_bind_dpop_refuses_bearer_tokens_with_a_dpop_challenge(engine: Engine, keys: dict[str, SigningKey]) -> None:
    d = decide(engine, "POST", "/v1/orders", {"authorization": f"Bearer {mint(keys['ES256'])}"})
    assert (d.status, d.reason) == (401, R.TOKEN_NOT_BOUND)
    challenge = dict(d.response_headers)["www-authenticate"]
    assert challenge.startswith('DPoP error="invalid_token"') and 'algs="' in challenge and "ES256" in challenge
    anonymous = decide(engine, "POST", "/v1/orders", {})
    assert dict(anonymous.response_headers)["www-authenticate"].startswith("DPoP algs=")
    unbound = decide(engine, "GET", "/v1/orders", {"authorization": f"DPoP {mint(keys['ES256'])}"})
    assert unbound.reason == R.TOKEN_NOT_BOUND


async def test_dpop_nonces_through_the_engine(
    write_policy: Callable[..., Path], tmp_path: Path, keys: dict[str, SigningKey], client_key: SigningKey
) -> None:
    (tmp_path / "billing.key").write_text(base64.b64encode(HMAC_KEY).decode())
    engine = Engine.for_policy(load_policy(write_policy("dpop: {use_dpop_nonce: true}\n" + ROUTES)))
    for s in engine.stores.values():
        assert await s.refresh()
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    first = decide(engine, "GET", "/v1/orders", dpop_request(client_key, token))
    headers = dict(first.response_headers)
    assert (first.status, first.reason) == (401, R.DPOP_NONCE_REQUIRED)
    assert headers["www-authenticate"].startswith('DPoP error="use_dpop_nonce"')
    retry = dpop_request(client_key, token, nonce=headers["dpop-nonce"])
    assert decide(engine, "GET", "/v1/orders", retry).allowed


async def small_cache_engine(write_policy: Callable[..., Path], tmp_path: Path) -> Engine:
    """An engine whose replay cache has the documented minimum size (1024 entries)."""
    (tmp_path / "billing.key").write_text(base64.b64encode(HMAC_KEY).decode())
    engine = Engine.for_policy(load_policy(write_policy("dpop: {replay_cache_entries: 1024}\n" + ROUTES)))
    for s in engine.stores.values():
        assert await s.refresh()
    return engine


async def test_proofs_by_another_key_never_reach_the_replay_cache(
    write_policy: Callable[..., Path], tmp_path: Path, keys: dict[str, SigningKey], client_key: SigningKey
) -> None:
    # Issue 11 item 4: anyone holding any bound token could fill the cache with their own key's proofs.
    engine = await small_cache_engine(write_policy, tmp_path)
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    thief = make_key("ES256", "thief")
    for _ in range(1100):
        d = decide(engine, "GET", "/v1/orders", dpop_request(thief, token))
        assert (d.status, d.reason) == (401, R.DPOP_KEY_MISMATCH)
    assert len(engine.replay) == 0  # no jti of a proof by the wrong key was remembered
    assert decide(engine, "GET", "/v1/orders", dpop_request(client_key, token)).allowed


async def test_a_proof_by_another_key_is_refused_before_its_signature_is_checked(
    write_policy: Callable[..., Path], tmp_path: Path, keys: dict[str, SigningKey], client_key: SigningKey
) -> None:
    engine = await small_cache_engine(write_policy, tmp_path)
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    thief = dpop_request(make_key("ES256", "thief"), token)
    head, body, _ = thief["dpop"].split(".")
    garbage = {**thief, "dpop": f"{head}.{body}.{b64(bytes(64))}"}
    assert decide(engine, "GET", "/v1/orders", garbage).reason == R.DPOP_KEY_MISMATCH
    # The costly key (issue 11 item 5) is never even built when it is not the bound one.
    hostile, sign = rsa_with_exponent((1 << 3059) | 1)
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": hostile}
    proof = {"jti": "h1", "htm": "GET", "htu": f"https://{HOST}/v1/orders", "iat": int(time.time()),
             "ath": b64(hashlib.sha256(token.encode()).digest())}  # fmt: skip
    si = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(proof).encode())}"
    d = decide(
        engine, "GET", "/v1/orders", {"authorization": f"DPoP {token}", "dpop": f"{si}.{b64(sign(si.encode()))}"}
    )
    assert d.reason == R.DPOP_KEY_MISMATCH


async def test_a_proof_key_with_a_huge_rsa_exponent_is_refused_even_when_the_token_is_bound_to_it(
    write_policy: Callable[..., Path], tmp_path: Path, keys: dict[str, SigningKey]
) -> None:
    engine = await small_cache_engine(write_policy, tmp_path)
    hostile, sign = rsa_with_exponent((1 << 3059) | 1)
    thumbprint = b64(hashlib.sha256(json.dumps({k: hostile[k] for k in ("e", "kty", "n")},
                                               separators=(",", ":")).encode()).digest())  # fmt: skip
    token = mint(keys["ES256"], claims(cnf={"jkt": thumbprint}))
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": hostile}
    proof = {"jti": "h2", "htm": "GET", "htu": f"https://{HOST}/v1/orders", "iat": int(time.time()),
             "ath": b64(hashlib.sha256(token.encode()).digest())}  # fmt: skip
    si = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(proof).encode())}"
    request = {"authorization": f"DPoP {token}", "dpop": f"{si}.{b64(sign(si.encode()))}"}
    trace: list[str] = []
    d = engine.decide(RequestView("GET", "/v1/orders", HOST, request, scheme="https"), trace)
    assert isinstance(d, Decision)
    assert (d.status, d.reason) == (401, R.DPOP_PROOF_INVALID)
    assert any("exponent" in line for line in trace), trace
    assert len(engine.replay) == 0


async def check(engine: Engine, method: str, path: str, headers: dict[str, str]) -> Decision:
    return await engine.check(RequestView(method=method, path=path, host=HOST, scheme="https", headers=headers))


async def test_one_principal_cannot_fill_the_replay_cache_even_with_many_keys(
    write_policy: Callable[..., Path],
    tmp_path: Path,
    keys: dict[str, SigningKey],
    client_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client makes DPoP keys freely, and an issuer binds a token to whichever key the client proves: the
    # share of the cache belongs to the principal (issuer + subject), not to a key. The proof is checked
    # before the rules and the rate limit, so nothing else bounds it.
    caplog.set_level(logging.DEBUG)
    engine = await small_cache_engine(write_policy, tmp_path)
    accepted = 0
    refused: list[tuple[str, Decision]] = []
    for i in range(16):  # 16 self-made keys, each with a token bound to it, all for one subject
        key = make_key("ES256", f"mallory-{i}")
        token = mint(keys["ES256"], claims(sub="mallory", client_id=f"app-{i}", cnf={"jkt": jkt(key)}))
        for _ in range(128):
            d = await check(engine, "GET", "/v1/orders", dpop_request(key, token))
            if not d.allowed:
                refused.append((token, d))
                break
            accepted += 1
    # Not refused while the cache is under half full (a legitimate high-rate principal), then held to that.
    assert accepted == 1024 // 2
    assert all((d.status, d.reason) == (503, R.REPLAY_CACHE_FULL) for _, d in refused)
    assert engine.replay.refused_full == len(refused) == 12  # the keys tried after the share was spent
    for token, d in refused:  # the refusal names no token material
        seen = json.dumps(decision_record(RequestView("GET", "/v1/orders"), d, engine.policy, 0.0))
        seen += d.body.decode() + repr(d.response_headers) + caplog.text
        assert token not in seen and token.split(".")[2][-40:] not in seen
    for sub in ("bob", "carol"):  # every other principal still gets its own share
        other = make_key("ES256", f"{sub}-key")
        other_token = mint(keys["ES256"], claims(sub=sub, cnf={"jkt": jkt(other)}))
        for _ in range(64):
            assert (await check(engine, "GET", "/v1/orders", dpop_request(other, other_token))).allowed


async def test_one_bound_key_cannot_fill_the_replay_cache(
    write_policy: Callable[..., Path], tmp_path: Path, keys: dict[str, SigningKey], client_key: SigningKey
) -> None:
    # A holder of a legitimately bound token adds its own jtis (even on 403s and 429s: the proof is checked
    # first). Once the cache is half full, one principal keeps at most a sixteenth of it.
    engine = await small_cache_engine(write_policy, tmp_path)
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    accepted = 0
    for _ in range(1100):
        d = decide(engine, "GET", "/v1/orders", dpop_request(client_key, token))
        if not d.allowed:
            assert (d.status, d.reason) == (503, R.REPLAY_CACHE_FULL)
            break
        accepted += 1
    assert 64 <= accepted <= 1024 // 2
    other = make_key("ES256", "other-client")
    other_token = mint(keys["ES256"], claims(sub="bob", cnf={"jkt": jkt(other)}))
    for _ in range(64):
        assert decide(engine, "GET", "/v1/orders", dpop_request(other, other_token)).allowed


def pyjwt_proof(key: SigningKey, method: str, url: str, token: str) -> str:
    """A DPoP proof made by PyJWT (not the joserfc of tests.keys, not the agent's code)."""
    import uuid

    import jwt as pyjwt
    from jwt.algorithms import ECAlgorithm

    jwk = ECAlgorithm.to_jwk(key.private.public_key(), as_dict=True)
    body = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(time.time()),
            "ath": b64(hashlib.sha256(token.encode("ascii")).digest())}  # fmt: skip
    return pyjwt.encode(body, key.private, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": jwk})


@pytest.mark.parametrize(
    "htu",
    [
        f"https://{HOST}/v1/x/../orders",
        f"https://{HOST}/v1/./orders",
        f"https://{HOST}/../v1/orders",
        f"https://{HOST}/v1/a/b/../../orders",
        f"https://{HOST}/v1/%2E%2E/v1/orders",  # %2E is '.', an unreserved character (RFC 3986 §2.3)
        f"HTTPS://{HOST.upper()}:443/v1/./x/%2e%2E/orders",
        f"https://{HOST}/v1/orders/../orders",  # RFC 3986 §5.2.4: the last segment goes, then '..' climbs
    ],
)
def test_a_proof_whose_htu_has_dot_segments_passes_after_rfc3986_normalisation(
    engine: Engine, keys: dict[str, SigningKey], client_key: SigningKey, htu: str
) -> None:
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    request = {"authorization": f"DPoP {token}", "dpop": pyjwt_proof(client_key, "GET", htu, token)}
    assert decide(engine, "GET", "/v1/orders", request).allowed


@pytest.mark.parametrize(
    "htu",
    [
        f"https://{HOST}/v1/orders/x/..",  # is /v1/orders/, another resource
        f"https://{HOST}/v1/orders/.",
        f"https://{HOST}/v1/..orders",  # not a dot segment
        f"https://{HOST}/v1/.../orders",
        f"https://{HOST}/v1/%2E%2E%2Forders",  # an encoded '/' is not a separator
        f"https://{HOST}/v1/or\tders",  # not a URI; a lenient parser would drop the tab
        f"https://{HOST}/v1/or\nders",
        f"https://{HOST}/v1/orders\n",
        f"https://{HOST}\\@evil.test/v1/orders",
    ],
)
def test_normalisation_never_makes_another_uri_equal(
    engine: Engine, keys: dict[str, SigningKey], client_key: SigningKey, htu: str
) -> None:
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    request = {"authorization": f"DPoP {token}", "dpop": pyjwt_proof(client_key, "GET", htu, token)}
    assert decide(engine, "GET", "/v1/orders", request).reason == R.DPOP_PROOF_INVALID, htu


def cert_pem(cert: trustme.LeafCert) -> str:
    return cert.cert_chain_pems[0].bytes().decode()


def x5t(cert: trustme.LeafCert) -> str:
    der = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    return b64(hashlib.sha256(der).digest())


def test_certificate_bound_tokens(engine: Engine, keys: dict[str, SigningKey]) -> None:
    ca = trustme.CA()
    mine, other = ca.issue_cert("client@example.test"), ca.issue_cert("other@example.test")
    token = mint(keys["ES256"], claims(cnf={"x5t#S256": x5t(mine)}))
    bearer = {"authorization": f"Bearer {token}"}
    assert decide(engine, "POST", "/v1/payouts", bearer, certificate=quote(cert_pem(mine))).allowed
    assert decide(engine, "GET", "/v1/orders", bearer, certificate=quote(cert_pem(mine))).allowed
    assert decide(engine, "GET", "/v1/orders", bearer).reason == R.CERTIFICATE_MISSING
    assert decide(engine, "GET", "/v1/orders", bearer, certificate=quote(cert_pem(other))).reason == (
        R.CERTIFICATE_MISMATCH
    )
    # What a client writes in a header is never evidence: only Envoy's source.certificate is.
    xfcc = {**bearer, "x-forwarded-client-cert": f"Hash={x5t(mine)};Cert={quote(cert_pem(mine))}"}
    assert decide(engine, "GET", "/v1/orders", xfcc).reason == R.CERTIFICATE_MISSING
    unbound = decide(engine, "POST", "/v1/payouts", {"authorization": f"Bearer {mint(keys['ES256'])}"},
                     certificate=quote(cert_pem(mine)))  # fmt: skip
    assert unbound.reason == R.TOKEN_NOT_BOUND
    garbage = decide(engine, "GET", "/v1/orders", bearer, certificate="-----BEGIN CERTIFICATE-----%0Anope")
    assert garbage.reason == R.CERTIFICATE_MISSING


def test_unsupported_confirmation_methods_fail_closed(engine: Engine, keys: dict[str, SigningKey]) -> None:
    for cnf in ({"jwk": {"kty": "EC"}}, {}, "x", {"jkt": 5}):
        d = decide(engine, "GET", "/v1/orders", {"authorization": f"Bearer {mint(keys['ES256'], claims(cnf=cnf))}"})
        assert d.reason == R.TOKEN_CLAIM_INVALID, cnf


def sign(method: str, path: str, body: bytes, nonce: str, key: bytes = HMAC_KEY) -> dict[str, str]:
    import http_message_signatures as hms

    class Msg:
        def __init__(self) -> None:
            self.method, self.url = method, f"https://{HOST}{path}"
            self.headers = {"host": HOST, "content-length": str(len(body))}

    msg = Msg()
    hms.HTTPMessageSigner(
        signature_algorithm=hms.algorithms.HMAC_SHA256,
        key_resolver=hms.MappingKeyResolver(public_keys={}, private_keys={"billing": key}),
    ).sign(msg, key_id="billing", nonce=nonce, covered_component_ids=("@method", "@authority", "@path"), body=body)
    return {k.lower(): v for k, v in msg.headers.items()}


def test_signed_requests(engine: Engine) -> None:
    body = b'{"run": 1}'
    headers = sign("POST", "/v1/billing/run", body, "n1")
    d = decide(engine, "POST", "/v1/billing/run", headers, body=body)
    assert (d.allowed, d.principal and d.principal.subject) == (True, "billing")
    assert dict(d.upstream_headers)["x-authz-client-id"] == "billing"
    replay = decide(engine, "POST", "/v1/billing/run", headers, body=body)
    assert (replay.status, replay.reason) == (401, R.SIGNATURE_REPLAYED)
    assert dict(replay.response_headers)["www-authenticate"].startswith('Signature error="invalid_signature"')
    unsigned = decide(engine, "POST", "/v1/billing/run", {"authorization": "Bearer x"})
    assert (unsigned.reason, dict(unsigned.response_headers)["www-authenticate"]) == (R.SIGNATURE_MISSING, "Signature")
    forged = decide(
        engine, "POST", "/v1/billing/run", sign("POST", "/v1/billing/run", body, "n2", b"z" * 32), body=body
    )
    assert forged.reason == R.SIGNATURE_INVALID


def test_no_credential_text_reaches_logs_audit_or_responses(
    engine: Engine, keys: dict[str, SigningKey], client_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client_key)}))
    body = b'{"run": 2}'
    requests = [
        ("GET", "/v1/orders", dpop_request(client_key, token), b""),
        ("GET", "/v1/orders", {"authorization": f"Bearer {token}"}, b""),
        ("GET", "/v1/orders", dpop_request(make_key("ES256", "x"), token), b""),
        ("POST", "/v1/billing/run", sign("POST", "/v1/billing/run", body, "n3"), body),
        ("POST", "/v1/billing/run", sign("POST", "/v1/billing/run", body, "n4", b"z" * 32), body),
    ]
    secrets = [token, base64.b64encode(HMAC_KEY).decode(), HMAC_KEY.decode()]
    for method, path, headers, b in requests:
        d = decide(engine, method, path, headers, body=b)
        secrets += [v for k, v in headers.items() if k in ("dpop", "signature")]
        seen = json.dumps(decision_record(RequestView(method, path, headers=headers), d, engine.policy, 0.0))
        seen += repr(d.response_headers) + repr(d.upstream_headers) + d.body.decode() + repr(d.principal)
        seen += caplog.text
        for s in secrets:
            assert s not in seen
            assert s.split(",")[0][-40:] not in seen  # nor a tell-tale part of one
