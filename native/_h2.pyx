# cython: language_level=3, boundscheck=False, wraparound=False
"""Unary gRPC over HTTP/2 on asyncio/uvloop transports, with HTTP/2 (and HPACK) done by libnghttp2.

One GrpcProtocol per connection: data_received -> nghttp2_session_mem_recv -> callbacks collect each
stream's headers and body -> on END_STREAM the gRPC frame is checked and handed to the Python handler ->
the reply is submitted (headers, one length-prefixed message, grpc-status trailers) -> everything nghttp2
queued goes out in one transport.write. No HTTP/2 or HPACK is written here: nghttp2 brings its defences
(rapid reset, CONTINUATION floods, HPACK bombs, SETTINGS floods).

The handler is called as handler(path: bytes, message: bytes) and returns the reply message (bytes), a
gRPC status code (int) for an error, or an awaitable yielding either, for work that must wait on I/O.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcmp, memcpy

from includes.nghttp2 cimport *

import asyncio
import logging

log = logging.getLogger("agent.native")

# gRPC status codes this layer produces itself.
INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DEADLINE_EXCEEDED = 4

cdef bytes H_STATUS = b":status"
cdef bytes V_200 = b"200"
cdef bytes V_415 = b"415"
cdef bytes H_CT = b"content-type"
cdef bytes V_GRPC = b"application/grpc"
cdef bytes H_GRPC_STATUS = b"grpc-status"
cdef bytes H_GRPC_MESSAGE = b"grpc-message"
cdef bytes V_ZERO = b"0"

cdef nghttp2_session_callbacks *CALLBACKS = NULL


cdef inline void set_nv(nghttp2_nv *nv, bytes name, bytes value):
    nv.name = <uint8_t*>PyBytes_AS_STRING(name)
    nv.namelen = PyBytes_GET_SIZE(name)
    nv.value = <uint8_t*>PyBytes_AS_STRING(value)
    nv.valuelen = PyBytes_GET_SIZE(value)
    # nghttp2 copies unless told not to; every value here outlives the submit call (it is copied into
    # the frame before nghttp2_submit_* returns for headers).
    nv.flags = NGHTTP2_NV_FLAG_NONE


cdef class _Stream:
    cdef int32_t id
    cdef bytes path
    cdef bint post
    cdef bint grpc
    cdef bytearray body
    cdef bint answered
    cdef bint too_big
    cdef double timeout
    cdef bytes out          # the length-prefixed reply message, read by data_read
    cdef Py_ssize_t out_pos
    cdef bytes trailer_status

    def __cinit__(self, int32_t sid):
        self.id = sid
        self.path = b""
        self.body = bytearray()
        self.timeout = 0.0


cdef inline void append(bytearray buf, const char *data, Py_ssize_t n) except *:
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(buf)
    PyByteArray_Resize(buf, old + n)
    memcpy(PyByteArray_AS_STRING(buf) + old, data, n)


cdef double parse_timeout(const uint8_t *v, size_t n):
    # grpc-timeout: up to 8 digits and a unit (H M S m u n)
    cdef double value = 0
    cdef size_t i
    if n < 2 or n > 9:
        return 0.0
    for i in range(n - 1):
        if v[i] < 48 or v[i] > 57:
            return 0.0
        value = value * 10 + (v[i] - 48)
    u = v[n - 1]
    if u == 72: return value * 3600
    if u == 77: return value * 60
    if u == 83: return value
    if u == 109: return value / 1e3
    if u == 117: return value / 1e6
    if u == 110: return value / 1e9
    return 0.0


cdef int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    if frame.hd.type != NGHTTP2_HEADERS or frame.headers.cat != NGHTTP2_HCAT_REQUEST:
        return 0
    try:
        self.streams[frame.hd.stream_id] = _Stream(frame.hd.stream_id)
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                   const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    cdef _Stream st
    try:
        st = self.streams.get(frame.hd.stream_id)
        if st is None:
            return 0
        if namelen == 5 and memcmp(name, b":path", 5) == 0:
            st.path = (<const char*>value)[:valuelen]
        elif namelen == 7 and memcmp(name, b":method", 7) == 0:
            st.post = valuelen == 4 and memcmp(value, b"POST", 4) == 0
        elif namelen == 12 and memcmp(name, b"content-type", 12) == 0:
            st.grpc = valuelen >= 16 and memcmp(value, b"application/grpc", 16) == 0 and (
                valuelen == 16 or value[16] == 43 or value[16] == 59)  # '+proto' or ';...'
        elif namelen == 12 and memcmp(name, b"grpc-timeout", 12) == 0:
            st.timeout = parse_timeout(value, valuelen)
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data, size_t n,
                       void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    cdef _Stream st
    try:
        st = self.streams.get(stream_id)
        if st is None or st.answered:
            return 0
        if <size_t>PyByteArray_GET_SIZE(st.body) + n > <size_t>self.max_message + 5:
            # Answer now and stop reading this stream, rather than buffer an unbounded body.
            st.too_big = True
            st.body = None
            # on_frame_send resets the stream once this answer is out, so the client stops sending.
            self.respond_error(st, RESOURCE_EXHAUSTED, b"message larger than the limit")
            return 0
        append(st.body, <const char*>data, n)
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    cdef _Stream st
    if (frame.hd.type == NGHTTP2_DATA or frame.hd.type == NGHTTP2_HEADERS) and (
            frame.hd.flags & NGHTTP2_FLAG_END_STREAM):
        try:
            st = self.streams.get(frame.hd.stream_id)
            if st is not None and not st.answered:
                self.dispatch(st)
        except BaseException:
            log.exception("native transport: dispatch failed")
            return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    cdef _Stream st
    if frame.hd.type == NGHTTP2_HEADERS and (frame.hd.flags & NGHTTP2_FLAG_END_STREAM):
        st = self.streams.get(frame.hd.stream_id)
        if st is not None and st.too_big:
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id, NGHTTP2_NO_ERROR)
    return 0


cdef int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                         void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    try:
        self.streams.pop(stream_id, None)
        if self.draining and not self.streams:
            self.close_when_flushed = True
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef ssize_t data_read(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                       uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept:
    cdef _Stream st = <_Stream>source.ptr
    cdef Py_ssize_t left = PyBytes_GET_SIZE(st.out) - st.out_pos
    cdef size_t n = <size_t>left if <size_t>left < length else length
    cdef nghttp2_nv nv[1]
    memcpy(buf, PyBytes_AS_STRING(st.out) + st.out_pos, n)
    st.out_pos += n
    if st.out_pos == PyBytes_GET_SIZE(st.out):
        data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
        set_nv(&nv[0], H_GRPC_STATUS, V_ZERO)
        if nghttp2_submit_trailer(session, stream_id, nv, 1) != 0:
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
    return n


cdef void ensure_callbacks():
    global CALLBACKS
    if CALLBACKS != NULL:
        return
    nghttp2_session_callbacks_new(&CALLBACKS)
    nghttp2_session_callbacks_set_on_begin_headers_callback(CALLBACKS, on_begin_headers)
    nghttp2_session_callbacks_set_on_header_callback(CALLBACKS, on_header)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(CALLBACKS, on_data_chunk)
    nghttp2_session_callbacks_set_on_frame_recv_callback(CALLBACKS, on_frame_recv)
    nghttp2_session_callbacks_set_on_frame_send_callback(CALLBACKS, on_frame_send)
    nghttp2_session_callbacks_set_on_stream_close_callback(CALLBACKS, on_stream_close)


cdef class GrpcProtocol:
    """One HTTP/2 connection serving unary gRPC calls; an asyncio.Protocol."""

    cdef nghttp2_session *session
    cdef object transport
    cdef object handler
    cdef dict streams
    cdef readonly int max_message
    cdef int max_streams
    cdef object on_close
    cdef bint draining
    cdef bint close_when_flushed
    cdef bint closed
    cdef bint eof_sent

    def __cinit__(self, handler, int max_message=1 << 20, int max_streams=1024, on_close=None):
        self.handler = handler
        self.streams = {}
        self.max_message = max_message
        self.max_streams = max_streams
        self.on_close = on_close
        ensure_callbacks()
        cdef nghttp2_option *opt
        nghttp2_option_new(&opt)
        nghttp2_option_set_max_settings(opt, 32)
        rc = nghttp2_session_server_new2(&self.session, CALLBACKS, <void*>self, opt)
        nghttp2_option_del(opt)
        if rc != 0:
            raise MemoryError("nghttp2_session_server_new2 failed")

    def __dealloc__(self):
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        cdef nghttp2_settings_entry iv[3]
        iv[0].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        iv[0].value = self.max_streams
        iv[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        iv[1].value = self.max_message + 64
        iv[2].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        iv[2].value = 65536
        nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, iv, 3)
        self.flush()

    def data_received(self, bytes data):
        if self.closed or self.eof_sent:
            return  # after our GOAWAY and FIN: read and dropped, so closing never resets the connection
        cdef ssize_t rv = nghttp2_session_mem_recv(
            self.session, <const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if rv < 0:
            # A protocol violation: nghttp2 has queued a GOAWAY; send it and close.
            self.flush()
            self.close()
            return
        self.flush()

    def eof_received(self):
        return False

    def pause_writing(self):
        # The peer is not reading our answers: stop reading its requests until it does, so a client that
        # only writes cannot make us buffer answers without bound.
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self):
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def connection_lost(self, exc):
        self.closed = True
        self.streams.clear()
        if self.on_close is not None:
            self.on_close(self)

    # -- serving ---------------------------------------------------------------------------------

    cdef void flush(self) except *:
        cdef const uint8_t *data
        cdef ssize_t n
        cdef bytearray out = None
        if self.closed or self.transport is None:
            return
        while True:
            n = nghttp2_session_mem_send(self.session, &data)
            if n < 0:
                self.close()
                return
            if n == 0:
                break
            if out is None:
                out = bytearray()
            append(out, <const char*>data, n)
        if out is not None:
            # A new buffer per flush: the transport may keep a reference until it is written.
            self.transport.write(out)
        if self.close_when_flushed or (
                nghttp2_session_want_read(self.session) == 0 and nghttp2_session_want_write(self.session) == 0):
            self.close()

    cdef void close(self):
        if not self.closed and self.transport is not None:
            if self.draining and not self.eof_sent and self.transport.can_write_eof():
                # A lingering close: send FIN and let the peer close. Closing at once while the peer still
                # sends (a WINDOW_UPDATE, a late frame) makes the kernel reset the connection, and a reset
                # can discard our GOAWAY before the peer reads it.
                self.eof_sent = True
                try:
                    self.transport.write_eof()
                    return
                except OSError:  # the peer is already gone: nothing to linger for
                    pass
            self.closed = True
            self.transport.close()

    cdef void dispatch(self, _Stream st) except *:
        cdef Py_ssize_t n = PyByteArray_GET_SIZE(st.body)
        cdef const unsigned char *b
        if not st.post or not st.grpc:
            self.respond_http(st, V_415)
            return
        if n < 5:
            self.respond_error(st, INTERNAL, b"no request message")
            return
        b = <const unsigned char*>PyByteArray_AS_STRING(st.body)
        if b[0] != 0:
            self.respond_error(st, UNIMPLEMENTED, b"compressed messages are not supported")
            return
        cdef Py_ssize_t length = (<Py_ssize_t>b[1] << 24) | (b[2] << 16) | (b[3] << 8) | b[4]
        if length != n - 5:
            self.respond_error(st, INTERNAL, b"malformed gRPC frame (one unary message expected)")
            return
        message = PyBytes_FromStringAndSize(<const char*>b + 5, n - 5)
        st.body = None
        try:
            result = self.handler(st.path, message)
        except Exception:
            log.exception("native transport: handler failed")
            self.respond_error(st, INTERNAL, b"internal error")
            return
        self.complete(st, result)

    cdef void complete(self, _Stream st, object result) except *:
        if isinstance(result, bytes):
            self.respond_ok(st, <bytes>result)
        elif isinstance(result, int):
            self.respond_error(st, <int>result, b"")
        else:
            task = asyncio.ensure_future(result)
            if st.timeout > 0:
                task = asyncio.ensure_future(asyncio.wait_for(task, st.timeout))
            task.add_done_callback(lambda t, s=st: self._finish_later(s, t))

    def _finish_later(self, _Stream st, task):
        if self.closed or st.answered or self.streams.get(st.id) is not st:
            return  # the client went away or reset the stream meanwhile
        if task.cancelled():
            self.respond_error(st, UNAVAILABLE, b"cancelled")
        elif task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, TimeoutError):
                self.respond_error(st, DEADLINE_EXCEEDED, b"")
            else:
                log.error("native transport: handler failed: %s", type(exc).__name__)
                self.respond_error(st, INTERNAL, b"internal error")
        else:
            self.complete(st, task.result())
        self.flush()

    cdef void respond_ok(self, _Stream st, bytes message) except *:
        cdef nghttp2_nv nv[2]
        cdef nghttp2_data_provider prd
        cdef Py_ssize_t n = PyBytes_GET_SIZE(message)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n + 5)
        cdef unsigned char *o = <unsigned char*>PyBytes_AS_STRING(out)
        st.answered = True
        o[0] = 0
        o[1] = (n >> 24) & 0xFF
        o[2] = (n >> 16) & 0xFF
        o[3] = (n >> 8) & 0xFF
        o[4] = n & 0xFF
        memcpy(o + 5, PyBytes_AS_STRING(message), n)
        st.out = out
        st.out_pos = 0
        set_nv(&nv[0], H_STATUS, V_200)
        set_nv(&nv[1], H_CT, V_GRPC)
        prd.source.ptr = <void*>st
        prd.read_callback = data_read
        if nghttp2_submit_response(self.session, st.id, nv, 2, &prd) != 0:
            nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, st.id, NGHTTP2_INTERNAL_ERROR)

    cdef void respond_error(self, _Stream st, int code, bytes message) except *:
        # A trailers-only response: one HEADERS frame with END_STREAM.
        cdef nghttp2_nv nv[4]
        cdef size_t count = 3
        cdef bytes code_b = str(code).encode()
        st.answered = True
        set_nv(&nv[0], H_STATUS, V_200)
        set_nv(&nv[1], H_CT, V_GRPC)
        set_nv(&nv[2], H_GRPC_STATUS, code_b)
        if message:
            set_nv(&nv[3], H_GRPC_MESSAGE, message)
            count = 4
        nghttp2_submit_response(self.session, st.id, nv, count, NULL)

    cdef void respond_http(self, _Stream st, bytes status) except *:
        cdef nghttp2_nv nv[1]
        st.answered = True
        set_nv(&nv[0], H_STATUS, status)
        nghttp2_submit_response(self.session, st.id, nv, 1, NULL)

    def drain(self):
        """Graceful shutdown: GOAWAY with the last stream accepted; close once in-flight streams finish."""
        if self.closed or self.draining:
            return
        self.draining = True
        nghttp2_submit_goaway(self.session, NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(self.session), NGHTTP2_NO_ERROR, NULL, 0)
        if not self.streams:
            self.close_when_flushed = True
        self.flush()

    def abort(self):
        """Close now (the drain's grace is over)."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    @property
    def active_streams(self):
        return len(self.streams)
