# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The audit log's record queue and JSON hash chain in C (twin: agent/audit/_auditq_py.py).

Producers (request threads, GIL held) copy a record's bytes into one contiguous buffer under a mutex and
wake the writer only when the queue reaches a batch. The writer swaps that buffer for its own empty one
under the same mutex (a pointer swap), then links, hashes (OpenSSL SHA-256) and write(2)s the records
with the GIL released: the request threads never wait for the writer's GIL time. Native producers append
through the capsule `agent._auditq_c.api` (native/includes/auditq_api.h) without making a bytes object.

Locks: `mu` guards the producers' buffer and the counts. It is held for a copy or a swap and never
while waiting for anything else, so threads holding the GIL may wait for it. `cmu` is the consumer's:
it guards the writer's buffer and is held for a whole drain, so it is only ever waited for with the GIL
released (take() then takes the GIL while holding it, to make bytes objects: no one holding the GIL
waits for cmu, so that cannot deadlock). Order: cmu, then mu.

Same API and output as the twin; tests/unit/test_auditq.py runs both.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_SetString
from cpython.object cimport PyObject
from cpython.pycapsule cimport PyCapsule_New
from libc.errno cimport EAGAIN, EINTR, EIO, ENOMEM, errno
from libc.stdint cimport UINT32_MAX, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport write

from includes.auditq cimport *

import os

GENESIS = "0" * 64

cdef enum:
    HEADER = 4  # a record in a buffer: its length (uint32, native order), then its bytes
    LINE_EXTRA = 128  # what linking adds to a body: {"seq":N,"prev":"<64 hex>", and the newline
    CHUNK = 256 * 1024  # lines are written in chunks of about this many bytes
    SMALL = 64 * 1024  # a buffer's first size
    SHRINK = 4 * 1024 * 1024  # an emptied buffer larger than this is given back

cdef const char *HEX = b"0123456789abcdef"

cdef EVP_MD *SHA256_MD = EVP_MD_fetch(NULL, b"SHA256", NULL)
if SHA256_MD == NULL:
    raise ImportError("OpenSSL has no SHA256")


cdef struct Buf:
    char *data
    size_t cap
    size_t len  # the end of the last record
    size_t rd  # the first record not consumed yet
    size_t count  # records in [rd, len)


cdef int buf_reserve(Buf *b, size_t extra) noexcept nogil:
    """Room for `extra` more bytes at b.len: 0, or -1 when memory is short (b unchanged)."""
    cdef size_t need = b.len + extra
    cdef size_t cap = b.cap if b.cap else SMALL
    cdef char *p
    if need < b.len:
        return -1
    if need <= b.cap:
        return 0
    while cap < need:
        if cap > (<size_t>-1) // 2:
            cap = need
            break
        cap *= 2
    p = <char *>realloc(b.data, cap)
    if p == NULL:
        return -1
    b.data = p
    b.cap = cap
    return 0


cdef inline void buf_empty(Buf *b) noexcept nogil:
    """Forget the (consumed) contents; give a large buffer back."""
    b.len = b.rd = b.count = 0
    if b.cap > SHRINK:
        free(b.data)
        b.data = NULL
        b.cap = 0


cdef inline uint32_t buf_next(Buf *b, const char **body) noexcept nogil:
    """The record at the read cursor (the caller knows there is one); the cursor moves past it."""
    cdef uint32_t n
    memcpy(&n, b.data + b.rd, HEADER)
    body[0] = b.data + b.rd + HEADER
    b.rd += HEADER + n
    b.count -= 1
    return n


cdef int write_all(int fd, const char *p, size_t n) noexcept nogil:
    """write(2) until all of p is out: 0, or the errno. Partial writes go on; EINTR is retried; a
    non-blocking fd that stays full is waited for with poll(2), at most 30 s in all."""
    cdef ssize_t r
    cdef int interrupted = 0, full = 0
    cdef pollfd pfd
    while n:
        r = write(fd, p, n)
        if r > 0:
            p += r
            n -= <size_t>r
            full = 0
        elif r < 0 and errno == EINTR:
            interrupted += 1
            if interrupted > 10000:
                return EINTR
        elif r < 0 and errno == EAGAIN:  # EWOULDBLOCK on Linux
            full += 1
            if full > 300:
                return EAGAIN
            pfd.fd = fd
            pfd.events = POLLOUT
            pfd.revents = 0
            poll(&pfd, 1, 100)
        elif r < 0:
            return errno
        else:
            return EIO
    return 0


cdef class RecordQueue:
    """Serialised audit records on their way to the writer: bounded by count and bytes, oldest first.

    append() refuses (False, counted in `dropped`) when the queue is full, and, for a queue of JSON
    objects (json_objects=True, what JsonChain.drain needs), a record that is not one: shorter than two
    bytes or not starting with '{'. prepend() is never refused (the writer's own alerts). wait() wakes
    when `batch` records are queued (never per record), on close(), or after its timeout; a batch larger
    than max_records never fills, so only the timeout wakes it then.
    """

    cdef pthread_mutex_t mu
    cdef pthread_cond_t filled
    cdef pthread_mutex_t cmu
    cdef bint ready
    cdef Buf inb  # producers append here (mu)
    cdef Buf outb  # the consumer reads here (cmu); its records are older than inb's
    cdef size_t queued  # records in both (mu), until written
    cdef size_t queued_bytes  # their bytes without headers (mu)
    cdef size_t dropped_  # (mu)
    cdef bint closed  # (mu)
    cdef readonly Py_ssize_t max_records
    cdef readonly Py_ssize_t max_bytes
    cdef readonly Py_ssize_t batch
    cdef readonly bint json_objects

    def __cinit__(self, *args, **kwargs):
        cdef pthread_condattr_t attr
        if pthread_mutex_init(&self.mu, NULL) or pthread_mutex_init(&self.cmu, NULL):
            raise MemoryError()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        if pthread_cond_init(&self.filled, &attr):
            raise MemoryError()
        pthread_condattr_destroy(&attr)
        self.ready = True

    def __init__(
        self, Py_ssize_t max_records=65536, Py_ssize_t max_bytes=64 << 20, Py_ssize_t batch=256, *,
        bint json_objects=True,
    ):
        if max_records < 1 or max_bytes < 1 or batch < 1:
            raise ValueError("max_records, max_bytes and batch must be at least 1")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.batch = batch
        self.json_objects = json_objects

    def __dealloc__(self):
        if self.ready:
            pthread_cond_destroy(&self.filled)
            pthread_mutex_destroy(&self.mu)
            pthread_mutex_destroy(&self.cmu)
        free(self.inb.data)
        free(self.outb.data)

    cdef int _append(self, const char *p, Py_ssize_t n) noexcept nogil:
        """Queue a copy of p[:n]: 0, or 1 when refused (counted in dropped)."""
        cdef bint ok = 0 <= n <= <Py_ssize_t>UINT32_MAX and (not self.json_objects or (n >= 2 and p[0] == 0x7B))
        pthread_mutex_lock(&self.mu)
        if (not ok or self.queued >= <size_t>self.max_records
                or self.queued_bytes + <size_t>n > <size_t>self.max_bytes
                or buf_reserve(&self.inb, HEADER + <size_t>n)):
            self.dropped_ += 1
            pthread_mutex_unlock(&self.mu)
            return 1
        self._put(p, <uint32_t>n)
        self.queued += 1
        self.queued_bytes += <size_t>n
        if self.queued == <size_t>self.batch:
            pthread_cond_signal(&self.filled)
        pthread_mutex_unlock(&self.mu)
        return 0

    cdef inline void _put(self, const char *p, uint32_t n) noexcept nogil:
        memcpy(self.inb.data + self.inb.len, &n, HEADER)
        memcpy(self.inb.data + self.inb.len + HEADER, p, n)
        self.inb.len += HEADER + n
        self.inb.count += 1

    def append(self, bytes record not None) -> bool:
        """Queue a record (GIL held, any thread). False when refused: counted in `dropped`."""
        return self._append(PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record)) == 0

    def prepend(self, bytes record not None) -> None:
        """Queue a record ahead of all others; never refused for room (the writer's own alerts)."""
        cdef const char *p = PyBytes_AS_STRING(record)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(record)
        cdef int rc
        if n > <Py_ssize_t>UINT32_MAX or (self.json_objects and (n < 2 or p[0] != 0x7B)):
            raise ValueError("an audit record must be a JSON object")
        with nogil:
            pthread_mutex_lock(&self.cmu)
            rc = self._put_front(p, <uint32_t>n)
            if rc == 0:
                pthread_mutex_lock(&self.mu)
                self.queued += 1
                self.queued_bytes += <size_t>n
                if self.queued == <size_t>self.batch:
                    pthread_cond_signal(&self.filled)
                pthread_mutex_unlock(&self.mu)
            pthread_mutex_unlock(&self.cmu)
        if rc:
            raise MemoryError()

    cdef int _put_front(self, const char *p, uint32_t n) noexcept nogil:
        """(cmu held) The record before the consumer's first one: in the room before the cursor, or the
        unread records move up."""
        cdef Buf *b = &self.outb
        cdef size_t need = HEADER + n
        cdef size_t unread
        if b.count == 0:
            b.len = b.rd = 0
        if b.rd < need:
            if buf_reserve(b, need - b.rd):
                return -1
            unread = b.len - b.rd
            memmove(b.data + need, b.data + b.rd, unread)
            b.len = need + unread
            b.rd = need
        b.rd -= need
        memcpy(b.data + b.rd, &n, HEADER)
        memcpy(b.data + b.rd + HEADER, p, n)
        b.count += 1
        return 0

    cdef void _refill(self) noexcept nogil:
        """(cmu held) When the consumer's buffer is used up, the producers' becomes it (a swap under mu)."""
        cdef Buf spare
        if self.outb.count:
            return
        buf_empty(&self.outb)
        pthread_mutex_lock(&self.mu)
        spare = self.outb
        self.outb = self.inb
        self.inb = spare
        pthread_mutex_unlock(&self.mu)

    cdef void _consumed(self, size_t records, size_t nbytes, bint lost) noexcept nogil:
        """(cmu held) Records taken off the consumer's buffer leave the counts; lost ones count as dropped."""
        pthread_mutex_lock(&self.mu)
        self.queued -= records
        self.queued_bytes -= nbytes
        if lost:
            self.dropped_ += records
        pthread_mutex_unlock(&self.mu)

    def __len__(self) -> int:
        cdef size_t n
        pthread_mutex_lock(&self.mu)
        n = self.queued
        pthread_mutex_unlock(&self.mu)
        return n

    @property
    def dropped(self) -> int:
        """Records refused (queue full, or not a JSON object) or lost to a failed write."""
        cdef size_t n
        pthread_mutex_lock(&self.mu)
        n = self.dropped_
        pthread_mutex_unlock(&self.mu)
        return n

    def wait(self, double timeout_s) -> None:
        """Block with the GIL released until `batch` records are queued, close() is called, or timeout_s."""
        cdef timespec deadline
        cdef int rc = 0
        if not timeout_s > 0:  # NaN too
            timeout_s = 0
        if timeout_s > 86400:
            timeout_s = 86400
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &deadline)
            deadline.tv_sec += <long>timeout_s
            deadline.tv_nsec += <long>((timeout_s - <long>timeout_s) * 1e9)
            if deadline.tv_nsec >= 1000000000:
                deadline.tv_sec += 1
                deadline.tv_nsec -= 1000000000
            pthread_mutex_lock(&self.mu)
            while not self.closed and self.queued < <size_t>self.batch and rc == 0:
                rc = pthread_cond_timedwait(&self.filled, &self.mu, &deadline)
            pthread_mutex_unlock(&self.mu)

    def close(self) -> None:
        """Wake a waiter now and from now on; append still works (what is queued is drained)."""
        pthread_mutex_lock(&self.mu)
        self.closed = True
        pthread_cond_broadcast(&self.filled)
        pthread_mutex_unlock(&self.mu)

    def take(self) -> list:
        """Everything queued, oldest first; the queue is left empty."""
        cdef list out = []
        cdef const char *body
        cdef uint32_t n
        cdef size_t records = 0, nbytes = 0
        cdef int i
        with nogil:
            pthread_mutex_lock(&self.cmu)
        try:
            for i in range(2):  # the consumer's buffer, then what the producers had
                self._refill()
                while self.outb.count:
                    n = buf_next(&self.outb, &body)
                    records += 1
                    nbytes += n
                    out.append(PyBytes_FromStringAndSize(body, n))
        finally:
            self._consumed(records, nbytes, False)
            if self.outb.count == 0:
                buf_empty(&self.outb)
            pthread_mutex_unlock(&self.cmu)
        return out

    def capsule(self) -> object:
        """The C producers' entry: a PyCapsule named agent._auditq_c.api (native/includes/auditq_api.h)."""
        return api


cdef agent_auditq_api _API


cdef int _api_append(PyObject *queue, const char *data, Py_ssize_t n) noexcept:
    if not isinstance(<object>queue, RecordQueue):
        PyErr_SetString(TypeError, b"not an agent._auditq_c.RecordQueue")
        return -1
    return (<RecordQueue>queue)._append(data, n)


_API.append = _api_append
api = PyCapsule_New(&_API, AGENT_AUDITQ_CAPSULE, NULL)


cdef char *fmt_int(char *o, int64_t v) noexcept nogil:
    """v in decimal at o (as Python's %d); returns the end."""
    cdef char tmp[24]
    cdef int i = 0
    cdef uint64_t u = <uint64_t>v
    if v < 0:
        o[0] = b'-'
        o += 1
        u = (~u) + 1
    while True:
        tmp[i] = <char>(48 + u % 10)
        i += 1
        u //= 10
        if u == 0:
            break
    while i:
        i -= 1
        o[0] = tmp[i]
        o += 1
    return o


cdef class JsonChain:
    """The JSON-lines hash chain (agent.audit.chain.Chain.link) applied to queued records in C.

    drain() writes exactly the bytes Chain.link + b"\\n" would, with the GIL released throughout.
    """

    cdef int64_t seq_
    cdef char prev_[64]
    cdef EVP_MD_CTX *ctx
    cdef Buf out  # the chunk of lines being made (with a tee: every chunk written by this drain)
    cdef bint busy

    def __cinit__(self, *args, **kwargs):
        self.ctx = EVP_MD_CTX_new()
        if self.ctx == NULL:
            raise MemoryError()

    def __init__(self, long long seq=0, str prev=GENESIS):
        if len(prev) != 64 or any(c not in "0123456789abcdef" for c in prev):
            raise ValueError("prev must be a SHA-256 digest in lowercase hex")
        self.seq_ = seq
        memcpy(self.prev_, PyBytes_AS_STRING(prev.encode("ascii")), 64)

    def __dealloc__(self):
        EVP_MD_CTX_free(self.ctx)
        free(self.out.data)

    @property
    def seq(self) -> int:
        """The sequence number of the last record linked."""
        return self.seq_

    @property
    def prev(self) -> str:
        """The SHA-256 (hex) of the last line linked."""
        return self.prev_[:64].decode("ascii")

    cdef int _link(self, const char *body, size_t n) noexcept nogil:
        """(room reserved) The chained line of one record, and its newline, at the end of self.out; -1 (and
        nothing changed) when OpenSSL fails."""
        cdef char *line = self.out.data + self.out.len
        cdef char *o = line
        cdef unsigned char digest[32]
        cdef unsigned int dn = 0
        cdef int i
        cdef int64_t seq = <int64_t>(<uint64_t>self.seq_ + 1)
        memcpy(o, b'{"seq":', 7)
        o = fmt_int(o + 7, seq)
        memcpy(o, b',"prev":"', 9)
        memcpy(o + 9, self.prev_, 64)
        o[73] = b'"'
        o += 74
        if n == 2 and body[1] == 0x7D:  # b"{}"
            o[0] = b'}'
            o += 1
        else:
            o[0] = b','
            memcpy(o + 1, body + 1, n - 1)
            o += n
        if (not EVP_DigestInit_ex(self.ctx, SHA256_MD, NULL)
                or not EVP_DigestUpdate(self.ctx, line, <size_t>(o - line))
                or not EVP_DigestFinal_ex(self.ctx, digest, &dn)):
            return -1
        self.seq_ = seq
        for i in range(32):
            self.prev_[2 * i] = HEX[digest[i] >> 4]
            self.prev_[2 * i + 1] = HEX[digest[i] & 15]
        o[0] = b'\n'
        self.out.len = <size_t>(o + 1 - self.out.data)
        return 0

    cdef int _drain(
        self, RecordQueue q, int fd, long long room, bint keep, size_t *n_out, size_t *b_out
    ) noexcept nogil:
        """(q.cmu held, no GIL) The body of drain(): 0 or an errno. With `keep`, the chunks written stay in
        self.out (out.data[:b_out]) for the caller's tee; else each chunk's room is reused."""
        cdef Buf *src = &q.outb
        cdef const char *body
        cdef uint32_t n
        cdef size_t k = 0, kbytes = 0, done = 0, done_bytes = 0
        cdef size_t base = 0  # where the chunk being made starts in self.out
        cdef int err = 0, werr
        cdef bint more, stop = False
        cdef bint again = src.count > 0  # leftovers first, then (once) what the producers queued
        q._refill()
        self.out.len = 0
        while True:
            if again and src.count == 0 and not stop:
                q._refill()
                again = False
            more = src.count > 0 and not stop
            if more:
                memcpy(&n, src.data + src.rd, HEADER)
                if buf_reserve(&self.out, n + LINE_EXTRA):
                    err = ENOMEM  # the record stays queued
                    more = False
                else:
                    buf_next(src, &body)
                    if self._link(body, n):
                        q._consumed(1, n, True)
                        err = EIO
                        more = False
                    else:
                        k += 1
                        kbytes += n
                        stop = room <= 0 or done_bytes + (self.out.len - base) >= <unsigned long long>room
            if k and (not more or stop or self.out.len - base >= CHUNK):
                werr = write_all(fd, self.out.data + base, self.out.len - base)
                q._consumed(k, kbytes, werr != 0)
                if werr:
                    err = werr
                    self.out.len = base  # the tee keeps only what was written
                else:
                    done += k
                    done_bytes += self.out.len - base
                k = kbytes = 0
                if keep:
                    base = self.out.len
                else:
                    self.out.len = 0
            if not more or err:
                break
        if src.count == 0:
            buf_empty(src)
        n_out[0] = done
        b_out[0] = done_bytes
        return err

    def drain(self, RecordQueue queue not None, int fd, long long room, bytearray tee=None) -> tuple:
        """Link and write queued records to fd, oldest first, until the bytes written reach `room` (at
        least one record when any is queued) or the records queued at the call are out (later ones may
        wait for the next call); returns (records, bytes) written. The GIL is released throughout. A
        failed write raises OSError: the records of that chunk are lost and counted in queue.dropped.
        With `tee`, the bytes written are also appended to it (what the audit sinks ship); without, no
        chunk is kept (the cost of a tee is one copy, made here with the GIL held).
        """
        cdef size_t n = 0, b = 0
        cdef int err
        cdef bint keep = tee is not None
        cdef Py_ssize_t at
        if not queue.json_objects:
            raise ValueError("JsonChain.drain needs a queue of JSON objects (json_objects=True)")
        if self.busy:
            raise RuntimeError("JsonChain.drain is already running")
        self.busy = True
        try:
            with nogil:
                pthread_mutex_lock(&queue.cmu)
                err = self._drain(queue, fd, room, keep, &n, &b)
                pthread_mutex_unlock(&queue.cmu)
            if keep and b:
                at = PyByteArray_GET_SIZE(tee)
                PyByteArray_Resize(tee, at + <Py_ssize_t>b)
                memcpy(PyByteArray_AS_STRING(tee) + at, self.out.data, b)
        finally:
            self.busy = False
            self.out.len = 0
            if self.out.cap > SHRINK:
                free(self.out.data)
                self.out.data = NULL
                self.out.cap = 0
        if err:
            raise OSError(err, os.strerror(err))
        return n, b
