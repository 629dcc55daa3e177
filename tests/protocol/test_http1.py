"""Tests for moorline.protocol.http1: framing, hardening, limits, encoders."""

from __future__ import annotations

import pytest

from moorline.protocol.headers import HeaderMap
from moorline.protocol.http1 import (
    DROP_HEADER,
    HOP_BY_HOP,
    LAST_CHUNK,
    REJECT_REQUEST,
    HttpProtocolError,
    Limits,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
    encode_response_head,
    encode_trailers,
)


class Rec:
    """Parser target recording events as plain tuples; body pieces are merged so that
    different splits of the same bytes compare equal."""

    def __init__(self) -> None:
        self.ev: list[tuple] = []
        self.heads: list[RequestHead | ResponseHead] = []

    def on_request_head(self, h: RequestHead) -> None:
        self.heads.append(h)
        self.ev.append(
            (
                "head",
                h.method,
                h.target,
                h.version,
                list(h.headers),
                h.keep_alive,
                h.content_length,
                h.chunked,
                h.upgrade,
                h.expect_continue,
                h.header_bytes,
            )
        )

    def on_response_head(self, h: ResponseHead) -> None:
        self.heads.append(h)
        self.ev.append(
            (
                "rhead",
                h.status,
                None,  # (the reason phrase is not kept)
                h.version,
                list(h.headers),
                h.keep_alive,
                h.content_length,
                h.chunked,
                h.upgrade,
            )
        )

    def on_body(self, b: bytes) -> None:
        assert isinstance(b, bytes) and b
        if self.ev and self.ev[-1][0] == "body":
            self.ev[-1] = ("body", self.ev[-1][1] + b)
        else:
            self.ev.append(("body", b))

    def on_message_complete(self, trailers: HeaderMap | None) -> None:
        self.ev.append(("done", None if trailers is None else list(trailers)))


def parse_req(data: bytes, limits: Limits | None = None) -> tuple[Rec, bytes | None]:
    r = Rec()
    p = RequestParser(r, limits)
    left = p.feed(data)
    return r, left


def parse_req_split(data: bytes, cuts: list[int], limits: Limits | None = None) -> tuple[Rec, bytes | None]:
    """Feed ``data`` cut at the sorted offsets ``cuts``; once an upgrade happens, the returned
    leftover plus the remaining pieces make up the tunnel bytes."""
    r = Rec()
    p = RequestParser(r, limits)
    left: bytes | None = None
    prev = 0
    for c in [*cuts, len(data)]:
        piece = data[prev:c]
        prev = c
        if left is not None:
            left += piece
            continue
        left = p.feed(piece)
    return r, left


def req_error(data: bytes, limits: Limits | None = None) -> HttpProtocolError:
    r = Rec()
    p = RequestParser(r, limits)
    with pytest.raises(HttpProtocolError) as ei:
        p.feed(data)
    return ei.value


# ---------------------------------------------------------------------------------------------
# requests: basics


def test_simple_get_head_fields() -> None:
    r, left = parse_req(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Thing:   v a l  \t\r\n\r\n")
    assert left is None
    (h,) = r.heads
    assert isinstance(h, RequestHead)
    assert h.method == b"GET"
    assert h.target == b"/a?b=1"
    assert h.version == b"1.1"
    # Host is the authority, not a header line (HTTP/2's :authority; Envoy's codec alike)
    assert list(h.headers) == [(b"x-thing", b"v a l")]
    assert h.authority == b"example.com" and h.get(b":authority") == b"example.com"
    assert h.keep_alive is True
    assert h.content_length is None and h.chunked is False
    assert h.upgrade is False and h.expect_continue is False
    # the head as it appears on the wire, minus the extra whitespace around "v a l"
    assert h.header_bytes == len(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Thing: v a l\r\n\r\n")
    assert r.ev[-1] == ("done", None)


def test_content_length_body_and_pipelining() -> None:
    data = (
        b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"PUT /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    )
    r, left = parse_req(data)
    assert left is None
    kinds = [e[0] for e in r.ev]
    assert kinds == ["head", "body", "done", "head", "done", "head", "done"]
    assert [h.target for h in r.heads] == [b"/1", b"/2", b"/3"]
    assert r.ev[1] == ("body", b"hello")
    assert [h.content_length for h in r.heads] == [5, None, 0]


def test_chunked_with_extensions_and_trailers() -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value;x\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n"
        b"0\r\nX-Checksum: abc\r\nGrpc-Status:  0 \r\n\r\n"
    )
    r, _ = parse_req(data)
    assert r.heads[0].chunked is True
    assert r.ev[1:] == [
        ("body", b"hello 0123456789"),
        ("done", [(b"x-checksum", b"abc"), (b"grpc-status", b"0")]),
    ]


def test_chunked_without_trailers_reports_none() -> None:
    r, _ = parse_req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert r.ev[-1] == ("done", None)


def test_transfer_encoding_chunked_is_case_insensitive() -> None:
    r, _ = parse_req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ChUnKeD\r\n\r\n0\r\n\r\n")
    assert r.heads[0].chunked is True


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
    ],
)
def test_keep_alive_rules(head: bytes, keep_alive: bool) -> None:
    r, _ = parse_req(head)
    assert r.heads[0].keep_alive is keep_alive


def test_http10_without_host_is_fine() -> None:
    r, _ = parse_req(b"GET / HTTP/1.0\r\n\r\n")
    assert r.heads[0].version == b"1.0"
    assert r.ev[-1] == ("done", None)


@pytest.mark.parametrize(
    ("head", "expect"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n", True),
        (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\nContent-Length: 1\r\n\r\n", False),
        # RFC 9110 10.1.1: a server ignores 100-continue from HTTP/1.0 clients
        (b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", False),
    ],
)
def test_expect_continue(head: bytes, expect: bool) -> None:
    r, _ = parse_req(head)
    assert r.heads[0].expect_continue is expect
    assert [e[0] for e in r.ev] == ["head"]  # body not arrived yet


def test_absolute_form_and_options_star() -> None:
    r, _ = parse_req(b"GET http://h.example/x?y HTTP/1.1\r\n\r\n")
    assert r.heads[0].target == b"http://h.example/x?y"
    r, _ = parse_req(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert r.heads[0].target == b"*"


def test_websocket_upgrade_returns_leftover_and_stops() -> None:
    data = (
        b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x05hello GET / HTTP/1.1\r\n\r\n"
    )
    r = Rec()
    p = RequestParser(r)
    left = p.feed(data)
    assert left == b"\x81\x05hello GET / HTTP/1.1\r\n\r\n"
    assert r.heads[0].upgrade is True
    assert [e[0] for e in r.ev] == ["head"]  # no message_complete: the tunnel is the body
    # once a tunnel, always a tunnel: more bytes come straight back
    assert p.feed(b"more") == b"more"
    assert len(r.ev) == 1


def test_upgrade_with_nothing_after_head_returns_empty_bytes() -> None:
    _r, left = parse_req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert left == b""


def test_upgrade_header_without_connection_upgrade_is_plain_request() -> None:
    r, left = parse_req(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
    assert left is None
    assert r.heads[0].upgrade is False
    assert r.ev[-1] == ("done", None)


def test_connect_is_a_tunnel() -> None:
    r, left = parse_req(b"CONNECT db.internal:5432 HTTP/1.1\r\n\r\n\x16\x03\x01")
    (h,) = r.heads
    assert h.method == b"CONNECT" and h.target == b"db.internal:5432" and h.upgrade is True
    assert left == b"\x16\x03\x01"
    assert [e[0] for e in r.ev] == ["head"]


def test_request_after_complete_request_is_not_an_upgrade() -> None:
    # the first request completes normally; the second is an upgrade
    data = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nX"
    )
    r, left = parse_req(data)
    assert left == b"X"
    assert [e[0] for e in r.ev] == ["head", "done", "head"]


# ---------------------------------------------------------------------------------------------
# splitting at every byte boundary gives the same events

CORPUS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nX-A: b\r\n\r\nhello world"
    b"GET /next HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    b"PUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nT-One: 1\r\nT-Two: 2\r\n\r\n"
    b"DELETE /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # a stray CRLF between requests is tolerated
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nFRAME-DATA",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\nTLS",
]


@pytest.mark.parametrize("data", CORPUS)
def test_request_every_split_point_gives_same_events(data: bytes) -> None:
    whole, whole_left = parse_req(data)
    for i in range(1, len(data)):
        r, left = parse_req_split(data, [i])
        assert r.ev == whole.ev, i
        assert left == whole_left, i
    r, left = parse_req_split(data, list(range(1, len(data))))  # one byte at a time
    assert r.ev == whole.ev
    assert left == whole_left


# ---------------------------------------------------------------------------------------------
# hardening


@pytest.mark.parametrize(
    ("data", "status", "detail"),
    [
        # request smuggling framings
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "http1.content_length_and_chunked_not_allowed",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            400,
            "http1.content_length_and_chunked_not_allowed",
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400, None),
        # identical duplicates: llhttp refuses them too (accepting would also be allowed)
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\n", 400, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3a\r\n\r\n", 400, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", 400, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1_0\r\n\r\n", 400, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400, None),
        # transfer codings other than exactly "chunked": 501 like Envoy
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            "http1.invalid_transfer_encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            501,
            "http1.invalid_transfer_encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            501,
            "http1.invalid_transfer_encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "http1.invalid_transfer_encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
            "http1.invalid_transfer_encoding",
        ),
        # bad chunks
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            400,
            None,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
            400,
            None,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            400,
            None,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n", 400, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400, None),
        # header syntax
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\n\r\n", 400, None),  # obs-fold
        (b"GET / HTTP/1.1\r\n\tHost: a\r\n\r\n", 400, None),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400, None),  # bare LF after request line
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400, None),  # bare LF after a header
        (b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400, None),  # bare LF ending the head
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "http1.invalid_characters"),
        (b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400, "http1.invalid_characters"),
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400, "http1.invalid_characters"),
        (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400, None),
        (b"GET / HTTP/1.1\r\nHost: a\x7f\r\n\r\n", 400, "http1.invalid_characters"),
        (b"GET / HTTP/1.1\r\nH\x01st: a\r\n\r\n", 400, "http1.invalid_characters"),
        (b"GET / HTTP/1.1\r\nX(y): a\r\n\r\n", 400, "http1.invalid_characters"),
        (b"GET / HTTP/1.1\r\n: a\r\n\r\n", 400, None),
        # request line
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400, None),
        (b"GET / HTTP/1.1 x\r\nHost: a\r\n\r\n", 400, None),
        (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 400, None),
        (b"GETTTTTTTTTTTTTTTTTTTTTTTTTTT / HTTP/1.1\r\n\r\n", 400, None),
        (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400, None),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, None),  # TLS ClientHello on plaintext
        (b"GET / HTTP/1.1\x00\r\n\r\n", 400, None),
        (b"GET /\x00 HTTP/1.1\r\n\r\n", 400, None),
        # versions
        (b"GET /\r\n\r\n", 400, None),  # HTTP/0.9
        (b"GET / HTTP/0.9\r\n\r\n", 400, None),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, None),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505, None),
        (b"GET / HTTP/3.1\r\nHost: a\r\n\r\n", 505, None),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, None),  # h2 preface on the HTTP/1 codec
        # host
        (b"GET / HTTP/1.1\r\n\r\n", 400, "missing_host_header"),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", 400, "missing_host_header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, None),
        # CONNECT framing
        (b"CONNECT h:1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 400, "http1.body_disallowed"),
        (
            b"CONNECT h:1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
            "http1.invalid_transfer_encoding",
        ),
    ],
)
def test_request_rejections(data: bytes, status: int, detail: str | None) -> None:
    err = req_error(data)
    assert err.status_hint == status
    assert err.detail == (detail or err.detail)
    assert isinstance(err.detail, str) and err.detail


def test_rejections_hold_when_fed_byte_by_byte() -> None:
    for data in (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n",
    ):
        whole = req_error(data)
        p = RequestParser(Rec())
        with pytest.raises(HttpProtocolError) as ei:
            for i in range(len(data)):
                p.feed(data[i : i + 1])
        assert (ei.value.status_hint, ei.value.detail) == (whole.status_hint, whole.detail)


def test_connect_with_zero_content_length_is_accepted() -> None:
    _r, left = parse_req(b"CONNECT h:1 HTTP/1.1\r\nContent-Length: 0\r\n\r\nX")
    assert left == b"X"


def test_errored_parser_stays_errored() -> None:
    r = Rec()
    p = RequestParser(r)
    with pytest.raises(HttpProtocolError) as ei:
        p.feed(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
    first = ei.value
    for more in (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b""):
        with pytest.raises(HttpProtocolError) as ei2:
            p.feed(more)
        assert ei2.value is first
    assert r.heads == []


def test_error_after_good_requests_keeps_their_events() -> None:
    r = Rec()
    p = RequestParser(r)
    with pytest.raises(HttpProtocolError):
        p.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /bad HTTP/1.1\r\nHost : a\r\n\r\n")
    assert [h.target for h in r.heads] == [b"/ok"]
    assert r.ev[-1] == ("done", None)


def test_target_exception_propagates_and_kills_parser() -> None:
    class Boom(Rec):
        def on_request_head(self, h: RequestHead) -> None:
            raise KeyError("bug upstairs")

    p = RequestParser(Boom())
    with pytest.raises(KeyError):
        p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(HttpProtocolError) as ei:
        p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert ei.value.status_hint == 500


# ---------------------------------------------------------------------------------------------
# limits


def test_default_limits_are_envoys() -> None:
    lim = Limits()
    assert lim.max_header_bytes == 60 * 1024
    assert lim.max_headers == 100


def test_header_bytes_limit_431() -> None:
    lim = Limits(max_header_bytes=1024)
    ok = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 900 + b"\r\n\r\n"
    r, _ = parse_req(ok, lim)
    assert r.ev[-1] == ("done", None)
    err = req_error(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 1100 + b"\r\n\r\n", lim)
    assert (err.status_hint, err.detail) == (431, "http1.headers_too_large")


def test_header_bytes_limit_counts_all_headers_and_url() -> None:
    lim = Limits(max_header_bytes=1000, max_headers=1000)
    many = b"".join(b"h%03d: %s\r\n" % (i, b"x" * 40) for i in range(30))  # 30 * 44 > 1000
    err = req_error(b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n", lim)
    assert err.status_hint == 431
    # the URL counts too
    err = req_error(b"GET /" + b"u" * 600 + b" HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 500 + b"\r\n\r\n", lim)
    assert err.status_hint == 431


def test_too_many_headers_431() -> None:
    hdrs = b"".join(b"h%d: v\r\n" % i for i in range(100))
    r, _ = parse_req(b"GET / HTTP/1.0\r\n" + hdrs + b"\r\n")
    assert len(r.heads[0].headers) == 100
    err = req_error(b"GET / HTTP/1.1\r\nHost: a\r\n" + hdrs + b"\r\n")
    assert (err.status_hint, err.detail) == (431, "http1.too_many_headers")


def test_url_too_long_431() -> None:
    lim = Limits(max_header_bytes=2048)
    err = req_error(b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", lim)
    assert (err.status_hint, err.detail) == (431, "http1.headers_too_large")


def _dribble_until_error(p: RequestParser, prefix: bytes, filler: bytes, limit: int) -> int:
    p.feed(prefix)
    fed = len(prefix)
    with pytest.raises(HttpProtocolError) as ei:
        while fed < limit:
            p.feed(filler)
            fed += len(filler)
    assert ei.value.status_hint == 431
    return fed


def test_endless_header_value_fed_one_byte_at_a_time_is_bounded() -> None:
    lim = Limits(max_header_bytes=4096, max_headers=10)
    p = RequestParser(Rec(), lim)
    fed = _dribble_until_error(p, b"GET / HTTP/1.1\r\nHost: a\r\nX: ", b"v", 100_000)
    # the head is refused within the documented raw bound (2 x limit + 4 x headers + 4 KiB)
    assert fed <= 2 * 4096 + 4 * 10 + 4096 + 1


def test_endless_header_name_and_url_are_bounded() -> None:
    lim = Limits(max_header_bytes=4096, max_headers=10)
    fed = _dribble_until_error(RequestParser(Rec(), lim), b"GET / HTTP/1.1\r\nX", b"n", 100_000)
    assert fed <= 3 * 4096 + 100
    fed = _dribble_until_error(RequestParser(Rec(), lim), b"GET /", b"u", 100_000)
    assert fed <= 4096 + 10


def test_endless_whitespace_is_bounded() -> None:
    # OWS is not stored by us, but the raw bound still refuses an unending head
    lim = Limits(max_header_bytes=4096, max_headers=10)
    fed = _dribble_until_error(RequestParser(Rec(), lim), b"GET / HTTP/1.1\r\nX:", b" ", 100_000)
    assert fed <= 3 * 4096 + 100


def test_huge_head_in_one_feed_is_refused() -> None:
    err = req_error(b"GET / HTTP/1.1\r\nX: " + b"v" * 1_000_000)
    assert err.status_hint == 431


def test_endless_trailer_is_bounded() -> None:
    lim = Limits(max_header_bytes=4096, max_headers=10)
    p = RequestParser(Rec(), lim)
    prefix = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: "
    fed = _dribble_until_error(p, prefix, b"t", 100_000)
    # raw bound, plus the feed in which the trailer section began (documented slack)
    assert fed <= len(prefix) + 2 * 4096 + 4 * 10 + 4096 + 1


def test_too_many_trailers_431() -> None:
    lim = Limits(max_headers=5)
    trailers = b"".join(b"t%d: v\r\n" % i for i in range(6))
    err = req_error(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + trailers + b"\r\n", lim
    )
    assert (err.status_hint, err.detail) == (431, "http1.too_many_headers")


def test_long_chunked_stream_does_not_trip_the_bound() -> None:
    # many tiny chunks: chunk-size lines add up far beyond the head bound across the message
    lim = Limits(max_header_bytes=1024, max_headers=10)
    r = Rec()
    p = RequestParser(r, lim)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"1;some-extension=value\r\nx\r\n"
    for _ in range(20):
        p.feed(chunk * 500)
    p.feed(b"0\r\n\r\n")
    assert r.ev[1] == ("body", b"x" * 10_000)
    assert r.ev[-1] == ("done", None)


def test_large_bodies_in_one_feed() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB
    lim = Limits(max_header_bytes=1024)
    r, _ = parse_req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body, lim)
    assert r.ev[1:] == [("body", body), ("done", None)]
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + encode_chunk(body) + LAST_CHUNK
    )
    r, _ = parse_req(data + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n", lim)
    assert r.ev[1:3] == [("body", body), ("done", None)]
    assert r.heads[1].target == b"/after"


def test_upgrade_found_inside_a_bounded_feed() -> None:
    lim = Limits(max_header_bytes=1024)
    tail = b"z" * 10_000
    _r, left = parse_req(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n" + tail, lim
    )
    assert left == tail


def test_chunk_extension_too_long_is_refused() -> None:
    lim = Limits(max_header_bytes=1024, max_headers=10)
    p = RequestParser(Rec(), lim)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;x=")
    with pytest.raises(HttpProtocolError):
        for _ in range(10_000):
            p.feed(b"y")


def test_underscores_allow_reject_drop() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX_Foo: 1\r\nX-Bar: 2\r\n\r\n"
    r, _ = parse_req(data)
    assert list(r.heads[0].headers) == [(b"x_foo", b"1"), (b"x-bar", b"2")]
    err = req_error(data, Limits(headers_with_underscores=REJECT_REQUEST))
    assert (err.status_hint, err.detail) == (400, "http1.unexpected_underscore")
    r, _ = parse_req(data, Limits(headers_with_underscores=DROP_HEADER))
    assert list(r.heads[0].headers) == [(b"x-bar", b"2")]
    # trailers follow the same rule
    chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT_X: 1\r\nT-Y: 2\r\n\r\n"
    r, _ = parse_req(chunked, Limits(headers_with_underscores=DROP_HEADER))
    assert r.ev[-1] == ("done", [(b"t-y", b"2")])
    err = req_error(chunked, Limits(headers_with_underscores=REJECT_REQUEST))
    assert err.detail == "http1.unexpected_underscore"


# ---------------------------------------------------------------------------------------------
# responses


def parse_resp(chunks: list[bytes], method: bytes = b"GET", eof: bool = False) -> tuple[Rec, bytes | None]:
    r = Rec()
    p = ResponseParser(r)
    p.expect(method)
    left = None
    for c in chunks:
        left = p.feed(c)
    if eof:
        p.feed_eof()
    return r, left


def test_response_content_length() -> None:
    r, left = parse_resp([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer:  x \r\n\r\nabc"])
    assert left is None
    assert r.ev == [
        ("rhead", 200, None, b"1.1", [(b"content-length", b"3"), (b"server", b"x")], True, 3, False, False),
        ("body", b"abc"),
        ("done", None),
    ]


def test_response_hop_by_hop_headers_are_consumed_not_listed() -> None:
    # Framing and connection management are this hop's: the codec acts on them (keep-alive,
    # chunked) and the proxy never forwards them. Upgrade stays (a 101 writes it back).
    r, _ = parse_resp(
        [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Connection: x\r\nTransfer-Encoding: chunked\r\nUpgrade: foo\r\nX-A: 1\r\n\r\n"
            b"0\r\n\r\n"
        ]
    )
    assert r.ev[0][4] == [(b"upgrade", b"foo"), (b"x-a", b"1")]
    assert r.ev[0][5] is False  # Connection: close was seen
    assert r.ev[0][7] is True  # chunked


def test_response_header_bytes_limit_checked_at_end_of_head() -> None:
    p = ResponseParser(Rec(), Limits(max_header_bytes=100, max_headers=10))
    with pytest.raises(HttpProtocolError) as ei:
        p.feed(b"HTTP/1.1 200 OK\r\nX: " + b"v" * 60 + b"\r\nY: " + b"w" * 60 + b"\r\n\r\n")
    assert (ei.value.status_hint, ei.value.detail) == (502, "http1.headers_too_large")


def test_response_to_head_keep_alive_from_consumed_connection_header() -> None:
    for conn, ka in ((b"close", False), (b"keep-alive", True)):
        r = Rec()
        p = ResponseParser(r)
        p.expect(b"HEAD")
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: " + conn + b"\r\n\r\n")
        assert r.ev[0][4] == [(b"content-length", b"5")]
        assert r.ev[0][5] is ka


def test_response_chunked_with_trailers() -> None:
    r, _ = parse_resp(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n"]
    )
    assert r.ev[1:] == [("body", b"abc"), ("done", [(b"grpc-status", b"0")])]


def test_204_with_a_length_is_an_upstream_fault() -> None:
    """Envoy rejects 1xx/204 responses with a non-zero Content-Length or chunked framing (a
    client trusting that length would swallow the next response); a zero length is dropped."""
    for bad in (b"Content-Length: 5", b"Transfer-Encoding: chunked"):
        p = ResponseParser(Rec())
        p.expect(b"GET")
        with pytest.raises(HttpProtocolError) as ei:
            p.feed(b"HTTP/1.1 204 X\r\n" + bad + b"\r\n\r\n")
        assert ei.value.status_hint == 502
    r = Rec()
    p = ResponseParser(r)
    p.expect(b"GET")
    p.feed(b"HTTP/1.1 204 X\r\nContent-Length: 0\r\nX-A: 1\r\n\r\n")
    assert r.ev[0][0] == "rhead" and r.ev[-1] == ("done", None)
    assert b"content-length" not in [k for k, _ in r.ev[0][4]]


@pytest.mark.parametrize("status", [304])
def test_304_has_no_body_even_with_content_length(status: int) -> None:
    data = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status
    r = Rec()
    p = ResponseParser(r)
    p.expect(b"GET")
    p.feed(data)
    assert r.ev[-1] == ("done", None)
    # the next response follows right away
    p.expect(b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert r.ev[-2:] == [("body", b"hi"), ("done", None)]


def test_interim_responses_each_get_a_head_and_no_completion() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    )
    r, _ = parse_resp([data])
    assert [(e[0], e[1]) if e[0] == "rhead" else e[0] for e in r.ev] == [
        ("rhead", 100),
        ("rhead", 103),
        ("rhead", 200),
        "body",
        "done",
    ]


def test_101_switching_protocols_returns_leftover() -> None:
    r = Rec()
    p = ResponseParser(r)
    p.expect(b"GET")
    left = p.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    )
    assert left == b"\x81\x00"
    assert r.ev[0][1] == 101 and r.ev[0][8] is True
    assert len(r.ev) == 1
    assert p.feed(b"more") == b"more"


def test_101_without_upgrade_header_is_a_protocol_error() -> None:
    r = Rec()
    p = ResponseParser(r)
    with pytest.raises(HttpProtocolError) as ei:
        p.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\nxx")
    assert ei.value.status_hint == 502


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
    ],
)
def test_head_responses_have_no_body(head: bytes) -> None:
    nxt = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    whole, left = parse_resp([head + nxt], method=b"HEAD")
    assert left is None
    heads = [e for e in whole.ev if e[0] == "rhead"]
    final = heads[-2]
    assert final[5] is True  # keep-alive although llhttp alone would read until close
    # the HEAD answer completes without body; the next response is parsed normally
    assert [e[0] for e in whole.ev][-5:] == ["rhead", "done", "rhead", "body", "done"]
    assert whole.ev[-2] == ("body", b"hi")
    # and byte-by-byte gives the same
    data = head + nxt
    r = Rec()
    p = ResponseParser(r)
    p.expect(b"HEAD")
    for i in range(len(data)):
        assert p.feed(data[i : i + 1]) is None
    assert r.ev == whole.ev
    for cut in range(1, len(data)):
        r2, _ = parse_resp([data[:cut], data[cut:]], method=b"HEAD")
        assert r2.ev == whole.ev, cut


def test_head_response_content_length_reported_and_connection_close() -> None:
    r, _ = parse_resp([b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nConnection: close\r\n\r\n"], method=b"HEAD")
    assert r.ev[0][6] == 99
    assert r.ev[0][5] is False
    assert r.ev[-1] == ("done", None)
    r, _ = parse_resp([b"HTTP/1.0 200 OK\r\nContent-Length: 99\r\n\r\n"], method=b"HEAD")
    assert r.ev[0][5] is False
    r, _ = parse_resp([b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"], method=b"HEAD")
    assert r.ev[0][5] is True


def test_connect_2xx_is_a_tunnel() -> None:
    r, left = parse_resp([b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03"], method=b"CONNECT")
    assert left == b"\x16\x03"
    assert [e[0] for e in r.ev] == ["rhead"]
    assert r.ev[0][8] is True  # upgrade
    # split across feeds: the head completes in the second feed
    r2 = Rec()
    p = ResponseParser(r2)
    p.expect(b"CONNECT")
    assert p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r") is None
    assert p.feed(b"\nTLS") == b"TLS"
    assert [e[0] for e in r2.ev] == ["rhead"]


def test_connect_refused_has_a_body() -> None:
    r, left = parse_resp(
        [b"HTTP/1.1 407 Proxy Auth Required\r\nContent-Length: 4\r\n\r\ndeny"],
        method=b"CONNECT",
    )
    assert left is None
    assert r.ev[1:] == [("body", b"deny"), ("done", None)]


def test_read_until_close_and_eof() -> None:
    r, _ = parse_resp([b"HTTP/1.1 200 OK\r\n\r\nsome ", b"bytes"], eof=True)
    assert r.ev[0][5] is False  # no keep-alive for a close-delimited body
    assert r.ev[1:] == [("body", b"some bytes"), ("done", None)]
    r, _ = parse_resp([b"HTTP/1.0 200 OK\r\n\r\nx"], eof=True)
    assert r.ev[-1] == ("done", None)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\nContent-",
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ],
)
def test_eof_mid_message_is_502(data: bytes) -> None:
    r = Rec()
    p = ResponseParser(r)
    p.feed(data)
    with pytest.raises(HttpProtocolError) as ei:
        p.feed_eof()
    assert (ei.value.status_hint, ei.value.detail) == (502, "upstream closed mid-message")
    with pytest.raises(HttpProtocolError):
        p.feed(b"more")


def test_eof_between_responses_is_fine() -> None:
    r = Rec()
    p = ResponseParser(r)
    p.feed_eof()
    p2 = ResponseParser(r)
    p2.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    p2.feed_eof()
    assert r.ev[-1] == ("done", None)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n",
    ],
)
def test_response_rejections_are_502(data: bytes) -> None:
    p = ResponseParser(Rec())
    with pytest.raises(HttpProtocolError) as ei:
        p.feed(data)
    assert ei.value.status_hint == 502


def test_response_header_limits() -> None:
    p = ResponseParser(Rec(), Limits(max_header_bytes=1024, max_headers=10))
    with pytest.raises(HttpProtocolError) as ei:
        for _ in range(10_000):
            p.feed(b"HTTP/1.1 200 OK\r\nX: " if _ == 0 else b"v")
    assert (ei.value.status_hint, ei.value.detail) == (502, "http1.headers_too_large")


# ---------------------------------------------------------------------------------------------
# encoders


def test_encode_request_head() -> None:
    out = encode_request_head(b"GET", b"/x", [(b"host", b"a"), (b"x-y", b"1")])
    assert out == b"GET /x HTTP/1.1\r\nhost: a\r\nx-y: 1\r\n\r\n"
    out = encode_request_head(b"POST", b"/", HeaderMap([(b"content-length", b"0")]), version=b"1.0")
    assert out == b"POST / HTTP/1.0\r\ncontent-length: 0\r\n\r\n"


def test_encode_response_head() -> None:
    assert encode_response_head(200, [(b"content-length", b"0")]) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    )
    assert encode_response_head(404, []) == b"HTTP/1.1 404 Not Found\r\n\r\n"
    assert encode_response_head(503, HeaderMap(), reason=b"Busy") == b"HTTP/1.1 503 Busy\r\n\r\n"
    assert encode_response_head(200, [], version=b"1.0") == b"HTTP/1.0 200 OK\r\n\r\n"
    assert encode_response_head(599, []) == b"HTTP/1.1 599 Unknown\r\n\r\n"


def test_encoded_heads_parse_back() -> None:
    hdrs = [(b"host", b"h"), (b"content-length", b"3"), (b"x-a", b"b c")]
    r, _ = parse_req(encode_request_head(b"PUT", b"/p?q", hdrs) + b"abc")
    assert list(r.heads[0].headers) == hdrs[1:] and r.heads[0].authority == b"h"
    assert r.ev[1:] == [("body", b"abc"), ("done", None)]
    r2, _ = parse_resp([encode_response_head(201, [(b"content-length", b"2")]) + b"ok"])
    assert r2.ev[0][1] == 201
    assert r2.ev[1:] == [("body", b"ok"), ("done", None)]


def test_chunk_encoders_round_trip() -> None:
    assert encode_chunk(b"") == b""
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert encode_last_chunk(None) == LAST_CHUNK
    assert encode_last_chunk(HeaderMap()) == LAST_CHUNK
    assert encode_last_chunk(HeaderMap([(b"grpc-status", b"0")])) == b"0\r\ngrpc-status: 0\r\n\r\n"
    assert encode_trailers is encode_last_chunk
    body = (
        encode_request_head(b"POST", b"/", [(b"host", b"a"), (b"transfer-encoding", b"chunked")])
        + encode_chunk(b"hello ")
        + encode_chunk(b"")
        + encode_chunk(b"world")
        + encode_last_chunk([(b"t", b"1")])
    )
    r, _ = parse_req(body)
    assert r.ev[1:] == [("body", b"hello world"), ("done", [(b"t", b"1")])]


def test_hop_by_hop() -> None:
    for name in (b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"):
        assert name in HOP_BY_HOP
    assert b"host" not in HOP_BY_HOP
    assert all(n == n.lower() for n in HOP_BY_HOP)


RESPONSE_CORPUS = [
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"),
    (b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n"),
    (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nWS"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    (b"CONNECT", b"HTTP/1.1 200 OK\r\n\r\nTUNNEL"),
]


@pytest.mark.parametrize(("method", "data"), RESPONSE_CORPUS)
def test_response_every_split_point_gives_same_events(method: bytes, data: bytes) -> None:
    whole, whole_left = parse_resp([data], method=method)
    for i in range(1, len(data)):
        r = Rec()
        p = ResponseParser(r)
        p.expect(method)
        left = p.feed(data[:i])
        left = left + data[i:] if left is not None else p.feed(data[i:])
        assert r.ev == whole.ev, i
        assert left == whole_left, i


def test_h2c_upgrade_offer_is_not_a_tunnel() -> None:
    """``Upgrade: h2c`` (what ``curl --http2`` sends on http://) is parsed as an ordinary
    HTTP/1.1 request, body and the next pipelined request included: no bytes become a tunnel."""
    r = Rec()
    p = RequestParser(r)
    data = (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /b HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    for i in range(len(data)):  # every split point
        r = Rec()
        p = RequestParser(r)
        assert p.feed(data[:i]) is None
        assert p.feed(data[i:]) is None
        heads = [e for e in r.ev if e[0] == "head"]
        assert [(h[1], h[2], h[8]) for h in heads] == [
            (b"POST", b"/a", False),
            (b"GET", b"/b", False),
            (b"GET", b"/c", False),
        ], i
        assert b"".join(e[1] for e in r.ev if e[0] == "body") == b"abc"


def test_websocket_upgrade_is_still_a_tunnel() -> None:
    r = Rec()
    p = RequestParser(r)
    left = p.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nRAW")
    assert left == b"RAW" and r.heads[0].upgrade


def test_h2c_offer_with_chunked_body_at_every_split_point() -> None:
    # The offer is declined (served as HTTP/1.1): its chunked body, trailers and the requests
    # after it parse the same however the bytes arrive.
    data = (
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nT-A: 1\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: y\r\n\r\n"
    )
    for cut in range(len(data) + 1):
        r = Rec()
        p = RequestParser(r)
        for piece in (data[:cut], data[cut:]):
            if piece:
                assert p.feed(piece) is None
        assert [e[0] for e in r.ev if e[0] != "body"] == ["head", "done", "head", "done"], cut
        assert b"".join(e[1] for e in r.ev if e[0] == "body") == b"abcde"
        assert r.ev[-3] == ("done", [(b"t-a", b"1")])
        assert r.heads[0].upgrade is False and r.heads[0].chunked is True
        assert r.heads[1].target == b"/after" and r.heads[1].authority == b"y"


_H2C_OFFER = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_h2c_offer_with_a_body_keeps_the_body(framing: bytes) -> None:
    data = (
        b"POST /p HTTP/1.1\r\nHost: a\r\n" + _H2C_OFFER + framing + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    r, left = parse_req(data)
    assert left is None
    kinds = [e[0] for e in r.ev]
    assert kinds == ["head", "body", "done", "head", "done"], r.ev
    assert r.ev[1] == ("body", b"hello")
    assert r.ev[3][2] == b"/next"


def test_request_line_checks_match_what_the_connection_manager_requires() -> None:
    # RequestHead.line_checked tells the connection manager to skip its own method/path checks
    # for HTTP/1.1: that is only sound while llhttp refuses every target byte outside visible
    # ASCII (0x21-0x7e) and every method that is not a token.
    assert RequestHead.line_checked is True
    for c in range(256):
        r = Rec()
        wire = b"GET /a" + bytes([c]) + b"b HTTP/1.1\r\nHost: x\r\n\r\n"
        try:
            RequestParser(r).feed(wire)
            accepted = True
        except HttpProtocolError:
            accepted = False
        assert accepted == (0x21 <= c <= 0x7E), hex(c)
    for method in (b"G{T", b"GE T", b"G\x00T", b"\xffGET"):
        with pytest.raises(HttpProtocolError):
            RequestParser(Rec()).feed(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")


_RELEASE_WIRE = (
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody"
    b"POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nT: 1\r\n\r\n"
    b"GET /4 HTTP/1.1\r\nHost: a\r\n\r\n"
)


def test_release_between_messages_is_lossless_at_every_split_point() -> None:
    # ``release`` frees llhttp's parser only where nothing is in progress: releasing whenever
    # it agrees, after every feed, gives the same events as never releasing, however the bytes
    # are split.
    whole = Rec()
    RequestParser(whole).feed(_RELEASE_WIRE)
    for cut in range(len(_RELEASE_WIRE) + 1):
        for cut2 in (cut, min(cut + 7, len(_RELEASE_WIRE))):
            r = Rec()
            p = RequestParser(r)
            for piece in (_RELEASE_WIRE[:cut], _RELEASE_WIRE[cut:cut2], _RELEASE_WIRE[cut2:]):
                if piece:
                    p.feed(piece)
                    p.release()
            assert r.ev == whole.ev, (cut, cut2)


def test_release_refuses_unless_at_a_clean_boundary() -> None:
    p = RequestParser(Rec())
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert p.release() is True
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGE")  # the next request line has begun
    assert p.release() is False
    p.feed(b"T / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert p.release() is True
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")  # body pending
    assert p.release() is False
    p.feed(b"ok")  # complete, but a body's last bytes cannot prove the boundary
    assert p.release() is False


class _ReleasingRec(Rec):
    """A target that releases the parser from inside its callbacks, as the server codec does
    when a response completes synchronously (a local reply at the end of a request)."""

    def __init__(self) -> None:
        super().__init__()
        self.p: RequestParser | None = None

    def on_message_complete(self, trailers: HeaderMap | None) -> None:
        super().on_message_complete(trailers)
        assert self.p is not None
        self.p.release()


def test_release_from_inside_a_callback_loses_nothing() -> None:
    # Released while llhttp is still inside feed_data, the rest of that feed (a pipelined
    # request, or the start of one) must not be lost nor hit a missing parser.
    whole = Rec()
    RequestParser(whole).feed(_RELEASE_WIRE)
    for cut in range(len(_RELEASE_WIRE) + 1):
        r = _ReleasingRec()
        p = r.p = RequestParser(r)
        for piece in (_RELEASE_WIRE[:cut], _RELEASE_WIRE[cut:]):
            if piece:
                p.feed(piece)
        assert r.ev == whole.ev, cut


def test_h2c_offer_with_a_malformed_chunked_body_is_400() -> None:
    # The made-up head that frames an h2c offer's chunked body does not relax the framing: a
    # bad chunk size is the same 400 as on any request, and the parser stays failed.
    p = RequestParser(Rec())
    with pytest.raises(HttpProtocolError) as e:
        p.feed(
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"
        )
    assert e.value.status_hint == 400
    with pytest.raises(HttpProtocolError):
        p.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
