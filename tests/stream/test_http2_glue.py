"""Header translation between HTTP/2 and the proxy's request model, both directions."""

from __future__ import annotations

from moorline.protocol.headers import HeaderMap
from moorline.stream.http2_client import request_headers
from moorline.stream.http2_server import request_head


def test_request_head_from_h2_headers() -> None:
    h = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"svc:8080"),
        (b":path", b"/a?b=1"),
        (b"cookie", b"a=1"),
        (b"content-type", b"application/grpc"),
        (b"cookie", b"b=2"),
        (b"te", b"trailers"),
    ]
    head = request_head(h, end_stream=False)
    assert (head.method, head.target, head.version) == (b"POST", b"/a?b=1", b"2")
    assert head.headers._h[0] == (b"host", b"svc:8080")
    assert head.headers.get(b"cookie") == b"a=1; b=2"  # RFC 9113 8.2.3
    assert head.headers.get(b"te") == b"trailers"
    assert head.chunked and head.content_length is None  # a body follows, no framing header


def test_request_head_without_body_ends_with_headers() -> None:
    head = request_head([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"x")], end_stream=True)
    assert not head.chunked and head.content_length is None


def test_request_headers_for_h2_upstream_drop_connection_specific() -> None:
    hm = HeaderMap.wrap(
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"up"),
            (b":path", b"/x"),
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"5"),
            (b"transfer-encoding", b"chunked"),
            (b"te", b"gzip"),
            (b"x-a", b"1"),
            (b"te", b"trailers"),
        ]
    )
    out = request_headers(hm)
    assert out == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"up"),
        (b":path", b"/x"),
        (b"x-a", b"1"),
        (b"te", b"trailers"),
    ]


def test_empty_authority_is_left_out() -> None:
    hm = HeaderMap.wrap([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b""), (b":path", b"/")])
    assert [k for k, _ in request_headers(hm)] == [b":method", b":scheme", b":path"]
