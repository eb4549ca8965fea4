"""The time format of audit records, shared by the engine's layer (agent._recall's twin) and agent.audit."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["rfc3339_ms"]

_second: list[object] = [None, ""]  # the last whole second formatted, and its text


def rfc3339_ms(now: float) -> str:
    """UTC time with milliseconds, e.g. 2026-11-23T00:57:02.410Z; the seconds part is formatted once a second."""
    whole = int(now)
    if _second[0] != whole:
        _second[1] = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = whole
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"
