"""Test keys and tokens made independently of the agent: `cryptography` keys, joserfc for JOSE."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as S
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

ISSUER = "https://idp.example.test"
AUDIENCE = "orders-api"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any
    jose: Any  # the joserfc key

    @property
    def public_jwk(self) -> dict[str, Any]:
        return dict(self.jose.as_dict(private=False))

    def sign(self, signing_input: bytes) -> bytes:
        """A raw JWS signature, made with `cryptography` alone."""
        h = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}.get(self.alg[2:])
        if self.alg.startswith("RS"):
            return self.private.sign(signing_input, padding.PKCS1v15(), h)
        if self.alg.startswith("PS"):
            assert h is not None
            return self.private.sign(signing_input, padding.PSS(padding.MGF1(h), h.digest_size), h)
        if self.alg.startswith("ES"):
            r, s = decode_dss_signature(self.private.sign(signing_input, ec.ECDSA(h)))
            n = (self.private.curve.key_size + 7) // 8
            return r.to_bytes(n, "big") + s.to_bytes(n, "big")
        return self.private.sign(signing_input)


def make_key(alg: str, kid: str) -> SigningKey:
    if alg.startswith("ES"):
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        private: Any = ec.generate_private_key(curve)
        cls: Any = ECKey
    elif alg.startswith(("RS", "PS")):
        private = rsa.generate_private_key(65537, 2048)
        cls = RSAKey
    else:
        private = ed25519.Ed25519PrivateKey.generate()
        cls = OKPKey
    pem = private.private_bytes(S.Encoding.PEM, S.PrivateFormat.PKCS8, S.NoEncryption())
    return SigningKey(kid, alg, private, cls.import_key(pem, {"kid": kid}))


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": "j-1",
        "client_id": "web-app",
        "scope": "orders:read",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: SigningKey, body: dict[str, Any] | None = None, **header: Any) -> str:
    """A well-formed token signed by joserfc."""
    hdr: dict[str, Any] = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
    hdr.update(header)
    hdr = {k: v for k, v in hdr.items() if v is not None}
    return jwt.encode(hdr, body if body is not None else claims(), key.jose, algorithms=[hdr["alg"]])


def craft(key: SigningKey, header: str | dict[str, Any], payload: str | dict[str, Any]) -> str:
    """A token from raw JSON text (duplicate members, NaN...), correctly signed so only the JSON is at fault."""
    h = header if isinstance(header, str) else json.dumps(header)
    p = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{b64(h.encode())}.{b64(p.encode())}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.public_jwk for k in keys]}


def dpop_proof(
    key: SigningKey,
    method: str,
    url: str,
    token: str | None,
    header: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A DPoP proof (RFC 9449 §4.2) made by joserfc, as a client would make it; overrides drop on None."""
    import hashlib
    import uuid

    from joserfc import jws

    hdr: dict[str, Any] = {"typ": "dpop+jwt", "alg": key.alg, "jwk": key.public_jwk}
    hdr["jwk"].pop("kid", None)
    hdr.update(header or {})
    body: dict[str, Any] = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(time.time())}
    if token is not None:
        body["ath"] = b64(hashlib.sha256(token.encode()).digest())
    body.update(claims)
    hdr = {k: v for k, v in hdr.items() if v is not None}
    body = {k: v for k, v in body.items() if v is not None}
    return jws.serialize_compact(hdr, json.dumps(body).encode(), key.jose, algorithms=[key.alg])


def jkt(key: SigningKey) -> str:
    """The RFC 7638 thumbprint of a key, by joserfc."""
    return str(key.jose.thumbprint())


# RFC 8017 §9.2 note 1: the DER DigestInfo prefix of a SHA-256 digest.
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def rsa_with_exponent(e: int, bits: int = 3072) -> tuple[dict[str, str], Callable[[bytes], bytes]]:
    """A public JWK whose exponent is `e` (or the next odd number coprime to phi) and an RS256 signer for it.

    `cryptography` only generates keys with e = 3 or 65537, so the private exponent is derived here and the
    signature made by RFC 8017 §8.2.1 (EMSA-PKCS1-v1_5) by hand: it verifies with any correct RSA code.
    """
    private = rsa.generate_private_key(65537, bits).private_numbers()
    p, q = private.p, private.q
    phi, n = (p - 1) * (q - 1), p * q
    e |= 1
    while math.gcd(e, phi) != 1:
        e += 2
    d = pow(e, -1, phi)
    k = (n.bit_length() + 7) // 8

    def sign(signing_input: bytes) -> bytes:
        t = _SHA256_DIGEST_INFO + hashlib.sha256(signing_input).digest()
        em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
        return pow(int.from_bytes(em, "big"), d, n).to_bytes(k, "big")

    jwk = {"kty": "RSA", "n": b64(n.to_bytes(k, "big")), "e": b64(e.to_bytes((e.bit_length() + 7) // 8, "big"))}
    return jwk, sign
