"""Anomaly alerts from the decision stream: repeated authentication failures, one token from many addresses,
signature failures, rate-limit abuse. Each alert is an `alert` record in the audit chain, a metric, and a
POST to `alerts.webhook` when configured (retried, bounded; never waited on by a request).

Windows are fixed per key (the count restarts when the window has passed); every table is bounded, and an
alert for the same kind and key is raised at most once per `cooldown_s`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent import reasons as R
from agent.config.model import AlertSettings
from agent.response import SIGNATURE_REASONS

if TYPE_CHECKING:
    from agent.decision import Decision, RequestView

MAX_KEYS = 50_000
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


class AlertMonitor:
    def __init__(self, settings: AlertSettings, raise_alert: Callable[[str, dict[str, object]], None]) -> None:
        self.settings = settings
        self._raise = raise_alert
        self._failed = _Windows(settings.failed_authn_window_s)
        self._signatures = _Windows(settings.signature_failures_window_s)
        self._limited = _Windows(settings.rate_limited_window_s)
        # jti -> (window start, the addresses seen in it)
        self._spread: OrderedDict[str, tuple[float, set[str]]] = OrderedDict()
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()

    # Allows answered from wire bytes (agent._recall) skip this listener while the caller's address is the one it
    # last saw for the token, for at most this long: the token-spread windows lose at most a second at an edge.
    recall_resync_s = 1.0

    def recalled(self, counts: dict[str, int], buckets: list[int], latency_sum_us: int) -> None:
        """Allows answered from wire bytes, in summary: nothing to count here (every new address was seen)."""

    def observe(self, view: RequestView, d: Decision, now: float) -> None:
        """Called once per decision, after it is made; cheap unless something is worth counting."""
        s = self.settings
        if d.allowed:
            who = d.principal
            if who is not None and who.jti is not None and view.source:
                self._token_spread(who.jti, view.source, who.subject, now)
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
