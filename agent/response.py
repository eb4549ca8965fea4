"""What Envoy and the caller see for a decision: status, challenge headers, problem+json, upstream headers."""

from __future__ import annotations

import json
import math

from agent import reasons as R

TITLES = {
    R.TOKEN_MISSING: "Authentication required",
    R.STEP_UP_REQUIRED: "Stronger or more recent authentication required",
    R.SCOPE_MISSING: "Insufficient scope",
    R.ROLE_MISSING: "Forbidden",
    R.CLAIM_MISMATCH: "Forbidden",
    R.GRANT_NOT_ACTIVE: "Forbidden",
    R.CONDITION_FAILED: "Forbidden",
    R.DENIED_BY_RULE: "Forbidden",
    R.NO_ROUTE: "Forbidden",
    R.RATE_LIMITED: "Too many requests",
    R.MALFORMED_REQUEST: "Bad request",
    R.KEYS_UNAVAILABLE: "Authorization temporarily unavailable",
    R.INTROSPECTION_UNAVAILABLE: "Authorization temporarily unavailable",
    R.INTERNAL_ERROR: "Authorization failed",
    R.REPLAY_CACHE_FULL: "Authorization temporarily unavailable",
    R.POLICY_UNAVAILABLE: "Authorization temporarily unavailable",
}
ERROR_REASONS = frozenset(
    {R.KEYS_UNAVAILABLE, R.INTROSPECTION_UNAVAILABLE, R.INTERNAL_ERROR, R.REPLAY_CACHE_FULL, R.POLICY_UNAVAILABLE}
)
AUTHN_STATUS = {R.KEYS_UNAVAILABLE: 503, R.INTROSPECTION_UNAVAILABLE: 503, R.REPLAY_CACHE_FULL: 503}
# Reasons whose 401 challenge is `DPoP error="invalid_dpop_proof"` (RFC 9449 §7.1) or `Signature`.
DPOP_REASONS = frozenset(
    {R.DPOP_PROOF_MISSING, R.DPOP_PROOF_INVALID, R.DPOP_PROOF_REPLAYED, R.DPOP_NONCE_REQUIRED, R.DPOP_KEY_MISMATCH}
)
SIGNATURE_REASONS = frozenset(
    {
        R.SIGNATURE_MISSING,
        R.SIGNATURE_MALFORMED,
        R.SIGNATURE_KEY_UNKNOWN,
        R.SIGNATURE_INVALID,
        R.SIGNATURE_EXPIRED,
        R.SIGNATURE_COMPONENTS_MISSING,
        R.SIGNATURE_REPLAYED,
        R.CONTENT_DIGEST_MISMATCH,
        R.BODY_UNAVAILABLE,
    }
)
# The google.rpc.Code a denied CheckResponse carries for each HTTP status (Envoy acts on the HTTP one).
RPC_CODE = {401: 16, 403: 7, 400: 3, 429: 8, 500: 13, 503: 14}
RPC_PERMISSION_DENIED = 7


def _q(value: str) -> str:
    """An RFC 9110 quoted-string (our own values only; nothing the caller sent)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge(scheme: str, error: str | None, reason: str | None, algs: str | None = None) -> str:
    """A 401 challenge for `scheme` (Bearer, DPoP per RFC 9449 §7.1, Signature); error only with credentials."""
    if scheme == "Bearer":
        return bearer_challenge(error, reason)
    parts: list[str] = []
    if error:
        parts.append(f"error={_q(error)}")
    if reason:
        parts.append(f"error_description={_q(reason)}")
    if algs:
        parts.append(f"algs={_q(algs)}")
    return scheme + (" " + ", ".join(parts) if parts else "")


def bearer_challenge(
    error: str | None,
    reason: str | None = None,
    scope: tuple[str, ...] = (),
    acr_values: tuple[str, ...] = (),
    max_age: int | None = None,
) -> str:
    """RFC 6750 §3 (and RFC 9470 for step-up); no error attribute when no credentials were sent."""
    parts: list[str] = []
    if error:
        parts.append(f"error={_q(error)}")
    if reason:
        parts.append(f"error_description={_q(reason)}")
    if scope:
        parts.append(f"scope={_q(' '.join(scope))}")
    if acr_values:
        parts.append(f"acr_values={_q(' '.join(acr_values))}")
    if max_age is not None:
        parts.append(f"max_age={max_age}")
    return "Bearer" + (" " + ", ".join(parts) if parts else "")


def _sf_string(value: str) -> str:
    """An RFC 8941 sf-string of our own text (a route name): printable ASCII only, quotes escaped."""
    safe = "".join(c if " " <= c <= "~" else "_" for c in value)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RateLimitHeaders:
    """draft-ietf-httpapi-ratelimit-headers for one route's limit: the policy (quota per window) is fixed, so
    it is formatted once; the state (remaining, seconds to reset) per request."""

    __slots__ = ("_prefix", "policy")

    def __init__(self, name: str, quota: float, window_s: float) -> None:
        self._prefix = _sf_string(name)
        self.policy = ("ratelimit-policy", f"{self._prefix};q={int(quota)};w={int(window_s)}")

    @property
    def name(self) -> str:
        """The policy's name as a structured-field string, as both headers carry it."""
        return self._prefix

    def state(self, remaining: float, reset_s: float) -> list[tuple[str, str]]:
        r = int(remaining) if remaining > 0 else 0
        t = math.ceil(reset_s) if reset_s > 0 else 0
        return [self.policy, ("ratelimit", f"{self._prefix};r={r};t={t}")]


def problem_body(status: int, reason: str, decision_id: str) -> bytes:
    """RFC 9457 problem+json with the stable reason code and the decision id, and nothing else."""
    doc = {
        "type": f"urn:authz-agent:reason:{reason}",
        "title": TITLES.get(reason, "Authentication failed" if status == 401 else "Forbidden"),
        "status": status,
        "reason": reason,
        "decision_id": decision_id,
    }
    return json.dumps(doc, separators=(",", ":")).encode()
