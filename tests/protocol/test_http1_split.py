"""Property tests for the HTTP/1.1 codec: generated messages, split at random points, must give
the events a simple model predicts, whatever the split."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moorline.protocol.headers import HeaderMap
from moorline.protocol.http1 import RequestHead, RequestParser, ResponseHead, ResponseParser

_TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^`|~_"
_PATH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%"
_VALUE = "".join(chr(c) for c in range(0x21, 0x7F)) + " \t"
_RESERVED = {
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"connection",
    b"upgrade",
    b"expect",
    b"keep-alive",
    b"proxy-connection",
}

names = st.text(_TOKEN, min_size=1, max_size=12).map(str.encode).filter(lambda n: n.lower() not in _RESERVED)
values = st.text(_VALUE, max_size=20).map(lambda s: s.strip(" \t").encode())
header_lists = st.lists(st.tuples(names, values), max_size=8)
chunk_ext = st.one_of(st.just(b""), st.text(_TOKEN, min_size=1, max_size=8).map(lambda s: b";" + s.encode()))
chunks = st.lists(st.tuples(st.binary(min_size=1, max_size=40), chunk_ext), max_size=5)


class Rec:
    def __init__(self) -> None:
        self.ev: list[tuple] = []

    def on_request_head(self, h: RequestHead) -> None:
        self.ev.append(
            ("head", h.method, h.target, list(h.headers), h.content_length, h.chunked, h.header_bytes)
        )

    def on_response_head(self, h: ResponseHead) -> None:
        self.ev.append(("rhead", h.status, list(h.headers)))

    def on_body(self, b: bytes) -> None:
        if self.ev and self.ev[-1][0] == "body":
            self.ev[-1] = ("body", self.ev[-1][1] + b)
        else:
            self.ev.append(("body", b))

    def on_message_complete(self, trailers: HeaderMap | None) -> None:
        self.ev.append(("done", None if trailers is None else list(trailers)))


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, list[tuple]]:
    """One request on the wire and the events it must produce."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]))
    path = b"/" + draw(st.text(_PATH, max_size=30)).encode()
    headers = [(b"Host", b"h.example"), *draw(header_lists)]
    mode = draw(st.sampled_from(["none", "cl", "chunked"]))
    body_wire = b""
    body = b""
    trailers: list[tuple[bytes, bytes]] | None = None
    cl = None
    if mode == "cl":
        body = draw(st.binary(max_size=60))
        cl = len(body)
        headers.append((b"Content-Length", b"%d" % cl))
        body_wire = body
    elif mode == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        parts = draw(chunks)
        body = b"".join(d for d, _ in parts)
        body_wire = b"".join(b"%x%s\r\n%s\r\n" % (len(d), ext, d) for d, ext in parts)
        tr = draw(header_lists)
        body_wire += b"0\r\n" + b"".join(b"%s: %s\r\n" % kv for kv in tr) + b"\r\n"
        trailers = [(k.lower(), v) for k, v in tr] or None
    head = method + b" " + path + b" HTTP/1.1\r\n" + b"".join(b"%s: %s\r\n" % kv for kv in headers) + b"\r\n"
    ev: list[tuple] = [
        # Host becomes the head's authority, not a header line
        ("head", method, path, [(k.lower(), v) for k, v in headers[1:]], cl, mode == "chunked", len(head))
    ]
    if body:
        ev.append(("body", body))
    ev.append(("done", trailers))
    return head + body_wire, ev


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=4), st.data())
def test_pipelined_requests_any_split(reqs: list[tuple[bytes, list[tuple]]], data: st.DataObject) -> None:
    wire = b"".join(w for w, _ in reqs)
    expected = [e for _, ev in reqs for e in ev]

    whole = Rec()
    assert RequestParser(whole).feed(wire) is None
    assert whole.ev == expected

    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    split = Rec()
    p = RequestParser(split)
    for piece in _split(wire, cuts):
        assert p.feed(piece) is None
    assert split.ev == expected


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple]]:
    """(request method, response on the wire, expected events)."""
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST"]))
    ev: list[tuple] = []
    wire = b""
    for status in draw(st.lists(st.sampled_from([100, 103]), max_size=2)):
        hs = draw(header_lists)
        wire += b"HTTP/1.1 %d Interim\r\n" % status + b"".join(b"%s: %s\r\n" % kv for kv in hs) + b"\r\n"
        ev.append(("rhead", status, [(k.lower(), v) for k, v in hs]))
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 503]))
    headers = draw(header_lists)
    mode = draw(st.sampled_from(["cl", "chunked"]))
    body = draw(st.binary(max_size=50))
    trailers = None
    if status == 204:
        mode = "none"  # a 204 carries no framing headers (a length on it is an upstream fault)
        body_wire = b""
    elif mode == "cl":
        headers.append((b"Content-Length", b"%d" % len(body)))
        body_wire = body
    else:
        headers.append((b"Transfer-Encoding", b"chunked"))
        body_wire = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n"
        tr = draw(header_lists)
        body_wire += b"".join(b"%s: %s\r\n" % kv for kv in tr) + b"\r\n"
        trailers = [(k.lower(), v) for k, v in tr] or None
    wire += b"HTTP/1.1 %d Whatever\r\n" % status + b"".join(b"%s: %s\r\n" % kv for kv in headers) + b"\r\n"
    # Transfer-Encoding is this hop's framing: the response parser consumes it.
    ev.append(("rhead", status, [(k.lower(), v) for k, v in headers if k != b"Transfer-Encoding"]))
    if method != b"HEAD" and status not in (204, 304):
        wire += body_wire
        if body:
            ev.append(("body", body))
        ev.append(("done", trailers))
    else:
        ev.append(("done", None))
    return method, wire, ev


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(responses(), min_size=1, max_size=4), st.data())
def test_response_sequence_any_split(
    resps: list[tuple[bytes, bytes, list[tuple]]], data: st.DataObject
) -> None:
    rec = Rec()
    p = ResponseParser(rec)
    expected: list[tuple] = []
    for method, wire, ev in resps:
        p.expect(method)
        cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
        for piece in _split(wire, cuts):
            assert p.feed(piece) is None
        expected += ev
        assert rec.ev == expected
    p.feed_eof()  # between responses: nothing in progress
    assert rec.ev == expected
