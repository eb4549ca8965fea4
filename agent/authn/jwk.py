"""Public JWKs into preloaded `cryptography` keys, and JWS signature checks that match key to algorithm."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.authn.strict import b64url_decode

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

MIN_RSA_BITS = 2048
# Larger moduli cost more per verification than they buy; no identity provider or DPoP client needs them.
MAX_RSA_BITS = 4096
# The public exponent: odd, at least 65537 (NIST SP 800-56B / FIPS 186-5 ask for more than 2^16) and below
# 2^32, so that a verification costs at most 32 squarings: a key with a 3,000-bit exponent would make each
# (refused) signature check cost milliseconds.
MIN_RSA_EXPONENT = 65537
MAX_RSA_EXPONENT = 2**32 - 1
MAX_KEYS = 64
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_CURVES: dict[str, tuple[type[ec.EllipticCurve], int, str]] = {
    "P-256": (ec.SECP256R1, 32, "ES256"),
    "P-384": (ec.SECP384R1, 48, "ES384"),
    "P-521": (ec.SECP521R1, 66, "ES512"),
}
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


@dataclass(frozen=True, slots=True)
class Jwk:
    """One verification key; `algs` are the JWS algorithms this key may verify and nothing else."""

    kid: str | None
    key: PublicKey
    algs: frozenset[str]
    coord_bytes: int = 0  # ECDSA: the size of r and of s in a JWS signature
    # Per alg, what key.verify takes after the signature and data (padding and hash, or ECDSA(hash)): made once
    # per key rather than once per token, where building them cost ~1 us of a ~20 us RSA verification.
    verify_args: dict[str, tuple[Any, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verify_args", {alg: _verify_args(self.key, alg) for alg in self.algs})


def parse_jwk(d: dict[str, Any]) -> Jwk:
    """Build a key from one JWKS member; raises ValueError for anything not a usable public signing key."""
    if PRIVATE_MEMBERS & d.keys():
        raise ValueError("private key material in a JWKS")
    kid = d.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    use = d.get("use")
    if use is not None and use != "sig":
        raise ValueError("not a signing key")
    ops = d.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops does not allow verify")
    alg = d.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise ValueError("alg is not a string")
    kty = d.get("kty")
    key: PublicKey
    coord = 0
    if kty == "RSA":
        n = _uint(d, "n")
        e = _uint(d, "e")
        if n.bit_length() < MIN_RSA_BITS:
            raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
        if n.bit_length() > MAX_RSA_BITS:
            raise ValueError(f"RSA key longer than {MAX_RSA_BITS} bits")
        if not MIN_RSA_EXPONENT <= e <= MAX_RSA_EXPONENT or e % 2 == 0:
            raise ValueError("RSA exponent not odd in 65537..2^32-1")
        key = rsa.RSAPublicNumbers(e, n).public_key()
        algs = _RSA_ALGS
    elif kty == "EC":
        crv = d.get("crv")
        if not isinstance(crv, str) or crv not in _CURVES:
            raise ValueError("unsupported curve")
        curve, coord, ec_alg = _CURVES[crv]
        x, y = _fixed(d, "x", coord), _fixed(d, "y", coord)
        # public_key() checks the point is on the curve (invalid-curve attacks).
        key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve()).public_key()
        algs = frozenset({ec_alg})
    elif kty == "OKP":
        crv = d.get("crv")
        if crv == "Ed25519":
            key = ed25519.Ed25519PublicKey.from_public_bytes(_fixed(d, "x", 32))
            algs = frozenset({"EdDSA", "Ed25519"})
        elif crv == "Ed448":
            key = ed448.Ed448PublicKey.from_public_bytes(_fixed(d, "x", 57))
            algs = frozenset({"EdDSA"})
        else:
            raise ValueError("unsupported OKP curve")
    else:
        raise ValueError("unsupported key type")
    if alg is not None:
        if alg not in algs:
            raise ValueError("alg does not fit the key type")
        algs = frozenset({alg})
    return Jwk(kid=kid, key=key, algs=algs, coord_bytes=coord)


def _kid_label(kid: object) -> str:
    if not isinstance(kid, str):
        return "no kid"
    return f"kid {kid[:64]!a}"  # one line of ASCII, whatever the issuer wrote


def _uint(d: dict[str, Any], name: str) -> int:
    v = d.get(name)
    if not isinstance(v, str):
        raise ValueError(f"missing {name}")
    raw = b64url_decode(v)
    if not raw or (raw[0] == 0 and len(raw) > 1):
        raise ValueError(f"{name} is not a minimal big-endian integer")
    return int.from_bytes(raw, "big")


def _fixed(d: dict[str, Any], name: str, size: int) -> bytes:
    v = d.get(name)
    if not isinstance(v, str):
        raise ValueError(f"missing {name}")
    raw = b64url_decode(v)
    if len(raw) != size:
        raise ValueError(f"{name} has the wrong length")
    return raw


def _verify_args(key: PublicKey, alg: str) -> tuple[Any, ...]:
    """The arguments key.verify takes after signature and data for a JWS alg (the objects are immutable)."""
    if isinstance(key, rsa.RSAPublicKey):
        h = _HASHES[alg[2:]]()
        if alg.startswith("RS"):
            return (padding.PKCS1v15(), h)
        return (padding.PSS(padding.MGF1(h), h.digest_size), h)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return (ec.ECDSA(_HASHES[alg[2:]]()),)
    return ()


def verify_signature(jwk: Jwk, alg: str, signing_input: bytes, signature: bytes) -> bool:
    """Check a JWS signature; an `alg` outside `jwk.algs` is refused (the caller has already ensured it is in)."""
    args = jwk.verify_args.get(alg)
    if args is None:
        return False
    try:
        n = jwk.coord_bytes
        if n:
            # JWS carries ECDSA as r || s, fixed width; cryptography takes DER.
            if len(signature) != 2 * n:
                return False
            r = int.from_bytes(signature[:n], "big")
            s = int.from_bytes(signature[n:], "big")
            jwk.key.verify(encode_dss_signature(r, s), signing_input, *args)
        else:
            jwk.key.verify(signature, signing_input, *args)
    except InvalidSignature:
        return False
    return True


class KeySet:
    """An issuer's keys by `kid`, as last fetched; immutable, swapped whole on refresh."""

    __slots__ = ("_fits", "by_kid", "size")

    def __init__(self, keys: list[Jwk]) -> None:
        self.by_kid: dict[str | None, list[Jwk]] = {}
        for k in keys:
            self.by_kid.setdefault(k.kid, []).append(k)
        self.size = len(keys)
        # Every answer of candidates() for a known kid (or none) and an alg some key takes, worked out once per
        # key set: at most MAX_KEYS x algs entries, none made from what a token says.
        self._fits: dict[tuple[str | None, str], tuple[tuple[Jwk, ...], bool]] = {}
        for alg in {a for k in keys for a in k.algs}:
            self._fits[None, alg] = self._candidates(None, alg)
            for kid in self.by_kid:
                if kid is not None:
                    self._fits[kid, alg] = self._candidates(kid, alg)

    def candidates(self, kid: str | None, alg: str) -> tuple[tuple[Jwk, ...], bool]:
        """Keys that may verify a token with this kid and alg, and whether the kid is known at all."""
        fits = self._fits.get((kid, alg))
        return fits if fits is not None else self._candidates(kid, alg)

    def _candidates(self, kid: str | None, alg: str) -> tuple[tuple[Jwk, ...], bool]:
        if kid is None:
            fits = tuple(k for ks in self.by_kid.values() for k in ks if alg in k.algs)
            # Without a kid, only an unambiguous key is tried: trying every key multiplies the work an
            # attacker can cause per token.
            return (fits if len(fits) == 1 else ()), bool(fits)
        keys = self.by_kid.get(kid)
        if not keys:
            return (), False
        return tuple(k for k in keys if alg in k.algs), True


def parse_jwks(doc: dict[str, Any]) -> tuple[KeySet, list[str]]:
    """Parse a JWKS document; returns the usable keys and, for each member skipped, why (named by its kid).

    Raises ValueError when the document is not a JWKS or has no usable key, so that the caller keeps its
    last good key set instead of swapping in an empty one.
    """
    members = doc.get("keys")
    if not isinstance(members, list):
        raise ValueError("no 'keys' array")
    if len(members) > MAX_KEYS:
        raise ValueError(f"more than {MAX_KEYS} keys")
    keys: list[Jwk] = []
    skipped: list[str] = []
    for i, m in enumerate(members):
        if not isinstance(m, dict):
            skipped.append(f"member {i}: not an object")
            continue
        try:
            keys.append(parse_jwk(m))
        except ValueError as e:
            # The reasons are this module's own words (or cryptography's), never key material.
            skipped.append(f"member {i} ({_kid_label(m.get('kid'))}): {e}")
    if not keys:
        raise ValueError("no usable signing key")
    return KeySet(keys), skipped
