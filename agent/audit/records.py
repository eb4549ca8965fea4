"""One audit record per decision: who, what, when, outcome, why; never a token, signature or key."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import orjson

from agent.correlation import request_id, trace_id
from agent.timefmt import rfc3339_ms

if TYPE_CHECKING:
    from agent.config.model import Policy
    from agent.decision import Decision, RequestView


def _without_query(path: str) -> str:
    if "?" in path:
        path = path.split("?", 1)[0]
    if "#" in path:
        path = path.split("#", 1)[0]
    return path


def decision_record(view: RequestView, d: Decision, policy: Policy, now: float | None) -> dict[str, object]:
    """The record; `now` None leaves its time empty (a template's: the one-second format cache is not touched)."""
    who = d.principal
    record: dict[str, object] = {
        "type": "decision",
        "time": rfc3339_ms(now) if now is not None else "",
        "decision_id": d.decision_id,
        "request_id": request_id(view.headers),  # Envoy's x-request-id: joins Envoy's and the app's logs
        "trace_id": trace_id(view.headers),  # the caller's W3C/B3 trace
        "service": policy.service,
        "policy_version": policy.version,
        "route": d.route,
        "method": view.method,
        "path": d.audit_path if d.audit_path is not None else _without_query(view.path),
        "params": d.params,
        "source": view.source,
        "subject": who.subject if who else None,
        "client_id": who.client_id if who else None,
        "issuer": who.issuer if who else None,
        "jti": who.jti if who else None,
        "authn": who.method if who else None,
        "decision": d.outcome,
        "reason": d.reason,
        "status": d.status,
        "latency_us": d.latency_us,
    }
    if d.allow_index is not None:  # which alternative of the route's `allow` held
        record["allow_index"] = d.allow_index
    if d.deny_rule is not None:  # the deny rule that refused
        record["deny_rule"] = d.deny_rule
    if d.shadow is not None:  # a rule in shadow mode would have denied this request
        record["shadow"] = {"decision": "deny", "reason": d.shadow}
    return record


# What a recalled allow fills in (agent._recall): everything else of its record is the same on every recall.
_HOLES = ("time", "decision_id", "request_id", "trace_id", "source", "latency_us")
# Marks no request can hold (a path or subject is the caller's text): a NUL and a secret tag of this process (made
# once: getrandom() costs ~27 us in sandboxed kernels, and every new remembered allow makes a template).
_TAG = os.urandom(8).hex()
_MARKS = tuple(f"\x00{_TAG}{i}" for i in range(len(_HOLES)))
_NEEDLES = tuple(b'"\\u0000%s%d"' % (_TAG.encode(), i) for i in range(len(_HOLES)))


def record_template(view: RequestView, d: Decision, policy: Policy) -> tuple[bytes, ...] | None:
    """The JSON record of an allow split around its time, decision_id, request_id, trace_id, source and latency_us
    (seven parts): joined with `"<time>"`, `"<id>"`, the request and trace ids (`"<id>"` or `null`), `"<source>"`
    and the latency's digits, it is what `decision_record` + orjson give. None when it cannot be (a source that
    JSON would escape: those records are the engine's to write)."""
    if orjson.dumps(view.source) != b'"%s"' % view.source.encode():
        return None  # a recall writes the address as it comes: one JSON would escape is the engine's to write
    record = decision_record(view, d, policy, None)
    record.update(zip(_HOLES, _MARKS, strict=True))
    text = orjson.dumps(record)
    parts = []
    for needle in _NEEDLES:
        head, sep, text = text.partition(needle)
        if not sep:
            return None
        parts.append(head)
    parts.append(text)
    return tuple(parts)
