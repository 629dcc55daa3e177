"""The HTTP/1.1 codec's shared vocabulary: parsed heads, limits, errors and the constants both
parser backends use (the pure-Python parsers in ``http1`` and the compiled ``_http1c``). Sans-IO."""

from __future__ import annotations

from typing import Any

from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders

# Envoy's HttpProtocolOptions.HeadersWithUnderscoresAction, same numbers.
ALLOW = 0
REJECT_REQUEST = 1
DROP_HEADER = 2

# Headers that describe one hop and never cross the proxy: the set Envoy's connection manager
# strips (ConnectionManagerUtility). ``te: trailers`` is the caller's business (gRPC needs it
# upstream); ``upgrade``/``connection`` are re-added by the caller for upgrades it forwards.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade")
)

LAST_CHUNK = b"0\r\n\r\n"

_CODEC_ERROR = "http1.codec_error"
_TOO_LARGE = "http1.headers_too_large"
_TOO_MANY = "http1.too_many_headers"
_BAD_TE = "http1.invalid_transfer_encoding"
_CL_AND_TE = "http1.content_length_and_chunked_not_allowed"
_UNDERSCORE = "http1.unexpected_underscore"
_BAD_CHARS = "http1.invalid_characters"
_BODY_DISALLOWED = "http1.body_disallowed"
_MISSING_HOST = "missing_host_header"
_UPSTREAM_EOF = "upstream closed mid-message"

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_CRLF2 = b"\r\n\r\n"

# llhttp's error reasons that deserve a more precise answer than "400 http1.codec_error".
_LLHTTP_ERRORS: dict[str, tuple[int, str]] = {
    "Content-Length can't be present with Transfer-Encoding": (400, _CL_AND_TE),
    "Transfer-Encoding can't be present with Content-Length": (400, _CL_AND_TE),
    "Invalid `Transfer-Encoding` header value": (501, _BAD_TE),
    "Request has invalid `Transfer-Encoding`": (501, _BAD_TE),
    "Invalid HTTP version": (505, _CODEC_ERROR),
    "Invalid header value char": (400, _BAD_CHARS),
    "Invalid header field char": (400, _BAD_CHARS),
    "Invalid header token": (400, _BAD_CHARS),
}


class HttpProtocolError(Exception):
    """The peer broke HTTP/1.1. ``status_hint`` is what to answer, ``detail`` Envoy's
    response_code_details string. A parser that raised it is dead: every later ``feed`` raises
    the same error."""

    def __init__(self, status_hint: int, detail: str) -> None:
        super().__init__(status_hint, detail)
        self.status_hint = status_hint
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.status_hint} {self.detail}"


class Limits:
    """Parser limits, read once when a parser is built."""

    __slots__ = ("headers_with_underscores", "max_header_bytes", "max_headers")

    def __init__(
        self,
        max_header_bytes: int = 60 * 1024,
        max_headers: int = 100,
        headers_with_underscores: int = ALLOW,
    ) -> None:
        self.max_header_bytes = max_header_bytes  # Envoy max_request_headers_kb (60) -> 431
        self.max_headers = max_headers  # Envoy max_headers_count (100) -> 431
        self.headers_with_underscores = headers_with_underscores

    def __repr__(self) -> str:
        return (
            f"Limits(max_header_bytes={self.max_header_bytes}, max_headers={self.max_headers}, "
            f"headers_with_underscores={self.headers_with_underscores})"
        )


# Envoy's upstream defaults: 80 KiB (MAX_RESPONSE_HEADERS_KB) and 100 headers.
_RESPONSE_LIMITS = Limits(max_header_bytes=80 * 1024)


class RequestHead(RequestHeaders):
    """A parsed request head. It *is* the request's ``RequestHeaders`` (the server codec hands it
    on without a copy: ``method``, ``path`` = the request-target as sent, ``authority`` = the
    Host header (never a header line), ``scheme`` ``http``, until the server codec resolves
    absolute-form and TLS), plus the codec's facts about the message. ``headers`` is the head itself, for readers that want only the map."""

    __slots__ = (
        "chunked",
        "content_length",
        "expect_continue",
        "header_bytes",
        "keep_alive",
        "target",
        "upgrade",
        "version",
    )

    # llhttp accepts only known methods and request-targets of visible ASCII (0x21-0x7e).
    line_checked = True

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: HeaderMap,
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
        upgrade: bool,
        expect_continue: bool,
        header_bytes: int,
    ) -> None:
        super().__init__(method, target, b"", b"http", headers.items())
        self.target = target  # raw request-target: origin, absolute, authority (CONNECT) or "*"
        self.version = version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.upgrade = upgrade
        self.expect_continue = expect_continue
        # Wire size assuming single spaces around ": " (exact for canonical heads).
        self.header_bytes = header_bytes

    @property
    def headers(self) -> RequestHeaders:
        return self

    def __repr__(self) -> str:
        return (
            f"RequestHead({self.method!r}, {self.target!r}, {self.version!r}, {self._h!r}, "
            f"keep_alive={self.keep_alive}, content_length={self.content_length}, "
            f"chunked={self.chunked}, upgrade={self.upgrade}, expect_continue={self.expect_continue})"
        )


class ResponseHead(ResponseHeaders):
    """A parsed response head: the response's ``ResponseHeaders`` (handed on without a copy)
    plus the codec's facts about the message. The reason phrase is not kept (the proxy writes
    the standard one, as Envoy does), so the parser needs no callback for it."""

    __slots__ = (
        "chunked",
        "content_length",
        "header_bytes",
        "keep_alive",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        status: int,
        version: bytes,
        headers: HeaderMap,
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
        upgrade: bool,
        header_bytes: int,
    ) -> None:
        super().__init__(status, headers.items())
        self.version = version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        # 101 Switching Protocols, or a 2xx answer to CONNECT: the connection is now a tunnel.
        self.upgrade = upgrade
        self.header_bytes = header_bytes

    @property
    def headers(self) -> ResponseHeaders:
        return self

    def __repr__(self) -> str:
        return (
            f"ResponseHead({self.status}, {self.version!r}, {self._h!r}, "
            f"keep_alive={self.keep_alive}, content_length={self.content_length}, "
            f"chunked={self.chunked}, upgrade={self.upgrade})"
        )


_new = object.__new__  # builds a head without running __init__ (the parsers' fast path)
# The request parser's header list between requests (an immutable stand-in: a header before a
# request line cannot happen, and would fail loudly rather than share a list).
_NO_HEADERS: Any = ()


# Parser states (``_st``): which bound applies to the next fed bytes.
_HEAD = 0  # between messages or inside a head: raw bound
_BODY = 1  # Content-Length / read-until-close body: unbounded stream, nothing buffered
_CHUNKED = 2  # chunked body: raw bound on size lines and trailers, reset per chunk


_REQ_SPECIAL = frozenset((b"content-length", b"transfer-encoding", b"host", b"expect", b"upgrade"))
# What the response parser acts on. All but Content-Length are consumed (never listed):
# ``Upgrade`` is listed (a 101 forwards it), the rest are this hop's.
_RESP_SPECIAL = frozenset(
    (b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"proxy-connection")
)


# A request head that frames what follows as a chunked body (see RequestParser._upgraded).
_CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"


def _keep_alive(version: bytes, connection: bytes) -> bool:
    """HTTP/1.x persistence from the Connection header values (for heads llhttp cannot judge)."""
    tokens = {t.strip().lower() for t in connection.split(b",")}
    if version == b"1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def llhttp_error(reason: str, bad_status: int) -> tuple[int, str]:
    """The status and detail to answer for llhttp's error ``reason``: the precise ones of
    ``_LLHTTP_ERRORS``, else 400 ``http1.codec_error``; an upstream parser (``bad_status``
    502) always answers its own status."""
    status, detail = _LLHTTP_ERRORS.get(reason, (400, _CODEC_ERROR))
    return (status if bad_status == 400 else bad_status), detail


def find_head_end(tail: int, data: bytes) -> tuple[int, int]:
    """Where a head ends, for heads llhttp cannot frame (answers to HEAD and CONNECT): the index
    just past the first CRLFCRLF of the stream (``data`` continues the previous feed, whose last
    ``tail`` bytes, 0-3, were a CRLFCRLF prefix), or -1; and the new ``tail``."""
    if tail:
        i = (_CRLF2[:tail] + data[:3]).find(_CRLF2)
        if i >= 0:
            return i + 4 - tail, 0
    i = data.find(_CRLF2)
    if i >= 0:
        return i + 4, 0
    s = (_CRLF2[:tail] + data)[-3:] if len(data) < 3 else data[-3:]
    return -1, (3 if s == b"\r\n\r" else 2 if s.endswith(b"\r\n") else 1 if s.endswith(b"\r") else 0)
