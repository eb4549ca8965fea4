"""The types every layer shares: what a transport tells the engine (RequestView), what the engine answers
(Decision), and who may watch decisions (audit sinks and listeners). Nothing here imports another layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.authn.principal import Principal
    from agent.config.model import Policy


@dataclass(slots=True)
class RequestView:
    """The few facts of a CheckRequest the engine reads; transports build it, nothing else does."""

    method: str
    path: str
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    scheme: str = ""
    body: bytes = b""  # what Envoy sent of the request body (with_request_body), for Content-Digest
    certificate: str = ""  # the client's leaf certificate, URL-encoded PEM (include_peer_certificate)


@dataclass(slots=True)
class Decision:
    decision_id: str
    allowed: bool
    status: int  # the HTTP status the caller gets on a deny; 200 when allowed
    reason: str
    outcome: str  # "allow", "deny" or "error": errors are told apart from denies everywhere
    route: str | None = None
    principal: Principal | None = None
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    latency_us: int = 0
    shadow: str | None = None  # the reason a rule in shadow mode would have denied this allowed request
    allow_index: int | None = None  # which alternative of the route's `allow` let the request pass (0-based)
    deny_rule: str | None = None  # the name of the deny rule that refused it
    deny_line: int = 0  # and its line: a route's rule and a top-level one may share a name
    params: dict[str, str] | None = None  # the route's path parameters, less those it keeps out of audit records
    audit_path: str | None = None  # the path with those parameters' segments as `{name}`, when the route omits any
    cache_hit: bool = False  # answered from a remembered allow (the engine's memo; agent._recall's are never here)


# Upper bounds in microseconds of the decision-latency histogram (authz_decision_latency_seconds).
LATENCY_BOUNDS_US = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000)


@dataclass(slots=True)
class Recall:
    """A remembered allow, as agent._recall answers it again straight from CheckRequest bytes.

    The engine makes one when an allow depends on nothing but the verified token and the request line (and,
    for the listeners, the caller's address); the table answers the same (Authorization, method, path) while
    everything the engine checks on a recall still holds, and leaves every other request to the engine.
    """

    header: str  # the key: the Authorization header, the method and the path, as Envoy sent them
    method: str
    path: str
    exp: float  # reusable while now < exp + leeway and now + leeway >= nbf ...
    leeway: float
    nbf: float | None
    store: Any  # ... while store.keys is keys (a refresh or rotation ends it) ...
    keys: Any
    revocations: Any  # ... and while revocations.state is revocation_state (any new list ends it)
    revocation_state: Any
    route: str
    subject: str
    client_id: str | None
    remove_authorization: bool  # the route does not forward the token
    # The audit record split around its time, decision_id, request_id, trace_id, source and latency_us
    # (agent.audit), or None when decisions are not audited.
    audit: tuple[bytes, ...] | None
    source: str  # the caller's address when remembered: another one goes to the engine (the alerts see it)
    observed_at: float  # when the engine last saw this caller; after resync_s it sees the next request again
    resync_s: float
    limit: Any = None  # the route's local BucketTable, when it has a rate limit
    limit_key: tuple[str | None, ...] = ()  # the bucket key's parts; None: the request's source address
    limit_name: str = ""  # the RateLimit headers' policy name (a structured-field string)
    limit_policy: str = ""  # the RateLimit-Policy value
    trace_path: str = ""  # the span's url.path: the audit record's path (no query, omitted parameters as `{name}`)


class AuditSink(Protocol):
    """Where decisions go to be recorded (agent.audit builds the record). Must not block."""

    def submit(self, view: RequestView, decision: Decision, policy: Policy, now: float) -> None: ...


class DecisionListener(Protocol):
    """Watches finished decisions (decision stats, anomaly alerts). Must not block; errors are logged."""

    def observe(self, view: RequestView, decision: Decision, now: float) -> None: ...


class RecallListener(DecisionListener, Protocol):
    """A listener that allows answers from agent._recall: it takes them in summary (`recalled`), and needs to see
    a remembered caller only when its address changes or `recall_resync_s` has passed since it last did."""

    recall_resync_s: float

    def recalled(self, counts: dict[str, int], buckets: list[int], latency_sum_us: int) -> None: ...


class WireTraceListener(RecallListener, Protocol):
    """A listener that also wants spans for allows agent._recall answers: the engine hands it each table it makes
    (`wire`), and the listener turns the table's tracing on and drains what it records (agent.tracing)."""

    def wire(self, table: Any) -> None: ...
