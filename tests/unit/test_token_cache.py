"""The verified-token cache: hits skip the signature, never the clock; bounded; keyed by hash; key sets invalidate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent import reasons as R
from agent.authn.jwks import KeyStore
from agent.authn.jwt import JwtVerifier
from agent.config import load_policy
from agent.errors import AuthnError
from tests.clock import Clock
from tests.keys import SigningKey, claims, mint


@pytest.fixture
async def parts(write_policy: Callable[..., Path]) -> tuple[JwtVerifier, KeyStore, Clock]:
    store = KeyStore(load_policy(write_policy()).identity_providers[0])
    assert await store.refresh()
    clock = Clock()
    return JwtVerifier({"corp": store}, clock, cache_entries=3), store, clock


def test_a_repeated_token_is_a_hit(parts: tuple[JwtVerifier, KeyStore, Clock], keys: dict[str, SigningKey]) -> None:
    v, _, _ = parts
    token = mint(keys["ES256"])
    first = v.verify_now(token)
    assert v.verify_now(token) is first
    assert (v.hits, v.misses) == (1, 1)


def test_a_cached_token_still_expires(parts: tuple[JwtVerifier, KeyStore, Clock], keys: dict[str, SigningKey]) -> None:
    v, _, clock = parts
    now = int(clock.now)
    token = mint(keys["ES256"], claims(iat=now, exp=now + 60))
    v.verify_now(token)
    clock.now = now + 60 + 31  # past exp + leeway
    with pytest.raises(AuthnError) as e:
        v.verify_now(token)
    assert e.value.reason == R.TOKEN_EXPIRED


async def test_a_new_key_set_invalidates_entries(
    parts: tuple[JwtVerifier, KeyStore, Clock], keys: dict[str, SigningKey]
) -> None:
    v, store, _ = parts
    token = mint(keys["ES256"])
    v.verify_now(token)
    assert await store.refresh()  # a new KeySet object, as after any refresh or rotation
    v.verify_now(token)
    assert (v.hits, v.misses) == (0, 2)


def test_the_cache_is_bounded_and_holds_no_token_text(
    parts: tuple[JwtVerifier, KeyStore, Clock], keys: dict[str, SigningKey]
) -> None:
    v, _, _ = parts
    tokens = [mint(keys["ES256"], claims(jti=f"j{i}")) for i in range(5)]
    for t in tokens:
        v.verify_now(t)
    assert len(v._cache) == 3
    assert all(isinstance(k, bytes) and len(k) == 32 for k in v._cache)
    for t in tokens:
        assert not any(t.encode() in k for k in v._cache)


def test_a_refused_token_is_never_cached(
    parts: tuple[JwtVerifier, KeyStore, Clock], keys: dict[str, SigningKey]
) -> None:
    v, _, _ = parts
    token = mint(keys["ES256"], claims(aud="elsewhere"))
    for _ in range(2):
        with pytest.raises(AuthnError):
            v.verify_now(token)
    assert len(v._cache) == 0 and v.misses == 2


async def test_a_zero_sized_cache_verifies_every_time(
    write_policy: Callable[..., Path], keys: dict[str, SigningKey]
) -> None:
    store = KeyStore(load_policy(write_policy()).identity_providers[0])
    assert await store.refresh()
    v = JwtVerifier({"corp": store}, cache_entries=0)
    token = mint(keys["ES256"])
    assert v.verify_now(token).subject == v.verify_now(token).subject == "alice"
    assert (v.hits, v.misses, len(v._cache)) == (0, 2, 0)
