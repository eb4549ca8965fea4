"""RFC 9421 HTTP message signatures with `hmac-sha256`, and RFC 9530 `Content-Digest` of the request body.

Structured fields (RFC 8941/9651) are parsed and serialised by `http_sf`; the signature base, the checks and
the policy are ours. Keys come only from `hmac_clients` in the policy; the signature's `keyid` names the client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import http_sf
from http_sf.bare_item import ser_bare_item
from http_sf.errors import StructuredFieldError
from http_sf.types import Token

from agent import reasons as R
from agent.authn.principal import Principal
from agent.authn.replay import Once, ReplayCache, owner_of
from agent.config.model import HmacClient
from agent.errors import AuthnError

MAX_FIELD_BYTES = 8192
MAX_COMPONENTS = 32
HMAC_ISSUER = "hmac_clients"  # what audit records show as the issuer of an HMAC-authenticated caller
_DIGESTS = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}


Member = tuple[Any, dict[str, Any]]  # a Dictionary member: (item value or inner list, parameters)


def _dictionary(value: str, what: str) -> dict[str, Member]:
    if len(value) > MAX_FIELD_BYTES:
        raise AuthnError(R.SIGNATURE_MALFORMED, f"{what} too large")
    try:
        parsed = http_sf.parse(value.encode("ascii"), tltype="dictionary")
    except (StructuredFieldError, ValueError, UnicodeEncodeError):
        raise AuthnError(R.SIGNATURE_MALFORMED, f"{what} is not a structured-field dictionary") from None
    if not isinstance(parsed, dict):
        raise AuthnError(R.SIGNATURE_MALFORMED, f"{what} is not a structured-field dictionary")
    return cast(dict[str, Member], parsed)


def _target(view_path: str) -> tuple[str, str]:
    path, sep, query = view_path.partition("?")
    return path or "/", "?" + query if sep else "?"


def component_value(
    name: str, method: str, scheme: str, authority: str, target: str, headers: Mapping[str, str]
) -> str:
    """The value of one covered component (RFC 9421 §2.1 fields, §2.2 derived components)."""
    path, query = _target(target)
    if name == "@method":
        return method
    if name == "@authority":
        return authority.lower()
    if name == "@scheme":
        return scheme.lower()
    if name == "@path":
        return path
    if name == "@query":
        return query
    if name == "@request-target":
        return target
    if name == "@target-uri":
        return f"{scheme.lower()}://{authority.lower()}{target}"
    if name.startswith("@"):
        raise AuthnError(R.SIGNATURE_MALFORMED, f"derived component {name} is not supported")
    value = headers.get(name)
    if value is None:
        raise AuthnError(R.SIGNATURE_INVALID, f"covered field {name} is absent")
    return value.strip()


def _ser_bare(v: Any) -> str:
    # Values the parser has already validated, so no second character-by-character check (http_sf's own
    # serialiser validates again, which cost more than the whole HMAC); other types go to http_sf.
    if type(v) is str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if type(v) is int:
        return str(v)
    if type(v) is Token:
        return str(v)
    if isinstance(v, bool):
        return "?1" if v else "?0"
    if isinstance(v, bytes):
        return ":" + base64.b64encode(v).decode("ascii") + ":"
    return str(ser_bare_item(v))  # decimals, display strings, dates


def signature_params(covered: Member) -> str:
    """The serialised inner list with its parameters (RFC 8941 §4.1.1), as @signature-params carries it."""
    items, params = covered
    inner = " ".join(_ser_bare(name) for name, _ in items)
    return f"({inner})" + "".join(f";{k}" if v is True else f";{k}={_ser_bare(v)}" for k, v in params.items())


def signature_base(
    covered: Member, method: str, scheme: str, authority: str, target: str, headers: Mapping[str, str]
) -> bytes:
    """RFC 9421 §2.5: one line per covered component, then @signature-params."""
    lines = []
    seen: set[str] = set()
    items, _ = covered
    for name, params in items:
        if not isinstance(name, str) or name != name.lower():
            raise AuthnError(R.SIGNATURE_MALFORMED, "component identifiers must be lower-case strings")
        if params:
            raise AuthnError(R.SIGNATURE_MALFORMED, "component parameters (sf, key, bs, req, tr) are not supported")
        if name in seen:
            raise AuthnError(R.SIGNATURE_MALFORMED, f"component {name} covered twice")
        seen.add(name)
        value = component_value(name, method, scheme, authority, target, headers)
        if "\n" in value or "\r" in value:
            raise AuthnError(R.SIGNATURE_MALFORMED, "component value with a line break")
        lines.append(f'"{name}": {value}')
    lines.append(f'"@signature-params": {signature_params(covered)}')
    return "\n".join(lines).encode("utf-8")


def check_content_digest(header: str | None, body: bytes) -> None:
    """RFC 9530: every supported digest in Content-Digest must match the body; at least one must be there."""
    if header is None:
        raise AuthnError(R.CONTENT_DIGEST_MISMATCH, "Content-Digest absent")
    d = _dictionary(header, "Content-Digest")
    checked = 0
    for alg, (value, _) in d.items():
        fn = _DIGESTS.get(alg)
        if fn is None:
            continue
        if not isinstance(value, bytes):
            raise AuthnError(R.CONTENT_DIGEST_MISMATCH, f"{alg} is not a byte sequence")
        if not hmac.compare_digest(value, fn(body).digest()):
            raise AuthnError(R.CONTENT_DIGEST_MISMATCH)
        checked += 1
    if not checked:
        raise AuthnError(R.CONTENT_DIGEST_MISMATCH, "no sha-256 or sha-512 digest")


def has_body(headers: Mapping[str, str], body: bytes) -> bool:
    if body or "transfer-encoding" in headers:
        return True
    length = headers.get("content-length", "0").strip()
    return not (length.isdigit() and int(length) == 0)


class HmacVerifier:
    def __init__(self, clients: tuple[HmacClient, ...], replay: ReplayCache, clock: Callable[[], float] = time.time):
        self._clients = {c.name: c for c in clients}
        self._principals = {
            c.name: Principal(
                subject=c.name, issuer=HMAC_ISSUER, method="hmac", client_id=c.name, scopes=c.scopes, roles=c.roles
            )
            for c in clients
        }
        self.replay = replay
        self._clock = clock

    def verify(
        self, method: str, scheme: str, authority: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Principal, Once | None]:
        """The signing client, and the signature's nonce (already checked against this agent's replay cache)."""
        sig_input = headers.get("signature-input")
        sig_field = headers.get("signature")
        if not sig_input or not sig_field:
            raise AuthnError(R.SIGNATURE_MISSING)
        inputs = _dictionary(sig_input, "Signature-Input")
        signatures = _dictionary(sig_field, "Signature")
        ours: list[tuple[str, Member, HmacClient]] = []
        for label, member in inputs.items():
            if not isinstance(member[0], list):
                raise AuthnError(R.SIGNATURE_MALFORMED, "a Signature-Input member is not an inner list")
            keyid = member[1].get("keyid")
            client = self._clients.get(keyid) if isinstance(keyid, str) else None
            if client is not None:
                ours.append((label, member, client))
        if not ours:
            raise AuthnError(R.SIGNATURE_KEY_UNKNOWN)
        if len(ours) > 1:
            raise AuthnError(R.SIGNATURE_MALFORMED, "more than one signature by a configured client")
        label, covered, client = ours[0]
        components, params = covered
        alg = params.get("alg")
        if alg is not None and alg != "hmac-sha256":
            raise AuthnError(R.SIGNATURE_MALFORMED, "alg is not hmac-sha256")
        if len(components) > MAX_COMPONENTS:
            raise AuthnError(R.SIGNATURE_MALFORMED, "too many covered components")
        names = {name for name, _ in components}
        required = set(client.components)
        body_present = has_body(headers, body)
        if body_present:
            required.add("content-digest")
        missing = sorted(required - names)
        if missing:
            raise AuthnError(R.SIGNATURE_COMPONENTS_MISSING, "not covered: " + " ".join(missing))
        created = params.get("created")
        expires = params.get("expires")
        if not isinstance(created, int) or isinstance(created, bool):
            raise AuthnError(R.SIGNATURE_MALFORMED, "created missing or not an integer")
        if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
            raise AuthnError(R.SIGNATURE_MALFORMED, "expires is not an integer")
        nonce = params.get("nonce")
        if nonce is not None and (not isinstance(nonce, str) or not nonce or len(nonce) > 256):
            raise AuthnError(R.SIGNATURE_MALFORMED, "nonce is not a short string")
        if client.require_nonce and nonce is None:
            raise AuthnError(R.SIGNATURE_MALFORMED, "nonce required")
        now = self._clock()
        if created > now + client.leeway_s or created < now - client.max_age_s - client.leeway_s:
            raise AuthnError(R.SIGNATURE_EXPIRED, "created outside the accepted window")
        if expires is not None and now >= expires + client.leeway_s:
            raise AuthnError(R.SIGNATURE_EXPIRED, "expired")
        given = signatures.get(label, (None, {}))[0]
        if not isinstance(given, bytes):
            raise AuthnError(R.SIGNATURE_MALFORMED, "no Signature member for the Signature-Input label")
        base = signature_base(covered, method, scheme, authority, target, headers)
        # Every key is tried (constant time each) so the time taken does not tell which key is active.
        ok = False
        for key in client.keys:
            ok |= hmac.compare_digest(hmac.digest(key, base, "sha256"), given)
        if not ok:
            raise AuthnError(R.SIGNATURE_INVALID)
        if body_present or "content-digest" in names:
            # Envoy adds this header when it truncated the body; a client-sent copy is joined to Envoy's, so
            # any "true" in it counts.
            if "true" in headers.get("x-envoy-auth-partial-body", "").lower():
                raise AuthnError(R.BODY_UNAVAILABLE, "Envoy sent a truncated body")
            length = headers.get("content-length", "").strip()
            if length and (not length.isdigit() or int(length) != len(body)):
                raise AuthnError(R.BODY_UNAVAILABLE, "the body Envoy sent is not the whole body")
            check_content_digest(headers.get("content-digest"), body)
        once = None
        if nonce is not None:
            ttl = client.max_age_s + 2 * client.leeway_s
            once = Once(f"hmac:{client.name}", nonce, ttl, R.SIGNATURE_REPLAYED, owner_of(HMAC_ISSUER, client.name))
            self.replay.require_new(once)
        return self._principals[client.name], once


def b64_key(text: str) -> bytes:
    """A key as RFC 9421's examples write it: standard base64 on one line."""
    return base64.b64decode(text.strip(), validate=True)
