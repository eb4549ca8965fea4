# cython: language_level=3, boundscheck=False, wraparound=False
"""Strict JSON objects for JOSE: orjson parses, a C scan finds duplicate members. Contract: agent/authn/_jsonobj_py.py.

orjson (RFC 8259) refuses NaN/Infinity, overflowing numbers, invalid UTF-8 and lone surrogates itself, but
keeps the last of duplicate members. In valid JSON every ':' outside a string separates exactly one
member, so if the text has more of them than the parsed objects have keys, members collapsed: refuse
(this also catches "a" and "\\u0061"). Integers beyond 64 bits, which orjson would turn into floats, go to
the pure twin so both twins return the same values.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import orjson

from agent.authn._jsonobj_py import MAX_DEPTH
from agent.authn._jsonobj_py import strict_json_object as _pure


cdef Py_ssize_t count_keys(object value, int depth) except -1:
    cdef Py_ssize_t n = 0
    if depth > MAX_DEPTH:
        raise ValueError("nested too deep")
    if type(value) is dict:
        n = len(<dict>value)
        for v in (<dict>value).values():
            if type(v) is dict or type(v) is list:
                n += count_keys(v, depth + 1)
    elif type(value) is list:
        for v in <list>value:
            if type(v) is dict or type(v) is list:
                n += count_keys(v, depth + 1)
    return n


cpdef dict strict_json_object(bytes raw):
    cdef const unsigned char *p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), i = 0, colons = 0, digits = 0
    cdef bint in_string = False
    cdef unsigned char c
    if n >= 3 and p[0] == 0xEF and p[1] == 0xBB and p[2] == 0xBF:
        raise ValueError("byte order mark")
    while i < n:
        c = p[i]
        if in_string:
            if c == 92:  # backslash: the next character is escaped
                i += 1
            elif c == 34:
                in_string = False
        elif c == 34:
            in_string = True
            digits = 0
        elif c == 58:
            colons += 1
        elif 48 <= c <= 57:
            digits += 1
            if digits >= 19:
                return _pure(raw)  # beyond 64 bits: orjson would give a float, the twin an int
        else:
            digits = 0
        i += 1
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("not strict JSON") from None
    if type(value) is not dict:
        raise ValueError("not a JSON object")
    if count_keys(value, 1) != colons:
        raise ValueError("duplicate member")
    return value
