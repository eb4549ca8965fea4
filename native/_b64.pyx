# cython: language_level=3, boundscheck=False, wraparound=False
"""Strict unpadded base64url decoding in C: the same contract as agent/authn/_b64_py.py, its pure twin.

The decoder itself is native/b64url.pxd, shared with native/_claims.pyx.
"""

from cpython.unicode cimport PyUnicode_1BYTE_DATA, PyUnicode_GET_LENGTH, PyUnicode_KIND, PyUnicode_1BYTE_KIND

from b64url cimport b64url_decode_latin1


cpdef bytes b64url_decode(str s):
    if PyUnicode_KIND(s) != PyUnicode_1BYTE_KIND:
        raise ValueError("not unpadded base64url")
    return b64url_decode_latin1(PyUnicode_1BYTE_DATA(s), PyUnicode_GET_LENGTH(s))
