# cython: language_level=3, boundscheck=False, wraparound=False
"""Unary gRPC over HTTP/2 on asyncio/uvloop transports, with HTTP/2 (and HPACK) done by libnghttp2.

One GrpcProtocol per connection: data_received -> nghttp2_session_mem_recv -> callbacks collect each
stream's headers and its one message (kept as its DATA arrives; one allocation when it comes in one frame)
-> on END_STREAM the message is handed to the Python handler ->
the reply is submitted (headers, one length-prefixed message, grpc-status trailers) -> everything nghttp2
queued goes out in one transport.write. No HTTP/2 or HPACK is written here: nghttp2 brings its defences
(rapid reset, CONTINUATION floods, HPACK bombs, SETTINGS floods).

The handler is called as handler(path: bytes, message: bytes) and returns the reply message (bytes), a
gRPC status code (int) for an error, or an awaitable yielding either, for work that must wait on I/O.

What a peer can make us hold is bounded (Limits, shared by the connections of one listener). The bytes of
unfinished messages actually received count against a budget per connection (the message whose bytes go
over it is refused) and one in total (over it, the connection holding the most gives up its largest
messages: what a peer merely announces in a gRPC prefix costs nothing, and one peer's bytes never push out
another's smaller ones); a message announced over the per-message maximum is refused at once. A request
must arrive whole in time, a connection without streams is closed after a while, and a new one must send
the HTTP/2 preface and SETTINGS promptly. Flow control backs the budget: a DATA byte is acknowledged
(WINDOW_UPDATE) only once its message is finished or refused, and the connection window is twice the
budget, so a peer never has more than that in flight unacknowledged and is never left without window.
Refusals are RST_STREAM(REFUSED_STREAM): "not processed", to a gRPC client.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from includes.nghttp2 cimport *

cdef extern from *:
    """
    #ifdef __GLIBC__
    #include <malloc.h>
    static int agent_malloc_trim(void) { return malloc_trim(0); }
    #else
    static int agent_malloc_trim(void) { return 0; }
    #endif
    """
    int agent_malloc_trim() nogil

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
cdef bytes V_405 = b"405"
cdef bytes H_CT = b"content-type"
cdef bytes V_GRPC = b"application/grpc"
cdef bytes H_GRPC_STATUS = b"grpc-status"
cdef bytes H_GRPC_MESSAGE = b"grpc-message"
cdef bytes V_ZERO = b"0"

cdef nghttp2_session_callbacks *CALLBACKS = NULL

# One default-size HTTP/2 frame.
cdef Py_ssize_t FRAME = 16384
# The HTTP/2 header list we accept (RFC 9113 6.5.2 size: name + value + 32 per field); advertised in SETTINGS.
cdef Py_ssize_t MAX_HEADER_LIST = 65536
# A :path longer than this is no method we serve; it is not kept.
cdef size_t MAX_PATH = 256
# After our GOAWAY and FIN, how long the peer has to close before we do.
cdef double LINGER_S = 5.0
# The largest connection budget: its window, twice it, must be an HTTP/2 window (RFC 9113 6.9.1: <= 2^31-1).
MAX_CONNECTION_BUFFER = 0x3FFFFFFF


def libnghttp2_version() -> str:
    """The libnghttp2 this module runs with (the loaded one, which may be a wheel's bundled copy): `run` logs it."""
    return nghttp2_version(0).version_str.decode("ascii")


cdef inline double monotonic() noexcept:
    # CLOCK_MONOTONIC, as time.monotonic().
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Limits:
    """What the connections of one listener share: buffer budgets, timeouts, and counts of what they refused."""

    cdef readonly Py_ssize_t connection_buffer  # bytes of unfinished messages per connection (window: twice)
    cdef readonly Py_ssize_t total_buffer       # ... across all connections
    cdef readonly double stream_timeout         # a request must arrive whole within this of its HEADERS
    cdef readonly double idle_timeout           # a connection without streams this long is closed
    cdef readonly double handshake_timeout      # preface and SETTINGS must arrive within this of connecting
    cdef readonly Py_ssize_t buffered           # bytes of unfinished messages received, all connections
    cdef readonly Py_ssize_t high_water         # the most `buffered` has been since the last trim()
    cdef readonly Py_ssize_t calls              # calls received whole so far: the clock of GrpcProtocol.last_call
    cdef readonly Py_ssize_t refused_over_budget
    cdef readonly Py_ssize_t timed_out_streams
    cdef readonly Py_ssize_t closed_idle
    cdef readonly Py_ssize_t closed_handshake
    cdef set connections                        # open GrpcProtocols: where to look for the one holding most
    # A first answerer for one method, tried before the handler: fast(message) -> reply bytes, or None to let the
    # handler answer (the transport's remembered-allow table, agent._recall; no Python frame on its hits).
    cdef public object fast
    cdef public bytes fast_path

    def __cinit__(self, Py_ssize_t connection_buffer=16 << 20, Py_ssize_t total_buffer=64 << 20,
                  double stream_timeout=10.0, double idle_timeout=300.0, double handshake_timeout=5.0):
        if not 0 < connection_buffer <= MAX_CONNECTION_BUFFER:
            raise ValueError(f"connection_buffer must be between 1 and {MAX_CONNECTION_BUFFER} bytes "
                             "(its HTTP/2 window, twice it, must be at most 2^31-1)")
        if total_buffer < connection_buffer:
            raise ValueError("total_buffer must be at least connection_buffer")
        if stream_timeout <= 0 or idle_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.connection_buffer = connection_buffer
        self.total_buffer = total_buffer
        self.stream_timeout = stream_timeout
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.connections = set()
        self.fast_path = b""

    def trim(self):
        """Once the buffers have drained after holding a lot (an attack, a burst of large checks), give the
        memory they freed back to the system: messages are kept in DATA-frame-sized chunks, and the C
        allocator keeps freed chunks for reuse otherwise. The transport calls this with its sweep; True if
        it trimmed."""
        if self.high_water < 4 << 20 or self.buffered * 4 > self.high_water:
            return False
        self.high_water = self.buffered
        agent_malloc_trim()
        return True


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
    cdef unsigned char head[5]  # the gRPC prefix: compressed flag, big-endian length
    cdef int head_len
    cdef bytes message      # the message when it came in one DATA chunk (the common case)
    cdef list parts         # else its chunks as they came, joined at dispatch: held bytes are received bytes
    cdef Py_ssize_t length  # the announced length
    cdef Py_ssize_t pos     # bytes of the message received
    cdef Py_ssize_t received  # DATA bytes received and not yet acknowledged: counted against the budgets
    cdef bint answered
    cdef bint refused       # answered before the request ended: reset once the answer is out
    cdef bint ended         # END_STREAM received
    cdef Py_ssize_t header_bytes
    cdef double started
    cdef double timeout
    cdef bytes out          # the length-prefixed reply message, read by data_read
    cdef Py_ssize_t out_pos
    cdef bytes trailer_status

    def __cinit__(self, int32_t sid):
        self.id = sid
        self.path = b""
        self.timeout = 0.0
        self.started = monotonic()


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
        self.idle_since = 0.0
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                   const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    cdef _Stream st
    try:
        st = self.streams.get(frame.hd.stream_id)
        if st is None or st.answered:
            return 0
        st.header_bytes += <Py_ssize_t>(namelen + valuelen + 32)
        if st.header_bytes > MAX_HEADER_LIST:
            return 0  # refused once the header block ends (on_frame_recv); nothing more is kept
        if namelen == 5 and memcmp(name, b":path", 5) == 0:
            st.path = (<const char*>value)[:valuelen] if valuelen <= MAX_PATH else b""
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
    cdef Limits limits = self.limits
    cdef _Stream st
    cdef size_t take
    try:
        st = self.streams.get(stream_id)
        if st is None or st.answered:
            nghttp2_session_consume_connection(session, n)  # not kept: acknowledged at once
            return 0
        st.received += n
        self.buffered += n
        limits.buffered += n
        if limits.buffered > limits.high_water:
            limits.high_water = limits.buffered
        if self.buffered > limits.connection_buffer:
            # This connection's unfinished messages would exceed its budget: this one is not taken.
            limits.refused_over_budget += 1
            self.refuse(st, NGHTTP2_REFUSED_STREAM)
            return 0
        if limits.buffered > limits.total_buffer and not self.make_room(st):
            return 0
        if st.head_len < 5:
            take = min(<size_t>(5 - st.head_len), n)
            memcpy(st.head + st.head_len, data, take)
            st.head_len += <int>take
            data += take
            n -= take
            if st.head_len == 5 and not self.admit(st):
                return 0
        if n:
            if <size_t>(st.length - st.pos) < n:
                # More than the one message a unary call carries: answered now, not buffered.
                self.refuse_early(st, INTERNAL, b"malformed gRPC frame (one unary message expected)")
                return 0
            if st.pos == 0 and <size_t>st.length == n:
                st.message = PyBytes_FromStringAndSize(<const char*>data, n)  # whole in one chunk
            else:
                if st.parts is None:
                    st.parts = []
                st.parts.append(PyBytes_FromStringAndSize(<const char*>data, n))
            st.pos += n
    except BaseException:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    cdef _Stream st
    if frame.hd.type == NGHTTP2_SETTINGS:
        if not (frame.hd.flags & NGHTTP2_FLAG_ACK):
            self.got_settings = True
        return 0
    if frame.hd.type != NGHTTP2_DATA and frame.hd.type != NGHTTP2_HEADERS:
        return 0
    try:
        st = self.streams.get(frame.hd.stream_id)
        if st is None:
            return 0
        if frame.hd.type == NGHTTP2_HEADERS and frame.headers.cat == NGHTTP2_HCAT_REQUEST and not st.answered:
            self.check_headers(st)  # the whole header block is in: refuse what is not a gRPC call at once
        if frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
            st.ended = True
            if not st.answered:
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
        if st is not None and st.refused and not st.ended:
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id, NGHTTP2_NO_ERROR)
    return 0


cdef int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                         void *user_data) noexcept:
    cdef GrpcProtocol self = <GrpcProtocol>user_data
    cdef _Stream st
    try:
        st = self.streams.pop(stream_id, None)
        if st is not None:
            self.release(st)
        if not self.streams:
            self.idle_since = monotonic()
            if self.draining:
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
    cdef readonly Limits limits
    cdef readonly Py_ssize_t buffered  # bytes of unfinished messages received on this connection
    cdef readonly Py_ssize_t last_call  # Limits.calls when a call last arrived whole here; 0: never
    cdef bint draining
    cdef bint close_when_flushed
    cdef bint closed
    cdef bint eof_sent
    cdef bint got_settings
    cdef bint notice_sent
    cdef readonly double connected_at
    cdef double idle_since  # 0 while streams are open
    cdef double paused_at   # 0 unless the peer stopped reading our answers
    cdef double eof_at

    def __cinit__(self, handler, int max_message=1 << 20, int max_streams=1024, on_close=None,
                  Limits limits=None):
        self.handler = handler
        self.streams = {}
        self.max_message = max_message
        self.max_streams = max_streams
        self.on_close = on_close
        self.limits = limits if limits is not None else Limits()
        if self.limits.connection_buffer < max_message + 5 + FRAME:
            raise ValueError("connection_buffer must hold one message of max_message bytes and a frame")
        ensure_callbacks()
        cdef nghttp2_option *opt
        nghttp2_option_new(&opt)
        nghttp2_option_set_max_settings(opt, 32)
        # WINDOW_UPDATE only for bytes we no longer hold (see release), never on receipt.
        nghttp2_option_set_no_auto_window_update(opt, 1)
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
        self.connected_at = self.idle_since = monotonic()
        self.limits.connections.add(self)
        cdef nghttp2_settings_entry iv[3]
        cdef int rc
        iv[0].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        iv[0].value = self.max_streams
        # A stream's window holds one message, never acknowledged: a unary call carries no more.
        iv[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        iv[1].value = self.max_message + 64
        iv[2].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        iv[2].value = MAX_HEADER_LIST
        rc = nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, iv, 3)
        if rc == 0:
            # The connection's window (RFC 9113 6.9.2: from 65535 up by WINDOW_UPDATE) is twice its buffer
            # budget: nghttp2 acknowledges released bytes once half the window is released, so with at most
            # the budget held (the rest is refused) the peer is never left without window, and never has
            # more than this in flight unacknowledged. (Limits keeps it within an HTTP/2 window.)
            rc = nghttp2_session_set_local_window_size(self.session, NGHTTP2_FLAG_NONE, 0,
                                                       <int32_t>(2 * self.limits.connection_buffer))
        if rc != 0:
            # Not served with windows other than these: closed, and said (the cause is ours, not the peer's).
            log.error("native transport: setting up a connection failed: %s", nghttp2_strerror(rc).decode())
            self.abort()
            return
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
            self.paused_at = monotonic()
            self.transport.pause_reading()

    def resume_writing(self):
        self.paused_at = 0.0
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def connection_lost(self, exc):
        self.closed = True
        for st in self.streams.values():
            self.forget(<_Stream>st)
        self.streams.clear()
        self.limits.connections.discard(self)
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
                self.eof_at = monotonic()
                try:
                    self.transport.write_eof()
                    return
                except OSError:  # the peer is already gone: nothing to linger for
                    pass
            self.closed = True
            self.transport.close()

    cdef void forget(self, _Stream st) except *:
        """Stop counting what `st` holds (its message is dropped; nothing is acknowledged)."""
        if st.received:
            self.buffered -= st.received
            self.limits.buffered -= st.received
            st.received = 0
        st.message = None
        st.parts = None

    cdef void release(self, _Stream st) except *:
        """`st`'s bytes are no longer held: acknowledge them, so the peer may send as much again."""
        cdef Py_ssize_t n = st.received
        self.forget(st)
        if n and not self.closed:
            nghttp2_session_consume_connection(self.session, <size_t>n)

    cdef void refuse(self, _Stream st, uint32_t code) except *:
        """Reset a stream whose request is unfinished; REFUSED_STREAM tells the client nothing was processed."""
        self.release(st)
        st.answered = True
        nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, st.id, code)

    cdef void refuse_early(self, _Stream st, int code, bytes message) except *:
        """Answer a gRPC error before the request ended; on_frame_send then resets the stream."""
        self.release(st)
        st.refused = True
        self.respond_error(st, code, message)

    cdef bint admit(self, _Stream st) except -1:
        """The prefix is in: take the message's announced length, or refuse what no length makes right."""
        cdef Py_ssize_t length = ((<Py_ssize_t>st.head[1] << 24) | (<Py_ssize_t>st.head[2] << 16)
                                  | (<Py_ssize_t>st.head[3] << 8) | st.head[4])
        if st.head[0] != 0:
            self.refuse_early(st, UNIMPLEMENTED, b"compressed messages are not supported")
            return False
        if length > self.max_message:
            self.refuse_early(st, RESOURCE_EXHAUSTED, b"message larger than the limit")
            return False
        st.length = length
        return True

    cdef bint make_room(self, _Stream st) except -1:
        """Over the total budget: the connection holding the most gives up its largest unfinished message,
        and so on until the total fits. Age never decides (Envoy's checks in transit are as unfinished as
        anything a peer holds on purpose), nor a length a prefix merely announces. False if `st` went."""
        cdef Limits limits = self.limits
        cdef GrpcProtocol hog, c
        cdef _Stream victim, s
        cdef bint kept = True
        while limits.buffered > limits.total_buffer:
            hog = None
            for c in limits.connections:
                if hog is None or c.buffered > hog.buffered:
                    hog = c
            victim = None
            if hog is not None:
                for s in hog.streams.values():
                    if s.received and (victim is None or s.received > victim.received):
                        victim = s
            if victim is None:
                break  # nothing counted is held by an open connection: cannot be, but never loop
            limits.refused_over_budget += 1
            hog.refuse(victim, NGHTTP2_REFUSED_STREAM)
            if victim is st:
                kept = False
            if hog is not self:
                hog.flush()  # inside this connection's callbacks only its own session may not send
        return kept

    cdef void check_headers(self, _Stream st) except *:
        if st.header_bytes > MAX_HEADER_LIST:
            st.refused = True
            self.respond_error(st, RESOURCE_EXHAUSTED, b"header list larger than the limit")
        elif not st.grpc:
            st.refused = True
            self.respond_http(st, V_415)
        elif not st.post:
            st.refused = True
            self.respond_http(st, V_405)

    def sweep(self):
        """Apply the timeouts; the transport calls this about once a second on every connection."""
        cdef Limits limits = self.limits
        cdef double now = monotonic()
        cdef _Stream st
        if self.closed:
            return
        if self.eof_sent:  # lingering after our GOAWAY and FIN: the peer has a while to close
            if now - self.eof_at > LINGER_S:
                self.abort()
            return
        if (not self.got_settings and now - self.connected_at > limits.handshake_timeout) or (
                self.paused_at and now - self.paused_at > limits.idle_timeout):
            if not self.got_settings:
                limits.closed_handshake += 1
            self.abort()
            return
        expired = []
        for st in self.streams.values():
            if not st.ended and not st.answered and now - st.started > limits.stream_timeout:
                expired.append(st)
        for st in expired:
            limits.timed_out_streams += 1
            self.refuse(st, NGHTTP2_CANCEL)
        if not self.streams and not self.draining and self.idle_since and (
                now - self.idle_since > limits.idle_timeout):
            if not self.notice_sent:
                # Two steps, so a stream the peer opens meanwhile is still served: "stop opening streams",
                # then, a sweep later, the GOAWAY that names the last stream processed.
                self.notice_sent = True
                nghttp2_submit_shutdown_notice(self.session)
            else:
                limits.closed_idle += 1
                self.drain()
                return
        self.flush()

    cdef void dispatch(self, _Stream st) except *:
        cdef bytes message = st.message
        cdef Limits limits = self.limits
        if st.head_len < 5:
            self.release(st)
            self.respond_error(st, INTERNAL, b"no request message")
            return
        if st.pos != st.length:
            self.release(st)
            self.respond_error(st, INTERNAL, b"malformed gRPC frame (one unary message expected)")
            return
        if st.parts is not None:
            message = b"".join(st.parts)
        elif message is None:
            message = b""
        self.release(st)
        limits.calls += 1
        self.last_call = limits.calls
        if limits.fast is not None and st.path == limits.fast_path:
            try:
                result = limits.fast(message)
            except Exception as exc:  # only its type: the message in hand carries the caller's credentials
                log.error("native transport: the first answerer failed (%s); the handler answers", type(exc).__name__)
                result = None
            if isinstance(result, bytes):
                self.respond_ok(st, <bytes>result)
                return
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
