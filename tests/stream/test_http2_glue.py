"""Header translation between HTTP/2 and the codec-neutral request model, both directions."""

from __future__ import annotations

import pytest

from moorline.protocol.headers import RequestHeaders
from moorline.stream.http2_client import request_headers
from moorline.stream.http2_server import request_headers as from_h2


def test_request_headers_from_h2_block() -> None:
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
    rh = from_h2(h)
    assert rh is not None
    assert (rh.method, rh.scheme, rh.authority, rh.path) == (b"POST", b"http", b"svc:8080", b"/a?b=1")
    assert all(k[:1] != b":" for k, _ in rh)  # pseudo-headers are attributes, not entries
    assert rh.get(b":path") == b"/a?b=1" and rh.get(b":authority") == b"svc:8080"
    assert rh.get(b"cookie") == b"a=1; b=2"  # RFC 9113 8.2.3
    assert rh.get(b"te") == b"trailers"


@pytest.mark.parametrize(
    "block",
    [
        [(b":path", b"/"), (b":scheme", b"http")],  # no :method
        [(b":method", b"GET"), (b":scheme", b"http")],  # no :path
        [(b":method", b"GET"), (b":path", b"/")],  # no :scheme
        [(b":method", b"GET"), (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b"x", b"1"), (b":path", b"/")],  # order
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":protocol", b"ws")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
        [(b":method", b"CONNECT")],
    ],
)
def test_malformed_h2_request_blocks_are_rejected(block: list[tuple[bytes, bytes]]) -> None:
    assert from_h2(block) is None


def test_connect_has_authority_and_no_path() -> None:
    rh = from_h2([(b":method", b"CONNECT"), (b":authority", b"db:5432")])
    assert rh is not None and rh.path == b"" and rh.authority == b"db:5432"


def test_request_headers_for_h2_upstream_drop_connection_specific() -> None:
    hm = RequestHeaders(
        b"GET",
        b"/x",
        b"up",
        b"http",
        [
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"5"),
            (b"transfer-encoding", b"chunked"),
            (b"te", b"gzip"),
            (b"x-a", b"1"),
            (b"te", b"trailers"),
        ],
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
    hm = RequestHeaders(b"GET", b"/", b"", b"http")
    assert [k for k, _ in request_headers(hm)] == [b":method", b":scheme", b":path"]


def test_a_header_inserted_first_cannot_move_the_path() -> None:
    """The bug the typed accessors fix: pseudo-headers used to be list positions."""
    hm = RequestHeaders(b"GET", b"/p", b"h", b"http", [(b"a", b"1")])
    hm._h.insert(0, (b"x-first", b"1"))
    hm.set(b":path", b"/q")
    assert hm.path == b"/q" and hm.get(b"x-first") == b"1"
    assert request_headers(hm)[3] == (b":path", b"/q")
