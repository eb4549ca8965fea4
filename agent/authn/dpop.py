"""DPoP (RFC 9449): every check of §4.3 on a proof, the RFC 7638 thumbprint, and server-issued nonces (§8)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any
from urllib.parse import urlsplit

from agent import reasons as R
from agent.authn.jwk import PRIVATE_MEMBERS, Jwk, parse_jwk, verify_signature
from agent.authn.replay import Once, ReplayCache
from agent.authn.strict import b64url_decode, is_number, strict_json_object
from agent.config.model import Dpop
from agent.errors import AuthnError

MAX_PROOF_BYTES = 8192
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
_DEFAULT_PORTS = {"http": "80", "https": "443"}
# Nonces stay valid across policy reloads within one process; replicas share them only with nonce_secret_file.
_PROCESS_NONCE_SECRET = os.urandom(32)
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 §2: unreserved, reserved (gen-delims and sub-delims) and '%'.
_URI = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace; base64url."""
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        raise ValueError("not a key the thumbprint is defined for")
    # The member names are listed in sorted order; encode_basestring is json.dumps's own string encoder
    # (ensure_ascii=False), without its per-call overhead: this runs for every proof, refused ones too.
    canonical = "{" + ",".join(f'"{m}":{encode_basestring(jwk[m])}' for m in members) + "}"
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(token: str) -> str:
    """The `ath` a proof carries for an access token: base64url(SHA-256(ASCII of the token))."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def _normal_path(path: str, dot_segments: bool) -> str | None:
    """RFC 3986 §6.2.2: percent-encodings upper-cased, unreserved characters decoded, then (§6.2.2.3) dot
    segments removed when `dot_segments`, else a path that has any is refused (None)."""
    out = bytearray()
    raw = path.encode("utf-8")
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25:  # '%'
            h = raw[i + 1 : i + 3]
            try:
                v = int(h, 16) if len(h) == 2 else -1
            except ValueError:
                return None
            if v < 0:
                return None
            if v in _UNRESERVED:
                out.append(v)
            else:
                out += b"%" + h.upper()
            i += 3
        else:
            out.append(c)
            i += 1
    text = out.decode("utf-8", "replace") or "/"
    if "." not in text:
        return text
    if dot_segments:
        return remove_dot_segments(text)
    return None if any(seg in (".", "..") for seg in text.split("/")) else text


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path: '.' segments go, '..' removes the segment before it (never above
    the root), and a path that ended in either keeps its trailing '/'."""
    if not path.startswith("/"):
        return path  # not after an authority: no request path looks like it
    out: list[str] = []
    segments = path[1:].split("/")
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
            continue
        if i == last:
            out.append("")
    return "/" + "/".join(out)


def _normal_authority(scheme: str, authority: str) -> str | None:
    """RFC 3986 §6.2.2.1 and §6.2.3: lower case, and no port when it is empty or the scheme's default."""
    authority = authority.lower()
    host, colon, port = authority.rpartition(":")
    if colon and "]" not in port and port in ("", _DEFAULT_PORTS[scheme]):  # not the end of an IPv6 literal
        authority = host
    return authority if authority and "@" not in authority else None


def normal_uri(scheme: str, authority: str, path: str) -> str | None:
    """The request's URI as RFC 9449 §4.3 compares it: scheme://authority/path after RFC 3986 §6.2.2 and
    §6.2.3, without query. The agent refuses request paths with dot segments before this, and this refuses
    them again: a request is never compared as another path than the one the routes judged."""
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    host = _normal_authority(scheme, authority)
    p = _normal_path(path.split("?", 1)[0].split("#", 1)[0], dot_segments=False)
    return None if host is None or p is None else f"{scheme}://{host}{p}"


def normal_htu(htu: str) -> str | None:
    """A proof's `htu` in the form `normal_uri` gives, dot segments removed; None for anything not a URI.

    Only RFC 3986 characters are accepted: `urlsplit` silently drops tabs and newlines (and other parsers
    other characters), which would make a string that is no URI equal to one that is.
    """
    if _URI.fullmatch(htu) is None:
        return None
    try:
        u = urlsplit(htu)
    except ValueError:
        return None
    scheme = u.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    host = _normal_authority(scheme, u.netloc)
    p = _normal_path(u.path, dot_segments=True)
    return None if host is None or p is None else f"{scheme}://{host}{p}"


class Nonces:
    """Stateless server nonces: an issue time and its MAC, valid for `lifetime_s`; shared by replicas that
    share the secret."""

    def __init__(self, secret: bytes, lifetime_s: float, clock: Callable[[], float]) -> None:
        self._secret = secret
        self._lifetime = lifetime_s
        self._clock = clock

    def issue(self) -> str:
        stamp = struct.pack(">Q", int(self._clock()))
        return b64url(stamp + hmac.digest(self._secret, stamp, "sha256")[:16])

    def valid(self, nonce: object) -> bool:
        if not isinstance(nonce, str) or len(nonce) != 32:
            return False
        try:
            raw = b64url_decode(nonce)
        except ValueError:
            return False
        if len(raw) != 24 or not hmac.compare_digest(raw[8:], hmac.digest(self._secret, raw[:8], "sha256")[:16]):
            return False
        issued: int = struct.unpack(">Q", raw[:8])[0]
        now = self._clock()
        return issued <= now + 5 and now - issued <= self._lifetime


class NonceRequired(AuthnError):
    """The proof lacks a valid nonce: the caller retries with the one in `DPoP-Nonce`."""

    def __init__(self, detail: str) -> None:
        super().__init__(R.DPOP_NONCE_REQUIRED, detail)


@dataclass(frozen=True, slots=True)
class _Header:
    """A proof header that passed every check and whose key is the one a token was bound to."""

    alg: str
    key: Jwk
    thumbprint: str


class DpopVerifier:
    def __init__(self, settings: Dpop, replay: ReplayCache, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self.replay = replay
        self.nonces = Nonces(settings.nonce_secret or _PROCESS_NONCE_SECRET, settings.nonce_lifetime_s, clock)
        self.algs_challenge = " ".join(sorted(settings.algorithms))
        self._headers: OrderedDict[str, _Header] = OrderedDict()

    def verify(self, proof: str | None, method: str, htu: str | None, access_token: str, jkt: str, owner: str) -> Once:
        """Check one proof for a request carrying `access_token`, bound to the key whose RFC 7638 thumbprint is
        `jkt` (the token's cnf.jkt); returns the one-time value (the jti, already remembered by this agent's
        replay cache, unique per key and counted against the share of `owner`, the token's principal: see
        `replay.owner_of`) for a shared cache.

        Cheap checks come first and the costly ones last: the proof's size and shape, its header, then whether
        its key is the bound one (a hash), then the claims, then the signature, and only then is the jti
        remembered. A proof by any other key is refused before its signature is checked, and nothing it
        carries is remembered: it cannot fill the replay cache.

        `proof` is the DPoP header as Envoy passed it (repeated headers arrive joined by commas).
        """
        if not proof:
            raise AuthnError(R.DPOP_PROOF_MISSING)
        if "," in proof or " " in proof.strip():
            raise AuthnError(R.DPOP_PROOF_INVALID, "more than one DPoP header")
        if len(proof) > MAX_PROOF_BYTES:
            raise AuthnError(R.DPOP_PROOF_INVALID, "proof too large")
        s = self.settings
        parts = proof.split(".")
        if len(parts) != 3:
            raise AuthnError(R.DPOP_PROOF_INVALID, "not a JWT")
        header = self._header(parts[0], jkt)
        try:
            claims = strict_json_object(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
        except ValueError as e:
            raise AuthnError(R.DPOP_PROOF_INVALID, str(e)) from None
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise AuthnError(R.DPOP_PROOF_INVALID, "jti missing or invalid")
        if claims.get("htm") != method:
            raise AuthnError(R.DPOP_PROOF_INVALID, "htm does not match the request method")
        htu_claim = claims.get("htu")
        if not isinstance(htu_claim, str) or htu is None or normal_htu(htu_claim) != htu:
            raise AuthnError(R.DPOP_PROOF_INVALID, "htu does not match the request URI")
        iat = claims.get("iat")
        if iat is None or not is_number(iat):
            raise AuthnError(R.DPOP_PROOF_INVALID, "iat missing or not a number")
        now = self._clock()
        if iat > now + s.leeway_s or iat < now - s.max_age_s - s.leeway_s:
            raise AuthnError(R.DPOP_PROOF_INVALID, "iat outside the accepted window")
        ath = claims.get("ath")
        if not isinstance(ath, str) or not hmac.compare_digest(ath.encode(), access_token_hash(access_token).encode()):
            raise AuthnError(R.DPOP_PROOF_INVALID, "ath does not match the access token")
        signing_input = proof[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
        if not verify_signature(header.key, header.alg, signing_input, signature):
            raise AuthnError(R.DPOP_PROOF_INVALID, "signature does not verify with the header's jwk")
        if s.use_nonce and not self.nonces.valid(claims.get("nonce")):
            raise NonceRequired("nonce missing" if "nonce" not in claims else "nonce invalid or expired")
        # Remembered for as long as the proof's iat would still be accepted.
        once = Once(f"dpop:{header.thumbprint}", jti, s.max_age_s + 2 * s.leeway_s, R.DPOP_PROOF_REPLAYED, owner)
        self.replay.require_new(once)
        return once

    def _header(self, part: str, jkt: str) -> _Header:
        """The proof header's alg and key, when its key is the one whose thumbprint is `jkt`.

        A client sends the same header with every proof, so a checked header is kept (bounded) by its text:
        no JSON or key parsing per request. Only headers whose key is a bound one are kept or have their key
        built, so a stream of headers with other keys costs a hash each and evicts nothing.
        """
        hit = self._headers.get(part)
        if hit is not None:
            if not hmac.compare_digest(hit.thumbprint.encode(), jkt.encode()):
                raise AuthnError(R.DPOP_KEY_MISMATCH, "the proof is signed by another key than the token names")
            return hit
        try:
            header = strict_json_object(b64url_decode(part))
        except ValueError as e:
            raise AuthnError(R.DPOP_PROOF_INVALID, str(e)) from None
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "dpop+jwt":
            raise AuthnError(R.DPOP_PROOF_INVALID, "typ is not dpop+jwt")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.settings.algorithms:
            raise AuthnError(R.DPOP_PROOF_INVALID, "alg not allowed")
        if "crit" in header:
            raise AuthnError(R.DPOP_PROOF_INVALID, "crit is not supported")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise AuthnError(R.DPOP_PROOF_INVALID, "no jwk in the header")
        if PRIVATE_MEMBERS & jwk.keys():
            raise AuthnError(R.DPOP_PROOF_INVALID, "jwk: private key material")
        try:
            thumbprint = jwk_thumbprint(jwk)
        except ValueError as e:
            raise AuthnError(R.DPOP_PROOF_INVALID, f"jwk: {e}") from None
        if not hmac.compare_digest(thumbprint.encode(), jkt.encode()):
            raise AuthnError(R.DPOP_KEY_MISMATCH, "the proof is signed by another key than the token names")
        try:
            key = parse_jwk(jwk)  # refuses weak or costly RSA, off-curve points
        except ValueError as e:
            raise AuthnError(R.DPOP_PROOF_INVALID, f"jwk: {e}") from None
        if alg not in key.algs:
            raise AuthnError(R.DPOP_PROOF_INVALID, "alg does not fit the jwk")
        if len(self._headers) >= 4096:
            self._headers.popitem(last=False)
        checked = self._headers[part] = _Header(alg, key, thumbprint)
        return checked
