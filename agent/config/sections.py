"""Reads the policy's dpop, shared_state and alerts sections."""

from __future__ import annotations

from agent.config._read import Ctx, get, mapping, number, read_secret, str_list, url
from agent.config.clients import MIN_HMAC_KEY_BYTES
from agent.config.model import ASYMMETRIC_ALGORITHMS, AlertSettings, Dpop, SharedStateConfig
from agent.config.yamlsrc import LDict

DPOP_KEYS = {
    "algorithms",
    "max_age_s",
    "leeway_s",
    "use_dpop_nonce",
    "nonce_lifetime_s",
    "nonce_secret_file",
    "replay_cache_entries",
}
SHARED_STATE_KEYS = {"redis", "password_file", "timeout_ms"}
NEW_SOURCE_NETWORK_KEYS = {"enabled", "days", "ipv4_prefix", "ipv6_prefix"}
ALERT_KEYS = {
    "failed_authentication",
    "token_from_many_addresses",
    "signature_failures",
    "rate_limit_abuse",
    "authorization_failures",
    "new_source_network",
    "cooldown_s",
    "webhook",
    "webhook_timeout_s",
}


def dpop(ctx: Ctx, d: LDict) -> Dpop:
    where = "dpop"
    ctx.keys(d, DPOP_KEYS, where)
    algs = str_list(ctx, d, "algorithms", where)
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
        text = read_secret(ctx, d, "nonce_secret_file", where)
        if text is not None:
            secret = text.encode()
            if len(secret) < MIN_HMAC_KEY_BYTES:
                ctx.err(d.lines["nonce_secret_file"], f"{where}.nonce_secret_file: use at least 32 random bytes")
    entries = get(ctx, d, "replay_cache_entries", int, where, 262_144)
    if entries < 1024:
        ctx.err(d.lines["replay_cache_entries"], f"{where}.replay_cache_entries must be at least 1024")
    return Dpop(
        algorithms=frozenset(algs) if algs else ASYMMETRIC_ALGORITHMS,
        max_age_s=number(ctx, d, "max_age_s", where, 60.0, minimum=1.0),
        leeway_s=number(ctx, d, "leeway_s", where, 5.0),
        use_nonce=bool(get(ctx, d, "use_dpop_nonce", bool, where, False)),
        nonce_lifetime_s=number(ctx, d, "nonce_lifetime_s", where, 300.0, minimum=1.0),
        nonce_secret=secret,
        replay_cache_entries=max(int(entries), 1024),
    )


def shared_state(ctx: Ctx, d: LDict) -> SharedStateConfig | None:
    where = "shared_state"
    ctx.keys(d, SHARED_STATE_KEYS, where)
    url = get(ctx, d, "redis", str, where)
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
    password = read_secret(ctx, d, "password_file", where) if "password_file" in d else None
    timeout_ms = number(ctx, d, "timeout_ms", where, 50.0, minimum=1.0)
    return SharedStateConfig(redis=url, password=password, timeout_s=timeout_ms / 1000)


def alerts(ctx: Ctx, d: LDict) -> AlertSettings:
    where = "alerts"
    ctx.keys(d, ALERT_KEYS, where)
    base = AlertSettings()

    def pair(key: str, count_key: str, count: int, window: float) -> tuple[int, float]:
        m = mapping(ctx, d, key, where)
        if m is None:
            return count, window
        ctx.keys(m, {count_key, "window_s"}, f"{where}.{key}")
        n = number(ctx, m, count_key, f"{where}.{key}", count, minimum=1)
        return int(n), number(ctx, m, "window_s", f"{where}.{key}", window, minimum=1)

    fa, faw = pair("failed_authentication", "count", base.failed_authn, base.failed_authn_window_s)
    ts, tsw = pair("token_from_many_addresses", "addresses", base.token_spread_addresses, base.token_spread_window_s)
    sf, sfw = pair("signature_failures", "count", base.signature_failures, base.signature_failures_window_s)
    rl, rlw = pair("rate_limit_abuse", "count", base.rate_limited, base.rate_limited_window_s)
    af, afw = pair("authorization_failures", "count", base.authorization_failures,
                   base.authorization_failures_window_s)  # fmt: skip
    if ts < 2:
        ctx.err(d.line, f"{where}.token_from_many_addresses.addresses must be at least 2")
    net = new_source_network(ctx, d, base)
    return AlertSettings(
        failed_authn=fa,
        failed_authn_window_s=faw,
        token_spread_addresses=ts,
        token_spread_window_s=tsw,
        signature_failures=sf,
        signature_failures_window_s=sfw,
        rate_limited=rl,
        rate_limited_window_s=rlw,
        authorization_failures=af,
        authorization_failures_window_s=afw,
        new_source_network=net[0],
        new_source_network_days=net[1],
        new_source_network_ipv4_prefix=net[2],
        new_source_network_ipv6_prefix=net[3],
        cooldown_s=number(ctx, d, "cooldown_s", where, base.cooldown_s),
        webhook=url(ctx, d, "webhook", where),
        webhook_timeout_s=number(ctx, d, "webhook_timeout_s", where, base.webhook_timeout_s, minimum=0.1),
    )


def new_source_network(ctx: Ctx, d: LDict, base: AlertSettings) -> tuple[bool, float, int, int]:
    """`new_source_network: true | false`, or a mapping of `enabled`, `days` and the two prefix lengths."""
    where = "alerts.new_source_network"
    off = (base.new_source_network, base.new_source_network_days, base.new_source_network_ipv4_prefix,
           base.new_source_network_ipv6_prefix)  # fmt: skip
    if "new_source_network" not in d:
        return off
    v = d["new_source_network"]
    if isinstance(v, bool):
        return (v, *off[1:])
    if not isinstance(v, LDict):
        ctx.err(d.lines["new_source_network"], f"{where} must be true, false or a mapping, got {v!r}")
        return off
    ctx.keys(v, NEW_SOURCE_NETWORK_KEYS, where)
    enabled = bool(get(ctx, v, "enabled", bool, where, True))
    days = number(ctx, v, "days", where, base.new_source_network_days, minimum=1)
    prefixes = []
    for key, default, low, high in (("ipv4_prefix", off[2], 8, 32), ("ipv6_prefix", off[3], 16, 128)):
        n = get(ctx, v, key, int, where, default)
        if not low <= n <= high:
            ctx.err(v.lines[key], f"{where}.{key} must be an integer from {low} to {high}, got {n}")
            n = default
        prefixes.append(int(n))
    return enabled, days, prefixes[0], prefixes[1]
