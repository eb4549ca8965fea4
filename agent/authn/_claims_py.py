"""A JWT verified, in Python: the pure twin of native/_claims.pyx (agent._claims_c). Its parts, header, key,
signature and claims are checked in that order, and the principal built.

The contract both keep: the same AuthnError (reason and detail) for the same token, header or claims, checked
in the same order, and equal results (the claims dict itself kept in the Principal, not copied) when they pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent import reasons as R
from agent.authn.jwk import verify_signature
from agent.authn.jwks import KeyStore
from agent.authn.principal import Principal, claim_at, role_set, scope_set
from agent.authn.strict import b64url_decode, numeric_date, strict_json_object
from agent.config.model import IdentityProvider
from agent.errors import AuthnError

__all__ = [
    "UnknownKid",
    "check_audience",
    "check_auth_time",
    "check_claims",
    "check_header",
    "principal_from_claims",
    "split_token",
    "time_claim",
    "verify_signature",
    "verify_token",
]


class UnknownKid(AuthnError):
    """The issuer's key set lacks the token's kid: the caller may refetch once and retry."""

    def __init__(self, store: KeyStore) -> None:
        super().__init__(R.TOKEN_KID_UNKNOWN)
        self.store = store


def verify_token(
    token: str, by_issuer: dict[str, tuple[IdentityProvider, KeyStore]], clock: Callable[[], float]
) -> tuple[Principal, IdentityProvider, KeyStore, float | None]:
    """A JWT, every check in order: its parts, issuer (by exact `iss`), size, header, key, signature, claims.

    Returns the principal, the provider and key store that vouched for it, and `nbf`; raises AuthnError, or
    UnknownKid when the issuer's key set lacks the kid (a refetch might help).
    """
    header, claims, signature, signing_input = split_token(token)
    iss = claims.get("iss")
    found = by_issuer.get(iss) if isinstance(iss, str) else None
    if found is None:
        raise AuthnError(R.TOKEN_ISSUER_UNKNOWN)
    idp, store = found
    if len(token) > idp.max_token_bytes:
        raise AuthnError(R.TOKEN_TOO_LARGE)
    alg, kid = check_header(idp, header)
    keys = store.keys
    if keys is None:
        raise AuthnError(R.KEYS_UNAVAILABLE)
    candidates, kid_known = keys.candidates(kid, alg)
    if not candidates:
        if kid_known:
            raise AuthnError(R.TOKEN_KEY_MISMATCH)
        raise UnknownKid(store)
    for k in candidates:
        if verify_signature(k, alg, signing_input, signature):
            break
    else:
        raise AuthnError(R.TOKEN_SIGNATURE_INVALID)
    principal, nbf = check_claims(idp, claims, clock())
    return principal, idp, store, nbf


def split_token(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """A compact JWS as its header, claims, signature and signing input; anything else is a malformed token."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthnError(R.TOKEN_MALFORMED, "not three dot-separated parts")
    try:
        header = strict_json_object(b64url_decode(parts[0]))
        claims = strict_json_object(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except ValueError as e:
        raise AuthnError(R.TOKEN_MALFORMED, str(e)) from None
    # The first two parts decoded, so they are base64url: ASCII.
    return header, claims, signature, token[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")


def check_header(idp: IdentityProvider, header: dict[str, Any]) -> tuple[str, str | None]:
    """The JOSE header's alg (one the provider allows) and kid, once typ and crit are acceptable."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in idp.algorithms:
        raise AuthnError(R.TOKEN_ALG_NOT_ALLOWED)
    if "crit" in header:
        # RFC 7515 §4.1.11: extensions we do not understand must fail; we understand none.
        raise AuthnError(R.TOKEN_CRIT_UNSUPPORTED)
    typ = header.get("typ")
    if typ is None:
        if idp.require_typ:
            raise AuthnError(R.TOKEN_TYP_NOT_ALLOWED, "typ required")
    elif not isinstance(typ, str) or typ.lower() not in idp.token_types:
        raise AuthnError(R.TOKEN_TYP_NOT_ALLOWED)
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise AuthnError(R.TOKEN_MALFORMED, "kid is not a string")
    # `jku`, `x5u`, `jwk` and `x5c` are never read: keys come from configuration only.
    return alg, kid


def check_claims(idp: IdentityProvider, claims: dict[str, Any], now: float) -> tuple[Principal, float | None]:
    """A JWT's claims at `now`: times, lifetime, audience; the principal they name and `nbf` (for the cache)."""
    leeway = idp.leeway_s
    exp = time_claim(claims, "exp", required=True)
    assert exp is not None
    if now >= exp + leeway:
        raise AuthnError(R.TOKEN_EXPIRED)
    nbf = time_claim(claims, "nbf", required=False)
    if nbf is not None and now + leeway < nbf:
        raise AuthnError(R.TOKEN_NOT_YET_VALID)
    iat = time_claim(claims, "iat", required=True)
    assert iat is not None
    if iat > now + leeway:
        raise AuthnError(R.TOKEN_ISSUED_IN_FUTURE)
    if exp - iat > idp.max_token_lifetime_s:
        raise AuthnError(R.TOKEN_LIFETIME_TOO_LONG)
    check_auth_time(claims, now, leeway)
    check_audience(idp, claims.get("aud"), required=True)
    return principal_from_claims(idp, claims, "jwt", exp), nbf


def check_audience(idp: IdentityProvider, aud: Any, required: bool) -> None:
    """`aud` (a string or a non-empty array of strings) must name one of the provider's audiences exactly."""
    if aud is None:
        if required:
            raise AuthnError(R.TOKEN_CLAIM_MISSING, "aud")
        return
    if isinstance(aud, str):
        auds: list[Any] = [aud]
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        auds = aud
    else:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, "aud")
    if idp.audiences.isdisjoint(auds):
        raise AuthnError(R.TOKEN_AUDIENCE_MISMATCH)


def check_auth_time(claims: dict[str, Any], now: float, leeway: float) -> None:
    """`auth_time`, when present, is when the user authenticated: a time, and not one still to come. A future
    one would pass any `max_auth_age_s` (its age is negative), so the token is refused on every route."""
    auth_time = time_claim(claims, "auth_time", required=False)
    if auth_time is not None and auth_time > now + leeway:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, "auth_time is in the future")


def _header_safe(value: str) -> bool:
    # These values become upstream request headers: no control characters (CR/LF would split headers), and
    # no leading or trailing whitespace, which Envoy trims: " alice " would reach the app as "alice".
    return value.isprintable() and value == value.strip()


def principal_from_claims(idp: IdentityProvider, claims: dict[str, Any], method: str, exp: float | None) -> Principal:
    """The caller that verified claims name; refuses a subject, client_id, scope, role, jti or cnf of the wrong
    shape rather than dropping it."""
    names = idp.claims
    sub = claim_at(claims, names.subject_path)
    if sub is None or sub == "":
        raise AuthnError(R.TOKEN_CLAIM_MISSING, names.subject)
    if not isinstance(sub, str) or not _header_safe(sub) or len(sub) > 1024:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, names.subject)
    client_id = claim_at(claims, names.client_id_path)
    if client_id is not None and (not isinstance(client_id, str) or not _header_safe(client_id)):
        raise AuthnError(R.TOKEN_CLAIM_INVALID, names.client_id)
    scopes = scope_set(claim_at(claims, names.scopes_path))
    if scopes is None:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, names.scopes)
    roles = role_set(claim_at(claims, names.roles_path))
    if roles is None:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, names.roles)
    jti = claims.get("jti")
    if jti is not None and not isinstance(jti, str):
        raise AuthnError(R.TOKEN_CLAIM_INVALID, "jti")
    jkt = x5t = None
    cnf = claims.get("cnf")
    if cnf is not None:
        # A confirmation method we cannot check must not turn a bound token into a bearer token.
        if not isinstance(cnf, dict) or not cnf or set(cnf) - {"jkt", "x5t#S256"}:
            raise AuthnError(R.TOKEN_CLAIM_INVALID, "cnf (only jkt and x5t#S256 are supported)")
        jkt, x5t = cnf.get("jkt"), cnf.get("x5t#S256")
        if (jkt is not None and not isinstance(jkt, str)) or (x5t is not None and not isinstance(x5t, str)):
            raise AuthnError(R.TOKEN_CLAIM_INVALID, "cnf")
    return Principal(
        subject=sub,
        issuer=idp.issuer,
        method=method,
        client_id=client_id,
        jti=jti,
        scopes=scopes,
        roles=roles,
        expires_at=exp,
        cnf_jkt=jkt,
        cnf_x5t=x5t,
        claims=claims,
    )


def time_claim(claims: dict[str, Any], name: str, required: bool) -> float | None:
    """A NumericDate claim as a float; out of range (negative, huge, not a number) is an invalid claim."""
    v = claims.get(name)
    if v is None:
        if required:
            raise AuthnError(R.TOKEN_CLAIM_MISSING, name)
        return None
    t = numeric_date(v)
    if t is None:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, name)
    return t
