"""Console login: OpenID Connect authorization code flow with PKCE (S256), and the sessions it opens.

Everything secret stays on the server: a login attempt is remembered by its `state` (random, single use, 10 min)
with its nonce, PKCE verifier and the hash of a value the browser holds in a short-lived SameSite=Lax cookie (so
a callback another browser was sent to, with a stolen or planted `state`, does not log anyone in). The ID token is
verified with the agent's own JWT code against the issuer's JWKS only (signature, iss, aud = client id, times
with a small leeway, nonce); the session keeps who logged in, never a token. Sessions are kept by the SHA-256 of
their id: the id itself is only in the browser's cookie. Nothing here logs a code, token, state or session id.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit

import aiohttp

from agent.authn.http import client_session, get_json, read_json
from agent.authn.jwks import KeyStore
from agent.authn.jwt import JwtVerifier
from agent.config.model import IdentityProvider
from agent.controlplane.console import ConsoleConfig
from agent.controlplane.tls import _printable
from agent.errors import AuthnError, KeySourceError
from agent.urls import fetchable

log = logging.getLogger("agent.console")

SESSION_COOKIE = "authz_console"
# Over https the session cookie is named with the __Host- prefix, which browsers accept only when Secure, with
# Path=/ and no Domain: a sibling subdomain cannot plant a session cookie of its own (login fixation). The
# admin port serves /status and /ui only, so Path=/ shows it to nothing else.
SECURE_SESSION_COOKIE = "__Host-authz_console"


def session_cookie(secure: bool) -> tuple[str, str]:
    """The session cookie's name and path."""
    return (SECURE_SESSION_COOKIE, "/") if secure else (SESSION_COOKIE, "/ui")


LOGIN_COOKIE = "authz_console_login"  # SameSite=Lax: it must come back on the IdP's cross-site redirect
STATE_TTL_S = 600.0  # a login attempt not finished within this is forgotten
IDLE_S = 30 * 60.0  # a session unused this long ends
ABSOLUTE_S = 8 * 3600.0  # and every session ends this long after login
MAX_SESSIONS = 1000  # the least recently used goes first
MAX_PENDING = 10_000  # login attempts in flight; the oldest goes first (a few hundred bytes each)
# ... and per source address (an IPv6 /64): one that starts more loses its own oldest, so a flood of
# /ui/login/start from one place cannot push other people's logins out between their redirect and callback.
MAX_PENDING_PER_SOURCE = 16
DISCOVERY_TTL_S = 3600.0  # the discovery document is fetched again after this (or after a failure)
FETCH_TIMEOUT_S = 5.0
LEEWAY_S = 30.0
MAX_ID_TOKEN_LIFETIME_S = 86400.0
# Asymmetric JWS algorithms only: an ID token signed with the client secret (HS256) is never accepted.
ID_TOKEN_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                                 "EdDSA"})  # fmt: skip
MAX_NAME = 128  # a user's display name as shown


class LoginError(Exception):
    """A login that cannot go on: `message` is shown to the user (it holds no secret), `status` is the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class User:
    """Who is logged in: `roles` is {"viewer"} or {"viewer", "admin"} (an admin may do what a viewer may)."""

    subject: str
    name: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role in self.roles

    @property
    def role(self) -> str:
        return "admin" if "admin" in self.roles else "viewer"


@dataclass
class Session:
    user: User
    csrf: str  # the token every form of this session carries
    created: float
    last_used: float


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Sessions:
    """Server-side sessions by the SHA-256 of their id: idle and absolute limits, bounded in number."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_sessions: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._max = max_sessions
        self._by_digest: OrderedDict[bytes, Session] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._by_digest)

    def create(self, user: User) -> tuple[str, Session]:
        """A new session (256-bit random id): its id for the cookie, and the session."""
        sid = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(user, secrets.token_urlsafe(32), now, now)
        while len(self._by_digest) >= self._max:
            self._by_digest.popitem(last=False)
        self._by_digest[_digest(sid)] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session of `sid` (its last use now), or None; an expired one is deleted."""
        if not sid or len(sid) > 128:
            return None
        key = _digest(sid)
        session = self._by_digest.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_used > IDLE_S or now - session.created > ABSOLUTE_S:
            del self._by_digest[key]
            return None
        session.last_used = now
        self._by_digest.move_to_end(key)
        return session

    def delete(self, sid: str | None) -> None:
        if sid:
            self._by_digest.pop(_digest(sid), None)

    def end_all(self, subject: str) -> None:
        for key in [k for k, s in self._by_digest.items() if s.user.subject == subject]:
            del self._by_digest[key]


@dataclass
class Pending:
    """A login attempt between the redirect to the IdP and its callback."""

    nonce: str
    verifier: str  # PKCE code_verifier
    binding: bytes  # SHA-256 of the LOGIN_COOKIE value given to the browser that started it
    created: float
    source: str = ""  # where the browser that started it connected from (the per-source bound)


@dataclass(frozen=True)
class Endpoints:
    authorization: str
    token: str
    jwks: str
    algorithms: frozenset[str]


@dataclass
class _Discovered:
    endpoints: Endpoints
    at: float
    store: KeyStore
    verifier: JwtVerifier = field(init=False)

    def __post_init__(self) -> None:
        self.verifier = JwtVerifier({"console": self.store}, cache_entries=0)


def roles_of(claims: dict[str, Any], config: ConsoleConfig) -> frozenset[str]:
    """The console roles the ID token's roles claim grants (a list, or a space-separated string)."""
    value = claims.get(config.roles_claim)
    if isinstance(value, str):
        names = set(value.split())
    elif isinstance(value, list):
        names = {v for v in value if isinstance(v, str)}
    else:
        names = set()
    if config.admin_role in names:
        return frozenset({"admin", "viewer"})
    if config.viewer_role in names:
        return frozenset({"viewer"})
    return frozenset()


class LoginFlow:
    """The console as an OpenID Connect relying party of `config.issuer`."""

    def __init__(self, config: ConsoleConfig, redirect_uri: Callable[[], str], clock: Callable[[], float] = time.time):
        self.config = config
        self._redirect_uri = redirect_uri
        self._clock = clock
        self._pending: OrderedDict[str, Pending] = OrderedDict()
        self._by_source: dict[str, OrderedDict[str, None]] = {}  # source -> its pending states, oldest first
        self._discovered: _Discovered | None = None
        self._lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    @property
    def redirect_uri(self) -> str:
        return self._redirect_uri()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = client_session(str(self.config.ca_file) if self.config.ca_file else None, FETCH_TIMEOUT_S)
        return self._http

    async def close(self) -> None:
        if self._discovered is not None:
            await self._discovered.store.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _discover(self) -> _Discovered:
        """The issuer's endpoints and keys: discovery once an hour (at once again after a failure)."""
        async with self._lock:
            found = self._discovered
            if found is not None and self._clock() - found.at < DISCOVERY_TTL_S:
                return found
            issuer = self.config.issuer
            try:
                doc = await get_json(self._session(), issuer.rstrip("/") + "/.well-known/openid-configuration")
            except KeySourceError as e:
                log.warning("console: OIDC discovery at %s failed: %s", issuer, e)
                if found is not None:
                    return found  # the last good document stays
                raise LoginError("the identity provider cannot be reached; try again shortly", 503) from None
            endpoints = _endpoints(doc, issuer)
            idp = IdentityProvider(
                name="console",
                issuer=issuer,
                audiences=frozenset({self.config.client_id}),
                algorithms=endpoints.algorithms,
                jwks_uri=endpoints.jwks,
                leeway_s=LEEWAY_S,
                max_token_lifetime_s=MAX_ID_TOKEN_LIFETIME_S,
                token_types=frozenset({"jwt"}),  # an access token (typ at+jwt) is not an ID token
                ca_file=str(self.config.ca_file) if self.config.ca_file else None,
                fetch_timeout_s=FETCH_TIMEOUT_S,
                min_refetch_s=10.0,
                unknown_kid_wait_s=2.0,
            )
            if found is not None:
                await found.store.close()
            self._discovered = _Discovered(endpoints, self._clock(), KeyStore(idp))
            return self._discovered

    def _take(self, state: str) -> Pending | None:
        """Forget the login attempt `state` (finished, expired or pushed out); the attempt, or None."""
        pending = self._pending.pop(state, None)
        if pending is not None:
            mine = self._by_source.get(pending.source)
            if mine is not None:
                mine.pop(state, None)
                if not mine:
                    del self._by_source[pending.source]
        return pending

    async def begin(self, source: str = "") -> tuple[str, str]:
        """Start a login for a browser at `source`: (the IdP's authorization URL to redirect to, the value for the
        LOGIN_COOKIE). At most MAX_PENDING_PER_SOURCE attempts per source are kept: its own oldest goes first."""
        found = await self._discover()
        now = self._clock()
        while self._pending and now - next(iter(self._pending.values())).created > STATE_TTL_S:
            self._take(next(iter(self._pending)))
        mine = self._by_source.get(source)
        while mine and len(mine) >= MAX_PENDING_PER_SOURCE:
            self._take(next(iter(mine)))
        while len(self._pending) >= MAX_PENDING:
            self._take(next(iter(self._pending)))
        state, nonce, verifier, binding = (secrets.token_urlsafe(32) for _ in range(4))
        self._pending[state] = Pending(nonce, verifier, _digest(binding), now, source)
        self._by_source.setdefault(source, OrderedDict())[state] = None
        challenge = _b64(hashlib.sha256(verifier.encode("ascii")).digest())
        query = urlencode({
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": "openid profile",
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        })  # fmt: skip
        sep = "&" if "?" in found.endpoints.authorization else "?"
        return f"{found.endpoints.authorization}{sep}{query}", binding

    async def finish(self, state: str, code: str, binding: str | None) -> User:
        """The callback: the attempt `state` names (once), from the browser that started it, its code exchanged
        and the ID token verified; the user with their console roles (LoginError when anything fails)."""
        pending = self._take(state) if state else None
        if pending is None or self._clock() - pending.created > STATE_TTL_S:
            raise LoginError("this login attempt is unknown or expired; sign in again")
        if not binding or not secrets.compare_digest(_digest(binding), pending.binding):
            raise LoginError("this login was started in another browser (or its cookie was lost); sign in again")
        if not code or len(code) > 2048:
            raise LoginError("the identity provider sent no authorization code")
        found = await self._discover()
        id_token = await self._exchange(found.endpoints.token, code, pending.verifier)
        try:
            if found.store.keys is None:
                await found.store.refresh()
            principal = await found.verifier.verify(id_token)
        except AuthnError as e:
            log.warning("console: an ID token from %s was refused: %s", self.config.issuer, e.reason)
            raise LoginError(f"the identity provider's ID token was refused ({e.reason})", 502) from None
        claims = principal.claims
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not secrets.compare_digest(nonce.encode(), pending.nonce.encode()):
            log.warning("console: an ID token from %s was refused: nonce mismatch", self.config.issuer)
            raise LoginError("the identity provider's ID token was refused (nonce mismatch)", 502)
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.config.client_id:
            raise LoginError("the identity provider's ID token was refused (azp is not this console)", 502)
        name = claims.get("name") or claims.get("preferred_username") or principal.subject
        return User(principal.subject, _printable(str(name), MAX_NAME), roles_of(claims, self.config))

    async def _exchange(self, token_endpoint: str, code: str, verifier: str) -> str:
        """The code for an ID token at the token endpoint (with the PKCE verifier; the client secret if any)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
                "client_id": self.config.client_id, "code_verifier": verifier}  # fmt: skip
        headers = {"accept": "application/json"}
        if self.config.client_secret is not None:  # RFC 6749 2.3.1: each part form-encoded, then Basic
            pair = f"{quote_plus(self.config.client_id)}:{quote_plus(self.config.client_secret)}"
            headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        try:
            async with self._session().post(token_endpoint, data=form, allow_redirects=False,
                                            headers=headers) as resp:  # fmt: skip
                status = resp.status
                doc = await read_json(resp) if status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, KeySourceError) as e:
            log.warning("console: the token endpoint of %s failed: %s", self.config.issuer, type(e).__name__)
            raise LoginError("the identity provider's token endpoint cannot be reached; sign in again", 502) from None
        if doc is None:
            log.warning("console: the token endpoint of %s refused the code (HTTP %d)", self.config.issuer, status)
            raise LoginError(f"the identity provider refused the code (HTTP {status}); sign in again", 502)
        id_token = doc.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise LoginError("the identity provider's answer has no ID token", 502)
        return id_token


def _endpoints(doc: dict[str, Any], issuer: str) -> Endpoints:
    """What the console needs of a discovery document, each checked (the issuer exactly, endpoints https or
    loopback http, PKCE S256 when the IdP says which methods it takes)."""
    if doc.get("issuer") != issuer:
        raise LoginError("the identity provider's discovery document names another issuer", 502)
    urls: dict[str, str] = {}
    for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = doc.get(key)
        if not isinstance(value, str) or not fetchable(value) or urlsplit(value).fragment:
            raise LoginError(f"the identity provider's discovery document has no usable {key}", 502)
        urls[key] = value
    methods = doc.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        raise LoginError("the identity provider does not support PKCE with S256", 502)
    advertised = doc.get("id_token_signing_alg_values_supported")
    algorithms = ID_TOKEN_ALGORITHMS
    if isinstance(advertised, list):
        algorithms = ID_TOKEN_ALGORITHMS & {a for a in advertised if isinstance(a, str)}
    if not algorithms:
        raise LoginError("the identity provider signs ID tokens with no algorithm the console accepts", 502)
    return Endpoints(urls["authorization_endpoint"], urls["token_endpoint"], urls["jwks_uri"], frozenset(algorithms))
