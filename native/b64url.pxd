# cython: language_level=3
"""Strict unpadded base64url decoding as an inline C function, for every module that decodes JOSE parts:
native/_b64.pyx (agent._b64_c, the b64url_decode of agent/authn/_b64_py.py) and native/_claims.pyx (a JWT's
three parts, decoded straight from the token's text). One decoder, so both give the same bytes and errors.

Refuses padding, '+', '/', whitespace, a length of 1 mod 4 and non-zero spare bits in the last character
(two spellings of the same bytes would give one token several cache keys).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

cdef extern from *:
    """
    /* base64url alphabet value of each byte; -1 outside it */
    static const signed char AGENT_B64URL[256] = {
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 62, -1, -1,
        52, 53, 54, 55, 56, 57, 58, 59, 60, 61, -1, -1, -1, -1, -1, -1,
        -1,  0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14,
        15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, -1, -1, -1, -1, 63,
        -1, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
        41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    };
    """
    const signed char AGENT_B64URL[256]


cdef inline bytes b64url_decode_latin1(const unsigned char *p, Py_ssize_t n):
    """Decode n one-byte characters (a str of PyUnicode_1BYTE_KIND); ValueError as b64url_decode raises."""
    cdef Py_ssize_t tail = n % 4
    cdef Py_ssize_t i, o = 0, full = n - tail
    cdef int a, b, c, d
    cdef bytes out
    cdef unsigned char *q
    if tail == 1:
        raise ValueError("not unpadded base64url")
    out = PyBytes_FromStringAndSize(NULL, (n // 4) * 3 + (tail - 1 if tail else 0))
    q = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(0, full, 4):
        a, b, c, d = AGENT_B64URL[p[i]], AGENT_B64URL[p[i + 1]], AGENT_B64URL[p[i + 2]], AGENT_B64URL[p[i + 3]]
        if (a | b | c | d) < 0:  # -1 marks a character outside the alphabet
            raise ValueError("not unpadded base64url")
        q[o] = (a << 2) | (b >> 4)
        q[o + 1] = ((b & 0x0F) << 4) | (c >> 2)
        q[o + 2] = ((c & 0x03) << 6) | d
        o += 3
    if tail:
        a, b = AGENT_B64URL[p[full]], AGENT_B64URL[p[full + 1]]
        c = AGENT_B64URL[p[full + 2]] if tail == 3 else 0
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
