# cython: language_level=3, boundscheck=False, wraparound=False
"""A JWT verified in C: the same contract as agent/authn/_claims_py.py, its pure twin. Its parts, header, key,
signature and claims are checked in that order, and the principal built.

The same AuthnError (reason and detail) for the same token, header or claims, in the same order, and equal
results. The three parts are found and decoded straight from the token's text (native/b64url.pxd, the decoder
of agent._b64_c) and parsed by agent._jsonobj_c's strict_json_object; a header text seen before is not parsed
again. The character rules of agent/authn/principal.py (scope tokens, control characters) and the
str.isprintable/str.strip of _header_safe are scans here; NumericDate is compared in C for exact int and float
values and left to agent.authn.strict.numeric_date for anything else. The frozen Principal is filled slot by
slot through its members' setters, which is what its dataclass __init__ does (object.__setattr__), without the
keyword call. The signature check is agent.authn.jwk.verify_signature's, without its Python frame.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject, PyTypeObject
from cpython.set cimport PySet_Add
from cpython.unicode cimport (
    PyUnicode_1BYTE_DATA, PyUnicode_1BYTE_KIND, PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_KIND,
    PyUnicode_READ, PyUnicode_Substring, Py_UNICODE_ISPRINTABLE, Py_UNICODE_ISSPACE,
)
from libc.string cimport memchr

from b64url cimport b64url_decode_latin1

import dataclasses
import types

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent import reasons as R
from agent._jsonobj_c import strict_json_object
from agent.authn._claims_py import UnknownKid
from agent.authn._claims_py import split_token as _split_token_py
from agent.authn.principal import Principal
from agent.authn.strict import MAX_NUMERIC_DATE, numeric_date
from agent.errors import AuthnError

cdef extern from "Python.h":
    object PyFrozenSet_New(PyObject *iterable)
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        int flags
    int PyMember_SetOne(char *addr, PyMemberDef *member, object value) except -1
    int T_OBJECT_EX
    int READONLY

cdef long long MAX_DATE = MAX_NUMERIC_DATE
cdef double MAX_DATE_F = <double>MAX_NUMERIC_DATE
cdef tuple FIELDS = ("subject", "issuer", "method", "client_id", "jti", "scopes", "roles", "expires_at",
                     "cnf_jkt", "cnf_x5t", "claims", "memo")
# Principal's slots in FIELDS order, set as its dataclass __init__ sets them (object.__setattr__ goes to these
# very member setters) without a keyword call and twelve attribute lookups. Used only while Principal has
# exactly these fields, as plain object slots, and no __post_init__; else its __init__ builds it.
cdef PyMemberDef *MEMBERS[12]
cdef tuple NO_ARGS = ()


cdef bint _find_members() except -1:
    if tuple(f.name for f in dataclasses.fields(Principal)) != FIELDS or hasattr(Principal, "__post_init__"):
        return False
    for i, name in enumerate(FIELDS):
        d = Principal.__dict__.get(name)
        if type(d) is not types.MemberDescriptorType:
            return False
        MEMBERS[i] = (<PyMemberDescrObject*>d).d_member
        if MEMBERS[i].type != T_OBJECT_EX or MEMBERS[i].flags & READONLY:
            return False
    return True


cdef bint SLOT_FILL = _find_members()
FILLS_SLOTS = SLOT_FILL  # for the test that this fast path is the one in use
cdef frozenset EMPTY = frozenset()
cdef str JKT = "jkt"
cdef str X5T = "x5t#S256"


cpdef tuple verify_token(str token, dict by_issuer, object clock):
    header, claims, signature, signing_input = _split(token, True)
    iss = (<dict>claims).get("iss")
    found = by_issuer.get(iss) if isinstance(iss, str) else None
    if found is None:
        raise AuthnError(R.TOKEN_ISSUER_UNKNOWN)
    idp, store = found
    if PyUnicode_GET_LENGTH(token) > idp.max_token_bytes:
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


cpdef bint verify_signature(object jwk, str alg, bytes signing_input, bytes signature) except -1:
    """agent.authn.jwk.verify_signature without a Python frame (which cost ~5k instructions a token)."""
    cdef Py_ssize_t n
    args = (<dict?>jwk.verify_args).get(alg)
    if args is None:
        return False
    try:
        n = jwk.coord_bytes
        if n:
            # JWS carries ECDSA as r || s, fixed width; cryptography takes DER.
            if len(signature) != 2 * n:
                return False
            r = int.from_bytes(signature[:n], "big")
            s = int.from_bytes(signature[n:], "big")
            jwk.key.verify(encode_dss_signature(r, s), signing_input, *args)
        else:
            jwk.key.verify(signature, signing_input, *args)
    except InvalidSignature:
        return False
    return True


# An issuer's tokens share their header's text (alg, kid, typ), so a miss reuses that header's parsed JSON:
# header text -> the object it parsed to, never handed out of this module and only read. Bounded in entries and
# text length (emptied when full: an attacker's flood of headers costs what parsing them costs anyway).
HEADER_CACHE = {}  # a module attribute so tests can see it stays bounded
cdef dict HEADERS = HEADER_CACHE
cdef Py_ssize_t HEADERS_MAX = 64
cdef Py_ssize_t HEADER_TEXT_MAX = 512


cpdef tuple split_token(str token):
    return _split(token, False)


cdef tuple _split(str token, bint reuse_header):
    cdef Py_ssize_t n, d1, d2
    cdef const unsigned char *p
    cdef const unsigned char *dot1
    cdef const unsigned char *dot2 = NULL
    if PyUnicode_KIND(token) != PyUnicode_1BYTE_KIND:
        return _split_token_py(token)  # not base64url anywhere: the twin finds which error comes first
    n = PyUnicode_GET_LENGTH(token)
    p = PyUnicode_1BYTE_DATA(token)
    dot1 = <const unsigned char*>memchr(p, 46, n)  # '.'
    if dot1 != NULL:
        dot2 = <const unsigned char*>memchr(dot1 + 1, 46, n - (dot1 - p) - 1)
    if dot2 == NULL or memchr(dot2 + 1, 46, n - (dot2 - p) - 1) != NULL:
        raise AuthnError(R.TOKEN_MALFORMED, "not three dot-separated parts")
    d1, d2 = dot1 - p, dot2 - p
    header = text = None
    if reuse_header and d1 <= HEADER_TEXT_MAX:
        text = PyUnicode_Substring(token, 0, d1)
        header = HEADERS.get(text)
    try:
        if header is None:
            header = strict_json_object(b64url_decode_latin1(p, d1))
            if text is not None:
                if len(HEADERS) >= HEADERS_MAX:
                    HEADERS.clear()
                HEADERS[text] = header
        claims = strict_json_object(b64url_decode_latin1(p + d1 + 1, d2 - d1 - 1))
        signature = b64url_decode_latin1(p + d2 + 1, n - d2 - 1)
    except ValueError as e:
        raise AuthnError(R.TOKEN_MALFORMED, str(e)) from None
    return header, claims, signature, PyBytes_FromStringAndSize(<const char*>p, d2)


cpdef tuple check_header(object idp, dict header):
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
    return alg, kid


cdef inline int _date(object v, double *out) except -1:
    """1 and the value for a NumericDate in range, 0 for anything else (numeric_date's None)."""
    cdef int overflow = 0
    cdef long long i
    cdef double d
    if type(v) is float:
        d = PyFloat_AS_DOUBLE(v)
        if 0.0 <= d <= MAX_DATE_F:  # NaN fails both
            out[0] = d
            return 1
        return 0
    if type(v) is int:
        i = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow or not 0 <= i <= MAX_DATE:
            return 0
        out[0] = <double>i
        return 1
    t = numeric_date(v)  # bools, subclasses: the pure rule decides
    if t is None:
        return 0
    out[0] = <double>t
    return 1


cdef inline int _time(dict claims, str name, bint required, double *out) except -1:
    """1 and the value when the claim is a time, 0 when absent and optional; raises as time_claim does."""
    v = claims.get(name)
    if v is None:
        if required:
            raise AuthnError(R.TOKEN_CLAIM_MISSING, name)
        return 0
    if not _date(v, out):
        raise AuthnError(R.TOKEN_CLAIM_INVALID, name)
    return 1


cpdef object time_claim(dict claims, str name, bint required):
    cdef double t
    if _time(claims, name, required, &t):
        return t
    return None


cpdef tuple check_claims(object idp, dict claims, double now):
    cdef double leeway = idp.leeway_s
    cdef double exp, nbf = 0.0, iat
    cdef int has_nbf
    _time(claims, "exp", True, &exp)
    if now >= exp + leeway:
        raise AuthnError(R.TOKEN_EXPIRED)
    has_nbf = _time(claims, "nbf", False, &nbf)
    if has_nbf and now + leeway < nbf:
        raise AuthnError(R.TOKEN_NOT_YET_VALID)
    _time(claims, "iat", True, &iat)
    if iat > now + leeway:
        raise AuthnError(R.TOKEN_ISSUED_IN_FUTURE)
    if exp - iat > <double>idp.max_token_lifetime_s:
        raise AuthnError(R.TOKEN_LIFETIME_TOO_LONG)
    check_auth_time(claims, now, leeway)
    check_audience(idp, claims.get("aud"), True)
    return principal_from_claims(idp, claims, "jwt", exp), (nbf if has_nbf else None)


cpdef check_audience(object idp, object aud, bint required):
    cdef bint found = False
    if aud is None:
        if required:
            raise AuthnError(R.TOKEN_CLAIM_MISSING, "aud")
        return
    audiences = idp.audiences
    if isinstance(aud, str):
        found = aud in audiences
    elif isinstance(aud, list) and len(<list>aud) > 0:
        for a in <list>aud:
            if not isinstance(a, str):
                raise AuthnError(R.TOKEN_CLAIM_INVALID, "aud")
        for a in <list>aud:
            if a in audiences:
                found = True
                break
    else:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, "aud")
    if not found:
        raise AuthnError(R.TOKEN_AUDIENCE_MISMATCH)


cpdef check_auth_time(dict claims, double now, double leeway):
    cdef double t
    if _time(claims, "auth_time", False, &t) and t > now + leeway:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, "auth_time is in the future")


cdef inline object _claim_at(dict claims, tuple path):
    cdef object value = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = (<dict>value).get(part)
    return value


cdef bint _header_safe(str s):
    """str.isprintable() and no whitespace that str.strip() would remove."""
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(s)
    cdef int kind = PyUnicode_KIND(s)
    cdef void *data = PyUnicode_DATA(s)
    cdef Py_UCS4 c
    if n == 0:
        return True
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c < 0x80:
            if c < 0x20 or c == 0x7F:
                return False
        elif not Py_UNICODE_ISPRINTABLE(c):
            return False
    return not (Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, 0)) or Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, n - 1)))


cdef inline bint _scope_char(Py_UCS4 c):
    # RFC 6749 §3.3 scope-token: %x21 / %x23-5B / %x5D-7E
    return c == 0x21 or 0x23 <= c <= 0x5B or 0x5D <= c <= 0x7E


cdef object _scope_set(object value):
    """principal.scope_set: None when invalid."""
    cdef Py_ssize_t i, start, n
    cdef int kind
    cdef void *data
    cdef Py_UCS4 c
    cdef object out
    if value is None:
        return EMPTY
    if isinstance(value, str):
        n = PyUnicode_GET_LENGTH(value)
        kind = PyUnicode_KIND(value)
        data = PyUnicode_DATA(value)
        for i in range(n):
            c = PyUnicode_READ(kind, data, i)
            if c != 0x20 and not _scope_char(c):
                return None
        out = PyFrozenSet_New(NULL)
        start = 0
        for i in range(n + 1):
            if i == n or PyUnicode_READ(kind, data, i) == 0x20:
                if i > start:
                    PySet_Add(out, PyUnicode_Substring(value, start, i))
                start = i + 1
        return out
    if isinstance(value, list):
        for v in <list>value:
            if not isinstance(v, str):
                return None
            n = PyUnicode_GET_LENGTH(v)
            if n == 0:
                return None
            kind = PyUnicode_KIND(v)
            data = PyUnicode_DATA(v)
            for i in range(n):
                if not _scope_char(PyUnicode_READ(kind, data, i)):
                    return None
        return frozenset(value)
    return None


cdef bint _no_control(str s):
    """No Unicode Cc character (C0, DEL, C1)."""
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(s)
    cdef int kind = PyUnicode_KIND(s)
    cdef void *data = PyUnicode_DATA(s)
    cdef Py_UCS4 c
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c <= 0x1F or 0x7F <= c <= 0x9F:
            return False
    return True


cdef object _role_set(object value):
    """principal.role_set: None when invalid."""
    cdef object out
    if value is None:
        return EMPTY
    if isinstance(value, str):
        if not _no_control(value):
            return None
        out = PyFrozenSet_New(NULL)
        PySet_Add(out, value)
        return out
    if isinstance(value, list):
        for v in <list>value:
            if not isinstance(v, str) or not _no_control(v):
                return None
        return frozenset(value)
    return None


cpdef principal_from_claims(object idp, dict claims, str method, object exp):
    cdef char *addr
    names = idp.claims
    sub = _claim_at(claims, names.subject_path)
    if sub is None or (isinstance(sub, str) and PyUnicode_GET_LENGTH(sub) == 0):
        raise AuthnError(R.TOKEN_CLAIM_MISSING, names.subject)
    if not isinstance(sub, str) or not _header_safe(sub) or PyUnicode_GET_LENGTH(sub) > 1024:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, names.subject)
    client_id = _claim_at(claims, names.client_id_path)
    if client_id is not None and (not isinstance(client_id, str) or not _header_safe(client_id)):
        raise AuthnError(R.TOKEN_CLAIM_INVALID, names.client_id)
    scopes = _scope_set(_claim_at(claims, names.scopes_path))
    if scopes is None:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, names.scopes)
    roles = _role_set(_claim_at(claims, names.roles_path))
    if roles is None:
        raise AuthnError(R.TOKEN_CLAIM_INVALID, names.roles)
    jti = claims.get("jti")
    if jti is not None and not isinstance(jti, str):
        raise AuthnError(R.TOKEN_CLAIM_INVALID, "jti")
    jkt = x5t = None
    cnf = claims.get("cnf")
    if cnf is not None:
        # A confirmation method we cannot check must not turn a bound token into a bearer token.
        if not isinstance(cnf, dict) or len(<dict>cnf) == 0:
            raise AuthnError(R.TOKEN_CLAIM_INVALID, "cnf (only jkt and x5t#S256 are supported)")
        for k in <dict>cnf:
            if not (k == JKT or k == X5T):
                raise AuthnError(R.TOKEN_CLAIM_INVALID, "cnf (only jkt and x5t#S256 are supported)")
        jkt, x5t = (<dict>cnf).get(JKT), (<dict>cnf).get(X5T)
        if (jkt is not None and not isinstance(jkt, str)) or (x5t is not None and not isinstance(x5t, str)):
            raise AuthnError(R.TOKEN_CLAIM_INVALID, "cnf")
    if not SLOT_FILL:
        return Principal(
            subject=sub, issuer=idp.issuer, method=method, client_id=client_id, jti=jti, scopes=scopes,
            roles=roles, expires_at=exp, cnf_jkt=jkt, cnf_x5t=x5t, claims=claims,
        )
    p = (<PyTypeObject*>Principal).tp_new(Principal, <PyObject*>NO_ARGS, NULL)  # object.__new__: slots unset
    addr = <char*><PyObject*>p
    PyMember_SetOne(addr, MEMBERS[0], sub)
    PyMember_SetOne(addr, MEMBERS[1], idp.issuer)
    PyMember_SetOne(addr, MEMBERS[2], method)
    PyMember_SetOne(addr, MEMBERS[3], client_id)
    PyMember_SetOne(addr, MEMBERS[4], jti)
    PyMember_SetOne(addr, MEMBERS[5], scopes)
    PyMember_SetOne(addr, MEMBERS[6], roles)
    PyMember_SetOne(addr, MEMBERS[7], exp)
    PyMember_SetOne(addr, MEMBERS[8], jkt)
    PyMember_SetOne(addr, MEMBERS[9], x5t)
    PyMember_SetOne(addr, MEMBERS[10], claims)
    PyMember_SetOne(addr, MEMBERS[11], {})  # memo: what conditions derive from these claims, per token
    return p
