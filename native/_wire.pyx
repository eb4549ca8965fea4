# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""CheckRequest wire bytes -> RequestView and Decision -> CheckResponse bytes, without protobuf objects.

Reads only the fields the engine reads. Contract (checked against xds-protos by tests/unit/test_wire.py):
for every input xds-protos parses, the view equals the reference codec's; anything else raises
WireError, never crashes. Oneofs and repeated embedded messages merge the way protobuf merges them.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t

from agent.decision import RequestView
from agent.errors import WireError
from agent.response import RPC_CODE, RPC_PERMISSION_DENIED


cdef struct Cursor:
    const unsigned char* p
    const unsigned char* end


cdef inline uint64_t read_varint(Cursor* c) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef unsigned char b
    while True:
        if c.p >= c.end or shift >= 70:
            raise WireError("truncated or overlong varint")
        b = c.p[0]
        c.p += 1
        if shift == 63 and b > 1:
            raise WireError("varint overflows 64 bits")
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            return result
        shift += 7


cdef inline Cursor read_len(Cursor* c) except *:
    cdef uint64_t n = read_varint(c)
    cdef Cursor sub
    if n > <uint64_t>(c.end - c.p):
        raise WireError("length beyond the message")
    sub.p = c.p
    sub.end = c.p + n
    c.p += n
    return sub


cdef void skip_field(Cursor* c, uint64_t key, int depth) except *:
    cdef int wt = key & 7
    cdef uint64_t inner
    if wt == 0:
        read_varint(c)
    elif wt == 1:
        if c.end - c.p < 8:
            raise WireError("truncated fixed64")
        c.p += 8
    elif wt == 2:
        read_len(c)
    elif wt == 5:
        if c.end - c.p < 4:
            raise WireError("truncated fixed32")
        c.p += 4
    elif wt == 3:
        if depth > 64:
            raise WireError("groups nested too deep")
        while True:
            inner = read_varint(c)
            if (inner & 7) == 4:
                if (inner >> 3) != (key >> 3):
                    raise WireError("mismatched end group")
                return
            if (inner >> 3) == 0:
                raise WireError("field number 0")
            skip_field(c, inner, depth + 1)
    else:
        raise WireError("invalid wire type")


cdef inline uint64_t next_key(Cursor* c) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t key = read_varint(c)
    if (key >> 3) == 0 or (key >> 3) > 536870911:
        raise WireError("invalid field number")
    if (key & 7) == 4:
        raise WireError("unexpected end group")
    return key


cdef inline str utf8(Cursor s):
    try:
        return (<const char*>s.p)[:s.end - s.p].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("string field is not UTF-8") from None


cdef class _State:
    cdef public str method, path, host, source, scheme, body, certificate
    cdef public bytes raw_body
    cdef public dict headers
    cdef public list header_map


cdef void parse_map_entry(Cursor c, dict into) except *:
    cdef uint64_t key
    cdef str k = ""
    cdef str v = ""
    cdef bint unknown = False
    while c.p < c.end:
        key = next_key(&c)
        if key == (1 << 3 | 2):
            k = utf8(read_len(&c))
        elif key == (2 << 3 | 2):
            v = utf8(read_len(&c))
        else:
            skip_field(&c, key, 0)
            unknown = True
    # upb keeps an entry with unknown fields as an unknown field of the map's message, not in the map:
    # the engine must see the same headers as every protobuf reader (found by tests/fuzz/fuzz_wire.py).
    if not unknown:
        into[k] = v


cdef void parse_header_value(Cursor c, list into) except *:
    cdef uint64_t key
    cdef str k = ""
    cdef str v = ""
    cdef bytes raw = b""
    cdef Cursor s
    while c.p < c.end:
        key = next_key(&c)
        if key == (1 << 3 | 2):
            k = utf8(read_len(&c))
        elif key == (2 << 3 | 2):
            v = utf8(read_len(&c))
        elif key == (3 << 3 | 2):
            s = read_len(&c)
            raw = PyBytes_FromStringAndSize(<const char*>s.p, s.end - s.p)
        else:
            skip_field(&c, key, 0)
    into.append((k, v, raw))


cdef void parse_http(Cursor c, _State st) except *:
    cdef uint64_t key
    cdef Cursor s
    while c.p < c.end:
        key = next_key(&c)
        if key == (2 << 3 | 2):
            st.method = utf8(read_len(&c))
        elif key == (3 << 3 | 2):
            parse_map_entry(read_len(&c), st.headers)
        elif key == (4 << 3 | 2):
            st.path = utf8(read_len(&c))
        elif key == (5 << 3 | 2):
            st.host = utf8(read_len(&c))
        elif key == (6 << 3 | 2):
            st.scheme = utf8(read_len(&c))
        elif key == (11 << 3 | 2):
            st.body = utf8(read_len(&c))
        elif key == (12 << 3 | 2):
            s = read_len(&c)
            st.raw_body = PyBytes_FromStringAndSize(<const char*>s.p, s.end - s.p)
        elif key == (13 << 3 | 2):
            s = read_len(&c)
            while s.p < s.end:
                key = next_key(&s)
                if key == (1 << 3 | 2):
                    parse_header_value(read_len(&s), st.header_map)
                else:
                    skip_field(&s, key, 0)
        else:
            skip_field(&c, key, 0)


cdef void parse_source(Cursor c, _State st) except *:
    cdef uint64_t key
    cdef Cursor a
    while c.p < c.end:
        key = next_key(&c)
        if key == (1 << 3 | 2):  # Peer.address: Address
            a = read_len(&c)
            while a.p < a.end:
                key = next_key(&a)
                if key == (1 << 3 | 2):  # socket_address (merges with an earlier one)
                    parse_socket_address(read_len(&a), st)
                elif key == (2 << 3 | 2) or key == (3 << 3 | 2):  # pipe / internal: the oneof clears it
                    read_len(&a)
                    st.source = ""
                else:
                    skip_field(&a, key, 0)
        elif key == (5 << 3 | 2):  # Peer.certificate: the URL-encoded PEM Envoy sends with include_peer_certificate
            st.certificate = utf8(read_len(&c))
        else:
            skip_field(&c, key, 0)


cdef void parse_socket_address(Cursor c, _State st) except *:
    cdef uint64_t key
    while c.p < c.end:
        key = next_key(&c)
        if key == (2 << 3 | 2):
            st.source = utf8(read_len(&c))
        else:
            skip_field(&c, key, 0)


cpdef object decode_check_request(bytes data):
    """The RequestView of a serialized envoy.service.auth.v3.CheckRequest."""
    cdef Cursor c, attrs, req
    cdef uint64_t key
    cdef _State st = _State()
    st.method = st.path = st.host = st.source = st.scheme = st.body = st.certificate = ""
    st.raw_body = b""
    st.headers = {}
    st.header_map = []
    c.p = <const unsigned char*>PyBytes_AS_STRING(data)
    c.end = c.p + PyBytes_GET_SIZE(data)
    while c.p < c.end:
        key = next_key(&c)
        if key != (1 << 3 | 2):
            skip_field(&c, key, 0)
            continue
        attrs = read_len(&c)
        while attrs.p < attrs.end:
            key = next_key(&attrs)
            if key == (1 << 3 | 2):
                parse_source(read_len(&attrs), st)
            elif key == (4 << 3 | 2):
                req = read_len(&attrs)
                while req.p < req.end:
                    key = next_key(&req)
                    if key == (2 << 3 | 2):
                        parse_http(read_len(&req), st)
                    else:
                        skip_field(&req, key, 0)
            else:
                skip_field(&attrs, key, 0)
    headers = st.headers
    if not headers and st.header_map:
        # Envoy with encode_raw_headers: repeated names joined with ',' as Envoy joins them.
        for k, v, raw in st.header_map:
            value = raw.decode("utf-8", "replace") if raw else v
            k = k.lower()
            headers[k] = headers[k] + "," + value if k in headers else value
    # with_request_body sends `raw_body` when pack_as_bytes is set, `body` (UTF-8 text) otherwise.
    body = st.raw_body if st.raw_body else st.body.encode("utf-8")
    return RequestView(st.method, st.path, st.host, headers, st.source, st.scheme, body, st.certificate)


# ---- encoding -----------------------------------------------------------------------------------
# Messages are written into C buffers; a nested message is written into its own buffer first, then
# copied behind its tag and length.

from libc.stdlib cimport free, realloc
from libc.string cimport memcpy


cdef class Buf:
    cdef char *data
    cdef Py_ssize_t n, cap

    def __cinit__(self):
        self.cap = 256
        self.data = <char*>realloc(NULL, self.cap)
        if self.data == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.data)

    cdef inline int reserve(self, Py_ssize_t extra) except -1:
        cdef char *grown
        if self.n + extra <= self.cap:
            return 0
        while self.cap < self.n + extra:
            self.cap *= 2
        grown = <char*>realloc(self.data, self.cap)
        if grown == NULL:
            raise MemoryError()
        self.data = grown
        return 0

    cdef inline int varint(self, uint64_t v) except -1:
        self.reserve(10)
        while v >= 0x80:
            self.data[self.n] = <char>((v & 0x7F) | 0x80)
            self.n += 1
            v >>= 7
        self.data[self.n] = <char>v
        self.n += 1
        return 0

    cdef inline int raw(self, const char *p, Py_ssize_t k) except -1:
        self.reserve(k)
        memcpy(self.data + self.n, p, k)
        self.n += k
        return 0

    cdef inline int field_bytes(self, int field, const char *p, Py_ssize_t k) except -1:
        self.varint((field << 3) | 2)
        self.varint(k)
        self.raw(p, k)
        return 0

    cdef inline int field_str(self, int field, str s) except -1:
        cdef bytes b = s.encode("utf-8")
        self.field_bytes(field, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
        return 0

    cdef inline int field_buf(self, int field, Buf inner) except -1:
        self.field_bytes(field, inner.data, inner.n)
        return 0

    cdef inline int field_varint(self, int field, uint64_t v) except -1:
        self.varint(field << 3)
        self.varint(v)
        return 0


cdef int header_option(Buf out, int field, str key, str value) except -1:
    cdef Buf hv = Buf()
    cdef Buf opt = Buf()
    if key:
        hv.field_str(1, key)
    if value:
        hv.field_str(2, value)
    opt.field_buf(1, hv)
    opt.field_varint(3, 2)  # append_action: OVERWRITE_IF_EXISTS_OR_ADD
    out.field_buf(field, opt)
    return 0


cdef int struct_field(Buf meta, str key, str value) except -1:
    # google.protobuf.Struct.fields map entry {key = 1, value = 2 (Value.string_value = 3)}
    cdef Buf val = Buf()
    cdef Buf entry = Buf()
    val.field_str(3, value)
    entry.field_str(1, key)
    entry.field_buf(2, val)
    meta.field_buf(1, entry)
    return 0


cdef dict _RPC_CODE = RPC_CODE


cpdef bytes encode_check_response(object d):
    """The serialized CheckResponse for a Decision (same message as agent.server.envoy_wire.encode)."""
    cdef Buf out = Buf()
    cdef Buf part = Buf()
    cdef Buf st = Buf()
    cdef Buf meta = Buf()
    cdef bint allowed = d.allowed
    cdef int status = d.status
    cdef int code = 0 if allowed else _RPC_CODE.get(status, RPC_PERMISSION_DENIED)
    cdef bytes body
    if code:
        st.field_varint(1, code)
    out.field_buf(1, st)
    if allowed:
        for k, v in d.upstream_headers:
            header_option(part, 2, k, v)
        for k in d.remove_headers:
            part.field_str(5, k)
        for k, v in d.response_headers:
            header_option(part, 6, k, v)  # response_headers_to_add: to the client (e.g. RateLimit)
        out.field_buf(3, part)
    else:
        st = Buf()
        if status:
            st.field_varint(1, status)
        part.field_buf(1, st)
        for k, v in d.response_headers:
            header_option(part, 2, k, v)
        body = d.body
        if body:
            part.field_bytes(3, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
        out.field_buf(2, part)
    struct_field(meta, "decision_id", d.decision_id)
    struct_field(meta, "decision", d.outcome)
    struct_field(meta, "reason", d.reason)
    route = d.route
    if route is not None:
        struct_field(meta, "route", route)
    out.field_buf(4, meta)
    return PyBytes_FromStringAndSize(out.data, out.n)
