"""What joins a decision to the rest of the system: the request id Envoy set (`x-request-id`) and the trace the
caller is part of (W3C `traceparent`, else B3 `x-b3-traceid` or `b3`). Both come from the request, so both are
checked to a strict shape: anything else is recorded as null, never as the caller's text."""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["Parent", "parent", "request_id", "trace_id"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:+/=-]{1,128}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_B3_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_B3_SPAN = re.compile(r"[0-9a-f]{16}")
_B3_SAMPLED = frozenset(("1", "true", "True", "d"))
_ZERO = "0" * 32
_ZERO_SPAN = "0" * 16

# The caller's span, as a child's parent: (trace id, span id, trace flags); bit 0 of the flags is "sampled".
Parent = tuple[str, str, int]


def request_id(headers: Mapping[str, str]) -> str | None:
    """Envoy's x-request-id (a UUID), when it is a plain token of at most 128 characters."""
    value = headers.get("x-request-id")
    return value if value is not None and _REQUEST_ID.fullmatch(value) else None


def trace_id(headers: Mapping[str, str]) -> str | None:
    """The 32-hex trace id of the caller's trace: W3C traceparent first, then B3 (a 64-bit id padded to 128)."""
    parent = headers.get("traceparent")
    if parent is not None:
        m = _TRACEPARENT.match(parent)
        # Version ff is invalid; version 00 has exactly these fields; a later one may add fields after a '-'.
        if m and m.group(1) != "ff" and (len(parent) == 55 or (m.group(1) != "00" and parent[55] == "-")):
            found = m.group(2)
            return found if found != _ZERO else None
        return None
    b3 = headers.get("x-b3-traceid")
    if b3 is None:
        single = headers.get("b3")
        if single is None:
            return None
        b3 = single.split("-", 1)[0] if "-" in single else ""
    if not _B3_ID.fullmatch(b3):
        return None
    found = b3.rjust(32, "0")
    return found if found != _ZERO else None


def parent(headers: Mapping[str, str]) -> Parent | None:
    """The caller's span, the parent of the decision's span: W3C traceparent first, then B3 (`x-b3-*` before `b3`,
    as `trace_id` reads them, so a span's trace is the audit record's). None when there is none or it is malformed
    (as the OpenTelemetry SDK's TraceContext and B3 propagators take it): the decision's span is then a root."""
    value = headers.get("traceparent")
    if value is not None:
        m = _TRACEPARENT.match(value)
        if (
            m is None
            or m.group(1) == "ff"
            or not (len(value) == 55 or (m.group(1) != "00" and value[55] == "-"))
            or m.group(2) == _ZERO
            or m.group(3) == _ZERO_SPAN
        ):
            return None
        return m.group(2), m.group(3), int(m.group(4), 16)
    tid = headers.get("x-b3-traceid")
    if tid is not None:
        sid = headers.get("x-b3-spanid") or ""
        sampled = headers.get("x-b3-sampled") in _B3_SAMPLED or headers.get("x-b3-flags") == "1"
    else:
        single = headers.get("b3")
        if not single:
            return None
        fields = single.split("-", 4)
        if not 2 <= len(fields) <= 4:
            return None
        tid, sid = fields[0], fields[1]
        # Two fields defer the decision to the receiver; the SDK's propagator takes that as sampled.
        sampled = len(fields) == 2 or fields[2] in _B3_SAMPLED
    if not _B3_ID.fullmatch(tid) or not _B3_SPAN.fullmatch(sid) or sid == _ZERO_SPAN:
        return None
    tid = tid.rjust(32, "0")
    return (tid, sid, 1 if sampled else 0) if tid != _ZERO else None
