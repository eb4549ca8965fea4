"""The one straight path of stages, read top to bottom in `_decide`:

request shape -> route -> deny rules that need no credentials -> authenticate -> accepted provider -> revoked?
-> bind (proof of possession) -> deny rules on the caller -> allow (alternatives) -> rate limit -> respond.

Every decision is finished in one place (`_finish`): audited, then shown to the listeners the server registers
(decision stats, anomaly alerts). Nothing here imports grpc or agent.audit."""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from agent import reasons as R
from agent._recall import RecallTable, new_decision_id, text_digest
from agent.authn.dpop import DpopVerifier, NonceRequired, normal_uri
from agent.authn.httpsig import HmacVerifier
from agent.authn.introspection import Introspector
from agent.authn.jwks import KeyStore
from agent.authn.jwt import JwtVerifier, UnknownKid, Verified
from agent.authn.mtls import CertificateThumbprints
from agent.authn.principal import Principal, claim_at
from agent.authn.replay import Once, ReplayCache, Seen, owner_of
from agent.authn.revocation import RevocationSet
from agent.config.model import DenyRule, Policy, RateLimit, Route, claim_path
from agent.decision import AuditSink, Decision, DecisionListener, Recall, RequestView
from agent.errors import AuthnError
from agent.policy.conditions import Facts, Refusal, failing
from agent.policy.paths import (
    PARAM,
    Matcher,
    Segment,
    bind,
    double_encoded,
    parse_template,
    request_method_ok,
    split_request_path,
)
from agent.policy.rules import deny_holding, first_allow
from agent.ratelimit._bucket import BucketTable
from agent.ratelimit.shared import NEED_LEASE, SharedBuckets, SharedState, Unavailable
from agent.response import (
    AUTHN_STATUS,
    DPOP_REASONS,
    SIGNATURE_REASONS,
    RateLimitHeaders,
    bearer_challenge,
    challenge,
    problem_body,
)

log = logging.getLogger("agent.engine")

# RFC 6750 §2.1 b64token: what may follow "Bearer ". Anything else is malformed before any parsing.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_NO_PARAMS: dict[str, str] = {}
UPSTREAM_HEADERS = ("x-authz-subject", "x-authz-client-id", "x-authz-route", "x-authz-decision-id")
_OURS = frozenset(UPSTREAM_HEADERS)
# Headers by which some frameworks run another method (Rails, Laravel, Express's method-override, Symfony) or
# route another path (X-Original-URL, X-Rewrite-URL: IIS, older Symfony and Zend) than the request line's: the
# policy judged the request line, so the app never sees these.
OVERRIDE_HEADERS = frozenset(
    ("x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url")
)
LIMIT_KEYS_PER_ROUTE = 100_000  # buckets held per limited route; full (idle) ones are dropped first
_RECALL_KEYS = ("subject", "client_id", "route", "source_ip")  # rate-limit key parts agent._recall can make


# Header names seen, judged once: names repeat across requests; bounded, so random names cost only the check.
_SPOOFABLE: dict[str, bool] = {}


def _spoofable(name: str) -> bool:
    """A client-sent header the app must not see: one naming the agent's own (x-authz-*), or a method override.

    Read as a CGI/WSGI app reads names (`_` as `-`, any case): `x_authz_subject` is HTTP_X_AUTHZ_SUBJECT too.
    Names the agent sets itself are overwritten instead (see `_allow`).
    """
    n = name.lower().replace("_", "-")
    spoof = n.startswith("x-authz-") or n in OVERRIDE_HEADERS
    if len(_SPOOFABLE) < 4096:
        _SPOOFABLE[name] = spoof
    return spoof


def limit_key(limit: RateLimit, route: Route, who: Principal | None, view: RequestView) -> str:
    """The bucket a request draws from: the limit's key parts, joined."""
    parts = []
    for part in limit.key:
        if part == "subject":
            parts.append(who.subject if who is not None else "")
        elif part == "client_id":
            parts.append((who.client_id or "") if who is not None else "")
        elif part == "source_ip":
            parts.append(view.source)
        elif part == "route":
            parts.append(route.name)
        elif part.startswith("claim:"):  # one bucket per value of the claim (a tenant); absent: one bucket
            value = claim_at(who.claims, claim_path(part[6:])) if who is not None else None
            parts.append(
                value
                if isinstance(value, str)
                else ""
                if value is None or isinstance(value, dict | list)
                else str(value)
            )
        else:  # header:NAME
            parts.append(view.headers.get(part[7:], ""))
    return parts[0] if len(parts) == 1 else "\x1f".join(parts)


Step = Callable[[], "Decision"]


class _Pending(Exception):
    """The decision needs a network round trip. `resume` makes it and returns the synchronous step that
    carries on from there, so nothing done before the round trip (a one-time value remembered, a token
    taken from a bucket) is done twice."""

    def __init__(self, resume: Callable[[], Awaitable[Step]]) -> None:
        self.resume = resume


class _Lookup(Exception):
    """Authentication needs a network round trip for the principal (an unknown kid, an opaque token)."""

    def __init__(self, resolve: Callable[[], Awaitable[Principal]]) -> None:
        self.resolve = resolve


MAX_ROUND_TRIPS = 4  # per decision: a key refetch, a shared replay check, a quota lease, and one spare


@dataclass(slots=True)
class _Limiter:
    """A limited route's buckets (local, and shared when the limit is) and its header formatter."""

    limit: RateLimit
    table: BucketTable
    headers: RateLimitHeaders
    shared: SharedBuckets | None = None


@dataclass(slots=True)
class _Remembered:
    """An allow decided for one (Authorization header, method, path): reused while its token is reusable."""

    verified: Verified
    route: Route
    allow_index: int
    params: dict[str, str]
    recheck: tuple[DenyRule, ...]  # deny rules whose outcome may differ per request: judged on every recall
    earlier: tuple[int, ...]  # alternatives before allow_index that may hold on another request: judged first
    index: int  # the route's
    per_source: bool  # the earlier alternatives read nothing per request but the address (agent._recall may answer)


class Engine:
    """Decides requests against one compiled policy. Transports call `check`; nothing here knows grpc."""

    def __init__(
        self,
        policy: Policy,
        stores: dict[str, KeyStore],
        audit: AuditSink | None = None,
        clock: Callable[[], float] = time.time,
        token_cache_entries: int = 10_000,
        replay: ReplayCache | None = None,
        shared: SharedState | None = None,
        revocations: RevocationSet | None = None,
        listeners: Sequence[DecisionListener] = (),
        wire_recall: bool = False,
    ) -> None:
        self.policy = policy
        self.listeners = tuple(listeners)
        # Redis shared by the replicas (policy shared_state): the server passes one that outlives reloads.
        self.shared = shared
        # Revoked tokens, from the control plane: one set the server swaps as lists arrive, across reloads.
        self.revocations = revocations if revocations is not None else RevocationSet()
        self.stores = stores
        self.audit = audit
        self._clock = clock
        self.jwt = JwtVerifier(stores, clock, token_cache_entries)
        # Allows already decided, by SHA-256 of the Authorization header plus method and path (no token text).
        # Only for rules whose outcome depends on nothing but the verified token and the request line; bounded
        # like the token cache, and gone with this engine when the policy changes.
        self._remembered: OrderedDict[tuple[bytes, str, str], _Remembered] = OrderedDict()
        self._remember_max = token_cache_entries
        self._recalled = 0
        # One-time values (DPoP jti, signature nonces) must stay remembered across policy reloads: the
        # server passes the same cache to every engine it builds.
        self.replay = replay if replay is not None else ReplayCache(policy.dpop.replay_cache_entries, clock)
        self.dpop = DpopVerifier(policy.dpop, self.replay, clock)
        self.hmac = HmacVerifier(policy.hmac_clients, self.replay, clock)
        self.certificates = CertificateThumbprints()
        intro = next((i for i in policy.identity_providers if i.introspection is not None), None)
        self.introspector = Introspector(intro, clock) if intro is not None else None
        # One bucket table per limited route; `adopt_limits` carries them over a policy reload.
        self.limiters: dict[str, _Limiter] = {}
        for r in policy.routes:
            if r.rate_limit is None:
                continue
            table = BucketTable(r.rate_limit.rate, r.rate_limit.burst, LIMIT_KEYS_PER_ROUTE)
            headers = RateLimitHeaders(r.name, r.rate_limit.quota, r.rate_limit.window_s)
            pooled = SharedBuckets(r.name, r.rate_limit, shared, table) if shared and r.rate_limit.shared else None
            self.limiters[r.name] = _Limiter(r.rate_limit, table, headers, pooled)
        self._matcher: Matcher[int] = Matcher()
        self._segments: list[tuple[Segment, ...]] = []
        # Per route: deny rules judged before authentication (they read no credentials), after it, and those to
        # judge again when an allow is recalled from memory (they read the clock, headers or the source).
        self._deny_before: list[tuple[DenyRule, ...]] = []
        self._deny_after: list[tuple[DenyRule, ...]] = []
        self._deny_recheck: list[tuple[DenyRule, ...]] = []
        for i, route in enumerate(policy.routes):
            segs = parse_template(route.path)
            self._segments.append(segs)
            self._matcher.add(segs, route.methods, i)
            rules = (*policy.deny, *route.deny)
            self._deny_before.append(tuple(r for r in rules if not r.conditions.credentials))
            self._deny_after.append(tuple(r for r in rules if r.conditions.credentials))
            self._deny_recheck.append(tuple(r for r in rules if r.conditions.per_request))
        self._provider_of = {i.issuer: i.name for i in policy.identity_providers}
        # Routes by name, and whether their path binds parameters: the audit record names them (less the omitted).
        self._route_index = {r.name: i for i, r in enumerate(policy.routes)}
        self._has_params = tuple(any(s.kind == PARAM for s in segs) for segs in self._segments)
        self.recall, self._recall_routes, self._resync_s = self._wire_recall(wire_recall)

    def _wire_recall(self, wanted: bool) -> tuple[RecallTable | None, tuple[bool, ...], float]:
        """The table that answers remembered allows from CheckRequest bytes (agent._recall), for a transport that
        has them: only when every listener takes such answers in summary and the audit sink has a template for
        their records; per route, only when nothing the engine judges on a recall would be left out of it."""
        listeners = self.listeners
        if not wanted or self._remember_max <= 0:
            return None, (), 0.0
        if not all(hasattr(x, "recalled") and hasattr(x, "recall_resync_s") for x in listeners):
            return None, (), 0.0
        resync = min((float(x.recall_resync_s) for x in listeners), default=float("inf"))  # type: ignore[attr-defined]
        queue = None
        if self.audit is not None:
            queue = getattr(self.audit, "recall_queue", None)
            if queue is None or getattr(self.audit, "recall_template", None) is None:
                return None, (), 0.0
        routes = []
        for i, route in enumerate(self.policy.routes):
            limit = route.rate_limit
            keys = () if limit is None else limit.key
            local = limit is None or (not limit.shared and all(k in _RECALL_KEYS or k[:6] == "claim:" for k in keys))
            routes.append(local and all(r.conditions.per_source for r in self._deny_recheck[i]))
        table = RecallTable(self._remember_max, queue, "x-authz-", OVERRIDE_HEADERS)
        for x in listeners:
            wire = getattr(x, "wire", None)
            if wire is not None:
                wire(table)  # a tracer: the table records the spans it answers (agent.tracing)
        return table, tuple(routes), resync

    @property
    def remembered_hits(self) -> int:
        """Decisions answered from a remembered allow, by the engine or from wire bytes."""
        return self._recalled + (self.recall.hits if self.recall is not None else 0)

    def retire(self) -> None:
        """A newer engine decides from now on: this one's table answers nothing more (a transport still holding
        it passes every Check on to the engine), and what it answered is counted."""
        if self.recall is not None:
            self.recall.close()
            self.fold_recalled()

    def fold_recalled(self) -> None:
        """Hand the listeners the allows answered from wire bytes since the last fold (for /metrics)."""
        if self.recall is None:
            return
        counts, buckets, total = self.recall.fold()
        if counts:
            for x in self.listeners:
                x.recalled(counts, buckets, total)  # type: ignore[attr-defined]

    @classmethod
    def for_policy(
        cls,
        policy: Policy,
        audit: AuditSink | None = None,
        clock: Callable[[], float] = time.time,
        token_cache_entries: int = 10_000,
        replay: ReplayCache | None = None,
        shared: SharedState | None = None,
        revocations: RevocationSet | None = None,
        listeners: Sequence[DecisionListener] = (),
        wire_recall: bool = False,
        stores: dict[str, KeyStore] | None = None,
    ) -> Engine:
        """An engine whose providers' keys come from their configured sources, or from `stores` (a bench's)."""
        if stores is None:
            stores = {
                i.name: KeyStore(i) for i in policy.identity_providers if i.jwks_uri or i.jwks_file or i.discovery
            }
        return cls(
            policy, stores, audit, clock, token_cache_entries, replay, shared, revocations, listeners, wire_recall
        )

    def adopt_limits(self, old: Engine) -> None:
        """Keep the buckets of routes whose limit is unchanged, so a policy reload never resets a quota."""
        for name, theirs in old.limiters.items():
            mine = self.limiters.get(name)
            if mine is not None and mine.limit == theirs.limit:
                mine.table = theirs.table
                if mine.shared is not None and theirs.shared is not None and theirs.shared.state is mine.shared.state:
                    mine.shared = theirs.shared
                elif mine.shared is not None:
                    mine.shared.local = theirs.table

    def sweep_limits(self) -> int:
        """Drop the buckets that have refilled (idle keys); returns how many."""
        now = self._clock()
        return sum(lim.table.sweep(now) for lim in self.limiters.values())

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.stores.values())

    async def close(self) -> None:
        for s in self.stores.values():
            await s.close()
        if self.introspector is not None:
            await self.introspector.close()

    def decide(self, view: RequestView, trace: list[str] | None = None) -> Decision | Awaitable[Decision]:
        """The decision, or an awaitable of it when it needs a network round trip.

        The hot path: without I/O (a cached token, local buckets) the Decision comes back at once; an
        unknown kid, an opaque token not in the introspection cache, a replay check or a quota lease in
        Redis give a coroutine that finishes the same decision (nothing is decided twice).
        """
        start = time.perf_counter_ns()
        decision_id = new_decision_id()
        try:
            decision = self._recall(view, decision_id) if trace is None else None
            if decision is None:
                decision = self._decide(view, decision_id, trace, None)
        except _Pending as pending:
            return self._settle(view, decision_id, trace, pending, start)
        except Exception as e:  # noqa: BLE001 - the engine never raises: any bug is a logged, audited deny
            decision = self._internal_error(decision_id, e, trace)
        return self._finish(view, decision, start)

    async def check(self, view: RequestView, trace: list[str] | None = None) -> Decision:
        """Decide one request. Never raises: an unexpected error is a deny with reason internal_error."""
        d = self.decide(view, trace)
        return d if isinstance(d, Decision) else await d

    async def _settle(
        self, view: RequestView, decision_id: str, trace: list[str] | None, pending: _Pending, start: int
    ) -> Decision:
        try:
            for _ in range(MAX_ROUND_TRIPS):
                step = await pending.resume()
                try:
                    decision = step()
                    break
                except _Pending as more:
                    pending = more
            else:
                raise RuntimeError("a decision needed more network round trips than allowed")
        except Exception as e:  # noqa: BLE001 - the engine never raises: any bug is a logged, audited deny
            decision = self._internal_error(decision_id, e, trace)
        return self._finish(view, decision, start)

    def _recall(self, view: RequestView, decision_id: str) -> Decision | None:
        """The hot path for a repeated request: the same token, method and path allowed before."""
        header = view.headers.get("authorization")
        if header is None or not self._remembered:
            return None
        key = (text_digest(header), view.method, view.path)
        hit = self._remembered.get(key)
        if hit is None:
            return None
        if not self.jwt.reusable(hit.verified) or self.revocations.revoked(hit.verified.principal):
            del self._remembered[key]
            return None
        principal = hit.verified.principal
        allow_index = hit.allow_index
        if hit.recheck or hit.earlier:
            facts = Facts(view, principal, hit.params, self._clock())
            rule = deny_holding(hit.recheck, facts, None) if hit.recheck else None
            if rule is not None:
                return self._denied_by(decision_id, rule, hit.route, principal)
            # The allow stands (its alternative reads nothing per request); an earlier one may hold this time,
            # and the decision names the first that holds, as the full path would.
            allow_index = next((i for i in hit.earlier if not failing(hit.route.allow[i], facts)), allow_index)
        self._recalled += 1
        decision = self._allow(decision_id, hit.route, principal, view, R.ALLOWED, allow_index)
        decision.cache_hit = True
        recall = self.recall
        if recall is not None and decision.allowed and hit.per_source and self._recall_routes[hit.index]:
            # Seen here (another address, a new revocation list, the listeners' resync): the table answers it again,
            # for this address (an earlier alternative that reads the address may name another allow_index).
            state = self.revocations.state
            if hit.earlier or not recall.touch(header, view.method, view.path, view.source, self._clock(), state):
                self._recall_put(view, hit.verified, hit.route, allow_index, header)
        return decision

    def _remember(
        self,
        view: RequestView,
        index: int,
        route: Route,
        principal: Principal,
        allow_index: int,
        params: dict[str, str],
    ) -> None:
        if (
            self._remember_max <= 0
            or principal.method != "jwt"
            or principal.cnf_jkt is not None  # every request needs a fresh proof
            or principal.cnf_x5t is not None  # and its own certificate
            or "hmac" in route.authn  # a signed request on it is judged by its signature, which recall never reads
            or route.allow[allow_index].per_request
        ):
            return  # the outcome depends on the clock, the request, or a credential that is not a cached JWT
        header = view.headers.get("authorization")
        _, _, token = (header or "").partition(" ")
        verified = self.jwt.entry(token)
        if header is None or verified is None or verified.principal is not principal:
            return
        memo = self._remembered
        if len(memo) >= self._remember_max:
            memo.popitem(last=False)  # oldest first
        key = (text_digest(header), view.method, view.path)
        earlier = tuple(i for i in range(allow_index) if route.allow[i].per_request)
        per_source = all(route.allow[i].per_source for i in earlier)
        memo[key] = _Remembered(
            verified, route, allow_index, params, self._deny_recheck[index], earlier, index, per_source
        )
        if self.recall is not None and per_source and self._recall_routes[index]:
            self._recall_put(view, verified, route, allow_index, header)

    def _recall_put(self, view: RequestView, verified: Verified, route: Route, allow_index: int, header: str) -> None:
        """Hand the wire-bytes table what it needs to answer this (Authorization, method, path) again."""
        assert self.recall is not None
        who = verified.principal
        template = None
        sample = Decision("", True, 200, R.ALLOWED, "allow", route.name, who)
        sample.allow_index = allow_index
        self.audit_params(sample, view.path)  # the recorded path, the span's too
        if self.audit is not None:
            template = self.audit.recall_template(view, sample, self.policy)  # type: ignore[attr-defined]
            if template is None:
                return  # an audited decision is never answered without its record
        assert who.expires_at is not None
        spec = Recall(
            header=header,
            method=view.method,
            path=view.path,
            exp=who.expires_at,
            leeway=verified.idp.leeway_s,
            nbf=verified.nbf,
            store=verified.store,
            keys=verified.keys,
            revocations=self.revocations,
            revocation_state=self.revocations.state,
            route=route.name,
            subject=who.subject,
            client_id=who.client_id,
            remove_authorization=not route.forward_token,
            audit=template,
            source=view.source,
            observed_at=self._clock(),
            resync_s=self._resync_s,
            trace_path=sample.audit_path or view.path.split("?", 1)[0].split("#", 1)[0],
        )
        limited = self.limiters.get(route.name) if route.rate_limit is not None else None
        if limited is not None:
            spec.limit = limited.table
            spec.limit_key = tuple(
                None if part == "source_ip" else limit_key(replace(limited.limit, key=(part,)), route, who, view)
                for part in limited.limit.key
            )
            spec.limit_policy = limited.headers.policy[1]
            spec.limit_name = limited.headers.name
        self.recall.put(spec)

    def _internal_error(self, decision_id: str, e: Exception, trace: list[str] | None) -> Decision:
        # Only the exception's type: its text could carry request material.
        log.exception("internal error deciding %s (%s)", decision_id, type(e).__name__)
        if trace is not None:
            trace.append(f"internal error: {type(e).__name__}")
        return self._deny(decision_id, 500, R.INTERNAL_ERROR, None, None)

    def audit_params(self, decision: Decision, path: str) -> None:
        """The decision's path parameters for its audit record, less those its route keeps out, whose segments the
        recorded path shows as `{name}` instead."""
        index = self._route_index.get(decision.route) if decision.route is not None else None
        if index is None:
            return
        if not self._has_params[index]:
            decision.params = {}
            return
        segs = split_request_path(path)
        if segs is None:
            decision.params = {}
            return
        template = self._segments[index]
        omit = self.policy.routes[index].audit_omit_params
        decision.params = {k: v for k, v in bind(template, segs).items() if k not in omit}
        if omit:
            raw = path.split("?", 1)[0].split("#", 1)[0].split("/")[1:]
            for i, seg in enumerate(template):
                if seg.kind == PARAM and seg.value in omit and i < len(raw):
                    raw[i] = "{" + seg.value + "}"
            decision.audit_path = "/" + "/".join(raw)

    def _finish(self, view: RequestView, decision: Decision, start: int) -> Decision:
        self.audit_params(decision, view.path)
        decision.latency_us = (time.perf_counter_ns() - start) // 1000
        now = self._clock()
        if self.audit is not None:
            try:
                self.audit.submit(view, decision, self.policy, now)
            except Exception:
                log.exception("audit record for %s could not be queued", decision.decision_id)
        for listener in self.listeners:
            try:
                listener.observe(view, decision, now)
            except Exception:
                log.exception("%s failed on %s", type(listener).__name__, decision.decision_id)
        return decision

    def _decide(
        self, view: RequestView, decision_id: str, trace: list[str] | None, resolved: Principal | AuthnError | None
    ) -> Decision:
        if not self.policy.routes:  # no policy yet (a control plane not reached): fail closed, as an error
            return self._deny(decision_id, 503, R.POLICY_UNAVAILABLE, None, None)
        if not request_method_ok(view.method):
            # `delete` would fall to an any-method route here, and Django or Werkzeug would upper-case it.
            if trace is not None:
                trace.append(f"method {view.method!r} is not an upper-case RFC 9110 token")
            return self._deny(decision_id, 400, R.METHOD_INVALID, None, None)
        segs = split_request_path(view.path)
        if segs is None:
            if trace is not None:
                trace.append("path is not in normal form (dot segments, '//', encoded '/', bad escapes)")
            return self._deny(decision_id, 400, R.MALFORMED_REQUEST, None, None)
        index = self._matcher.match(segs, view.method)
        if index is None:
            if trace is not None:
                trace.append(f"no route matches {view.method} {view.path.split('?')[0]}; default: deny")
            return self._deny(decision_id, 403, R.NO_ROUTE, None, None)
        route = self.policy.routes[index]
        if trace is not None:
            methods = ",".join(sorted(route.methods)) if route.methods else "any method"
            trace.append(f"route {route.name!r} (line {route.line}) matches {methods} {route.path}")
        if "%25" in view.path and not route.allow_double_encoded_path and double_encoded(view.path):
            if trace is not None:
                trace.append("path holds a double-encoded escape (%25XX); the route does not allow_double_encoded_path")
            return self._deny(decision_id, 400, R.PATH_DOUBLE_ENCODED, route, None)
        before = self._deny_before[index]
        if before:
            facts = Facts(view, None, bind(self._segments[index], segs), self._clock(), segs)
            rule = deny_holding(before, facts, trace)
            if rule is not None:
                return self._denied_by(decision_id, rule, route, None)
        if route.public:
            if trace is not None:
                trace.append("route is public: no credentials needed")
            return self._allow(decision_id, route, None, view, R.PUBLIC)
        once: Once | None = None
        try:
            if resolved is None:
                try:
                    principal, once = self._authenticate(view, route)
                except _Lookup as lookup:
                    raise self._after_lookup(lookup, view, decision_id, trace) from None
            elif isinstance(resolved, AuthnError):
                raise resolved
            else:
                principal = resolved
            if (
                route.providers is not None
                and principal.method != "hmac"
                and self._provider_of.get(principal.issuer) not in route.providers
            ):
                accepted = ", ".join(sorted(route.providers))
                raise AuthnError(R.TOKEN_ISSUER_NOT_ACCEPTED, f"the route takes tokens from {accepted}")
            revoked = self.revocations.reason(principal)
            if revoked is not None:
                raise AuthnError(revoked)
            if principal.method != "hmac":
                once = self._check_binding(view, route, principal, trace)
        except AuthnError as e:
            if trace is not None:
                trace.append(f"authentication failed: {e.reason}" + (f" ({e.detail})" if e.detail else ""))
            return self._deny_authn(decision_id, e, route, view)
        remember = trace is None and resolved is None
        if once is not None and self.shared is not None:
            raise self._shared_once(once, view, decision_id, trace, index, segs, route, principal)
        return self._authorize(view, decision_id, trace, index, segs, route, principal, remember)

    def _shared_once(
        self,
        once: Once,
        view: RequestView,
        decision_id: str,
        trace: list[str] | None,
        index: int,
        segs: list[str],
        route: Route,
        principal: Principal,
    ) -> _Pending:
        """A one-time value this agent has not seen must also be new to every other replica (Redis)."""
        shared = self.shared
        assert shared is not None

        async def resume() -> Step:
            try:
                seen = await shared.once(once.namespace, once.value, once.ttl_s)
            except Unavailable:
                shared.fell_back("replay")  # this agent's own cache has passed it; others may not have
                seen = Seen.NEW
            if seen is Seen.REPLAYED:
                if trace is not None:
                    trace.append(f"authentication failed: {once.replayed} (seen by another replica)")
                return lambda: self._deny_authn(decision_id, AuthnError(once.replayed), route, view)
            return lambda: self._authorize(view, decision_id, trace, index, segs, route, principal, False)

        return _Pending(resume)

    def _authorize(
        self,
        view: RequestView,
        decision_id: str,
        trace: list[str] | None,
        index: int,
        segs: list[str],
        route: Route,
        principal: Principal,
        remember: bool,
    ) -> Decision:
        """The caller is known: its deny rules, then the route's alternatives; the rate limit in `_allow`."""
        if trace is not None:
            p = principal
            trace.append(
                f"authenticated by {p.method}: subject {p.subject!r}, issuer {p.issuer!r}, "
                f"scopes {sorted(p.scopes)}, roles {sorted(p.roles)}"
            )
        params = bind(self._segments[index], segs)
        facts = Facts(view, principal, params, self._clock(), segs)
        after = self._deny_after[index]
        if after:
            rule = deny_holding(after, facts, trace)
            if rule is not None:
                return self._denied_by(decision_id, rule, route, principal)
        allow_index, refusal = first_allow(route.allow, facts, trace)
        if refusal is not None:
            if route.mode == "shadow":
                # A rule being tried out: recorded as the deny it would be, never enforced.
                if trace is not None:
                    trace.append("the rule is in shadow mode: the request passes, audited as would-deny")
                decision = self._allow(decision_id, route, principal, view, R.ALLOWED)
                if decision.allowed:
                    decision.shadow = refusal.reason
                return decision
            return self._deny_rule(decision_id, refusal, route, principal)
        assert allow_index is not None
        if remember:
            self._remember(view, index, route, principal, allow_index, params)
        return self._allow(decision_id, route, principal, view, R.ALLOWED, allow_index)

    def _authenticate(self, view: RequestView, route: Route) -> tuple[Principal, Once | None]:
        """The caller's identity from what is known now; raises _Lookup when only I/O can tell."""
        if "hmac" in route.authn and ("jwt" not in route.authn or "signature-input" in view.headers):
            # A signed request on a route that takes signatures is judged by its signature alone.
            return self.hmac.verify(view.method, view.scheme, view.host, view.path, view.headers, view.body)
        header = view.headers.get("authorization")
        if not header:
            raise AuthnError(R.TOKEN_MISSING)
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("bearer", "dpop"):
            raise AuthnError(R.AUTH_SCHEME_UNSUPPORTED)
        if token.count(".") == 2:
            # A JWT's parts are decoded as strict base64url, which refuses every character b64token would.
            try:
                return self.jwt.verify_now(token), None
            except UnknownKid as e:
                store = e.store
                raise _Lookup(lambda: self.jwt.after_refetch(token, store)) from None
        if _B64TOKEN.fullmatch(token) is None:
            raise AuthnError(R.TOKEN_MALFORMED, "not an RFC 6750 b64token")
        introspector = self.introspector
        # Anything that is not a three-part JWT is opaque (some issuers' opaque tokens contain dots).
        if introspector is not None:
            if route.providers is not None and introspector.idp.name not in route.providers:
                # Judged before the token is sent anywhere: only the introspecting provider could answer for it.
                raise AuthnError(R.TOKEN_ISSUER_NOT_ACCEPTED, f"an opaque token is {introspector.idp.name}'s")
            if len(token) > self.jwt.max_token_bytes:
                raise AuthnError(R.TOKEN_TOO_LARGE)
            cached = introspector.cached(token)
            if cached is not None:
                return cached, None
            raise _Lookup(lambda: introspector.introspect(token))
        raise AuthnError(R.TOKEN_MALFORMED, "not a JWT and no introspection endpoint is configured")

    def _after_lookup(self, lookup: _Lookup, view: RequestView, decision_id: str, trace: list[str] | None) -> _Pending:
        # Nothing one-time happens before authentication, so the decision starts over with the principal.
        mark = len(trace) if trace is not None else 0

        async def resume() -> Step:
            try:
                outcome: Principal | AuthnError = await lookup.resolve()
            except AuthnError as e:
                outcome = e
            if trace is not None:
                del trace[mark:]
            return lambda: self._decide(view, decision_id, trace, outcome)

        return _Pending(resume)

    def _check_binding(self, view: RequestView, route: Route, who: Principal, trace: list[str] | None) -> Once | None:
        """Proof of possession: a bound token only from its holder (every route); `bind:` routes only bound."""
        scheme, _, token = view.headers.get("authorization", "").partition(" ")
        dpop_scheme = scheme.lower() == "dpop"
        once = None
        if route.bind == "dpop" and who.cnf_jkt is None:
            raise AuthnError(R.TOKEN_NOT_BOUND, "the route needs a DPoP-bound token (cnf.jkt)")
        if route.bind == "mtls" and who.cnf_x5t is None:
            raise AuthnError(R.TOKEN_NOT_BOUND, "the route needs a certificate-bound token (cnf.x5t#S256)")
        if who.cnf_jkt is not None:
            if not dpop_scheme:
                raise AuthnError(R.DPOP_BOUND_TOKEN_AS_BEARER, "a DPoP-bound token needs the DPoP scheme")
            htu = normal_uri(view.scheme, view.host, view.path)
            # The bound key is checked first, inside: a proof by another key is refused before its signature
            # is checked or its jti remembered. The jti counts against the principal's share of the replay
            # cache, not the key's: a client makes keys at will and the issuer binds a token to any of them.
            owner = owner_of(who.issuer, who.subject)
            once = self.dpop.verify(view.headers.get("dpop"), view.method, htu, token, who.cnf_jkt, owner)
            if trace is not None:
                trace.append("DPoP proof valid and signed by the key the token is bound to")
        elif dpop_scheme:
            raise AuthnError(R.TOKEN_NOT_BOUND, "the DPoP scheme needs a DPoP-bound token (cnf.jkt)")
        if who.cnf_x5t is not None:
            presented = self.certificates.of(view.certificate)
            if presented is None:
                raise AuthnError(R.CERTIFICATE_MISSING, "the token is bound to a client certificate")
            if not hmac.compare_digest(presented.encode(), who.cnf_x5t.encode()):
                raise AuthnError(R.CERTIFICATE_MISMATCH)
            if trace is not None:
                trace.append("client certificate matches the token's cnf.x5t#S256")
        return once

    def _allow(
        self,
        did: str,
        route: Route,
        who: Principal | None,
        view: RequestView,
        reason: str,
        allow_index: int | None = None,
    ) -> Decision:
        """Allowed by the rules: the route's rate limit, if any, has the last word."""
        response_headers: list[tuple[str, str]] = []
        limited = self.limiters.get(route.name) if route.rate_limit is not None else None
        if limited is not None:
            key = limit_key(limited.limit, route, who, view)
            buckets: BucketTable | SharedBuckets = limited.shared or limited.table
            left = buckets.take(key, self._clock())
            if left == NEED_LEASE:
                pooled = limited.shared
                assert pooled is not None

                async def resume() -> Step:
                    await pooled.acquire(key)
                    return lambda: self._allow(did, route, who, view, reason, allow_index)

                raise _Pending(resume)
            if left < 0:
                wait = -left
                headers = [("retry-after", str(max(1, math.ceil(wait)))), *limited.headers.state(0, wait)]
                return self._deny(did, 429, R.RATE_LIMITED, route, who, headers)
            response_headers = limited.headers.state(left, buckets.full_in(left))
        add = [("x-authz-route", route.name), ("x-authz-decision-id", did)]
        if who is not None:
            add.append(("x-authz-subject", who.subject))
            if who.client_id is not None:
                add.append(("x-authz-client-id", who.client_id))
        ours = _OURS if len(add) == 4 else frozenset(k for k, _ in add)
        remove = []
        for h in view.headers:
            spoof = _SPOOFABLE.get(h)
            if spoof is None:
                spoof = _spoofable(h)
            if spoof and h.lower() not in ours:
                remove.append(h)
        if not route.forward_token and "authorization" in view.headers:
            remove.append("authorization")
        decision = Decision(did, True, 200, reason, "allow", route.name, who, add, remove, response_headers)
        decision.allow_index = allow_index
        return decision

    def _deny(
        self,
        did: str,
        status: int,
        reason: str,
        route: Route | None,
        who: Principal | None,
        headers: list[tuple[str, str]] | None = None,
    ) -> Decision:
        outcome = "error" if status >= 500 else "deny"
        hdrs = [("content-type", "application/problem+json"), *(headers or [])]
        if status == 503:
            hdrs.append(("retry-after", "1"))
        return Decision(
            did,
            False,
            status,
            reason,
            outcome,
            route.name if route else None,
            who,
            response_headers=hdrs,
            body=problem_body(status, reason, did),
        )

    def _deny_authn(self, did: str, e: AuthnError, route: Route, view: RequestView) -> Decision:
        reason = e.reason
        status = AUTHN_STATUS.get(reason, 401)
        if status != 401:
            return self._deny(did, status, reason, route, None)
        headers: list[tuple[str, str]] = []
        no_credentials = reason in (R.TOKEN_MISSING, R.AUTH_SCHEME_UNSUPPORTED, R.SIGNATURE_MISSING)
        # A revoked HMAC client is told in the scheme it signed with (the route judged its signature).
        signed = "hmac" in route.authn and ("jwt" not in route.authn or "signature-input" in view.headers)
        if (
            reason in SIGNATURE_REASONS
            or (reason == R.TOKEN_MISSING and "jwt" not in route.authn)
            or (reason == R.CLIENT_REVOKED and signed)
        ):
            scheme = "Signature"
            error: str | None = None if reason == R.SIGNATURE_MISSING else "invalid_signature"
        elif (
            route.bind == "dpop"
            or reason in DPOP_REASONS
            or view.headers.get("authorization", "")[:5].lower() == "dpop "
        ):
            scheme = "DPoP"
            error = None if no_credentials else "invalid_dpop_proof" if reason in DPOP_REASONS else "invalid_token"
            if isinstance(e, NonceRequired):
                error = "use_dpop_nonce"
                headers.append(("dpop-nonce", self.dpop.nonces.issue()))
        else:
            scheme = "Bearer"
            error = None if no_credentials else "invalid_token"
        algs = self.dpop.algs_challenge if scheme == "DPoP" else None
        value = challenge(scheme, error, None if no_credentials else reason, algs=algs)
        return self._deny(did, 401, reason, route, None, [("www-authenticate", value), *headers])

    def _deny_rule(self, did: str, refusal: Refusal, route: Route, who: Principal) -> Decision:
        headers: list[tuple[str, str]] = []
        if refusal.status == 401:
            challenge = bearer_challenge(
                "insufficient_user_authentication",
                refusal.reason,
                acr_values=refusal.acr_values,
                max_age=refusal.max_age,
            )
            headers.append(("www-authenticate", challenge))
        elif refusal.missing_scopes:
            challenge = bearer_challenge("insufficient_scope", refusal.reason, scope=refusal.missing_scopes)
            headers.append(("www-authenticate", challenge))
        return self._deny(did, refusal.status, refusal.reason, route, who, headers)

    def _denied_by(self, did: str, rule: DenyRule, route: Route, who: Principal | None) -> Decision:
        decision = self._deny(did, 403, R.DENIED_BY_RULE, route, who)
        decision.deny_rule = rule.name
        decision.deny_line = rule.line
        return decision
