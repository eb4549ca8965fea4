"""Reads the policy's identity_providers: issuers, key sources, audiences, claim names and introspection."""

from __future__ import annotations

from pathlib import Path

from agent.config._read import Ctx, get, mapping, number, read_secret, str_list, url
from agent.config.model import ASYMMETRIC_ALGORITHMS, ClaimNames, IdentityProvider, Introspection
from agent.config.yamlsrc import LDict
from agent.urls import fetchable

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
_DEFAULT_IDP = IdentityProvider(name="", issuer="", audiences=frozenset(), algorithms=frozenset())


def identity_provider(ctx: Ctx, name: str, d: LDict) -> IdentityProvider | None:
    where = f"identity_providers.{name}"
    n_errors = len(ctx.errors)
    ctx.keys(d, IDP_KEYS, where)
    issuer = get(ctx, d, "issuer", str, where)
    if not issuer:
        ctx.err(d.line, f"{where}: 'issuer' is required (the exact `iss` its tokens carry)")
    discovery = bool(get(ctx, d, "discovery", bool, where, False))
    jwks_uri = url(ctx, d, "jwks_uri", where)
    jwks_file = get(ctx, d, "jwks_file", str, where)
    sources = [k for k in ("jwks_uri", "jwks_file") if k in d] + (["discovery"] if discovery else [])
    introspection_endpoint = url(ctx, d, "introspection_endpoint", where)
    if len(sources) > 1:
        ctx.err(d.line, f"{where}: give exactly one key source, not {' and '.join(sources)}")
    elif not sources and "introspection_endpoint" not in d:
        ctx.err(d.line, f"{where}: no key source; add jwks_uri, jwks_file or discovery: true")
    if discovery and issuer and not fetchable(issuer):
        ctx.err(d.lines["discovery"], f"{where}: discovery needs an https:// issuer, got {issuer!r}")
    if jwks_file is not None:
        jwks_file = str(ctx.path(jwks_file))
    audiences = str_list(ctx, d, "audiences", where)
    if not audiences:
        ctx.err(
            d.lines.get("audiences", d.line),
            f"{where}: 'audiences' is required and non-empty; a token for another API must not pass here",
        )
    algorithms = str_list(ctx, d, "algorithms", where)
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
    cm = mapping(ctx, d, "claims", where)
    if cm is not None:
        ctx.keys(cm, CLAIM_KEYS, f"{where}.claims")
        claims = ClaimNames(**{k: get(ctx, cm, k, str, f"{where}.claims") or "" for k in cm if k in CLAIM_KEYS})
        for k in CLAIM_KEYS:
            if not getattr(claims, k):
                ctx.err(cm.lines.get(k, cm.line), f"{where}.claims.{k} must be a non-empty claim name")
    types = str_list(ctx, d, "token_types", where)
    introspection = None
    if introspection_endpoint is not None:
        client_id = get(ctx, d, "client_id", str, where)
        secret = read_secret(ctx, d, "client_secret_file", where)
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
                require_audience=bool(get(ctx, d, "introspection_require_audience", bool, where, True)),
                cache_s=number(ctx, d, "introspection_cache_s", where, 30.0),
                timeout_s=number(ctx, d, "introspection_timeout_s", where, 2.0, 0.01),
            )
    elif "introspection_endpoint" not in d:
        for key in ("client_id", "client_secret_file", "introspection_require_audience"):
            if key in d:
                ctx.err(d.lines[key], f"{where}.{key} is only for introspection_endpoint; add one or remove it")
    ca_file = get(ctx, d, "ca_file", str, where)
    if ca_file is not None:
        ca_file = str(ctx.path(ca_file))
        if not Path(ca_file).is_file():
            if ctx.stand_ins:  # only ever read to fetch keys, which a policy test never does
                line = d.lines["ca_file"]
                ctx.stood_in.append(
                    f"{ctx.file}:{line}: {where}.ca_file: no such file {ca_file!r}; a test fetches nothing"
                )
                ca_file = None
            else:
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
        leeway_s=number(ctx, d, "leeway_s", where, dflt.leeway_s),
        max_token_lifetime_s=number(ctx, d, "max_token_lifetime_s", where, dflt.max_token_lifetime_s, 1),
        claims=claims,
        token_types=frozenset(t.lower() for t in types) if types else dflt.token_types,
        require_typ=bool(get(ctx, d, "require_typ", bool, where, False)),
        ca_file=ca_file,
        refresh_s=number(ctx, d, "refresh_s", where, dflt.refresh_s, 1),
        min_refetch_s=number(ctx, d, "min_refetch_s", where, dflt.min_refetch_s),
        fetch_timeout_s=number(ctx, d, "fetch_timeout_s", where, dflt.fetch_timeout_s, 0.05),
        unknown_kid_wait_s=number(ctx, d, "unknown_kid_wait_s", where, dflt.unknown_kid_wait_s),
        max_token_bytes=int(number(ctx, d, "max_token_bytes", where, dflt.max_token_bytes, 256)),
        introspection=introspection,
    )
    return idp if len(ctx.errors) == n_errors else None
