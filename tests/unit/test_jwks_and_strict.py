"""JWKS members the agent must refuse to use, and the strict base64url/JSON it parses tokens with."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.authn.jwk import parse_jwk, parse_jwks, verify_signature
from agent.authn.strict import b64url_decode, is_number, strict_json_object
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.keys import SigningKey, b64, mint


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
    assert (ks.size, len(skipped)) == (1, 2)


def test_key_set_answers_from_its_table_as_it_would_work_them_out(keys: dict[str, SigningKey]) -> None:
    # Two keys share a kid and one has none: every kid/alg pair, known or not, gets the answer of a fresh lookup.
    members = [{**k.public_jwk, "kid": "shared"} for k in (keys["RS256"], keys["ES256"])]
    ks, _ = parse_jwks({"keys": [*members, {**keys["EdDSA"].public_jwk, "kid": None}, keys["ES384"].public_jwk]})
    for kid in (None, "shared", "kid-ES384", "unknown"):
        for alg in ("RS256", "PS512", "ES256", "ES384", "EdDSA", "HS256"):
            assert ks.candidates(kid, alg) == ks._candidates(kid, alg), (kid, alg)
    assert ks.candidates("shared", "ES256")[0] == (ks.by_kid["shared"][1],)
    assert ks.candidates(None, "EdDSA")[0] == (ks.by_kid[None][0],)
    assert ks.candidates("unknown", "ES256") == ((), False)


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA", "ES384"])
def test_a_signature_verifies_only_under_an_alg_its_key_takes(keys: dict[str, SigningKey], alg: str) -> None:
    key = parse_jwk({**keys[alg].public_jwk, "alg": alg})
    sig = keys[alg].sign(b"a.b")
    assert verify_signature(key, alg, b"a.b", sig)
    assert not verify_signature(key, alg, b"a.c", sig)
    # Under an alg outside key.algs (here pinned to one) the check refuses rather than trusting its caller.
    other = "PS256" if alg == "RS256" else "RS256"
    assert not verify_signature(key, other, b"a.b", sig)


def rsa_jwk(n: int, e: int) -> dict[str, str]:
    return {"kty": "RSA", "n": b64(n.to_bytes((n.bit_length() + 7) // 8, "big")),
            "e": b64(e.to_bytes((e.bit_length() + 7) // 8, "big"))}  # fmt: skip


@pytest.fixture(scope="module")
def n2048() -> int:
    return rsa.generate_private_key(65537, 2048).public_key().public_numbers().n


@pytest.mark.parametrize(
    ("e", "ok"),
    [(65537, True), (2**32 - 1, True), (65539, True), (3, False), (17, False), (65535, False), (65538, False),
     (2**32 + 1, False), pytest.param((1 << 3059) | 1, False, id="3060-bit")],
)  # fmt: skip
def test_rsa_exponents_are_odd_and_between_65537_and_2_to_the_32(n2048: int, e: int, ok: bool) -> None:
    # A 3,000-bit exponent made each refused DPoP proof cost ~9 ms; e = 3 invites old padding attacks.
    if ok:
        assert parse_jwk(rsa_jwk(n2048, e)).algs
    else:
        with pytest.raises(ValueError, match="exponent"):
            parse_jwk(rsa_jwk(n2048, e))


def test_rsa_moduli_are_2048_to_4096_bits(n2048: int) -> None:
    big = rsa.generate_private_key(65537, 4096).public_key().public_numbers().n
    assert parse_jwk(rsa_jwk(big, 65537)).algs
    with pytest.raises(ValueError, match="4096"):
        parse_jwk(rsa_jwk((1 << 4096) | n2048, 65537))
    with pytest.raises(ValueError, match="2048"):
        parse_jwk(rsa_jwk(n2048 >> 1 | 1, 65537))


@pytest.mark.parametrize("bad", [{"kty": ["EC"]}, {"kty": "EC", "crv": ["P-256"]}, {"kty": "OKP", "crv": {}}])
def test_members_of_the_wrong_json_type_are_a_value_error(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_jwk(bad)


async def test_a_jwks_key_that_breaks_the_rules_is_skipped_by_kid_and_the_rest_stay_usable(
    write_policy: Callable[..., Path], tmp_path: Path, keys: dict[str, SigningKey], n2048: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    engine = Engine.for_policy(load_policy(write_policy()))
    hostile = {**rsa_jwk(n2048, (1 << 3059) | 1), "kid": "huge-exponent"}
    odd = {"kty": "EC", "crv": ["P-256"], "kid": "odd\ncurve"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [hostile, keys["ES256"].public_jwk, odd]}))
    caplog.set_level(logging.WARNING, "agent.jwks")
    (store,) = engine.stores.values()
    assert await store.refresh()
    assert store.keys is not None and set(store.keys.by_kid) == {"kid-ES256"}
    assert "member 0 (kid 'huge-exponent'): RSA exponent not odd in 65537..2^32-1" in caplog.text
    assert "member 2 (kid 'odd\\ncurve'): unsupported curve" in caplog.text
    assert hostile["n"][:40] not in caplog.text and hostile["e"][:40] not in caplog.text
    assert decide_token(engine, mint(keys["ES256"])).allowed


def decide_token(engine: Engine, token: str) -> Decision:
    d = engine.decide(RequestView("GET", "/v1/orders", "api.example.test", {"authorization": f"Bearer {token}"}))
    assert isinstance(d, Decision)
    return d


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
