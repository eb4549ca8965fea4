"""A local OpenID Connect identity provider: discovery, JWKS, introspection, and tokens minted with joserfc.

It also logs people in, for the control plane's console: `/authorize` shows a login page for its demo users
(passwords generated per run), `/token` exchanges an authorization code for an ID token, with PKCE (S256) checked
and the code single use, short-lived and bound to the client and redirect URI it was issued for.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, urlencode

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

Key = ECKey | RSAKey | OKPKey
CODE_TTL_S = 60.0  # an authorization code not exchanged within this is refused
ID_TOKEN_TTL_S = 300
MAX_CODES = 1000  # codes not yet exchanged; the oldest go first
# The login page's own policy: its one stylesheet is inline (no file to serve), no script at all.
LOGIN_CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self' http: https:; "
             "frame-ancestors 'none'; base-uri 'none'")  # fmt: skip


@dataclass(frozen=True)
class DemoUser:
    name: str  # the login name, and the ID token's sub
    display: str
    password: str
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class DemoClient:
    client_id: str
    redirect_uris: frozenset[str]
    secret: str | None = None  # None: a public client (PKCE only)


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str | None
    user: DemoUser
    issued: float = field(default_factory=time.monotonic)


def _new_key(alg: str, kid: str) -> Key:
    if alg.startswith("ES"):
        crv = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
        return ECKey.generate_key(crv, parameters={"kid": kid}, private=True)
    if alg in ("EdDSA", "Ed25519"):
        return OKPKey.generate_key("Ed25519", parameters={"kid": kid}, private=True)
    return RSAKey.generate_key(2048, parameters={"kid": kid}, private=True)


class LocalIdP:
    """A real HTTP identity provider on loopback. `mode` makes it misbehave for outage tests."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        alg: str = "ES256",
        client_id: str = "agent",
        client_secret: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.alg = alg
        self.keys: list[Key] = [_new_key(alg, "key-1")]
        self.published: list[Key] = list(self.keys)
        self.mode = "ok"  # "ok", "down" (503), "garbage" (not JSON), "empty" (no keys), "slow" (slow_s)
        self.slow_s = 5.0
        self.jwks_hits = 0
        self.discovery_hits = 0
        self.introspection_hits = 0
        self.client_id = client_id
        self.client_secret = client_secret or secrets.token_urlsafe(24)
        self.opaque: dict[str, dict[str, Any]] = {}
        self.users: dict[str, DemoUser] = {}
        self.clients: dict[str, DemoClient] = {}
        self._codes: dict[str, _Code] = {}  # by the SHA-256 of the code
        self.token_hits = 0
        self._runner: web.AppRunner | None = None

    @property
    def issuer(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks.json"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks.json", self._jwks)
        app.router.add_post("/introspect", self._introspect)
        app.router.add_get("/authorize", self._authorize_page)
        app.router.add_post("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _misbehave(self) -> web.Response | None:
        if self.mode == "down":
            return web.Response(status=503, text="unavailable")
        if self.mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="application/json")
        if self.mode == "slow":
            await asyncio.sleep(self.slow_s)
        return None

    async def _discovery(self, _: web.Request) -> web.Response:
        self.discovery_hits += 1
        bad = await self._misbehave()
        if bad is not None:
            return bad
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": self.jwks_uri,
                "introspection_endpoint": f"{self.issuer}/introspect",
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code"],
                "code_challenge_methods_supported": ["S256"],
                "subject_types_supported": ["public"],
                "scopes_supported": ["openid", "profile"],
                "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
                "id_token_signing_alg_values_supported": [self.alg],
            }
        )

    async def _jwks(self, _: web.Request) -> web.Response:
        self.jwks_hits += 1
        bad = await self._misbehave()
        if bad is not None:
            return bad
        if self.mode == "empty":
            return web.json_response({"keys": []})
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.published]})

    async def _introspect(self, request: web.Request) -> web.Response:
        self.introspection_hits += 1
        bad = await self._misbehave()
        if bad is not None:
            return bad
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if not secrets.compare_digest(request.headers.get("authorization", ""), expected):
            return web.json_response({"error": "invalid_client"}, status=401)
        form = await request.post()
        claims = self.opaque.get(str(form.get("token", "")))
        if claims is None or claims.get("exp", 0) < time.time():
            return web.json_response({"active": False})
        return web.json_response({"active": True, **claims})

    def rotate(self, keep_old: bool = True) -> Key:
        """A new signing key, published at once; the old one stays published unless keep_old is False."""
        key = _new_key(self.alg, f"key-{len(self.keys) + 1}")
        self.keys.insert(0, key)
        self.published = [key, *self.published] if keep_old else [key]
        return key

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        base: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "alice",
            "aud": "orders-api",
            "iat": now,
            "exp": now + 600,
            "jti": secrets.token_hex(8),
            "client_id": "web-app",
            "scope": "orders:read",
        }
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def mint(
        self,
        claims: dict[str, Any] | None = None,
        *,
        key: Key | None = None,
        header: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        """A signed access token (RFC 9068 `at+jwt`) for this issuer; `overrides` change claims."""
        key = key or self.keys[0]
        hdr: dict[str, Any] = {"alg": self.alg, "typ": "at+jwt", "kid": key.kid}
        hdr.update(header or {})
        body = claims if claims is not None else self.claims(**overrides)
        return jwt.encode({k: v for k, v in hdr.items() if v is not None}, body, key, algorithms=[hdr["alg"]])

    def mint_opaque(self, prefix: str = "", **overrides: Any) -> str:
        token = prefix + secrets.token_urlsafe(32)
        claims = self.claims(**overrides)
        self.opaque[token] = {**claims, "token_type": "Bearer"}
        return token

    # -- logging people in (authorization code + PKCE) ---------------------------------------------------------

    def add_user(self, name: str, roles: tuple[str, ...] = (), display: str | None = None) -> str:
        """A demo user with a password made now; returns the password."""
        password = secrets.token_urlsafe(12)
        self.users[name] = DemoUser(name, display or name.title(), password, roles)
        return password

    def demo_users(self, admin_role: str = "authz-admin", viewer_role: str = "authz-viewer") -> dict[str, str]:
        """The console's demo users: ada (admin) and vic (viewer); their passwords, by name."""
        return {
            "ada": self.add_user("ada", (admin_role,), "Ada Lovelace"),
            "vic": self.add_user("vic", (viewer_role,), "Vic Viewer"),
        }

    def register_client(self, client_id: str, redirect_uris: list[str], secret: str | None = None) -> None:
        """A relying party: the only redirect URIs it may use (exact match), and its secret if confidential."""
        self.clients[client_id] = DemoClient(client_id, frozenset(redirect_uris), secret)

    def _login_problem(self, params: Any) -> str | None:
        """Why an authorization request is refused outright (shown here, never redirected to an unknown URI)."""
        client = self.clients.get(str(params.get("client_id", "")))
        if client is None:
            return "unknown client_id"
        if params.get("redirect_uri") not in client.redirect_uris:
            return "redirect_uri is not registered for this client"
        if params.get("response_type") != "code":
            return "response_type must be code"
        if "openid" not in str(params.get("scope", "")).split():
            return "scope must include openid"
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return "PKCE with code_challenge_method S256 is required"
        return None

    async def _authorize_page(self, request: web.Request) -> web.Response:
        problem = self._login_problem(request.query)
        if problem is not None:
            return self._page(f"<h1>Cannot sign in</h1><p>{html.escape(problem)}</p>", 400)
        return self._login_form(request.query, "", 200)

    def _login_form(self, params: Any, error: str, status: int) -> web.Response:
        keep = ("client_id", "redirect_uri", "response_type", "scope", "state", "nonce", "code_challenge",
                "code_challenge_method")  # fmt: skip
        hidden = "".join(
            f'<input type="hidden" name="{k}" value="{html.escape(str(params.get(k, "")))}">' for k in keep
        )
        options = "".join(
            f'<option value="{html.escape(u.name)}">{html.escape(u.display)} ({html.escape(u.name)}'
            f"{': ' + html.escape(', '.join(u.roles)) if u.roles else ''})</option>"
            for u in self.users.values()
        )
        client = html.escape(str(params.get("client_id", "")))
        err = f'<p class="error">{html.escape(error)}</p>' if error else ""
        body = (
            f"<h1>Demo identity provider</h1><p><b>{client}</b> asks you to sign in.</p>{err}"
            f'<form method="post" action="/authorize">{hidden}'
            f'<label for="user">User</label><select id="user" name="user">{options}</select>'
            f'<label for="password">Password</label>'
            f'<input id="password" name="password" type="password" autocomplete="current-password" required>'
            f'<button type="submit">Sign in</button></form>'
            f'<p class="muted">The demo users\' passwords are printed by <code>authz-agent demo</code>.</p>'
        )
        return self._page(body, status)

    def _page(self, body: str, status: int) -> web.Response:
        style = (
            "*{box-sizing:border-box}"
            "body{font:15px/1.45 system-ui,sans-serif;background:#eef1f5;color:#1d2330;margin:0}"
            "main{max-width:420px;margin:60px auto;background:#fff;border:1px solid #d9dee6;border-radius:8px;"
            "padding:20px 28px}h1{font-size:21px}label{display:block;font-weight:600;margin:12px 0 4px}"
            "select,input{width:100%;padding:7px;font:inherit;border:1px solid #c5ccd6;border-radius:6px}"
            "button{margin-top:16px;padding:8px 18px;font:inherit;background:#0f766e;color:#fff;border:0;"
            "border-radius:6px}.error{background:#fde7e5;color:#b3261e;padding:8px;border-radius:6px}"
            ".muted{color:#5f6b7a;font-size:13px}"
        )
        page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Demo IdP sign-in</title>"
                f"<style>{style}</style></head><body><main>{body}</main></body></html>")  # fmt: skip
        headers = {"Content-Security-Policy": LOGIN_CSP, "Cache-Control": "no-store", "X-Frame-Options": "DENY"}
        return web.Response(text=page, status=status, content_type="text/html", headers=headers)

    async def _authorize(self, request: web.Request) -> web.Response:
        form = await request.post()
        problem = self._login_problem(form)
        if problem is not None:
            return self._page(f"<h1>Cannot sign in</h1><p>{html.escape(problem)}</p>", 400)
        user = self.users.get(str(form.get("user", "")))
        password = str(form.get("password", ""))
        if user is None or not secrets.compare_digest(password.encode(), user.password.encode()):
            return self._login_form(form, "Wrong user or password.", 401)
        code = secrets.token_urlsafe(32)
        now = time.monotonic()
        for key in [k for k, c in self._codes.items() if now - c.issued > CODE_TTL_S]:
            del self._codes[key]
        while len(self._codes) >= MAX_CODES:
            del self._codes[next(iter(self._codes))]
        nonce, redirect_uri = form.get("nonce"), str(form["redirect_uri"])
        self._codes[_sha256(code)] = _Code(str(form["client_id"]), redirect_uri, str(form["code_challenge"]),
                                           str(nonce) if nonce else None, user)  # fmt: skip
        query = {"code": code, **({"state": str(form["state"])} if form.get("state") else {})}
        raise web.HTTPSeeOther(f"{redirect_uri}?{urlencode(query)}")

    async def _token(self, request: web.Request) -> web.Response:
        self.token_hits += 1
        form = await request.post()

        def refuse(error: str, status: int = 400) -> web.Response:
            return web.json_response({"error": error}, status=status, headers={"Cache-Control": "no-store"})

        if form.get("grant_type") != "authorization_code":
            return refuse("unsupported_grant_type")
        client_id, secret = str(form.get("client_id", "")), form.get("client_secret")
        basic = request.headers.get("authorization", "")
        if basic.startswith("Basic "):
            try:
                client_id, _, got = (unquote_plus(p) for p in base64.b64decode(basic[6:]).decode().partition(":"))
            except ValueError:
                return refuse("invalid_client", 401)
            secret = got
        client = self.clients.get(client_id)
        if client is None:
            return refuse("invalid_client", 401)
        if client.secret is not None and not (
            isinstance(secret, str) and secrets.compare_digest(secret.encode(), client.secret.encode())
        ):
            return refuse("invalid_client", 401)
        code = self._codes.pop(_sha256(str(form.get("code", ""))), None)  # single use, whatever happens next
        if code is None or time.monotonic() - code.issued > CODE_TTL_S:
            return refuse("invalid_grant")
        if code.client_id != client_id or code.redirect_uri != form.get("redirect_uri"):
            return refuse("invalid_grant")
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not verifier or not secrets.compare_digest(challenge.encode(), code.challenge.encode()):
            return refuse("invalid_grant")
        now = int(time.time())
        user = code.user
        id_claims: dict[str, Any] = {"iss": self.issuer, "sub": user.name, "aud": client_id, "iat": now,
                                     "exp": now + ID_TOKEN_TTL_S, "auth_time": now, "name": user.display,
                                     "preferred_username": user.name, "roles": list(user.roles)}  # fmt: skip
        if code.nonce is not None:
            id_claims["nonce"] = code.nonce
        key = self.keys[0]
        id_token = jwt.encode({"alg": self.alg, "typ": "JWT", "kid": key.kid}, id_claims, key, algorithms=[self.alg])
        access = self.mint(sub=user.name, aud=client_id, client_id=client_id, roles=list(user.roles), scope="openid")
        return web.json_response(
            {"access_token": access, "token_type": "Bearer", "expires_in": 600, "id_token": id_token},
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
