"""HTTP/1.1 codec, sans-IO, on httptools (llhttp).

The three promises h11 makes, and where each one is kept here:

* **No IO.** Nothing here touches a socket, the event loop or the clock. ``feed(bytes)`` drives
  callbacks on a *target* object; the encoders return ``bytes``. The caller owns the transport.
* **Linear time.** llhttp is a single-pass state machine. Python work is per message, per header
  and per body span, never per byte. One caveat inherited from httptools: it concatenates the
  pieces of one header line that arrive in separate ``feed`` calls, so a header trickled a few
  bytes per call costs O(header size) per call; the size bound below caps that constant.
* **Bounded memory.** No body is ever buffered: body spans go to ``target.on_body`` as llhttp
  finds them. What can accumulate is the head (request line/URL, header pieces held by httptools,
  our header list) and the trailer section. Two bounds hold them, both in ``_Parser``:
  - exact, Envoy style (``_hsize``, checked in ``on_url``/``on_header``): URL + names + values
    may not exceed ``Limits.max_header_bytes`` and there may be at most ``Limits.max_headers``
    headers (431; trailers get the same allowance, counted separately);
  - raw (``_raw``, checked in ``feed`` *before* bytes reach llhttp): the bytes fed while a head,
    a chunk-size line or a trailer section is incomplete may not exceed ``_raw_max``
    (2 x max_header_bytes + 4 x max_headers + 4 KiB, room for delimiters and whitespace). This is
    what keeps a header that never ends, fed one byte at a time, from growing without limit.
    The raw count starts at the first ``feed`` that begins inside the head, so the part of a head
    that shares a ``feed`` with the previous message adds at most one read to the bound.

Design notes:
* httptools exposes no pause/resume, so ``RequestParser`` has none: one ``feed`` delivers every
  pipelined request it holds. The caller queues what it cannot serve yet.
* httptools cannot be told that a response has no body (HEAD, CONNECT 2xx). ``ResponseParser``
  finds the end of such a head itself (the first CRLFCRLF, which strict llhttp guarantees is the
  end), feeds llhttp exactly the head, completes the message and starts a fresh llhttp parser.
* Upgrades (WebSocket, CONNECT) end parsing after the head: ``feed`` returns the bytes after the
  head and ``on_message_complete`` is *not* called (Envoy's model: the tunnel is the body).
* llhttp is not re-entrant: a target must not call ``feed`` from inside one of its callbacks
  (that ``feed`` raises RuntimeError). A target's exception, inside llhttp or out, comes out of
  ``feed`` as itself and leaves the parser dead (500 ``http1.callback_error`` after that).
* Transfer-Encoding other than exactly ``chunked`` is answered with 501 (Envoy's choice, RFC 9112
  6.1 "not understood"); Content-Length together with Transfer-Encoding with 400.
"""

from __future__ import annotations

import os
from http import HTTPStatus
from typing import Any

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

from moorline.protocol.headers import HeaderMap
from moorline.protocol.http1_head import (
    _BAD_TE,
    _BODY,
    _BODY_DISALLOWED,
    _CHUNKED,
    _CHUNKED_HEAD,
    _CODEC_ERROR,
    _HEAD,
    _MISSING_HOST,
    _NO_HEADERS,
    _REQ_SPECIAL,
    _RESP_SPECIAL,
    _RESPONSE_LIMITS,
    _TOO_LARGE,
    _TOO_MANY,
    _UNDERSCORE,
    _UPSTREAM_EOF,
    _VERSIONS,
    ALLOW,
    DROP_HEADER,
    HOP_BY_HOP,
    LAST_CHUNK,
    REJECT_REQUEST,
    HttpProtocolError,
    Limits,
    RequestHead,
    ResponseHead,
    _keep_alive,
    _new,
    find_head_end,
    llhttp_error,
)

__all__ = [
    "ALLOW",
    "DROP_HEADER",
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "REJECT_REQUEST",
    "HttpProtocolError",
    "Limits",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
    "encode_chunk",
    "encode_last_chunk",
    "encode_request_head",
    "encode_response_head",
    "encode_trailers",
]


class _Parser:
    """State and machinery shared by both directions; subclasses add the llhttp callbacks."""

    __slots__ = (
        "_bad",
        "_busy",
        "_chunked",
        "_cl",
        "_dead",
        "_error",
        "_exc",
        "_h",
        "_hsize",
        "_max_bytes",
        "_max_n",
        "_p",
        "_raw",
        "_raw_max",
        "_st",
        "_t",
        "_tr",
        "_trsize",
        "_upgrade",
    )

    _p: Any  # the httptools parser, built by the subclass (it must exist before feeding)

    def __init__(self, target: Any, limits: Limits, bad_status: int) -> None:
        self._t = target
        self._bad = bad_status  # 400 downstream, 502 upstream
        self._busy = False  # inside llhttp's feed_data (``_exec``): a feed from a callback is refused
        self._max_bytes = limits.max_header_bytes
        self._max_n = limits.max_headers
        self._raw_max = 2 * limits.max_header_bytes + 4 * limits.max_headers + 4096
        self._raw = 0
        self._st = _HEAD
        self._dead = False  # errored (``_error`` set) or switched to a tunnel
        self._error: HttpProtocolError | None = None
        # What a target raised inside an llhttp callback, for ``_fail``: httptools hands it on as
        # its error's ``__context__``, which Python overwrites with the exception being handled
        # when ``feed`` is called inside an ``except`` block.
        self._exc: BaseException | None = None
        self._upgrade = False
        self._h: list[tuple[bytes, bytes]] = []
        self._hsize = 0
        self._cl: int | None = None
        self._chunked = False
        self._tr: list[tuple[bytes, bytes]] | None = None
        self._trsize = 0

    # -- feeding ------------------------------------------------------------------------------
    def _feed(self, data: Any) -> bytes | None:
        if self._st != _BODY:
            raw = self._raw + len(data)
            if raw > self._raw_max:
                return self._feed_bounded(data)
            self._raw = raw
        off = self._exec(data)
        return None if off is None else self._upgraded(data, off)

    def _exec(self, data: Any) -> int | None:
        """Run llhttp over ``data``: None when all of it was parsed, else the offset just past the
        head of an upgrade; raises the protocol error (or a target's own exception).

        What follows an upgrade stop is parsed by the caller, outside this ``except`` block."""
        self._busy = True
        try:
            self._p.feed_data(data)
        except HttpParserUpgrade as e:
            return e.args[0]  # type: ignore[no-any-return]
        except HttpParserError as e:
            err = e
        else:
            return None
        finally:
            self._busy = False
        raise self._fail(err) from None

    def _reentered(self) -> None:
        # A target fed the parser from one of its callbacks, in the middle of llhttp's execute:
        # llhttp would go on with span pointers into the inner call's buffer (a negative size or
        # a read of unrelated memory). A bug in the target, refused before any state changes.
        raise RuntimeError("HTTP/1.1 parser fed from inside one of its own callbacks")

    def _target_failed(self) -> None:
        """A target callback run outside llhttp raised: dead, as after one run inside it."""
        self._dead = True
        self._error = HttpProtocolError(500, "http1.callback_error")

    def _feed_bounded(self, data: Any) -> bytes | None:
        """Feed ``data`` without letting an unfinished head/trailer grow past ``_raw_max``.

        Feed only what the bound still allows; if the parser made progress (head finished, body
        bytes consumed, chunk completed), continue with the rest, else the head is too large."""
        mv = memoryview(data)
        while mv:
            if self._st == _BODY:
                return self._feed(mv)
            room = self._raw_max - self._raw
            if len(mv) <= room:
                return self._feed(mv)
            if room <= 0:
                raise self._die(431 if self._bad == 400 else self._bad, _TOO_LARGE)
            self._raw = self._raw_max
            piece = mv[:room]
            off = self._exec(piece)
            if off is not None:
                left = self._upgraded(piece, off)
                if left is None:  # not a tunnel after all (h2c offer): parse on
                    return self.feed(bytes(mv[room:])) if len(mv) > room else None
                return left + bytes(mv[room:])
            if self._raw >= self._raw_max:
                raise self._die(431 if self._bad == 400 else self._bad, _TOO_LARGE)
            mv = mv[room:]
        return None

    def _upgraded(self, data: Any, offset: int) -> bytes | None:
        self._dead = True
        return bytes(data[offset:])

    def feed(self, data: bytes) -> bytes | None:
        raise NotImplementedError

    def _fail(self, e: Exception) -> HttpProtocolError:
        """Turn an httptools error into our error (or re-raise a bug from the target)."""
        exc = self._exc
        self._exc = None
        if self._error is not None:  # raised by one of our callbacks
            return self._error
        if exc is None and isinstance(e, HttpParserCallbackError):
            exc = e.__context__  # (raised by the parser's own code)
        if exc is not None:
            # The target raised: a bug upstairs, not the peer's fault. Keep the parser dead and
            # let the original exception through.
            self._dead = True
            self._error = HttpProtocolError(500, "http1.callback_error")
            raise exc
        return self._die(*llhttp_error(str(e), self._bad))

    def _die(self, status: int, detail: str) -> HttpProtocolError:
        err = HttpProtocolError(status, detail)
        self._error = err
        self._dead = True
        return err

    def _after_death(self, data: Any) -> bytes:
        if self._error is not None:
            raise self._error
        return bytes(data)  # tunnel: everything is payload

    # -- shared callbacks ---------------------------------------------------------------------
    def on_body(self, body: bytes) -> None:
        self._raw -= len(body)
        try:
            self._t.on_body(body)
        except BaseException as e:
            self._exc = e
            raise

    def on_chunk_complete(self) -> None:
        self._raw = 0

    def _too_large(self, size: int) -> None:
        bad = 431 if self._bad == 400 else self._bad
        if size > self._max_bytes:
            raise self._die(bad, _TOO_LARGE)
        raise self._die(bad, _TOO_MANY)

    def _trailer(self, name: bytes, value: bytes) -> None:
        tr = self._tr
        if tr is None:
            tr = self._tr = []
        tr.append((name, value))
        size = self._trsize = self._trsize + len(name) + len(value)
        if size > self._max_bytes or len(tr) > self._max_n:
            self._too_large(size)

    def _content_length(self, value: bytes) -> None:
        # llhttp has already refused signs, junk, overflow and duplicates; isdigit keeps int()
        # from accepting what it alone would (b"1_0", b" 1").
        if not value.isdigit():
            raise self._die(self._bad, _CODEC_ERROR)
        n = int(value)
        if self._cl is not None and self._cl != n:
            raise self._die(self._bad, _CODEC_ERROR)
        self._cl = n

    def _transfer_encoding(self, value: bytes) -> None:
        # Envoy accepts exactly one coding, "chunked"; anything else is "not implemented".
        if self._chunked or value.lower() != b"chunked":
            raise self._die(501 if self._bad == 400 else self._bad, _BAD_TE)
        self._chunked = True


class RequestParser(_Parser):
    """Parses requests (downstream side). See the module docstring for the callback contract."""

    __slots__ = (
        "_boundary",
        "_expect",
        "_h2c",
        "_h2c_body",
        "_h2c_chunked",
        "_h2c_pending",
        "_host",
        "_underscores",
        "_url",
    )

    def __init__(self, target: Any, limits: Limits | None = None) -> None:
        if limits is None:
            limits = Limits()
        super().__init__(target, limits, 400)
        self._underscores = limits.headers_with_underscores
        self._url = b""
        self._host: bytes | None = None  # the Host header's value
        self._expect = False
        # ``Upgrade: h2c`` (RFC 7540 3.2, what ``curl --http2`` sends on http://) is not a
        # tunnel: like Envoy, the request is served over HTTP/1.1 and the offer ignored. llhttp
        # still stops at it as at any upgrade; ``_upgraded`` then parses on.
        self._h2c = False
        self._h2c_pending = False
        self._h2c_chunked = False  # the offer has a chunked body (see ``_upgraded``)
        self._boundary = False  # the last feed ended exactly at the end of a message (``release``)
        self._h = _NO_HEADERS
        # llhttp stops right after the head of an upgrade request (it reports the message
        # complete there), so the Content-Length body of an h2c offer is read here.
        self._h2c_body = 0
        self._p = HttpRequestParser(self)

    def _upgraded(self, data: Any, offset: int) -> bytes | None:
        if not self._h2c_pending:
            return super()._upgraded(data, offset)
        self._h2c_pending = False
        self._upgrade = False
        if self._h2c_chunked:
            # llhttp stopped at the head of the offer, before its chunked body: a fresh parser
            # is given a made-up head that frames the rest as a chunked body, through a relay
            # that hides that head and forwards everything after it (this connection only).
            self._h2c_chunked = False
            self._st = _CHUNKED  # (llhttp reported the message complete at its head)
            relay = _AfterMadeUpHead(self)
            self._p = HttpRequestParser(relay)
            self._exec(_CHUNKED_HEAD)
            relay.hide = False
            return self._feed(data[offset:]) if len(data) > offset else None
        self._p = HttpRequestParser(self)
        return self._h2c_feed(data[offset:])

    def _h2c_feed(self, data: Any) -> bytes | None:
        n = self._h2c_body
        if n:
            take = data[:n]
            try:  # (the target's calls run outside llhttp here)
                if len(take):
                    self._t.on_body(bytes(take))
                n = self._h2c_body = n - len(take)
                data = data[len(take) :]
                if n:
                    return None
                self._st = _HEAD
                self._t.on_message_complete(None)
            except BaseException:
                self._target_failed()
                raise
        return self._feed(data) if len(data) else None

    @property
    def head_pending(self) -> bool:
        """Part of a request head has arrived (request line or header bytes), not all of it."""
        return self._st == _HEAD and bool(self._url or self._h)

    def feed(self, data: bytes) -> bytes | None:
        """Parse ``data``; returns the bytes after the head of an upgrade/CONNECT, else None."""
        if self._busy:
            self._reentered()
        if self._dead:
            return self._after_death(data)
        if self._h2c_body:
            return self._h2c_feed(data)
        if self._p is None:  # released between messages (``release``)
            self._p = HttpRequestParser(self)
        self._boundary = False
        left = self._feed(data)
        if self._boundary and not data.endswith(b"\r\n\r\n"):
            # The last message ended in this feed, but bytes may have followed it (the start of
            # a request line makes no callback): not provably a clean boundary.
            self._boundary = False
        return left

    @property
    def released(self) -> bool:
        """``release`` gave llhttp's parser back and no feed has come since."""
        return self._p is None

    def release(self) -> bool:
        """Free llhttp's parser (about 0.9 KiB with its callbacks) while no message is in
        progress; the next ``feed`` builds a fresh one. Only where that is provably lossless:
        the last feed ended with a complete message whose last bytes were its head's CRLFCRLF
        (or a chunked body's end), so llhttp holds nothing. Returns whether it was freed."""
        if (
            self._boundary
            and self._st == _HEAD
            and not self._dead
            and not self._h2c_body
            and not self._h
            and not self._url
            and self._tr is None
        ):
            self._p = None
            return True
        return False

    # -- llhttp callbacks (called by httptools) -----------------------------------------------
    def on_url(self, url: bytes) -> None:
        # A request line starts every request: its header list is made here, so that an idle
        # connection holds none (``_NO_HEADERS`` between requests).
        self._boundary = False
        if self._h is _NO_HEADERS:
            self._h = []
        u = self._url = self._url + url
        self._hsize += len(url)
        if len(u) > self._max_bytes:
            raise self._die(431, _TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp drops leading OWS only
        if self._st:
            if self._underscores and b"_" in name and self._drop_underscore():
                return
            self._trailer(name, value)
            return
        size = self._hsize = self._hsize + len(name) + len(value)
        if self._underscores and b"_" in name and self._drop_underscore():
            if size > self._max_bytes:
                self._too_large(size)
            return
        if name in _REQ_SPECIAL:
            if name == b"host":
                # Host is the request's authority (HTTP/2's :authority): an attribute of the
                # head, not a header line (Envoy's codec does the same).
                if self._host is not None:  # RFC 9112 3.2: more than one Host -> 400
                    raise self._die(400, _CODEC_ERROR)
                self._host = value
                if size > self._max_bytes:
                    self._too_large(size)
                return
            if name == b"content-length":
                self._content_length(value)
            elif name == b"transfer-encoding":
                self._transfer_encoding(value)
            elif name == b"upgrade":
                self._h2c = value.strip().lower() == b"h2c"
            elif value.lower() == b"100-continue":
                self._expect = True
        h = self._h
        h.append((name, value))
        if size > self._max_bytes or len(h) > self._max_n:
            self._too_large(size)

    def _drop_underscore(self) -> bool:
        if self._underscores == REJECT_REQUEST:
            raise self._die(400, _UNDERSCORE)
        return True

    def on_headers_complete(self) -> None:
        p = self._p
        ver = _VERSIONS.get(p.get_http_version())
        if ver is None:
            # "GET /" (HTTP/0.9) is malformed for us; "HTTP/2.0" is a version we do not speak.
            raise self._die(400 if p.get_http_version() == "0.9" else 505, _CODEC_ERROR)
        method = p.get_method()
        url = self._url
        upgrade = p.should_upgrade()  # Connection: upgrade + Upgrade, or CONNECT
        if method == b"CONNECT":
            if self._chunked:
                raise self._die(501, _BAD_TE)
            if self._cl:
                raise self._die(400, _BODY_DISALLOWED)
        elif self._host is None and ver == b"1.1" and (url[:1] == b"/" or url == b"*"):
            # Absolute-form carries its own authority (Envoy takes :authority from it).
            raise self._die(400, _MISSING_HOST)
        host = self._host
        if upgrade and self._h2c and method != b"CONNECT":
            upgrade = False
            self._h2c_pending = True
            self._h2c_body = self._cl or 0
            self._h2c_chunked = self._chunked
        h = self._h
        if host is not None and len(h) >= self._max_n:  # Host counts as one of the headers
            raise self._die(431, _TOO_MANY)
        head = _new(RequestHead)
        head._h = h
        head.method = method
        head.target = head.path = url
        head.authority = b"" if host is None else host
        head.scheme = b"http"
        head.version = ver
        head.keep_alive = p.should_keep_alive()
        head.content_length = self._cl
        head.chunked = chunked = self._chunked
        head.upgrade = upgrade
        head.expect_continue = self._expect and ver == b"1.1"  # RFC 9110 10.1.1: not from HTTP/1.0
        head.header_bytes = self._hsize + len(method) + 14 + 4 * (len(h) if host is None else len(h) + 1)
        self._st = _CHUNKED if chunked else _BODY
        self._raw = 0
        # (an h2c offer's body: its end is reported by us, or by the parser that frames it)
        self._upgrade = upgrade or self._h2c_body > 0 or self._h2c_chunked
        # Fresh per-message state for the next request on this connection.
        self._h = _NO_HEADERS
        self._hsize = 0
        self._url = b""
        self._cl = None
        self._host = None
        self._chunked = self._expect = self._h2c = False
        try:
            self._t.on_request_head(head)
        except BaseException as e:
            self._exc = e
            raise

    def on_message_complete(self) -> None:
        self._st = _HEAD
        self._raw = 0
        if self._upgrade:
            return  # the tunnel is the body; llhttp stops right after this
        tr = self._tr
        try:
            if tr is None:
                self._t.on_message_complete(None)
            else:
                self._tr = None
                self._trsize = 0
                self._t.on_message_complete(HeaderMap.wrap(tr))
        except BaseException as e:
            self._exc = e
            raise
        # Only now: a target that answers inside this callback (and releases the parser from
        # there) is inside llhttp's feed_data, which may still hold bytes after this message.
        self._boundary = True


class _AfterMadeUpHead:
    """llhttp callbacks for a parser fed ``_CHUNKED_HEAD`` first: the made-up head's events are
    dropped (``hide``), every later one goes to the real parser."""

    __slots__ = ("hide", "p")

    def __init__(self, p: RequestParser) -> None:
        self.p = p
        self.hide = True

    def on_url(self, url: bytes) -> None:
        if not self.hide:
            self.p.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.hide:
            self.p.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.hide:
            self.p.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.p.on_body(body)

    def on_chunk_complete(self) -> None:
        self.p.on_chunk_complete()

    def on_message_complete(self) -> None:
        self.p.on_message_complete()


class ResponseParser(_Parser):
    """Parses responses (upstream side). Call ``expect(method)`` before each response."""

    __slots__ = (
        "_connect_2xx",
        "_connection",
        "_eof_body",
        "_forced",
        "_scan",
        "_status",
        "_tail",
        "message_open",
    )

    def __init__(self, target: Any, limits: Limits | None = None) -> None:
        super().__init__(target, limits or _RESPONSE_LIMITS, 502)
        self._status = 0
        self.message_open = False  # a response has started (head or body bytes seen), not complete
        self._eof_body = False
        # 0: llhttp frames the response; 1: answer to HEAD; 2: answer to CONNECT. In 1 and 2 we
        # find the end of the head ourselves (see module docstring).
        self._scan = 0
        self._tail = 0  # bytes of a CRLFCRLF seen at the end of the previous feed (0..3)
        self._forced = False  # head of a HEAD answer seen: complete it without a body
        self._connect_2xx = False
        self._connection = b""  # the Connection header values of the head being parsed
        self._p = HttpResponseParser(self)

    def expect(self, method: bytes) -> None:
        """Name the method of the request whose response comes next."""
        if method == b"HEAD":
            self._scan = 1
        elif method == b"CONNECT":
            self._scan = 2
        else:
            self._scan = 0
            return
        self._tail = 0

    def feed(self, data: bytes) -> bytes | None:
        """Parse ``data``; returns the bytes after a 101 / CONNECT 2xx head, else None."""
        if self._busy:
            self._reentered()
        if self._dead:
            return self._after_death(data)
        if self._scan:
            return self._feed_scan(data)
        return self._feed(data)

    def feed_eof(self) -> None:
        """The upstream closed its side: finish a read-until-close body, or fail."""
        if self._dead:
            if self._error is not None:
                raise self._error
            return
        if not self.message_open:
            return
        if self._st == _BODY and self._eof_body:
            self.message_open = False
            self._dead = True
            self._error = HttpProtocolError(502, _UPSTREAM_EOF)  # nothing may follow EOF
            self._t.on_message_complete(None)
            return
        raise self._die(502, _UPSTREAM_EOF)

    # -- HEAD / CONNECT framing ---------------------------------------------------------------
    def _feed_scan(self, data: bytes) -> bytes | None:
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
                    self._st = _HEAD
                    self._raw = 0
                    tr = self._tr  # always None: no body, no trailers
                    self._tr = None
                    self._p = HttpResponseParser(self)
                    try:
                        self._t.on_message_complete(tr)
                    except BaseException:
                        self._target_failed()
                        raise
        return None

    # -- llhttp callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        # Stays set across 1xx interim responses: until the final response completes, EOF is
        # an error.
        self.message_open = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._st:
            self._trailer(name.lower(), value.rstrip(b" \t"))
            return
        name = name.lower()
        value = value.rstrip(b" \t")
        self._hsize += len(name) + len(
            value
        )  # checked at the end of the head (the raw bound holds till then)
        if name in _RESP_SPECIAL:
            # Framing and connection management belong to this hop: the codec consumes them
            # (Content-Length stays, it describes the body).
            if name == b"content-length":
                self._content_length(value)
            elif name == b"transfer-encoding":
                self._transfer_encoding(value)
                return
            else:
                if name == b"connection":
                    self._connection = self._connection + b"," + value if self._connection else value
                return
        h = self._h
        h.append((name, value))
        if len(h) > self._max_n:
            self._too_large(self._hsize)

    def on_headers_complete(self) -> None:
        p = self._p
        ver = _VERSIONS.get(p.get_http_version())
        if ver is None:
            raise self._die(502, _CODEC_ERROR)
        if self._hsize > self._max_bytes:
            self._too_large(self._hsize)
        status = p.get_status_code()
        h = self._h
        scan = self._scan
        upgrade = status == 101 and p.should_upgrade()
        if scan and status >= 200:
            keep_alive = _keep_alive(ver, self._connection)  # llhttp would assume a read-until-close body
            if scan == 1:
                self._forced = True
            elif status < 300:
                self._connect_2xx = upgrade = True
                keep_alive = False
            else:
                self._scan = 0  # a refused CONNECT is an ordinary response with a body
                keep_alive = p.should_keep_alive()
        else:
            keep_alive = p.should_keep_alive()
        chunked = self._chunked
        cl = self._cl
        if (status < 200 or status == 204) and status != 101:
            # These never have a body (RFC 9110 8.6, 6.4.1): a length or chunked framing on them
            # is an upstream fault (Envoy: protocol error); Content-Length: 0 is dropped.
            if chunked or (cl is not None and cl != 0):
                raise self._die(502, "http1.content_length_not_allowed")
            if cl == 0:
                h[:] = [p for p in h if p[0] != b"content-length"]
                cl = None
        head = _new(ResponseHead)
        head._h = h
        head.status = status
        head.version = ver
        head.keep_alive = keep_alive
        head.content_length = cl
        head.chunked = chunked
        head.upgrade = upgrade
        head.header_bytes = self._hsize + 17 + 4 * len(h)  # (the reason phrase is not counted)
        if status < 200 or status == 204 or status == 304 or self._forced:
            self._st = _HEAD  # no body follows
            self._eof_body = False
        else:
            self._st = _CHUNKED if chunked else _BODY
            self._eof_body = not chunked and cl is None
        self._raw = 0
        self._status = status
        self._h = []
        self._hsize = 0
        self._cl = None
        self._chunked = False
        self._connection = b""
        try:
            self._t.on_response_head(head)
        except BaseException as e:
            self._exc = e
            raise

    def on_message_complete(self) -> None:
        self._st = _HEAD
        self._raw = 0
        if self._status < 200 or self._connect_2xx:
            # Interim (1xx): the final response is still to come (101 ends parsing here).
            # CONNECT 2xx: the tunnel is the body.
            return
        self.message_open = False
        tr = self._tr
        try:
            if tr is None:
                self._t.on_message_complete(None)
                return
            self._tr = None
            self._trsize = 0
            self._t.on_message_complete(HeaderMap.wrap(tr))
        except BaseException as e:
            self._exc = e
            raise


# -- encoders ---------------------------------------------------------------------------------


def _reason_for(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b"Unknown"  # what Envoy writes for a code it has no name for


# Status lines for HTTP/1.1 with the standard reason, built once.
_STATUS_LINES = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, _reason_for(s)) for s in HTTPStatus}


def _pairs(headers: HeaderMap | list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return headers.items() if isinstance(headers, HeaderMap) else headers


def encode_request_head(
    method: bytes,
    target: bytes,
    headers: HeaderMap | list[tuple[bytes, bytes]],
    version: bytes = b"1.1",
) -> bytes:
    """Request line + headers + blank line. Names and values are written as given; the caller
    guarantees they hold no CR/LF (parsed ones cannot)."""
    parts = [method, b" ", target, b" HTTP/", version, b"\r\n"]
    for k, v in _pairs(headers):
        parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_response_head(
    status: int,
    headers: HeaderMap | list[tuple[bytes, bytes]],
    reason: bytes | None = None,
    version: bytes = b"1.1",
) -> bytes:
    """Status line (standard reason phrase when ``reason`` is None) + headers + blank line."""
    line = _STATUS_LINES.get(status) if reason is None and version == b"1.1" else None
    if line is None:
        if reason is None:
            reason = _reason_for(status)
        line = b"HTTP/%s %d %s\r\n" % (version, status, reason)
    parts = [line]
    for k, v in _pairs(headers):
        parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# What ``encode_response_fields`` saw (bit flags).
HAS_CONTENT_LENGTH = 1
HAS_DATE = 2
HAS_SERVER = 4

_REQ_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"upgrade"))
_RESP_DROP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))


def encode_request_head_fields(
    method: bytes, path: bytes, authority: bytes, fields: list[tuple[bytes, bytes]], body_follows: bool
) -> tuple[bytes, bool]:
    """A proxied request's head in one pass: the request line, ``host`` from the authority, the
    fields as given except Transfer-Encoding (this hop frames the body itself), and the blank
    line. Returns the head and whether the body goes chunked: it does when one follows with no
    Content-Length, unless the request is an upgrade or CONNECT (its body is the tunnel).
    Names and values are written as given; the callers guarantee they hold no CR/LF."""
    parts = (
        [method, b" ", path, b" HTTP/1.1\r\nhost: ", authority]
        if authority
        else [method, b" ", path, b" HTTP/1.1"]
    )
    has_len = upgrade = False
    for k, v in fields:
        if k in _REQ_FRAMING:
            if k == b"transfer-encoding":
                continue
            if k == b"content-length":
                has_len = True
            else:
                upgrade = True
        parts += (b"\r\n", k, b": ", v)
    chunked = body_follows and not has_len and not upgrade and method != b"CONNECT"
    parts.append(b"\r\ntransfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n\r\n")
    return b"".join(parts), chunked


def encode_response_fields(fields: list[tuple[bytes, bytes]], keep_server: bool) -> tuple[bytes, int]:
    """A response's header lines (``name: value`` and CRLF each) without the hop-by-hop ones
    (Connection, Keep-Alive, Proxy-Connection, Transfer-Encoding, Upgrade: the encoder writes its
    own) and without ``server`` unless ``keep_server``. Returns them with the ``HAS_*`` flags of
    what was present (Content-Length, Date, and Server when kept)."""
    parts: list[bytes] = []
    seen = 0
    for k, v in fields:
        if k in _RESP_NOTED:
            if k in _RESP_DROP:
                continue
            if k == b"content-length":
                seen |= HAS_CONTENT_LENGTH
            elif k == b"date":
                seen |= HAS_DATE
            elif keep_server:
                seen |= HAS_SERVER
            else:
                continue
        parts += (k, b": ", v, b"\r\n")
    return b"".join(parts), seen


_RESP_NOTED = _RESP_DROP | frozenset((b"content-length", b"date", b"server"))


def encode_chunk(data: bytes) -> bytes:
    """One chunk; ``b""`` encodes to ``b""`` so it can never end the body by accident."""
    if not data:
        return b""
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))


def encode_last_chunk(trailers: HeaderMap | list[tuple[bytes, bytes]] | None = None) -> bytes:
    """The last chunk, with the trailer section when there are trailers."""
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for k, v in _pairs(trailers):
        parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# docs/INTERNALS.md names it so.
encode_trailers = encode_last_chunk


# The compiled parsers and field encoders (``_http1c``, built by scripts/build-native.py) have the
# same contract and are used when present; ``MOORLINE_PURE_PYTHON=1`` keeps these reference ones (the codec tests
# run against both).
PyRequestParser = RequestParser
PyResponseParser = ResponseParser
py_encode_request_head_fields = encode_request_head_fields
py_encode_response_fields = encode_response_fields
if not os.environ.get("MOORLINE_PURE_PYTHON"):
    try:
        from moorline.protocol._http1c import (  # type: ignore[import-not-found,no-redef,assignment,unused-ignore]
            RequestParser,
            ResponseParser,
            encode_request_head_fields,
            encode_response_fields,
        )
    except ImportError:
        pass
NATIVE: bool = RequestParser is not PyRequestParser
