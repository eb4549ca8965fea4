"""A JWT's parts, header and claims: the Cython twin and the pure twin accept, refuse (same reason and detail)
and return the same (the same principal) for the same token, header or claims, hostile ones included."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import reasons as R
from agent.authn.jwk import parse_jwk, parse_jwks
from agent.authn.jwks import KeyStore
from agent.authn.principal import Principal
from agent.authn.strict import MAX_NUMERIC_DATE, b64url_decode
from agent.config.model import ClaimNames, IdentityProvider
from agent.errors import AuthnError
from tests.conftest import native_module, twins
from tests.keys import AUDIENCE, SigningKey, claims, craft, make_key, mint
from tests.keys import ISSUER as ISSUER_T

MODULES = twins("agent.authn._claims_py", "_claims")
NOW = 1_700_000_000.0
ISS = "https://idp.example.test"


def provider(names: ClaimNames | None = None, require_typ: bool = False) -> IdentityProvider:
    return IdentityProvider(
        require_typ=require_typ,
        name="corp",
        issuer=ISS,
        audiences=frozenset({"orders-api", "other-api"}),
        algorithms=frozenset({"RS256"}),
        leeway_s=30.0,
        max_token_lifetime_s=3600.0,
        claims=names or ClaimNames(),
    )


FLAT = provider()
TYPED = provider(require_typ=True)
NESTED = provider(ClaimNames(subject="user.id", roles="realm_access.roles", scopes="scp", client_id="azp"))


def base(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISS,
        "sub": "alice",
        "aud": "orders-api",
        "iat": int(NOW),
        "exp": int(NOW) + 300,
        "jti": "j-1",
        "client_id": "web-app",
        "scope": "orders:read",
    }
    for k, v in overrides.items():
        if v is DROP:
            claims.pop(k, None)
        else:
            claims[k] = v
    return claims


DROP = object()


@pytest.fixture(params=MODULES, scope="module")
def mod(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


def shape(p: Principal) -> tuple[Any, ...]:
    return tuple((f.name, getattr(p, f.name)) for f in dataclasses.fields(Principal))


def outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    """What a call gives: the principal's every field (claims by identity too) and nbf, or the refusal."""
    try:
        r = fn(*args)
    except AuthnError as e:
        return ("refused", e.reason, e.detail)
    if isinstance(r, tuple) and isinstance(r[0], Principal):
        p, nbf = r
        assert p.claims is args[1]  # kept, not copied: claim rules read it
        return ("ok", shape(p), nbf, type(nbf))
    if isinstance(r, Principal):
        return ("ok", shape(r))
    if isinstance(r, tuple):
        return ("ok", r, tuple(type(v) for v in r))
    return ("ok", r, type(r))


HUGE = 10**400
NAN, INF = float("nan"), float("inf")

# (name, provider, claims): every case is judged by both twins; the expected outcome of some is pinned below.
HOSTILE: list[tuple[str, IdentityProvider, dict[str, Any]]] = [
    ("valid", FLAT, base()),
    ("valid floats", FLAT, base(iat=NOW - 0.5, exp=NOW + 0.25, nbf=NOW - 1.5)),
    ("valid at the leeway edges", FLAT, base(exp=NOW - 29.0, nbf=NOW + 30, iat=NOW + 30)),
    ("expired at the leeway", FLAT, base(exp=NOW - 30)),
    ("exp missing", FLAT, base(exp=DROP)),
    ("exp null", FLAT, base(exp=None)),
    ("exp true", FLAT, base(exp=True)),
    ("exp false", FLAT, base(exp=False)),
    ("exp string", FLAT, base(exp=str(int(NOW) + 300))),
    ("exp negative", FLAT, base(exp=-1)),
    ("exp nan", FLAT, base(exp=NAN)),
    ("exp inf", FLAT, base(exp=INF)),
    ("exp huge int", FLAT, base(exp=HUGE)),
    ("exp 2^63", FLAT, base(exp=2**63)),
    ("exp -2^63-1", FLAT, base(exp=-(2**63) - 1)),
    ("exp max", FLAT, base(exp=MAX_NUMERIC_DATE, iat=MAX_NUMERIC_DATE - 10)),
    ("exp max+1", FLAT, base(exp=MAX_NUMERIC_DATE + 1)),
    ("exp max float+", FLAT, base(exp=MAX_NUMERIC_DATE + 0.5)),
    ("exp list", FLAT, base(exp=[int(NOW) + 300])),
    ("nbf future", FLAT, base(nbf=NOW + 31)),
    ("nbf true", FLAT, base(nbf=True)),
    ("nbf nan", FLAT, base(nbf=NAN)),
    ("nbf null", FLAT, base(nbf=None)),
    ("nbf huge", FLAT, base(nbf=HUGE)),
    ("iat missing", FLAT, base(iat=DROP)),
    ("iat future", FLAT, base(iat=NOW + 31)),
    ("iat bool", FLAT, base(iat=False)),
    ("iat dict", FLAT, base(iat={})),
    ("lifetime too long", FLAT, base(iat=NOW - 3400, exp=NOW + 201)),
    ("lifetime exactly max", FLAT, base(iat=NOW - 3400, exp=NOW + 200)),
    ("auth_time future", FLAT, base(auth_time=NOW + 31)),
    ("auth_time bool", FLAT, base(auth_time=True)),
    ("auth_time string", FLAT, base(auth_time="yesterday")),
    ("auth_time past", FLAT, base(auth_time=NOW - 100)),
    ("aud missing", FLAT, base(aud=DROP)),
    ("aud null", FLAT, base(aud=None)),
    ("aud empty string", FLAT, base(aud="")),
    ("aud empty list", FLAT, base(aud=[])),
    ("aud other", FLAT, base(aud=["x"])),
    ("aud one of two", FLAT, base(aud=["x", "other-api"])),
    ("aud with a number", FLAT, base(aud=["orders-api", 1])),
    ("aud with a bool", FLAT, base(aud=[True])),
    ("aud number", FLAT, base(aud=5)),
    ("aud object", FLAT, base(aud={"orders-api": 1})),
    ("aud case", FLAT, base(aud="ORDERS-API")),
    ("aud nested list", FLAT, base(aud=[["orders-api"]])),
    ("sub missing", FLAT, base(sub=DROP)),
    ("sub null", FLAT, base(sub=None)),
    ("sub empty", FLAT, base(sub="")),
    ("sub number", FLAT, base(sub=5)),
    ("sub zero", FLAT, base(sub=0)),
    ("sub false", FLAT, base(sub=False)),
    ("sub list", FLAT, base(sub=["alice"])),
    ("sub object", FLAT, base(sub={"id": "alice"})),
    ("sub leading space", FLAT, base(sub=" alice")),
    ("sub trailing space", FLAT, base(sub="alice ")),
    ("sub inner space", FLAT, base(sub="al ice")),
    ("sub only space", FLAT, base(sub=" ")),
    ("sub newline", FLAT, base(sub="al\nice")),
    ("sub crlf", FLAT, base(sub="alice\r\nx-admin: 1")),
    ("sub nul", FLAT, base(sub="al\x00ice")),
    ("sub del", FLAT, base(sub="al\x7fice")),
    ("sub c1", FLAT, base(sub="al\x85ice")),
    ("sub nbsp", FLAT, base(sub="\u00a0alice")),
    ("sub zero width", FLAT, base(sub="ali\u200bce")),
    ("sub line separator", FLAT, base(sub="alice\u2028")),
    ("sub ideographic space", FLAT, base(sub="alice\u3000")),
    ("sub lone surrogate", FLAT, base(sub="al\ud800ice")),
    ("sub private use", FLAT, base(sub="al\ue000ice")),
    ("sub accents", FLAT, base(sub="élise")),
    ("sub cjk", FLAT, base(sub="田中")),
    ("sub emoji", FLAT, base(sub="al\U0001f600")),
    ("sub 1024", FLAT, base(sub="a" * 1024)),
    ("sub 1025", FLAT, base(sub="a" * 1025)),
    ("sub 1025 wide", FLAT, base(sub="é" * 1025)),
    ("client_id number", FLAT, base(client_id=5)),
    ("client_id empty", FLAT, base(client_id="")),
    ("client_id null", FLAT, base(client_id=None)),
    ("client_id missing", FLAT, base(client_id=DROP)),
    ("client_id space", FLAT, base(client_id=" web")),
    ("client_id cr", FLAT, base(client_id="web\r")),
    ("client_id tab", FLAT, base(client_id="web\tapp")),
    ("client_id c1", FLAT, base(client_id="\x85")),
    ("client_id list", FLAT, base(client_id=["web"])),
    ("scope empty", FLAT, base(scope="")),
    ("scope spaces", FLAT, base(scope="   ")),
    ("scope many", FLAT, base(scope=" a  b c a ")),
    ("scope tab", FLAT, base(scope="a\tb")),
    ("scope nbsp", FLAT, base(scope="a\u00a0b")),
    ("scope quote", FLAT, base(scope='a"b')),
    ("scope backslash", FLAT, base(scope="a\\b")),
    ("scope del", FLAT, base(scope="a\x7f")),
    ("scope non-ascii", FLAT, base(scope="ordérs")),
    ("scope list", FLAT, base(scope=["a", "b", "a"])),
    ("scope list with space", FLAT, base(scope=["a b"])),
    ("scope list empty item", FLAT, base(scope=[""])),
    ("scope list number", FLAT, base(scope=["a", 1])),
    ("scope empty list", FLAT, base(scope=[])),
    ("scope number", FLAT, base(scope=5)),
    ("scope bool", FLAT, base(scope=True)),
    ("scope object", FLAT, base(scope={"a": 1})),
    ("scope null", FLAT, base(scope=None)),
    ("roles string", FLAT, base(roles="admin")),
    ("roles list", FLAT, base(roles=["a", "b", "a", "with space", "ü"])),
    ("roles empty string", FLAT, base(roles="")),
    ("roles del", FLAT, base(roles=["a\x7f"])),
    ("roles c1", FLAT, base(roles=["a\x9f"])),
    ("roles just past c1", FLAT, base(roles=["a\xa0"])),
    ("roles newline", FLAT, base(roles="a\nb")),
    ("roles zero width", FLAT, base(roles="a\u200b")),
    ("roles number", FLAT, base(roles=[1])),
    ("roles nested list", FLAT, base(roles=[["a"]])),
    ("roles object", FLAT, base(roles={})),
    ("roles bool", FLAT, base(roles=False)),
    ("roles empty list", FLAT, base(roles=[])),
    ("jti number", FLAT, base(jti=5)),
    ("jti bool", FLAT, base(jti=True)),
    ("jti list", FLAT, base(jti=[])),
    ("jti null", FLAT, base(jti=None)),
    ("cnf jkt", FLAT, base(cnf={"jkt": "thumb"})),
    ("cnf x5t", FLAT, base(cnf={"x5t#S256": "thumb"})),
    ("cnf both", FLAT, base(cnf={"jkt": "a", "x5t#S256": "b"})),
    ("cnf empty", FLAT, base(cnf={})),
    ("cnf unknown method", FLAT, base(cnf={"jwk": {"kty": "EC"}})),
    ("cnf known and unknown", FLAT, base(cnf={"jkt": "a", "x5t": "b"})),
    ("cnf jkt number", FLAT, base(cnf={"jkt": 1})),
    ("cnf x5t list", FLAT, base(cnf={"x5t#S256": ["b"]})),
    ("cnf jkt null", FLAT, base(cnf={"jkt": None})),
    ("cnf list", FLAT, base(cnf=["jkt"])),
    ("cnf string", FLAT, base(cnf="jkt")),
    ("cnf null", FLAT, base(cnf=None)),
    ("nested valid", NESTED, base(sub=DROP, user={"id": "bob"}, realm_access={"roles": ["r"]}, scp="a b", azp="c")),
    ("nested sub missing", NESTED, base(user={})),
    ("nested sub not an object", NESTED, base(user="bob")),
    ("nested sub under a list", NESTED, base(user=[{"id": "bob"}])),
    ("nested sub null", NESTED, base(user=None)),
    ("nested sub number", NESTED, base(user={"id": 7})),
    ("nested roles under a string", NESTED, base(user={"id": "bob"}, realm_access="admin")),
    ("nested roles bad", NESTED, base(user={"id": "bob"}, realm_access={"roles": [1]})),
    ("nested client_id bad", NESTED, base(user={"id": "bob"}, azp=["c"])),
    ("nested scope bad", NESTED, base(user={"id": "bob"}, scp="a\nb")),
    ("nested flat names ignored", NESTED, base(user={"id": "bob"}, scope=5, client_id=5, roles=5)),
]


@pytest.mark.parametrize(("name", "idp", "claims"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_twins_judge_hostile_claims_alike(name: str, idp: IdentityProvider, claims: dict[str, Any]) -> None:
    from agent.authn import _claims_py

    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    for now in (NOW, int(NOW)):
        assert outcome(native.check_claims, idp, claims, now) == outcome(_claims_py.check_claims, idp, claims, now)
    for method, exp in (("introspection", None), ("jwt", 123.0)):
        assert outcome(native.principal_from_claims, idp, claims, method, exp) == outcome(
            _claims_py.principal_from_claims, idp, claims, method, exp
        )


PINNED = {
    "valid": "ok",
    "expired at the leeway": (R.TOKEN_EXPIRED, ""),
    "exp missing": (R.TOKEN_CLAIM_MISSING, "exp"),
    "exp null": (R.TOKEN_CLAIM_MISSING, "exp"),
    "exp true": (R.TOKEN_CLAIM_INVALID, "exp"),
    "exp nan": (R.TOKEN_CLAIM_INVALID, "exp"),
    "exp huge int": (R.TOKEN_CLAIM_INVALID, "exp"),
    "exp max": (R.TOKEN_ISSUED_IN_FUTURE, ""),
    "exp max+1": (R.TOKEN_CLAIM_INVALID, "exp"),
    "nbf future": (R.TOKEN_NOT_YET_VALID, ""),
    "iat future": (R.TOKEN_ISSUED_IN_FUTURE, ""),
    "lifetime too long": (R.TOKEN_LIFETIME_TOO_LONG, ""),
    "lifetime exactly max": "ok",
    "auth_time future": (R.TOKEN_CLAIM_INVALID, "auth_time is in the future"),
    "aud missing": (R.TOKEN_CLAIM_MISSING, "aud"),
    "aud empty list": (R.TOKEN_CLAIM_INVALID, "aud"),
    "aud other": (R.TOKEN_AUDIENCE_MISMATCH, ""),
    "aud one of two": "ok",
    "sub empty": (R.TOKEN_CLAIM_MISSING, "sub"),
    "sub zero": (R.TOKEN_CLAIM_INVALID, "sub"),
    "sub crlf": (R.TOKEN_CLAIM_INVALID, "sub"),
    "sub nbsp": (R.TOKEN_CLAIM_INVALID, "sub"),
    "sub zero width": (R.TOKEN_CLAIM_INVALID, "sub"),
    "sub lone surrogate": (R.TOKEN_CLAIM_INVALID, "sub"),
    "sub emoji": "ok",
    "sub 1024": "ok",
    "sub 1025": (R.TOKEN_CLAIM_INVALID, "sub"),
    "client_id empty": "ok",
    "client_id tab": (R.TOKEN_CLAIM_INVALID, "client_id"),
    "scope tab": (R.TOKEN_CLAIM_INVALID, "scope"),
    "roles zero width": "ok",
    "roles c1": (R.TOKEN_CLAIM_INVALID, "roles"),
    "cnf known and unknown": (R.TOKEN_CLAIM_INVALID, "cnf (only jkt and x5t#S256 are supported)"),
    "cnf jkt number": (R.TOKEN_CLAIM_INVALID, "cnf"),
    "cnf jkt null": "ok",
    "nested valid": "ok",
    "nested sub under a list": (R.TOKEN_CLAIM_MISSING, "user.id"),
    "nested sub number": (R.TOKEN_CLAIM_INVALID, "user.id"),
    "nested roles bad": (R.TOKEN_CLAIM_INVALID, "realm_access.roles"),
    "nested client_id bad": (R.TOKEN_CLAIM_INVALID, "azp"),
    "nested scope bad": (R.TOKEN_CLAIM_INVALID, "scp"),
    "nested flat names ignored": "ok",
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_each_twin_gives_the_pinned_outcome(mod: Any, name: str) -> None:
    _, idp, claims = next(c for c in HOSTILE if c[0] == name)
    got = outcome(mod.check_claims, idp, claims, NOW)
    assert (got[0] if got[0] == "ok" else got[1:]) == PINNED[name]


def test_the_principal_names_what_the_claims_say(mod: Any) -> None:
    claims = base(scope=" b a  b", roles=["r"], cnf={"jkt": "t"}, nbf=int(NOW) - 5)
    who, nbf = mod.check_claims(FLAT, claims, NOW)
    assert who == Principal(
        subject="alice", issuer=ISS, method="jwt", client_id="web-app", jti="j-1", scopes=frozenset({"a", "b"}),
        roles=frozenset({"r"}), expires_at=NOW + 300, cnf_jkt="t", cnf_x5t=None, claims=claims,
    )  # fmt: skip
    assert who.claims is claims and nbf == NOW - 5 and type(nbf) is float and type(who.expires_at) is float
    assert who.memo == {} and who.memo is not mod.check_claims(FLAT, claims, NOW)[0].memo  # one per token
    with pytest.raises(dataclasses.FrozenInstanceError):
        who.subject = "mallory"  # type: ignore[misc]


def test_the_native_twin_fills_the_principals_slots_itself() -> None:
    # The fast path, not the fallback through Principal(...): a field added to Principal turns it off (and the
    # twin tests above still hold); this says when that happens.
    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    assert native.FILLS_SLOTS is True


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (5, 5.0), (5.5, 5.5), (True, "invalid"), (-1, "invalid"), (HUGE, "invalid"), (NAN, "invalid"),
     ("5", "invalid"), (MAX_NUMERIC_DATE, float(MAX_NUMERIC_DATE)), (MAX_NUMERIC_DATE + 1, "invalid")],
)  # fmt: skip
def test_time_claim_is_a_numeric_date_or_refused(mod: Any, value: Any, expected: Any) -> None:
    claims = {} if value is None else {"t": value}
    if expected == "invalid":
        with pytest.raises(AuthnError) as e:
            mod.time_claim(claims, "t", False)
        assert (e.value.reason, e.value.detail) == (R.TOKEN_CLAIM_INVALID, "t")
        return
    got = mod.time_claim(claims, "t", False)
    assert got == expected and type(got) is type(expected)
    if value is None:
        with pytest.raises(AuthnError) as e:
            mod.time_claim(claims, "t", True)
        assert (e.value.reason, e.value.detail) == (R.TOKEN_CLAIM_MISSING, "t")


def test_audience_may_be_optional_and_auth_time_is_checked_alone(mod: Any) -> None:
    mod.check_audience(FLAT, None, False)
    with pytest.raises(AuthnError, match=R.TOKEN_CLAIM_MISSING):
        mod.check_audience(FLAT, None, True)
    mod.check_auth_time({"auth_time": NOW + 30}, NOW, 30.0)
    with pytest.raises(AuthnError, match="auth_time is in the future"):
        mod.check_auth_time({"auth_time": NOW + 30.5}, NOW, 30.0)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, int(NOW), int(NOW) + 100, int(NOW) - 100, MAX_NUMERIC_DATE, MAX_NUMERIC_DATE + 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.sampled_from('ab :-"\\\t\n\x00\x7f\x85\xa0\u200b\u2028é\ud800orders-api'), max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["id", "roles", "jkt"]), inner),
    max_leaves=8,
)
claim_sets = st.dictionaries(
    st.sampled_from(
        ["exp", "nbf", "iat", "auth_time", "aud", "sub", "client_id", "scope", "roles", "jti", "cnf", "user", "scp"]
    ),
    json_values,
    max_size=13,
).map(lambda d: {**base(), **d})


@settings(max_examples=1500, deadline=None)
@given(claim_sets, st.sampled_from([FLAT, NESTED]))
def test_twins_agree_on_any_claim_set(claims: dict[str, Any], idp: IdentityProvider) -> None:
    from agent.authn import _claims_py

    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    assert outcome(native.check_claims, idp, claims, NOW) == outcome(_claims_py.check_claims, idp, claims, NOW)
    assert outcome(native.principal_from_claims, idp, claims, "introspection", None) == outcome(
        _claims_py.principal_from_claims, idp, claims, "introspection", None
    )


def b64(raw: bytes | str) -> str:
    return base64.urlsafe_b64encode(raw.encode() if isinstance(raw, str) else raw).rstrip(b"=").decode()


def jose(header: Any, claims: Any = None, sig: bytes = b"\x01\x02\x03") -> str:
    def part(v: Any) -> str:
        return v if isinstance(v, str) else b64(json.dumps(v))

    return f"{part(header)}.{part(base() if claims is None else claims)}.{b64(sig)}"


GOOD_HEADER = {"alg": "RS256", "typ": "at+jwt", "kid": "k1"}
TOKENS = [
    jose(GOOD_HEADER),
    jose(GOOD_HEADER, sig=b""),
    "",
    ".",
    "..",
    "a.b",
    "a.b.c.d",
    jose(GOOD_HEADER) + ".",
    "." + jose(GOOD_HEADER),
    jose(GOOD_HEADER).replace(".", "..", 1),
    jose(GOOD_HEADER) + "=",
    jose(GOOD_HEADER) + "A",  # a length of 1 mod 4
    jose(GOOD_HEADER)[:-1] + "B",  # spare bits set
    jose(GOOD_HEADER).replace("e", "+", 1),
    jose(GOOD_HEADER).replace("e", " ", 1),
    jose(GOOD_HEADER) + "é",
    jose(GOOD_HEADER) + "\u20ac",
    "é" + jose(GOOD_HEADER),
    "\U0001f600.a.b",
    jose(GOOD_HEADER).replace(".", "\u2024", 1),
    jose(b64('{"alg":"RS256","alg":"none"}')),
    jose(b64("[1]")),
    jose(b64('"s"')),
    jose(b64("{")),
    jose(b64(b"\xef\xbb\xbf{}")),
    jose(b64(b"\xff{}")),
    jose(GOOD_HEADER, b64('{"exp":1e400}')),
    jose(GOOD_HEADER, b64('{"exp":NaN}')),
    jose(GOOD_HEADER, b64('{"sub":"a","sub":"b"}')),
    jose(GOOD_HEADER, b64('{"a":{"b":1,"b":2}}')),
    jose(GOOD_HEADER, b64('{"n":123456789012345678901234567890}')),
    jose(GOOD_HEADER, b64('{"s":"\\ud800"}')),
    jose(GOOD_HEADER, b64("[" * 40 + "]" * 40)),
]


@pytest.mark.parametrize("token", TOKENS)
def test_twins_split_hostile_tokens_alike(token: str) -> None:
    from agent.authn import _claims_py

    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    assert outcome(native.split_token, token) == outcome(_claims_py.split_token, token)


def test_a_token_splits_into_its_header_claims_signature_and_signing_input(mod: Any) -> None:
    token = jose(GOOD_HEADER, sig=b"sig")
    assert mod.split_token(token) == (GOOD_HEADER, base(), b"sig", token.rsplit(".", 1)[0].encode())
    with pytest.raises(AuthnError) as e:
        mod.split_token(token + ".x")
    assert (e.value.reason, e.value.detail) == (R.TOKEN_MALFORMED, "not three dot-separated parts")
    with pytest.raises(AuthnError) as e:
        mod.split_token(jose(GOOD_HEADER, b64('{"a":1,"a":2}')))
    assert e.value.reason == R.TOKEN_MALFORMED  # the detail is the JSON twin's own word


HEADERS: list[dict[str, Any]] = [
    GOOD_HEADER,
    {"alg": "RS256"},
    {"alg": "none"},
    {"alg": "HS256", "typ": "JWT"},
    {"alg": "rs256"},
    {"alg": ["RS256"]},
    {"alg": None},
    {},
    {"alg": "RS256", "crit": []},
    {"alg": "RS256", "crit": ["exp"], "typ": 5},
    {"alg": "RS256", "typ": "AT+JWT"},
    {"alg": "RS256", "typ": "application/at+jwt"},
    {"alg": "RS256", "typ": "JWT"},
    {"alg": "RS256", "typ": "dpop+jwt"},
    {"alg": "RS256", "typ": ""},
    {"alg": "RS256", "typ": None},
    {"alg": "RS256", "typ": ["jwt"]},
    {"alg": "RS256", "typ": "JWT", "kid": 5},
    {"alg": "RS256", "kid": None},
    {"alg": "RS256", "kid": ""},
    {"alg": "RS256", "kid": {"k": 1}},
    {"alg": "RS256", "jku": "https://evil.example", "jwk": {"kty": "RSA"}, "x5u": 1, "x5c": []},
    {"alg": "RS256", "typ": "AT+JWT\u0130"},
]


@pytest.mark.parametrize("idp", [FLAT, TYPED], ids=["typ optional", "typ required"])
@pytest.mark.parametrize("header", HEADERS)
def test_twins_judge_hostile_headers_alike(header: dict[str, Any], idp: IdentityProvider) -> None:
    from agent.authn import _claims_py

    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    assert outcome(native.check_header, idp, header) == outcome(_claims_py.check_header, idp, header)


@pytest.mark.parametrize(
    ("header", "idp", "expected"),
    [
        (GOOD_HEADER, TYPED, ("RS256", "k1")),
        ({"alg": "RS256"}, FLAT, ("RS256", None)),
        ({"alg": "RS256"}, TYPED, (R.TOKEN_TYP_NOT_ALLOWED, "typ required")),
        ({"alg": "ES256"}, FLAT, (R.TOKEN_ALG_NOT_ALLOWED, "")),
        ({"alg": "RS256", "crit": []}, FLAT, (R.TOKEN_CRIT_UNSUPPORTED, "")),
        ({"alg": "RS256", "typ": "JWT"}, FLAT, ("RS256", None)),
        ({"alg": "RS256", "typ": "dpop+jwt"}, FLAT, (R.TOKEN_TYP_NOT_ALLOWED, "")),
        ({"alg": "RS256", "kid": 5}, FLAT, (R.TOKEN_MALFORMED, "kid is not a string")),
    ],
)
def test_each_twin_reads_the_header_so(mod: Any, header: dict[str, Any], idp: IdentityProvider, expected: Any) -> None:
    got = outcome(mod.check_header, idp, header)
    assert (got[1] if got[0] == "ok" else got[1:]) == expected


token_text = st.lists(
    st.sampled_from(["eyJ", "e30", "A", "B", "_", "-", "=", ".", "+", " ", "é", "\u20ac", jose(GOOD_HEADER)]),
    max_size=12,
).map("".join)


@settings(max_examples=1500, deadline=None)
@given(token_text)
def test_twins_split_any_text_alike(token: str) -> None:
    from agent.authn import _claims_py

    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    assert outcome(native.split_token, token) == outcome(_claims_py.split_token, token)


@pytest.fixture(scope="module")
def lone() -> SigningKey:
    """A key its issuer publishes without a kid."""
    return make_key("ES512", "lone")


@pytest.fixture(scope="module")
def issuers(keys: dict[str, SigningKey], lone: SigningKey) -> dict[str, tuple[IdentityProvider, KeyStore]]:
    """Three issuers: one with every kind of key (two sharing a kid, one without), one whose keys never
    arrived, and one that takes only small tokens."""
    algs = frozenset({"ES256", "RS256", "PS256", "EdDSA", "ES384", "ES512"})
    full = dataclasses.replace(FLAT, issuer=ISSUER_T, audiences=frozenset({AUDIENCE}), algorithms=algs)
    store = KeyStore(full)
    members = [k.public_jwk for k in keys.values()]
    members.append({**keys["ES256"].public_jwk, "kid": "shared"})
    members.append({**keys["RS256"].public_jwk, "kid": "shared"})
    members.append({**lone.public_jwk, "kid": None})
    store.keys, _ = parse_jwks({"keys": members})
    empty = dataclasses.replace(full, issuer="https://empty.example.test")
    small = dataclasses.replace(full, issuer="https://small.example.test", max_token_bytes=300)
    small_store = KeyStore(small)
    small_store.keys = store.keys
    return {i.issuer: (i, s) for i, s in ((full, store), (empty, KeyStore(empty)), (small, small_store))}


def verdict(fn: Any, token: str, by_issuer: dict[str, tuple[IdentityProvider, KeyStore]]) -> tuple[Any, ...]:
    try:
        who, idp, store, nbf = fn(token, by_issuer, lambda: NOW_T)
    except AuthnError as e:
        where = getattr(e, "store", None)
        return ("refused", type(e).__name__, e.reason, e.detail, where.idp.issuer if where else None)
    return ("ok", shape(who), idp.issuer, store is by_issuer[idp.issuer][1], nbf)


NOW_T = float(int(time.time()))


def hostile_tokens(keys: dict[str, SigningKey], lone: SigningKey) -> dict[str, str]:
    es, rs = keys["ES256"], keys["RS256"]
    good = mint(es, t_claims())
    head, body, sig = good.split(".")
    raw = b64url_decode(sig)
    out = {f"valid {alg}": mint(keys[alg], t_claims()) for alg in keys}
    out |= {
        "valid, nbf": mint(rs, t_claims(nbf=int(NOW_T) - 1)),
        "shared kid, RSA": mint(rs, t_claims(), kid="shared"),
        "shared kid, EC": mint(es, t_claims(), kid="shared"),
        "no kid, one key fits": mint(lone, t_claims(), kid=None),
        "a kid for a key published without one": craft(lone, {"alg": "ES512", "kid": "lone"}, t_claims()),
        "no kid, several RS256 keys fit": mint(rs, t_claims(), kid=None),
        "signature flipped": f"{head}.{body}.{t_b64(raw[:-1] + bytes([raw[-1] ^ 1]))}",
        "ECDSA signature short": f"{head}.{body}.{t_b64(raw[:-1])}",
        "signature empty": f"{head}.{body}.",
        "signature of another token": f"{head}.{mint(es, t_claims(sub='bob')).split('.')[1]}.{sig}",
        "RS256 signature under PS256": craft(rs, {"alg": "PS256", "kid": rs.kid, "typ": "at+jwt"}, t_claims()),
        "unknown kid": mint(es, t_claims(), kid="nope"),
        "kid of another key type": craft(rs, {"alg": "RS256", "kid": es.kid}, t_claims()),
        "alg not allowed": craft(rs, {"alg": "RS512", "kid": rs.kid}, t_claims()),
        "alg none": t_b64(b'{"alg":"none"}') + f".{body}.",
        "issuer unknown": mint(es, t_claims(iss="https://other.example.test")),
        "issuer not a string": mint(es, t_claims(iss=["x"])),
        "issuer missing": mint(es, {k: v for k, v in t_claims().items() if k != "iss"}),
        "keys never arrived": mint(es, t_claims(iss="https://empty.example.test")),
        "too large for its issuer": mint(es, t_claims(iss="https://small.example.test", pad="x" * 300)),
        "small enough for its issuer": mint(es, {"iss": "https://small.example.test", "sub": "a",
                                                  "aud": AUDIENCE, "iat": int(NOW_T), "exp": int(NOW_T) + 60}),
        "crit": craft(es, {"alg": "ES256", "kid": es.kid, "crit": ["b64"]}, t_claims()),
        "kid a number": craft(es, {"alg": "ES256", "kid": 7}, t_claims()),
        "expired but well signed": mint(es, t_claims(exp=int(NOW_T) - 100, iat=int(NOW_T) - 200)),
        "bad sub but well signed": mint(es, t_claims(sub="a\nb")),
        "claims a list": craft(es, {"alg": "ES256", "kid": es.kid}, "[1]"),
        "duplicate claim": craft(es, {"alg": "ES256", "kid": es.kid}, '{"iss":"x","iss":"y"}'),
        "four parts": good + ".x",
        "non-latin-1": good + "\u20ac",
    }  # fmt: skip
    return out


def t_claims(**overrides: Any) -> dict[str, Any]:
    return {**claims(iat=int(NOW_T), exp=int(NOW_T) + 300), **overrides}


def t_b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_twins_verify_hostile_tokens_alike(
    keys: dict[str, SigningKey], lone: SigningKey, issuers: dict[str, tuple[IdentityProvider, KeyStore]]
) -> None:
    from agent.authn import _claims_py

    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    seen = {}
    for name, token in hostile_tokens(keys, lone).items():
        got = verdict(native.verify_token, token, issuers)
        assert got == verdict(_claims_py.verify_token, token, issuers), name
        seen[name] = got[0] if got[0] == "ok" else got[1:4]
    assert seen["valid RS256"] == seen["shared kid, EC"] == seen["no kid, one key fits"] == "ok"
    assert seen["signature flipped"] == ("AuthnError", R.TOKEN_SIGNATURE_INVALID, "")
    assert seen["ECDSA signature short"] == seen["RS256 signature under PS256"] == seen["signature flipped"]
    assert seen["unknown kid"] == ("UnknownKid", R.TOKEN_KID_UNKNOWN, "")
    assert seen["no kid, several RS256 keys fit"] == ("AuthnError", R.TOKEN_KEY_MISMATCH, "")
    assert seen["keys never arrived"] == ("AuthnError", R.KEYS_UNAVAILABLE, "")
    assert seen["too large for its issuer"] == ("AuthnError", R.TOKEN_TOO_LARGE, "")
    assert seen["small enough for its issuer"] == "ok"
    assert seen["expired but well signed"] == ("AuthnError", R.TOKEN_EXPIRED, "")
    # Again, with every header the first pass parsed now reused: the same verdicts.
    for name, token in hostile_tokens(keys, lone).items():
        assert verdict(native.verify_token, token, issuers) == verdict(_claims_py.verify_token, token, issuers), name


def test_reused_headers_stay_few_and_short(keys: dict[str, SigningKey]) -> None:
    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    es = keys["ES256"]
    for i in range(300):
        token = craft(es, {"alg": "ES256", "kid": es.kid, "n": i}, t_claims())
        with pytest.raises(AuthnError):
            native.verify_token(token, {}, time.time)  # refused (no issuer), its header kept all the same
        assert 0 < len(native.HEADER_CACHE) <= 64
    long_header = craft(es, {"alg": "ES256", "x": "y" * 600}, t_claims())
    with pytest.raises(AuthnError):
        native.verify_token(long_header, {}, time.time)
    assert long_header.split(".")[0] not in native.HEADER_CACHE


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA", "ES384"])
def test_twins_check_signatures_alike(keys: dict[str, SigningKey], alg: str) -> None:
    from agent.authn import _claims_py

    native = native_module("_claims")
    if native is None:
        pytest.skip("no extension")
    data = b"head.body"
    sig = keys[alg].sign(data)
    for jwk in (parse_jwk(keys[alg].public_jwk), parse_jwk({**keys[alg].public_jwk, "alg": alg})):
        for a in ("ES256", "ES384", "RS256", "PS256", "RS512", "EdDSA", "none"):
            for s in (sig, sig[:-1], sig + b"\0", sig[:-1] + bytes([sig[-1] ^ 1]), b""):
                for d in (data, data + b"x"):
                    assert native.verify_signature(jwk, a, d, s) == _claims_py.verify_signature(jwk, a, d, s)
        assert native.verify_signature(jwk, alg, data, sig) is True
