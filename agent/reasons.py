"""Stable reason codes: the same strings in response bodies, audit records and metric labels."""

from __future__ import annotations

# allow
ALLOWED = "allowed"
PUBLIC = "public_route"

# request shape
MALFORMED_REQUEST = "malformed_request"
NO_ROUTE = "no_route"

# authentication (401)
TOKEN_MISSING = "token_missing"
TOKEN_MALFORMED = "token_malformed"
TOKEN_TOO_LARGE = "token_too_large"
TOKEN_ALG_NOT_ALLOWED = "token_alg_not_allowed"
TOKEN_TYP_NOT_ALLOWED = "token_typ_not_allowed"
TOKEN_CRIT_UNSUPPORTED = "token_crit_unsupported"
TOKEN_KID_UNKNOWN = "token_kid_unknown"
TOKEN_KEY_MISMATCH = "token_key_mismatch"
TOKEN_SIGNATURE_INVALID = "token_signature_invalid"
TOKEN_ISSUER_UNKNOWN = "token_issuer_unknown"
TOKEN_AUDIENCE_MISMATCH = "token_audience_mismatch"
TOKEN_EXPIRED = "token_expired"
TOKEN_NOT_YET_VALID = "token_not_yet_valid"
TOKEN_ISSUED_IN_FUTURE = "token_issued_in_future"
TOKEN_LIFETIME_TOO_LONG = "token_lifetime_too_long"
TOKEN_CLAIM_MISSING = "token_claim_missing"
TOKEN_CLAIM_INVALID = "token_claim_invalid"
TOKEN_INACTIVE = "token_inactive"
AUTH_SCHEME_UNSUPPORTED = "auth_scheme_unsupported"
STEP_UP_REQUIRED = "step_up_required"

# authorization (403)
SCOPE_MISSING = "scope_missing"
ROLE_MISSING = "role_missing"
CLAIM_MISMATCH = "claim_mismatch"
GRANT_NOT_ACTIVE = "grant_not_active"

# errors (fail closed, told apart from denies)
KEYS_UNAVAILABLE = "keys_unavailable"
INTROSPECTION_UNAVAILABLE = "introspection_unavailable"
INTERNAL_ERROR = "internal_error"
