# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The repeated request in one C-level pass: CheckRequest bytes -> a remembered allow -> CheckResponse bytes.

Twin: agent/_recall_py.py (same API, same answers). The request is scanned, not decoded: only the key
(Authorization, method, path), the caller's address and the header names are read, with the wire checks of
native/_wire.pyx (anything it would refuse, or anything unusual, returns None and the engine decides). The key
is SHA-256 (OpenSSL) over the three; the table is open addressing over those digests, holding no token text.
A hit is answered if the token is still reusable (exp, nbf, the key set, the revocations), the caller's address
is the one remembered and the listeners saw it recently, and the rate limit has a token: the CheckResponse is
written into a C buffer, the audit record formatted from the entry's template into the audit queue (through its
C entry, no bytes object made), and the decision counted for /metrics. Per request the only Python objects made
are the response bytes (and, on a rate-limited route keyed by address, the bucket key).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.math cimport ceil
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import base64
import os

from agent.decision import LATENCY_BOUNDS_US

cdef extern from "time.h" nogil:
    struct tm:
        pass
    tm *gmtime_r(const long *timep, tm *result)
    size_t strftime(char *s, size_t maxsize, const char *fmt, const tm *t)

cdef extern from *:
    """
    /* The one-shot SHA-256 functions: no EVP fetch or lock per digest (~0.4 us of a 1 us digest). */
    #define OPENSSL_SUPPRESS_DEPRECATED
    #include <openssl/sha.h>
    """
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX *c) nogil
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t n) nogil
    int SHA256_Final(unsigned char *md, SHA256_CTX *c) nogil

cdef extern from "auditq_api.h":
    # The audit queue's entry for C producers (agent._auditq_c): the record is copied, no bytes object made.
    ctypedef struct agent_auditq_api:
        int (*append)(PyObject *queue, const char *data, Py_ssize_t n)

__all__ = ["RecallTable", "new_decision_id", "recall_key", "text_digest"]


# ---- decision ids -------------------------------------------------------------------------------
# A random prefix per process and a counter: unique across agents and restarts without a getrandom()
# per request. One counter for both paths: the engine takes its ids here too.

cdef bytes _ID_PREFIX = base64.urlsafe_b64encode(os.urandom(9))
cdef uint64_t _id_counter = 0
cdef const char *_HEX = b"0123456789abcdef"


cdef inline Py_ssize_t write_id(char *out) noexcept:
    """The next decision id into out (at least 12 + 16 bytes); returns its length."""
    global _id_counter
    cdef Py_ssize_t n = PyBytes_GET_SIZE(_ID_PREFIX)
    cdef char digits[16]
    cdef int k = 0
    cdef uint64_t v
    _id_counter += 1
    v = _id_counter
    memcpy(out, PyBytes_AS_STRING(_ID_PREFIX), n)
    while True:
        digits[k] = _HEX[v & 15]
        k += 1
        v >>= 4
        if v == 0:
            break
    while k:
        k -= 1
        out[n] = digits[k]
        n += 1
    return n


def new_decision_id():
    cdef char buf[48]
    cdef Py_ssize_t n = write_id(buf)
    return buf[:n].decode("ascii")


# ---- clocks and the audit record's time -------------------------------------------------------------

cdef inline double wall() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline long long mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000LL + ts.tv_nsec


cdef long _second = -1
cdef char _second_text[32]


cdef Py_ssize_t write_time(char *out, double now) noexcept:
    """now as agent.audit.records.rfc3339_ms formats it (2026-11-23T00:57:02.410Z); 24 bytes."""
    global _second
    cdef long whole = <long>now
    cdef tm t
    if whole != _second:
        # A clock gmtime cannot read, or a year of more than four digits: a fixed text of the same width, never
        # memory strftime did not write (a real clock never gets here).
        if gmtime_r(&whole, &t) == NULL or strftime(_second_text, 32, "%Y-%m-%dT%H:%M:%S", &t) != 19:
            memcpy(_second_text, b"0000-00-00T00:00:00", 20)
        _second = whole
    memcpy(out, _second_text, 19)
    return 19 + snprintf(out + 19, 8, ".%03dZ", <int>((now - whole) * 1000))


# ---- reading the CheckRequest -------------------------------------------------------------------
# The same wire checks as native/_wire.pyx's decoder, returning -1 where it raises (the engine then
# decides, and refuses it there), and -1 too where this pass would rather not judge.

cdef struct Cur:
    const uint8_t *p
    const uint8_t *end


cdef inline int varint(Cur *c, uint64_t *out) noexcept:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef uint8_t b
    while True:
        if c.p >= c.end or shift >= 70:
            return -1
        b = c.p[0]
        c.p += 1
        if shift == 63 and b > 1:
            return -1
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            out[0] = result
            return 0
        shift += 7


cdef inline int length(Cur *c, Cur *sub) noexcept:
    cdef uint64_t n
    if varint(c, &n) < 0 or n > <uint64_t>(c.end - c.p):
        return -1
    sub.p = c.p
    sub.end = c.p + n
    c.p += n
    return 0


cdef inline int key_of(Cur *c, uint64_t *key) noexcept:
    if varint(c, key) < 0:
        return -1
    if (key[0] >> 3) == 0 or (key[0] >> 3) > 536870911 or (key[0] & 7) == 4:
        return -1
    return 0


cdef int skip(Cur *c, uint64_t key, int depth) noexcept:
    cdef int wt = key & 7
    cdef uint64_t inner
    cdef Cur s
    if wt == 0:
        return varint(c, &inner)
    if wt == 1:
        if c.end - c.p < 8:
            return -1
        c.p += 8
        return 0
    if wt == 2:
        return length(c, &s)
    if wt == 5:
        if c.end - c.p < 4:
            return -1
        c.p += 4
        return 0
    if wt == 3:
        if depth > 64:
            return -1
        while True:
            if varint(c, &inner) < 0:
                return -1
            if (inner & 7) == 4:
                return 0 if (inner >> 3) == (key >> 3) else -1
            if (inner >> 3) == 0:
                return -1
            if skip(c, inner, depth + 1) < 0:
                return -1
    return -1


cdef inline bint ascii(Cur s) noexcept:
    # The decoder refuses strings that are not UTF-8; this pass takes only ASCII (anything else: the engine).
    cdef const uint8_t *p = s.p
    while p < s.end:
        if p[0] >= 0x80:
            return False
        p += 1
    return True


cdef struct Scan:
    Cur method
    Cur path
    Cur auth
    Cur source
    Cur request_id   # x-request-id, traceparent, x-b3-traceid, b3: for the audit record (agent/correlation.py)
    Cur traceparent
    Cur b3_traceid
    Cur b3
    Cur b3_spanid    # x-b3-spanid, x-b3-sampled, x-b3-flags: read only while the table traces
    Cur b3_sampled
    Cur b3_flags
    bint has_auth
    bint has_request_id
    bint has_traceparent
    bint has_b3_traceid
    bint has_b3
    bint spoofable  # a header the engine would remove (x-authz-*, a method or URL override)


cdef bint _lower_eq(const uint8_t *p, Py_ssize_t n, const char *want) noexcept:
    # want is lower-case with '-'; the name matches as a CGI/WSGI app reads it: any case, '_' as '-'
    cdef Py_ssize_t i
    cdef uint8_t ch
    for i in range(n):
        ch = p[i]
        if 65 <= ch <= 90:
            ch += 32
        elif ch == 95:
            ch = 45
        if ch != <uint8_t>want[i]:
            return False
    return True


cdef class RecallTable  # forward


cdef int header_entry(Cur c, Scan *sc, RecallTable t) noexcept:
    cdef uint64_t key
    cdef Cur k, v
    cdef bint unknown = False
    cdef bint has_k = False
    cdef Py_ssize_t n, i
    k.p = k.end = NULL
    v.p = v.end = NULL
    while c.p < c.end:
        if key_of(&c, &key) < 0:
            return -1
        if key == (1 << 3 | 2):
            if length(&c, &k) < 0 or not ascii(k):
                return -1
            has_k = True
        elif key == (2 << 3 | 2):
            if length(&c, &v) < 0 or not ascii(v):
                return -1
        else:
            if skip(&c, key, 0) < 0:
                return -1
            unknown = True
    if not has_k:
        k.p = k.end = c.end
    n = k.end - k.p
    # Named like one the engine removes: it decides (whether or not protobuf keeps the entry).
    if n >= t.prefix_n and _lower_eq(k.p, t.prefix_n, t.prefix):
        sc.spoofable = True
    else:
        for i in range(t.n_names):
            if n == t.name_lens[i] and _lower_eq(k.p, n, t.names[i]):
                sc.spoofable = True
    if unknown:
        return 0  # upb keeps such an entry out of the map, as the decoder does
    if not v.p:
        v.p = v.end = c.end
    if n == 13 and memcmp(k.p, b"authorization", 13) == 0:
        sc.auth = v
        sc.has_auth = True
    elif n == 12 and memcmp(k.p, b"x-request-id", 12) == 0:
        sc.request_id = v
        sc.has_request_id = True
    elif n == 11 and memcmp(k.p, b"traceparent", 11) == 0:
        sc.traceparent = v
        sc.has_traceparent = True
    elif n == 12 and memcmp(k.p, b"x-b3-traceid", 12) == 0:
        sc.b3_traceid = v
        sc.has_b3_traceid = True
    elif n == 2 and memcmp(k.p, b"b3", 2) == 0:
        sc.b3 = v
        sc.has_b3 = True
    elif t.tracing:
        if n == 11 and memcmp(k.p, b"x-b3-spanid", 11) == 0:
            sc.b3_spanid = v
        elif n == 12 and memcmp(k.p, b"x-b3-sampled", 12) == 0:
            sc.b3_sampled = v
        elif n == 10 and memcmp(k.p, b"x-b3-flags", 10) == 0:
            sc.b3_flags = v
    return 0


# ---- correlation: the same rules as agent/correlation.py ----------------------------------------------

cdef inline bint id_char(uint8_t ch) noexcept:
    # [A-Za-z0-9._~:+/=-]
    return ((48 <= ch <= 57) or (65 <= ch <= 90) or (97 <= ch <= 122) or ch == 46 or ch == 95 or ch == 126
            or ch == 58 or ch == 43 or ch == 47 or ch == 61 or ch == 45)


cdef inline bint lower_hex(const uint8_t *p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if not ((48 <= p[i] <= 57) or (97 <= p[i] <= 102)):
            return False
    return True


cdef char *put_request_id(char *p, Scan *sc) noexcept:
    """The request id as a JSON value: the header's text when it is a plain token of 1..128 characters, else null."""
    cdef Py_ssize_t n = sc.request_id.end - sc.request_id.p, i
    if sc.has_request_id and 1 <= n <= 128:
        for i in range(n):
            if not id_char(sc.request_id.p[i]):
                break
        else:
            return put_quoted(p, <const char*>sc.request_id.p, n)
    memcpy(p, b"null", 4)
    return p + 4


cdef char *put_trace_id(char *p, Scan *sc) noexcept:
    """The caller's trace id (32 lower-case hex) as a JSON value: W3C traceparent, else B3; else null."""
    cdef const uint8_t *t = NULL
    cdef Py_ssize_t n, tn = 0, i
    cdef const uint8_t *v
    cdef char out[32]
    if sc.has_traceparent:
        v = sc.traceparent.p
        n = sc.traceparent.end - v
        if (n >= 55 and lower_hex(v, 2) and v[2] == 45 and lower_hex(v + 3, 32) and v[35] == 45
                and lower_hex(v + 36, 16) and v[52] == 45 and lower_hex(v + 53, 2)
                and not (v[0] == 102 and v[1] == 102)
                and (n == 55 or (not (v[0] == 48 and v[1] == 48) and v[55] == 45))):
            t, tn = v + 3, 32
    elif sc.has_b3_traceid:
        t, tn = sc.b3_traceid.p, sc.b3_traceid.end - sc.b3_traceid.p
    elif sc.has_b3:
        v = sc.b3.p
        n = sc.b3.end - v
        tn = 0
        for i in range(n):
            if v[i] == 45:
                t, tn = v, i
                break
    if t == NULL or not (tn == 16 or tn == 32) or not lower_hex(t, tn):
        memcpy(p, b"null", 4)
        return p + 4
    memset(out, 48, 32)
    memcpy(out + 32 - tn, t, tn)
    for i in range(32):
        if out[i] != 48:
            return put_quoted(p, out, 32)
    memcpy(p, b"null", 4)  # all zeros: no trace
    return p + 4


cdef inline int hexval(uint8_t ch) noexcept:
    return ch - 48 if ch <= 57 else ch - 87  # a lower-case hex digit (checked before)


cdef bint unhex(const uint8_t *p, Py_ssize_t n, unsigned char *out) noexcept:
    """n lower-case hex digits (even n) into n/2 bytes; False when they are all zero."""
    cdef Py_ssize_t i
    cdef unsigned char any_set = 0
    for i in range(n // 2):
        out[i] = <unsigned char>(hexval(p[2 * i]) << 4 | hexval(p[2 * i + 1]))
        any_set |= out[i]
    return any_set != 0


cdef inline bint b3_sampled(const uint8_t *p, Py_ssize_t n) noexcept:
    # "1", "d", "true", "True": the values the SDK's B3 propagator takes as sampled
    return ((n == 1 and (p[0] == 49 or p[0] == 100))
            or (n == 4 and (p[0] == 116 or p[0] == 84) and memcmp(p + 1, b"rue", 3) == 0))


cdef int trace_parent(Scan *sc, unsigned char *tid, unsigned char *sid, int *flags) noexcept:
    """The caller's span (agent.correlation.parent): 1 with its trace id, span id and flags, else 0 (no parent, or
    a malformed one: the span is then a root)."""
    cdef const uint8_t *v
    cdef const uint8_t *t
    cdef const uint8_t *s
    cdef Py_ssize_t n, tn, sn, i, dashes
    cdef bint sampled
    cdef unsigned char wide[16]
    if sc.has_traceparent:
        v = sc.traceparent.p
        n = sc.traceparent.end - v
        if not (n >= 55 and lower_hex(v, 2) and v[2] == 45 and lower_hex(v + 3, 32) and v[35] == 45
                and lower_hex(v + 36, 16) and v[52] == 45 and lower_hex(v + 53, 2)
                and not (v[0] == 102 and v[1] == 102)
                and (n == 55 or (not (v[0] == 48 and v[1] == 48) and v[55] == 45))):
            return 0
        if not unhex(v + 3, 32, tid) or not unhex(v + 36, 16, sid):
            return 0
        flags[0] = hexval(v[53]) << 4 | hexval(v[54])
        return 1
    if sc.has_b3_traceid:
        t, tn = sc.b3_traceid.p, sc.b3_traceid.end - sc.b3_traceid.p
        s, sn = sc.b3_spanid.p, sc.b3_spanid.end - sc.b3_spanid.p
        sampled = (b3_sampled(sc.b3_sampled.p, sc.b3_sampled.end - sc.b3_sampled.p)
                   or (sc.b3_flags.end - sc.b3_flags.p == 1 and sc.b3_flags.p[0] == 49))
    elif sc.has_b3 and sc.b3.end > sc.b3.p:
        v = sc.b3.p
        n = sc.b3.end - v
        dashes = 0
        t = v
        tn = sn = 0
        s = v
        for i in range(n):
            if v[i] == 45:
                dashes += 1
                if dashes == 1:
                    tn = i
                    s = v + i + 1
                elif dashes == 2:
                    sn = v + i - s
        if dashes < 1 or dashes > 3:
            return 0  # split("-", 4): one field, or five
        if dashes == 1:
            sn = v + n - s
            sampled = True  # the decision deferred: the SDK takes it as sampled
        else:
            # the third field: up to the next '-' or the end
            t = s + sn + 1
            i = 0
            while t + i < v + n and t[i] != 45:
                i += 1
            sampled = b3_sampled(t, i)
            t = v
    else:
        return 0
    if not (tn == 16 or tn == 32) or not lower_hex(t, tn) or sn != 16 or not lower_hex(s, 16):
        return 0
    memset(wide, 0, 16)
    if not unhex(t, tn, wide + 16 - tn // 2) or not unhex(s, 16, sid):
        return 0
    memcpy(tid, wide, 16)
    flags[0] = 1 if sampled else 0
    return 1


cdef int socket_address(Cur c, Scan *sc) noexcept:
    cdef uint64_t key
    cdef Cur s
    while c.p < c.end:
        if key_of(&c, &key) < 0:
            return -1
        if key == (2 << 3 | 2):
            if length(&c, &s) < 0 or not ascii(s):
                return -1
            sc.source = s
        elif skip(&c, key, 0) < 0:
            return -1
    return 0


cdef int peer(Cur c, Scan *sc) noexcept:
    cdef uint64_t key
    cdef Cur a, s
    while c.p < c.end:
        if key_of(&c, &key) < 0:
            return -1
        if key == (1 << 3 | 2):
            if length(&c, &a) < 0:
                return -1
            while a.p < a.end:
                if key_of(&a, &key) < 0:
                    return -1
                if key == (1 << 3 | 2):
                    if length(&a, &s) < 0 or socket_address(s, sc) < 0:
                        return -1
                elif key == (2 << 3 | 2) or key == (3 << 3 | 2):
                    if length(&a, &s) < 0:
                        return -1
                    sc.source.p = sc.source.end = a.p  # a pipe or internal address: no source
                elif skip(&a, key, 0) < 0:
                    return -1
        elif key == (5 << 3 | 2):
            if length(&c, &s) < 0 or not ascii(s):
                return -1
        elif skip(&c, key, 0) < 0:
            return -1
    return 0


cdef int http(Cur c, Scan *sc, RecallTable t) noexcept:
    cdef uint64_t key
    cdef Cur s
    while c.p < c.end:
        if key_of(&c, &key) < 0:
            return -1
        if key == (2 << 3 | 2):
            if length(&c, &s) < 0 or not ascii(s):
                return -1
            sc.method = s
        elif key == (3 << 3 | 2):
            if length(&c, &s) < 0 or header_entry(s, sc, t) < 0:
                return -1
        elif key == (4 << 3 | 2):
            if length(&c, &s) < 0 or not ascii(s):
                return -1
            sc.path = s
        elif key == (5 << 3 | 2) or key == (6 << 3 | 2) or key == (11 << 3 | 2):  # host, scheme, body
            if length(&c, &s) < 0 or not ascii(s):
                return -1
        elif key == (13 << 3 | 2):
            return -1  # raw header_map: the engine joins repeated names
        elif skip(&c, key, 0) < 0:
            return -1
    return 0


cdef int scan(const uint8_t *data, Py_ssize_t n, Scan *sc, RecallTable t) noexcept:
    cdef Cur c, attrs, req, s
    cdef uint64_t key
    c.p = data
    c.end = data + n
    memset(sc, 0, sizeof(Scan))
    sc.method.p = sc.method.end = data
    sc.path.p = sc.path.end = data
    sc.source.p = sc.source.end = data
    while c.p < c.end:
        if key_of(&c, &key) < 0:
            return -1
        if key != (1 << 3 | 2):
            if skip(&c, key, 0) < 0:
                return -1
            continue
        if length(&c, &attrs) < 0:
            return -1
        while attrs.p < attrs.end:
            if key_of(&attrs, &key) < 0:
                return -1
            if key == (1 << 3 | 2):
                if length(&attrs, &s) < 0 or peer(s, sc) < 0:
                    return -1
            elif key == (4 << 3 | 2):
                if length(&attrs, &req) < 0:
                    return -1
                while req.p < req.end:
                    if key_of(&req, &key) < 0:
                        return -1
                    if key == (2 << 3 | 2):
                        if length(&req, &s) < 0 or http(s, sc, t) < 0:
                            return -1
                    elif skip(&req, key, 0) < 0:
                        return -1
            elif skip(&attrs, key, 0) < 0:
                return -1
    return 0


# ---- writing the CheckResponse --------------------------------------------------------------------

cdef inline Py_ssize_t vlen(uint64_t v) noexcept:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline char *put_varint(char *p, uint64_t v) noexcept:
    while v >= 0x80:
        p[0] = <char>((v & 0x7F) | 0x80)
        p += 1
        v >>= 7
    p[0] = <char>v
    return p + 1


cdef inline char *put_field(char *p, int field, const char *s, Py_ssize_t n) noexcept:
    p = put_varint(p, (field << 3) | 2)
    p = put_varint(p, n)
    memcpy(p, s, n)
    return p + n


cdef inline Py_ssize_t field_len(Py_ssize_t n) noexcept:
    return 1 + vlen(n) + n


cdef inline Py_ssize_t option_len(Py_ssize_t klen, Py_ssize_t vlen_) noexcept:
    # HeaderValueOption{header: HeaderValue{key, value}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}, as a field
    cdef Py_ssize_t hv = (field_len(klen) if klen else 0) + (field_len(vlen_) if vlen_ else 0)
    return field_len(field_len(hv) + 2)


cdef char *put_option(char *p, int field, const char *k, Py_ssize_t kn, const char *v, Py_ssize_t vn) noexcept:
    cdef Py_ssize_t hv = (field_len(kn) if kn else 0) + (field_len(vn) if vn else 0)
    p = put_varint(p, (field << 3) | 2)
    p = put_varint(p, field_len(hv) + 2)
    p = put_varint(p, (1 << 3) | 2)
    p = put_varint(p, hv)
    if kn:
        p = put_field(p, 1, k, kn)
    if vn:
        p = put_field(p, 2, v, vn)
    p[0] = 0x18  # append_action (3), varint
    p[1] = 2
    return p + 2


cdef inline Py_ssize_t struct_len(Py_ssize_t kn, Py_ssize_t vn) noexcept:
    # google.protobuf.Struct.fields entry {key = 1, value = Value{string_value = 3}}, as field 1 of the Struct
    return field_len(field_len(kn) + field_len(field_len(vn)))


cdef char *put_struct(char *p, const char *k, Py_ssize_t kn, const char *v, Py_ssize_t vn) noexcept:
    p = put_varint(p, (1 << 3) | 2)
    p = put_varint(p, field_len(kn) + field_len(field_len(vn)))
    p = put_field(p, 1, k, kn)
    p = put_varint(p, (2 << 3) | 2)
    p = put_varint(p, field_len(vn))
    return put_field(p, 3, v, vn)


cdef inline char *put_bytes(char *p, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


cdef inline char *put_quoted(char *p, const char *s, Py_ssize_t n) noexcept:
    # a JSON string whose text needs no escaping (checked before)
    p[0] = 0x22
    memcpy(p + 1, s, n)
    p[1 + n] = 0x22
    return p + 2 + n


cdef bytes option(int field, str key, str value):
    cdef bytes k = key.encode(), v = value.encode()
    cdef Py_ssize_t n = option_len(len(k), len(v))
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    put_option(PyBytes_AS_STRING(out), field, k, len(k), v, len(v))
    return out


cdef bytes struct_entry(str key, str value):
    cdef bytes k = key.encode(), v = value.encode()
    cdef bytes out = PyBytes_FromStringAndSize(NULL, struct_len(len(k), len(v)))
    put_struct(PyBytes_AS_STRING(out), k, len(k), v, len(v))
    return out


cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL


def text_digest(str text):
    """SHA-256 of a str's UTF-8 (an ASCII str is hashed in place, no bytes made): the verified-token cache's key."""
    cdef Py_ssize_t n
    cdef const char *p = PyUnicode_AsUTF8AndSize(text, &n)
    cdef unsigned char md[32]
    cdef SHA256_CTX ctx
    if SHA256_Init(&ctx) != 1 or SHA256_Update(&ctx, p, n) != 1 or SHA256_Final(md, &ctx) != 1:
        raise MemoryError()
    return PyBytes_FromStringAndSize(<char*>md, 32)


def recall_key(bytes header, bytes method, bytes path):
    """SHA-256 over a per-process secret and the three, each with its length: the table holds no token text."""
    cdef unsigned char md[32]
    digest3(<const uint8_t*>PyBytes_AS_STRING(header), len(header), <const uint8_t*>PyBytes_AS_STRING(method),
            len(method), <const uint8_t*>PyBytes_AS_STRING(path), len(path), md)
    return PyBytes_FromStringAndSize(<char*>md, 32)


# A secret per process hashed first: the table's slot is the digest's low bits, and a caller who could predict
# digests of its own requests (a query string per try) could make them share slots and slow every lookup.
cdef bytes _SALT = os.urandom(16)


cdef int digest3(const uint8_t *a, Py_ssize_t an, const uint8_t *b, Py_ssize_t bn, const uint8_t *c,
                 Py_ssize_t cn, unsigned char *md) noexcept:
    cdef unsigned char lens[12]
    cdef SHA256_CTX ctx
    cdef int i
    cdef Py_ssize_t parts[3]
    parts[0] = an
    parts[1] = bn
    parts[2] = cn
    for i in range(3):
        lens[4 * i] = (parts[i] >> 24) & 0xFF
        lens[4 * i + 1] = (parts[i] >> 16) & 0xFF
        lens[4 * i + 2] = (parts[i] >> 8) & 0xFF
        lens[4 * i + 3] = parts[i] & 0xFF
    if (SHA256_Init(&ctx) != 1 or SHA256_Update(&ctx, PyBytes_AS_STRING(_SALT), 16) != 1
            or SHA256_Update(&ctx, lens, 4) != 1 or SHA256_Update(&ctx, a, an) != 1
            or SHA256_Update(&ctx, lens + 4, 4) != 1 or SHA256_Update(&ctx, b, bn) != 1
            or SHA256_Update(&ctx, lens + 8, 4) != 1 or SHA256_Update(&ctx, c, cn) != 1
            or SHA256_Final(md, &ctx) != 1):
        return -1
    return 0


# ---- the table ----------------------------------------------------------------------------------

cdef class _Entry:
    cdef double exp, leeway, nbf, observed_at, resync_s
    cdef bint has_nbf
    cdef object store, keys, revocations, revocation_state
    cdef bytes ok_head       # the x-authz-route option
    cdef bytes ok_tail       # subject and client-id options, the authorization removal
    cdef bytes meta_tail     # decision, reason and route metadata entries
    cdef bytes source
    cdef tuple audit         # five template parts, or None
    cdef Py_ssize_t slot     # the route's counter
    cdef object limit        # BucketTable or None
    cdef object limit_key    # str, or None when it has the address in it (then limit_parts)
    cdef tuple limit_parts
    cdef bytes limit_policy_option
    cdef bytes limit_name
    cdef double limit_rate, limit_burst
    cdef str route, method, trace_path  # for the spans of the answers (agent.tracing)


cdef struct TraceRec:
    # A sampled answer's span, for agent.tracing (RecallTable.traces): agent._recall_py.TraceRecord in C.
    unsigned char trace_id[16]
    unsigned char span_id[8]
    int has_parent
    int flags
    PyObject *entry   # a strong reference: route, method and path
    char did[48]
    Py_ssize_t did_n
    long long start_ns
    long long latency_ns


cdef enum:
    TRACE_BUFFER = 4096  # spans held between two drains; past it they are counted in trace_dropped
TRACE_ID_LIMIT = (1 << 64) - 1


cdef struct Slot:
    unsigned char digest[32]
    PyObject *entry  # a strong reference, or NULL when empty


cdef Py_ssize_t NBUCKETS = len(LATENCY_BOUNDS_US) + 1
cdef long long[32] BOUNDS
for _i, _b in enumerate(LATENCY_BOUNDS_US):
    BOUNDS[_i] = _b


cdef class RecallTable:
    """Remembered allows by SHA-256 of (Authorization, method, path); at most `max_entries`, oldest out first."""

    cdef readonly Py_ssize_t max_entries
    cdef readonly Py_ssize_t hits
    cdef Slot *slots
    cdef Py_ssize_t cap, used
    cdef unsigned char (*ring)[32]  # digests in insertion order: the oldest goes first when full
    cdef Py_ssize_t ring_head, ring_len
    cdef object audit
    cdef agent_auditq_api *audit_api
    cdef char *buf
    cdef Py_ssize_t buf_cap
    cdef bytes prefix_b
    cdef const char *prefix
    cdef Py_ssize_t prefix_n
    cdef list names_b
    cdef const char **names
    cdef Py_ssize_t *name_lens
    cdef Py_ssize_t n_names
    cdef list routes        # slot -> route name
    cdef dict route_slots   # route name -> slot
    cdef long long *counts
    cdef Py_ssize_t counts_cap
    cdef long long buckets[32]
    cdef long long latency_sum
    cdef readonly bint tracing
    cdef readonly long long trace_dropped
    cdef bint trace_all       # ratio 1: every root sampled
    cdef uint64_t trace_bound  # else a root is sampled when its trace id's low 64 bits are below this
    cdef uint64_t rng          # splitmix64 state for new trace ids
    cdef TraceRec *traces_buf
    cdef TraceRec *traces_spare
    cdef Py_ssize_t traces_n
    cdef bint draining
    cdef object __weakref__  # the tracer holds tables weakly: an engine built and never served is not kept

    def __cinit__(self, Py_ssize_t max_entries, object audit=None, str spoofable_prefix="x-authz-",
                  frozenset spoofable_names=frozenset()):
        cdef Py_ssize_t i
        self.max_entries = max_entries if max_entries > 0 else 0
        self.cap = 16
        while self.cap < 2 * self.max_entries + 2:
            self.cap *= 2
        self.slots = <Slot*>calloc(self.cap, sizeof(Slot))
        self.ring = <unsigned char (*)[32]>malloc((self.max_entries + 1) * 32)
        self.buf_cap = 4096
        self.buf = <char*>malloc(self.buf_cap)
        self.counts_cap = 16
        self.counts = <long long*>calloc(self.counts_cap, sizeof(long long))
        if self.slots == NULL or self.ring == NULL or self.buf == NULL or self.counts == NULL:
            raise MemoryError()
        self.audit = audit
        self.audit_api = NULL
        if audit is not None and hasattr(audit, "capsule"):
            cap = audit.capsule()
            if PyCapsule_IsValid(cap, b"agent._auditq_c.api"):
                self.audit_api = <agent_auditq_api*>PyCapsule_GetPointer(cap, b"agent._auditq_c.api")
        self.prefix_b = spoofable_prefix.encode()
        self.prefix = PyBytes_AS_STRING(self.prefix_b)
        self.prefix_n = len(self.prefix_b)
        self.names_b = [n.encode() for n in sorted(spoofable_names)]
        self.n_names = len(self.names_b)
        self.names = <const char**>malloc((self.n_names + 1) * sizeof(char*))
        self.name_lens = <Py_ssize_t*>malloc((self.n_names + 1) * sizeof(Py_ssize_t))
        if self.names == NULL or self.name_lens == NULL:
            raise MemoryError()
        for i in range(self.n_names):
            self.names[i] = PyBytes_AS_STRING(self.names_b[i])
            self.name_lens[i] = len(self.names_b[i])
        self.routes = []
        self.route_slots = {}
        self.tracing = False
        self.traces_buf = NULL
        self.traces_spare = NULL

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.traces_buf != NULL:
            for i in range(self.traces_n):
                Py_XDECREF(self.traces_buf[i].entry)
        free(self.traces_buf)
        free(self.traces_spare)
        if self.slots != NULL:
            for i in range(self.cap):
                if self.slots[i].entry != NULL:
                    Py_XDECREF(self.slots[i].entry)
            free(self.slots)
        free(self.ring)
        free(self.buf)
        free(self.counts)
        free(self.names)
        free(self.name_lens)

    def __len__(self):
        return self.used

    # -- the hash table over digests (linear probing, backward-shift deletion) --

    cdef inline Py_ssize_t home(self, const unsigned char *d) noexcept:
        cdef uint64_t h
        memcpy(&h, d, 8)
        return <Py_ssize_t>(h & <uint64_t>(self.cap - 1))

    cdef Py_ssize_t find(self, const unsigned char *d) noexcept:
        cdef Py_ssize_t i = self.home(d)
        while self.slots[i].entry != NULL:
            if memcmp(self.slots[i].digest, d, 32) == 0:
                return i
            i = (i + 1) & (self.cap - 1)
        return -1

    cdef void remove_at(self, Py_ssize_t i):
        cdef Py_ssize_t j, k, mask = self.cap - 1
        Py_XDECREF(self.slots[i].entry)
        self.slots[i].entry = NULL
        self.used -= 1
        j = i
        while True:
            j = (j + 1) & mask
            if self.slots[j].entry == NULL:
                return
            k = self.home(self.slots[j].digest)
            # move j back to i when its home is not in (i, j] (cyclically)
            if (i <= j and (k <= i or k > j)) or (i > j and (k <= i and k > j)):
                self.slots[i] = self.slots[j]
                self.slots[j].entry = NULL
                i = j

    cdef void remove(self, const unsigned char *d):
        cdef Py_ssize_t i = self.find(d)
        if i >= 0:
            self.remove_at(i)

    def put(self, spec):
        """Remember an allow (an agent.decision.Recall); replaces the entry of the same key."""
        cdef unsigned char md[32]
        cdef bytes header = spec.header.encode(), method = spec.method.encode(), path = spec.path.encode()
        cdef Py_ssize_t i
        cdef _Entry e
        if self.max_entries == 0:
            return
        if digest3(<const uint8_t*>PyBytes_AS_STRING(header), len(header), <const uint8_t*>PyBytes_AS_STRING(method),
                   len(method), <const uint8_t*>PyBytes_AS_STRING(path), len(path), md) < 0:
            return
        e = self.entry_of(spec)
        i = self.find(md)
        if i >= 0:
            Py_INCREF(e)
            Py_XDECREF(self.slots[i].entry)
            self.slots[i].entry = <PyObject*>e
            return
        if self.ring_len >= self.max_entries:  # the oldest out
            self.remove(self.ring[self.ring_head])
            self.ring_head = (self.ring_head + 1) % self.max_entries
            self.ring_len -= 1
        memcpy(self.ring[(self.ring_head + self.ring_len) % self.max_entries], md, 32)
        self.ring_len += 1
        i = self.home(md)
        while self.slots[i].entry != NULL:
            i = (i + 1) & (self.cap - 1)
        memcpy(self.slots[i].digest, md, 32)
        Py_INCREF(e)
        self.slots[i].entry = <PyObject*>e
        self.used += 1

    cdef _Entry entry_of(self, spec):
        cdef _Entry e = _Entry.__new__(_Entry)
        e.exp = spec.exp
        e.leeway = spec.leeway
        e.has_nbf = spec.nbf is not None
        e.nbf = spec.nbf if e.has_nbf else 0.0
        e.store = spec.store
        e.keys = spec.keys
        e.revocations = spec.revocations
        e.revocation_state = spec.revocation_state
        e.observed_at = spec.observed_at
        e.resync_s = spec.resync_s
        e.source = spec.source.encode()
        e.ok_head = option(2, "x-authz-route", spec.route)
        tail = option(2, "x-authz-subject", spec.subject)
        if spec.client_id is not None:
            tail += option(2, "x-authz-client-id", spec.client_id)
        if spec.remove_authorization:
            tail += b"\x2a\x0dauthorization"  # headers_to_remove (5)
        e.ok_tail = tail
        e.meta_tail = struct_entry("decision", "allow") + struct_entry("reason", "allowed") + struct_entry(
            "route", spec.route)
        e.audit = tuple(spec.audit) if spec.audit is not None else None
        if e.audit is not None and (len(e.audit) != 7 or not all(isinstance(part, bytes) for part in e.audit)):
            raise ValueError("an audit template is seven byte strings (agent.audit.records.record_template)")
        slot = self.route_slots.get(spec.route)
        if slot is None:
            slot = len(self.routes)
            if slot >= self.counts_cap:
                grown = <long long*>realloc(self.counts, 2 * self.counts_cap * sizeof(long long))
                if grown == NULL:
                    raise MemoryError()
                memset(grown + self.counts_cap, 0, self.counts_cap * sizeof(long long))
                self.counts = grown
                self.counts_cap *= 2
            self.routes.append(spec.route)
            self.route_slots[spec.route] = slot
        e.slot = slot
        e.route = spec.route
        e.method = spec.method
        e.trace_path = spec.trace_path
        e.limit = spec.limit
        if spec.limit is not None:
            e.limit_parts = tuple(spec.limit_key)
            e.limit_key = None if None in e.limit_parts else "\x1f".join(e.limit_parts)
            e.limit_policy_option = option(6, "ratelimit-policy", spec.limit_policy)
            e.limit_name = spec.limit_name.encode()
            e.limit_rate = spec.limit.rate
            e.limit_burst = spec.limit.burst
        return e

    def touch(self, str header, str method, str path, str source, double observed_at, object revocation_state):
        """The engine has just seen this remembered caller (its address, the revocations in force): True when the
        key was here and now carries them, False when it must be put whole."""
        cdef unsigned char md[32]
        cdef bytes h = header.encode(), m = method.encode(), p = path.encode()
        cdef Py_ssize_t i
        cdef _Entry e
        if digest3(<const uint8_t*>PyBytes_AS_STRING(h), len(h), <const uint8_t*>PyBytes_AS_STRING(m), len(m),
                   <const uint8_t*>PyBytes_AS_STRING(p), len(p), md) < 0:
            return False
        i = self.find(md)
        if i < 0:
            return False
        e = <_Entry>self.slots[i].entry
        e.source = source.encode()
        e.observed_at = observed_at
        e.revocation_state = revocation_state
        return True

    def clear(self):
        cdef Py_ssize_t i
        for i in range(self.cap):
            if self.slots[i].entry != NULL:
                Py_XDECREF(self.slots[i].entry)
                self.slots[i].entry = NULL
        self.used = 0
        self.ring_len = 0
        self.ring_head = 0

    def close(self):
        """Forget everything and answer nothing from now on (the engine that filled it is retired)."""
        self.clear()
        self.max_entries = 0

    def fold(self):
        """The answers counted since the last fold, per route, and their latency histogram and sum; reset."""
        cdef Py_ssize_t i
        counts = {}
        for i in range(len(self.routes)):
            if self.counts[i]:
                counts[self.routes[i]] = self.counts[i]
                self.counts[i] = 0
        buckets = [self.buckets[i] for i in range(NBUCKETS)]
        memset(self.buckets, 0, sizeof(self.buckets))
        total = self.latency_sum
        self.latency_sum = 0
        return counts, buckets, total

    def trace(self, ratio):
        """Record a span for the answers that are sampled (agent.tracing), as ParentBased(TraceIdRatioBased(ratio))
        decides: the caller's sampled flag when it sent a parent, else a new trace id below ratio * 2^64. None: off.
        """
        cdef object bound
        if ratio is None:
            self.tracing = False
            return
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("a sampling ratio is between 0 and 1")
        if self.traces_buf == NULL:
            self.traces_buf = <TraceRec*>calloc(TRACE_BUFFER, sizeof(TraceRec))
            self.traces_spare = <TraceRec*>calloc(TRACE_BUFFER, sizeof(TraceRec))
            if self.traces_buf == NULL or self.traces_spare == NULL:
                raise MemoryError()
            self.rng = int.from_bytes(os.urandom(8), "big")
        bound = round(ratio * (TRACE_ID_LIMIT + 1))
        self.trace_all = bound > TRACE_ID_LIMIT
        self.trace_bound = 0 if self.trace_all else bound
        self.tracing = True

    def traces(self):
        """The spans recorded since the last call, oldest first; reset. One drain at a time: a call while another
        is under way (another thread) returns nothing."""
        cdef TraceRec *recs
        cdef TraceRec *r
        cdef Py_ssize_t n, i = 0
        cdef _Entry e
        out = []
        if self.draining or self.traces_buf == NULL:
            return out
        self.draining = True
        # Swapped before any object is made: an answer on another thread meanwhile writes into the other buffer.
        recs = self.traces_buf
        n = self.traces_n
        self.traces_buf = self.traces_spare
        self.traces_spare = recs
        self.traces_n = 0
        try:
            while i < n:
                r = &recs[i]
                e = <_Entry>r.entry
                out.append((
                    PyBytes_FromStringAndSize(<char*>r.trace_id, 16),
                    PyBytes_FromStringAndSize(<char*>r.span_id, 8) if r.has_parent else None,
                    r.flags,
                    e.route,
                    r.did[:r.did_n].decode("ascii"),
                    r.start_ns,
                    r.latency_ns,
                    e.method,
                    e.trace_path,
                ))
                Py_XDECREF(r.entry)
                r.entry = NULL
                i += 1
        finally:
            while i < n:  # only on an error making them: never a reference left behind
                Py_XDECREF(recs[i].entry)
                recs[i].entry = NULL
                i += 1
            self.draining = False
        return out

    cdef inline uint64_t random64(self) noexcept:
        # splitmix64: new trace ids need to be unique and uniform, not secret
        cdef uint64_t z
        self.rng += 0x9E3779B97F4A7C15ULL
        z = self.rng
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
        return z ^ (z >> 31)

    cdef void record_span(self, _Entry e, Scan *sc, const char *did, Py_ssize_t did_n, double now,
                          long long start) noexcept:
        """The span of a sampled answer into the buffer (no Python object made); else nothing."""
        cdef TraceRec *r
        cdef unsigned char tid[16]
        cdef unsigned char sid[8]
        cdef int flags = 1, k
        cdef uint64_t low, high
        cdef bint has_parent = trace_parent(sc, tid, sid, &flags) == 1
        if has_parent:
            if not (flags & 1):
                return  # the caller's trace is not sampled
        else:
            low = self.random64()
            if not self.trace_all and low >= self.trace_bound:
                return
            high = self.random64()
            if high == 0 and low == 0:
                high = 1
            for k in range(8):
                tid[k] = (high >> (56 - 8 * k)) & 0xFF
                tid[8 + k] = (low >> (56 - 8 * k)) & 0xFF
            flags = 1
        if self.traces_n >= TRACE_BUFFER:
            self.trace_dropped += 1
            return
        r = &self.traces_buf[self.traces_n]
        memcpy(r.trace_id, tid, 16)
        if has_parent:
            memcpy(r.span_id, sid, 8)
        r.has_parent = has_parent
        r.flags = flags
        Py_INCREF(e)
        r.entry = <PyObject*>e
        memcpy(r.did, did, did_n)
        r.did_n = did_n
        r.start_ns = <long long>(now * 1e9)
        r.latency_ns = mono_ns() - start
        self.traces_n += 1

    cdef int reserve(self, Py_ssize_t n) except -1:
        cdef char *grown
        if n <= self.buf_cap:
            return 0
        while self.buf_cap < n:
            self.buf_cap *= 2
        grown = <char*>realloc(self.buf, self.buf_cap)
        if grown == NULL:
            raise MemoryError()
        self.buf = grown
        return 0

    cpdef object answer(self, bytes message, double now=-1.0):
        """The CheckResponse for a remembered allow, or None: the engine decides."""
        cdef long long start = mono_ns()
        cdef Scan sc
        cdef unsigned char md[32]
        cdef Py_ssize_t i, n, did_n, rl_n, ok_n, meta_n, total, src_n
        cdef _Entry e
        cdef char did[48]
        cdef char rl[96]
        cdef const uint8_t *s
        cdef double left, reset
        cdef long long latency, rem
        cdef char *p
        if self.used == 0:
            return None
        if scan(<const uint8_t*>PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message), &sc, self) < 0:
            return None
        if not sc.has_auth or sc.spoofable:
            return None
        if digest3(sc.auth.p, sc.auth.end - sc.auth.p, sc.method.p, sc.method.end - sc.method.p, sc.path.p,
                   sc.path.end - sc.path.p, md) < 0:
            return None
        i = self.find(md)
        if i < 0:
            return None
        e = <_Entry>self.slots[i].entry
        if now < 0:
            now = wall()
        if (not now < e.exp + e.leeway or (e.has_nbf and not now + e.leeway >= e.nbf)
                or e.store.keys is not e.keys or e.revocations.state is not e.revocation_state):
            self.remove_at(i)  # never reusable again; the engine decides afresh
            return None
        src_n = sc.source.end - sc.source.p
        if (src_n != PyBytes_GET_SIZE(e.source) or memcmp(sc.source.p, PyBytes_AS_STRING(e.source), src_n) != 0
                or now - e.observed_at >= e.resync_s):
            return None  # the listeners see this one
        s = sc.source.p
        while s < sc.source.end:
            if s[0] < 0x20 or s[0] == 0x22 or s[0] == 0x5C or s[0] == 0x7F:
                return None  # the audit record would escape it: the engine writes that one
            s += 1
        rl_n = 0
        if e.limit is not None:
            if PyBytes_GET_SIZE(e.limit_name) > 40:
                return None  # its RateLimit header is longer than this pass writes: the engine answers (untaken)
            key = e.limit_key
            if key is None:
                source = (<const char*>sc.source.p)[:src_n].decode("ascii")
                key = "\x1f".join([source if part is None else part for part in e.limit_parts])
            left = e.limit.take(key, now)
            if left < 0:
                return None  # the engine refuses it with the 429's headers
            reset = (e.limit_burst - left) / e.limit_rate
            rem = <long long>left if left > 0 else 0
            n = PyBytes_GET_SIZE(e.limit_name)
            memcpy(rl, PyBytes_AS_STRING(e.limit_name), n)
            rl_n = n + snprintf(rl + n, 96 - n, ";r=%lld;t=%lld", rem,
                                <long long>ceil(reset) if reset > 0 else 0)
        did_n = write_id(did)
        ok_n = (PyBytes_GET_SIZE(e.ok_head) + option_len(19, did_n) + PyBytes_GET_SIZE(e.ok_tail))
        if e.limit is not None:
            ok_n += PyBytes_GET_SIZE(e.limit_policy_option) + option_len(9, rl_n)
        meta_n = struct_len(11, did_n) + PyBytes_GET_SIZE(e.meta_tail)
        total = 2 + field_len(ok_n) + field_len(meta_n)
        out = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(out)
        p[0] = 0x0A  # status: OK (an empty google.rpc.Status)
        p[1] = 0
        p = put_varint(p + 2, (3 << 3) | 2)
        p = put_varint(p, ok_n)
        memcpy(p, PyBytes_AS_STRING(e.ok_head), PyBytes_GET_SIZE(e.ok_head))
        p += PyBytes_GET_SIZE(e.ok_head)
        p = put_option(p, 2, b"x-authz-decision-id", 19, did, did_n)
        memcpy(p, PyBytes_AS_STRING(e.ok_tail), PyBytes_GET_SIZE(e.ok_tail))
        p += PyBytes_GET_SIZE(e.ok_tail)
        if e.limit is not None:
            memcpy(p, PyBytes_AS_STRING(e.limit_policy_option), PyBytes_GET_SIZE(e.limit_policy_option))
            p += PyBytes_GET_SIZE(e.limit_policy_option)
            p = put_option(p, 6, b"ratelimit", 9, rl, rl_n)
        p = put_varint(p, (4 << 3) | 2)
        p = put_varint(p, meta_n)
        p = put_struct(p, b"decision_id", 11, did, did_n)
        memcpy(p, PyBytes_AS_STRING(e.meta_tail), PyBytes_GET_SIZE(e.meta_tail))
        latency = (mono_ns() - start) // 1000
        if e.audit is not None and self.audit is not None:
            self.record(e, now, did, did_n, sc.source.p, src_n, latency, &sc)
        self.hits += 1
        self.counts[e.slot] += 1
        for i in range(NBUCKETS - 1):
            if latency <= BOUNDS[i]:
                break
        else:
            i = NBUCKETS - 1
        self.buckets[i] += 1
        self.latency_sum += latency
        if self.tracing:
            self.record_span(e, &sc, did, did_n, now, start)
        return out

    cdef int record(self, _Entry e, double now, const char *did, Py_ssize_t did_n, const uint8_t *src,
                    Py_ssize_t src_n, long long latency, Scan *sc) except -1:
        """The audit record from the entry's template: time, decision_id, source and latency_us filled in."""
        cdef tuple a = e.audit
        cdef Py_ssize_t n = 0
        cdef char *p
        for part in a:
            n += PyBytes_GET_SIZE(<bytes>part)
        self.reserve(n + 24 + 2 + did_n + 2 + 130 + 34 + src_n + 2 + 24)
        p = put_bytes(self.buf, <bytes>a[0])
        p[0] = 0x22
        p += 1 + write_time(p + 1, now)
        p[0] = 0x22
        p = put_quoted(put_bytes(p + 1, <bytes>a[1]), did, did_n)
        p = put_request_id(put_bytes(p, <bytes>a[2]), sc)
        p = put_trace_id(put_bytes(p, <bytes>a[3]), sc)
        p = put_quoted(put_bytes(p, <bytes>a[4]), <const char*>src, src_n)
        p = put_bytes(p, <bytes>a[5])
        p += snprintf(p, 24, "%lld", latency)
        p = put_bytes(p, <bytes>a[6])
        if self.audit_api != NULL:
            if self.audit_api.append(<PyObject*>self.audit, self.buf, p - self.buf) < 0:
                raise TypeError("the audit queue is not an agent._auditq_c.RecordQueue")
        else:
            self.audit.append(PyBytes_FromStringAndSize(self.buf, p - self.buf))
        return 0

