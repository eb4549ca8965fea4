"""Reads a whole policy file: its top-level keys, then each section through its own module, into frozen objects."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from agent.config import clients, providers, sections
from agent.config import routes as routing
from agent.config._read import Ctx, get, mapping
from agent.config.clients import HMAC_CLIENT_KEYS, HMAC_KEY_KEYS
from agent.config.conditions import ALLOW_KEYS, DENY_KEYS, deny_rules
from agent.config.model import AlertSettings, DenyRule, Dpop, HmacClient, IdentityProvider, Policy, Route
from agent.config.providers import CLAIM_KEYS, IDP_KEYS
from agent.config.routes import MATCH_KEYS, RATE_LIMIT_KEYS, ROUTE_KEYS
from agent.config.sections import ALERT_KEYS, DPOP_KEYS, NEW_SOURCE_NETWORK_KEYS, SHARED_STATE_KEYS
from agent.config.yamlsrc import LDict, LList, line_of, load_yaml
from agent.errors import ConfigError, ConfigErrors

__all__ = [
    "ALERT_KEYS",
    "ALLOW_KEYS",
    "CLAIM_KEYS",
    "DENY_KEYS",
    "DPOP_KEYS",
    "HMAC_CLIENT_KEYS",
    "HMAC_KEY_KEYS",
    "IDP_KEYS",
    "MATCH_KEYS",
    "NEW_SOURCE_NETWORK_KEYS",
    "RATE_LIMIT_KEYS",
    "ROUTE_KEYS",
    "SHARED_STATE_KEYS",
    "TOP_KEYS",
    "load_policy",
    "load_policy_text",
]

MAX_WHEN_PER_DECISION = 32  # `when` expressions one decision may judge (each bounded in agent/policy/cel.py)
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
    "deny",
    "providers",
}


def load_policy_text(
    text: str, file: str = "<policy>", base_dir: Path | None = None, stand_ins: bool = False
) -> Policy:
    """Validate a whole policy; raises ConfigErrors listing every problem with its line.

    `stand_ins` (for `policy test`): a secret that cannot be read gets a throwaway value instead of an error,
    and `Policy.stood_in` says which."""
    ctx = Ctx(file, base_dir or Path.cwd(), stand_ins)
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
    service = get(ctx, doc, "service", str, "policy")
    if not service:
        ctx.err(line_of(doc, "service", 1), "'service' is required: the name of the service this policy protects")
    default = doc.get("default", "deny")
    if default != "deny":
        ctx.err(
            line_of(doc, "default", 1),
            f"'default' must be 'deny' (got {default!r}); allow what should pass with a route",
        )
    idps: dict[str, IdentityProvider] = {}
    im = mapping(ctx, doc, "identity_providers", "policy")
    for name, body in (im or {}).items():
        if not isinstance(body, LDict):
            ctx.err(im.lines[name] if im else 0, f"identity_providers.{name} must be a mapping")
            continue
        idp = providers.identity_provider(ctx, name, body)
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
    dm = mapping(ctx, doc, "dpop", "policy")
    if dm is not None:
        dpop = sections.dpop(ctx, dm)
    hmac_clients: list[HmacClient] = []
    hm = mapping(ctx, doc, "hmac_clients", "policy")
    for name, body in (hm or {}).items():
        if not isinstance(body, LDict):
            ctx.err(hm.lines[name] if hm else 0, f"hmac_clients.{name} must be a mapping (key_file or key_env, roles)")
            continue
        client = clients.hmac_client(ctx, str(name), body)
        if client is not None:
            hmac_clients.append(client)
    shared_state = None
    sm = mapping(ctx, doc, "shared_state", "policy")
    if sm is not None:
        shared_state = sections.shared_state(ctx, sm)
    alerts = AlertSettings()
    alm = mapping(ctx, doc, "alerts", "policy")
    if alm is not None:
        alerts = sections.alerts(ctx, alm)
    default_providers = routing.providers(ctx, doc, "policy", idps) if "providers" in doc else None
    deny: tuple[DenyRule, ...] = ()
    if "deny" in doc:
        deny = deny_rules(ctx, doc, "deny", set(), False)
    routes: list[Route] = []
    rl = doc.get("routes")
    if not isinstance(rl, LList) or not rl:
        ctx.err(line_of(doc, "routes", 1), "'routes' must be a non-empty list; with none, everything is denied")
    else:
        for i, item in enumerate(rl):
            if not isinstance(item, LDict):
                ctx.err(rl.lines[i], f"routes[{i}] must be a mapping with name, match, authn, allow")
                continue
            route = routing.route(ctx, item, i, idps, bool(hmac_clients), default_providers)
            if route is not None:
                routes.append(route)
        routing.check_overlaps(ctx, routes)
        top = {rule.name: rule.line for rule in deny}
        for r in routes:
            for rule in r.deny:
                if rule.name in top:
                    ctx.warn(
                        rule.line,
                        f"route {r.name!r}: deny rule {rule.name!r} has the name of the top-level rule at line "
                        f"{top[rule.name]}; audit records and test coverage cannot tell them apart",
                    )
        for r in routes:
            rules = (*deny, *r.deny)
            n = sum(a.when is not None for a in r.allow) + sum(d.conditions.when is not None for d in rules)
            if n > MAX_WHEN_PER_DECISION:
                ctx.err(
                    r.line,
                    f"route {r.name!r}: a decision would judge {n} `when` expressions (its alternatives, its deny "
                    f"rules and the top-level ones); at most {MAX_WHEN_PER_DECISION}, so that no request costs "
                    "more than a bounded amount of work",
                )
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
        deny=deny,
        warnings=tuple(sorted(ctx.warnings)),
        stood_in=tuple(ctx.stood_in),
    )


MAX_POLICY_BYTES = 8 << 20


def read_bounded(path: Path, limit: int) -> str:
    """A regular file's text, at most `limit` bytes: a FIFO, a device or /dev/zero named as a file is refused
    instead of blocking or filling memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block the open itself
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data.decode("utf-8")


def load_policy(path: str | os.PathLike[str], stand_ins: bool = False) -> Policy:
    """Read and validate a policy file; relative key/secret files resolve against the file's folder."""
    p = Path(path)
    try:
        text = read_bounded(p, MAX_POLICY_BYTES)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigErrors([ConfigError(f"cannot read the policy: {e}", str(p), 0)]) from None
    return load_policy_text(text, str(p), p.parent, stand_ins)
