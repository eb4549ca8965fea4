"""Strict JWT access-token verification: explicit algorithms, configured keys only, every claim checked."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from agent import reasons as R
from agent._recall import text_digest

# The checks themselves are Cython when built; their contract is agent/authn/_claims_py.py, which also defines
# UnknownKid (so both twins raise the one class). check_audience, check_auth_time, principal_from_claims and
# time_claim are public here: introspection checks an answer's claims with them.
from agent.authn._claims import check_audience, check_auth_time, principal_from_claims, time_claim, verify_token
from agent.authn._claims_py import UnknownKid
from agent.authn.jwks import KeyStore
from agent.authn.principal import Principal
from agent.config.model import IdentityProvider
from agent.errors import AuthnError

__all__ = [
    "JwtVerifier",
    "UnknownKid",
    "Verified",
    "check_audience",
    "check_auth_time",
    "principal_from_claims",
    "time_claim",
]


class Verified:
    """A cache entry: the principal, and what must still hold for it to be reused without a signature check."""

    __slots__ = ("idp", "keys", "nbf", "principal", "store")

    def __init__(self, principal: Principal, idp: IdentityProvider, store: KeyStore, nbf: float | None) -> None:
        self.principal = principal
        self.idp = idp
        self.store = store
        self.keys = store.keys  # the key set that verified it: a refresh or rotation invalidates the entry
        self.nbf = nbf


class JwtVerifier:
    """Verifies JWT access tokens against the configured identity providers (chosen by exact `iss`)."""

    def __init__(
        self, stores: dict[str, KeyStore], clock: Callable[[], float] = time.time, cache_entries: int = 10_000
    ) -> None:
        self._by_issuer: dict[str, tuple[IdentityProvider, KeyStore]] = {
            s.idp.issuer: (s.idp, s) for s in stores.values()
        }
        self.max_token_bytes = max((s.idp.max_token_bytes for s in stores.values()), default=8192)
        self._clock = clock
        # Verified tokens by SHA-256 of the token: the cache holds no token text, only what was proven.
        # Oldest first in O(1): deleting at the front of a dict makes next(iter()) scan the holes left.
        self._cache: OrderedDict[bytes, Verified] = OrderedDict()
        self.cache_entries = cache_entries
        self.hits = 0
        self.misses = 0

    async def verify(self, token: str) -> Principal:
        try:
            return self.verify_now(token)
        except UnknownKid as e:
            return await self.after_refetch(token, e.store)

    async def after_refetch(self, token: str, store: KeyStore) -> Principal:
        """Verify a token whose kid was unknown, after at most one (shared, rate-limited) refetch."""
        if await store.on_unknown_kid():
            try:
                return self.verify_now(token)
            except UnknownKid:
                pass
        raise AuthnError(R.TOKEN_KID_UNKNOWN)

    def verify_now(self, token: str) -> Principal:
        """Verify with the keys held now; raises UnknownKid when a refetch might help."""
        if len(token) > self.max_token_bytes:
            raise AuthnError(R.TOKEN_TOO_LARGE)
        if self.cache_entries <= 0:  # nothing is kept, so nothing to look up: no hash of the token (~0.6 us)
            self.misses += 1
            return verify_token(token, self._by_issuer, self._clock)[0]
        key = text_digest(token)
        hit = self._cache.get(key)
        if hit is not None:
            if self.reusable(hit):
                self.hits += 1
                return hit.principal
            del self._cache[key]
        self.misses += 1
        principal, idp, store, nbf = verify_token(token, self._by_issuer, self._clock)
        cache = self._cache
        if len(cache) >= self.cache_entries:
            cache.popitem(last=False)  # oldest first
        cache[key] = Verified(principal, idp, store, nbf)
        return principal

    def reusable(self, entry: Verified) -> bool:
        """Whether a verified token may be reused now: time-based claims are checked again on every use,
        and a refreshed or rotated key set invalidates it; the signature is not checked again."""
        now = self._clock()
        leeway = entry.idp.leeway_s
        exp = entry.principal.expires_at
        assert exp is not None
        return (
            entry.store.keys is entry.keys and now < exp + leeway and (entry.nbf is None or now + leeway >= entry.nbf)
        )

    def entry(self, token: str) -> Verified | None:
        """The cache entry of a token verified just now (None when the cache is off or it was evicted)."""
        return self._cache.get(text_digest(token))
