"""A local OpenID Connect identity provider: discovery, JWKS, introspection, and tokens minted with joserfc."""

from __future__ import annotations

import asyncio
import base64
import secrets
import ssl
import time
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

Key = ECKey | RSAKey | OKPKey


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
