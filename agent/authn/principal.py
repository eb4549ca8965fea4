"""Who the caller is, once a verifier has accepted its credential."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    issuer: str
    method: str  # "jwt" or "introspection": which verifier accepted the credential
    client_id: str | None = None
    jti: str | None = None
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    expires_at: float | None = None
    # RFC 7800 confirmation: the DPoP key thumbprint (cnf.jkt) or certificate thumbprint (cnf.x5t#S256)
    # the token is bound to; a bound token is accepted only from the holder of that key or certificate.
    cnf_jkt: str | None = None
    cnf_x5t: str | None = None
    # The verified claims, for claim rules. Never logged or audited whole.
    claims: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # What conditions derive from the claims, kept for the next request with the same token (verified claims
    # never change): agent.policy.conditions.Facts keeps a `when`'s views of them here. Never logged.
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def claim_at(claims: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted claim path, or None when any step is missing or not an object."""
    value: Any = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# RFC 6749 §3.3: scope = scope-token *( SP scope-token ), scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_SCOPE_STRING = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc: C0, DEL and C1


def scope_set(value: Any) -> frozenset[str] | None:
    """Scopes from a claim: a string split on U+0020 only, or an array of scope tokens; None when invalid.

    Any other whitespace (NBSP, tab, U+3000...) or character outside the scope-token set invalidates the whole
    claim rather than separating or joining scopes. Leading, trailing and repeated spaces separate nothing.
    """
    if value is None:
        return frozenset()
    if isinstance(value, str):
        if _SCOPE_STRING.fullmatch(value) is None:
            return None
        return frozenset(s for s in value.split(" ") if s)
    if isinstance(value, list) and all(isinstance(v, str) and _SCOPE_TOKEN.fullmatch(v) for v in value):
        return frozenset(value)
    return None


def role_set(value: Any) -> frozenset[str] | None:
    """Roles from a claim: one string or an array of strings, none with a control character; None when invalid."""
    if value is None:
        return frozenset()
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and all(isinstance(v, str) and _CONTROL.search(v) is None for v in items):
        return frozenset(items)
    return None
