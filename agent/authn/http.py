"""The agent's outbound HTTP (JWKS, discovery, introspection): bounded in time and size, no redirects."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp

from agent.authn.strict import strict_json_object
from agent.errors import KeySourceError

MAX_BODY = 1 << 20


def client_session(ca_file: str | None, timeout_s: float) -> aiohttp.ClientSession:
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=16),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        # A key source is exactly the URL configured: no redirects, no proxies from the environment.
        trust_env=False,
    )


async def read_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    if resp.status != 200:
        raise KeySourceError(f"HTTP {resp.status}")
    body = await resp.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise KeySourceError("response larger than 1 MiB")
    try:
        return strict_json_object(body)
    except ValueError as e:
        raise KeySourceError(f"not a JSON object ({e})") from None


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    try:
        async with session.get(url, allow_redirects=False, headers={"accept": "application/json"}) as resp:
            return await read_json(resp)
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise KeySourceError(f"{type(e).__name__}: {e}") from None
