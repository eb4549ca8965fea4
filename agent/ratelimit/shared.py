"""State shared by every replica through Redis: quotas leased in small batches, replay caches, and the networks
each client was seen from (the new_source_network alert).

Nothing here is waited on for longer than `timeout_s`. When Redis is down or slow the callers go on with
local state (each replica's own buckets and replay cache) and Redis is probed again with backoff; each
fallback is counted and the first of a run raises an alert, so a degraded limit is never silent.

Quotas: a replica takes tokens from the shared bucket (a Lua script on Redis's clock) in leases of
`batch` tokens and spends them locally, fetching the next lease before the current one runs out. A lease
not spent within `lease_s` is dropped. So across N replicas the limit can be exceeded by at most N*batch
requests (leases taken but not yet spent when the bucket refills) and undershot by what expired unspent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from agent.authn.replay import Seen
from agent.config.model import RateLimit
from agent.ratelimit._bucket import BucketTable

log = logging.getLogger("agent.shared")

# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst, tokens wanted. Returns {granted, "tokens left", "wait s"}.
# Redis's own clock (TIME) keeps replicas with skewed clocks on one timeline.
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil or ts == nil then tokens = burst; ts = now end
if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate); ts = now end
local grant = math.min(math.floor(tokens), want)
if grant < 0 then grant = 0 end
tokens = tokens - grant
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local wait = 0
if grant == 0 then wait = (1 - tokens) / rate end
return {grant, tostring(tokens), tostring(wait)}
"""

# KEYS[1]: one client's networks (a hash: network -> last seen, seconds); ARGV: network, now, horizon (networks
# last seen at or before it are forgotten), the key's TTL in ms, the most networks kept. Returns -1 when the
# network is known, else how many other networks the client has (0: its first, learned silently). One script,
# so two replicas that see the same new network at once are told "new" once between them.
NETWORK_SCRIPT = """
local net, now, horizon = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local seen = tonumber(redis.call('HGET', KEYS[1], net))
local result = -1
if seen == nil or seen <= horizon then
  local all = redis.call('HGETALL', KEYS[1])
  local live, oldest, oldest_at = 0, nil, nil
  for i = 1, #all, 2 do
    if all[i] ~= net then
      local t = tonumber(all[i + 1])
      if t == nil or t <= horizon then
        redis.call('HDEL', KEYS[1], all[i])
      else
        live = live + 1
        if oldest_at == nil or t < oldest_at then oldest, oldest_at = all[i], t end
      end
    end
  end
  if live >= tonumber(ARGV[5]) and oldest ~= nil then redis.call('HDEL', KEYS[1], oldest) end
  result = live
end
if seen == nil or now > seen then redis.call('HSET', KEYS[1], net, ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return result
"""


class Unavailable(Exception):
    """Redis could not answer in time (down, slow, or in backoff after a failure)."""


class SharedState:
    """One Redis client for the agent; survives policy reloads."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 0.05,
        prefix: str = "authz:",
        alert: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.prefix = prefix
        self._alert = alert
        self._clock = clock
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s * 4, socket_connect_timeout=timeout_s * 4, retry_on_timeout=False
        )
        self._script_sha: str | None = None
        self._network_sha: str | None = None
        self.up = True
        self._retry_at = 0.0
        self._backoff = 0.1
        self.fallbacks: dict[str, int] = {"replay": 0, "quota": 0, "alerts": 0}
        self.errors = 0

    # -- health -------------------------------------------------------------------------------------

    def available(self) -> bool:
        return self.up or self._clock() >= self._retry_at

    async def call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run one Redis operation within the timeout; Unavailable (at once, while backing off) otherwise."""
        if not self.available():
            raise Unavailable
        try:
            result = await asyncio.wait_for(fn(self._redis), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(type(e).__name__)
            raise Unavailable from None
        if not self.up:
            log.warning("shared state %s is back; shared quotas and replay caches resume", self._where)
            self.up = True
            self._backoff = 0.1
        return result

    @property
    def _where(self) -> str:
        # Never the URL itself: it may carry a password.
        return self.url.split("@")[-1].split("?")[0]

    def _failed(self, why: str) -> None:
        self.errors += 1
        self._retry_at = self._clock() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)
        if self.up:
            self.up = False
            log.error("shared state %s unavailable (%s): local limits and replay caches only", self._where, why)
            self.alert("shared_state_unavailable", {"error": why})

    def alert(self, kind: str, detail: dict[str, Any]) -> None:
        if self._alert is not None:
            try:
                self._alert(kind, detail)
            except Exception:
                log.exception("alert %s could not be recorded", kind)

    def fell_back(self, what: str) -> None:
        self.fallbacks[what] += 1

    # -- operations ---------------------------------------------------------------------------------

    async def once(self, namespace: str, value: str, ttl_s: float) -> Seen:
        """NEW the first time any replica sees `value` in `namespace` within ttl_s; REPLAYED after that."""
        key = self.prefix + "once:" + hashlib.sha256(f"{namespace}\0{value}".encode()).hexdigest()
        ms = max(1, math.ceil(ttl_s * 1000))
        fresh = await self.call(lambda r: r.set(key, b"1", nx=True, px=ms))
        return Seen.NEW if fresh else Seen.REPLAYED

    async def lease(self, bucket: str, rate: float, burst: float, want: int) -> tuple[int, float, float]:
        """Up to `want` tokens from the shared bucket: (granted, tokens left there, seconds until one is back)."""
        key = self.prefix + "bucket:" + hashlib.sha256(bucket.encode()).hexdigest()
        args = (repr(rate), repr(burst), str(want))

        async def run(r: Any) -> Any:
            if self._script_sha is None:
                self._script_sha = await r.script_load(LEASE_SCRIPT)
            try:
                return await r.evalsha(self._script_sha, 1, key, *args)
            except NoScriptError:  # Redis restarted and lost its scripts
                self._script_sha = await r.script_load(LEASE_SCRIPT)
                return await r.evalsha(self._script_sha, 1, key, *args)

        granted, left, wait = await self.call(run)
        return int(granted), float(left), float(wait)

    async def note_network(self, client: str, network: str, now: float, remember_s: float, most: int) -> int:
        """Record that `client` was seen from `network` at `now` (wall clock, seconds): -1 when the network was
        already known to any replica within `remember_s`, else how many other networks the client has there."""
        key = self.prefix + "nets:" + hashlib.sha256(client.encode()).hexdigest()
        args = (network, repr(now), repr(now - remember_s), str(max(1000, math.ceil(remember_s * 1000))), str(most))

        async def run(r: Any) -> Any:
            if self._network_sha is None:
                self._network_sha = await r.script_load(NETWORK_SCRIPT)
            try:
                return await r.evalsha(self._network_sha, 1, key, *args)
            except NoScriptError:  # Redis restarted and lost its scripts
                self._network_sha = await r.script_load(NETWORK_SCRIPT)
                return await r.evalsha(self._network_sha, 1, key, *args)

        return int(await self.call(run))

    # -- revocations --------------------------------------------------------------------------------
    # The newest signed revocation list is kept under one key (replaced only by a higher sequence) and
    # announced on a channel, so every replica has it even when its own control-plane stream is late or
    # down. Agents verify the signature before they apply it; Redis is a carrier, never trusted.

    async def put_revocations(self, sequence: int, blob: bytes) -> bool:
        key = self.prefix + "revocations"

        async def run(r: Any) -> Any:
            stored = await r.hget(key, "sequence")
            if stored is not None and int(stored) >= sequence:
                return False
            await r.hset(key, mapping={"sequence": sequence, "blob": blob})
            await r.publish(key, str(sequence))
            return True

        return bool(await self.call(run))

    async def get_revocations(self) -> bytes | None:
        blob = await self.call(lambda r: r.hget(self.prefix + "revocations", "blob"))
        return bytes(blob) if blob is not None else None

    async def watch_revocations(self, on_change: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
        """Call `on_change` whenever another replica announces a newer list (and once at every (re)connect)."""
        backoff = 0.2
        while not stop.is_set():
            pubsub = self._redis.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(self.prefix + "revocations"), self.timeout_s * 20)
                backoff = 0.2
                await on_change()
                while not stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if msg is not None:
                        await on_change()
            except (RedisError, OSError, TimeoutError):
                pass
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        await self._redis.aclose()


@dataclass(slots=True)
class _Lease:
    tokens: int = 0
    expires: float = 0.0
    shared_left: float = 0.0  # what the shared bucket held after the last lease (for RateLimit headers)
    empty_until: float = 0.0  # the shared bucket is known empty until then: refuse without asking
    fetching: asyncio.Task[None] | None = field(default=None, repr=False)


NEED_LEASE = math.inf  # what SharedBuckets.take returns when the caller must await `acquire`


class SharedBuckets:
    """One route's shared limit on this replica: leases from Redis, the local table when Redis is away."""

    def __init__(self, name: str, limit: RateLimit, state: SharedState, local: BucketTable, lease_s: float = 1.0):
        self.name = name
        self.limit = limit
        self.state = state
        self.local = local  # the same limit per replica, while Redis is unavailable
        self.lease_s = lease_s
        self.batch = max(1, min(int(limit.burst), math.ceil(limit.rate / 10)))
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._clock = state._clock

    def take(self, key: str, wall_now: float) -> float:
        """Like BucketTable.take; NEED_LEASE when only a lease from Redis can tell."""
        if not self.state.available():
            self.state.fell_back("quota")
            return self.local.take(key, wall_now)
        now = self._clock()
        lease = self._leases.get(key)
        if lease is None:
            if len(self._leases) >= 100_000:
                self._drop_stale(now)
            lease = self._leases[key] = _Lease()
        if lease.tokens > 0 and lease.expires > now:
            lease.tokens -= 1
            if lease.tokens <= self.batch // 2 and lease.fetching is None:
                self._prefetch(key, lease)
            return lease.shared_left + lease.tokens
        if lease.empty_until > now:
            return -(lease.empty_until - now)
        return NEED_LEASE

    def full_in(self, remaining: float) -> float:
        return (self.limit.burst - remaining) / self.limit.rate

    async def acquire(self, key: str) -> None:
        """Fetch a lease for `key` (joining one in flight); afterwards `take` answers without I/O."""
        lease = self._leases.setdefault(key, _Lease())
        if lease.fetching is None:
            lease.fetching = asyncio.ensure_future(self._fetch(key, lease))
        await asyncio.shield(lease.fetching)

    def _prefetch(self, key: str, lease: _Lease) -> None:
        # Without a running loop (a synchronous caller) the next empty lease waits instead.
        with contextlib.suppress(RuntimeError):
            lease.fetching = asyncio.get_running_loop().create_task(self._fetch(key, lease))

    async def _fetch(self, key: str, lease: _Lease) -> None:
        try:
            granted, left, wait = await self.state.lease(
                f"{self.name}\0{key}", self.limit.rate, self.limit.burst, self.batch
            )
            now = self._clock()
            if lease.expires <= now:
                lease.tokens = 0
            lease.tokens += granted
            lease.expires = now + self.lease_s
            lease.shared_left = left
            lease.empty_until = now + wait if granted == 0 else 0.0
        except Unavailable:
            pass  # take() sees the state unavailable and uses the local table
        finally:
            lease.fetching = None

    def _drop_stale(self, now: float) -> None:
        stale = [k for k, v in self._leases.items() if v.expires <= now and v.empty_until <= now and not v.fetching]
        for k in stale:
            del self._leases[k]
        if len(self._leases) >= 100_000:
            self._leases.popitem(last=False)
