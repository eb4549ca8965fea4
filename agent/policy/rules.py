"""Evaluate a route's `allow` against an authenticated caller: scopes, roles, object-level claims, step-up."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent import reasons as R
from agent.authn.principal import Principal, claim_at
from agent.authn.strict import numeric_date
from agent.config.model import Allow


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an authenticated caller may not pass, and what the challenge tells it."""

    reason: str
    status: int = 403
    missing_scopes: tuple[str, ...] = ()
    acr_values: tuple[str, ...] = ()
    max_age: int | None = None
    detail: str = ""


def evaluate(allow: Allow, who: Principal, params: dict[str, str], now: float) -> Refusal | None:
    """None when every condition holds; the first failing condition otherwise."""
    if allow.not_before is not None or allow.not_after is not None:
        t = datetime.fromtimestamp(now, UTC)
        if (allow.not_before is not None and t < allow.not_before) or (
            allow.not_after is not None and t >= allow.not_after
        ):
            return Refusal(R.GRANT_NOT_ACTIVE, detail="outside the rule's not_before/not_after window")
    if allow.scopes_all and not allow.scopes_all <= who.scopes:
        missing = tuple(sorted(allow.scopes_all - who.scopes))
        return Refusal(
            R.SCOPE_MISSING,
            missing_scopes=tuple(sorted(allow.scopes_all)),
            detail=f"missing scopes {' '.join(missing)}",
        )
    if allow.scopes_any and allow.scopes_any.isdisjoint(who.scopes):
        return Refusal(R.SCOPE_MISSING, missing_scopes=tuple(sorted(allow.scopes_any)), detail="none of scopes_any")
    if allow.roles_all and not allow.roles_all <= who.roles:
        return Refusal(R.ROLE_MISSING, detail=f"missing roles {' '.join(sorted(allow.roles_all - who.roles))}")
    if allow.roles_any and allow.roles_any.isdisjoint(who.roles):
        return Refusal(R.ROLE_MISSING, detail="none of roles_any")
    for rule in allow.claims:
        expected: Any = params[rule.param] if rule.param is not None else rule.literal
        if not _claim_matches(claim_at(who.claims, rule.path), expected):
            return Refusal(R.CLAIM_MISMATCH, detail=f"claim {'.'.join(rule.path)} does not match")
    if allow.acr_any or allow.max_auth_age_s is not None:
        acr = who.claims.get("acr")
        max_age = int(allow.max_auth_age_s) if allow.max_auth_age_s is not None else None
        step_up = Refusal(R.STEP_UP_REQUIRED, status=401, acr_values=allow.acr_any, max_age=max_age)
        if allow.acr_any and acr not in allow.acr_any:
            return step_up
        if allow.max_auth_age_s is not None:
            # The verifiers refused an auth_time out of range or in the future; a value that is no time (absent,
            # or from a principal that never had one checked) never counts as a recent authentication.
            auth_time = numeric_date(who.claims.get("auth_time"))
            if auth_time is None or now - auth_time > allow.max_auth_age_s:
                return step_up
    return None


def _same(a: Any, b: Any) -> bool:
    # Type-strict: the string "1" is not the number 1, and true is not 1 (Python says True == 1).
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _claim_matches(value: Any, expected: Any) -> bool:
    if isinstance(value, list):
        return any(_same(v, expected) for v in value)
    return value is not None and _same(value, expected)
