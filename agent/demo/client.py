"""The demo's client side: a DPoP key that makes proofs, and an RFC 9421 HMAC request signer.

Both are `policy test`'s own (agent/policytest/credentials.py), the ones its cases are made with; the tests
prove interop with independent clients (joserfc proofs, the http-message-signatures package).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from agent.policytest.credentials import DpopClient, Keys, content_digest
from agent.policytest.credentials import sign_request as sign

COMPONENTS = ("@method", "@authority", "@path", "content-digest")


class DpopKey:
    """A client's DPoP key pair (ES256); tokens bound to it carry `cnf.jkt` = `self.jkt`."""

    def __init__(self) -> None:
        self._client = DpopClient(Keys(), frozenset({"ES256"}))
        self.jkt = self._client.jkt

    def proof(self, method: str, url: str, access_token: str) -> str:
        """A fresh RFC 9449 proof for one request (single use: its jti is remembered by the agent)."""
        return self._client.proof(method, url.split("?", 1)[0], access_token, time.time(), None)


def sign_request(method: str, url: str, body: bytes, key: bytes, keyid: str) -> dict[str, str]:
    """Headers that sign a request with hmac-sha256 over @method, @authority, @path and content-digest."""
    u = urlsplit(url)
    headers = {"content-digest": content_digest(body), "content-type": "application/json"}
    created = int(time.time())
    headers.update(sign(key, keyid, COMPONENTS, method, u.scheme, u.netloc, u.path or "/", headers, created))
    return headers
