# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The HTTP/2 codec on libnghttp2 (Debian's ``libnghttp2``, the C library behind curl, Apache
httpd and nghttpx), called directly from Cython.

``NgCodec`` has the contract of ``moorline.protocol.http2.Http2Codec`` (the pure-Python ``h2``
backend, which is the reference): the same methods, event tuples, flow-control rules and
``Http2Error``s naming the same Envoy ``http2.*`` stats. ``moorline.protocol.http2_backends``
picks this one when it is built; ``MOORLINE_HTTP2_BACKEND=h2`` forces the reference.

How it maps onto nghttp2 (sans-IO: ``mem_recv`` / ``mem_send``, no socket):

- ``receive(data)``: one ``nghttp2_session_mem_recv`` call; the callbacks append event tuples
  (header lists are built in C, one ``(name, value)`` tuple of bytes per field); then one
  ``mem_send`` pass collects whatever the input caused (SETTINGS ACK, WINDOW_UPDATE, PING ACK,
  DATA the new window lets out) into one output buffer, which ``data_to_send()`` returns with
  the frames the glue submitted meanwhile: one write per batch.
- Inbound flow control: automatic window updates are off; ``ack(sid, n)`` is
  ``nghttp2_session_consume``, so a paused reader stops the window (padding and DATA on closed
  streams are consumed by nghttp2 itself).
- Outbound DATA: each stream with a body gets a data provider reading from a queue of the
  glue's bytes objects (``pending(sid)`` is what is still queued); nghttp2 frames it to the
  peer's windows and frame size, in C. An empty queue defers the provider; ``send_data`` resumes
  it. Trailers are submitted from the provider once the queue is drained.
- Protections: nghttp2's own (frame and HPACK validation, HTTP messaging rules, SETTINGS and
  PING ACK floods (``max_outbound_ack``), CONTINUATION floods (``max_continuations``), the RST
  rate limit (Debian's backport), max concurrent streams) plus the ones the h2 backend has:
  premature (rapid) resets, empty DATA frames, PRIORITY and WINDOW_UPDATE floods, outbound
  control and outbound frames counted from ``on_frame_send`` until ``flushed()``, and a header
  list size limit per stream: a stream whose header block decodes past ``max_header_list_size``
  is reset alone (RST_STREAM, an ``OVERSIZED`` event), the connection and its HPACK state go on.
"""

from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from moorline.protocol.http2 import MAX_ENCODER_TABLE, Http2Error, Http2Options


cdef extern from "nghttp2/nghttp2.h":
    ctypedef long ssize_t
    ctypedef struct nghttp2_session:
        pass
    ctypedef struct nghttp2_option:
        pass
    ctypedef struct nghttp2_session_callbacks:
        pass
    ctypedef struct nghttp2_stream:
        pass

    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags

    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags

    ctypedef struct nghttp2_headers:
        nghttp2_frame_hd hd
        int cat

    ctypedef struct nghttp2_rst_stream:
        nghttp2_frame_hd hd
        uint32_t error_code

    ctypedef struct nghttp2_goaway:
        nghttp2_frame_hd hd
        int32_t last_stream_id
        uint32_t error_code

    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers
        nghttp2_rst_stream rst_stream
        nghttp2_goaway goaway

    ctypedef union nghttp2_data_source:
        int fd
        void *ptr

    ctypedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *, nghttp2_data_source *, void *)

    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        nghttp2_data_source_read_callback read_callback

    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value

    ctypedef int (*on_frame_cb)(nghttp2_session *, const nghttp2_frame *, void *)
    ctypedef int (*on_data_chunk_cb)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *)
    ctypedef int (*on_stream_close_cb)(nghttp2_session *, int32_t, uint32_t, void *)
    ctypedef int (*on_header_cb)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,
                                 const uint8_t *, size_t, uint8_t, void *)
    ctypedef int (*on_invalid_frame_cb)(nghttp2_session *, const nghttp2_frame *, int, void *)
    ctypedef int (*error_cb2)(nghttp2_session *, int, const char *, size_t, void *)

    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *, on_frame_cb)
    void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *, on_frame_cb)
    void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *, on_frame_cb)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *, on_data_chunk_cb)
    void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *, on_stream_close_cb)
    void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, on_header_cb)
    void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(nghttp2_session_callbacks *, on_invalid_frame_cb)
    void nghttp2_session_callbacks_set_error_callback2(nghttp2_session_callbacks *, error_cb2)

    int nghttp2_option_new(nghttp2_option **)
    void nghttp2_option_del(nghttp2_option *)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int)
    void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *, size_t)
    void nghttp2_option_set_no_closed_streams(nghttp2_option *, int)
    void nghttp2_option_set_max_outbound_ack(nghttp2_option *, size_t)
    void nghttp2_option_set_max_send_header_block_length(nghttp2_option *, size_t)

    int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *, const nghttp2_option *)
    int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *, const nghttp2_option *)
    void nghttp2_session_del(nghttp2_session *)
    ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t)
    ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **)
    int nghttp2_session_consume(nghttp2_session *, int32_t, size_t)
    int nghttp2_session_resume_data(nghttp2_session *, int32_t)
    int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t)
    int nghttp2_session_terminate_session(nghttp2_session *, uint32_t)
    uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int)
    uint32_t nghttp2_session_get_next_stream_id(nghttp2_session *)
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *)
    int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *, int32_t)
    int nghttp2_session_want_read(nghttp2_session *)
    int nghttp2_session_want_write(nghttp2_session *)
    nghttp2_stream *nghttp2_session_find_stream(nghttp2_session *, int32_t)
    int nghttp2_stream_get_state(nghttp2_stream *)
    int nghttp2_session_consume_connection(nghttp2_session *, size_t)

    int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t)
    int32_t nghttp2_submit_request(nghttp2_session *, const void *, const nghttp2_nv *, size_t,
                                   const nghttp2_data_provider *, void *)
    int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t, const nghttp2_data_provider *)
    int32_t nghttp2_submit_headers(nghttp2_session *, uint8_t, int32_t, const void *, const nghttp2_nv *, size_t, void *)
    int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t)
    int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t)
    int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *, size_t)
    int nghttp2_submit_ping(nghttp2_session *, uint8_t, const uint8_t *)

    enum:
        NGHTTP2_DATA = 0
        NGHTTP2_HEADERS = 1
        NGHTTP2_PRIORITY = 2
        NGHTTP2_RST_STREAM = 3
        NGHTTP2_SETTINGS = 4
        NGHTTP2_PING = 6
        NGHTTP2_GOAWAY = 7
        NGHTTP2_WINDOW_UPDATE = 8
        NGHTTP2_FLAG_NONE = 0
        NGHTTP2_FLAG_END_STREAM = 1
        NGHTTP2_FLAG_ACK = 1
        NGHTTP2_HCAT_REQUEST = 0
        NGHTTP2_HCAT_RESPONSE = 1
        NGHTTP2_HCAT_PUSH_RESPONSE = 2
        NGHTTP2_HCAT_HEADERS = 3
        NGHTTP2_DATA_FLAG_EOF = 1
        NGHTTP2_DATA_FLAG_NO_END_STREAM = 2
        NGHTTP2_SETTINGS_HEADER_TABLE_SIZE = 1
        NGHTTP2_SETTINGS_ENABLE_PUSH = 2
        NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS = 3
        NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE = 4
        NGHTTP2_SETTINGS_MAX_FRAME_SIZE = 5
        NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE = 6
        NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL = 8
        NGHTTP2_ERR_DEFERRED = -508
        NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE = -521
        NGHTTP2_ERR_HTTP_HEADER = -531
        NGHTTP2_ERR_HTTP_MESSAGING = -532
        NGHTTP2_ERR_CALLBACK_FAILURE = -902
        NGHTTP2_ERR_BAD_CLIENT_MAGIC = -903
        NGHTTP2_ERR_FLOODED = -904
        NGHTTP2_ERR_TOO_MANY_CONTINUATIONS = -905
        NGHTTP2_STREAM_STATE_IDLE = 1
        NGHTTP2_STREAM_STATE_CLOSED = 7


# Event kinds and error codes: the values of moorline.protocol.http2 (a test pins them equal).
DEF EV_HEADERS = 0
DEF EV_INFORMATIONAL = 1
DEF EV_DATA = 2
DEF EV_TRAILERS = 3
DEF EV_RESET = 4
DEF EV_WRITABLE = 5
DEF EV_GOAWAY = 6
DEF EV_SETTINGS = 7
DEF EV_OVERSIZED = 8
DEF EV_MALFORMED = 9
DEF PROTOCOL_ERROR = 1
DEF INTERNAL_ERROR = 2
DEF CANCEL = 8
DEF ENHANCE_YOUR_CALM = 11
DEF NO_ERROR = 0

HEADERS = EV_HEADERS
INFORMATIONAL = EV_INFORMATIONAL
DATA = EV_DATA
TRAILERS = EV_TRAILERS
RESET = EV_RESET
WRITABLE = EV_WRITABLE
GOAWAY = EV_GOAWAY
SETTINGS = EV_SETTINGS
OVERSIZED = EV_OVERSIZED
MALFORMED = EV_MALFORMED

# The connection-specific fields RFC 9113 8.2.2 forbids; the glues drop them already, this is
# the codec's own guarantee (h2's normalize_outbound_headers does the same).
_CONN_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))

cdef nghttp2_session_callbacks *_CALLBACKS = NULL  # immutable after module init


cdef class _Out:
    """A stream's body not yet taken by nghttp2 (beyond the peer's windows, or not yet sent)."""
    cdef list chunks
    cdef Py_ssize_t head      # index of the first chunk not fully sent
    cdef Py_ssize_t off       # bytes of chunks[head] already sent
    cdef Py_ssize_t size      # bytes queued
    cdef bint end
    cdef bint deferred        # the provider returned DEFERRED: resume on new data
    cdef bint blocked         # the glue saw it pending: WRITABLE when it drains
    cdef object trailers

    def __cinit__(self):
        self.chunks = []
        self.head = 0
        self.off = 0
        self.size = 0
        self.end = False
        self.deferred = False
        self.blocked = False
        self.trailers = None


cdef class NgCodec:
    """One HTTP/2 connection's protocol state (either side), on libnghttp2."""
    cdef nghttp2_session *s
    cdef readonly object options
    cdef readonly bint client_side
    cdef readonly bint goaway_received
    cdef readonly bint goaway_sent
    cdef public object error        # an outbound limit passed by frames from send_* (data_to_send)
    cdef bint _got_settings
    cdef public long ctrl_queued
    cdef public long frames_queued
    cdef public long closed_streams
    cdef public long premature_resets
    cdef dict _out
    cdef set _open_local       # server: streams whose response has not ended
    cdef set _local_resets     # streams we reset (no RESET event for them)
    cdef set _remote_resets    # streams whose RST_STREAM we reported
    cdef set _opened_now       # server: streams opened in this receive() call
    cdef set _drop             # server: streams opened and reset in this receive() call
    cdef list _events
    cdef list _hdrs
    cdef Py_ssize_t _hdr_size
    cdef bint _hdr_over
    cdef long _empty_run
    cdef long _prio_frames
    cdef long _wu_frames
    cdef long _in_streams
    cdef long _data_frames
    cdef int32_t _last_request_sent
    cdef int _goaway_expected
    cdef object _error          # Http2Error found by a callback, raised after mem_recv
    cdef object _exc            # a Python exception inside a callback (a bug): re-raised
    cdef object _err_detail
    cdef object _err_stat
    cdef long _lib_goaway
    cdef char *_buf
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _max_header_list
    cdef long _max_empty
    cdef long _max_ctrl
    cdef long _max_frames
    cdef bint _stream_error_on_invalid

    def __cinit__(self, bint client_side, options=None):
        self.s = NULL
        self._buf = NULL
        self._len = 0
        self._cap = 0

    def __init__(self, bint client_side, options=None):
        o = self.options = options if options is not None else Http2Options()
        self.client_side = client_side
        self._out = {}
        self._open_local = set()
        self._local_resets = set()
        self._remote_resets = set()
        self._opened_now = set()
        self._drop = set()
        self._events = []
        self._hdrs = None
        self._lib_goaway = -1
        self._max_header_list = o.max_header_list_size
        self._max_empty = o.max_consecutive_empty_frames
        self._max_ctrl = o.max_outbound_control_frames
        self._max_frames = getattr(o, "max_outbound_frames", 10000) or 10000
        self._stream_error_on_invalid = bool(getattr(o, "stream_error_on_invalid_http_messaging", False))
        cdef nghttp2_option *opt
        nghttp2_option_new(&opt)
        nghttp2_option_set_no_auto_window_update(opt, 1)
        nghttp2_option_set_max_deflate_dynamic_table_size(opt, MAX_ENCODER_TABLE)
        # What the glue sends is bounded by moorline's own header limits; nghttp2's 64 KiB default
        # would turn a large (but accepted) upstream response head into a reset.
        nghttp2_option_set_max_send_header_block_length(opt, 1 << 20)
        cdef int rv
        if client_side:
            rv = nghttp2_session_client_new2(&self.s, _CALLBACKS, <void *>self, opt)
        else:
            rv = nghttp2_session_server_new2(&self.s, _CALLBACKS, <void *>self, opt)
        nghttp2_option_del(opt)
        if rv != 0:
            raise MemoryError("nghttp2_session_new failed")

    def __dealloc__(self):
        if self.s != NULL:
            nghttp2_session_del(self.s)
            self.s = NULL
        if self._buf != NULL:
            free(self._buf)
            self._buf = NULL

    # -- connection ---------------------------------------------------------------------
    def initiate(self):
        """Queue the preface (client) and our SETTINGS, and open the connection window."""
        o = self.options
        cdef nghttp2_settings_entry iv[7]
        cdef size_t n = 0
        iv[n].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS; iv[n].value = o.max_concurrent_streams; n += 1
        iv[n].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE; iv[n].value = o.max_header_list_size; n += 1
        iv[n].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE; iv[n].value = o.initial_stream_window_size; n += 1
        iv[n].settings_id = NGHTTP2_SETTINGS_MAX_FRAME_SIZE; iv[n].value = o.max_frame_size; n += 1
        iv[n].settings_id = NGHTTP2_SETTINGS_HEADER_TABLE_SIZE; iv[n].value = o.header_table_size; n += 1
        iv[n].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH; iv[n].value = 0; n += 1
        if getattr(o, "allow_connect", False) and not self.client_side:
            iv[n].settings_id = NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL; iv[n].value = 1; n += 1
        nghttp2_submit_settings(self.s, NGHTTP2_FLAG_NONE, iv, n)
        if o.initial_connection_window_size > 65535:
            nghttp2_session_set_local_window_size(self.s, NGHTTP2_FLAG_NONE, 0, o.initial_connection_window_size)
        self._pump()

    def data_to_send(self):
        self._pump()
        if self.error is None and not self.goaway_sent and (
            self.ctrl_queued > self._max_ctrl or self.frames_queued > self._max_frames
        ):
            # The glue's own frames passed an outbound limit: GOAWAY, and the glue finds the
            # error here once it wrote these bytes (it counts the stat and closes).
            over_ctrl = self.ctrl_queued > self._max_ctrl
            self.goaway(ENHANCE_YOUR_CALM)
            self._pump()
            self.error = Http2Error(
                ENHANCE_YOUR_CALM,
                "too many queued control frames" if over_ctrl else "too many queued frames",
                "outbound_control_flood" if over_ctrl else "outbound_flood",
            )
        if not self._len:
            return b""
        out = PyBytes_FromStringAndSize(self._buf, self._len)
        self._len = 0
        if self._cap > 1 << 20:
            free(self._buf)
            self._buf = NULL
            self._cap = 0
        return out

    def flushed(self):
        """The glue wrote everything queued and the transport is below its high-water mark."""
        self.ctrl_queued = 0
        self.frames_queued = 0

    @property
    def peer_max_concurrent_streams(self):
        cdef uint32_t v = nghttp2_session_get_remote_settings(self.s, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)
        # Until the peer's first SETTINGS, 100 (nghttp2 holds further streams back itself).
        return v if self._got_settings or v < 100 else 100

    @property
    def finished(self):
        """nghttp2 will neither read nor write again (say, the peer's GOAWAY arrived and no
        stream is open): the glue closes the connection, as Envoy does."""
        return not nghttp2_session_want_read(self.s) and not nghttp2_session_want_write(self.s)

    @property
    def peer_allows_connect(self):
        return nghttp2_session_get_remote_settings(self.s, NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL) == 1

    @property
    def highest_inbound_stream_id(self):
        return nghttp2_session_get_last_proc_stream_id(self.s)

    def next_stream_id(self):
        return nghttp2_session_get_next_stream_id(self.s)

    def goaway(self, int code=NO_ERROR, last_stream_id=None, bytes detail not None=b""):
        self.goaway_sent = True
        cdef int32_t last = nghttp2_session_get_last_proc_stream_id(self.s) if last_stream_id is None else last_stream_id
        self._goaway_expected += 1
        if nghttp2_submit_goaway(self.s, NGHTTP2_FLAG_NONE, last, code,
                                 <const uint8_t *>PyBytes_AS_STRING(detail), PyBytes_GET_SIZE(detail)) != 0:
            self._goaway_expected -= 1

    def ping(self, bytes opaque not None=b"moorline"):
        cdef bytes o8 = opaque[:8].ljust(8, b"\0")
        nghttp2_submit_ping(self.s, NGHTTP2_FLAG_NONE, <const uint8_t *>PyBytes_AS_STRING(o8))

    # -- receiving ------------------------------------------------------------------------
    def receive(self, bytes data not None):
        """Feed bytes; returns event tuples. Raises ``Http2Error`` (GOAWAY queued)."""
        cdef list out = self._events  # may hold events produced since the last call
        cdef ssize_t rv = nghttp2_session_mem_recv(
            self.s, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if self._exc is not None:
            e = self._exc
            self._exc = None
            raise e
        if rv < 0:
            self._fatal(rv)
        if self._error is not None:
            self._pump()
            e = self._error
            self._error = None
            self._events = []
            raise e
        if self._drop:
            out = self._events = self._drop_batch(out)
        self._opened_now.clear()
        self._pump()
        self._events = []
        if self._lib_goaway >= 0:
            self._raise_lib_goaway()
        if not self.client_side:
            o = self.options
            if self._prio_frames > o.max_inbound_priority_frames_per_stream * (1 + self._in_streams):
                self._calm("too many PRIORITY frames", "inbound_priority_frames_flood")
            if self._wu_frames > 5 + 2 * (
                self._in_streams + o.max_inbound_window_update_frames_per_data_frame_sent * self._data_frames
            ):
                self._calm("too many WINDOW_UPDATE frames", "inbound_window_update_frames_flood")
        if self.ctrl_queued > self._max_ctrl:
            self._calm("too many queued control frames", "outbound_control_flood")
        if self.frames_queued > self._max_frames:
            self._calm("too many queued frames", "outbound_flood")
        if (not self.client_side and self.premature_resets
                and self.closed_streams >= self.options.premature_reset_min_streams
                and self.premature_resets * 2 >= self.closed_streams):
            self._calm("too many premature resets", "too_many_premature_resets")
        return out

    cdef list _drop_batch(self, list out):
        # Streams opened and reset in the same read never reach the proxy (rapid reset).
        drop = self._drop
        self._drop = set()
        self.closed_streams += len(drop)
        self.premature_resets += len(drop)
        keep = []
        for ev in out:
            if ev[0] >= EV_GOAWAY or ev[1] not in drop:
                keep.append(ev)
            elif ev[0] == EV_DATA and ev[3]:
                # Nobody will ack these bytes: hand them back to the connection window now.
                nghttp2_session_consume_connection(self.s, ev[3])
        return keep

    cdef int _error_calm(self, str detail, str stat) except -1:
        # A flood seen inside a callback: GOAWAY now, raised once mem_recv returns.
        self.goaway_sent = True
        self._goaway_expected += 1
        nghttp2_session_terminate_session(self.s, ENHANCE_YOUR_CALM)
        if self._error is None:
            self._error = Http2Error(ENHANCE_YOUR_CALM, detail, stat)
        return 0

    cdef _calm(self, str detail, str stat):
        self.goaway(ENHANCE_YOUR_CALM)
        self._pump()
        raise Http2Error(ENHANCE_YOUR_CALM, detail, stat)

    cdef _fatal(self, ssize_t rv):
        cdef int code = PROTOCOL_ERROR
        stat = self._err_stat
        if rv == NGHTTP2_ERR_FLOODED:
            code = ENHANCE_YOUR_CALM
            stat = "outbound_control_flood"
            detail = "too many queued SETTINGS or PING acknowledgements"
        elif rv == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS:
            code = ENHANCE_YOUR_CALM
            stat = "too_many_header_frames"
            detail = "too many CONTINUATION frames"
        elif rv == NGHTTP2_ERR_BAD_CLIENT_MAGIC:
            detail = "bad connection preface"
        else:
            detail = self._err_detail or f"nghttp2 error {rv}"
        # After a fatal error the session sends nothing more: write the GOAWAY by hand.
        self.goaway_sent = True
        self._append_goaway(code)
        raise Http2Error(code, detail, stat)

    cdef _raise_lib_goaway(self):
        code = self._lib_goaway
        self._lib_goaway = -1
        raise Http2Error(code, self._err_detail or "protocol error", self._err_stat)

    cdef _append_goaway(self, int code):
        cdef int32_t last = nghttp2_session_get_last_proc_stream_id(self.s)
        cdef char f[17]
        f[0] = 0; f[1] = 0; f[2] = 8; f[3] = 7; f[4] = 0
        f[5] = 0; f[6] = 0; f[7] = 0; f[8] = 0
        f[9] = (last >> 24) & 0x7f; f[10] = (last >> 16) & 0xff; f[11] = (last >> 8) & 0xff; f[12] = last & 0xff
        f[13] = (code >> 24) & 0xff; f[14] = (code >> 16) & 0xff; f[15] = (code >> 8) & 0xff; f[16] = code & 0xff
        self._append(f, 17)

    def ack(self, int32_t sid, size_t n):
        """``n`` flow-controlled bytes of ``sid`` were consumed: let the peer send more."""
        if n:
            nghttp2_session_consume(self.s, sid, n)

    # -- sending --------------------------------------------------------------------------
    def send_headers(self, int32_t sid, headers, bint end_stream):
        cdef nghttp2_data_provider prd
        cdef nghttp2_data_provider *p = NULL
        cdef int rv
        cdef _Out q
        keep = []
        cdef size_t n = len(headers)
        cdef nghttp2_nv *nva = <nghttp2_nv *>malloc((n if n else 1) * sizeof(nghttp2_nv))
        if nva == NULL:
            raise MemoryError()
        try:
            n = _fill_nva(nva, headers, keep)
            if not end_stream:
                prd.source.ptr = NULL
                prd.read_callback = _read_cb
                p = &prd
            if self.client_side:
                if sid in self._out:
                    # A second header block on an open stream: trailers.
                    return self.send_trailers(sid, headers)
                if not end_stream:
                    q = _Out()
                    self._out[sid] = q
                rv = nghttp2_submit_request(self.s, NULL, nva, n, p, NULL)
                if rv < 0:
                    self._out.pop(sid, None)
                    return False
                if rv != sid and not end_stream:
                    # The glue asked next_stream_id() for this stream: they do not differ.
                    self._out[rv] = self._out.pop(sid)
                return True
            if n and nva[0].namelen == 7 and nva[0].valuelen == 3 and nva[0].value[0] == 49:  # ":status" 1xx
                rv = nghttp2_submit_headers(self.s, NGHTTP2_FLAG_NONE, sid, NULL, nva, n, NULL)
                return rv >= 0
            if sid in self._out:
                return self.send_trailers(sid, headers)
            if not end_stream:
                q = _Out()
                self._out[sid] = q
            rv = nghttp2_submit_response(self.s, sid, nva, n, p)
            if rv != 0:
                self._out.pop(sid, None)
                return False
            if end_stream:
                self._ended(sid)
            return True
        finally:
            free(nva)

    def send_data(self, int32_t sid, bytes data not None, bint end_stream):
        """Queue ``data``; nghttp2 sends it within the peer's windows (see ``pending``)."""
        cdef _Out q = self._out.get(sid)
        if q is None:
            return False
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if n:
            q.chunks.append(data)
            q.size += n
        if end_stream:
            q.end = True
        if q.deferred and (n or end_stream):
            q.deferred = False
            nghttp2_session_resume_data(self.s, sid)
        return True

    def send_trailers(self, int32_t sid, trailers):
        cdef _Out q = self._out.get(sid)
        if q is None:
            return False
        q.trailers = trailers
        q.end = True
        if q.deferred:
            q.deferred = False
            nghttp2_session_resume_data(self.s, sid)
        return True

    def pending(self, int32_t sid):
        cdef _Out q = self._out.get(sid)
        if q is None:
            return 0
        if (q.size or q.end) and not q.deferred:
            self._pump()
            if self._out.get(sid) is not q:
                return 0  # all sent, END_STREAM (or trailers) too
            q.blocked = True
        # END_STREAM or trailers still unsent (the stream window is 0, so nghttp2 does not ask
        # for even an empty DATA frame) count as one byte: the glue must not forget or reset the
        # stream yet, WRITABLE tells it when they left.
        return q.size if q.size or not q.end else 1

    def reset(self, int32_t sid, int code=CANCEL):
        if code == NO_ERROR:
            # After a complete response (RFC 9113 8.1): its frames go first. nghttp2 sends
            # RST_STREAM ahead of queued HEADERS and DATA, and would drop them.
            self._pump()
        self._out.pop(sid, None)
        self._open_local.discard(sid)
        if _live(self.s, sid) or (self.client_side and sid > self._last_request_sent
                                  and <uint32_t>sid < nghttp2_session_get_next_stream_id(self.s)):
            # Open, or a request nghttp2 still holds back (it closes that one when it drops it).
            self._local_resets.add(sid)
        nghttp2_submit_rst_stream(self.s, NGHTTP2_FLAG_NONE, sid, code)

    def forget(self, int32_t sid):
        """The glue is done with ``sid`` (both directions ended): drop any queued output."""
        self._out.pop(sid, None)
        self._open_local.discard(sid)

    cdef inline void _ended(self, int32_t sid):
        if sid in self._open_local:
            self._open_local.discard(sid)
            self.closed_streams += 1

    # -- output buffer ------------------------------------------------------------------------
    cdef int _append(self, const char *p, Py_ssize_t n) except -1:
        cdef Py_ssize_t need = self._len + n
        cdef Py_ssize_t cap
        cdef char *nb
        if need > self._cap:
            cap = self._cap * 2 if self._cap else 16384
            while cap < need:
                cap *= 2
            nb = <char *>realloc(self._buf, cap)
            if nb == NULL:
                raise MemoryError()
            self._buf = nb
            self._cap = cap
        memcpy(self._buf + self._len, p, n)
        self._len = need
        return 0

    cdef int _pump(self) except -1:
        cdef const uint8_t *p
        cdef ssize_t n
        while True:
            n = nghttp2_session_mem_send(self.s, &p)
            if n <= 0:
                break
            self._append(<const char *>p, n)
        if self._exc is not None:
            e = self._exc
            self._exc = None
            raise e
        return 0


cdef inline bint _live(nghttp2_session *s, int32_t sid) noexcept:
    # nghttp2 calls on_stream_close only for streams it still has open: a reset or RST_STREAM
    # on any other stream must leave no entry behind in the sets on_stream_close prunes.
    cdef nghttp2_stream *st = nghttp2_session_find_stream(s, sid)
    if st == NULL:
        return False
    cdef int state = nghttp2_stream_get_state(st)
    return state != NGHTTP2_STREAM_STATE_IDLE and state != NGHTTP2_STREAM_STATE_CLOSED


cdef size_t _fill_nva(nghttp2_nv *nva, headers, list keep) except? 0:
    cdef size_t i = 0
    cdef bytes name, value
    cdef Py_ssize_t k, ln
    cdef const char *c
    for name, value in headers:
        ln = PyBytes_GET_SIZE(name)
        c = PyBytes_AS_STRING(name)
        if ln and c[0] != 58:  # not a pseudo-header
            for k in range(ln):
                if 65 <= c[k] <= 90:
                    name = name.lower()
                    keep.append(name)
                    c = PyBytes_AS_STRING(name)
                    break
            if name in _CONN_SPECIFIC or (name == b"te" and value != b"trailers"):
                continue
        nva[i].name = <uint8_t *>c
        nva[i].namelen = ln
        nva[i].value = <uint8_t *>PyBytes_AS_STRING(value)
        nva[i].valuelen = PyBytes_GET_SIZE(value)
        nva[i].flags = 0
        i += 1
    return i


# -- callbacks (C; they never let a Python exception through: it is kept and re-raised) -------------

cdef ssize_t _read_cb(nghttp2_session *session, int32_t sid, uint8_t *buf, size_t length,
                      uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    cdef _Out q
    cdef size_t done = 0
    cdef Py_ssize_t avail, take
    cdef bytes chunk
    cdef size_t tn
    cdef nghttp2_nv *nva
    try:
        q = c._out.get(sid)
        if q is None:
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        while done < length and q.head < len(q.chunks):
            chunk = q.chunks[q.head]
            avail = PyBytes_GET_SIZE(chunk) - q.off
            take = avail if <size_t>avail <= length - done else <Py_ssize_t>(length - done)
            memcpy(buf + done, PyBytes_AS_STRING(chunk) + q.off, take)
            done += take
            q.off += take
            if q.off == PyBytes_GET_SIZE(chunk):
                q.head += 1
                q.off = 0
        q.size -= done
        if q.head == len(q.chunks):
            q.chunks = []
            q.head = 0
        elif q.head > 32:
            del q.chunks[:q.head]
            q.head = 0
        if q.size == 0:
            if q.end:
                data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
                if q.trailers is not None:
                    data_flags[0] |= NGHTTP2_DATA_FLAG_NO_END_STREAM
                    trailers = q.trailers
                    q.trailers = None
                    keep = []
                    nva = <nghttp2_nv *>malloc((len(trailers) or 1) * sizeof(nghttp2_nv))
                    if nva == NULL:
                        raise MemoryError()
                    try:
                        tn = _fill_nva(nva, trailers, keep)
                        nghttp2_submit_trailer(session, sid, nva, tn)
                    finally:
                        free(nva)
                if not c.client_side:
                    c._ended(sid)
                del c._out[sid]
                if q.blocked:
                    c._events.append((EV_WRITABLE, sid))
            elif done == 0:
                q.deferred = True
                if q.blocked:
                    q.blocked = False
                    c._events.append((EV_WRITABLE, sid))
                return NGHTTP2_ERR_DEFERRED
            elif q.blocked:
                q.blocked = False
                c._events.append((EV_WRITABLE, sid))
        return done
    except BaseException as e:
        c._exc = e
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    try:
        c._hdrs = []
        c._hdr_size = 0
        c._hdr_over = False
        if frame.headers.cat == NGHTTP2_HCAT_REQUEST:
            c._in_streams += 1
            c._empty_run = 0
        return 0
    except BaseException as e:
        c._exc = e
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                    const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    try:
        if c._hdrs is None:
            return 0
        c._hdr_size += namelen + valuelen + 32
        if c._hdr_size > c._max_header_list:
            # Past max_header_list_size: this stream alone is reset (nghttp2 keeps decoding the
            # block, so the connection's HPACK state stays right); nothing more is kept of it.
            c._hdrs = None
            c._events.append((EV_OVERSIZED, frame.hd.stream_id))
            # OVERSIZED says it (both sides): no RESET when nghttp2 closes the stream. The
            # stream is open here (a request's block opens it), so the close callback will
            # come and take the id out again.
            c._local_resets.add(frame.hd.stream_id)
            c._open_local.discard(frame.hd.stream_id)
            c._out.pop(frame.hd.stream_id, None)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        c._hdrs.append((PyBytes_FromStringAndSize(<const char *>name, namelen),
                        PyBytes_FromStringAndSize(<const char *>value, valuelen)))
        return 0
    except BaseException as e:
        c._exc = e
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    cdef uint8_t t = frame.hd.type
    cdef int32_t sid = frame.hd.stream_id
    cdef bint end = (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) != 0
    cdef list ev
    try:
        ev = c._events
        if t == NGHTTP2_DATA:
            if frame.hd.length == 0 and not end:
                c._empty_run += 1
                if c._empty_run > c._max_empty:
                    c._error_calm("too many empty DATA frames", "inbound_empty_frames_flood")
                    return 0
            else:
                c._empty_run = 0
            if end:
                k = len(ev) - 1
                if k >= 0 and ev[k][0] == EV_DATA and ev[k][1] == sid:
                    last = ev[k]
                    ev[k] = (EV_DATA, sid, last[2], last[3], True)
                else:
                    ev.append((EV_DATA, sid, b"", 0, True))
        elif t == NGHTTP2_HEADERS:
            hs = c._hdrs
            c._hdrs = None
            if hs is None:
                return 0
            cat = frame.headers.cat
            if cat == NGHTTP2_HCAT_REQUEST:
                if not c.client_side:
                    c._open_local.add(sid)
                    c._opened_now.add(sid)
                ev.append((EV_HEADERS, sid, hs, end))
            elif cat == NGHTTP2_HCAT_RESPONSE or (c.client_side and hs and hs[0][0] == b":status"):
                st = hs[0][1] if hs and hs[0][0] == b":status" else b""
                if st[:1] == b"1":
                    ev.append((EV_INFORMATIONAL, sid, hs))
                else:
                    ev.append((EV_HEADERS, sid, hs, end))
            else:
                ev.append((EV_TRAILERS, sid, hs))
        elif t == NGHTTP2_RST_STREAM:
            c._out.pop(sid, None)
            if not _live(session, sid):
                return 0  # a stream already closed: nothing to tell, no close callback follows
            c._remote_resets.add(sid)
            if not c.client_side:
                if sid in c._opened_now:
                    c._drop.add(sid)
                    c._open_local.discard(sid)
                    return 0
                if sid in c._open_local:
                    c._open_local.discard(sid)
                    c.closed_streams += 1
                    c.premature_resets += 1
            ev.append((EV_RESET, sid, frame.rst_stream.error_code))
        elif t == NGHTTP2_WINDOW_UPDATE:
            c._wu_frames += 1
        elif t == NGHTTP2_PRIORITY:
            c._prio_frames += 1
        elif t == NGHTTP2_SETTINGS:
            if not (frame.hd.flags & NGHTTP2_FLAG_ACK):
                c._got_settings = True
                ev.append((EV_SETTINGS,))
        elif t == NGHTTP2_GOAWAY:
            c.goaway_received = True
            ev.append((EV_GOAWAY, frame.goaway.last_stream_id, frame.goaway.error_code))
        return 0
    except BaseException as e:
        c._exc = e
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t sid, const uint8_t *data, size_t n,
                        void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    try:
        c._events.append((EV_DATA, sid, PyBytes_FromStringAndSize(<const char *>data, n), n, False))
        return 0
    except BaseException as e:
        c._exc = e
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _on_stream_close(nghttp2_session *session, int32_t sid, uint32_t code, void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    try:
        c._out.pop(sid, None)
        if sid in c._remote_resets:
            c._remote_resets.discard(sid)
            return 0
        if sid in c._local_resets:
            c._local_resets.discard(sid)
            return 0
        c._open_local.discard(sid)
        if code == PROTOCOL_ERROR:
            # nghttp2 reset the stream for breaking HTTP/2's messaging rules where it calls no
            # invalid-frame callback: DATA past or short of content-length (RFC 9113 8.1.1).
            c._events.append((EV_MALFORMED, sid, "content-length mismatch"))
        elif code != 0 and sid not in c._drop:
            # nghttp2 ended the stream itself (a stream error, or above a GOAWAY's last id).
            c._events.append((EV_RESET, sid, code))
        return 0
    except BaseException as e:
        c._exc = e
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    cdef uint8_t t = frame.hd.type
    c.frames_queued += 1
    if t == NGHTTP2_DATA:
        c._data_frames += 1
    elif t == NGHTTP2_RST_STREAM or t == NGHTTP2_PING or t == NGHTTP2_SETTINGS:
        c.ctrl_queued += 1
    elif t == NGHTTP2_HEADERS:
        if frame.headers.cat == NGHTTP2_HCAT_REQUEST and frame.hd.stream_id > c._last_request_sent:
            c._last_request_sent = frame.hd.stream_id
    elif t == NGHTTP2_GOAWAY:
        c.ctrl_queued += 1
        if c._goaway_expected:
            c._goaway_expected -= 1
        elif frame.goaway.error_code != 0:
            # nghttp2 found a connection error in the input and queued its GOAWAY.
            c.goaway_sent = True
            c._lib_goaway = frame.goaway.error_code
    return 0


cdef int _on_invalid_frame(nghttp2_session *session, const nghttp2_frame *frame, int lib_error, void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    cdef int32_t sid = frame.hd.stream_id if frame != NULL else 0
    try:
        if lib_error == NGHTTP2_ERR_HTTP_HEADER or lib_error == NGHTTP2_ERR_HTTP_MESSAGING:
            if not c.client_side and not c._stream_error_on_invalid:
                c._err_stat = "rx_messaging_error"
                c._err_detail = "invalid HTTP/2 message"
                # Envoy's default downstream: an invalid message ends the connection.
                c.goaway_sent = True
                c._goaway_expected += 1
                nghttp2_session_terminate_session(session, PROTOCOL_ERROR)
                c._error = Http2Error(PROTOCOL_ERROR, "invalid HTTP/2 message", "rx_messaging_error")
            elif sid:
                # Only this stream: nghttp2 resets it (PROTOCOL_ERROR); MALFORMED tells the glue.
                c._local_resets.add(sid)
                c._open_local.discard(sid)
                c._events.append((EV_MALFORMED, sid, "invalid HTTP/2 message"))
        return 0
    except BaseException as e:
        c._exc = e
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _on_error(nghttp2_session *session, int lib_error, const char *msg, size_t n, void *user_data) noexcept:
    cdef NgCodec c = <NgCodec>user_data
    try:
        c._err_detail = PyBytes_FromStringAndSize(msg, n).decode("latin-1")
        return 0
    except BaseException as e:
        c._exc = e
        return 0


cdef _init_callbacks():
    global _CALLBACKS
    nghttp2_session_callbacks_new(&_CALLBACKS)
    nghttp2_session_callbacks_set_on_frame_recv_callback(_CALLBACKS, _on_frame_recv)
    nghttp2_session_callbacks_set_on_begin_headers_callback(_CALLBACKS, _on_begin_headers)
    nghttp2_session_callbacks_set_on_frame_send_callback(_CALLBACKS, _on_frame_send)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(_CALLBACKS, _on_data_chunk)
    nghttp2_session_callbacks_set_on_stream_close_callback(_CALLBACKS, _on_stream_close)
    nghttp2_session_callbacks_set_on_header_callback(_CALLBACKS, _on_header)
    nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(_CALLBACKS, _on_invalid_frame)
    nghttp2_session_callbacks_set_error_callback2(_CALLBACKS, _on_error)


_init_callbacks()
