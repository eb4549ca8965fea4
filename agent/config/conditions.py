"""Reads a route's allow rule: scopes, roles, claims, step-up (acr, auth age) and the grant window."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from agent.config._read import Ctx, get, mapping, str_list, timestamp
from agent.config.model import Allow, ClaimRule
from agent.config.yamlsrc import LDict

ALLOW_KEYS = {
    "scopes_all",
    "scopes_any",
    "roles_all",
    "roles_any",
    "claims",
    "acr_any",
    "max_auth_age_s",
    "not_before",
    "not_after",
}


def allow(ctx: Ctx, d: LDict, where: str, params: set[str]) -> Allow:
    ctx.keys(d, ALLOW_KEYS, where)

    def fs(key: str) -> frozenset[str]:
        v = str_list(ctx, d, key, where)
        if v is not None and not v:
            ctx.err(d.lines[key], f"{where}.{key} is empty; remove it or list at least one value")
        return frozenset(v or ())

    rules: list[ClaimRule] = []
    cm = mapping(ctx, d, "claims", where)
    if cm is not None:
        for claim, value in cm.items():
            cpath = tuple(claim.split("."))
            if not all(cpath):
                ctx.err(cm.lines[claim], f"{where}.claims: {claim!r} is not a claim name or dotted path")
                continue
            if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
                pname = value[1:-1]
                if pname not in params:
                    have = ", ".join(sorted(params)) or "none"
                    ctx.err(
                        cm.lines[claim],
                        f"{where}.claims.{claim}: {value} is not a parameter of the path (the path binds: {have})",
                    )
                    continue
                rules.append(ClaimRule(cpath, param=pname))
            elif isinstance(value, str | int | float | bool) and not (
                isinstance(value, float) and not math.isfinite(value)
            ):
                rules.append(ClaimRule(cpath, literal=value))
            else:
                ctx.err(
                    cm.lines[claim],
                    f"{where}.claims.{claim} must be a string, number, true/false or "
                    f"a {{param}} of the path, got {value!r}",
                )
    max_age = get(ctx, d, "max_auth_age_s", (int, float), where)
    if max_age is not None and max_age < 0:
        ctx.err(d.lines["max_auth_age_s"], f"{where}.max_auth_age_s must not be negative")
    not_before = timestamp(ctx, d, "not_before", where)
    not_after = timestamp(ctx, d, "not_after", where)
    if not_before and not_after and not_after <= not_before:
        ctx.err(d.lines["not_after"], f"{where}: not_after is not later than not_before; this rule never applies")
    elif not_after and not_after <= datetime.now(UTC):
        ctx.err(d.lines["not_after"], f"{where}.not_after is in the past; this grant has expired, remove it")
    return Allow(
        scopes_all=fs("scopes_all"),
        scopes_any=fs("scopes_any"),
        roles_all=fs("roles_all"),
        roles_any=fs("roles_any"),
        claims=tuple(rules),
        acr_any=tuple(fs("acr_any")),
        max_auth_age_s=float(max_age) if max_age is not None else None,
        not_before=not_before,
        not_after=not_after,
    )
