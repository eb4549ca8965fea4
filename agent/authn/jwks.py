"""An identity provider's keys: fetched before ready, refreshed beside the hot path, never lost to an outage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import aiohttp

from agent.authn.http import client_session, get_json
from agent.authn.jwk import KeySet, parse_jwks
from agent.authn.strict import strict_json_object
from agent.config.model import IdentityProvider
from agent.errors import KeySourceError
from agent.urls import fetchable

log = logging.getLogger("agent.jwks")


class KeyStore:
    """The last good key set of one issuer, and the single-flight, rate-limited way to renew it."""

    def __init__(self, idp: IdentityProvider, clock: Callable[[], float] = time.monotonic) -> None:
        self.idp = idp
        self.keys: KeySet | None = None
        self.fetched_at: float | None = None  # clock() of the last successful fetch
        self.last_error: str | None = None
        self.fetch_count = 0  # attempts, for tests and metrics: a kid storm must not raise it
        self._clock = clock
        # Only refetches caused by unknown kids are rate-limited: the scheduled fetch must not delay the
        # pick-up of a key rotated in just after it.
        self._last_kid_refetch = -1e18
        self._inflight: asyncio.Task[bool] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._jwks_uri = idp.jwks_uri
        self._file_mtime: float | None = None

    @property
    def ready(self) -> bool:
        return self.keys is not None

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = client_session(self.idp.ca_file, self.idp.fetch_timeout_s)
        return self._session

    async def _fetch_once(self) -> bool:
        """One fetch; on any failure the previous key set stays and the error is remembered."""
        self.fetch_count += 1
        try:
            if self.idp.jwks_file is not None:
                doc = strict_json_object(await asyncio.to_thread(Path(self.idp.jwks_file).read_bytes))
            else:
                doc = await get_json(self._http(), await self._jwks_url())
            keys, skipped = parse_jwks(doc)
        except (KeySourceError, ValueError, OSError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning(
                "identity provider %s: key fetch failed, keeping the last good keys: %s", self.idp.name, self.last_error
            )
            return False
        self.keys = keys
        self.fetched_at = self._clock()
        self.last_error = None
        for why in skipped:
            log.warning("identity provider %s: skipped a JWKS member, %s", self.idp.name, why)
        return True

    async def _jwks_url(self) -> str:
        if self._jwks_uri is not None and not self.idp.discovery:
            return self._jwks_uri
        issuer = self.idp.issuer.rstrip("/")
        doc = await get_json(self._http(), f"{issuer}/.well-known/openid-configuration")
        # OpenID Connect Discovery 1.0 §4.3: the document must name exactly the issuer we asked.
        if doc.get("issuer") != self.idp.issuer:
            raise KeySourceError("discovery document names another issuer")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str):
            raise KeySourceError("discovery document has no jwks_uri")
        if not fetchable(uri):
            raise KeySourceError("discovery's jwks_uri is not https")
        self._jwks_uri = uri
        return uri

    def refresh(self) -> asyncio.Task[bool]:
        """Start a fetch, or join the one already running (single flight)."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._fetch_once())
        return self._inflight

    async def on_unknown_kid(self) -> bool:
        """A token names a kid we lack: refetch at most once per `min_refetch_s`, wait a short bound.

        Returns True when a fetch finished in time with success, so the caller may look the kid up again.
        A storm of tokens with unknown kids joins one fetch or is refused at once; it never becomes a storm
        of fetches, and no request waits longer than `unknown_kid_wait_s`.
        """
        running = self._inflight is not None and not self._inflight.done()
        if not running:
            if self._clock() - self._last_kid_refetch < self.idp.min_refetch_s:
                return False
            self._last_kid_refetch = self._clock()
        task = self.refresh()
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.idp.unknown_kid_wait_s)
        except TimeoutError:
            return False

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the keys fresh until `stop`: retry soon while failing, then every `refresh_s`."""
        backoff = 0.5
        while not stop.is_set():
            ok = await self.refresh()
            if ok:
                backoff = 0.5
                delay = self.idp.refresh_s
            else:
                delay = min(backoff, self.idp.refresh_s)
                backoff = min(backoff * 2, 30.0)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def status(self) -> dict[str, object]:
        age = None if self.fetched_at is None else round(self._clock() - self.fetched_at, 1)
        return {"ready": self.ready, "keys": self.keys.size if self.keys else 0, "age_s": age, "error": self.last_error}
