"""moorline.protocol.grpc: the helpers the connection manager's gRPC local replies and the
grpc_web bridge share."""

from __future__ import annotations

from moorline.protocol.grpc import grpc_status_for_http, percent_encode


def test_http_status_to_grpc_status_is_envoys_table() -> None:
    assert [grpc_status_for_http(s) for s in (400, 401, 403, 404, 429, 502, 503, 504)] == [
        b"13",
        b"16",
        b"7",
        b"12",
        b"14",
        b"14",
        b"14",
        b"14",
    ]
    assert grpc_status_for_http(500) == b"2" and grpc_status_for_http(418) == b"2"


def test_percent_encoding_keeps_printable_ascii_but_percent() -> None:
    assert percent_encode(b"no route") == b"no route"
    assert percent_encode(b"50% d\xc3\xa9j\xc3\xa0\n") == b"50%25 d%C3%A9j%C3%A0%0A"
