"""Reads the policy's routes: match, authn, bind, mode and rate_limit, and refuses overlapping routes."""

from __future__ import annotations

import difflib

from agent.config import conditions
from agent.config._read import FIELD_NAME, Ctx, get, mapping, str_list
from agent.config.model import Conditions, DenyRule, IdentityProvider, RateLimit, Route
from agent.config.yamlsrc import LDict
from agent.policy.paths import PARAM, Segment, parse_template, request_method_ok, shape

AUTHN_KINDS = {"jwt", "hmac"}
AUTHN_NOT_KINDS = {
    "dpop": "a DPoP-bound token is a JWT: write 'authn: [jwt]' and 'bind: dpop'",
    "mtls": "a certificate-bound token is a JWT: write 'authn: [jwt]' and 'bind: mtls' "
    "(certificate-only authentication, without a token, is not supported)",
}
BIND_KINDS = ("dpop", "mtls")
ROUTE_KEYS = {
    "name",
    "match",
    "authn",
    "allow",
    "public",
    "forward_token",
    "bind",
    "rate_limit",
    "mode",
    "allow_double_encoded_path",
    "deny",
    "providers",
    "audit",
}
AUDIT_KEYS = {"omit_params"}
RATE_LIMIT_KEYS = {"key", "per_second", "per_minute", "burst", "shared"}
RATE_LIMIT_PARTS = ("subject", "client_id", "source_ip", "route")
MATCH_KEYS = {"methods", "path"}


def route(
    ctx: Ctx,
    d: LDict,
    index: int,
    idps: dict[str, IdentityProvider],
    has_hmac_clients: bool,
    default_providers: frozenset[str] | None = None,
) -> Route | None:
    name = d.get("name")
    where = f"routes[{index}]" + (f" ({name})" if isinstance(name, str) else "")
    n_errors = len(ctx.errors)
    ctx.keys(d, ROUTE_KEYS, where)
    if not isinstance(name, str) or not name:
        ctx.err(d.lines.get("name", d.line), f"{where}: every route needs a non-empty 'name'")
        name = f"route-{index}"
    m = mapping(ctx, d, "match", where)
    if m is None:
        ctx.err(d.line, f"{where}: 'match' with a 'path' is required")
        return None
    ctx.keys(m, MATCH_KEYS, f"{where}.match")
    path = get(ctx, m, "path", str, f"{where}.match")
    segments: tuple[Segment, ...] = ()
    if path is None:
        ctx.err(m.line, f"{where}.match: 'path' is required, e.g. /v1/orders/{{id}}")
    else:
        try:
            segments = parse_template(path)
        except ValueError as e:
            ctx.err(m.lines["path"], f"{where}.match: {e}")
    methods: frozenset[str] | None = None
    if "methods" in m:
        ml = str_list(ctx, m, "methods", f"{where}.match")
        if ml is not None and not ml:
            ctx.err(
                m.lines["methods"],
                f"{where}.match.methods is empty, so the route can never match; "
                "list methods or remove the key to match any",
            )
        for meth in ml or ():
            if not request_method_ok(meth):
                ctx.err(m.lines["methods"], f"{where}.match.methods: {meth!r} is not an upper-case HTTP method")
        methods = frozenset(ml or ())
    public = bool(get(ctx, d, "public", bool, where, False))
    authn = str_list(ctx, d, "authn", where) or []
    for kind in authn:
        if kind in AUTHN_NOT_KINDS:
            ctx.err(d.lines["authn"], f"{where}.authn: {kind!r} is not an authn kind; {AUTHN_NOT_KINDS[kind]}")
        elif kind not in AUTHN_KINDS:
            ctx.err(d.lines["authn"], f"{where}.authn: unknown kind {kind!r}; use jwt and/or hmac")
    if len(set(authn)) != len(authn):
        ctx.err(d.lines["authn"], f"{where}.authn lists a kind twice")
    bind = get(ctx, d, "bind", str, where)
    if bind is not None and bind not in BIND_KINDS:
        ctx.err(d.lines["bind"], f"{where}.bind must be dpop or mtls, got {bind!r}")
        bind = None
    elif bind is not None and authn != ["jwt"] and not d.get("public"):
        ctx.err(
            d.lines["bind"],
            f"{where}.bind: {bind} binds a token to its caller, so the route needs 'authn: [jwt]' and nothing else",
        )
    params = {s.value for s in segments if s.kind == PARAM}
    allow: tuple[Conditions, ...] = ()
    accepted = providers(ctx, d, where, idps) if "providers" in d else None
    if public:
        for key in ("authn", "allow", "bind", "providers"):
            if key in d:
                ctx.err(d.lines[key], f"{where}: a public route takes no {key!r}; remove it or public: true")
    else:
        if not authn:
            ctx.err(
                d.lines.get("authn", d.line),
                f"{where}: needs 'authn' (e.g. [jwt]) or 'public: true'; "
                "a route never means 'no credentials needed' by omission",
            )
        if "jwt" in authn and not idps:
            ctx.err(d.lines["authn"], f"{where}.authn: jwt needs at least one identity provider")
        if "hmac" in authn and not has_hmac_clients:
            ctx.err(d.lines["authn"], f"{where}.authn: hmac needs at least one entry in hmac_clients")
        if "allow" not in d:
            ctx.err(d.line, f"{where}: needs 'allow' (write 'allow: {{}}' to admit any authenticated caller)")
        elif d["allow"] is None:
            ctx.err(
                d.lines["allow"],
                f"{where}.allow is empty; write 'allow: {{}}' to admit any authenticated caller",
            )
        else:
            allow = conditions.allow(ctx, d, where, params)
        if accepted is not None and "jwt" not in authn:
            ctx.err(d.lines["providers"], f"{where}.providers: names identity providers, but the route takes no jwt")
        if accepted is None and "jwt" in authn:
            accepted = default_providers
            if accepted is None and len(idps) > 1:
                ctx.warn(
                    d.lines.get("authn", d.line),
                    f"{where}: takes tokens from every identity provider ({', '.join(sorted(idps))}); "
                    "name the ones it serves with 'providers: [...]' (or a top-level default)",
                )
    deny: tuple[DenyRule, ...] = ()
    if "deny" in d:
        deny = conditions.deny_rules(ctx, d, where, params, public)
    mode = get(ctx, d, "mode", str, where, "enforce")
    if mode not in ("enforce", "shadow"):
        ctx.err(d.lines["mode"], f"{where}.mode must be enforce or shadow, got {mode!r}")
    elif mode == "shadow" and public:
        ctx.err(d.lines["mode"], f"{where}: a public route has no rule to shadow; remove mode")
    limit = None
    rm = mapping(ctx, d, "rate_limit", where)
    if rm is not None:
        limit = rate_limit(ctx, rm, f"{where}.rate_limit", public)
    omit: frozenset[str] = frozenset()
    am = mapping(ctx, d, "audit", where)
    if am is not None:
        ctx.keys(am, AUDIT_KEYS, f"{where}.audit")
        names = str_list(ctx, am, "omit_params", f"{where}.audit") or []
        for n in names:
            if n not in params:
                ctx.err(
                    am.lines.get("omit_params", am.line),
                    f"{where}.audit.omit_params: {n!r} is not a parameter of the path "
                    f"({', '.join(sorted(params)) or 'it has none'})",
                )
        omit = frozenset(names)
    route = Route(
        name=name,
        path=path or "",
        methods=methods,
        public=public,
        authn=tuple(authn),
        allow=allow,
        deny=deny,
        providers=accepted if "jwt" in authn else None,
        forward_token=bool(get(ctx, d, "forward_token", bool, where, False)),
        audit_omit_params=omit,
        bind=bind,
        rate_limit=limit,
        mode=mode if mode in ("enforce", "shadow") else "enforce",
        allow_double_encoded_path=bool(get(ctx, d, "allow_double_encoded_path", bool, where, False)),
        line=d.line,
    )
    return route if len(ctx.errors) == n_errors else None


def rate_limit(ctx: Ctx, d: LDict, where: str, public: bool) -> RateLimit | None:
    n_errors = len(ctx.errors)
    ctx.keys(d, RATE_LIMIT_KEYS, where)
    parts = str_list(ctx, d, "key", where)
    if not parts:
        need = "subject, client_id, source_ip, route, header:NAME, claim:PATH, or a list of them"
        ctx.err(d.lines.get("key", d.line), f"{where}: 'key' is required: {need}")
        parts = []
    for part in parts:
        if part.startswith("header:"):
            name = part[7:]
            if FIELD_NAME.fullmatch(name) is None:
                ctx.err(d.lines["key"], f"{where}.key: {part!r} needs a lower-case header name, e.g. header:x-tenant")
            elif "_" in name:  # no request reaches the agent with it: Envoy refuses such names (envoy-config)
                fix = f"write header:{name.replace('_', '-')}"
                why = "Envoy refuses header names with underscores, so this part would be empty for every request"
                ctx.err(d.lines["key"], f"{where}.key: {part!r}: {fix}; {why}")
        elif part.startswith("claim:"):
            path = part[6:].split(".")
            if not all(path):
                ctx.err(
                    d.lines["key"], f"{where}.key: {part!r} needs a claim name or dotted path, e.g. claim:tenant_id"
                )
            elif public:
                ctx.err(d.lines["key"], f"{where}.key: a public route has no claims; key it by source_ip or a header")
        elif part not in RATE_LIMIT_PARTS:
            hint = difflib.get_close_matches(part, RATE_LIMIT_PARTS, n=1)
            fix = (
                f"did you mean {hint[0]!r}?"
                if hint
                else "use subject, client_id, source_ip, route, header:NAME or claim:PATH"
            )
            ctx.err(d.lines["key"], f"{where}.key: unknown part {part!r}; {fix}")
        elif public and part in ("subject", "client_id"):
            ctx.err(d.lines["key"], f"{where}.key: a public route has no {part}; key it by source_ip or a header")
    if ("per_second" in d) == ("per_minute" in d):
        ctx.err(d.line, f"{where}: give exactly one of per_second or per_minute")
        return None
    per = "per_second" if "per_second" in d else "per_minute"
    quota = get(ctx, d, per, (int, float), where)
    if quota is None or quota <= 0:
        ctx.err(d.lines[per], f"{where}.{per} must be a positive number")
        return None
    window = 1.0 if per == "per_second" else 60.0
    burst = get(ctx, d, "burst", (int, float), where, quota)
    if burst is None or burst < 1:
        ctx.err(d.lines.get("burst", d.line), f"{where}.burst must be at least 1")
        return None
    shared = bool(get(ctx, d, "shared", bool, where, False))
    if len(ctx.errors) != n_errors:
        return None
    return RateLimit(
        key=tuple(parts),
        rate=float(quota) / window,
        burst=float(burst),
        window_s=window,
        quota=float(quota),
        shared=shared,
        line=d.line,
    )


def check_overlaps(ctx: Ctx, routes: list[Route]) -> None:
    by_shape: dict[tuple[str, ...], list[Route]] = {}
    names: dict[str, Route] = {}
    for r in routes:
        if r.name in names:
            ctx.err(r.line, f"route name {r.name!r} is already used at line {names[r.name].line}")
        names[r.name] = r
        seen = by_shape.setdefault(shape(parse_template(r.path)), [])
        for other in seen:
            if r.methods is None and other.methods is None:
                clash = "any method"
            elif r.methods is not None and other.methods is not None and r.methods & other.methods:
                clash = ", ".join(sorted(r.methods & other.methods))
            else:
                continue
            ctx.err(
                r.line,
                f"route {r.name!r} matches the same requests as {other.name!r} (line {other.line}) "
                f"for {clash}; merge them or split their methods",
            )
        seen.append(r)


def providers(ctx: Ctx, d: LDict, where: str, idps: dict[str, IdentityProvider]) -> frozenset[str] | None:
    """`providers: [NAME, ...]`: the identity providers whose tokens are taken (a route's, or the policy's default)."""
    names = str_list(ctx, d, "providers", where)
    if names is None:
        return None
    if not names:
        ctx.err(d.lines["providers"], f"{where}.providers is empty, so no token could pass; name providers")
        return None
    for n in names:
        if n not in idps:
            hint = difflib.get_close_matches(n, sorted(idps), n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"configured: {', '.join(sorted(idps)) or 'none'}"
            ctx.err(d.lines["providers"], f"{where}.providers: {n!r} is not an identity provider; {fix}")
    return frozenset(names)
