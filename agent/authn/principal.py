"""Who the caller is, once a verifier has accepted its credential."""

from __future__ import annotations

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


def claim_at(claims: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted claim path, or None when any step is missing or not an object."""
    value: Any = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def string_set(value: Any, split_spaces: bool) -> frozenset[str] | None:
    """Scopes/roles from a claim: a space-separated string (when split_spaces) or an array of strings."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split()) if split_spaces else frozenset((value,))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    return None
