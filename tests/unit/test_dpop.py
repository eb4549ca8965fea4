"""DPoP proofs (RFC 9449 §4.3): the RFC's own examples, then one test per rejection rule."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from joserfc.jwk import JWKRegistry

from agent import reasons as R
from agent.authn.dpop import (
    DpopVerifier,
    NonceRequired,
    access_token_hash,
    jwk_thumbprint,
    normal_htu,
    normal_uri,
    remove_dot_segments,
)
from agent.authn.replay import Once, ReplayCache, Seen, owner_of
from agent.config.model import Dpop
from agent.errors import AuthnError
from tests.clock import Clock
from tests.keys import ISSUER, SigningKey, b64, dpop_proof, jkt, make_key, rsa_with_exponent

# RFC 7638 §3.1
RFC7638_JWK = {
    "kty": "RSA",
    # pragma: allowlist nextline secret (test fixture: RFC example)
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
    # pragma: allowlist nextline secret (test fixture: RFC example)
    "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHz"
    # pragma: allowlist nextline secret (test fixture: RFC example)
    "u6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8"
    "awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
# RFC 9449 §7.1 (figure 13): a resource request's proof, its access token, and §6.1's thumbprint of its key.
RFC9449_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
RFC9449_PROOF = (
    # pragma: allowlist nextline secret (test fixture: RFC example)
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0Rs"
    # pragma: allowlist nextline secret (test fixture: RFC example)
    "cEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2"
    "In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90"
    # pragma: allowlist nextline secret (test fixture: RFC example)
    "ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFF"
    "byJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA"
)
# pragma: allowlist nextline secret (test fixture: RFC example)
RFC9449_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
URL = "https://api.example.test/v1/orders"
HTU = normal_uri("https", "api.example.test", "/v1/orders")


def verifier(clock: Clock | None = None, **settings: Any) -> DpopVerifier:
    c = clock or Clock()
    return DpopVerifier(Dpop(**settings), ReplayCache(settings.get("replay_cache_entries", 1024), c), c)


@pytest.fixture(scope="module")
def es256() -> SigningKey:
    return make_key("ES256", "client")


def key_in(proof: str | None) -> str:
    """The RFC 7638 thumbprint (by joserfc) of the jwk in a proof's header: a token bound to the proof's key."""
    try:
        header = json.loads(base64.urlsafe_b64decode(proof.split(".")[0] + "==")) if proof else {}
        return str(JWKRegistry.import_key(header["jwk"]).thumbprint())
    except Exception:  # a header made broken on purpose: bound to no key in particular
        return "no-key-at-all"


def check(
    v: DpopVerifier, proof: str | None, method: str = "GET", htu: str | None = HTU, token: str = "tok",
    bound: str | None = None, owner: str | None = None,
) -> Once:  # fmt: skip
    """Verify `proof` for a request with `token`, bound (cnf.jkt) to `bound`, by default the proof's own key;
    the token's principal is `owner`, by default one per key."""
    jkt = key_in(proof) if bound is None else bound
    return v.verify(proof, method, htu, token, jkt, owner_of(ISSUER, jkt) if owner is None else owner)


def refused(
    v: DpopVerifier, proof: str | None, token: str = "tok", method: str = "GET", htu: str | None = HTU,
    bound: str | None = None,
) -> str:  # fmt: skip
    with pytest.raises(AuthnError) as e:
        check(v, proof, method, htu, token, bound)
    return e.value.reason + (f": {e.value.detail}" if e.value.detail else "")


def test_rfc7638_thumbprint() -> None:
    # pragma: allowlist nextline secret (test fixture: RFC example)
    assert jwk_thumbprint(RFC7638_JWK) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rfc9449_resource_proof_with_a_frozen_clock() -> None:
    # pragma: allowlist nextline secret (test fixture: RFC example)
    assert access_token_hash(RFC9449_TOKEN) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    v = verifier(Clock(1562262618))
    htu = normal_uri("https", "resource.example.org", "/protectedresource")
    assert check(v, RFC9449_PROOF, htu=htu, token=RFC9449_TOKEN, bound=RFC9449_JKT).value == "e1j3V_bKic8-LAEB"
    assert refused(v, RFC9449_PROOF, RFC9449_TOKEN, htu=htu, bound=RFC9449_JKT) == R.DPOP_PROOF_REPLAYED
    # The same proof a minute and a half later is too old, whoever sends it.
    late = verifier(Clock(1562262618 + 90))
    assert refused(late, RFC9449_PROOF, RFC9449_TOKEN, htu=htu, bound=RFC9449_JKT).startswith(
        R.DPOP_PROOF_INVALID + ": iat"
    )


def test_a_fresh_proof_from_joserfc_passes_and_names_its_key(es256: SigningKey) -> None:
    check(verifier(), dpop_proof(es256, "GET", URL, "tok"), bound=jkt(es256))
    other = jkt(make_key("ES256", "other"))
    assert refused(verifier(), dpop_proof(es256, "GET", URL, "tok"), bound=other) == (
        f"{R.DPOP_KEY_MISMATCH}: the proof is signed by another key than the token names"
    )


@pytest.mark.parametrize("alg", ["ES384", "PS256", "RS256", "EdDSA"])
def test_other_asymmetric_algorithms(alg: str) -> None:
    key = make_key(alg, "client")
    check(verifier(), dpop_proof(key, "GET", URL, "tok"), bound=jkt(key))


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://API.example.test:443/v1/orders", True),  # case and default port normalised
        ("https://api.example.test/v1/orders?page=2#top", True),  # query and fragment ignored
        ("https://api.example.test/v1/%6Frders", True),  # an unreserved character percent-encoded
        ("https://api.example.test/v1/orders/", False),
        ("https://api.example.test:8443/v1/orders", False),
        ("http://api.example.test/v1/orders", False),
        ("https://other.example.test/v1/orders", False),
        ("https://user@api.example.test/v1/orders", False),
    ],
)
def test_htu_is_compared_after_rfc3986_normalisation(es256: SigningKey, url: str, ok: bool) -> None:
    proof = dpop_proof(es256, "GET", url, "tok")
    if ok:
        assert normal_htu(url) == HTU
        assert check(verifier(), proof)
    else:
        assert refused(verifier(), proof) == f"{R.DPOP_PROOF_INVALID}: htu does not match the request URI"


# RFC 3986 §5.2.4 and §5.4: paths with dot segments and what they are once the dots are removed.
DOT_SEGMENTS = [
    ("/a/b/c/./../../g", "/a/g"),
    ("/b/c/./g", "/b/c/g"),
    ("/b/c/.", "/b/c/"),
    ("/b/c/..", "/b/"),
    ("/b/c/../..", "/"),
    ("/b/c/../../../../g", "/g"),
    ("/./g", "/g"),
    ("/../g", "/g"),
    ("/g.", "/g."),
    ("/.g", "/.g"),
    ("/g..", "/g.."),
    ("/..g", "/..g"),
    ("/b/c/./../g", "/b/g"),
    ("/b/c/g/./h", "/b/c/g/h"),
    ("/b/c/g/../h", "/b/c/h"),
    ("/b//../c", "/b/c"),
    ("/b/%2e/c/%2E%2e/d", "/b/d"),
    ("/b/.%2E/c", "/c"),
]


@pytest.mark.parametrize(("path", "normal"), DOT_SEGMENTS)
def test_htu_dot_segments_are_removed_as_rfc3986_says(path: str, normal: str) -> None:
    assert normal_htu(f"https://api.example.test{path}") == f"https://api.example.test{normal}"
    assert remove_dot_segments(path.replace("%2e", ".").replace("%2E", ".")) == normal


def test_htu_normalisation_agrees_with_yarl_on_many_paths() -> None:
    # yarl (aio-libs) normalises absolute URLs on its own: an independent reading of RFC 3986 §5.2.4.
    import itertools
    import random

    import yarl

    rnd = random.Random(11)
    pieces = ["a", "b", ".", "..", "", "%2E", "%2e%2E", "c.d", "...", ".e", "%41"]
    for n in itertools.chain(range(1, 6), [8] * 400):
        path = "/" + "/".join(rnd.choice(pieces) for _ in range(n))
        ours = normal_htu(f"https://h.test{path}")
        theirs = yarl.URL(f"https://h.test{path}").raw_path.replace("%41", "A")  # yarl keeps %41 as sent
        assert ours == f"https://h.test{theirs}", path


@pytest.mark.parametrize(
    "htu",
    [
        "https://api.example.test/v1/or\tders",
        "https://api.example.test/v1/orders\r\n",
        "https://api.example.test/v1/\u00f6rders",
        "https://api.example.test/v1/or ders",
        "https://api.example.test/v1/or\\ders",
        "https://api.example.test/v1/%zzorders",
        "https://:443/v1/orders",
        "https:///v1/orders",
        "",
    ],
)
def test_an_htu_that_is_not_a_uri_matches_nothing(htu: str) -> None:
    assert normal_htu(htu) is None


def test_the_request_side_refuses_dot_segments_instead_of_removing_them() -> None:
    # The agent's routes judged the path as sent; it must be compared as sent too.
    assert normal_uri("https", "api.example.test", "/v1/x/../orders") is None
    assert normal_uri("https", "api.example.test", "/v1/%2e/orders") is None
    assert normal_uri("https", "API.example.test:443", "/v1/orders?x=1") == HTU
    assert normal_uri("https", "api.example.test:", "/v1/orders") == HTU
    assert normal_uri("https", "[::1]:443", "/") == "https://[::1]/"
    assert normal_uri("https", "[::1]", "/") == "https://[::1]/"


def test_a_proof_key_that_breaks_the_rsa_rules_is_refused_before_its_signature_is_checked() -> None:
    hostile, sign = rsa_with_exponent((1 << 3059) | 1)
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": hostile}
    si = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    proof = f"{si}.{b64(sign(si.encode()))}"
    assert refused(verifier(), proof) == f"{R.DPOP_PROOF_INVALID}: jwk: RSA exponent not odd in 65537..2^32-1"
    assert refused(verifier(), proof, bound=jkt(make_key("ES256", "someone"))).startswith(R.DPOP_KEY_MISMATCH)


def forge(header: dict[str, Any], claims: dict[str, Any], key: SigningKey) -> str:
    """A proof with any header at all (none, HS256...), signed by `key` where a signature is wanted."""
    si = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{si}.{b64(key.sign(si.encode()))}"


def claims(**over: Any) -> dict[str, Any]:
    c = {"jti": "j1", "htm": "GET", "htu": URL, "iat": int(time.time()), "ath": access_token_hash("tok")}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def test_each_rejection_rule(es256: SigningKey) -> None:
    other = make_key("ES256", "other")
    jwk = {k: v for k, v in es256.public_jwk.items() if k != "kid"}
    now = int(time.time())
    cases: dict[str, str | None] = {
        "no DPoP header": None,
        "two DPoP headers (Envoy joins them)": dpop_proof(es256, "GET", URL, "tok")
        + ","
        + dpop_proof(es256, "GET", URL, "tok"),
        "not a JWT": "abc.def",
        "typ is jwt": dpop_proof(es256, "GET", URL, "tok", {"typ": "jwt"}),
        "no typ": dpop_proof(es256, "GET", URL, "tok", {"typ": None}),
        "alg none": forge({"typ": "dpop+jwt", "alg": "none", "jwk": jwk}, claims(), es256).rsplit(".", 1)[0] + ".",
        "alg HS256": forge({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}, claims(), es256),
        "no jwk": dpop_proof(es256, "GET", URL, "tok", {"jwk": None}),
        "jwk with the private key": forge(
            {"typ": "dpop+jwt", "alg": "ES256", "jwk": es256.jose.as_dict(private=True)}, claims(), es256
        ),
        "signed by another key than its jwk": forge({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}, claims(), other),
        "alg does not fit the jwk": forge({"typ": "dpop+jwt", "alg": "ES384", "jwk": jwk}, claims(), es256),
        "crit": forge({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk, "crit": ["exp"], "exp": 1}, claims(), es256),
        "htm differs": dpop_proof(es256, "POST", URL, "tok"),
        "htu differs": dpop_proof(es256, "GET", URL + "/1", "tok"),
        "no htu": dpop_proof(es256, "GET", URL, "tok", htu=None),
        "iat too old": dpop_proof(es256, "GET", URL, "tok", iat=now - 120),
        "iat in the future": dpop_proof(es256, "GET", URL, "tok", iat=now + 60),
        "iat a string": dpop_proof(es256, "GET", URL, "tok", iat=str(now)),
        "no jti": dpop_proof(es256, "GET", URL, "tok", jti=None),
        "no ath": dpop_proof(es256, "GET", URL, None),
        "ath of another token": dpop_proof(es256, "GET", URL, "other-token"),
        "duplicate JSON member": forge({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}, claims(), es256).replace(
            b64(json.dumps(claims()).encode()), b64(b'{"jti":"a","jti":"b"}')
        ),
        # Members of the wrong JSON type once raised TypeError (unhashable) and answered 500.
        "jwk kty a list": forge({"typ": "dpop+jwt", "alg": "ES256", "jwk": {**jwk, "kty": ["EC"]}}, claims(), es256),
        "jwk crv a list": forge({"typ": "dpop+jwt", "alg": "ES256", "jwk": {**jwk, "crv": ["P-256"]}}, claims(), es256),
        "jwk crv an object": forge({"typ": "dpop+jwt", "alg": "ES256", "jwk": {**jwk, "crv": {}}}, claims(), es256),
    }
    v = verifier()
    got = {name: refused(v, proof) for name, proof in cases.items()}
    assert got["no DPoP header"] == R.DPOP_PROOF_MISSING
    assert all(reason.startswith(R.DPOP_PROOF_INVALID) for name, reason in got.items() if name != "no DPoP header"), got
    assert len(v.replay) == 0  # nothing refused was remembered


def test_a_replayed_proof_is_refused_and_an_algorithm_off_the_list_too(es256: SigningKey) -> None:
    v = verifier()
    proof = dpop_proof(es256, "GET", URL, "tok")
    check(v, proof)
    assert refused(v, proof) == R.DPOP_PROOF_REPLAYED
    assert refused(verifier(algorithms=frozenset({"EdDSA"})), dpop_proof(es256, "GET", URL, "tok")) == (
        f"{R.DPOP_PROOF_INVALID}: alg not allowed"
    )


def test_the_replay_cache_is_bounded_in_time_and_fails_closed_when_full(es256: SigningKey) -> None:
    clock = Clock()
    v = verifier(clock, replay_cache_entries=1024)

    def fresh(key: SigningKey) -> str:
        return dpop_proof(key, "GET", URL, "tok", iat=int(clock.now))

    for _ in range(512):  # one key may take up to half the cache
        check(v, fresh(es256))
    assert refused(v, fresh(es256)) == R.REPLAY_CACHE_FULL
    for i in range(8):  # past half full, each other key a sixteenth
        key = make_key("ES256", f"client-{i}")
        for _ in range(64):
            check(v, fresh(key))
        assert refused(v, fresh(key)) == R.REPLAY_CACHE_FULL
    assert len(v.replay) == 1024
    assert refused(v, fresh(make_key("ES256", "newcomer"))) == R.REPLAY_CACHE_FULL
    clock.now += 60 + 2 * 5 + 1  # every remembered jti is past the window in which its proof was acceptable
    check(v, fresh(es256))
    assert len(v.replay) == 1


def test_one_namespace_keeps_at_most_its_share_once_the_cache_is_half_full() -> None:
    clock = Clock()
    cache = ReplayCache(1024, clock)
    for i in range(100):
        assert cache.check_and_remember("b", f"v{i}", 10) is Seen.NEW
    for i in range(412):
        assert cache.check_and_remember("a", f"v{i}", 70) is Seen.NEW
    assert (len(cache), cache.held("a"), cache.held("b")) == (512, 412, 100)
    assert cache.check_and_remember("a", "more", 70) is Seen.FULL  # half full, and "a" holds over 1024 / 16
    assert cache.check_and_remember("b", "more", 70) is Seen.FULL
    assert cache.check_and_remember("c", "first", 70) is Seen.NEW  # a newcomer still gets its share
    assert cache.check_and_remember("a", "v0", 70) is Seen.REPLAYED  # refusing a repeat never needs room
    clock.now += 11  # "b"'s values expire: the cache is under half full again
    assert cache.check_and_remember("a", "more", 70) is Seen.NEW
    assert cache.held("b") == 0
    clock.now += 70
    assert cache.check_and_remember("a", "later", 70) is Seen.NEW
    assert (len(cache), cache.held("a"), cache.held("c")) == (1, 1, 0)


def test_the_share_is_the_owners_across_all_of_its_namespaces() -> None:
    # One principal with many DPoP keys: values are unique per key, the share is the principal's.
    cache = ReplayCache(1024, Clock())
    mallory = owner_of(ISSUER, "mallory")
    for i in range(512):
        assert cache.check_and_remember(f"dpop:key-{i % 16}", f"v{i}", 70, mallory) is Seen.NEW
    assert cache.held(mallory) == 512 and cache.held("dpop:key-0") == 0
    for key in range(17):
        assert cache.check_and_remember(f"dpop:key-{key}", "more", 70, mallory) is Seen.FULL
    assert cache.check_and_remember("dpop:key-0", "v0", 70, mallory) is Seen.REPLAYED
    assert cache.check_and_remember("dpop:key-0", "v16", 70, owner_of(ISSUER, "bob")) is Seen.REPLAYED  # per key
    bob = owner_of(ISSUER, "bob")
    assert cache.check_and_remember("dpop:key-0", "bob-1", 70, bob) is Seen.NEW  # another principal's share
    assert cache.held(bob) == 1


def test_server_nonces(es256: SigningKey) -> None:
    clock = Clock()
    v = verifier(clock, use_nonce=True, nonce_lifetime_s=300)
    with pytest.raises(NonceRequired):
        check(v, dpop_proof(es256, "GET", URL, "tok"))
    nonce = v.nonces.issue()
    check(v, dpop_proof(es256, "GET", URL, "tok", nonce=nonce))
    with pytest.raises(NonceRequired):  # a nonce this agent did not issue
        check(v, dpop_proof(es256, "GET", URL, "tok", nonce=nonce[:-2] + "AA"))
    foreign = verifier(clock, nonce_secret=b"o" * 32).nonces.issue()
    with pytest.raises(NonceRequired):  # issued with another secret
        check(v, dpop_proof(es256, "GET", URL, "tok", nonce=foreign))
    clock.now += 301
    with pytest.raises(NonceRequired):  # expired
        check(v, dpop_proof(es256, "GET", URL, "tok", nonce=nonce, iat=int(clock.now)))
    shared = b"s" * 32
    a = verifier(clock, use_nonce=True, nonce_secret=shared)
    b = verifier(clock, use_nonce=True, nonce_secret=shared)
    proof = dpop_proof(es256, "GET", URL, "tok", nonce=a.nonces.issue(), iat=int(clock.now))
    check(b, proof)  # replicas sharing nonce_secret_file
