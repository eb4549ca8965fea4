"""Reads conditions: a route's `allow` (one mapping or a list of alternatives) and deny rules (route and top level):
scopes, roles, claims, step-up, grant window, source networks, headers and CEL `when` expressions."""

from __future__ import annotations

import math
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import TYPE_CHECKING

from agent.config._read import FIELD_NAME, Ctx, get, mapping, str_list, timestamp
from agent.config.model import CREDENTIAL_REFERENCES, ClaimRule, Conditions, DenyRule, HeaderRule
from agent.config.yamlsrc import LDict, LList
from agent.decision import RequestView
from agent.envoyconf import REMOVED_BEFORE_AUTHZ

if TYPE_CHECKING:
    from agent.policy.cel import When

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
    "when",
    "source_cidrs",
    "headers",
}
STEP_UP_KEYS = {"acr_any", "max_auth_age_s"}
DENY_KEYS = {"name"} | (ALLOW_KEYS - STEP_UP_KEYS)
HEADER_MATCH_KEYS = {"present", "prefix"}
MAX_ALTERNATIVES = 64  # per route: a decision judges at most this many
MAX_DENY_RULES = 256  # per route and at the top level
MAX_CIDRS = 1024  # per condition
MAX_HEADER_RULES = 64  # per condition


def allow(ctx: Ctx, route: LDict, where: str, params: set[str]) -> tuple[Conditions, ...]:
    """`allow:` as alternatives: a mapping is one, a list of mappings is several (any one lets a request pass)."""
    v = route["allow"]
    if isinstance(v, LDict):
        return (conditions(ctx, v, f"{where}.allow", params, ALLOW_KEYS),)
    if not isinstance(v, LList):
        ctx.err(route.lines["allow"], f"{where}.allow must be a mapping or a list of mappings, got {v!r}")
        return ()
    if not v:
        ctx.err(route.lines["allow"], f"{where}.allow is an empty list, so nothing could ever pass; list alternatives")
        return ()
    if len(v) > MAX_ALTERNATIVES:
        ctx.err(route.lines["allow"], f"{where}.allow lists {len(v)} alternatives; at most {MAX_ALTERNATIVES}")
        return ()
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, LDict):
            ctx.err(v.lines[i], f"{where}.allow[{i}] must be a mapping of conditions ({{}} admits any caller)")
            continue
        out.append(conditions(ctx, item, f"{where}.allow[{i}]", params, ALLOW_KEYS))
    for i, alt in enumerate(out[:-1]):
        if alt == Conditions(line=alt.line):
            ctx.warn(
                alt.line,
                f"{where}.allow[{i}] has no conditions and admits every caller; the alternatives after it never matter",
            )
            break
    return tuple(out)


def deny_rules(ctx: Ctx, parent: LDict, where: str, params: set[str], public: bool) -> tuple[DenyRule, ...]:
    """`deny:` on a route (`public`: a public route) or at the top level (`where` is "deny")."""
    v = parent["deny"]
    top = where == "deny"
    place = "deny" if top else f"{where}.deny"
    if not isinstance(v, LList) or not v:
        ctx.err(parent.lines["deny"], f"{place} must be a non-empty list of rules ({{name: N, ...conditions}})")
        return ()
    if len(v) > MAX_DENY_RULES:
        ctx.err(parent.lines["deny"], f"{place} lists {len(v)} rules; at most {MAX_DENY_RULES}")
        return ()
    out: list[DenyRule] = []
    names: dict[str, int] = {}
    for i, item in enumerate(v):
        if not isinstance(item, LDict):
            ctx.err(v.lines[i], f"{place}[{i}] must be a mapping: name and conditions")
            continue
        name = item.get("name")
        at = f"{place}[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(name, str) or not name:
            ctx.err(item.lines.get("name", item.line), f"{at}: every deny rule needs a non-empty 'name'")
            continue
        if name in names:
            ctx.err(item.line, f"{at}: the name {name!r} is already used at line {names[name]}")
        names[name] = item.line
        for key in STEP_UP_KEYS & set(item):
            ctx.err(item.lines[key], f"{at}.{key}: step-up conditions belong in allow; a deny rule cannot ask for one")
        n_errors = len(ctx.errors)
        c = conditions(ctx, item, at, params, DENY_KEYS | STEP_UP_KEYS)
        if len(ctx.errors) != n_errors:
            continue  # its conditions are wrong: said already, and "no conditions" would be a false second error
        if c == Conditions(line=c.line):
            ctx.err(item.line, f"{at}: no conditions, so it would refuse every request; add conditions")
            continue
        if c.credentials:
            reads = _credential_reads(c)
            if public:
                ctx.err(
                    item.line,
                    f"{at}: reads {reads}, which a public route never has (no credentials); such a rule could never "
                    "hold. Use source_cidrs, headers or `when` on request and source",
                )
                continue
            if top:
                ctx.warn(
                    item.line,
                    f"{at}: reads {reads}, so it is judged only on routes that authenticate; public routes are not "
                    "covered (they have no credentials). To cover them, use source_cidrs, headers or `request`",
                )
        if c.when is not None and c.when.result(_bare_request(params, ctx)) is None:
            ctx.warn(
                item.lines["when"],
                f"{at}.when cannot be evaluated on a plain request (no headers, no query, no claims"
                f"{', no path parameters' if top else ''}): a deny rule that cannot be evaluated holds (it fails "
                "closed), so this one refuses every such request. If that is not meant, guard what it reads, e.g. "
                "'has(request.headers.x) && ...' or '\"tenant\" in params && ...'",
            )
        out.append(DenyRule(name, c, item.line))
    return tuple(out)


def _bare_request(params: set[str], ctx: Ctx) -> dict[str, object]:
    """The variables of a request with nothing optional in it, to find deny rules that would hold on any."""
    from agent.policy.conditions import Facts  # here: agent.policy.conditions reads this package's model

    view = RequestView("GET", "/", scheme="https", source="192.0.2.1")
    return Facts(view, None, {p: "x" for p in params}, ctx.now.timestamp()).variables()


def _credential_reads(c: Conditions) -> str:
    keys = [k for k in ("scopes_all", "scopes_any", "roles_all", "roles_any", "claims") if getattr(c, k)]
    if c.when is not None:
        keys += [f"`{r}`" for r in sorted(c.when.references & CREDENTIAL_REFERENCES)]
    return ", ".join(keys)


def conditions(ctx: Ctx, d: LDict, where: str, params: set[str], keys: set[str]) -> Conditions:
    ctx.keys(d, keys, where)

    def fs(key: str) -> frozenset[str]:
        v = str_list(ctx, d, key, where)
        if v is not None and not v:
            ctx.err(d.lines[key], f"{where}.{key} is empty; remove it or list at least one value")
        return frozenset(v or ())

    max_age = get(ctx, d, "max_auth_age_s", (int, float), where)
    if max_age is not None and max_age < 0:
        ctx.err(d.lines["max_auth_age_s"], f"{where}.max_auth_age_s must not be negative")
    not_before = timestamp(ctx, d, "not_before", where)
    not_after = timestamp(ctx, d, "not_after", where)
    if not_before and not_after and not_after <= not_before:
        ctx.err(d.lines["not_after"], f"{where}: not_after is not later than not_before; this rule never applies")
    elif not_after and not_after <= ctx.now:
        # A warning, never an error: an agent restarted after a grant ended must still start (judged per request).
        ctx.warn(d.lines["not_after"], f"{where}.not_after is in the past: this has ended and never holds; remove it")
    elif not_before and not_before > ctx.now:
        ctx.warn(d.lines["not_before"], f"{where}.not_before is in the future: this does not hold until then")
    return Conditions(
        scopes_all=fs("scopes_all"),
        scopes_any=fs("scopes_any"),
        roles_all=fs("roles_all"),
        roles_any=fs("roles_any"),
        claims=_claims(ctx, d, where, params),
        acr_any=_in_order(ctx, d, "acr_any", where),
        max_auth_age_s=float(max_age) if max_age is not None else None,
        not_before=not_before,
        not_after=not_after,
        source_cidrs=_cidrs(ctx, d, where),
        headers=_headers(ctx, d, where),
        when=_when(ctx, d, where),
        line=d.line,
    )


def _in_order(ctx: Ctx, d: LDict, key: str, where: str) -> tuple[str, ...]:
    """A list whose order means something (acr_any: RFC 9470's order of preference), without repeats."""
    v = str_list(ctx, d, key, where)
    if v is not None and not v:
        ctx.err(d.lines[key], f"{where}.{key} is empty; remove it or list at least one value")
    return tuple(dict.fromkeys(v or ()))


def _claims(ctx: Ctx, d: LDict, where: str, params: set[str]) -> tuple[ClaimRule, ...]:
    rules: list[ClaimRule] = []
    cm = mapping(ctx, d, "claims", where)
    for claim, value in (cm or {}).items():
        assert cm is not None
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
                f"{where}.claims.{claim} must be a string, number, true/false or a {{param}} of the path, "
                f"got {value!r}",
            )
    return tuple(rules)


def _cidrs(ctx: Ctx, d: LDict, where: str) -> tuple[IPv4Network | IPv6Network, ...]:
    items = str_list(ctx, d, "source_cidrs", where)
    if items is None:
        return ()
    if not items:
        ctx.err(d.lines["source_cidrs"], f"{where}.source_cidrs is empty, so no address matches; list networks")
    if len(items) > MAX_CIDRS:
        ctx.err(d.lines["source_cidrs"], f"{where}.source_cidrs lists {len(items)} networks; at most {MAX_CIDRS}")
        return ()
    nets: list[IPv4Network | IPv6Network] = []
    for item in items:
        if "%" in item:  # ipaddress keeps a zone id but never compares it: fe80::%eth0/64 is every interface's
            ctx.err(d.lines["source_cidrs"], f"{where}.source_cidrs: {item!r} has a zone id, never matched; drop it")
            continue
        try:
            net = ip_network(item, strict=True)
        except ValueError as e:
            why = "host bits are set; write the network address" if "host bits" in str(e) else "not a network"
            ctx.err(
                d.lines["source_cidrs"], f"{where}.source_cidrs: {item!r} is {why} (e.g. 10.0.0.0/8, 2001:db8::/32)"
            )
            continue
        if isinstance(net, IPv6Network) and net.prefixlen >= 96:
            mapped = net.network_address.ipv4_mapped
            if mapped is not None:  # ::ffff:10.0.0.0/104 is 10.0.0.0/8: sources are compared as IPv4 (conditions.py)
                net = IPv4Network(f"{mapped}/{net.prefixlen - 96}")
        nets.append(net)
    return tuple(nets)


def _headers(ctx: Ctx, d: LDict, where: str) -> tuple[HeaderRule, ...]:
    hm = mapping(ctx, d, "headers", where)
    if hm is None:
        return ()
    if not hm:
        ctx.err(hm.line, f"{where}.headers is empty; remove it or name headers")
    if len(hm) > MAX_HEADER_RULES:
        ctx.err(hm.line, f"{where}.headers names {len(hm)} headers; at most {MAX_HEADER_RULES}")
        return ()
    out: list[HeaderRule] = []
    for written, value in hm.items():
        at = f"{where}.headers.{written}"
        line = hm.lines[written]
        if FIELD_NAME.fullmatch(written) is None:
            ctx.err(line, f"{at}: {written!r} is not a lower-case header name (Envoy passes names lower-case)")
            continue
        # Requests are read as a WSGI app reads them (Facts.headers: x_client is x-client), and so is a rule:
        # `x_client` as written would be looked up under a name no request has, and never hold.
        name = written.replace("_", "-")
        if any(rule.name == name for rule in out):
            ctx.err(line, f"{at}: {name} is named twice (a name's '_' is read as '-')")
            continue
        if name in ("authorization", "dpop", "signature", "signature-input", "cookie", "proxy-authorization"):
            ctx.err(line, f"{at}: a condition on a credential header is never written in a policy; use the claims")
            continue
        if name == "host":
            ctx.err(line, f"{at}: Envoy passes the host as :authority, never as host; use when: 'request.host == ...'")
            continue
        if name in REMOVED_BEFORE_AUTHZ:
            ctx.warn(line, f"{at}: Envoy (as envoy-config sets it up) removes {name} from a client's request before "
                           "the agent sees it, so this condition judges a header that is never there")  # fmt: skip
        if isinstance(value, str):
            out.append(HeaderRule(name, equals=value))
        elif isinstance(value, LDict) and len(value) == 1 and set(value) <= HEADER_MATCH_KEYS:
            ctx.keys(value, HEADER_MATCH_KEYS, at)
            if "present" in value:
                present = get(ctx, value, "present", bool, at)
                if present is not None:
                    out.append(HeaderRule(name, present=present))
            else:
                prefix = get(ctx, value, "prefix", str, at)
                if not prefix:
                    ctx.err(value.lines["prefix"], f"{at}.prefix must be a non-empty string")
                else:
                    out.append(HeaderRule(name, prefix=prefix))
        else:
            ctx.err(line, f"{at} must be a value (a string), {{present: true|false}} or {{prefix: P}}, got {value!r}")
    return tuple(out)


def _when(ctx: Ctx, d: LDict, where: str) -> When | None:
    text = get(ctx, d, "when", str, where)
    if text is None:
        return None
    # Imported here: an agent whose policy has no `when` never loads the CEL runtime (a large C++ library).
    from agent.policy.cel import CelCompileError, compile_when

    try:
        when = compile_when(text)
    except CelCompileError as e:
        span = d.texts.get("when")
        line, column = span.locate(e.line, e.column) if span is not None else (d.lines["when"], 0)
        ctx.err(line, f"{where}.when: {e.message}", column)
        return None
    return when
