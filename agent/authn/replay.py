"""Replay caches for one-time values (DPoP `jti`, RFC 9421 `nonce`): bounded in entries and in time.

A value is remembered until the moment its proof or signature would be refused as too old anyway, so the
cache only needs to span that window. When it is full of values still inside their window it refuses new
ones (fail closed): forgetting a live value would let its request be replayed.

Values are remembered only for proofs and signatures that verified, so only a holder of a bound key (a DPoP
key a token names, an HMAC client's key) adds any. A value is unique within its namespace (one DPoP key, one
HMAC client), but it counts against its owner's share: the principal the issuer vouched for (issuer and
subject), not the key, since a client makes DPoP keys at will and an issuer binds a token to any key the client
proves. Once the cache is half full, an owner that already holds a sixteenth of it is refused until some of
its values expire, so filling it takes at least nine principals, however many keys each one has.
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


def owner_of(issuer: str, subject: str) -> str:
    """Whose share of the cache a value counts against: one principal, as the issuer named it. Not the
    client_id: a user would get a share per client (clients can be registered at will, RFC 7591), and a token
    without a resource owner already has its client as the subject (RFC 9068 §2.2, introspection's fallback)."""
    return f"{issuer}\0{subject}"  # an issuer is a configured string, never one with a NUL


@dataclass(frozen=True, slots=True)
class Once:
    """A value that may be accepted once within `ttl_s` in `namespace` (a DPoP jti per key, a signature nonce
    per client), the reason code a repeat is refused with, and the owner (`owner_of`) whose share it uses."""

    namespace: str
    value: str
    ttl_s: float
    replayed: str
    owner: str


class _Count:
    """How many live values one owner holds; shared by its heap entries, so expiry can count down."""

    __slots__ = ("n", "owner")

    def __init__(self, owner: bytes) -> None:
        self.owner = owner
        self.n = 0


class ReplayCache:
    SHARE_DIVISOR = 16  # past half full, one owner may hold at most max_entries / 16 values

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._until: dict[bytes, float] = {}
        self._order: list[tuple[float, bytes, _Count]] = []  # a heap by expiry
        self._counts: dict[bytes, _Count] = {}  # live owners only, by a fixed-size digest
        self._share = max(1, max_entries // self.SHARE_DIVISOR)
        self.refused_full = 0

    def __len__(self) -> int:
        return len(self._until)

    def check_and_remember(self, namespace: str, value: str, ttl_s: float, owner: str | None = None) -> Seen:
        """NEW (and remembered for ttl_s) the first time `value` is seen in `namespace`; REPLAYED after; FULL
        when there is no room, or the cache is half full and `owner` (the namespace when None) holds its share."""
        now = self._clock()
        key = hashlib.sha256(f"{namespace}\0{value}".encode()).digest()  # fixed size, no caller text kept
        until = self._until.get(key)
        if until is not None and until > now:
            return Seen.REPLAYED
        self._expire(now)
        size = len(self._until)
        who = _digest(namespace if owner is None else owner)
        count = self._counts.get(who)
        if size >= self.max_entries or (count is not None and count.n >= self._share and 2 * size >= self.max_entries):
            self.refused_full += 1
            return Seen.FULL
        if count is None:
            count = self._counts[who] = _Count(who)
        count.n += 1
        expires = now + ttl_s
        self._until[key] = expires
        heapq.heappush(self._order, (expires, key, count))
        return Seen.NEW

    def held(self, owner: str) -> int:
        """How many live values count against `owner`."""
        count = self._counts.get(_digest(owner))
        return 0 if count is None else count.n

    def require_new(self, once: Once) -> None:
        """Remember `once`; AuthnError with its replay reason when seen before, or 503 when the cache is full
        or, past half full, its owner holds its share."""
        seen = self.check_and_remember(once.namespace, once.value, once.ttl_s, once.owner)
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
                    del self._counts[count.owner]


def _digest(owner: str) -> bytes:
    return hashlib.sha256(owner.encode("utf-8", "surrogatepass")).digest()
