"""Stable reason codes: the same strings in response bodies, audit records and metric labels."""

from __future__ import annotations

# allow
ALLOWED = "allowed"
PUBLIC = "public_route"

# request shape
MALFORMED_REQUEST = "malformed_request"
METHOD_INVALID = "method_invalid"  # not an upper-case RFC 9110 token: never judged as another method
PATH_DOUBLE_ENCODED = "path_double_encoded"  # %25XX: an upstream that decodes twice reads another path
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
TOKEN_REVOKED = "token_revoked"
CLIENT_REVOKED = "client_revoked"  # the token's client (client_id/azp) or the HMAC client is revoked
TOKEN_ISSUER_NOT_ACCEPTED = "token_issuer_not_accepted"  # a configured provider the route does not list
AUTH_SCHEME_UNSUPPORTED = "auth_scheme_unsupported"
STEP_UP_REQUIRED = "step_up_required"

# proof of possession (401): DPoP (RFC 9449) and certificate-bound tokens (RFC 8705)
DPOP_PROOF_MISSING = "dpop_proof_missing"
DPOP_PROOF_INVALID = "dpop_proof_invalid"
DPOP_PROOF_REPLAYED = "dpop_proof_replayed"
DPOP_NONCE_REQUIRED = "dpop_nonce_required"
DPOP_KEY_MISMATCH = "dpop_key_mismatch"
DPOP_BOUND_TOKEN_AS_BEARER = "dpop_bound_token_as_bearer"
TOKEN_NOT_BOUND = "token_not_bound"
CERTIFICATE_MISSING = "certificate_missing"
CERTIFICATE_MISMATCH = "certificate_mismatch"

# request signatures (401): RFC 9421 with RFC 9530 Content-Digest
SIGNATURE_MISSING = "signature_missing"
SIGNATURE_MALFORMED = "signature_malformed"
SIGNATURE_KEY_UNKNOWN = "signature_key_unknown"
SIGNATURE_INVALID = "signature_invalid"
SIGNATURE_EXPIRED = "signature_expired"
SIGNATURE_COMPONENTS_MISSING = "signature_components_missing"
SIGNATURE_REPLAYED = "signature_replayed"
CONTENT_DIGEST_MISMATCH = "content_digest_mismatch"
BODY_UNAVAILABLE = "body_unavailable"

# authorization (403)
SCOPE_MISSING = "scope_missing"
ROLE_MISSING = "role_missing"
CLAIM_MISMATCH = "claim_mismatch"
GRANT_NOT_ACTIVE = "grant_not_active"
CONDITION_FAILED = "condition_failed"  # source_cidrs, headers or a `when` expression
DENIED_BY_RULE = "denied_by_rule"  # a deny rule held

# rate limits (429)
RATE_LIMITED = "rate_limited"

# errors (fail closed, told apart from denies)
KEYS_UNAVAILABLE = "keys_unavailable"
INTROSPECTION_UNAVAILABLE = "introspection_unavailable"
INTERNAL_ERROR = "internal_error"
REPLAY_CACHE_FULL = "replay_cache_full"
POLICY_UNAVAILABLE = "policy_unavailable"
