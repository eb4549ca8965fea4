"""RFC 7662 introspection of opaque access tokens at the one identity provider configured for it."""

from __future__ import annotations

import asyncio
import hashlib
import time
from base64 import b64encode
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from agent import reasons as R
from agent.authn.http import client_session, read_json
from agent.authn.jwt import check_audience, check_auth_time, principal_from_claims, time_claim
from agent.authn.principal import Principal
from agent.config.model import IdentityProvider
from agent.errors import AuthnError, KeySourceError

CACHE_ENTRIES = 10_000


class Introspector:
    """Asks the identity provider about an opaque token; caches positive answers briefly."""

    def __init__(self, idp: IdentityProvider, clock: Callable[[], float] = time.time) -> None:
        assert idp.introspection is not None
        self.idp = idp
        self.cfg = idp.introspection
        self.calls = 0
        self._clock = clock
        # Keyed by a hash of the token, so the cache holds no token text.
        self._cache: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Principal]] = {}
        self._sem = asyncio.Semaphore(self.cfg.max_concurrent)
        self._session: aiohttp.ClientSession | None = None
        # RFC 6749 §2.3.1: form-urlencode the credentials before Basic encoding them.
        pair = f"{quote(self.cfg.client_id, safe='')}:{quote(self.cfg.client_secret, safe='')}"
        self._headers = {"accept": "application/json", "authorization": "Basic " + b64encode(pair.encode()).decode()}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def cached(self, token: str) -> Principal | None:
        """A still-valid earlier answer for this token, without any I/O."""
        key = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(key)
        if hit is not None:
            principal, until = hit
            if self._clock() < until:
                return principal
            del self._cache[key]
        return None

    async def introspect(self, token: str) -> Principal:
        hit = self.cached(token)
        if hit is not None:
            return hit
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        if self._sem.locked():
            # Beyond the concurrency bound we fail closed now rather than queue behind a slow IdP.
            raise AuthnError(R.INTROSPECTION_UNAVAILABLE, "too many introspections in flight")
        fut: asyncio.Future[Principal] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            async with self._sem:
                principal = await self._ask(token)
            until = min(now + self.cfg.cache_s, principal.expires_at or now + self.cfg.cache_s)
            if until > now:
                self._cache[key] = (principal, until)
                if len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
            fut.set_result(principal)
            return principal
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: joiners re-raise it, nobody else must
            raise
        finally:
            del self._inflight[key]

    async def _ask(self, token: str) -> Principal:
        self.calls += 1
        return self._judge(await self._fetch(token))

    async def _fetch(self, token: str) -> dict[str, Any]:
        """The identity provider's answer about one token (RFC 7662 §2.2), as a JSON object."""
        if self._session is None:
            self._session = client_session(self.idp.ca_file, self.cfg.timeout_s)
        try:
            async with self._session.post(
                self.cfg.endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                allow_redirects=False,
                headers=self._headers,
            ) as resp:
                doc = await read_json(resp)
        except (aiohttp.ClientError, TimeoutError, OSError, KeySourceError) as e:
            raise AuthnError(R.INTROSPECTION_UNAVAILABLE, type(e).__name__) from None
        return doc

    def _judge(self, doc: dict[str, Any]) -> Principal:
        """The caller an answer names, after every check of its activity, issuer, times and audience."""
        if doc.get("active") is not True:
            raise AuthnError(R.TOKEN_INACTIVE)
        if "iss" in doc and doc["iss"] != self.idp.issuer:
            raise AuthnError(R.TOKEN_ISSUER_UNKNOWN)
        token_type = doc.get("token_type")
        if isinstance(token_type, str) and token_type.lower() == "refresh_token":
            raise AuthnError(R.TOKEN_INACTIVE, "refresh token")
        now = self._clock()
        leeway = self.idp.leeway_s
        exp = time_claim(doc, "exp", required=False)
        if exp is not None and now >= exp + leeway:
            raise AuthnError(R.TOKEN_EXPIRED)
        nbf = time_claim(doc, "nbf", required=False)
        if nbf is not None and now + leeway < nbf:
            raise AuthnError(R.TOKEN_NOT_YET_VALID)
        time_claim(doc, "iat", required=False)
        check_auth_time(doc, now, leeway)
        check_audience(self.idp, doc.get("aud"), required=self.cfg.require_audience)
        if doc.get("sub") is None:  # absent, or `"sub": null`, which names no one either
            # RFC 7662 §2.2: `username` names the resource owner when `sub` is absent (django-oauth-toolkit
            # answers so); only a token with neither is a client's own (client credentials).
            if doc.get("username") is not None:  # `"username": null` names no one: as if absent
                doc = {**doc, "sub": doc["username"]}
            elif isinstance(doc.get("client_id"), str):
                doc = {**doc, "sub": doc["client_id"]}
        return principal_from_claims(self.idp, doc, "introspection", exp)
