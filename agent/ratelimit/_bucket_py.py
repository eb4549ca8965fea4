"""The pure-Python twin of native/_bucket.pyx: token buckets by key in a bounded table (same API)."""

from __future__ import annotations

from collections import OrderedDict


class BucketTable:
    """Token buckets by key: `rate` tokens a second, holding at most `burst`; a new key starts full.

    A bucket that has refilled to `burst` is the same as no bucket, so `sweep` drops those (idle eviction)
    and memory follows the keys active in the last burst/rate seconds. Past `max_entries` the oldest
    bucket goes first, full ones before any other.
    """

    __slots__ = ("_buckets", "_swept_at", "burst", "max_entries", "rate")

    def __init__(self, rate: float, burst: float, max_entries: int = 100_000) -> None:
        if rate <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("rate > 0, burst >= 1 and max_entries >= 1 are required")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_entries = max_entries
        # Oldest first in O(1): deleting at the front of a dict makes next(iter()) scan the holes left.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._swept_at = float("-inf")

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """Take one token. >= 0: allowed, the tokens left; < 0: refused, minus the seconds until one is back."""
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_entries:
                self._make_room(now)
            b = [self.burst, now]
            self._buckets[key] = b
        elif now > b[1]:
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return b[0]
        return -((1.0 - b[0]) / self.rate)

    def full_in(self, remaining: float) -> float:
        """Seconds until a bucket holding `remaining` tokens is full again."""
        return (self.burst - remaining) / self.rate

    def sweep(self, now: float) -> int:
        """Drop every bucket that has refilled by `now`; returns how many were dropped."""
        burst, rate = self.burst, self.rate
        full = [k for k, (tokens, stamp) in self._buckets.items() if tokens + (now - stamp) * rate >= burst]
        for k in full:
            del self._buckets[k]
        return len(full)

    def _make_room(self, now: float) -> None:
        # A sweep reads every bucket, so at most one a second: a flood of new keys must not make each
        # new key cost a scan of the whole table.
        if now - self._swept_at >= 1.0:
            self._swept_at = now
            if self.sweep(now):
                return
        self._buckets.popitem(last=False)  # the oldest key: it may come back with a full bucket
