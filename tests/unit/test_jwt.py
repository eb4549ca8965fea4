"""One test per attack on JWT verification: each names the rule, crafts the token, asserts the reason."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import reasons as R
from agent.authn.jwks import KeyStore
from agent.authn.jwt import JwtVerifier, UnknownKid
from agent.config import load_policy
from agent.errors import AuthnError
from tests.keys import ISSUER, SigningKey, b64, claims, craft, jwks, make_key, mint


@pytest.fixture
async def verifier(write_policy: Callable[..., Path]) -> JwtVerifier:
    policy = load_policy(write_policy())
    store = KeyStore(policy.identity_providers[0])
    assert await store.refresh()
    return JwtVerifier({"corp": store})


def refused(v: JwtVerifier, token: str) -> str:
    with pytest.raises(AuthnError) as e:
        v.verify_now(token)
    return e.value.reason


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA", "ES384"])
def test_valid_token_of_each_algorithm_is_accepted(
    verifier: JwtVerifier, keys: dict[str, SigningKey], alg: str
) -> None:
    who = verifier.verify_now(mint(keys[alg]))
    assert (who.subject, who.client_id, who.jti, who.issuer) == ("alice", "web-app", "j-1", ISSUER)
    assert who.scopes == {"orders:read"}


def test_alg_none_is_refused(verifier: JwtVerifier) -> None:
    header = b64(json.dumps({"alg": "none", "kid": "kid-ES256"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    assert refused(verifier, token) in (R.TOKEN_ALG_NOT_ALLOWED, R.TOKEN_MALFORMED)


def test_hs256_signed_with_the_public_key_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    # The classic confusion: the RSA public key used as an HMAC secret.
    import hashlib
    import hmac

    pem = keys["RS256"].jose.as_pem(private=False)
    si = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'kid-RS256'}).encode())}.{b64(json.dumps(claims()).encode())}"
    token = f"{si}.{b64(hmac.new(pem, si.encode(), hashlib.sha256).digest())}"
    assert refused(verifier, token) == R.TOKEN_ALG_NOT_ALLOWED


async def test_alg_outside_the_issuers_list_is_refused(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(*keys.values())))
    (tmp_path / "p.yaml").write_text(
        f"version: 1\nservice: s\nidentity_providers:\n  corp:\n    issuer: {ISSUER}\n    jwks_file: jwks.json\n"
        "    audiences: [orders-api]\n    algorithms: [ES256]\n"
        "routes:\n  - {name: r, match: {path: /}, authn: [jwt], allow: {}}\n"
    )
    store = KeyStore(load_policy(tmp_path / "p.yaml").identity_providers[0])
    assert await store.refresh()
    v = JwtVerifier({"corp": store})
    assert refused(v, mint(keys["RS256"])) == R.TOKEN_ALG_NOT_ALLOWED
    assert v.verify_now(mint(keys["ES256"])).subject == "alice"


def test_alg_that_does_not_fit_the_kids_key_type_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    # An RS256 token pointing at the EC key's kid: never verify an RSA signature with an EC key or vice versa.
    assert refused(verifier, craft(keys["RS256"], {"alg": "RS256", "kid": "kid-ES256"}, claims())) == (
        R.TOKEN_KEY_MISMATCH
    )
    # PS256 and RS256 share RSA keys; ES384 token against the P-256 key is refused.
    assert refused(verifier, craft(keys["ES384"], {"alg": "ES384", "kid": "kid-ES256"}, claims())) == (
        R.TOKEN_KEY_MISMATCH
    )


def test_embedded_jwk_and_jku_are_never_used(verifier: JwtVerifier) -> None:
    attacker = make_key("ES256", "evil")
    header = {"alg": "ES256", "kid": "evil", "jwk": attacker.public_jwk, "jku": "https://evil.test/jwks"}
    with pytest.raises(UnknownKid):
        verifier.verify_now(craft(attacker, header, claims()))
    # Even naming a configured kid, the embedded key is ignored and the signature fails.
    header = {"alg": "ES256", "kid": "kid-ES256", "jwk": attacker.public_jwk, "x5u": "https://evil.test/c"}
    assert refused(verifier, craft(attacker, header, claims())) == R.TOKEN_SIGNATURE_INVALID


def test_crit_header_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    token = craft(keys["ES256"], {"alg": "ES256", "kid": "kid-ES256", "crit": ["exp"], "exp": 1}, claims())
    assert refused(verifier, token) == R.TOKEN_CRIT_UNSUPPORTED


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.split(".")[0] + "=." + ".".join(t.split(".")[1:]),  # padding
        lambda t: t.replace("-", "+").replace("_", "/") if ("-" in t or "_" in t) else t + "+",  # std alphabet
        lambda t: ".".join(t.split(".")[:2]),  # two parts
        lambda t: t + ".AAAA.BBBB",  # five parts (JWE-like)
        lambda t: t.split(".")[0] + ". " + t.split(".")[1],  # whitespace
    ],
)
def test_non_canonical_base64url_and_shapes_are_malformed(
    verifier: JwtVerifier, keys: dict[str, SigningKey], mangle: Callable[[str], str]
) -> None:
    assert refused(verifier, mangle(mint(keys["ES256"]))) == R.TOKEN_MALFORMED


def test_non_canonical_trailing_bits_are_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    token = mint(keys["ES256"])
    h, p, s = token.split(".")
    # The signature's last char carries spare bits; flipping one gives the same bytes, another spelling.
    # pragma: allowlist nextline secret (test fixture: an alphabet)
    alt = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = s[-1]
    twin = next(c for c in alt if c != last and (alt.index(c) >> 4) == (alt.index(last) >> 4))
    assert refused(verifier, f"{h}.{p}.{s[:-1]}{twin}") == R.TOKEN_MALFORMED


def test_duplicate_claim_members_are_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    body = json.dumps(claims())[:-1] + ', "sub": "admin"}'
    assert refused(verifier, craft(keys["ES256"], {"alg": "ES256", "kid": "kid-ES256"}, body)) == R.TOKEN_MALFORMED


def test_duplicate_header_members_are_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    header = '{"alg":"ES256","kid":"kid-ES256","alg":"none"}'
    assert refused(verifier, craft(keys["ES256"], header, claims())) == R.TOKEN_MALFORMED


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(verifier: JwtVerifier, keys: dict[str, SigningKey], value: str) -> None:
    body = json.dumps(claims())[:-1] + f', "nbf": {value}}}'
    assert refused(verifier, craft(keys["ES256"], {"alg": "ES256", "kid": "kid-ES256"}, body)) == R.TOKEN_MALFORMED


def test_boolean_exp_is_not_a_number(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(exp=True))) == R.TOKEN_CLAIM_INVALID


def test_string_exp_is_not_a_number(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(exp=str(int(time.time()) + 60)))) == R.TOKEN_CLAIM_INVALID


def test_missing_exp_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    body = claims()
    del body["exp"]
    assert refused(verifier, mint(keys["ES256"], body)) == R.TOKEN_CLAIM_MISSING


def test_missing_iat_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    body = claims()
    del body["iat"]
    assert refused(verifier, mint(keys["ES256"], body)) == R.TOKEN_CLAIM_MISSING


def test_expired_token_is_refused_beyond_leeway_only(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    assert refused(verifier, mint(keys["ES256"], claims(iat=now - 600, exp=now - 31))) == R.TOKEN_EXPIRED
    assert verifier.verify_now(mint(keys["ES256"], claims(iat=now - 600, exp=now - 10))).subject == "alice"


def test_nbf_in_the_future_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    assert refused(verifier, mint(keys["ES256"], claims(nbf=now + 120))) == R.TOKEN_NOT_YET_VALID


def test_iat_in_the_future_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    assert refused(verifier, mint(keys["ES256"], claims(iat=now + 120, exp=now + 600))) == R.TOKEN_ISSUED_IN_FUTURE


def test_lifetime_beyond_the_maximum_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    assert refused(verifier, mint(keys["ES256"], claims(iat=now, exp=now + 3601))) == R.TOKEN_LIFETIME_TOO_LONG


@pytest.mark.parametrize("iss", ["https://idp.example.test/", "https://IDP.example.test", "https://evil.test", 7])
def test_issuer_must_match_exactly(verifier: JwtVerifier, keys: dict[str, SigningKey], iss: Any) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(iss=iss))) == R.TOKEN_ISSUER_UNKNOWN


def test_audience_string_or_array_with_exact_membership(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    assert verifier.verify_now(mint(keys["ES256"], claims(aud=["x", "orders-api"]))).subject == "alice"
    assert refused(verifier, mint(keys["ES256"], claims(aud="orders-api-v2"))) == R.TOKEN_AUDIENCE_MISMATCH
    assert refused(verifier, mint(keys["ES256"], claims(aud=["ORDERS-API"]))) == R.TOKEN_AUDIENCE_MISMATCH
    assert refused(verifier, mint(keys["ES256"], claims(aud=None))) == R.TOKEN_CLAIM_MISSING
    assert refused(verifier, mint(keys["ES256"], claims(aud=[1]))) == R.TOKEN_CLAIM_INVALID


@pytest.mark.parametrize("typ", ["dpop+jwt", "secevent+jwt", "JOSE", 5])
def test_typ_outside_policy_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey], typ: Any) -> None:
    token = craft(keys["ES256"], {"alg": "ES256", "kid": "kid-ES256", "typ": typ}, claims())
    assert refused(verifier, token) == R.TOKEN_TYP_NOT_ALLOWED


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "JWT", "jwt", None])
def test_rfc9068_and_plain_jwt_types_are_accepted(verifier: JwtVerifier, keys: dict[str, SigningKey], typ: Any) -> None:
    assert verifier.verify_now(mint(keys["ES256"], typ=typ)).subject == "alice"


def test_tampered_payload_fails_the_signature(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    h, _, s = mint(keys["ES256"]).split(".")
    forged = b64(json.dumps(claims(scope="orders:read admin")).encode())
    assert refused(verifier, f"{h}.{forged}.{s}") == R.TOKEN_SIGNATURE_INVALID


def test_der_encoded_ecdsa_signature_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    h, p, _ = mint(keys["ES256"]).split(".")
    der = keys["ES256"].private.sign(f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256()))
    assert refused(verifier, f"{h}.{p}.{b64(der)}") == R.TOKEN_SIGNATURE_INVALID


def test_oversized_token_is_refused_before_parsing(verifier: JwtVerifier) -> None:
    assert refused(verifier, "a" * 9000) == R.TOKEN_TOO_LARGE


def test_non_string_kid_is_malformed(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    assert refused(verifier, craft(keys["ES256"], {"alg": "ES256", "kid": 7}, claims())) == R.TOKEN_MALFORMED


def test_unknown_kid_asks_for_a_refetch(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    with pytest.raises(UnknownKid):
        verifier.verify_now(mint(keys["ES256"], kid="rotated-away"))


def test_missing_kid_is_accepted_only_when_one_key_fits(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    assert verifier.verify_now(mint(keys["ES256"], kid=None)).subject == "alice"  # one P-256 key
    # RS256 and PS256 keys both fit PS256: without a kid, neither is tried.
    assert refused(verifier, mint(keys["PS256"], kid=None)) == R.TOKEN_KEY_MISMATCH


@pytest.mark.parametrize("field,value", [("scope", 5), ("scope", ["a", 1]), ("roles", {"a": 1}), ("client_id", 3)])
def test_claims_of_the_wrong_type_are_refused(
    verifier: JwtVerifier, keys: dict[str, SigningKey], field: str, value: Any
) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(**{field: value}))) == R.TOKEN_CLAIM_INVALID


def test_scopes_from_string_or_array(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    assert verifier.verify_now(mint(keys["ES256"], claims(scope="a b  c"))).scopes == {"a", "b", "c"}
    assert verifier.verify_now(mint(keys["ES256"], claims(scope=["a", "b"]))).scopes == {"a", "b"}


def test_missing_subject_is_refused(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(sub=None))) == R.TOKEN_CLAIM_MISSING


@pytest.mark.parametrize("field", ["sub", "client_id"])
@pytest.mark.parametrize("value", ["alice\r\nx-authz-role: admin", "a\x00b", "a\x7f"])
def test_identity_values_that_would_split_upstream_headers_are_refused(
    verifier: JwtVerifier, keys: dict[str, SigningKey], field: str, value: str
) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(**{field: value}))) == R.TOKEN_CLAIM_INVALID


# RFC 6749 §3.3: scope = scope-token *( SP scope-token ); scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
NOT_A_SCOPE_SEPARATOR = ["\u00a0", "\u2003", "\u3000", "\u001f", "\u0085", "\t", "\n", "\r", "\x0b", "\x0c"]
NOT_IN_A_SCOPE_TOKEN = ['"', "\\", "\x7f", "\x00", "é", "\u200b", "\ufeff"]


@pytest.mark.parametrize("sep", NOT_A_SCOPE_SEPARATOR)
def test_scope_string_split_on_other_whitespace_is_refused_not_granted(
    verifier: JwtVerifier, keys: dict[str, SigningKey], sep: str
) -> None:
    # "profile<NBSP>orders:read" must not grant orders:read: only U+0020 separates scope tokens.
    assert refused(verifier, mint(keys["ES256"], claims(scope=f"profile{sep}orders:read"))) == R.TOKEN_CLAIM_INVALID
    assert refused(verifier, mint(keys["ES256"], claims(scope=f"orders:read{sep}"))) == R.TOKEN_CLAIM_INVALID


@pytest.mark.parametrize("char", NOT_IN_A_SCOPE_TOKEN)
def test_scope_token_with_a_character_outside_rfc6749_is_refused(
    verifier: JwtVerifier, keys: dict[str, SigningKey], char: str
) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(scope=f"a orders{char}read"))) == R.TOKEN_CLAIM_INVALID
    assert refused(verifier, mint(keys["ES256"], claims(scope=["a", f"orders{char}read"]))) == R.TOKEN_CLAIM_INVALID


@pytest.mark.parametrize("element", ["", "orders:read profile", " orders:read", "orders:read\u00a0"])
def test_scope_array_elements_must_each_be_one_scope_token(
    verifier: JwtVerifier, keys: dict[str, SigningKey], element: str
) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(scope=["x", element]))) == R.TOKEN_CLAIM_INVALID


def test_extra_spaces_in_a_scope_string_separate_nothing(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    # Leading, trailing and repeated U+0020 are tolerated and yield no empty scope.
    assert verifier.verify_now(mint(keys["ES256"], claims(scope="  a b  c "))).scopes == {"a", "b", "c"}
    assert verifier.verify_now(mint(keys["ES256"], claims(scope=""))).scopes == frozenset()
    assert verifier.verify_now(mint(keys["ES256"], claims(scope="!#[]~ a:b/c"))).scopes == {"!#[]~", "a:b/c"}


@pytest.mark.parametrize("role", ["admin\x00", "ad\nmin", "admin\x7f", "\x85admin", ["ok", "a\u0009b"]])
def test_roles_with_control_characters_are_refused(
    verifier: JwtVerifier, keys: dict[str, SigningKey], role: Any
) -> None:
    assert refused(verifier, mint(keys["ES256"], claims(roles=role))) == R.TOKEN_CLAIM_INVALID


def test_roles_keep_spaces_and_non_ascii(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    who = verifier.verify_now(mint(keys["ES256"], claims(roles=["order admin", "Käufer"])))
    assert who.roles == {"order admin", "Käufer"}


@pytest.mark.parametrize("field", ["sub", "client_id"])
@pytest.mark.parametrize("value", [" alice", "alice ", " alice ", "alice\u00a0", "\u3000alice", "ali\u0085ce"])
def test_identity_values_envoy_would_trim_or_mangle_are_refused(
    verifier: JwtVerifier, keys: dict[str, SigningKey], field: str, value: str
) -> None:
    # Envoy trims header values: " alice " would reach the app as "alice", another identity.
    assert refused(verifier, mint(keys["ES256"], claims(**{field: value}))) == R.TOKEN_CLAIM_INVALID


def test_inner_spaces_and_non_ascii_in_identity_values_pass(verifier: JwtVerifier, keys: dict[str, SigningKey]) -> None:
    who = verifier.verify_now(mint(keys["ES256"], claims(sub="Alice Müller", client_id="web app")))
    assert (who.subject, who.client_id) == ("Alice Müller", "web app")


HUGE = "1" + "0" * 399  # a 400-digit integer: float() of it raises OverflowError


@pytest.mark.parametrize("field", ["exp", "nbf", "iat", "auth_time"])
@pytest.mark.parametrize("value", [HUGE, "-" + HUGE, "-1", "-1.5", "true", "false", "1e300", "253402300800"])
def test_out_of_range_time_claims_are_invalid_claims(
    verifier: JwtVerifier, keys: dict[str, SigningKey], field: str, value: str
) -> None:
    # Raw JSON text so the number reaches the verifier exactly as written.
    body = json.dumps({k: v for k, v in claims().items() if k != field})[:-1] + f', "{field}": {value}}}'
    token = craft(keys["ES256"], {"alg": "ES256", "kid": "kid-ES256"}, body)
    assert refused(verifier, token) == R.TOKEN_CLAIM_INVALID


def test_auth_time_in_the_future_beyond_leeway_is_an_invalid_claim(
    verifier: JwtVerifier, keys: dict[str, SigningKey]
) -> None:
    now = int(time.time())
    assert refused(verifier, mint(keys["ES256"], claims(auth_time=now + 31 + 5))) == R.TOKEN_CLAIM_INVALID
    assert verifier.verify_now(mint(keys["ES256"], claims(auth_time=now + 20))).subject == "alice"  # within leeway
    assert verifier.verify_now(mint(keys["ES256"], claims(auth_time=0))).subject == "alice"  # 1970 is a time
