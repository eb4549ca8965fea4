"""Replay caches for one-time values (DPoP `jti`, RFC 9421 `nonce`): bounded in entries and in time.

A value is remembered until the moment its proof or signature would be refused as too old anyway, so the
cache only needs to span that window. When it is full of values still inside their window it refuses new
ones (fail closed): forgetting a live value would let its request be replayed.

Values are remembered only for proofs and signatures that verified, so only a holder of a bound key (a DPoP
key a token names, an HMAC client's key) adds any; and no one key fills the cache: once the cache is half
full, a namespace (one DPoP key, one HMAC client) that already holds a sixteenth of it is refused until some
of its values expire, so filling it takes at least nine keys, each bound to a token by the issuer.
"""

from __future__ import annotations

import hashlib
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from agent import reasons as R
from agent.errors import AuthnError


class Seen(Enum):
    NEW = "new"
    REPLAYED = "replayed"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class Once:
    """A value that may be accepted once within `ttl_s` (a DPoP jti, a signature nonce), and the reason
    code a repeat is refused with."""

    namespace: str
    value: str
    ttl_s: float
    replayed: str


class _Count:
    """How many live values one namespace holds; shared by its heap entries, so expiry can count down."""

    __slots__ = ("n", "namespace")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.n = 0


class ReplayCache:
    SHARE_DIVISOR = 16  # past half full, one namespace may hold at most max_entries / 16 values

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._until: dict[bytes, float] = {}
        self._order: list[tuple[float, bytes, _Count]] = []  # a heap by expiry
        self._counts: dict[str, _Count] = {}  # live namespaces only
        self._share = max(1, max_entries // self.SHARE_DIVISOR)
        self.refused_full = 0

    def __len__(self) -> int:
        return len(self._until)

    def check_and_remember(self, namespace: str, value: str, ttl_s: float) -> Seen:
        """NEW (and remembered for ttl_s) the first time `value` is seen in `namespace`; REPLAYED after."""
        now = self._clock()
        key = hashlib.sha256(f"{namespace}\0{value}".encode()).digest()  # fixed size, no caller text kept
        until = self._until.get(key)
        if until is not None and until > now:
            return Seen.REPLAYED
        self._expire(now)
        size = len(self._until)
        count = self._counts.get(namespace)
        if size >= self.max_entries or (count is not None and count.n >= self._share and 2 * size >= self.max_entries):
            self.refused_full += 1
            return Seen.FULL
        if count is None:
            count = self._counts[namespace] = _Count(namespace)
        count.n += 1
        expires = now + ttl_s
        self._until[key] = expires
        heapq.heappush(self._order, (expires, key, count))
        return Seen.NEW

    def held(self, namespace: str) -> int:
        """How many live values `namespace` holds."""
        count = self._counts.get(namespace)
        return 0 if count is None else count.n

    def require_new(self, once: Once) -> None:
        """Remember `once`; AuthnError with its replay reason when seen before, or 503 when the cache is full."""
        seen = self.check_and_remember(once.namespace, once.value, once.ttl_s)
        if seen is Seen.REPLAYED:
            raise AuthnError(once.replayed)
        if seen is Seen.FULL:
            raise AuthnError(R.REPLAY_CACHE_FULL)

    def _expire(self, now: float) -> None:
        order, until = self._order, self._until
        while order and order[0][0] <= now:
            expires, key, count = heapq.heappop(order)
            if until.get(key) == expires:
                del until[key]
                count.n -= 1
                if count.n == 0:
                    del self._counts[count.namespace]
