# cython: language_level=3, boundscheck=False, wraparound=False
"""Strict unpadded base64url decoding in C: the same contract as agent/authn/_b64_py.py, its pure twin.

Refuses padding, '+', '/', whitespace, a length of 1 mod 4 and non-zero spare bits in the last character
(two spellings of the same bytes would give one token several cache keys).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_1BYTE_DATA, PyUnicode_GET_LENGTH, PyUnicode_KIND, PyUnicode_1BYTE_KIND

cdef signed char TABLE[256]
# pragma: allowlist nextline secret (the base64url alphabet)
cdef const unsigned char *ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
cdef int _i
for _i in range(256):
    TABLE[_i] = -1
for _i in range(64):
    TABLE[ALPHABET[_i]] = _i


cpdef bytes b64url_decode(str s):
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s)
    cdef Py_ssize_t tail = n % 4
    cdef const unsigned char *p
    cdef Py_ssize_t i, o = 0, full = n - tail
    cdef int a, b, c, d
    cdef bytes out
    cdef unsigned char *q
    if tail == 1 or PyUnicode_KIND(s) != PyUnicode_1BYTE_KIND:
        raise ValueError("not unpadded base64url")
    p = PyUnicode_1BYTE_DATA(s)
    out = PyBytes_FromStringAndSize(NULL, (n // 4) * 3 + (tail - 1 if tail else 0))
    q = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(0, full, 4):
        a, b, c, d = TABLE[p[i]], TABLE[p[i + 1]], TABLE[p[i + 2]], TABLE[p[i + 3]]
        if (a | b | c | d) < 0:  # -1 marks a character outside the alphabet
            raise ValueError("not unpadded base64url")
        q[o] = (a << 2) | (b >> 4)
        q[o + 1] = ((b & 0x0F) << 4) | (c >> 2)
        q[o + 2] = ((c & 0x03) << 6) | d
        o += 3
    if tail:
        a, b = TABLE[p[full]], TABLE[p[full + 1]]
        c = TABLE[p[full + 2]] if tail == 3 else 0
        if (a | b | c) < 0:
            raise ValueError("not unpadded base64url")
        q[o] = (a << 2) | (b >> 4)
        if tail == 2:
            if b & 0x0F:
                raise ValueError("non-canonical base64url")
        else:
            if c & 0x03:
                raise ValueError("non-canonical base64url")
            q[o + 1] = ((b & 0x0F) << 4) | (c >> 2)
    return out
