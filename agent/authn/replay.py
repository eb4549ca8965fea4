"""Replay caches for one-time values (DPoP `jti`, RFC 9421 `nonce`): bounded in entries and in time.

A value is remembered until the moment its proof or signature would be refused as too old anyway, so the
cache only needs to span that window. When it is full of values still inside their window it refuses new
ones (fail closed): forgetting a live value would let its request be replayed.
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


class ReplayCache:
    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._until: dict[bytes, float] = {}
        self._order: list[tuple[float, bytes]] = []  # a heap by expiry
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
        if len(self._until) >= self.max_entries:
            self.refused_full += 1
            return Seen.FULL
        expires = now + ttl_s
        self._until[key] = expires
        heapq.heappush(self._order, (expires, key))
        return Seen.NEW

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
            expires, key = heapq.heappop(order)
            if until.get(key) == expires:
                del until[key]
