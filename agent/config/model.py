"""The policy as frozen objects: what the loader produces and the engine reads, nothing mutable."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.policy.cel import When

# JWS algorithms an identity provider may sign access tokens with. Symmetric (HS*) ones are absent on
# purpose: a JWKS is public, so an HMAC key in it would let anyone mint tokens.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)
DEFAULT_TOKEN_TYPES = ("at+jwt", "application/at+jwt", "jwt")
# What an RFC 9421 signature must cover unless a client says otherwise (plus content-digest with a body).
DEFAULT_HMAC_COMPONENTS = ("@method", "@authority", "@path")


@lru_cache(maxsize=256)
def claim_path(name: str) -> tuple[str, ...]:
    """A dotted claim name as the path of keys into nested claims (split once per name)."""
    return tuple(name.split("."))


@dataclass(frozen=True, slots=True)
class ClaimNames:
    """Where an identity provider puts the facts the rules read (dotted paths for nested claims)."""

    subject: str = "sub"
    roles: str = "roles"
    scopes: str = "scope"
    client_id: str = "client_id"
    # The same names split once into paths when the policy loads, so no request splits strings or calls.
    subject_path: tuple[str, ...] = field(init=False, repr=False, compare=False)
    roles_path: tuple[str, ...] = field(init=False, repr=False, compare=False)
    scopes_path: tuple[str, ...] = field(init=False, repr=False, compare=False)
    client_id_path: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("subject", "roles", "scopes", "client_id"):
            object.__setattr__(self, f"{name}_path", claim_path(getattr(self, name)))


@dataclass(frozen=True, slots=True)
class Introspection:
    """RFC 7662 introspection of opaque tokens, authenticated with client credentials."""

    endpoint: str
    client_id: str
    client_secret: str = field(repr=False)
    # An answer must carry an `aud` naming one of the provider's audiences; false only for servers that
    # never send `aud` (one that is sent must still match).
    require_audience: bool = True
    cache_s: float = 30.0
    timeout_s: float = 2.0  # a stock django-oauth-toolkit answers in 0.35-0.64 s (PBKDF2 client secret per call)
    max_concurrent: int = 32


@dataclass(frozen=True, slots=True)
class IdentityProvider:
    """One trusted OpenID Connect / OAuth issuer and how its tokens are checked."""

    name: str
    issuer: str
    audiences: frozenset[str]
    algorithms: frozenset[str]
    jwks_uri: str | None = None
    jwks_file: str | None = None
    discovery: bool = False
    leeway_s: float = 30.0
    max_token_lifetime_s: float = 86400.0
    claims: ClaimNames = ClaimNames()
    token_types: frozenset[str] = frozenset(DEFAULT_TOKEN_TYPES)
    require_typ: bool = False
    ca_file: str | None = None
    refresh_s: float = 300.0
    min_refetch_s: float = 30.0
    fetch_timeout_s: float = 2.0
    unknown_kid_wait_s: float = 0.25
    max_token_bytes: int = 8192
    introspection: Introspection | None = None


@dataclass(frozen=True, slots=True)
class ClaimRule:
    """The token's claim at `path` must equal `literal`, or the path parameter named `param`."""

    path: tuple[str, ...]
    literal: str | int | float | bool | None = None
    param: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """A request header condition: equal to a value, present or absent, or starting with a prefix."""

    name: str  # lower-case, as Envoy passes names
    equals: str | None = None
    present: bool | None = None
    prefix: str | None = None


# What a `when` may read without its outcome changing between requests with the same token, method and path:
# an alternative reading only these may be remembered (the engine's fast path).
STATIC_REFERENCES = frozenset(
    {"claims", "subject", "client_id", "scopes", "roles", "params", "request.method", "request.path"}
)
# What exists only once a caller is authenticated.
CREDENTIAL_REFERENCES = frozenset({"claims", "subject", "client_id", "scopes", "roles"})


class Networks:
    """`source_cidrs` as sorted, merged address ranges: one lookup is a binary search, however long the list
    (a blocklist of 1,024 networks tested one by one cost ~300 us a request)."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, nets: Iterable[IPv4Network | IPv6Network]) -> None:
        nets = list(nets)
        self._v4 = self._ranges(n for n in nets if n.version == 4)
        self._v6 = self._ranges(n for n in nets if n.version == 6)

    @staticmethod
    def _ranges(nets: Iterable[IPv4Network | IPv6Network]) -> tuple[list[int], list[int]]:
        starts: list[int] = []
        ends: list[int] = []
        for first, last in sorted((int(n.network_address), int(n.broadcast_address)) for n in nets):
            if ends and first <= ends[-1] + 1:
                ends[-1] = max(ends[-1], last)
            else:
                starts.append(first)
                ends.append(last)
        return starts, ends

    def contains(self, address: IPv4Address | IPv6Address) -> bool:
        starts, ends = self._v4 if address.version == 4 else self._v6
        n = int(address)
        i = bisect_right(starts, n) - 1
        return i >= 0 and n <= ends[i]


@dataclass(frozen=True, slots=True)
class Conditions:
    """One alternative of a route's `allow`, or the body of a deny rule: every listed condition must hold."""

    scopes_all: frozenset[str] = frozenset()
    scopes_any: frozenset[str] = frozenset()
    roles_all: frozenset[str] = frozenset()
    roles_any: frozenset[str] = frozenset()
    claims: tuple[ClaimRule, ...] = ()
    acr_any: tuple[str, ...] = ()
    max_auth_age_s: float | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    source_cidrs: tuple[IPv4Network | IPv6Network, ...] = ()
    headers: tuple[HeaderRule, ...] = ()
    when: When | None = None
    line: int = 0
    # Derived once: whether they read the caller's credentials (judged only once authenticated), and whether
    # the outcome can change between requests with the same token, method and path (the clock, the source,
    # headers, or a `when` reading more than the token, path parameters and request line).
    credentials: bool = field(init=False, compare=False, repr=False)
    per_request: bool = field(init=False, compare=False, repr=False)
    # ... and whether it changes only with the caller's address (source_cidrs, a `when` reading `source.address`):
    # the same on every request from one address (agent._recall answers per address). Not `source` whole or
    # `source.certificate_present`: one address may send with and without a client certificate.
    per_source: bool = field(init=False, compare=False, repr=False)
    networks: Networks = field(init=False, compare=False, repr=False)  # source_cidrs, for lookups

    def __post_init__(self) -> None:
        refs = self.when.references if self.when is not None else frozenset()
        credentials = bool(
            self.scopes_all
            or self.scopes_any
            or self.roles_all
            or self.roles_any
            or self.claims
            or self.acr_any
            or self.max_auth_age_s is not None
            or not refs.isdisjoint(CREDENTIAL_REFERENCES)
        )
        per_request = bool(
            self.not_before is not None
            or self.not_after is not None
            or self.max_auth_age_s is not None
            or self.source_cidrs
            or self.headers
            or not refs <= STATIC_REFERENCES
        )
        object.__setattr__(self, "networks", Networks(self.source_cidrs))
        object.__setattr__(self, "credentials", credentials)
        object.__setattr__(self, "per_request", per_request)
        source_only = (
            self.not_before is None
            and self.not_after is None
            and self.max_auth_age_s is None
            and not self.headers
            and all(r in STATIC_REFERENCES or r == "source.address" for r in refs)
        )
        object.__setattr__(self, "per_source", per_request and source_only)


Allow = Conditions  # one alternative of `allow` (the name the policy file uses)


@dataclass(frozen=True, slots=True)
class DenyRule:
    """A rule that refuses (403 denied_by_rule) whatever `allow` says, when all its conditions hold."""

    name: str
    conditions: Conditions
    line: int = 0


@dataclass(frozen=True, slots=True)
class Dpop:
    """How DPoP proofs (RFC 9449) are checked: algorithms, freshness window, server nonces, replay cache."""

    algorithms: frozenset[str] = ASYMMETRIC_ALGORITHMS
    max_age_s: float = 60.0  # a proof's iat may be this old
    leeway_s: float = 5.0  # and this far in the future (clock skew)
    use_nonce: bool = False  # RFC 9449 §8: proofs must carry a nonce this agent issued (DPoP-Nonce)
    nonce_lifetime_s: float = 300.0
    # Nonces are MACed with this secret; replicas that share it accept each other's nonces. Random per
    # process when not configured.
    nonce_secret: bytes | None = field(default=None, repr=False)
    replay_cache_entries: int = 262_144


@dataclass(frozen=True, slots=True)
class HmacClient:
    """A client that signs requests with RFC 9421 `hmac-sha256`; its name is the signature's keyid."""

    name: str
    keys: tuple[bytes, ...] = field(repr=False)  # every active key (rotation): any one may verify
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    components: tuple[str, ...] = DEFAULT_HMAC_COMPONENTS  # must be covered; plus content-digest with a body
    max_age_s: float = 300.0  # `created` may be this old
    leeway_s: float = 5.0
    require_nonce: bool = True
    line: int = 0


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket per key: `rate` requests a second on average, bursts up to `burst`."""

    key: tuple[str, ...]  # parts: subject, client_id, source_ip, route, header:NAME, claim:PATH
    rate: float  # tokens a second
    burst: float
    window_s: float  # the policy's stated window (1 or 60 s), for RateLimit-Policy
    quota: float  # requests per window as written, for RateLimit-Policy
    shared: bool = False
    line: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    """One per-route rule as a service owner wrote it."""

    name: str
    path: str
    methods: frozenset[str] | None  # None: any method
    public: bool = False
    authn: tuple[str, ...] = ()
    allow: tuple[Conditions, ...] = ()  # alternatives: the request passes when any one holds
    deny: tuple[DenyRule, ...] = ()
    providers: frozenset[str] | None = None  # identity providers whose tokens the route takes; None: any
    forward_token: bool = False
    audit_omit_params: frozenset[str] = frozenset()  # path parameters kept out of audit records (sensitive ones)
    bind: str | None = None  # "dpop" or "mtls": the token must be bound to the caller's key or certificate
    rate_limit: RateLimit | None = None
    mode: str = "enforce"  # "shadow": the allow rules are evaluated and audited, never enforced
    # %25 followed by two hex digits in the path (a double encoding) is refused unless the route allows it
    allow_double_encoded_path: bool = False
    line: int = 0


@dataclass(frozen=True, slots=True)
class SharedStateConfig:
    """Redis shared by the replicas of a service: shared quotas, and replay caches that span replicas."""

    redis: str  # redis://host:port/db (rediss:// for TLS); a password comes from password_file
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 0.05


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Thresholds of the anomaly alerts (agent/audit/alerts.py) and where they are posted."""

    failed_authn: int = 20  # authentication failures from one source address within the window
    failed_authn_window_s: float = 60.0
    token_spread_addresses: int = 3  # one token (jti) used from this many source addresses within the window
    token_spread_window_s: float = 300.0
    signature_failures: int = 5  # request-signature failures from one source address
    signature_failures_window_s: float = 60.0
    rate_limited: int = 50  # 429s for one client, subject or address
    rate_limited_window_s: float = 60.0
    authorization_failures: int = 20  # 403s for one authenticated client (else subject) within the window
    authorization_failures_window_s: float = 60.0
    new_source_network: bool = True  # a client id seen from a network it has not used in `days`
    new_source_network_days: float = 7.0  # how long a client's network is remembered after it was last seen
    new_source_network_ipv4_prefix: int = 24  # what one network is: the source masked to this many bits
    new_source_network_ipv6_prefix: int = 48
    cooldown_s: float = 300.0  # the same alert for the same key at most once in this time
    webhook: str | None = None  # POSTed each alert as JSON (https://, or http:// to loopback)
    webhook_timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole, validated policy file."""

    service: str
    identity_providers: tuple[IdentityProvider, ...]
    routes: tuple[Route, ...]
    version: str  # the service name and a digest of the file: what audit records and /readyz report
    source: str = "<policy>"
    default: str = "deny"
    dpop: Dpop = Dpop()
    hmac_clients: tuple[HmacClient, ...] = ()
    shared_state: SharedStateConfig | None = None
    alerts: AlertSettings = AlertSettings()
    deny: tuple[DenyRule, ...] = ()  # top-level deny rules: every route, public ones included
    # Problems that do not stop the policy from loading (a grant that has ended): file:line and message
    warnings: tuple[tuple[int, str], ...] = ()
    # Secrets a `policy test` load could not read and replaced with throwaway values (file:line: what)
    stood_in: tuple[str, ...] = ()

    def warning_lines(self) -> list[str]:
        """The warnings as `file:line: warning: message`, for logs and `policy lint`."""
        return [f"{self.source}:{line}: warning: {message}" for line, message in self.warnings]
