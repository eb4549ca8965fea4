"""Reads the policy's hmac_clients: shared keys from files or the environment, roles, scopes and signed components."""

from __future__ import annotations

import base64
import os

from agent.config._read import FIELD_NAME, Ctx, get, number, read_secret, str_list
from agent.config.model import DEFAULT_HMAC_COMPONENTS, HmacClient
from agent.config.yamlsrc import LDict, LList
from agent.envoyconf import REMOVED_BEFORE_AUTHZ

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
# Headers Envoy sets or rewrites on a request from a client (use_remote_address) before ext_authz.
ENVOY_REWRITTEN = frozenset({"x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-envoy-external-address"})
DERIVED_COMPONENTS = {"@method", "@authority", "@path", "@query", "@target-uri", "@scheme", "@request-target"}


def hmac_key(ctx: Ctx, d: LDict, where: str) -> bytes | None:
    """One key, base64 on one line, from a file or an environment variable. Never echoed in errors."""
    if ("key_file" in d) == ("key_env" in d):
        ctx.err(d.line, f"{where}: give exactly one of key_file or key_env")
        return None
    if "key_file" in d:
        text = read_secret(ctx, d, "key_file", where)
        line, what = d.lines["key_file"], "key_file"
    else:
        env = get(ctx, d, "key_env", str, where)
        line, what = d.lines["key_env"], f"key_env ${env}"
        text = os.environ.get(env, "").strip() if env else None
        if env and not text:
            problem = f"{where}.key_env: the environment variable {env} is unset or empty"
            if not ctx.stand_ins:
                ctx.err(line, problem)
                return None
            text = ctx.stand_in(line, problem)
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


def hmac_client(ctx: Ctx, name: str, d: LDict) -> HmacClient | None:
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
                key = hmac_key(ctx, item, f"{where}.keys[{i}]")
                if key is not None:
                    keys.append(key)
    else:
        key = hmac_key(ctx, d, where)
        if key is not None:
            keys.append(key)
    components = str_list(ctx, d, "components", where)
    for c in components or ():
        if c.startswith("@") and c not in DERIVED_COMPONENTS:
            ctx.err(
                d.lines["components"],
                f"{where}.components: {c!r} is not a derived component (use: {', '.join(sorted(DERIVED_COMPONENTS))})",
            )
        elif not c.startswith("@") and FIELD_NAME.fullmatch(c) is None:
            ctx.err(d.lines["components"], f"{where}.components: {c!r} is not a lower-case header field name")
        elif c in ENVOY_REWRITTEN or c in REMOVED_BEFORE_AUTHZ:
            ctx.warn(
                d.lines["components"],
                f"{where}.components: Envoy (as envoy-config sets it up) "
                f"{'replaces' if c in ENVOY_REWRITTEN else 'removes'} {c} before the agent sees it, so a signature "
                "covering it never verifies",
            )
    client = HmacClient(
        name=name,
        keys=tuple(keys),
        roles=frozenset(str_list(ctx, d, "roles", where) or ()),
        scopes=frozenset(str_list(ctx, d, "scopes", where) or ()),
        components=tuple(components) if components is not None else DEFAULT_HMAC_COMPONENTS,
        max_age_s=number(ctx, d, "max_age_s", where, 300.0, minimum=1.0),
        leeway_s=number(ctx, d, "leeway_s", where, 5.0),
        require_nonce=bool(get(ctx, d, "require_nonce", bool, where, True)),
        line=d.line,
    )
    return client if len(ctx.errors) == n_errors and keys else None
