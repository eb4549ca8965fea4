"""RFC 9421 HMAC request signatures and RFC 9530 Content-Digest: the RFC's example, interop, every rejection."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from typing import Any

import http_message_signatures as hms
import http_sf
import pytest
from http_sf.innerlist import ser_innerlist
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import reasons as R
from agent.authn.httpsig import HMAC_ISSUER, HmacVerifier, check_content_digest, signature_base, signature_params
from agent.authn.replay import ReplayCache, owner_of
from agent.config.model import HmacClient
from agent.errors import AuthnError
from tests.clock import Clock

# RFC 9421 Appendix B.1.5 and B.2.5
RFC_KEY = base64.b64decode("uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==")
RFC_HEADERS = {
    "host": "example.com",
    "date": "Tue, 20 Apr 2021 02:07:55 GMT",
    "content-type": "application/json",
    "content-digest": "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+"
    "TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
    "content-length": "18",
    "signature-input": 'sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret"',
    "signature": "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:",
}
RFC_BODY = b'{"hello": "world"}'
RFC_BASE = (
    b'"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    b'"@authority": example.com\n'
    b'"content-type": application/json\n'
    b'"@signature-params": ("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret"'
)
KEY = b"k" * 32


def client(name: str = "billing", **over: Any) -> HmacClient:
    fields: dict[str, Any] = {"name": name, "keys": (KEY,), "roles": frozenset({"billing"})}
    fields.update(over)
    return HmacClient(**fields)


def verifier(*clients: HmacClient, clock: Clock | None = None) -> HmacVerifier:
    c = clock or Clock()
    return HmacVerifier(clients or (client(),), ReplayCache(1024, c), c)


def test_rfc9421_b25_signature_base_and_hmac() -> None:
    inputs = http_sf.parse(RFC_HEADERS["signature-input"].encode(), tltype="dictionary")
    base = signature_base(inputs["sig-b25"], "POST", "https", "example.com", "/foo?param=Value&Pet=dog", RFC_HEADERS)
    assert base == RFC_BASE
    sig = http_sf.parse(RFC_HEADERS["signature"].encode(), tltype="dictionary")
    assert hmac.digest(RFC_KEY, base, "sha256") == sig["sig-b25"][0]
    check_content_digest(RFC_HEADERS["content-digest"], RFC_BODY)  # RFC 9530's sha-512 of the body


def test_rfc9421_b25_verifies_for_a_client_that_asks_no_more_than_it_covers() -> None:
    rfc = client(
        "test-shared-secret", keys=(RFC_KEY,), components=("date", "@authority", "content-type"), require_nonce=False
    )
    v = verifier(rfc, clock=Clock(1618884473))
    # Our default rule: a request with a body must cover content-digest; the RFC's example does not.
    with pytest.raises(AuthnError) as e:
        v.verify("POST", "https", "example.com", "/foo?param=Value&Pet=dog", RFC_HEADERS, RFC_BODY)
    assert (e.value.reason, e.value.detail) == (R.SIGNATURE_COMPONENTS_MISSING, "not covered: content-digest")
    who, _ = v.verify("GET", "https", "example.com", "/foo", {**RFC_HEADERS, "content-length": "0"}, b"")
    assert (who.subject, who.method, who.roles) == ("test-shared-secret", "hmac", {"billing"})


class Message:
    """A request as the http-message-signatures package reads and signs it."""

    def __init__(self, method: str, url: str, headers: dict[str, str]) -> None:
        self.method, self.url, self.headers = method, url, headers


def signed(
    method: str = "POST",
    path: str = "/v1/billing/run?x=1",
    body: bytes = b'{"amount": 5}',
    key: bytes = KEY,
    keyid: str = "billing",
    components: tuple[str, ...] = ("@method", "@authority", "@path"),
    nonce: str | None = "n-1",
    created: dt.datetime | None = None,
    expires: dt.datetime | None = None,
) -> tuple[dict[str, str], bytes]:
    headers = {"host": "api.example.test", "content-type": "application/json"}
    if body:
        headers["content-length"] = str(len(body))
    msg = Message(method, f"https://api.example.test{path}", headers)
    signer = hms.HTTPMessageSigner(
        signature_algorithm=hms.algorithms.HMAC_SHA256,
        key_resolver=hms.MappingKeyResolver(public_keys={}, private_keys={keyid: key}),
    )
    signer.sign(
        msg,
        key_id=keyid,
        nonce=nonce,
        created=created,
        expires=expires,
        covered_component_ids=components,
        body=body if body else None,
    )
    return {k.lower(): v for k, v in msg.headers.items()}, body


def verify(
    v: HmacVerifier, headers: dict[str, str], body: bytes, method: str = "POST", path: str = "/v1/billing/run?x=1"
) -> Any:
    return v.verify(method, "https", "api.example.test", path, headers, body)[0]


def refused(v: HmacVerifier, headers: dict[str, str], body: bytes, **kw: Any) -> str:
    with pytest.raises(AuthnError) as e:
        verify(v, headers, body, **kw)
    return e.value.reason


def test_requests_signed_by_http_message_signatures_verify() -> None:
    headers, body = signed()
    assert "content-digest" in headers["signature-input"]  # the package covers the digest it adds
    who = verify(verifier(), headers, body)
    assert (who.subject, who.client_id, who.roles) == ("billing", "billing", {"billing"})
    headers, body = signed(method="GET", body=b"", nonce="n-2")
    assert verify(verifier(), headers, body, method="GET").subject == "billing"


def test_any_active_key_verifies_during_a_rotation() -> None:
    old, new = b"o" * 32, b"n" * 32
    v = verifier(client(keys=(old, new)))
    verify(v, *signed(key=old, nonce="a"))
    verify(v, *signed(key=new, nonce="b"))
    assert refused(v, *signed(key=b"x" * 32, nonce="c")) == R.SIGNATURE_INVALID


def test_each_rejection_rule() -> None:
    now = dt.datetime.now(dt.UTC)
    good_headers, body = signed()
    cases: dict[str, tuple[dict[str, str], bytes, dict[str, Any], str]] = {
        "unsigned": ({"host": "api.example.test"}, b"", {}, R.SIGNATURE_MISSING),
        "keyid of nobody configured": (*signed(keyid="stranger"), {}, R.SIGNATURE_KEY_UNKNOWN),
        "wrong key": (*signed(key=b"w" * 32), {}, R.SIGNATURE_INVALID),
        "@path not covered": (*signed(components=("@method", "@authority")), {}, R.SIGNATURE_COMPONENTS_MISSING),
        "another method": (good_headers, body, {"method": "PUT"}, R.SIGNATURE_INVALID),
        "another path": (good_headers, body, {"path": "/v1/billing/other"}, R.SIGNATURE_INVALID),
        "body changed": (good_headers, b'{"amount": 9}', {}, R.CONTENT_DIGEST_MISMATCH),
        "no nonce": (*signed(nonce=None), {}, R.SIGNATURE_MALFORMED),
        "created too old": (*signed(created=now - dt.timedelta(seconds=400)), {}, R.SIGNATURE_EXPIRED),
        "created in the future": (*signed(created=now + dt.timedelta(seconds=60)), {}, R.SIGNATURE_EXPIRED),
        "expired": (
            *signed(created=now - dt.timedelta(seconds=20), expires=now - dt.timedelta(seconds=10)),
            {},
            R.SIGNATURE_EXPIRED,
        ),
        "not a structured field": ({**good_headers, "signature-input": "sig=(((("}, body, {}, R.SIGNATURE_MALFORMED),
        "truncated by Envoy": ({**good_headers, "x-envoy-auth-partial-body": "true"}, body, {}, R.BODY_UNAVAILABLE),
        "client says not truncated, Envoy says it is": (
            {**good_headers, "x-envoy-auth-partial-body": "false,true"},
            body,
            {},
            R.BODY_UNAVAILABLE,
        ),
        "body not sent by Envoy": (good_headers, b"", {}, R.BODY_UNAVAILABLE),
    }
    got = {}
    for name, (headers, b, kw, _) in cases.items():
        got[name] = refused(verifier(), headers, b, **kw)
    assert got == {name: want for name, (_, _, _, want) in cases.items()}


def test_a_body_needs_content_digest_even_if_the_client_config_forgets_it() -> None:
    headers, body = signed()
    inputs = headers["signature-input"]
    assert refused(
        verifier(), {**headers, "content-digest": "sha-256=:" + base64.b64encode(b"x" * 32).decode() + ":"}, body
    ) in (
        R.SIGNATURE_INVALID,  # content-digest is covered, so editing it breaks the signature first
    )
    # A signer that leaves the digest out is refused before any MAC is computed.
    no_digest = Message(
        "POST", "https://api.example.test/v1/billing/run", {"host": "api.example.test", "content-length": "3"}
    )
    hms.HTTPMessageSigner(
        signature_algorithm=hms.algorithms.HMAC_SHA256,
        key_resolver=hms.MappingKeyResolver(public_keys={}, private_keys={"billing": KEY}),
    ).sign(no_digest, key_id="billing", nonce="z", covered_component_ids=("@method", "@authority", "@path"))
    lowered = {k.lower(): v for k, v in no_digest.headers.items()}
    assert refused(verifier(), lowered, b"abc", path="/v1/billing/run") == R.SIGNATURE_COMPONENTS_MISSING
    assert "content-digest" in inputs


def test_a_nonce_is_accepted_once_per_client() -> None:
    v = verifier(client("a"), client("b"))
    headers, body = signed(keyid="a", nonce="same")
    verify(v, headers, body)
    assert refused(v, headers, body) == R.SIGNATURE_REPLAYED
    verify(v, *signed(keyid="b", nonce="same"))  # another client's namespace
    # Each client is its own principal in the replay cache's shares.
    assert v.replay.held(owner_of(HMAC_ISSUER, "a")) == v.replay.held(owner_of(HMAC_ISSUER, "b")) == 1


def test_content_digest_rules() -> None:
    body = b"hello"
    sha256 = base64.b64encode(hashlib.sha256(body).digest()).decode()
    check_content_digest(f"sha-256=:{sha256}:", body)
    check_content_digest(f"md5=:AAAA:, sha-256=:{sha256}:", body)  # unknown algorithms are skipped
    for bad in (None, "md5=:AAAA:", f"sha-256=:{sha256}:, sha-512=:AAAA:", "sha-256=abc", "sha-256"):
        with pytest.raises(AuthnError) as e:
            check_content_digest(bad, body)
        assert e.value.reason in (R.CONTENT_DIGEST_MISMATCH, R.SIGNATURE_MALFORMED)


sf_keys = st.from_regex(r"[a-z*][a-z0-9_\-.*]{0,8}", fullmatch=True)
sf_values = st.one_of(
    st.integers(-(10**15) + 1, 10**15 - 1),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
    st.booleans(),
    st.binary(max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10), max_size=5),
    st.dictionaries(sf_keys, sf_values, max_size=5),
)
def test_signature_params_serialise_as_http_sf_does(components: list[str], params: dict[str, Any]) -> None:
    member = ([(c, {}) for c in components], params)
    text = ser_innerlist(member)
    assert signature_params(member) == text
    parsed = http_sf.parse(f"s={text}".encode(), tltype="dictionary")["s"]
    assert signature_params(parsed) == text  # and as the parser hands them over
