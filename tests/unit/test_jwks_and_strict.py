"""JWKS members the agent must refuse to use, and the strict base64url/JSON it parses tokens with."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.authn.jwk import parse_jwk, parse_jwks
from agent.authn.strict import b64url_decode, is_number, strict_json_object
from tests.keys import SigningKey, b64


def test_private_key_material_in_a_jwks_is_never_used(keys: dict[str, SigningKey]) -> None:
    private = dict(keys["ES256"].jose.as_dict(private=True))
    with pytest.raises(ValueError, match="private"):
        parse_jwk(private)


def test_rsa_keys_below_2048_bits_are_refused() -> None:
    small = rsa.generate_private_key(65537, 1024).public_key().public_numbers()
    jwk = {"kty": "RSA", "n": b64(small.n.to_bytes(128, "big")), "e": b64(small.e.to_bytes(3, "big"))}
    with pytest.raises(ValueError, match="2048"):
        parse_jwk(jwk)


def test_ec_point_not_on_the_curve_is_refused(keys: dict[str, SigningKey]) -> None:
    jwk = keys["ES256"].public_jwk
    jwk["y"] = b64(bytes(31) + b"\x01")
    with pytest.raises(ValueError):
        parse_jwk(jwk)


def test_encryption_keys_and_mismatched_alg_are_refused(keys: dict[str, SigningKey]) -> None:
    with pytest.raises(ValueError, match="signing"):
        parse_jwk({**keys["ES256"].public_jwk, "use": "enc"})
    with pytest.raises(ValueError, match="alg"):
        parse_jwk({**keys["ES256"].public_jwk, "alg": "RS256"})
    assert parse_jwk({**keys["RS256"].public_jwk, "alg": "PS256"}).algs == {"PS256"}


def test_symmetric_keys_are_not_verification_keys() -> None:
    with pytest.raises(ValueError, match=r"private key material|key type"):
        parse_jwk({"kty": "oct", "k": b64(b"secret-secret-secret")})
    with pytest.raises(ValueError, match="key type"):
        parse_jwk({"kty": "oct"})


def test_a_jwks_with_no_usable_key_is_an_error_so_the_last_good_set_stays(keys: dict[str, SigningKey]) -> None:
    with pytest.raises(ValueError):
        parse_jwks({"keys": [{"kty": "oct", "k": "AAAA"}]})
    with pytest.raises(ValueError):
        parse_jwks({"keys": "nope"})
    ks, skipped = parse_jwks({"keys": [keys["ES256"].public_jwk, {"kty": "oct", "k": "AAAA"}, 5]})
    assert (ks.size, skipped) == (1, 2)


@pytest.mark.parametrize("bad", ["YQ==", "YQ=", "a+b/", "a b", "A", "YR"])
def test_base64url_is_strict(bad: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(bad)


def test_base64url_round_trip() -> None:
    assert b64url_decode("YQ") == b"a"
    assert b64url_decode("") == b""
    assert b64url_decode("-_8") == b"\xfb\xff"


@pytest.mark.parametrize(
    "raw",
    [b'{"a":1,"a":2}', b'{"a":NaN}', b'{"a":Infinity}', b"[1]", b'"s"', b"\xef\xbb\xbf{}", b"\xff{}", b"{"],
)
def test_json_is_strict(raw: bytes) -> None:
    with pytest.raises(ValueError):
        strict_json_object(raw)


def test_booleans_are_not_numbers() -> None:
    assert not is_number(True)
    assert is_number(3) and is_number(2.5)
    assert not is_number(float("nan"))
