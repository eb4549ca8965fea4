"""The demo's client side: a DPoP key that makes proofs (joserfc) and an RFC 9421 HMAC request signer.

Only for showing the agent at work; the tests prove interop with independent clients (joserfc proofs,
the http-message-signatures package).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from urllib.parse import urlsplit

from joserfc import jws
from joserfc.jwk import ECKey


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class DpopKey:
    """A client's DPoP key pair; tokens bound to it carry `cnf.jkt` = `self.jkt`."""

    def __init__(self) -> None:
        self.key = ECKey.generate_key("P-256", private=True)
        self.jkt = str(self.key.thumbprint())

    def proof(self, method: str, url: str, access_token: str) -> str:
        """A fresh RFC 9449 proof for one request (single use: its jti is remembered by the agent)."""
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.key.as_dict(private=False)}
        claims = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": url.split("?", 1)[0],
            "iat": int(time.time()),
            "ath": _b64url(hashlib.sha256(access_token.encode()).digest()),
        }
        return jws.serialize_compact(header, json.dumps(claims).encode(), self.key, algorithms=["ES256"])


def sign_request(method: str, url: str, body: bytes, key: bytes, keyid: str) -> dict[str, str]:
    """Headers that sign a request with hmac-sha256 over @method, @authority, @path and content-digest."""
    u = urlsplit(url)
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    params = f';created={int(time.time())};nonce="{secrets.token_urlsafe(12)}";keyid="{keyid}";alg="hmac-sha256"'
    covered = '("@method" "@authority" "@path" "content-digest")' + params
    base = "\n".join(
        [
            f'"@method": {method}',
            f'"@authority": {u.netloc.lower()}',
            f'"@path": {u.path or "/"}',
            f'"content-digest": {digest}',
            f'"@signature-params": {covered}',
        ]
    )
    signature = base64.b64encode(hmac.digest(key, base.encode(), "sha256")).decode()
    return {
        "content-digest": digest,
        "content-type": "application/json",
        "signature-input": f"sig1={covered}",
        "signature": f"sig1=:{signature}:",
    }
