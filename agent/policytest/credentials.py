"""Throwaway credentials for policy tests: signing keys made in memory, the JWTs, DPoP proofs, client
certificates and RFC 9421 signatures a case describes. Nothing here is ever written to disk or printed.

Signing is done with `cryptography` (OpenSSL) directly; the signature base of a request signature is built by
the verifier's own `signature_base`, so a signed case is judged exactly as a signed request would be.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from agent.authn.dpop import access_token_hash, b64url, jwk_thumbprint
from agent.authn.httpsig import Member, signature_base, signature_params
from agent.authn.jwk import KeySet, parse_jwks

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_EC = {"ES256": (ec.SECP256R1, 32, "P-256"), "ES384": (ec.SECP384R1, 48, "P-384"), "ES512": (ec.SECP521R1, 66, "P-521")}
# Every JWS algorithm a case may name: the asymmetric ones a provider may accept, and the ones no provider
# accepts (a shared secret, or none), so that a test can show they are refused.
SIGNING_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)
REFUSED_ALGORITHMS = frozenset({"HS256", "HS384", "HS512", "none"})
# The order in which a provider's algorithms are tried for a case that names none: the cheapest keys first.
PREFERENCE = ("ES256", "EdDSA", "Ed25519", "RS256", "PS256", "ES384", "RS384", "PS384", "ES512", "RS512", "PS512")


def family(alg: str) -> str:
    """The kind of key an algorithm signs with: one throwaway key per kind serves every algorithm of it."""
    if alg[:2] in ("RS", "PS"):
        return "RSA"
    if alg in ("EdDSA", "Ed25519"):
        return "Ed25519"
    return alg  # ES256, ES384, ES512: one curve each


def _uint(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8 or 1, "big"))


class SigningKey:
    """One throwaway private key and its public JWK."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.kid = f"policy-test-{kind.lower()}"
        self.key: PrivateKey
        if kind == "RSA":
            self.key = rsa.generate_private_key(65537, 2048)
            pub = self.key.public_key().public_numbers()
            self.jwk: dict[str, str] = {"kty": "RSA", "n": _uint(pub.n), "e": _uint(pub.e)}
        elif kind == "Ed25519":
            self.key = ed25519.Ed25519PrivateKey.generate()
            raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            self.jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        else:
            curve, size, name = _EC[kind]
            self.key = ec.generate_private_key(curve())
            nums = self.key.public_key().public_numbers()
            self.jwk = {
                "kty": "EC",
                "crv": name,
                "x": b64url(nums.x.to_bytes(size, "big")),
                "y": b64url(nums.y.to_bytes(size, "big")),
            }
        self.jwk["kid"] = self.kid

    def sign(self, alg: str, data: bytes) -> bytes:
        key = self.key
        if isinstance(key, rsa.RSAPrivateKey):
            h = _HASHES[alg[2:]]()
            pad = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(padding.MGF1(h), h.digest_size)
            return key.sign(data, pad, h)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            size = _EC[alg][1]
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_HASHES[alg[2:]]())))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return key.sign(data)


class Keys:
    """The throwaway keys of one run, made on first use (an RSA key costs tens of milliseconds)."""

    def __init__(self) -> None:
        self._keys: dict[str, SigningKey] = {}
        self._secret = os.urandom(32)  # for HS* tokens, which every provider refuses

    def for_alg(self, alg: str) -> SigningKey:
        return self._of_kind(family(alg))

    def _of_kind(self, kind: str) -> SigningKey:
        key = self._keys.get(kind)
        if key is None:
            key = self._keys[kind] = SigningKey(kind)
        return key

    def jwks(self, algorithms: frozenset[str]) -> dict[str, list[dict[str, str]]]:
        """The public JWKS a provider's stand-in key store holds: one public key per kind its algorithms need
        (public keys only: `authz-agent bench` hands it to the agent it starts)."""
        kinds = sorted({family(a) for a in algorithms if a in SIGNING_ALGORITHMS})
        return {"keys": [dict(self._of_kind(k).jwk) for k in kinds]}

    def key_set(self, algorithms: frozenset[str]) -> KeySet:
        """What a provider's stand-in key store holds, parsed."""
        keys, _ = parse_jwks(self.jwks(algorithms))
        return keys

    def jws(self, header: dict[str, Any], payload: dict[str, Any], alg: str) -> str:
        """A compact JWS; HS* is signed with a throwaway secret and `none` left unsigned (both always refused)."""
        header = {**header, "alg": alg}
        if alg in SIGNING_ALGORITHMS:
            header.setdefault("kid", self.for_alg(alg).kid)
        signing_input = f"{_part(header)}.{_part(payload)}".encode("ascii")
        if alg == "none":
            signature = b""
        elif alg.startswith("HS"):
            signature = hmac.digest(self._secret, signing_input, "sha" + alg[2:])
        else:
            signature = self.for_alg(alg).sign(alg, signing_input)
        return signing_input.decode("ascii") + "." + b64url(signature)


def _part(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


class DpopClient:
    """A client's DPoP key (ES256, or the first algorithm the policy takes): binds tokens, makes proofs."""

    def __init__(self, keys: Keys, algorithms: frozenset[str]) -> None:
        self.alg = next((a for a in PREFERENCE if a in algorithms), "ES256")
        self._keys = keys
        key = keys.for_alg(self.alg)
        self.jwk = {k: v for k, v in key.jwk.items() if k != "kid"}
        self.jkt = jwk_thumbprint(self.jwk)

    def proof(self, method: str, htu: str, token: str, now: float, nonce: str | None) -> str:
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": htu,
            "iat": int(now),
            "ath": access_token_hash(token),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        header = {"typ": "dpop+jwt", "jwk": self.jwk}
        signing_input = f"{_part({**header, 'alg': self.alg})}.{_part(claims)}".encode("ascii")
        signature = self._keys.for_alg(self.alg).sign(self.alg, signing_input)
        return signing_input.decode("ascii") + "." + b64url(signature)


class ClientCertificate:
    """A throwaway self-signed client certificate, as Envoy passes a verified one (URL-encoded PEM)."""

    def __init__(self, now: float) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "policy-test-client")])
        start = dt.datetime.fromtimestamp(now, dt.UTC) - dt.timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        der = cert.public_bytes(Encoding.DER)
        self.x5t = b64url(hashlib.sha256(der).digest())  # RFC 8705 cnf.x5t#S256
        self.url_encoded_pem = quote(cert.public_bytes(Encoding.PEM).decode("ascii"), safe="")


def content_digest(body: bytes) -> str:
    """RFC 9530 Content-Digest with sha-256."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + ":"


def sign_request(
    key: bytes,
    keyid: str,
    components: tuple[str, ...],
    method: str,
    scheme: str,
    authority: str,
    target: str,
    headers: dict[str, str],
    created: int,
) -> dict[str, str]:
    """The Signature-Input and Signature headers of an RFC 9421 hmac-sha256 signature over `components`.

    `headers` must already hold every covered field (Content-Digest included when it is covered)."""
    params: dict[str, Any] = {"created": created, "nonce": secrets.token_urlsafe(12), "keyid": keyid}
    params["alg"] = "hmac-sha256"
    covered: Member = ([(name, {}) for name in components], params)
    base = signature_base(covered, method, scheme, authority, target, headers)
    signature = base64.b64encode(hmac.digest(key, base, "sha256")).decode("ascii")
    return {"signature-input": f"sig1={signature_params(covered)}", "signature": f"sig1=:{signature}:"}
