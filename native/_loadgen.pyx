# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The load generator of `authz-agent bench`: HTTP/2 cleartext (prior knowledge) requests by libnghttp2's client
session on non-blocking sockets and ppoll(2), its whole loop run with the GIL released.

Why not h2load or wrk: they repeat one request per run, while the bench sends a weighted mix of request classes
whose DPoP proofs and RFC 9421 signatures are single-use (the agent keeps replay caches), so every request needs
its own pre-made headers and body; and the fixed-rate phase must be free of coordinated omission (latency from
the request's *intended* send time: h2load's --rps measures from the actual send; wrk2 is not in Debian).

Request k sends items[order[k]]. With rate > 0 (open loop) request k is due at t0 + k/rate and goes out once it
is due and a stream slot is free; its latency runs from the due time, so a slow server's queueing is counted.
With rate == 0 (closed loop) every slot is kept busy and latency runs from the actual send. Sending stops at
duration_s after t0 or when `order` is exhausted; the requests in flight then have timeout_s to finish (-3 if
not). Outcomes: the HTTP :status, or for gRPC (ext_authz Check) the CheckResponse read by hand as Envoy reads it
(200 allowed, the denied_response's status or 403 denied, -2 a gRPC error or malformed answer); -1 a reset
stream or a failed connection (it is reconnected, a bounded number of times); -3 not finished by the deadline,
or (open loop) due but never sent because no slot came free; 0 never due. What a server makes us keep is
bounded: 64 KiB of gRPC message and 64 KiB of header fields per stream (over it: reset, -2); plain HTTP bodies
are counted away, never kept. agent/_loadgen_py.py is the pure twin (same API and outcomes, far slower).
"""

from cpython.array cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport ETIMEDOUT
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, strerror

from includes.nghttp2_client cimport *

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <netinet/in.h>
    #include <netinet/tcp.h>
    #include <poll.h>
    #include <string.h>
    #include <sys/prctl.h>
    #include <sys/socket.h>
    #include <time.h>
    #include <unistd.h>

    static inline int64_t lg_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    /* Another thread reads the counters (progress) and sets the stop flag while the loop runs. */
    static inline int64_t lg_load64(int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void lg_store64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline int lg_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void lg_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

    /* A non-blocking TCP_NODELAY socket connecting to addr (4 or 16 bytes): the fd, or -1 with *err set. */
    static int lg_open(int family, const unsigned char *addr, int port, int *err) {
        struct sockaddr_storage ss;
        socklen_t len;
        int one = 1, fd;
        memset(&ss, 0, sizeof ss);
        if (family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            a->sin6_family = AF_INET6;
            a->sin6_port = htons((unsigned short)port);
            memcpy(&a->sin6_addr, addr, 16);
            len = sizeof *a;
        } else {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            a->sin_family = AF_INET;
            a->sin_port = htons((unsigned short)port);
            memcpy(&a->sin_addr, addr, 4);
            len = sizeof *a;
        }
        fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) { *err = errno; return -1; }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, (struct sockaddr *)&ss, len) != 0 && errno != EINPROGRESS) {
            *err = errno;
            close(fd);
            return -1;
        }
        return fd;
    }
    /* 0 once a non-blocking connect has succeeded, else its errno. */
    static int lg_connect_error(int fd) {
        int e = 0;
        socklen_t n = sizeof e;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &n) != 0) return errno;
        return e;
    }
    static int lg_ppoll(struct pollfd *fds, int n, int64_t wait_ns) {
        struct timespec ts;
        ts.tv_sec = wait_ns / 1000000000LL;
        ts.tv_nsec = wait_ns % 1000000000LL;
        return ppoll(fds, (nfds_t)n, &ts, NULL);
    }
    static ssize_t lg_send(int fd, const void *p, size_t n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        return w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : w;
    }
    /* > 0 bytes, 0 nothing to read now, -1 EOF or error. */
    static ssize_t lg_recv(int fd, void *p, size_t n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r > 0) return r;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
        return -1;
    }
    /* The loop sleeps to the nanosecond until the next request is due: the default 50 us timer slack would
       make every open-loop send late by that much (and it counts as latency). Returns the old slack. */
    static unsigned long lg_timerslack(unsigned long ns) {
        int old = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
        prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0);
        return old < 0 ? 50000UL : (unsigned long)old;
    }
    """
    int64_t lg_now() nogil
    int64_t lg_load64(int64_t *p) nogil
    void lg_store64(int64_t *p, int64_t v) nogil
    int lg_load_int(int *p) nogil
    void lg_store_int(int *p, int v) nogil
    int lg_open(int family, const unsigned char *addr, int port, int *err) nogil
    int lg_connect_error(int fd) nogil
    ssize_t lg_send(int fd, const void *p, size_t n) nogil
    ssize_t lg_recv(int fd, void *p, size_t n) nogil
    unsigned long lg_timerslack(unsigned long ns) nogil
    int close(int fd) nogil

    struct pollfd:
        int fd
        short events
        short revents
    int lg_ppoll(pollfd *fds, int n, int64_t wait_ns) nogil
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        AF_INET
        AF_INET6

import socket

from agent._loadgen_py import check_args, request_body, request_fields

# What one stream may make us keep: its gRPC message (plus the 5-byte prefix) and its header fields (counted as
# HTTP/2 counts them: name + value + 32 each). Over either, the stream is reset and its outcome is -2.
cdef enum:
    C_MAX_MESSAGE = 65536
    C_MAX_HEADERS = 65536
    # Consecutive failed (re)connects of one connection before it is given up; the wait doubles from 5 ms to 500 ms.
    C_MAX_FAILS = 20
MAX_MESSAGE, MAX_HEADERS, MAX_FAILS = C_MAX_MESSAGE, C_MAX_HEADERS, C_MAX_FAILS

cdef int64_t WAKE_NS = 10000000     # the loop looks at the stop flag at least this often
cdef size_t RECV_CHUNK = 65536
cdef size_t OUT_HIGH = 65536        # bytes queued for one socket before nghttp2 is asked for more
cdef int DOWN = 0, CONNECTING = 1, UP = 2
cdef uint8_t NV_STATIC = NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE


ctypedef struct Item:
    nghttp2_nv *nva
    size_t nvlen
    const uint8_t *body
    size_t body_len

ctypedef struct Slot:
    int active
    int ended       # END_STREAM received
    int bad         # -2 once refused (too large); the outcome
    int status      # :status
    int grpc_status  # -1 missing or not a number
    int item
    int64_t k
    int64_t start   # due time (open loop) or send time (closed loop)
    size_t body_pos
    size_t hdr_bytes
    uint8_t *buf    # the gRPC response, prefix included
    size_t len
    size_t cap

ctypedef struct Conn:
    void *st        # State
    int fd
    int state
    int goaway
    int inflight
    int fails
    int given_up
    int answered    # answers on this connection since it was made
    int64_t retry_at
    int64_t connect_by
    nghttp2_session *session
    Slot *slots
    uint8_t *out
    size_t out_len
    size_t out_off
    size_t out_cap

ctypedef struct State:
    Conn *conns
    int nconn
    int streams
    Item *items
    int32_t *order
    int64_t n
    int64_t *lat
    int32_t *outc
    int64_t *intended
    double rate
    int64_t duration_ns
    int64_t timeout_ns
    int grpc
    int stop
    int64_t sent
    int64_t completed
    int64_t inflight
    int64_t t0
    int64_t elapsed
    int family
    uint8_t addr[16]
    int port
    int err
    uint8_t *rbuf
    nghttp2_session_callbacks *cbs


# --- the CheckResponse, read as Envoy reads it (protobuf wire format by hand) ---

cdef int read_varint(const uint8_t *p, size_t n, size_t *pos, uint64_t *out) noexcept nogil:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while shift < 70:
        if pos[0] >= n:
            return -1
        b = p[pos[0]]
        pos[0] += 1
        v |= (<uint64_t>(b & 0x7F)) << shift if shift < 64 else 0
        if not (b & 0x80):
            out[0] = v
            return 0
        shift += 7
    return -1  # more than 10 bytes


cdef int scan(const uint8_t *p, size_t n, uint64_t want, uint64_t *value, const uint8_t **sub, size_t *sublen,
              int *found) noexcept nogil:
    """Walk one message's fields; keep the last `want` (a varint in *value, or a length-delimited field in
    *sub); -1 when the message is malformed or `want` has another wire type than the one asked for (sub NULL:
    varint)."""
    cdef size_t pos = 0, end
    cdef uint64_t key, v, ln
    cdef int wt
    found[0] = 0
    while pos < n:
        if read_varint(p, n, &pos, &key) != 0 or (key >> 3) == 0:
            return -1
        wt = <int>(key & 7)
        if wt == 0:
            if read_varint(p, n, &pos, &v) != 0:
                return -1
            if (key >> 3) == want:
                if sub != NULL:
                    return -1
                value[0] = v
                found[0] = 1
        elif wt == 2:
            if read_varint(p, n, &pos, &ln) != 0 or ln > n - pos:
                return -1
            if (key >> 3) == want:
                if sub == NULL:
                    return -1
                sub[0] = p + pos
                sublen[0] = <size_t>ln
                found[0] = 1
            pos += <size_t>ln
        elif wt == 1 or wt == 5:
            end = 8 if wt == 1 else 4
            if end > n - pos or (key >> 3) == want:
                return -1
            pos += end
        else:
            return -1
    return 0


cdef inline int32_t as_int32(uint64_t v) noexcept nogil:
    return <int32_t><uint32_t>v  # protobuf's int32 from a varint: its low 32 bits


cdef int check_response(const uint8_t *p, size_t n) noexcept nogil:
    """CheckResponse -> status code 0: 200; else denied_response.status.code, 403 when absent; -2 malformed."""
    cdef uint64_t code = 0, http = 0
    cdef const uint8_t *sub = NULL
    cdef const uint8_t *hs = NULL
    cdef size_t sublen = 0, hslen = 0
    cdef int found = 0, denied = 0
    if scan(p, n, 1, &code, &sub, &sublen, &found) != 0:
        return -2
    code = 0
    if found and scan(sub, sublen, 1, &code, NULL, NULL, &found) != 0:
        return -2
    if scan(p, n, 2, &http, &sub, &sublen, &denied) != 0:
        return -2
    http = 0
    if denied:
        if scan(sub, sublen, 1, &http, &hs, &hslen, &found) != 0:
            return -2
        http = 0
        if found and scan(hs, hslen, 1, &http, NULL, NULL, &found) != 0:
            return -2
    if as_int32(code) == 0:
        return 200
    if denied and as_int32(http) != 0:
        return as_int32(http)
    return 403


cdef int grpc_outcome(Slot *s) noexcept nogil:
    cdef size_t length
    if s.status != 200 or s.grpc_status != 0 or s.len < 5 or s.buf[0] != 0:
        return -2
    length = (<size_t>s.buf[1] << 24) | (<size_t>s.buf[2] << 16) | (<size_t>s.buf[3] << 8) | s.buf[4]
    if length != s.len - 5:
        return -2
    return check_response(s.buf + 5, length)


cdef int parse_digits(const uint8_t *v, size_t n) noexcept nogil:
    cdef int x = 0
    cdef size_t i
    if n == 0 or n > 9:
        return -1
    for i in range(n):
        if v[i] < 48 or v[i] > 57:
            return -1
        x = x * 10 + (v[i] - 48)
    return x


# --- nghttp2 callbacks (user_data: the Conn) ---

cdef void finish(Conn *c, Slot *s, int outcome) noexcept nogil:
    cdef State *st = <State*>c.st
    st.lat[s.k] = lg_now() - s.start
    st.outc[s.k] = outcome
    s.active = 0
    c.inflight -= 1
    st.inflight -= 1
    lg_store64(&st.completed, st.completed + 1)
    if outcome != -1:
        c.fails = 0  # the server answers here: a later failure starts its back-off afresh
        c.answered += 1


cdef int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                   const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept nogil:
    cdef Slot *s
    if frame.hd.type != NGHTTP2_HEADERS:
        return 0
    s = <Slot*>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
    if s == NULL or not s.active or s.bad:
        return 0
    s.hdr_bytes += namelen + valuelen + 32
    if s.hdr_bytes > <size_t>C_MAX_HEADERS:
        s.bad = -2
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id, NGHTTP2_CANCEL)
    elif namelen == 7 and memcmp(name, b":status", 7) == 0:
        s.status = parse_digits(value, valuelen)
    elif namelen == 11 and memcmp(name, b"grpc-status", 11) == 0:
        s.grpc_status = parse_digits(value, valuelen)
    return 0


cdef int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data, size_t n,
                       void *user_data) noexcept nogil:
    cdef Conn *c = <Conn*>user_data
    cdef Slot *s
    cdef size_t cap
    cdef uint8_t *grown
    if not (<State*>c.st).grpc:
        return 0  # a plain HTTP body is only counted away (nghttp2 acknowledges it)
    s = <Slot*>nghttp2_session_get_stream_user_data(session, stream_id)
    if s == NULL or not s.active or s.bad:
        return 0
    if s.len + n > <size_t>C_MAX_MESSAGE + 5:
        s.bad = -2
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_CANCEL)
        return 0
    if s.len + n > s.cap:
        cap = s.cap * 2 if s.cap else 256
        while cap < s.len + n:
            cap *= 2
        grown = <uint8_t*>realloc(s.buf, cap)
        if grown == NULL:
            s.bad = -2
            nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_CANCEL)
            return 0
        s.buf = grown
        s.cap = cap
    memcpy(s.buf + s.len, data, n)
    s.len += n
    return 0


cdef int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept nogil:
    cdef Conn *c = <Conn*>user_data
    cdef Slot *s
    if frame.hd.type == NGHTTP2_GOAWAY:
        c.goaway = 1  # no new streams here; reconnected once the last one is done
    elif (frame.hd.type == NGHTTP2_DATA or frame.hd.type == NGHTTP2_HEADERS) and (
            frame.hd.flags & NGHTTP2_FLAG_END_STREAM):
        s = <Slot*>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
        if s != NULL:
            s.ended = 1
    return 0


cdef int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                         void *user_data) noexcept nogil:
    cdef Conn *c = <Conn*>user_data
    cdef Slot *s = <Slot*>nghttp2_session_get_stream_user_data(session, stream_id)
    cdef int outcome
    if s == NULL or not s.active:
        return 0
    if s.bad:
        outcome = s.bad
    elif not s.ended:
        outcome = -1  # reset (or refused by GOAWAY) before the answer was whole
    elif (<State*>c.st).grpc:
        outcome = grpc_outcome(s)
    else:
        outcome = s.status if s.status > 0 else -1
    finish(c, s, outcome)
    return 0


cdef ssize_t read_body(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                       uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept nogil:
    cdef Slot *s = <Slot*>source.ptr
    cdef Item *it = &(<State*>(<Conn*>user_data).st).items[s.item]
    cdef size_t n = it.body_len - s.body_pos
    if n > length:
        n = length
    memcpy(buf, it.body + s.body_pos, n)
    s.body_pos += n
    if s.body_pos == it.body_len:
        data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
    return <ssize_t>n


# --- connections ---

cdef int open_conn(State *st, Conn *c, int64_t now) noexcept nogil:
    """Start a non-blocking connect: 0, or -1 with st.err set (the connection stays DOWN)."""
    c.fd = lg_open(st.family, st.addr, st.port, &st.err)
    if c.fd < 0:
        return -1
    c.state = CONNECTING
    c.connect_by = now + (st.timeout_ns if st.timeout_ns > 1000000000 else 1000000000)
    return 0


cdef int start_session(State *st, Conn *c) noexcept nogil:
    """The connect finished: an nghttp2 client session with our SETTINGS queued."""
    cdef nghttp2_settings_entry iv[2]
    st.err = lg_connect_error(c.fd)
    if st.err != 0:
        return -1
    if nghttp2_session_client_new2(&c.session, st.cbs, c, NULL) != 0:
        c.session = NULL
        return -1
    iv[0].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
    iv[0].value = 0
    iv[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
    iv[1].value = 1 << 20
    nghttp2_submit_settings(c.session, NGHTTP2_FLAG_NONE, iv, 2)
    nghttp2_session_set_local_window_size(c.session, NGHTTP2_FLAG_NONE, 0, 1 << 24)
    c.state = UP
    c.goaway = 0
    c.answered = 0
    c.out_len = c.out_off = 0
    return 0


cdef void drop_conn(State *st, Conn *c, int64_t now, bint failed, bint again) noexcept nogil:
    """Close it: its streams in flight are failed (-1); with `again`, reconnect after a back-off (none after a
    graceful GOAWAY), unless it failed MAX_FAILS times in a row."""
    cdef int i
    cdef int64_t wait
    for i in range(st.streams):
        if c.slots[i].active:
            finish(c, &c.slots[i], -1)
    if c.session != NULL:
        nghttp2_session_del(c.session)
        c.session = NULL
    if c.fd >= 0:
        close(c.fd)
        c.fd = -1
    c.state = DOWN
    c.out_len = c.out_off = 0
    c.inflight = 0
    if failed:
        c.fails += 1
    if not again or c.fails >= C_MAX_FAILS:
        c.given_up = 1
        return
    wait = 0
    if c.fails:
        wait = 5000000LL << (c.fails - 1 if c.fails < 8 else 7)
        if wait > 500000000:
            wait = 500000000
    c.retry_at = now + wait


cdef int flush(Conn *c) noexcept nogil:
    """Write what nghttp2 has queued, as far as the socket takes it: 0, or -1 when the connection is gone."""
    cdef const uint8_t *data
    cdef ssize_t n, w
    cdef size_t cap
    cdef uint8_t *grown
    while True:
        if c.out_off < c.out_len:
            w = lg_send(c.fd, c.out + c.out_off, c.out_len - c.out_off)
            if w < 0:
                return -1
            c.out_off += <size_t>w
            if c.out_off < c.out_len:
                return 0  # the socket is full: POLLOUT
        c.out_len = c.out_off = 0
        while c.out_len < OUT_HIGH:
            n = nghttp2_session_mem_send(c.session, &data)
            if n < 0:
                return -1
            if n == 0:
                break
            if c.out_len + <size_t>n > c.out_cap:
                cap = c.out_cap * 2 if c.out_cap else OUT_HIGH * 2
                while cap < c.out_len + <size_t>n:
                    cap *= 2
                grown = <uint8_t*>realloc(c.out, cap)
                if grown == NULL:
                    return -1
                c.out = grown
                c.out_cap = cap
            memcpy(c.out + c.out_len, data, <size_t>n)
            c.out_len += <size_t>n
        if c.out_len == 0:
            return 0


cdef int receive(State *st, Conn *c) noexcept nogil:
    """Feed what the socket has to nghttp2 (a bounded number of reads): 0, or -1 on EOF or a protocol error."""
    cdef ssize_t r
    cdef int i
    for i in range(16):
        r = lg_recv(c.fd, st.rbuf, RECV_CHUNK)
        if r < 0:
            return -1
        if r == 0:
            return 0
        if nghttp2_session_mem_recv(c.session, st.rbuf, <size_t>r) < 0:
            return -1
        if <size_t>r < RECV_CHUNK:
            return 0
    return 0


cdef Conn *pick(State *st, int *rr) noexcept nogil:
    """The up connection with the fewest streams in flight and a free slot (ties: round-robin)."""
    cdef Conn *best = NULL
    cdef Conn *c
    cdef int i, limit
    cdef uint32_t peer
    for i in range(st.nconn):
        c = &st.conns[(rr[0] + i) % st.nconn]
        if c.state != UP or c.goaway:
            continue
        limit = st.streams
        peer = nghttp2_session_get_remote_settings(c.session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)
        if peer < <uint32_t>limit:
            limit = <int>peer
        if c.inflight < limit and (best == NULL or c.inflight < best.inflight):
            best = c
    if best != NULL:
        rr[0] = <int>(best - st.conns) + 1
    return best


cdef void submit(State *st, Conn *c, int64_t k, int64_t start) noexcept nogil:
    cdef Slot *s = NULL
    cdef Item *it
    cdef nghttp2_data_provider prd
    cdef int i
    cdef int32_t sid
    for i in range(st.streams):
        if not c.slots[i].active:
            s = &c.slots[i]
            break
    s.active = 1
    s.ended = s.bad = s.status = 0
    s.grpc_status = -1
    s.item = st.order[k]
    s.k = k
    s.start = start
    s.body_pos = s.hdr_bytes = s.len = 0
    st.intended[k] = start - st.t0
    c.inflight += 1
    st.inflight += 1
    lg_store64(&st.sent, st.sent + 1)
    it = &st.items[s.item]
    if it.body_len:
        prd.source.ptr = s
        prd.read_callback = read_body
        sid = nghttp2_submit_request(c.session, NULL, it.nva, it.nvlen, &prd, s)
    else:
        sid = nghttp2_submit_request(c.session, NULL, it.nva, it.nvlen, NULL, s)
    if sid < 0:  # out of stream ids or the session is going away: this connection is done
        finish(c, s, -1)
        c.goaway = 1


cdef int64_t due(State *st, int64_t k) noexcept nogil:
    return st.t0 + <int64_t>(<double>k * 1e9 / st.rate)


cdef int connect_all(State *st) noexcept nogil:
    """The first connections, all of them, before the clock starts: 0, or -1 with st.err (ECONNREFUSED...)."""
    cdef pollfd fds[1000]
    cdef int idx[1000]
    cdef int i, pending
    cdef int64_t now = lg_now()
    cdef int64_t deadline = now + max(st.timeout_ns, <int64_t>1000000000)
    for i in range(st.nconn):
        if open_conn(st, &st.conns[i], now) != 0:
            return -1
    while True:
        pending = 0
        for i in range(st.nconn):
            if st.conns[i].state == CONNECTING:
                fds[pending].fd = st.conns[i].fd
                fds[pending].events = POLLOUT
                fds[pending].revents = 0
                idx[pending] = i
                pending += 1
        if pending == 0:
            return 0
        now = lg_now()
        if now >= deadline:
            st.err = ETIMEDOUT
            return -1
        lg_ppoll(fds, pending, min(WAKE_NS, deadline - now))
        for i in range(pending):
            if fds[i].revents and start_session(st, &st.conns[idx[i]]) != 0:
                return -1


cdef int run_loop(State *st) noexcept nogil:
    """The whole run; -1 when the first connects fail (st.err)."""
    cdef pollfd fds[1000]
    cdef Conn *conn_of[1000]
    cdef Conn *c
    cdef int i, nfd, rr = 0, live
    cdef int64_t now, k = 0, wait, drain_by = 0, d, sending_ended = 0
    cdef bint stopping = False
    if connect_all(st) != 0:
        return -1
    st.t0 = lg_now()
    while True:
        now = lg_now()
        if lg_load_int(&st.stop):  # what is in flight is abandoned (-3)
            if not stopping:
                sending_ended = now
            break
        if not stopping:
            live = 0
            for i in range(st.nconn):
                live += not st.conns[i].given_up
            if k >= st.n or now - st.t0 >= st.duration_ns or live == 0:
                stopping = True
                sending_ended = min(now, st.t0 + st.duration_ns)
                drain_by = now + st.timeout_ns
        if stopping and (st.inflight == 0 or now >= drain_by):
            break
        if not stopping:
            while k < st.n:
                if st.rate > 0:
                    d = due(st, k)
                    if d > now:
                        break
                else:
                    d = now
                c = pick(st, &rr)
                if c == NULL:
                    break
                submit(st, c, k, d)
                k += 1
            for i in range(st.nconn):
                c = &st.conns[i]
                if c.state == DOWN and not c.given_up and now >= c.retry_at and open_conn(st, c, now) != 0:
                    drop_conn(st, c, now, True, True)
        # out
        wait = WAKE_NS
        nfd = 0
        for i in range(st.nconn):
            c = &st.conns[i]
            if c.state == UP:
                if flush(c) != 0:
                    drop_conn(st, c, now, True, not stopping)
                    continue
                if c.goaway and c.inflight == 0:  # a graceful end; a failure if it answered nothing (back-off)
                    drop_conn(st, c, now, c.answered == 0, not stopping)
                    continue
                fds[nfd].events = POLLIN | (POLLOUT if c.out_off < c.out_len else 0)
            elif c.state == CONNECTING:
                if now >= c.connect_by:
                    drop_conn(st, c, now, True, not stopping)
                    continue
                fds[nfd].events = POLLOUT
            else:
                if not c.given_up and not stopping:
                    wait = min(wait, c.retry_at - now)
                continue
            fds[nfd].fd = c.fd
            fds[nfd].revents = 0
            conn_of[nfd] = c
            nfd += 1
        if stopping:
            wait = min(wait, drain_by - now)
        elif st.rate > 0 and k < st.n:
            wait = min(wait, due(st, k) - now)
        if wait < 0:
            wait = 0
        if lg_ppoll(fds, nfd, wait) <= 0:
            continue
        now = lg_now()
        for i in range(nfd):
            c = conn_of[i]
            if not fds[i].revents or c.state == DOWN:
                continue
            if c.state == CONNECTING:
                if start_session(st, c) != 0:
                    drop_conn(st, c, now, True, not stopping)
                continue
            if fds[i].revents & (POLLIN | POLLHUP | POLLERR):
                if receive(st, c) != 0:
                    drop_conn(st, c, now, True, not stopping)
                    continue
            if fds[i].revents & POLLOUT and flush(c) != 0:
                drop_conn(st, c, now, True, not stopping)
    now = lg_now()
    st.elapsed = now - st.t0
    # what never finished: in flight at the end (-3), due but never sent (open loop: -3), never due (0)
    for i in range(st.nconn):
        c = &st.conns[i]
        for nfd in range(st.streams):
            if c.slots[nfd].active:
                c.slots[nfd].active = 0
                st.outc[c.slots[nfd].k] = -3
        c.inflight = 0
        drop_conn(st, c, now, False, False)
    st.inflight = 0
    if st.rate > 0:
        while k < st.n:
            d = due(st, k)
            if d > sending_ended or (d - st.t0) >= st.duration_ns:
                break
            st.intended[k] = d - st.t0
            st.outc[k] = -3
            k += 1
    return 0


cdef nghttp2_session_callbacks *CALLBACKS = NULL


cdef nghttp2_session_callbacks *callbacks():
    global CALLBACKS
    if CALLBACKS == NULL:
        nghttp2_session_callbacks_new(&CALLBACKS)
        nghttp2_session_callbacks_set_on_header_callback(CALLBACKS, on_header)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(CALLBACKS, on_data_chunk)
        nghttp2_session_callbacks_set_on_frame_recv_callback(CALLBACKS, on_frame_recv)
        nghttp2_session_callbacks_set_on_stream_close_callback(CALLBACKS, on_stream_close)
    return CALLBACKS


cdef class Load:
    """One run of load (see the module docstring); run() once, from any thread."""

    cdef State st
    cdef list keep          # the bytes the C structures point into
    cdef array lat, outc, intended_
    cdef str host
    cdef bint ran
    cdef Py_ssize_t nitems

    def __cinit__(self):
        self.st.conns = NULL
        self.st.items = NULL
        self.st.order = NULL
        self.st.rbuf = NULL

    def __init__(self, str host, int port, items, order, *, bint grpc, str authority, int connections=4,
                 int streams=16, double rate=0.0, double duration_s=10.0, double timeout_s=5.0):
        cdef Py_ssize_t i, j
        cdef Item *it
        check_args(items, order, connections, streams, rate, duration_s, timeout_s, port)
        self.host = host
        self.st.port = port
        self.st.nconn = connections
        self.st.streams = streams
        self.st.rate = rate
        self.st.duration_ns = <int64_t>(duration_s * 1e9)
        self.st.timeout_ns = <int64_t>(timeout_s * 1e9)
        self.st.grpc = grpc
        self.st.n = len(order)
        self.keep = []
        auth = authority.encode("ascii")
        self.st.items = <Item*>calloc(len(items), sizeof(Item))
        self.nitems = len(items)
        self.st.order = <int32_t*>calloc(max(1, self.st.n), sizeof(int32_t))
        if self.st.items == NULL or self.st.order == NULL:
            raise MemoryError()
        for i, item in enumerate(items):
            fields = request_fields(item, grpc, auth)
            it = &self.st.items[i]
            it.nva = <nghttp2_nv*>calloc(len(fields), sizeof(nghttp2_nv))
            if it.nva == NULL:
                raise MemoryError()
            it.nvlen = len(fields)
            for j, (name, value) in enumerate(fields):
                self.keep.append(name)
                self.keep.append(value)
                it.nva[j].name = <uint8_t*>PyBytes_AS_STRING(name)
                it.nva[j].namelen = PyBytes_GET_SIZE(name)
                it.nva[j].value = <uint8_t*>PyBytes_AS_STRING(value)
                it.nva[j].valuelen = PyBytes_GET_SIZE(value)
                it.nva[j].flags = NV_STATIC
            body = request_body(item, grpc)
            self.keep.append(body)
            it.body = <const uint8_t*>PyBytes_AS_STRING(body)
            it.body_len = PyBytes_GET_SIZE(body)
        for i, k in enumerate(order):
            self.st.order[i] = k
        self.lat = array("q", [-1]) * self.st.n
        self.outc = array("i", [0]) * self.st.n
        self.intended_ = array("q", [-1]) * self.st.n
        self.st.lat = <int64_t*>self.lat.data.as_longlongs
        self.st.outc = <int32_t*>self.outc.data.as_ints
        self.st.intended = <int64_t*>self.intended_.data.as_longlongs

    def __dealloc__(self):
        cdef Py_ssize_t i
        self.release()
        if self.st.items != NULL:
            for i in range(self.nitems):
                free(self.st.items[i].nva)
            free(self.st.items)
            self.st.items = NULL
        free(self.st.order)
        self.st.order = NULL

    cdef void release(self) noexcept:
        """Close the connections and free what the run used (the items stay: run() is once, but __init__ made them)."""
        cdef int i, j
        cdef Conn *c
        if self.st.conns != NULL:
            for i in range(self.st.nconn):
                c = &self.st.conns[i]
                if c.session != NULL:
                    nghttp2_session_del(c.session)
                    c.session = NULL
                if c.fd >= 0:
                    close(c.fd)
                    c.fd = -1
                if c.slots != NULL:
                    for j in range(self.st.streams):
                        free(c.slots[j].buf)
                    free(c.slots)
                free(c.out)
            free(self.st.conns)
            self.st.conns = NULL
        free(self.st.rbuf)
        self.st.rbuf = NULL

    def run(self) -> None:
        """Connect, send, wait for the stragglers; blocks (without the GIL) until done. ConnectionError when the
        first connections cannot be made."""
        cdef int i, rc
        cdef unsigned long slack
        if self.ran:
            raise RuntimeError("a Load runs once")
        self.ran = True
        try:
            infos = socket.getaddrinfo(self.host, self.st.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ConnectionError(f"cannot connect to {self.host}:{self.st.port}: {e.strerror or e}") from None
        family, _, _, _, sockaddr = infos[0]
        packed = socket.inet_pton(family, sockaddr[0])
        self.st.family = AF_INET6 if family == socket.AF_INET6 else AF_INET
        memcpy(self.st.addr, PyBytes_AS_STRING(packed), len(packed))
        self.st.cbs = callbacks()
        self.st.rbuf = <uint8_t*>calloc(RECV_CHUNK, 1)
        self.st.conns = <Conn*>calloc(self.st.nconn, sizeof(Conn))
        if self.st.rbuf == NULL or self.st.conns == NULL:
            raise MemoryError()
        for i in range(self.st.nconn):
            self.st.conns[i].st = &self.st
            self.st.conns[i].fd = -1
            self.st.conns[i].slots = <Slot*>calloc(self.st.streams, sizeof(Slot))
            if self.st.conns[i].slots == NULL:
                raise MemoryError()
        with nogil:
            slack = lg_timerslack(1)
            rc = run_loop(&self.st)
            lg_timerslack(slack)
        self.release()
        if rc != 0:
            reason = strerror(self.st.err).decode("utf-8", "replace")
            raise ConnectionError(f"cannot connect to {self.host}:{self.st.port}: {reason}")

    def stop(self) -> None:
        """End run() early (from any thread): nothing more is sent; what is in flight is abandoned (-3)."""
        lg_store_int(&self.st.stop, 1)

    @property
    def sent(self) -> int:
        return lg_load64(&self.st.sent)

    @property
    def completed(self) -> int:
        return lg_load64(&self.st.completed)

    @property
    def elapsed_ns(self) -> int:
        return self.st.elapsed

    def latencies_ns(self) -> array:
        """Per request position: completion minus due (open loop) or send time (closed loop); -1 if unfinished."""
        return self.lat

    def outcomes(self) -> array:
        """Per request position: HTTP status (gRPC: as Envoy would answer), -1 reset/connection failed, -2 gRPC
        error or malformed/oversized answer, -3 not finished in time, 0 never due."""
        return self.outc

    def intended_ns(self) -> array:
        """Per request position: its due time (open loop) or send time (closed loop) from t0; -1 if neither."""
        return self.intended_
