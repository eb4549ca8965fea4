"""What joins a decision to the rest of the system: the request id Envoy set (`x-request-id`) and the trace the
caller is part of (W3C `traceparent`, else B3 `x-b3-traceid` or `b3`). Both come from the request, so both are
checked to a strict shape: anything else is recorded as null, never as the caller's text."""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["request_id", "trace_id"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:+/=-]{1,128}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_B3_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_ZERO = "0" * 32


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
