# cython: language_level=3, boundscheck=False
"""The HTTP/1.1 parsers, compiled: the same contract as ``http1.RequestParser`` and
``http1.ResponseParser`` (the reference, pure Python on httptools), on llhttp called directly.

Why it exists: on the pure path every llhttp event is a call from C into Python (request line,
each header, head end, body, message end: about 14 per proxied request) and each of those runs a
few dozen bytecodes. Here llhttp's callbacks are C functions: header names are lowercased and
values trimmed in C, the header list and the head are built in C, and Python runs only for what
the target is told (head, body, message end). Everything the pure parsers decide (limits, the
special headers, Host as the authority, h2c offers, HEAD and CONNECT framing, trailers, the raw
bound, errors and their statuses) is decided the same way, in the same order; the codec tests
run against both (``MOORLINE_PURE_PYTHON=1`` selects the pure ones).

llhttp is the copy httptools ships (same version as the pure path's), compiled into this
module by ``scripts/build-native.py``.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint64_t, int32_t
from libc.string cimport memcmp, strlen

from moorline.protocol.headers import HeaderMap
from moorline.protocol.http1_head import (
    _BAD_TE, _BODY_DISALLOWED, _CHUNKED_HEAD, _CODEC_ERROR, _MISSING_HOST, _RESPONSE_LIMITS,
    _TOO_LARGE, _TOO_MANY, _UNDERSCORE, _UPSTREAM_EOF, REJECT_REQUEST, HttpProtocolError, Limits,
    RequestHead, ResponseHead, _keep_alive, find_head_end, llhttp_error,
)


cdef extern from "llhttp.h":
    ctypedef struct llhttp_t:
        int32_t error
        void* data
        uint8_t method
        uint8_t http_major
        uint8_t http_minor
        uint8_t upgrade
        uint16_t status_code

    ctypedef int (*llhttp_data_cb)(llhttp_t*, const char* at, size_t length) noexcept
    ctypedef int (*llhttp_cb)(llhttp_t*) noexcept

    ctypedef struct llhttp_settings_t:
        llhttp_cb on_message_begin
        llhttp_data_cb on_url
        llhttp_data_cb on_header_field
        llhttp_data_cb on_header_value
        llhttp_cb on_headers_complete
        llhttp_data_cb on_body
        llhttp_cb on_message_complete
        llhttp_cb on_chunk_complete

    ctypedef enum llhttp_type_t:
        HTTP_REQUEST
        HTTP_RESPONSE

    ctypedef enum llhttp_errno_t:
        HPE_OK
        HPE_PAUSED_UPGRADE
        HPE_USER

    void llhttp_init(llhttp_t* parser, llhttp_type_t type, const llhttp_settings_t* settings)
    void llhttp_settings_init(llhttp_settings_t* settings)
    llhttp_errno_t llhttp_execute(llhttp_t* parser, const char* data, size_t len)
    int llhttp_should_keep_alive(const llhttp_t* parser)
    void llhttp_resume_after_upgrade(llhttp_t* parser)
    const char* llhttp_get_error_reason(const llhttp_t* parser)
    const char* llhttp_get_error_pos(const llhttp_t* parser)
    const char* llhttp_method_name(uint8_t method)


# Parser states (``_st``), as in http1_head.
cdef enum:
    S_HEAD = 0
    S_BODY = 1
    S_CHUNKED = 2

cdef bytes B11 = b"1.1"
cdef bytes B10 = b"1.0"
cdef bytes B_CONNECT = b"CONNECT"
cdef bytes B_HEAD = b"HEAD"
cdef bytes B_HTTP = b"http"
cdef bytes B_EMPTY = b""
cdef object _new = object.__new__
# llhttp's method names by number (0 DELETE .. 46 QUERY; llhttp_method_name aborts past that).
cdef tuple _METHODS = tuple(llhttp_method_name(i) for i in range(47))

# The heads' fields are written straight into their slots (the offsets of the classes' own
# member descriptors, read once here): a generic setattr per field costs about ten times more.
cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    ctypedef struct PyTypeObject:
        pass
    PyTypeObject PyMemberDescr_Type
    ctypedef struct PyObject:
        pass
    void Py_INCREF(object o)
    void Py_XDECREF(PyObject* o)


cdef Py_ssize_t _slot(type cls, str name) except -1:
    d = getattr(cls, name)
    t = type(d)
    if <PyTypeObject*>t is not &PyMemberDescr_Type:
        raise ImportError(f"{cls.__name__}.{name} is not a slot")
    return (<PyMemberDescrObject*>d).d_member.offset


cdef inline void _put_slot(object obj, Py_ssize_t off, object value):
    cdef PyObject** p = <PyObject**>((<char*><PyObject*>obj) + off)
    cdef PyObject* old = p[0]
    Py_INCREF(value)
    p[0] = <PyObject*>value
    Py_XDECREF(old)


cdef Py_ssize_t RQ_H = _slot(RequestHead, "_h")
cdef Py_ssize_t RQ_METHOD = _slot(RequestHead, "method")
cdef Py_ssize_t RQ_TARGET = _slot(RequestHead, "target")
cdef Py_ssize_t RQ_PATH = _slot(RequestHead, "path")
cdef Py_ssize_t RQ_AUTHORITY = _slot(RequestHead, "authority")
cdef Py_ssize_t RQ_SCHEME = _slot(RequestHead, "scheme")
cdef Py_ssize_t RQ_VERSION = _slot(RequestHead, "version")
cdef Py_ssize_t RQ_KEEP_ALIVE = _slot(RequestHead, "keep_alive")
cdef Py_ssize_t RQ_CONTENT_LENGTH = _slot(RequestHead, "content_length")
cdef Py_ssize_t RQ_CHUNKED = _slot(RequestHead, "chunked")
cdef Py_ssize_t RQ_UPGRADE = _slot(RequestHead, "upgrade")
cdef Py_ssize_t RQ_EXPECT = _slot(RequestHead, "expect_continue")
cdef Py_ssize_t RQ_HEADER_BYTES = _slot(RequestHead, "header_bytes")
cdef Py_ssize_t RS_H = _slot(ResponseHead, "_h")
cdef Py_ssize_t RS_STATUS = _slot(ResponseHead, "status")
cdef Py_ssize_t RS_VERSION = _slot(ResponseHead, "version")
cdef Py_ssize_t RS_KEEP_ALIVE = _slot(ResponseHead, "keep_alive")
cdef Py_ssize_t RS_CONTENT_LENGTH = _slot(ResponseHead, "content_length")
cdef Py_ssize_t RS_CHUNKED = _slot(ResponseHead, "chunked")
cdef Py_ssize_t RS_UPGRADE = _slot(ResponseHead, "upgrade")
cdef Py_ssize_t RS_HEADER_BYTES = _slot(ResponseHead, "header_bytes")

cdef llhttp_settings_t REQ_SETTINGS
cdef llhttp_settings_t RESP_SETTINGS


cdef inline bytes _lower(const char* at, size_t n):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef char* o = PyBytes_AS_STRING(out)
    cdef size_t i
    cdef char c
    for i in range(n):
        c = at[i]
        o[i] = c + 32 if 65 <= c <= 90 else c
    return out


cdef inline bytes _rstrip(bytes v):
    """Trailing spaces and tabs off (llhttp drops the leading ones)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(v)
    cdef const char* p = PyBytes_AS_STRING(v)
    cdef Py_ssize_t m = n
    while m and (p[m - 1] == 32 or p[m - 1] == 9):
        m -= 1
    return v if m == n else PyBytes_FromStringAndSize(p, m)


cdef inline bint _ends_crlf2(data):
    if type(data) is bytes:
        return PyBytes_GET_SIZE(data) >= 4 and memcmp(PyBytes_AS_STRING(data) + PyBytes_GET_SIZE(data) - 4, b"\r\n\r\n", 4) == 0
    return data.endswith(b"\r\n\r\n")


# Special names, matched by length first: C comparisons, no hashing.
cdef inline int _is(bytes name, const char* lit):
    """``name == lit`` for a C literal (its strlen folds to a constant)."""
    cdef Py_ssize_t n = strlen(lit)
    return PyBytes_GET_SIZE(name) == n and memcmp(PyBytes_AS_STRING(name), lit, n) == 0


cdef class _Parser:
    cdef llhttp_t _c
    cdef object _t
    cdef int _bad
    cdef Py_ssize_t _max_bytes, _max_n, _raw_max, _raw, _hsize, _trsize
    cdef int _st
    cdef bint _dead, _upgrade, _chunked
    cdef bint _busy  # inside llhttp_execute (``_exec``): a feed from a callback is refused
    cdef object _error, _cl, _tr, _h, _exc
    cdef object _fname, _fval  # the header line being read: name (lowercased), value

    def __init__(self, target, limits, int bad_status):
        self._t = target
        self._bad = bad_status
        self._max_bytes = limits.max_header_bytes
        self._max_n = limits.max_headers
        self._raw_max = 2 * limits.max_header_bytes + 4 * limits.max_headers + 4096
        self._raw = 0
        self._st = S_HEAD
        self._dead = False
        self._error = None
        self._upgrade = False
        self._h = []
        self._hsize = 0
        self._cl = None
        self._chunked = False
        self._tr = None
        self._trsize = 0
        self._exc = None
        self._fname = None
        self._fval = None
        self._busy = False

    # -- feeding ------------------------------------------------------------------------------
    cdef object _feed(self, data):
        """Feed ``data`` (bytes or memoryview) under the raw bound."""
        cdef Py_ssize_t raw
        if self._st != S_BODY:
            raw = self._raw + len(data)
            if raw > self._raw_max:
                return self._feed_bounded(data)
            self._raw = raw
        cdef Py_ssize_t off = self._exec(data)
        if off >= 0:
            return self._upgraded(data, off)
        return None

    cdef Py_ssize_t _exec(self, data) except -2:
        """Run llhttp over ``data``: -1 when all was parsed, else the offset after the head of
        an upgrade; raises the protocol error (or a target's own exception)."""
        cdef Py_buffer buf
        cdef llhttp_errno_t err
        cdef const char* base
        cdef Py_ssize_t n
        if type(data) is bytes:
            base = PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
            self._busy = True
            err = llhttp_execute(&self._c, base, n)
            self._busy = False
        else:
            PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
            base = <const char*>buf.buf
            self._busy = True
            err = llhttp_execute(&self._c, base, buf.len)
            self._busy = False
            PyBuffer_Release(&buf)
        if err == HPE_OK:
            return -1
        if err == HPE_PAUSED_UPGRADE and self._c.upgrade:
            n = llhttp_get_error_pos(&self._c) - base
            llhttp_resume_after_upgrade(&self._c)
            return n
        raise self._fail()

    cdef object _fail(self):
        exc = self._exc
        self._exc = None
        if self._error is not None:  # raised by our own callbacks
            return self._error
        if exc is not None:
            # The target raised: a bug upstairs, not the peer's fault. Keep the parser dead and
            # let the original exception through.
            self._dead = True
            self._error = HttpProtocolError(500, "http1.callback_error")
            raise exc
        cdef const char* r = llhttp_get_error_reason(&self._c)
        reason = r.decode("latin-1") if r != NULL else ""
        status, detail = llhttp_error(reason, self._bad)
        return self._die(status, detail)

    cdef object _feed_bounded(self, data):
        cdef object mv = memoryview(data)
        cdef Py_ssize_t room, off
        while len(mv):
            if self._st == S_BODY:
                return self._feed(mv)
            room = self._raw_max - self._raw
            if len(mv) <= room:
                return self._feed(mv)
            if room <= 0:
                raise self._die(431 if self._bad == 400 else self._bad, _TOO_LARGE)
            self._raw = self._raw_max
            piece = mv[:room]
            off = self._exec(piece)
            if off >= 0:
                left = self._upgraded(piece, off)
                if left is None:  # not a tunnel after all (h2c offer): parse on
                    return self.feed(bytes(mv[room:])) if len(mv) > room else None
                return left + bytes(mv[room:])
            if self._raw >= self._raw_max:
                raise self._die(431 if self._bad == 400 else self._bad, _TOO_LARGE)
            mv = mv[room:]
        return None

    cdef object _upgraded(self, data, Py_ssize_t offset):
        self._dead = True
        return bytes(data[offset:])

    def feed(self, data):
        raise NotImplementedError

    cdef int _reentered(self) except -1:
        # A target fed the parser from one of its callbacks, in the middle of llhttp_execute:
        # llhttp would go on with span pointers into the inner call's buffer (a negative size or
        # a read of unrelated memory). A bug in the target, refused before any state changes.
        raise RuntimeError("HTTP/1.1 parser fed from inside one of its own callbacks")

    cdef void _target_failed(self):
        """A target callback run outside llhttp raised: dead, as after one run inside it."""
        self._dead = True
        self._error = HttpProtocolError(500, "http1.callback_error")

    # (The target's methods are looked up at each call: bound once they would cost three method
    # objects per connection, ~0.2 KiB on an idle one, to save ~400 instructions per request.)
    cdef inline object _body(self, data):
        return self._t.on_body(data)

    cdef inline object _done(self, trailers):
        return self._t.on_message_complete(trailers)

    cdef object _die(self, int status, str detail):
        err = HttpProtocolError(status, detail)
        self._error = err
        self._dead = True
        return err

    cdef object _after_death(self, data):
        if self._error is not None:
            raise self._error
        return bytes(data)  # tunnel: everything is payload

    cdef int _too_large(self, Py_ssize_t size) except -1:
        cdef int bad = 431 if self._bad == 400 else self._bad
        if size > self._max_bytes:
            raise self._die(bad, _TOO_LARGE)
        raise self._die(bad, _TOO_MANY)

    cdef int _trailer(self, bytes name, bytes value) except -1:
        tr = self._tr
        if tr is None:
            tr = self._tr = []
        tr.append((name, value))
        cdef Py_ssize_t size = self._trsize + len(name) + len(value)
        self._trsize = size
        if size > self._max_bytes or len(tr) > self._max_n:
            self._too_large(size)
        return 0

    cdef int _content_length(self, bytes value) except -1:
        if not value.isdigit():
            raise self._die(self._bad, _CODEC_ERROR)
        n = int(value)
        if self._cl is not None and self._cl != n:
            raise self._die(self._bad, _CODEC_ERROR)
        self._cl = n
        return 0

    cdef int _transfer_encoding(self, bytes value) except -1:
        if self._chunked or value.lower() != b"chunked":
            raise self._die(501 if self._bad == 400 else self._bad, _BAD_TE)
        self._chunked = True
        return 0

    # -- events (called from the llhttp callbacks below) ---------------------------------------
    # A header line is acted on when the next name starts, or at the end of the head (or of a
    # chunk): the moments httptools reports it, so that both backends fail the same way when
    # llhttp refuses the bytes right after a value.
    cdef int _on_field(self, const char* at, size_t n) except -1:
        if self._fval is not None:
            self._flush()
        piece = _lower(at, n)
        self._fname = piece if self._fname is None else self._fname + piece
        return 0

    cdef int _on_value(self, const char* at, size_t n) except -1:
        piece = PyBytes_FromStringAndSize(at, n)
        self._fval = piece if self._fval is None else self._fval + piece
        return 0

    cdef int _flush(self) except -1:
        name = self._fname
        value = self._fval
        self._fname = self._fval = None
        if value is None or name is None:
            return 0
        return self._header(name, _rstrip(value))

    cdef int _on_chunk_complete(self) except -1:
        if self._fval is not None:
            self._flush()
        self._raw = 0
        return 0

    cdef int _header(self, bytes name, bytes value) except -1:
        return 0

    cdef int _on_headers_complete(self) except -1:
        return 0

    cdef int _on_body(self, const char* at, size_t n) except -1:
        self._raw -= n
        self._body(PyBytes_FromStringAndSize(at, n))
        return 0

    cdef int _on_message_complete(self) except -1:
        return 0

    cdef int _on_url(self, const char* at, size_t n) except -1:
        return 0

    cdef int _on_message_begin(self) except -1:
        return 0


# -- llhttp callbacks: C functions; an exception is kept on the parser for ``_exec`` ----------
cdef enum:
    EV_URL
    EV_FIELD
    EV_VALUE
    EV_BODY
    EV_BEGIN
    EV_HEADERS
    EV_CHUNK
    EV_DONE


cdef int _span(llhttp_t* c, int ev, const char* at, size_t n) noexcept:
    """One span event (URL, header name or value piece, body) to the parser."""
    cdef _Parser p = <_Parser>c.data
    try:
        if ev == EV_URL:
            p._on_url(at, n)
        elif ev == EV_FIELD:
            p._on_field(at, n)
        elif ev == EV_VALUE:
            p._on_value(at, n)
        else:
            p._on_body(at, n)
    except BaseException as e:
        p._exc = e
        return HPE_USER
    return 0


cdef int _event(llhttp_t* c, int ev) noexcept:
    """One point event to the parser. At the end of the head, the last header line is acted on
    first, and ``1`` tells llhttp that an upgrade has no body to parse (as httptools does)."""
    cdef _Parser p = <_Parser>c.data
    try:
        if ev == EV_HEADERS:
            if p._fval is not None:
                p._flush()
            p._on_headers_complete()
            return 1 if c.upgrade else 0
        if ev == EV_DONE:
            p._on_message_complete()
        elif ev == EV_CHUNK:
            p._on_chunk_complete()
        else:
            p._on_message_begin()
    except BaseException as e:
        p._exc = e
        return -1
    return 0


# The callbacks llhttp calls (C function pointers, one per event).
cdef int _cb_url(llhttp_t* c, const char* at, size_t n) noexcept:
    return _span(c, EV_URL, at, n)


cdef int _cb_field(llhttp_t* c, const char* at, size_t n) noexcept:
    return _span(c, EV_FIELD, at, n)


cdef int _cb_value(llhttp_t* c, const char* at, size_t n) noexcept:
    return _span(c, EV_VALUE, at, n)


cdef int _cb_body(llhttp_t* c, const char* at, size_t n) noexcept:
    return _span(c, EV_BODY, at, n)


cdef int _cb_headers_complete(llhttp_t* c) noexcept:
    return _event(c, EV_HEADERS)


cdef int _cb_message_complete(llhttp_t* c) noexcept:
    return _event(c, EV_DONE)


cdef int _cb_chunk_complete(llhttp_t* c) noexcept:
    return _event(c, EV_CHUNK)


cdef int _cb_message_begin(llhttp_t* c) noexcept:
    return _event(c, EV_BEGIN)


llhttp_settings_init(&REQ_SETTINGS)
REQ_SETTINGS.on_url = _cb_url
REQ_SETTINGS.on_header_field = _cb_field
REQ_SETTINGS.on_header_value = _cb_value
REQ_SETTINGS.on_headers_complete = _cb_headers_complete
REQ_SETTINGS.on_body = _cb_body
REQ_SETTINGS.on_message_complete = _cb_message_complete
REQ_SETTINGS.on_chunk_complete = _cb_chunk_complete

llhttp_settings_init(&RESP_SETTINGS)
RESP_SETTINGS.on_message_begin = _cb_message_begin
RESP_SETTINGS.on_header_field = _cb_field
RESP_SETTINGS.on_header_value = _cb_value
RESP_SETTINGS.on_headers_complete = _cb_headers_complete
RESP_SETTINGS.on_body = _cb_body
RESP_SETTINGS.on_message_complete = _cb_message_complete
RESP_SETTINGS.on_chunk_complete = _cb_chunk_complete


cdef class RequestParser(_Parser):
    """Parses requests (downstream side): ``http1.RequestParser``'s contract."""

    cdef bint _boundary, _expect, _h2c, _h2c_chunked, _h2c_pending, _hide, _fresh
    cdef Py_ssize_t _h2c_body
    cdef object _host, _url
    cdef int _underscores

    def __init__(self, target, limits=None):
        if limits is None:
            limits = Limits()
        _Parser.__init__(self, target, limits, 400)
        self._underscores = limits.headers_with_underscores
        self._url = B_EMPTY
        self._host = None
        self._expect = False
        self._h2c = False
        self._h2c_pending = False
        self._h2c_chunked = False
        self._boundary = False
        self._hide = False
        self._h = None  # made per request, at its request line (an idle connection holds none)
        self._h2c_body = 0
        self._reset()

    cdef void _reset(self):
        llhttp_init(&self._c, HTTP_REQUEST, &REQ_SETTINGS)
        self._c.data = <void*>self
        self._fresh = False

    cdef object _upgraded(self, data, Py_ssize_t offset):
        if not self._h2c_pending:
            self._dead = True
            return bytes(data[offset:])
        self._h2c_pending = False
        self._upgrade = False
        self._reset()
        if self._h2c_chunked:
            # llhttp stopped at the head of the offer, before its chunked body: the fresh parser
            # is given a made-up head that frames the rest as a chunked body, with the head's
            # own events hidden (``_hide``).
            self._h2c_chunked = False
            self._st = S_CHUNKED  # (llhttp reported the message complete at its head)
            self._hide = True
            try:
                self._exec(_CHUNKED_HEAD)
            finally:
                self._hide = False
            return self._feed(data[offset:]) if len(data) > offset else None
        return self._h2c_feed(data[offset:])

    cdef object _h2c_feed(self, data):
        cdef Py_ssize_t n = self._h2c_body
        if n:
            take = data[:n]
            try:  # (the target's calls run outside llhttp here)
                if len(take):
                    self._body(bytes(take))
                n = self._h2c_body = n - len(take)
                data = data[len(take):]
                if n:
                    return None
                self._st = S_HEAD
                self._done(None)
            except BaseException:
                self._target_failed()
                raise
        return self._feed(data) if len(data) else None

    @property
    def head_pending(self):
        """Part of a request head has arrived (request line or header bytes), not all of it."""
        return self._st == S_HEAD and bool(self._url or self._h)

    def feed(self, data):
        """Parse ``data``; returns the bytes after the head of an upgrade/CONNECT, else None."""
        if self._busy:
            self._reentered()
        if self._dead:
            return self._after_death(data)
        if self._h2c_body:
            return self._h2c_feed(data)
        if self._fresh:
            self._reset()
        self._boundary = False
        left = self._feed(data)
        if self._boundary and not _ends_crlf2(data):
            self._boundary = False
        return left

    @property
    def released(self):
        """``release`` reset llhttp's state and no feed has come since."""
        return self._fresh

    def release(self):
        """As ``http1.RequestParser.release``: at a provably clean boundary, forget llhttp's
        state (here it is part of this object, so nothing is freed; the next feed starts a
        fresh llhttp state). Returns whether it was released."""
        if (
            self._boundary
            and self._st == S_HEAD
            and not self._dead
            and not self._h2c_body
            and not self._h
            and not self._url
            and self._tr is None
        ):
            self._fresh = True
            return True
        return False

    # -- events -------------------------------------------------------------------------------
    cdef int _on_url(self, const char* at, size_t n) except -1:
        if self._hide:
            return 0
        self._boundary = False
        if self._h is None:
            self._h = []
        u = self._url = self._url + PyBytes_FromStringAndSize(at, n) if self._url else PyBytes_FromStringAndSize(at, n)
        self._hsize += n
        if len(u) > self._max_bytes:
            raise self._die(431, _TOO_LARGE)
        return 0

    cdef int _header(self, bytes name, bytes value) except -1:
        if self._hide:
            return 0
        if self._st:
            if self._underscores and b"_" in name and self._drop_underscore():
                return 0
            return self._trailer(name, value)
        cdef Py_ssize_t size = self._hsize + len(name) + len(value)
        self._hsize = size
        if self._underscores and b"_" in name and self._drop_underscore():
            if size > self._max_bytes:
                self._too_large(size)
            return 0
        if _is(name, b"host"):
            if self._host is not None:  # RFC 9112 3.2: more than one Host -> 400
                raise self._die(400, _CODEC_ERROR)
            self._host = value
            if size > self._max_bytes:
                self._too_large(size)
            return 0
        if _is(name, b"content-length"):
            self._content_length(value)
        elif _is(name, b"transfer-encoding"):
            self._transfer_encoding(value)
        elif _is(name, b"upgrade"):
            self._h2c = value.strip().lower() == b"h2c"
        elif _is(name, b"expect") and value.lower() == b"100-continue":
            self._expect = True
        h = self._h
        h.append((name, value))
        if size > self._max_bytes or len(h) > self._max_n:
            self._too_large(size)
        return 0

    cdef bint _drop_underscore(self) except -1:
        if self._underscores == REJECT_REQUEST:
            raise self._die(400, _UNDERSCORE)
        return True

    cdef int _on_headers_complete(self) except -1:
        if self._hide:
            return 0
        cdef llhttp_t* c = &self._c
        cdef bytes ver
        if c.http_major == 1 and c.http_minor == 1:
            ver = B11
        elif c.http_major == 1 and c.http_minor == 0:
            ver = B10
        else:
            # "GET /" (HTTP/0.9) is malformed for us; "HTTP/2.0" is a version we do not speak.
            raise self._die(400 if (c.http_major == 0 and c.http_minor == 9) else 505, _CODEC_ERROR)
        cdef bytes method = <bytes>_METHODS[c.method] if c.method < 47 else b"<unknown>"
        url = self._url
        cdef bint upgrade = c.upgrade != 0
        cdef bint connect = method == B_CONNECT
        if connect:
            if self._chunked:
                raise self._die(501, _BAD_TE)
            if self._cl:
                raise self._die(400, _BODY_DISALLOWED)
        elif self._host is None and ver is B11 and (url[:1] == b"/" or url == b"*"):
            raise self._die(400, _MISSING_HOST)
        host = self._host
        if upgrade and self._h2c and not connect:
            upgrade = False
            self._h2c_pending = True
            self._h2c_body = self._cl or 0
            self._h2c_chunked = self._chunked
        h = self._h
        if h is None:
            h = []
        if host is not None and len(h) >= self._max_n:  # Host counts as one of the headers
            raise self._die(431, _TOO_MANY)
        head = _new(RequestHead)
        _put_slot(head, RQ_H, h)
        _put_slot(head, RQ_METHOD, method)
        _put_slot(head, RQ_TARGET, url)
        _put_slot(head, RQ_PATH, url)
        _put_slot(head, RQ_AUTHORITY, B_EMPTY if host is None else host)
        _put_slot(head, RQ_SCHEME, B_HTTP)
        _put_slot(head, RQ_VERSION, ver)
        _put_slot(head, RQ_KEEP_ALIVE, llhttp_should_keep_alive(c) != 0)
        _put_slot(head, RQ_CONTENT_LENGTH, self._cl)
        cdef bint chunked = self._chunked
        _put_slot(head, RQ_CHUNKED, chunked)
        _put_slot(head, RQ_UPGRADE, upgrade)
        _put_slot(head, RQ_EXPECT, self._expect and ver is B11)
        _put_slot(head, RQ_HEADER_BYTES, self._hsize + len(method) + 14 + 4 * (len(h) if host is None else len(h) + 1))
        self._st = S_CHUNKED if chunked else S_BODY
        self._raw = 0
        self._upgrade = upgrade or self._h2c_body > 0 or self._h2c_chunked
        self._h = None
        self._hsize = 0
        self._url = B_EMPTY
        self._cl = None
        self._host = None
        self._chunked = self._expect = self._h2c = False
        self._t.on_request_head(head)
        return 0

    cdef int _on_message_complete(self) except -1:
        self._st = S_HEAD
        self._raw = 0
        if self._upgrade:
            return 0  # the tunnel is the body; llhttp stops right after this
        tr = self._tr
        if tr is None:
            self._done(None)
        else:
            self._tr = None
            self._trsize = 0
            self._done(HeaderMap.wrap(tr))
        self._boundary = True
        return 0


cdef class ResponseParser(_Parser):
    """Parses responses (upstream side): ``http1.ResponseParser``'s contract."""

    cdef bint _connect_2xx, _eof_body, _forced
    cdef public bint message_open
    cdef int _scan, _tail, _status
    cdef object _connection

    def __init__(self, target, limits=None):
        _Parser.__init__(self, target, limits or _RESPONSE_LIMITS, 502)
        self._status = 0
        self.message_open = False
        self._eof_body = False
        self._scan = 0
        self._tail = 0
        self._forced = False
        self._connect_2xx = False
        self._connection = B_EMPTY
        self._reset()

    cdef void _reset(self):
        llhttp_init(&self._c, HTTP_RESPONSE, &RESP_SETTINGS)
        self._c.data = <void*>self

    def expect(self, method):
        """Name the method of the request whose response comes next."""
        if method == B_HEAD:
            self._scan = 1
        elif method == B_CONNECT:
            self._scan = 2
        else:
            self._scan = 0
            return
        self._tail = 0

    def feed(self, data):
        """Parse ``data``; returns the bytes after a 101 / CONNECT 2xx head, else None."""
        if self._busy:
            self._reentered()
        if self._dead:
            return self._after_death(data)
        if self._scan:
            return self._feed_scan(data)
        return self._feed(data)

    def feed_eof(self):
        """The upstream closed its side: finish a read-until-close body, or fail."""
        if self._dead:
            if self._error is not None:
                raise self._error
            return
        if not self.message_open:
            return
        if self._st == S_BODY and self._eof_body:
            self.message_open = False
            self._dead = True
            self._error = HttpProtocolError(502, _UPSTREAM_EOF)  # nothing may follow EOF
            self._done(None)
            return
        raise self._die(502, _UPSTREAM_EOF)

    # -- HEAD / CONNECT framing (as in http1.ResponseParser) ----------------------------------
    cdef object _feed_scan(self, data):
        cdef Py_ssize_t end
        data = bytes(data)
        while data:
            if not self._scan:
                return self._feed(data)
            end, self._tail = find_head_end(self._tail, data)
            if end < 0:
                return self._feed(data)
            piece, data = data[:end], data[end:]
            left = self._feed(piece)
            if left is not None:  # 101 inside the piece
                return left + data
            if self._connect_2xx:
                self._dead = True
                return data
            if self._forced:
                self._forced = False
                self._scan = 0
                if self.message_open:  # llhttp waits for a body that HEAD answers never carry
                    self.message_open = False
                    self._st = S_HEAD
                    self._raw = 0
                    tr = self._tr  # always None: no body, no trailers
                    self._tr = None
                    self._reset()
                    try:
                        self._done(tr)
                    except BaseException:
                        self._target_failed()
                        raise
        return None

    # -- events -------------------------------------------------------------------------------
    cdef int _on_message_begin(self) except -1:
        self.message_open = True
        return 0

    cdef int _header(self, bytes name, bytes value) except -1:
        if self._st:
            return self._trailer(name, value)
        self._hsize += len(name) + len(value)  # checked at the end of the head
        if _is(name, b"content-length"):
            self._content_length(value)
        elif _is(name, b"transfer-encoding"):
            self._transfer_encoding(value)
            return 0
        elif _is(name, b"connection"):
            self._connection = self._connection + b"," + value if self._connection else value
            return 0
        elif _is(name, b"keep-alive") or _is(name, b"proxy-connection"):
            return 0
        h = self._h
        h.append((name, value))
        if len(h) > self._max_n:
            self._too_large(self._hsize)
        return 0

    cdef int _on_headers_complete(self) except -1:
        cdef llhttp_t* c = &self._c
        cdef bytes ver
        if c.http_major == 1 and c.http_minor == 1:
            ver = B11
        elif c.http_major == 1 and c.http_minor == 0:
            ver = B10
        else:
            raise self._die(502, _CODEC_ERROR)
        if self._hsize > self._max_bytes:
            self._too_large(self._hsize)
        cdef int status = c.status_code
        h = self._h
        cdef int scan = self._scan
        cdef bint upgrade = status == 101 and c.upgrade != 0
        cdef bint keep_alive
        if scan and status >= 200:
            keep_alive = _keep_alive(ver, self._connection)
            if scan == 1:
                self._forced = True
            elif status < 300:
                self._connect_2xx = upgrade = True
                keep_alive = False
            else:
                self._scan = 0  # a refused CONNECT is an ordinary response with a body
                keep_alive = llhttp_should_keep_alive(c) != 0
        else:
            keep_alive = llhttp_should_keep_alive(c) != 0
        cdef bint chunked = self._chunked
        cl = self._cl
        if (status < 200 or status == 204) and status != 101:
            if chunked or (cl is not None and cl != 0):
                raise self._die(502, "http1.content_length_not_allowed")
            if cl == 0:
                h[:] = [p for p in h if p[0] != b"content-length"]
                cl = None
        head = _new(ResponseHead)
        _put_slot(head, RS_H, h)
        _put_slot(head, RS_STATUS, status)
        _put_slot(head, RS_VERSION, ver)
        _put_slot(head, RS_KEEP_ALIVE, keep_alive)
        _put_slot(head, RS_CONTENT_LENGTH, cl)
        _put_slot(head, RS_CHUNKED, chunked)
        _put_slot(head, RS_UPGRADE, upgrade)
        _put_slot(head, RS_HEADER_BYTES, self._hsize + 17 + 4 * len(h))
        if status < 200 or status == 204 or status == 304 or self._forced:
            self._st = S_HEAD
            self._eof_body = False
        else:
            self._st = S_CHUNKED if chunked else S_BODY
            self._eof_body = not chunked and cl is None
        self._raw = 0
        self._status = status
        self._h = []
        self._hsize = 0
        self._cl = None
        self._chunked = False
        self._connection = B_EMPTY
        self._t.on_response_head(head)
        return 0

    cdef int _on_message_complete(self) except -1:
        self._st = S_HEAD
        self._raw = 0
        if self._status < 200 or self._connect_2xx:
            return 0
        self.message_open = False
        tr = self._tr
        if tr is None:
            self._done(None)
            return 0
        self._tr = None
        self._trsize = 0
        self._done(HeaderMap.wrap(tr))
        return 0


# -- encoders: ``http1.encode_request_head_fields`` / ``encode_response_fields``, in C --------
from libc.string cimport memcpy
from libc.stdlib cimport malloc, free

cdef enum:
    HAS_CONTENT_LENGTH = 1
    HAS_DATE = 2
    HAS_SERVER = 4


cdef inline char* _put(char* o, object b):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(o, PyBytes_AS_STRING(b), n)
    return o + n


cdef inline char* _put_lit(char* o, const char* s, Py_ssize_t n):
    memcpy(o, s, n)
    return o + n


cdef inline tuple _pair(object item):
    """``item`` as a (name, value) tuple of bytes (what the codecs and HeaderMap hold)."""
    if type(item) is not tuple or len(<tuple>item) != 2:
        k, v = item
        item = (k, v)
    if not PyBytes_Check((<tuple>item)[0]) or not PyBytes_Check((<tuple>item)[1]):
        raise TypeError("header names and values must be bytes")
    return <tuple>item


cdef list _pairs(list fields):
    """``fields`` itself when every item is a (bytes, bytes) tuple (always, from moorline's own
    header maps), else a checked copy."""
    for item in fields:
        if (type(item) is not tuple or len(<tuple>item) != 2 or type((<tuple>item)[0]) is not bytes
                or type((<tuple>item)[1]) is not bytes):
            return [_pair(x) for x in fields]
    return fields


def encode_request_head_fields(bytes method, bytes path, bytes authority, list fields, bint body_follows):
    cdef list pairs = _pairs(fields)
    cdef Py_ssize_t n = len(pairs), i
    cdef Py_ssize_t total = PyBytes_GET_SIZE(method) + PyBytes_GET_SIZE(path) + 10  # SP, SP HTTP/1.1
    cdef bint has_len = False, upgrade = False
    cdef unsigned char small[64]
    cdef unsigned char* skip = &small[0]
    cdef Py_ssize_t ln
    if n > 64:
        skip = <unsigned char*>malloc(n)
    if skip == NULL:
        raise MemoryError()
    try:
        if PyBytes_GET_SIZE(authority):
            total += 8 + PyBytes_GET_SIZE(authority)
        for i in range(n):
            item = pairs[i]
            k = (<tuple>item)[0]
            v = (<tuple>item)[1]
            ln = PyBytes_GET_SIZE(k)
            skip[i] = 0
            if _is(k, b"transfer-encoding"):
                skip[i] = 1
                continue
            if _is(k, b"content-length"):
                has_len = True
            elif _is(k, b"upgrade"):
                upgrade = True
            total += 4 + ln + PyBytes_GET_SIZE(v)
        chunked = body_follows and not has_len and not upgrade and method != B_CONNECT
        total += 32 if chunked else 4
        out = PyBytes_FromStringAndSize(NULL, total)
        o = PyBytes_AS_STRING(out)
        o = _put(o, method)
        o = _put_lit(o, b" ", 1)
        o = _put(o, path)
        o = _put_lit(o, b" HTTP/1.1", 9)
        if PyBytes_GET_SIZE(authority):
            o = _put_lit(o, b"\r\nhost: ", 8)
            o = _put(o, authority)
        for i in range(n):
            if skip[i]:
                continue
            item = pairs[i]
            o = _put_lit(o, b"\r\n", 2)
            o = _put(o, (<tuple>item)[0])
            o = _put_lit(o, b": ", 2)
            o = _put(o, (<tuple>item)[1])
        if chunked:
            o = _put_lit(o, b"\r\ntransfer-encoding: chunked\r\n\r\n", 32)
        else:
            o = _put_lit(o, b"\r\n\r\n", 4)
        if o != PyBytes_AS_STRING(out) + total:
            raise SystemError("request head size miscounted")
        return out, chunked
    finally:
        if skip != &small[0]:
            free(skip)


def encode_response_fields(list fields, bint keep_server):
    cdef list pairs = _pairs(fields)
    cdef Py_ssize_t n = len(pairs), i, ln
    cdef Py_ssize_t total = 0
    cdef int seen = 0
    cdef unsigned char small[64]
    cdef unsigned char* skip = &small[0]
    if n > 64:
        skip = <unsigned char*>malloc(n)
    if skip == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            item = pairs[i]
            k = (<tuple>item)[0]
            ln = PyBytes_GET_SIZE(k)
            skip[i] = 0
            if (
                _is(k, b"connection")
                or _is(k, b"keep-alive")
                or _is(k, b"proxy-connection")
                or _is(k, b"transfer-encoding")
                or _is(k, b"upgrade")
            ):
                skip[i] = 1
            elif _is(k, b"content-length"):
                seen |= HAS_CONTENT_LENGTH
            elif _is(k, b"date"):
                seen |= HAS_DATE
            elif _is(k, b"server"):
                if keep_server:
                    seen |= HAS_SERVER
                else:
                    skip[i] = 1
            if not skip[i]:
                total += 4 + ln + PyBytes_GET_SIZE((<tuple>item)[1])
        out = PyBytes_FromStringAndSize(NULL, total)
        o = PyBytes_AS_STRING(out)
        for i in range(n):
            if skip[i]:
                continue
            item = pairs[i]
            o = _put(o, (<tuple>item)[0])
            o = _put_lit(o, b": ", 2)
            o = _put(o, (<tuple>item)[1])
            o = _put_lit(o, b"\r\n", 2)
        if o != PyBytes_AS_STRING(out) + total:
            raise SystemError("response fields size miscounted")
        return out, seen
    finally:
        if skip != &small[0]:
            free(skip)
