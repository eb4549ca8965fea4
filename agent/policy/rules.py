"""A route's rules as one answer: the deny rule that holds, or the alternative of `allow` that lets the request
pass, or the refusal to give when none does."""

from __future__ import annotations

from collections.abc import Sequence

from agent.config.model import Conditions, DenyRule
from agent.policy.conditions import STEP_UP, Facts, Refusal, failing, refusal


def deny_holding(rules: Sequence[DenyRule], f: Facts, trace: list[str] | None) -> DenyRule | None:
    """The first deny rule whose conditions all hold. A `when` that cannot be evaluated counts as holding:
    a deny rule fails closed, so a client cannot slip past one by sending what makes it error."""
    for rule in rules:
        if not failing(rule.conditions, f, errors_hold=True):
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
    Refusals are built only for that answer (and the trace): an alternative dropped for a later one costs none.
    """
    first = -1
    first_failed = 0
    step_up = -1
    many = len(alternatives) > 1
    for i, alt in enumerate(alternatives):
        failed = failing(alt, f)
        if not failed:
            if trace is not None:
                trace.append(f"allow alternative {i} (line {alt.line}) holds" if many else "allow rule satisfied")
            return i, None
        if trace is not None:
            r = refusal(alt, f, failed)
            what = f"allow alternative {i} (line {alt.line})" if many else "allow rule"
            trace.append(f"{what} refused: {r.reason}" + (f" ({r.detail})" if r.detail else ""))
        if first < 0:
            first, first_failed = i, failed
        if step_up < 0 and failed == STEP_UP:
            step_up = i
    if step_up >= 0:
        return None, refusal(alternatives[step_up], f, STEP_UP)
    if first >= 0:
        return None, refusal(alternatives[first], f, first_failed)
    return None, None
