"""Load and validate a policy file into frozen objects; every problem is reported with file:line and a fix."""

from __future__ import annotations

import base64
import difflib
import hashlib
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config.model import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_HMAC_COMPONENTS,
    AlertSettings,
    Allow,
    ClaimNames,
    ClaimRule,
    Dpop,
    HmacClient,
    IdentityProvider,
    Introspection,
    Policy,
    RateLimit,
    Route,
    SharedStateConfig,
)
from agent.config.yamlsrc import LDict, LList, line_of, load_yaml
from agent.errors import ConfigError, ConfigErrors
from agent.policy.paths import PARAM, Segment, parse_template, request_method_ok, shape
from agent.urls import fetchable

# Keys of DESIGN's policy format whose features are not built yet. They are refused, never accepted and
# silently not enforced: a policy that asks for DPoP binding must not run without it.
NOT_YET: dict[str, str] = {}
AUTHN_KINDS = {"jwt", "hmac"}
AUTHN_NOT_KINDS = {
    "dpop": "a DPoP-bound token is a JWT: write 'authn: [jwt]' and 'bind: dpop'",
    "mtls": "a certificate-bound token is a JWT: write 'authn: [jwt]' and 'bind: mtls' "
    "(certificate-only authentication, without a token, is not supported)",
}
BIND_KINDS = ("dpop", "mtls")
TOP_KEYS = {
    "version",
    "service",
    "identity_providers",
    "routes",
    "default",
    "dpop",
    "hmac_clients",
    "shared_state",
    "alerts",
}
ALERT_KEYS = {
    "failed_authentication",
    "token_from_many_addresses",
    "signature_failures",
    "rate_limit_abuse",
    "cooldown_s",
    "webhook",
    "webhook_timeout_s",
}
SHARED_STATE_KEYS = {"redis", "password_file", "timeout_ms"}
DPOP_KEYS = {
    "algorithms",
    "max_age_s",
    "leeway_s",
    "use_dpop_nonce",
    "nonce_lifetime_s",
    "nonce_secret_file",
    "replay_cache_entries",
}
HMAC_CLIENT_KEYS = {
    "key_file",
    "key_env",
    "keys",
    "roles",
    "scopes",
    "components",
    "max_age_s",
    "leeway_s",
    "require_nonce",
}
HMAC_KEY_KEYS = {"key_file", "key_env"}
MIN_HMAC_KEY_BYTES = 32  # RFC 2104 §3: not shorter than the hash output
DERIVED_COMPONENTS = {"@method", "@authority", "@path", "@query", "@target-uri", "@scheme", "@request-target"}
_FIELD_NAME = re.compile(r"[a-z0-9!#$%&'*+\-.^_`|~]+")
IDP_KEYS = {
    "issuer",
    "jwks_uri",
    "jwks_file",
    "discovery",
    "audiences",
    "algorithms",
    "leeway_s",
    "max_token_lifetime_s",
    "claims",
    "token_types",
    "require_typ",
    "ca_file",
    "refresh_s",
    "min_refetch_s",
    "fetch_timeout_s",
    "unknown_kid_wait_s",
    "max_token_bytes",
    "introspection_endpoint",
    "client_id",
    "client_secret_file",
    "introspection_require_audience",
    "introspection_cache_s",
    "introspection_timeout_s",
}
CLAIM_KEYS = {"subject", "roles", "scopes", "client_id"}
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
}
RATE_LIMIT_KEYS = {"key", "per_second", "per_minute", "burst", "shared"}
RATE_LIMIT_PARTS = ("subject", "client_id", "source_ip", "route")
MATCH_KEYS = {"methods", "path"}
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
_DEFAULT_IDP = IdentityProvider(name="", issuer="", audiences=frozenset(), algorithms=frozenset())


class _Ctx:
    """One load pass: the file being read and every error found so far."""

    def __init__(self, file: str, base_dir: Path) -> None:
        self.file = file
        self.base_dir = base_dir
        self.errors: list[ConfigError] = []

    def err(self, line: int, message: str) -> None:
        self.errors.append(ConfigError(message, self.file, line))

    def keys(self, d: LDict, allowed: set[str], where: str) -> None:
        for key in d:
            if key in allowed:
                continue
            if key in NOT_YET:
                self.err(d.lines[key], f"{where}: {key!r} is not supported yet ({NOT_YET[key]}); remove it")
                continue
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"allowed keys: {', '.join(sorted(allowed))}"
            self.err(d.lines[key], f"{where}: unknown key {key!r}; {fix}")

    def path(self, value: str) -> Path:
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.base_dir / p


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list"}
    if t == (int, float):
        return "a number"
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def _get(ctx: _Ctx, d: LDict, key: str, typ: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if key not in d:
        return default
    v = d[key]
    ok = isinstance(v, typ) and not (isinstance(v, bool) and typ in (int, float, (int, float)))
    if ok and isinstance(v, float) and not math.isfinite(v):
        ok = False
    if not ok:
        ctx.err(d.lines[key], f"{where}.{key} must be {_type_name(typ)}, got {v!r}")
        return default
    return v


def _number(ctx: _Ctx, d: LDict, key: str, where: str, default: float, minimum: float = 0.0) -> float:
    v = _get(ctx, d, key, (int, float), where, None)
    if v is None:
        return default
    if v < minimum:
        ctx.err(d.lines[key], f"{where}.{key} must be at least {minimum}, got {v}")
        return default
    return float(v)


def _str_list(ctx: _Ctx, d: LDict, key: str, where: str) -> list[str] | None:
    if key not in d:
        return None
    v = d[key]
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        ctx.err(d.lines[key], f"{where}.{key} must be a list of non-empty strings, got {v!r}")
        return None
    return list(v)


def _mapping(ctx: _Ctx, parent: LDict, key: str, where: str) -> LDict | None:
    v = parent.get(key)
    if v is None:
        return None
    if not isinstance(v, LDict):
        ctx.err(parent.lines[key], f"{where}.{key} must be a mapping, got {v!r}")
        return None
    return v


def _url(ctx: _Ctx, d: LDict, key: str, where: str) -> str | None:
    v = _get(ctx, d, key, str, where)
    if v is None:
        return None
    if fetchable(v):
        return str(v)
    ctx.err(d.lines[key], f"{where}.{key} must be an https:// URL (http:// only to a loopback address), got {v!r}")
    return None


def _read_secret(ctx: _Ctx, d: LDict, key: str, where: str) -> str | None:
    name = _get(ctx, d, key, str, where)
    if name is None:
        return None
    p = ctx.path(name)
    try:
        secret = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        ctx.err(d.lines[key], f"{where}.{key}: cannot read {str(p)!r}: {e.strerror}")
        return None
    if not secret:
        ctx.err(d.lines[key], f"{where}.{key}: {str(p)!r} is empty")
        return None
    return secret


def _identity_provider(ctx: _Ctx, name: str, d: LDict) -> IdentityProvider | None:
    where = f"identity_providers.{name}"
    n_errors = len(ctx.errors)
    ctx.keys(d, IDP_KEYS, where)
    issuer = _get(ctx, d, "issuer", str, where)
    if not issuer:
        ctx.err(d.line, f"{where}: 'issuer' is required (the exact `iss` its tokens carry)")
    discovery = bool(_get(ctx, d, "discovery", bool, where, False))
    jwks_uri = _url(ctx, d, "jwks_uri", where)
    jwks_file = _get(ctx, d, "jwks_file", str, where)
    sources = [k for k in ("jwks_uri", "jwks_file") if k in d] + (["discovery"] if discovery else [])
    introspection_endpoint = _url(ctx, d, "introspection_endpoint", where)
    if len(sources) > 1:
        ctx.err(d.line, f"{where}: give exactly one key source, not {' and '.join(sources)}")
    elif not sources and "introspection_endpoint" not in d:
        ctx.err(d.line, f"{where}: no key source; add jwks_uri, jwks_file or discovery: true")
    if discovery and issuer and not fetchable(issuer):
        ctx.err(d.lines["discovery"], f"{where}: discovery needs an https:// issuer, got {issuer!r}")
    if jwks_file is not None:
        jwks_file = str(ctx.path(jwks_file))
    audiences = _str_list(ctx, d, "audiences", where)
    if not audiences:
        ctx.err(
            d.lines.get("audiences", d.line),
            f"{where}: 'audiences' is required and non-empty; a token for another API must not pass here",
        )
    algorithms = _str_list(ctx, d, "algorithms", where)
    if not algorithms:
        ctx.err(d.lines.get("algorithms", d.line), f"{where}: 'algorithms' is required, e.g. [RS256, ES256]")
        algorithms = []
    for alg in algorithms:
        if alg in ASYMMETRIC_ALGORITHMS:
            continue
        if alg.upper().startswith("HS"):
            why = "a shared-secret algorithm; identity providers must sign with asymmetric keys"
        elif alg.lower() == "none":
            why = "unsigned tokens are never accepted"
        else:
            why = f"unknown; use some of {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}"
        ctx.err(d.lines["algorithms"], f"{where}.algorithms: {alg!r} is {why}")
    claims = ClaimNames()
    cm = _mapping(ctx, d, "claims", where)
    if cm is not None:
        ctx.keys(cm, CLAIM_KEYS, f"{where}.claims")
        claims = ClaimNames(**{k: _get(ctx, cm, k, str, f"{where}.claims") or "" for k in cm if k in CLAIM_KEYS})
        for k in CLAIM_KEYS:
            if not getattr(claims, k):
                ctx.err(cm.lines.get(k, cm.line), f"{where}.claims.{k} must be a non-empty claim name")
    types = _str_list(ctx, d, "token_types", where)
    introspection = None
    if introspection_endpoint is not None:
        client_id = _get(ctx, d, "client_id", str, where)
        secret = _read_secret(ctx, d, "client_secret_file", where)
        if not client_id or secret is None:
            ctx.err(
                d.lines["introspection_endpoint"],
                f"{where}: introspection needs client_id and client_secret_file (client credentials)",
            )
        else:
            introspection = Introspection(
                endpoint=introspection_endpoint,
                client_id=client_id,
                client_secret=secret,
                require_audience=bool(_get(ctx, d, "introspection_require_audience", bool, where, True)),
                cache_s=_number(ctx, d, "introspection_cache_s", where, 30.0),
                timeout_s=_number(ctx, d, "introspection_timeout_s", where, 2.0, 0.01),
            )
    elif "introspection_endpoint" not in d:
        for key in ("client_id", "client_secret_file", "introspection_require_audience"):
            if key in d:
                ctx.err(d.lines[key], f"{where}.{key} is only for introspection_endpoint; add one or remove it")
    ca_file = _get(ctx, d, "ca_file", str, where)
    if ca_file is not None:
        ca_file = str(ctx.path(ca_file))
        if not Path(ca_file).is_file():
            ctx.err(d.lines["ca_file"], f"{where}.ca_file: no such file {ca_file!r}")
    dflt = _DEFAULT_IDP
    idp = IdentityProvider(
        name=name,
        issuer=issuer or "",
        audiences=frozenset(audiences or ()),
        algorithms=frozenset(algorithms),
        jwks_uri=jwks_uri,
        jwks_file=jwks_file,
        discovery=discovery,
        leeway_s=_number(ctx, d, "leeway_s", where, dflt.leeway_s),
        max_token_lifetime_s=_number(ctx, d, "max_token_lifetime_s", where, dflt.max_token_lifetime_s, 1),
        claims=claims,
        token_types=frozenset(t.lower() for t in types) if types else dflt.token_types,
        require_typ=bool(_get(ctx, d, "require_typ", bool, where, False)),
        ca_file=ca_file,
        refresh_s=_number(ctx, d, "refresh_s", where, dflt.refresh_s, 1),
        min_refetch_s=_number(ctx, d, "min_refetch_s", where, dflt.min_refetch_s),
        fetch_timeout_s=_number(ctx, d, "fetch_timeout_s", where, dflt.fetch_timeout_s, 0.05),
        unknown_kid_wait_s=_number(ctx, d, "unknown_kid_wait_s", where, dflt.unknown_kid_wait_s),
        max_token_bytes=int(_number(ctx, d, "max_token_bytes", where, dflt.max_token_bytes, 256)),
        introspection=introspection,
    )
    return idp if len(ctx.errors) == n_errors else None


def _timestamp(ctx: _Ctx, d: LDict, key: str, where: str) -> datetime | None:
    if key not in d:
        return None
    v = d[key]
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v)
        except ValueError:
            v = None
    if isinstance(v, datetime):
        if v.tzinfo is None:
            ctx.err(d.lines[key], f"{where}.{key} needs a time zone, e.g. 2026-12-01T00:00:00Z")
            return None
        return v
    ctx.err(d.lines[key], f"{where}.{key} must be an ISO 8601 time like 2026-12-01T00:00:00Z, got {d[key]!r}")
    return None


def _allow(ctx: _Ctx, d: LDict, where: str, params: set[str]) -> Allow:
    ctx.keys(d, ALLOW_KEYS, where)

    def fs(key: str) -> frozenset[str]:
        v = _str_list(ctx, d, key, where)
        if v is not None and not v:
            ctx.err(d.lines[key], f"{where}.{key} is empty; remove it or list at least one value")
        return frozenset(v or ())

    rules: list[ClaimRule] = []
    cm = _mapping(ctx, d, "claims", where)
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
    max_age = _get(ctx, d, "max_auth_age_s", (int, float), where)
    if max_age is not None and max_age < 0:
        ctx.err(d.lines["max_auth_age_s"], f"{where}.max_auth_age_s must not be negative")
    not_before = _timestamp(ctx, d, "not_before", where)
    not_after = _timestamp(ctx, d, "not_after", where)
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


def _route(ctx: _Ctx, d: LDict, index: int, idps: dict[str, IdentityProvider], has_hmac_clients: bool) -> Route | None:
    name = d.get("name")
    where = f"routes[{index}]" + (f" ({name})" if isinstance(name, str) else "")
    n_errors = len(ctx.errors)
    ctx.keys(d, ROUTE_KEYS, where)
    if not isinstance(name, str) or not name:
        ctx.err(d.lines.get("name", d.line), f"{where}: every route needs a non-empty 'name'")
        name = f"route-{index}"
    m = _mapping(ctx, d, "match", where)
    if m is None:
        ctx.err(d.line, f"{where}: 'match' with a 'path' is required")
        return None
    ctx.keys(m, MATCH_KEYS, f"{where}.match")
    path = _get(ctx, m, "path", str, f"{where}.match")
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
        ml = _str_list(ctx, m, "methods", f"{where}.match")
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
    public = bool(_get(ctx, d, "public", bool, where, False))
    authn = _str_list(ctx, d, "authn", where) or []
    for kind in authn:
        if kind in AUTHN_NOT_KINDS:
            ctx.err(d.lines["authn"], f"{where}.authn: {kind!r} is not an authn kind; {AUTHN_NOT_KINDS[kind]}")
        elif kind not in AUTHN_KINDS:
            ctx.err(d.lines["authn"], f"{where}.authn: unknown kind {kind!r}; use jwt and/or hmac")
    if len(set(authn)) != len(authn):
        ctx.err(d.lines["authn"], f"{where}.authn lists a kind twice")
    bind = _get(ctx, d, "bind", str, where)
    if bind is not None and bind not in BIND_KINDS:
        ctx.err(d.lines["bind"], f"{where}.bind must be dpop or mtls, got {bind!r}")
        bind = None
    elif bind is not None and authn != ["jwt"] and not d.get("public"):
        ctx.err(
            d.lines["bind"],
            f"{where}.bind: {bind} binds a token to its caller, so the route needs 'authn: [jwt]' and nothing else",
        )
    params = {s.value for s in segments if s.kind == PARAM}
    allow = None
    am = _mapping(ctx, d, "allow", where)
    if public:
        for key in ("authn", "allow", "bind"):
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
        if am is None and "allow" not in d:
            ctx.err(d.line, f"{where}: needs 'allow' (write 'allow: {{}}' to admit any authenticated caller)")
        elif am is not None:
            allow = _allow(ctx, am, f"{where}.allow", params)
        elif d.get("allow") is None:
            ctx.err(
                d.lines["allow"],
                f"{where}.allow is empty; write 'allow: {{}}' to admit any authenticated caller",
            )
    mode = _get(ctx, d, "mode", str, where, "enforce")
    if mode not in ("enforce", "shadow"):
        ctx.err(d.lines["mode"], f"{where}.mode must be enforce or shadow, got {mode!r}")
    elif mode == "shadow" and public:
        ctx.err(d.lines["mode"], f"{where}: a public route has no rule to shadow; remove mode")
    rate_limit = None
    rm = _mapping(ctx, d, "rate_limit", where)
    if rm is not None:
        rate_limit = _rate_limit(ctx, rm, f"{where}.rate_limit", public)
    route = Route(
        name=name,
        path=path or "",
        methods=methods,
        public=public,
        authn=tuple(authn),
        allow=allow,
        forward_token=bool(_get(ctx, d, "forward_token", bool, where, False)),
        bind=bind,
        rate_limit=rate_limit,
        mode=mode if mode in ("enforce", "shadow") else "enforce",
        allow_double_encoded_path=bool(_get(ctx, d, "allow_double_encoded_path", bool, where, False)),
        line=d.line,
    )
    return route if len(ctx.errors) == n_errors else None


def _rate_limit(ctx: _Ctx, d: LDict, where: str, public: bool) -> RateLimit | None:
    n_errors = len(ctx.errors)
    ctx.keys(d, RATE_LIMIT_KEYS, where)
    parts = _str_list(ctx, d, "key", where)
    if not parts:
        need = "subject, client_id, source_ip, route, header:NAME, or a list of them"
        ctx.err(d.lines.get("key", d.line), f"{where}: 'key' is required: {need}")
        parts = []
    for part in parts:
        if part.startswith("header:"):
            name = part[7:]
            if _FIELD_NAME.fullmatch(name) is None:
                ctx.err(d.lines["key"], f"{where}.key: {part!r} needs a lower-case header name, e.g. header:x-tenant")
        elif part not in RATE_LIMIT_PARTS:
            hint = difflib.get_close_matches(part, RATE_LIMIT_PARTS, n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else "use subject, client_id, source_ip, route or header:NAME"
            ctx.err(d.lines["key"], f"{where}.key: unknown part {part!r}; {fix}")
        elif public and part in ("subject", "client_id"):
            ctx.err(d.lines["key"], f"{where}.key: a public route has no {part}; key it by source_ip or a header")
    if ("per_second" in d) == ("per_minute" in d):
        ctx.err(d.line, f"{where}: give exactly one of per_second or per_minute")
        return None
    per = "per_second" if "per_second" in d else "per_minute"
    quota = _get(ctx, d, per, (int, float), where)
    if quota is None or quota <= 0:
        ctx.err(d.lines[per], f"{where}.{per} must be a positive number")
        return None
    window = 1.0 if per == "per_second" else 60.0
    burst = _get(ctx, d, "burst", (int, float), where, quota)
    if burst is None or burst < 1:
        ctx.err(d.lines.get("burst", d.line), f"{where}.burst must be at least 1")
        return None
    shared = bool(_get(ctx, d, "shared", bool, where, False))
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


def _alerts(ctx: _Ctx, d: LDict) -> AlertSettings:
    where = "alerts"
    ctx.keys(d, ALERT_KEYS, where)
    base = AlertSettings()

    def pair(key: str, count_key: str, count: int, window: float) -> tuple[int, float]:
        m = _mapping(ctx, d, key, where)
        if m is None:
            return count, window
        ctx.keys(m, {count_key, "window_s"}, f"{where}.{key}")
        n = _number(ctx, m, count_key, f"{where}.{key}", count, minimum=1)
        return int(n), _number(ctx, m, "window_s", f"{where}.{key}", window, minimum=1)

    fa, faw = pair("failed_authentication", "count", base.failed_authn, base.failed_authn_window_s)
    ts, tsw = pair("token_from_many_addresses", "addresses", base.token_spread_addresses, base.token_spread_window_s)
    sf, sfw = pair("signature_failures", "count", base.signature_failures, base.signature_failures_window_s)
    rl, rlw = pair("rate_limit_abuse", "count", base.rate_limited, base.rate_limited_window_s)
    if ts < 2:
        ctx.err(d.line, f"{where}.token_from_many_addresses.addresses must be at least 2")
    return AlertSettings(
        failed_authn=fa,
        failed_authn_window_s=faw,
        token_spread_addresses=ts,
        token_spread_window_s=tsw,
        signature_failures=sf,
        signature_failures_window_s=sfw,
        rate_limited=rl,
        rate_limited_window_s=rlw,
        cooldown_s=_number(ctx, d, "cooldown_s", where, base.cooldown_s),
        webhook=_url(ctx, d, "webhook", where),
        webhook_timeout_s=_number(ctx, d, "webhook_timeout_s", where, base.webhook_timeout_s, minimum=0.1),
    )


def _shared_state(ctx: _Ctx, d: LDict) -> SharedStateConfig | None:
    where = "shared_state"
    ctx.keys(d, SHARED_STATE_KEYS, where)
    url = _get(ctx, d, "redis", str, where)
    if not url:
        ctx.err(d.line, f"{where}: 'redis' is required, e.g. redis://127.0.0.1:6379/0")
        return None
    scheme, _, rest = url.partition("://")
    if scheme not in ("redis", "rediss", "unix") or not rest:
        ctx.err(d.lines["redis"], f"{where}.redis must be a redis://, rediss:// or unix:// URL")
        return None
    if "@" in rest.split("/")[0]:
        ctx.err(d.lines["redis"], f"{where}.redis carries credentials; put the password in password_file")
        return None
    password = _read_secret(ctx, d, "password_file", where) if "password_file" in d else None
    timeout_ms = _number(ctx, d, "timeout_ms", where, 50.0, minimum=1.0)
    return SharedStateConfig(redis=url, password=password, timeout_s=timeout_ms / 1000)


def _dpop(ctx: _Ctx, d: LDict) -> Dpop:
    where = "dpop"
    ctx.keys(d, DPOP_KEYS, where)
    algs = _str_list(ctx, d, "algorithms", where)
    for alg in algs or ():
        if alg not in ASYMMETRIC_ALGORITHMS:
            ctx.err(
                d.lines["algorithms"],
                f"{where}.algorithms: {alg!r} is not an asymmetric JWS algorithm "
                f"(use: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})",
            )
    if algs is not None and not algs:
        ctx.err(d.lines["algorithms"], f"{where}.algorithms is empty; no proof could ever be accepted")
    secret: bytes | None = None
    if "nonce_secret_file" in d:
        text = _read_secret(ctx, d, "nonce_secret_file", where)
        if text is not None:
            secret = text.encode()
            if len(secret) < MIN_HMAC_KEY_BYTES:
                ctx.err(d.lines["nonce_secret_file"], f"{where}.nonce_secret_file: use at least 32 random bytes")
    entries = _get(ctx, d, "replay_cache_entries", int, where, 262_144)
    if entries < 1024:
        ctx.err(d.lines["replay_cache_entries"], f"{where}.replay_cache_entries must be at least 1024")
    return Dpop(
        algorithms=frozenset(algs) if algs else ASYMMETRIC_ALGORITHMS,
        max_age_s=_number(ctx, d, "max_age_s", where, 60.0, minimum=1.0),
        leeway_s=_number(ctx, d, "leeway_s", where, 5.0),
        use_nonce=bool(_get(ctx, d, "use_dpop_nonce", bool, where, False)),
        nonce_lifetime_s=_number(ctx, d, "nonce_lifetime_s", where, 300.0, minimum=1.0),
        nonce_secret=secret,
        replay_cache_entries=max(int(entries), 1024),
    )


def _hmac_key(ctx: _Ctx, d: LDict, where: str) -> bytes | None:
    """One key, base64 on one line, from a file or an environment variable. Never echoed in errors."""
    if ("key_file" in d) == ("key_env" in d):
        ctx.err(d.line, f"{where}: give exactly one of key_file or key_env")
        return None
    if "key_file" in d:
        text = _read_secret(ctx, d, "key_file", where)
        line, what = d.lines["key_file"], "key_file"
    else:
        env = _get(ctx, d, "key_env", str, where)
        line, what = d.lines["key_env"], f"key_env ${env}"
        text = os.environ.get(env, "").strip() if env else None
        if env and not text:
            ctx.err(line, f"{where}.key_env: the environment variable {env} is unset or empty")
            return None
    if text is None:
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        ctx.err(line, f"{where}: {what} must hold the key base64-encoded on one line")
        return None
    if len(key) < MIN_HMAC_KEY_BYTES:
        ctx.err(line, f"{where}: {what} holds {len(key)} bytes; an hmac-sha256 key needs at least {MIN_HMAC_KEY_BYTES}")
        return None
    return key


def _hmac_client(ctx: _Ctx, name: str, d: LDict) -> HmacClient | None:
    where = f"hmac_clients.{name}"
    n_errors = len(ctx.errors)
    ctx.keys(d, HMAC_CLIENT_KEYS, where)
    keys: list[bytes] = []
    if "keys" in d:
        if "key_file" in d or "key_env" in d:
            ctx.err(d.lines["keys"], f"{where}: give 'keys' (a list, for rotation) or one key_file/key_env, not both")
        kl = d["keys"]
        if not isinstance(kl, LList) or not kl:
            ctx.err(d.lines["keys"], f"{where}.keys must be a non-empty list of {{key_file: ...}} or {{key_env: ...}}")
        else:
            for i, item in enumerate(kl):
                if not isinstance(item, LDict):
                    ctx.err(kl.lines[i], f"{where}.keys[{i}] must be a mapping with key_file or key_env")
                    continue
                ctx.keys(item, HMAC_KEY_KEYS, f"{where}.keys[{i}]")
                key = _hmac_key(ctx, item, f"{where}.keys[{i}]")
                if key is not None:
                    keys.append(key)
    else:
        key = _hmac_key(ctx, d, where)
        if key is not None:
            keys.append(key)
    components = _str_list(ctx, d, "components", where)
    for c in components or ():
        if c.startswith("@") and c not in DERIVED_COMPONENTS:
            ctx.err(
                d.lines["components"],
                f"{where}.components: {c!r} is not a derived component (use: {', '.join(sorted(DERIVED_COMPONENTS))})",
            )
        elif not c.startswith("@") and _FIELD_NAME.fullmatch(c) is None:
            ctx.err(d.lines["components"], f"{where}.components: {c!r} is not a lower-case header field name")
    client = HmacClient(
        name=name,
        keys=tuple(keys),
        roles=frozenset(_str_list(ctx, d, "roles", where) or ()),
        scopes=frozenset(_str_list(ctx, d, "scopes", where) or ()),
        components=tuple(components) if components is not None else DEFAULT_HMAC_COMPONENTS,
        max_age_s=_number(ctx, d, "max_age_s", where, 300.0, minimum=1.0),
        leeway_s=_number(ctx, d, "leeway_s", where, 5.0),
        require_nonce=bool(_get(ctx, d, "require_nonce", bool, where, True)),
        line=d.line,
    )
    return client if len(ctx.errors) == n_errors and keys else None


def _check_overlaps(ctx: _Ctx, routes: list[Route]) -> None:
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


def load_policy_text(text: str, file: str = "<policy>", base_dir: Path | None = None) -> Policy:
    """Validate a whole policy; raises ConfigErrors listing every problem with its line."""
    ctx = _Ctx(file, base_dir or Path.cwd())
    try:
        doc = load_yaml(text, file)
    except ConfigError as e:
        raise ConfigErrors([e]) from None
    if not isinstance(doc, LDict):
        raise ConfigErrors([ConfigError("the policy must be a mapping (version:, service:, routes:, ...)", file, 1)])
    ctx.keys(doc, TOP_KEYS, "policy")
    version = doc.get("version")
    if version != 1 or isinstance(version, bool):
        ctx.err(line_of(doc, "version", 1), f"'version: 1' is required, got {version!r}")
    service = _get(ctx, doc, "service", str, "policy")
    if not service:
        ctx.err(line_of(doc, "service", 1), "'service' is required: the name of the service this policy protects")
    default = doc.get("default", "deny")
    if default != "deny":
        ctx.err(
            line_of(doc, "default", 1),
            f"'default' must be 'deny' (got {default!r}); allow what should pass with a route",
        )
    idps: dict[str, IdentityProvider] = {}
    im = _mapping(ctx, doc, "identity_providers", "policy")
    for name, body in (im or {}).items():
        if not isinstance(body, LDict):
            ctx.err(im.lines[name] if im else 0, f"identity_providers.{name} must be a mapping")
            continue
        idp = _identity_provider(ctx, name, body)
        if idp is not None:
            idps[name] = idp
    issuers: dict[str, str] = {}
    for idp in idps.values():
        if idp.issuer in issuers:
            ctx.err(
                line_of(im, idp.name),
                f"identity_providers.{idp.name}: issuer {idp.issuer!r} is also "
                f"{issuers[idp.issuer]!r}'s; one provider per issuer",
            )
        issuers[idp.issuer] = idp.name
    introspecting = [i.name for i in idps.values() if i.introspection]
    if len(introspecting) > 1:
        ctx.err(
            line_of(im),
            "only one identity provider may introspect opaque tokens (an opaque token names no "
            f"issuer, and sending it to the wrong one leaks it); found {', '.join(introspecting)}",
        )
    dpop = Dpop()
    dm = _mapping(ctx, doc, "dpop", "policy")
    if dm is not None:
        dpop = _dpop(ctx, dm)
    hmac_clients: list[HmacClient] = []
    hm = _mapping(ctx, doc, "hmac_clients", "policy")
    for name, body in (hm or {}).items():
        if not isinstance(body, LDict):
            ctx.err(hm.lines[name] if hm else 0, f"hmac_clients.{name} must be a mapping (key_file or key_env, roles)")
            continue
        client = _hmac_client(ctx, str(name), body)
        if client is not None:
            hmac_clients.append(client)
    shared_state = None
    sm = _mapping(ctx, doc, "shared_state", "policy")
    if sm is not None:
        shared_state = _shared_state(ctx, sm)
    alerts = AlertSettings()
    alm = _mapping(ctx, doc, "alerts", "policy")
    if alm is not None:
        alerts = _alerts(ctx, alm)
    routes: list[Route] = []
    rl = doc.get("routes")
    if not isinstance(rl, LList) or not rl:
        ctx.err(line_of(doc, "routes", 1), "'routes' must be a non-empty list; with none, everything is denied")
    else:
        for i, item in enumerate(rl):
            if not isinstance(item, LDict):
                ctx.err(rl.lines[i], f"routes[{i}] must be a mapping with name, match, authn, allow")
                continue
            route = _route(ctx, item, i, idps, bool(hmac_clients))
            if route is not None:
                routes.append(route)
        _check_overlaps(ctx, routes)
        for r in routes:
            if r.rate_limit is not None and r.rate_limit.shared and shared_state is None and "shared_state" not in doc:
                ctx.err(r.rate_limit.line, f"route {r.name!r}: 'shared: true' needs shared_state: {{redis: URL}}")
    if ctx.errors:
        raise ConfigErrors(sorted(ctx.errors, key=lambda e: e.line))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Policy(
        service=str(service),
        identity_providers=tuple(idps.values()),
        routes=tuple(routes),
        version=f"{service}@{digest}",
        source=file,
        dpop=dpop,
        hmac_clients=tuple(hmac_clients),
        shared_state=shared_state,
        alerts=alerts,
    )


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; relative key/secret files resolve against the file's folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigErrors([ConfigError(f"cannot read the policy: {e}", str(p), 0)]) from None
    return load_policy_text(text, str(p), p.parent)
