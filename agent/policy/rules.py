"""A route's rules as one answer: the deny rule that holds, or the alternative of `allow` that lets the request
pass, or the refusal to give when none does."""

from __future__ import annotations

from collections.abc import Sequence

from agent.config.model import Conditions, DenyRule
from agent.policy.conditions import Facts, Refusal, check


def deny_holding(rules: Sequence[DenyRule], f: Facts, trace: list[str] | None) -> DenyRule | None:
    """The first deny rule whose conditions all hold. A `when` that cannot be evaluated counts as holding:
    a deny rule fails closed, so a client cannot slip past one by sending what makes it error."""
    for rule in rules:
        if check(rule.conditions, f, errors_hold=True) is None:
            if trace is not None:
                trace.append(f"deny rule {rule.name!r} (line {rule.line}) holds")
            return rule
    return None


def first_allow(
    alternatives: Sequence[Conditions], f: Facts, trace: list[str] | None
) -> tuple[int | None, Refusal | None]:
    """(index of the first alternative that holds, None), or (None, the refusal to answer with).

    The refusal is the first alternative's, except that when some alternative failed only on step-up
    (`acr_any`, `max_auth_age_s`, judged last) the answer is its step-up challenge: the caller can satisfy it.
    """
    first: Refusal | None = None
    step_up: Refusal | None = None
    many = len(alternatives) > 1
    for i, alt in enumerate(alternatives):
        refusal = check(alt, f)
        if refusal is None:
            if trace is not None:
                trace.append(f"allow alternative {i} (line {alt.line}) holds" if many else "allow rule satisfied")
            return i, None
        if trace is not None:
            what = f"allow alternative {i} (line {alt.line})" if many else "allow rule"
            trace.append(f"{what} refused: {refusal.reason}" + (f" ({refusal.detail})" if refusal.detail else ""))
        if first is None:
            first = refusal
        if step_up is None and refusal.step_up:
            step_up = refusal
    return None, step_up or first
