"""The types every layer shares: what a transport tells the engine (RequestView), what the engine answers
(Decision), and who may watch decisions (audit sinks and listeners). Nothing here imports another layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

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


class AuditSink(Protocol):
    """Where decisions go to be recorded (agent.audit builds the record). Must not block."""

    def submit(self, view: RequestView, decision: Decision, policy: Policy, now: float) -> None: ...


class DecisionListener(Protocol):
    """Watches finished decisions (decision stats, anomaly alerts). Must not block; errors are logged."""

    def observe(self, view: RequestView, decision: Decision, now: float) -> None: ...
