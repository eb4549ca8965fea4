"""Anomaly alerts from the decision stream: repeated authentication failures, one token from many addresses,
signature failures, rate-limit abuse, repeated authorization failures (403s: an authenticated caller probing
what it may not use) and a client seen from a network it has not used lately. Each alert is an `alert` record
in the audit chain, a metric, and a POST to `alerts.webhook` when configured (retried, bounded; never waited on
by a request).

Windows are fixed per key (the count restarts when the window has passed); every table is bounded, and an
alert for the same kind and key is raised at most once per `cooldown_s`.

The networks a client was seen from are this replica's memory, or with `shared_state` every replica's (a Redis
hash per client, kept `days`): the hot path only queues the question, a background task asks Redis, and the
alert is raised from there. Redis away: this replica's memory answers, counted as a fallback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent import reasons as R
from agent.config.model import AlertSettings
from agent.ratelimit.shared import SharedState, Unavailable
from agent.response import SIGNATURE_REASONS

if TYPE_CHECKING:
    from agent.authn.principal import Principal
    from agent.decision import Decision, RequestView

log = logging.getLogger("agent.alerts")

MAX_KEYS = 50_000
MAX_CLIENTS = 50_000  # clients whose networks are remembered (the least recently seen goes first)
MAX_NETWORKS = 64  # networks remembered per client (the least recently seen goes first)
MAX_LISTED = 16  # distinct routes, reasons and subjects an authorization_failures alert lists
SYNC_S = 60.0  # a network known here is told to Redis again (its last-seen time) at most this often
MAX_PENDING = 1024  # questions to Redis waiting for the background task; beyond, this replica's memory answers
AUTHN_FAILURES = frozenset(
    {
        R.TOKEN_MALFORMED,
        R.TOKEN_SIGNATURE_INVALID,
        R.TOKEN_EXPIRED,
        R.TOKEN_ISSUER_UNKNOWN,
        R.TOKEN_AUDIENCE_MISMATCH,
        R.TOKEN_KID_UNKNOWN,
        R.TOKEN_KEY_MISMATCH,
        R.TOKEN_ALG_NOT_ALLOWED,
        R.TOKEN_REVOKED,
        R.CLIENT_REVOKED,
        R.TOKEN_INACTIVE,
        R.DPOP_PROOF_INVALID,
        R.DPOP_PROOF_REPLAYED,
        R.DPOP_KEY_MISMATCH,
        R.DPOP_BOUND_TOKEN_AS_BEARER,
        R.CERTIFICATE_MISMATCH,
        R.CERTIFICATE_MISSING,
    }
)


class _Windows:
    """Counts per key in fixed windows, bounded (the oldest key goes first)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._counts: OrderedDict[str, list[float]] = OrderedDict()

    def add(self, key: str, now: float) -> int:
        entry = self._counts.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            if entry is None and len(self._counts) >= MAX_KEYS:
                self._counts.popitem(last=False)
            entry = [now, 0.0]
            self._counts[key] = entry
        entry[1] += 1
        return int(entry[1])


class _Probe:
    """One principal's 403s in the current window: how many, and (bounded) on which routes, why and as whom."""

    __slots__ = ("count", "reasons", "routes", "start", "subjects")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.routes: dict[str, None] = {}  # insertion-ordered sets
        self.reasons: dict[str, None] = {}
        self.subjects: dict[str, None] = {}


def _note(seen: dict[str, None], value: str | None) -> None:
    if value is not None and len(seen) < MAX_LISTED:
        seen[value] = None


def network_of(source: str, ipv4_prefix: int, ipv6_prefix: int) -> str | None:
    """The network an address belongs to (`10.1.2.0/24`, `2001:db8:1::/48`); an IPv4-mapped IPv6 address is
    its IPv4 address. None for anything that is not an IP address (a Unix socket peer)."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(source.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((ip, prefix), strict=False))


class AlertMonitor:
    def __init__(
        self,
        settings: AlertSettings,
        raise_alert: Callable[[str, dict[str, object]], None],
        shared: SharedState | None = None,
        max_clients: int = MAX_CLIENTS,
        max_networks: int = MAX_NETWORKS,
    ) -> None:
        self.settings = settings
        self._raise = raise_alert
        self._failed = _Windows(settings.failed_authn_window_s)
        self._signatures = _Windows(settings.signature_failures_window_s)
        self._limited = _Windows(settings.rate_limited_window_s)
        # jti -> (window start, the addresses seen in it)
        self._spread: OrderedDict[str, tuple[float, set[str]]] = OrderedDict()
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()
        # principal key (client id, else subject) -> its 403s in the current window
        self._probes: OrderedDict[str, _Probe] = OrderedDict()
        # client id -> network -> [last seen, last told to Redis], both least recently seen first
        self._clients: OrderedDict[str, OrderedDict[str, list[float]]] = OrderedDict()
        self._max_clients = max_clients
        self._max_networks = max_networks
        self._remember_s = settings.new_source_network_days * 86400.0
        self._network_of: dict[str, str] = {}  # source address -> network ("" when not an IP address)
        # Shared memory of networks (Redis), when the policy has shared_state; the server sets it on reloads.
        self.shared = shared
        self._pending: deque[tuple[str, str, str, str, float, int]] = deque()
        self._task: asyncio.Task[None] | None = None

    # Allows answered from wire bytes (agent._recall) skip this listener while the caller's address is the one it
    # last saw for the token, for at most this long: the token-spread windows lose at most a second at an edge.
    recall_resync_s = 1.0

    def recalled(self, counts: dict[str, int], buckets: list[int], latency_sum_us: int) -> None:
        """Allows answered from wire bytes, in summary: nothing to count here (every new address was seen)."""

    def observe(self, view: RequestView, d: Decision, now: float) -> None:
        """Called once per decision, after it is made; cheap unless something is worth counting."""
        s = self.settings
        who = d.principal
        if who is not None and who.client_id is not None and view.source and s.new_source_network:
            self._source_network(who.client_id, who.subject, view.source, now)
        if d.allowed:
            if who is not None and who.jti is not None and view.source:
                self._token_spread(who.jti, view.source, who.subject, now)
            return
        if d.status == 403:
            # Refused by the rules after authenticating; no_route and credential-free deny rules refuse before
            # any credential is read, so they carry no principal and are not counted here.
            if who is not None:
                self._authorization_failure(who, view, d, now)
            return
        reason = d.reason
        who_key = view.source or "-"
        if reason in SIGNATURE_REASONS:
            n = self._signatures.add(who_key, now)
            if n >= s.signature_failures:
                self._fire("signature_failures", who_key, now, {"source": view.source, "count": n, "reason": reason})
        elif reason in AUTHN_FAILURES:
            n = self._failed.add(who_key, now)
            if n >= s.failed_authn:
                self._fire("failed_authentication", who_key, now, {"source": view.source, "count": n,
                                                                    "reason": reason})  # fmt: skip
        elif reason == R.RATE_LIMITED:
            who = d.principal
            key = (who.client_id or who.subject) if who is not None else view.source
            n = self._limited.add(key, now)
            if n >= s.rate_limited:
                detail: dict[str, object] = {"route": d.route, "count": n, "source": view.source}
                if who is not None:
                    detail["subject"] = who.subject
                self._fire("rate_limit_abuse", key, now, detail)

    def _authorization_failure(self, who: Principal, view: RequestView, d: Decision, now: float) -> None:
        key = who.client_id or who.subject
        probe = self._probes.get(key)
        if probe is None or now - probe.start >= self.settings.authorization_failures_window_s:
            if probe is None and len(self._probes) >= MAX_KEYS:
                self._probes.popitem(last=False)
            probe = self._probes[key] = _Probe(now)
        probe.count += 1
        _note(probe.routes, d.route)
        _note(probe.reasons, d.reason)
        _note(probe.subjects, who.subject)
        if probe.count >= self.settings.authorization_failures:
            detail: dict[str, object] = {
                "client_id": who.client_id,
                "subject": who.subject,
                "count": probe.count,
                "routes": list(probe.routes),
                "reasons": list(probe.reasons),
                "subjects": list(probe.subjects),
                "source": view.source,
            }
            self._fire("authorization_failures", key, now, detail)

    def _source_network(self, client: str, subject: str, source: str, now: float) -> None:
        """Learn the client's network; one it has not used within `days` raises new_source_network (its first is
        learned silently: there is nothing to compare it with). With shared state, Redis tells, in the background."""
        net = self._network_of.get(source)
        if net is None:
            s = self.settings
            net = network_of(source, s.new_source_network_ipv4_prefix, s.new_source_network_ipv6_prefix) or ""
            if len(self._network_of) >= 4096:
                self._network_of.clear()
            self._network_of[source] = net
        if not net:
            return
        nets = self._clients.get(client)
        if nets is None:
            if len(self._clients) >= self._max_clients:
                self._clients.popitem(last=False)
            nets = self._clients[client] = OrderedDict()
        else:
            entry = nets.get(net)
            if entry is not None and 0.0 <= now - entry[0] < 1.0:
                return  # seen within the second (the usual case): last-seen times are kept to the second
            self._clients.move_to_end(client)
        horizon = now - self._remember_s
        entry = nets.get(net)
        if entry is not None and entry[0] > horizon:
            entry[0] = now
            nets.move_to_end(net)
            if self.shared is not None and now - entry[1] >= SYNC_S:
                entry[1] = now
                self._ask(client, subject, net, source, now, -1)  # keeps it fresh for the other replicas
            return
        nets.pop(net, None)
        while nets and next(iter(nets.values()))[0] <= horizon:
            nets.popitem(last=False)  # forgotten: not seen within `days`
        known = len(nets)
        if known >= self._max_networks:
            nets.popitem(last=False)
        nets[net] = [now, now]
        if self.shared is not None:
            self._ask(client, subject, net, source, now, known)
        elif known:
            self._new_network(client, subject, net, source, known, now)

    def _ask(self, client: str, subject: str, net: str, source: str, now: float, known: int) -> None:
        """Queue the question for Redis (never awaited here); `known` is this replica's own answer, used when
        Redis cannot be asked (away, the queue full, no running loop)."""
        shared = self.shared
        assert shared is not None
        loop: asyncio.AbstractEventLoop | None = None
        if shared.available() and len(self._pending) < MAX_PENDING:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        if loop is None:
            shared.fell_back("alerts")
            if known > 0:
                self._new_network(client, subject, net, source, known, now)
            return
        self._pending.append((client, subject, net, source, now, known))
        if self._task is None:
            self._task = loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Ask Redis about each queued sighting, one at a time (each within shared_state's timeout)."""
        try:
            while self._pending:
                client, subject, net, source, now, known = self._pending.popleft()
                shared = self.shared
                try:
                    if shared is None:
                        raise Unavailable
                    known = await shared.note_network(client, net, now, self._remember_s, self._max_networks)
                except Unavailable:
                    if shared is not None:
                        shared.fell_back("alerts")
                except Exception:
                    log.exception("new_source_network: the shared memory of networks could not be asked")
                if known > 0:
                    self._new_network(client, subject, net, source, known, now)
        finally:
            self._task = None

    def _new_network(self, client: str, subject: str, net: str, source: str, known: int, now: float) -> None:
        detail: dict[str, object] = {
            "client_id": client,
            "subject": subject,
            "network": net,
            "known_networks": known,
            "source": source,
        }
        self._fire("new_source_network", client, now, detail)

    @property
    def asking(self) -> int:
        """Sightings queued for Redis or being asked about (0: every answer so far is in)."""
        return len(self._pending) + (self._task is not None)

    def retire(self) -> None:
        """Stop asking Redis (a reload replaced this monitor); what is still queued is dropped."""
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        task = self._task
        self.retire()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _token_spread(self, jti: str, source: str, subject: str, now: float) -> None:
        entry = self._spread.get(jti)
        if entry is None or now - entry[0] >= self.settings.token_spread_window_s:
            if entry is None and len(self._spread) >= MAX_KEYS:
                self._spread.popitem(last=False)
            self._spread[jti] = (now, {source})
            return
        seen = entry[1]
        if source in seen:
            return
        if len(seen) < 64:
            seen.add(source)
        if len(seen) >= self.settings.token_spread_addresses:
            detail = {"jti": jti, "subject": subject, "addresses": sorted(seen)[:16], "count": len(seen)}
            self._fire("token_from_many_addresses", jti, now, detail)

    def _fire(self, kind: str, key: str, now: float, detail: dict[str, object]) -> None:
        last = self._last.get((kind, key))
        if last is not None and now - last < self.settings.cooldown_s:
            return
        if len(self._last) >= MAX_KEYS:
            self._last.popitem(last=False)
        self._last[(kind, key)] = now
        self._raise(kind, detail)
