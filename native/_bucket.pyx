# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Token buckets by key in a bounded table: the rate limiter's arithmetic in C (twin: agent/ratelimit/_bucket_py.py).

Same API and behaviour as the twin; tests/unit/test_ratelimit.py runs both.
"""

from collections import OrderedDict


cdef class _B:
    cdef double tokens
    cdef double stamp


cdef class BucketTable:
    """Token buckets by key: `rate` tokens a second, holding at most `burst`; a new key starts full.

    A bucket that has refilled to `burst` is the same as no bucket, so `sweep` drops those (idle eviction)
    and memory follows the keys active in the last burst/rate seconds. Past `max_entries` the oldest
    bucket goes first, full ones before any other.
    """

    cdef object _buckets  # an OrderedDict: the oldest goes first, in O(1)
    cdef readonly double rate
    cdef readonly double burst
    cdef readonly Py_ssize_t max_entries
    cdef double _swept_at

    def __init__(self, double rate, double burst, Py_ssize_t max_entries=100_000):
        if rate <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("rate > 0, burst >= 1 and max_entries >= 1 are required")
        self.rate = rate
        self.burst = burst
        self.max_entries = max_entries
        self._buckets = OrderedDict()
        self._swept_at = -1e300

    def __len__(self):
        return len(self._buckets)

    cpdef double take(self, str key, double now) except? -1e300:
        """Take one token. >= 0: allowed, the tokens left; < 0: refused, minus the seconds until one is back."""
        cdef _B b = self._buckets.get(key)
        cdef double t
        if b is None:
            if len(self._buckets) >= self.max_entries:
                self._make_room(now)
            b = _B.__new__(_B)
            b.tokens = self.burst
            b.stamp = now
            self._buckets[key] = b
        elif now > b.stamp:
            t = b.tokens + (now - b.stamp) * self.rate
            b.tokens = t if t < self.burst else self.burst
            b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return b.tokens
        return -((1.0 - b.tokens) / self.rate)

    cpdef double full_in(self, double remaining):
        """Seconds until a bucket holding `remaining` tokens is full again."""
        return (self.burst - remaining) / self.rate

    cpdef Py_ssize_t sweep(self, double now) except -1:
        """Drop every bucket that has refilled by `now`; returns how many were dropped."""
        cdef list full = []
        cdef _B b
        for k, v in self._buckets.items():
            b = <_B>v
            if b.tokens + (now - b.stamp) * self.rate >= self.burst:
                full.append(k)
        for k in full:
            del self._buckets[k]
        return len(full)

    cdef void _make_room(self, double now) except *:
        # A sweep reads every bucket, so at most one a second: a flood of new keys must not make each
        # new key cost a scan of the whole table.
        if now - self._swept_at >= 1.0:
            self._swept_at = now
            if self.sweep(now):
                return
        self._buckets.popitem(last=False)  # the oldest key: it may come back with a full bucket
