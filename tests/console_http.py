"""The console's login done over plain HTTP (aiohttp), as a browser would do it, for tests without a browser:
/ui/login/start -> the IdP's /authorize page -> its form posted -> /ui/callback with the login cookie."""

from __future__ import annotations

import re
import ssl
from urllib.parse import parse_qsl, urljoin, urlsplit

import aiohttp

from agent.demo.idp import LocalIdP


def console_client(ssl_context: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """A client with a cookie jar that keeps cookies of IP-address hosts (127.0.0.1), no redirects followed."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 connector=aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None)  # fmt: skip


async def http_login(http: aiohttp.ClientSession, base: str, idp: LocalIdP, user: str, password: str) -> str:
    """Sign `user` in at the console at `base`; the CSRF token of the new session (from the Fleet page)."""
    async with http.get(base + "/ui/login/start", allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        authorize = r.headers["Location"]
    assert authorize.startswith(idp.issuer + "/authorize?")
    form = dict(parse_qsl(urlsplit(authorize).query))
    async with http.post(idp.issuer + "/authorize", data={**form, "user": user, "password": password},
                         allow_redirects=False) as r:  # fmt: skip
        assert r.status == 303, await r.text()
        callback = r.headers["Location"]
    async with http.get(callback, allow_redirects=False) as r:
        assert r.status == 200, await r.text()
    async with http.get(base + "/ui/", allow_redirects=False) as r:
        assert r.status == 200, (r.status, r.headers.get("Location"))
        page = await r.text()
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def absolute(base: str, location: str) -> str:
    return urljoin(base, location)
