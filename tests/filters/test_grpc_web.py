"""envoy.filters.http.grpc_web (moorline/filters/http/grpc_web.py): byte-level fixtures written
from grpc/grpc doc/PROTOCOL-WEB.md (5-byte frame header: flag byte, big-endian length; trailers
frame flag 0x80 carrying ``name:value\\r\\n`` lines; base64 text mode), first against the filter
alone, then through the real connection manager (moorline.testing.pair) with an HTTP/2 upstream
playing the gRPC server and HTTP/1.1 / HTTP/2 clients playing the browser."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from moorline.filters.http.grpc_web import (
    MAX_METHOD_STATS,
    MAX_PLAINTEXT,
    GrpcWebConfig,
    GrpcWebFilter,
    TextEncoder,
    b64decode_groups,
    trailer_frame,
)
from moorline.observability.stats import Store
from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, STOP_ITERATION_NO_BUFFER
from moorline.testing.pair import Pair, bootstrap_yaml
from moorline.testing.procs import cluster

# -- fixtures from the spec, written out by hand ---------------------------------------------------
HELLO = b"\x00\x00\x00\x00\x05hello"  # data frame: flag 0, length 5, "hello"
HELLO_B64 = b"AAAAAAVoZWxsbw=="  # base64 of HELLO, padded at the frame's end
OK_TRAILERS = b"\x80\x00\x00\x00\x0fgrpc-status:0\r\n"  # 15-byte block, uncompressed trailer flag
OK_TRAILERS_B64 = b"gAAAAA9ncnBjLXN0YXR1czowDQo="
WEB = "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
FILTER = {"name": "envoy.filters.http.grpc_web", "typed_config": {"@type": WEB}}


def test_fixtures_agree_with_an_independent_base64() -> None:
    assert base64.b64encode(HELLO) == HELLO_B64
    assert base64.b64encode(OK_TRAILERS) == OK_TRAILERS_B64


# -- the building blocks -------------------------------------------------------------------------


def test_trailer_frame_layout() -> None:
    t = HeaderMap([(b"grpc-status", b"0")])
    assert trailer_frame(t) == OK_TRAILERS
    t = HeaderMap([(b"grpc-status", b"7"), (b"grpc-message", b"no%20way"), (b"X-Custom", b"v")])
    block = b"grpc-status:7\r\ngrpc-message:no%20way\r\nx-custom:v\r\n"  # names lower-cased
    assert trailer_frame(t) == b"\x80" + len(block).to_bytes(4, "big") + block


def test_b64_decode_groups_accepts_padded_segments_back_to_back() -> None:
    assert b64decode_groups(HELLO_B64) == HELLO
    # Two messages encoded one by one: padding in the middle of the body.
    assert b64decode_groups(HELLO_B64 + HELLO_B64) == HELLO + HELLO
    assert b64decode_groups(b"") == b""
    for bad in (b"AA=A", b"====", b"A@AA", b"AAAA\r\nAA"):
        assert b64decode_groups(bad) is None, bad


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 64])
def test_text_encoder_encodes_each_frame_on_its_own_whatever_the_chunking(chunk: int) -> None:
    big = b"\x00" + (300).to_bytes(4, "big") + bytes(range(256)) + bytes(44)
    stream = HELLO + big + OK_TRAILERS
    enc = TextEncoder()
    out = b""
    for part in split_every(stream, chunk):
        out += enc.feed(part)
        assert len(enc.pend) <= 4  # the bound the module promises
    out += enc.flush()
    assert out == base64.b64encode(HELLO) + base64.b64encode(big) + base64.b64encode(OK_TRAILERS)


def test_text_encoder_flushes_a_cut_frame() -> None:
    enc = TextEncoder()
    out = enc.feed(HELLO[:7])
    assert out + enc.flush() == base64.b64encode(HELLO[:6]) + base64.b64encode(HELLO[6:7])


# -- the filter alone, with recording callbacks ---------------------------------------------------


class Info:
    upstream_cluster: str | None = "grpc"


class Callbacks:
    def __init__(self) -> None:
        self.stream_info = Info()
        self.decoded: bytes | None = None
        self.encoded: bytes | None = None
        self.replies: list[tuple[int, bytes, str | None]] = []
        self.bridged = False

    def bridge_to_grpc(self) -> None:
        self.bridged = True

    def set_decoded_data(self, data: bytes) -> None:
        self.decoded = data

    def set_encoded_data(self, data: bytes) -> None:
        self.encoded = data

    def send_local_reply(self, status: int, body: bytes = b"", flag: Any = None, details: Any = None) -> None:
        self.replies.append((status, body, details))


def make_filter(store: Store | None = None) -> tuple[GrpcWebFilter, Callbacks]:
    f = GrpcWebFilter(GrpcWebConfig(store if store is not None else Store()))
    cb = Callbacks()
    f.set_callbacks(cb)  # type: ignore[arg-type]
    return f, cb


def web_request(ct: bytes = b"application/grpc-web+proto", accept: bytes | None = None) -> RequestHeaders:
    h = [(b"content-type", ct), (b"content-length", b"10"), (b"x-grpc-web", b"1")]
    h.append((b"x-user-agent", b"grpc-web-javascript/0.1"))
    if accept is not None:
        h.append((b"accept", accept))
    return RequestHeaders.make(b"POST", b"/pkg.Svc/Call", b"a", b"http", h)


@pytest.mark.parametrize(
    "ct",
    [
        b"application/grpc-web",
        b"application/grpc-web+proto",
        b"application/grpc-web-text",
        b"application/grpc-web-text+proto",
    ],
)
def test_request_headers_become_grpc(ct: bytes) -> None:
    f, cb = make_filter()
    h = web_request(ct)
    assert f.decode_headers(h, False) == CONTINUE
    assert cb.bridged  # the router gives it its gRPC handling
    assert h.get(b"content-type") == b"application/grpc"  # Envoy sets the bare type
    assert h.get(b"te") == b"trailers"
    assert h.get(b"content-length") is None
    assert h.get(b"grpc-accept-encoding") == b"identity,deflate,gzip"
    assert h.get(b"x-grpc-web") == b"1" and h.get(b"x-user-agent") == b"grpc-web-javascript/0.1"


@pytest.mark.parametrize("ct", [b"application/grpc", b"application/grpc-web+json", b"text/plain", None])
def test_other_requests_are_untouched(ct: bytes | None) -> None:
    f, cb = make_filter()
    pairs = [(b"content-length", b"3")] + ([(b"content-type", ct)] if ct else [])
    h = RequestHeaders.make(b"POST", b"/pkg.Svc/Call", b"a", b"http", pairs)
    before = h.copy()
    assert f.decode_headers(h, False) == CONTINUE
    assert f.decode_data(b"abc", True) == CONTINUE and cb.decoded is None
    r = ResponseHeaders.make(503, [(b"content-type", b"text/plain"), (b"content-length", b"3")])
    assert f.encode_headers(r, False) == CONTINUE
    assert f.encode_data(b"bad", True) == CONTINUE
    assert h == before and r.get(b"content-length") == b"3" and r.get(b"grpc-status") is None


def test_existing_grpc_accept_encoding_is_kept() -> None:
    f, _ = make_filter()
    h = web_request()
    h.add(b"grpc-accept-encoding", b"identity")
    f.decode_headers(h, False)
    assert h.get_all(b"grpc-accept-encoding") == [b"identity"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 9, 100])
def test_text_request_is_decoded_as_it_streams(chunk: int) -> None:
    f, cb = make_filter()
    f.decode_headers(web_request(b"application/grpc-web-text"), False)
    body = HELLO_B64 + HELLO_B64
    parts = split_every(body, chunk)
    got = b""
    for i, part in enumerate(parts):
        cb.decoded = None
        r = f.decode_data(part, i == len(parts) - 1)
        assert len(f.dec_pend) < 4
        if r == CONTINUE:
            assert cb.decoded is not None
            got += cb.decoded
        else:
            assert r == STOP_ITERATION_NO_BUFFER and cb.decoded is None
    assert got == HELLO + HELLO
    assert cb.replies == []


def test_text_request_with_a_bad_length_is_400() -> None:
    f, cb = make_filter()
    f.decode_headers(web_request(b"application/grpc-web-text"), False)
    assert f.decode_data(HELLO_B64 + b"AA", True) == STOP_ITERATION_NO_BUFFER
    assert cb.replies == [
        (400, b"Bad gRPC-web request, invalid base64 data.", "grpc_base_64_decode_failed_bad_size")
    ]


def test_text_request_that_is_not_base64_is_400() -> None:
    f, cb = make_filter()
    f.decode_headers(web_request(b"application/grpc-web-text+proto"), False)
    assert f.decode_data(b"AAAA!!!!", False) == STOP_ITERATION_NO_BUFFER
    assert cb.replies == [(400, b"Bad gRPC-web request, invalid base64 data.", "grpc_base_64_decode_failed")]


def test_binary_request_body_passes_as_it_is() -> None:
    f, cb = make_filter()
    f.decode_headers(web_request(), False)
    assert f.decode_data(HELLO, True) == CONTINUE and cb.decoded is None


def grpc_response() -> ResponseHeaders:
    return ResponseHeaders.make(200, [(b"content-type", b"application/grpc"), (b"content-length", b"99")])


def test_binary_response_trailers_become_the_last_frame() -> None:
    f, cb = make_filter()
    f.decode_headers(web_request(accept=b"application/grpc-web+proto"), False)
    h = grpc_response()
    assert f.encode_headers(h, False) == CONTINUE
    assert h.get(b"content-type") == b"application/grpc-web+proto"
    assert h.get(b"content-length") is None
    assert f.encode_data(HELLO, False) == CONTINUE and cb.encoded is None
    t = HeaderMap([(b"grpc-status", b"0")])
    assert f.encode_trailers(t) == CONTINUE
    assert cb.encoded == OK_TRAILERS
    assert len(t) == 0  # nothing left to send as HTTP trailers


@pytest.mark.parametrize("accept", [b"application/grpc-web-text", b"application/grpc-web-text+proto"])
def test_text_response_is_base64_frame_by_frame(accept: bytes) -> None:
    f, cb = make_filter()
    f.decode_headers(web_request(b"application/grpc-web-text", accept=accept), False)
    h = grpc_response()
    f.encode_headers(h, False)
    assert h.get(b"content-type") == b"application/grpc-web-text+proto"
    out = b""
    for part in split_every(HELLO + HELLO, 3):
        cb.encoded = None
        r = f.encode_data(part, False)
        if r == CONTINUE:
            out += cb.encoded or b""
        else:
            assert r == STOP_ITERATION_NO_BUFFER
    f.encode_trailers(HeaderMap([(b"grpc-status", b"0")]))
    out += cb.encoded or b""
    assert out == HELLO_B64 + HELLO_B64 + OK_TRAILERS_B64


def test_text_request_without_text_accept_gets_binary_response() -> None:
    # Envoy picks the response encoding by Accept, not by the request's content-type.
    f, cb = make_filter()
    f.decode_headers(web_request(b"application/grpc-web-text"), False)
    h = grpc_response()
    f.encode_headers(h, False)
    assert h.get(b"content-type") == b"application/grpc-web+proto"
    assert f.encode_data(HELLO, False) == CONTINUE and cb.encoded is None


def test_trailers_only_response_passes_as_headers() -> None:
    f, _cb = make_filter()
    f.decode_headers(web_request(), True)
    h = ResponseHeaders.make(
        200, [(b"content-type", b"application/grpc"), (b"grpc-status", b"5"), (b"grpc-message", b"nope")]
    )
    assert f.encode_headers(h, True) == CONTINUE
    assert h.get(b"grpc-status") == b"5" and h.get(b"grpc-message") == b"nope"
    assert h.get(b"content-type") == b"application/grpc-web+proto"


def test_non_grpc_answer_becomes_grpc_status_and_message() -> None:
    f, cb = make_filter()
    f.decode_headers(web_request(), False)
    h = ResponseHeaders.make(503, [(b"content-type", b"text/plain"), (b"content-length", b"19")])
    assert f.encode_headers(h, False) == STOP_ITERATION
    assert f.encode_data(b"no healthy ", False) == STOP_ITERATION_NO_BUFFER
    assert f.encode_data(b"upstream\n", True) == CONTINUE
    assert cb.encoded == b""
    assert h.status == 503  # kept, as Envoy does
    assert h.get(b"grpc-status") == b"14"
    assert h.get(b"grpc-message") == b"no healthy upstream%0A"
    assert h.get(b"content-length") == b"0"
    assert h.get(b"content-type") == b"application/grpc-web+proto"


@pytest.mark.parametrize(
    "status,grpc", [(400, b"13"), (401, b"16"), (403, b"7"), (404, b"12"), (429, b"14"), (500, b"2")]
)
def test_http_status_mapping(status: int, grpc: bytes) -> None:
    f, _ = make_filter()
    f.decode_headers(web_request(), False)
    h = ResponseHeaders.make(status, [(b"content-type", b"text/plain")])
    f.encode_headers(h, False)
    f.encode_data(b"x", True)
    assert h.get(b"grpc-status") == grpc


def test_non_grpc_body_kept_for_the_message_is_bounded() -> None:
    f, _ = make_filter()
    f.decode_headers(web_request(), False)
    h = ResponseHeaders.make(500, [(b"content-type", b"text/html")])
    f.encode_headers(h, False)
    for _ in range(40):
        assert f.encode_data(b"x" * 1000, False) == STOP_ITERATION_NO_BUFFER
        assert f.body is not None and len(f.body) <= MAX_PLAINTEXT
    f.encode_data(b"", True)
    assert h.get(b"grpc-message") == b"x" * MAX_PLAINTEXT


def test_headers_only_non_grpc_answer_is_left_as_envoy_leaves_it() -> None:
    f, _ = make_filter()
    f.decode_headers(web_request(), False)
    h = ResponseHeaders.make(503, [(b"content-length", b"0")])
    assert f.encode_headers(h, True) == CONTINUE
    assert h.get(b"grpc-status") is None and h.get(b"content-type") == b"application/grpc-web+proto"


def test_grpc_web_upstream_answer_is_not_transformed() -> None:
    f, cb = make_filter()
    f.decode_headers(web_request(), False)
    h = ResponseHeaders.make(200, [(b"content-type", b"application/grpc-web; charset=x")])
    assert f.encode_headers(h, False) == CONTINUE
    assert f.encode_data(HELLO + OK_TRAILERS, True) == CONTINUE and cb.encoded is None


def test_stats_per_method_and_status() -> None:
    store = Store()
    f, _ = make_filter(store)
    f.decode_headers(web_request(), False)
    f.encode_headers(grpc_response(), False)
    f.encode_trailers(HeaderMap([(b"grpc-status", b"0")]))
    f2 = GrpcWebFilter(f.cfg)
    f2.set_callbacks(Callbacks())  # type: ignore[arg-type]
    f2.decode_headers(web_request(), False)
    f2.encode_headers(
        ResponseHeaders.make(200, [(b"content-type", b"application/grpc"), (b"grpc-status", b"7")]), True
    )
    p = "cluster.grpc.grpc-web.pkg.Svc.Call."
    got = {s.name[len(p) :]: s.value for s in store if s.name.startswith(p)}
    assert got == {"0": 1, "7": 1, "success": 1, "failure": 1, "total": 2}


def test_stat_sets_are_bounded() -> None:
    store = Store()
    cfg = GrpcWebConfig(store)
    for i in range(MAX_METHOD_STATS + 50):
        cfg.charge("c", b"/s/m%d" % i, b"0")
    assert sum(1 for s in store if s.name.endswith(".total")) == MAX_METHOD_STATS


def test_no_stats_without_a_cluster_or_a_service_method_path() -> None:
    store = Store()
    f, cb = make_filter(store)
    cb.stream_info.upstream_cluster = None
    f.decode_headers(web_request(), False)
    f.encode_headers(grpc_response(), False)
    f.encode_trailers(HeaderMap([(b"grpc-status", b"0")]))
    f, cb = make_filter(store)
    h = web_request()
    h.path = b"/not-grpc"
    f.decode_headers(h, False)
    f.encode_headers(grpc_response(), False)
    f.encode_trailers(HeaderMap([(b"grpc-status", b"0")]))
    assert len(store) == 0


# -- through the real connection manager ---------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[Pair]:
    boot = bootstrap_yaml(
        http_filters=[FILTER],
        clusters=[cluster("grpc", [("10.0.0.1", 80)], http2_protocol_options={})],
    )
    p = Pair(boot)
    yield p
    p.close()


def post_h1(
    pair: Pair, body: bytes, ct: str = "application/grpc-web+proto", accept: str | None = None
) -> Any:
    c = pair.connect()
    extra = f"accept: {accept}\r\n" if accept else ""
    c.send(
        (
            "POST /pkg.Svc/Call HTTP/1.1\r\nhost: a\r\n"
            f"content-type: {ct}\r\nx-grpc-web: 1\r\n{extra}content-length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    return c


GRPC_RESP_HEADERS = [("content-type", "application/grpc")]


def test_unary_binary_over_http1(pair: Pair) -> None:
    c = post_h1(pair, HELLO)
    h2 = pair.upstream.accept().h2()
    rq = h2.request()
    assert rq.header("content-type") == b"application/grpc"
    assert rq.header("te") == b"trailers"
    assert rq.header("content-length") is None
    assert rq.header("x-grpc-web") == b"1"
    assert rq.body == HELLO and rq.ended
    h2.respond(rq.sid, 200, GRPC_RESP_HEADERS, body=HELLO, trailers=[("grpc-status", "0")])
    r = c.response()
    assert r.status == 200
    assert r.header("content-type") == b"application/grpc-web+proto"
    assert r.chunked and r.trailers == []
    assert r.body == HELLO + OK_TRAILERS
    assert pair.stat("cluster.grpc.grpc-web.pkg.Svc.Call.0") == 1
    pair.assert_settled()


def test_unary_text_over_http1(pair: Pair) -> None:
    c = post_h1(pair, HELLO_B64, ct="application/grpc-web-text", accept="application/grpc-web-text")
    h2 = pair.upstream.accept().h2()
    rq = h2.request()
    assert rq.body == HELLO
    h2.respond(rq.sid, 200, GRPC_RESP_HEADERS, body=HELLO + HELLO, trailers=[("grpc-status", "0")])
    r = c.response()
    assert r.header("content-type") == b"application/grpc-web-text+proto"
    # One frame at a time: the two messages came in one DATA frame, but each is padded alone.
    assert r.body == HELLO_B64 + HELLO_B64 + OK_TRAILERS_B64
    pair.assert_settled()


def test_trailers_only_error_over_http1(pair: Pair) -> None:
    c = post_h1(pair, HELLO)
    h2 = pair.upstream.accept().h2()
    rq = h2.request()
    h2.respond(rq.sid, 200, [*GRPC_RESP_HEADERS, ("grpc-status", "7"), ("grpc-message", "denied")])
    r = c.response()
    assert r.status == 200
    assert r.header("grpc-status") == b"7" and r.header("grpc-message") == b"denied"
    assert r.header("content-type") == b"application/grpc-web+proto"
    assert r.body == b""
    assert pair.stat("cluster.grpc.grpc-web.pkg.Svc.Call.failure") == 1
    pair.assert_settled()


def test_bad_base64_is_a_grpc_error_to_the_browser(pair: Pair) -> None:
    c = post_h1(pair, b"AAAAAAV", ct="application/grpc-web-text")
    r = c.response()
    # The local 400 goes through the filter's encoder side: a grpc-status the browser reads.
    assert r.status == 400
    assert r.header("grpc-status") == b"13"
    assert r.header("grpc-message") == b"Bad gRPC-web request, invalid base64 data."
    assert r.header("content-type") == b"application/grpc-web+proto"
    assert r.body == b""


def test_upstream_refused_is_unavailable(pair: Pair) -> None:
    c = post_h1(pair, HELLO)
    pair.upstream.refuse()
    r = c.response()
    assert r.status == 503
    assert r.header("grpc-status") == b"14"
    msg = r.header("grpc-message")
    assert msg is not None and msg.startswith(b"upstream connect error")
    assert r.body == b""


def test_no_route_is_a_bare_404_as_in_envoy() -> None:
    # The local 404 has no body, so it is headers-only: Envoy's filter only retypes it, and the
    # browser client maps the HTTP status itself.
    boot = bootstrap_yaml(
        http_filters=[FILTER], routes=[{"match": {"prefix": "/other"}, "route": {"cluster": "be"}}]
    )
    with Pair(boot) as pair:
        r = post_h1(pair, HELLO).response()
        assert r.status == 404 and r.header("grpc-status") is None
        assert r.header("content-type") == b"application/grpc-web+proto"


def test_http2_client_gets_the_trailer_frame_and_no_trailers(pair: Pair) -> None:
    client = pair.connect_h2()
    sid = client.request(
        "POST",
        "/pkg.Svc/Call",
        headers=[("content-type", "application/grpc-web-text"), ("accept", "application/grpc-web-text")],
        body=HELLO_B64,
    )
    h2 = pair.upstream.accept().h2()
    rq = h2.request()
    assert rq.body == HELLO
    h2.respond(
        rq.sid, 200, GRPC_RESP_HEADERS, body=HELLO, trailers=[("grpc-status", "0"), ("grpc-message", "")]
    )
    resp = client.response(sid)
    assert resp.ended and resp.trailers is None
    block = b"grpc-status:0\r\ngrpc-message:\r\n"
    frame = b"\x80" + len(block).to_bytes(4, "big") + block
    assert resp.body == HELLO_B64 + base64.b64encode(frame)
    pair.assert_settled()


def test_plain_grpc_through_the_same_listener_is_untouched(pair: Pair) -> None:
    client = pair.connect_h2()
    sid = client.request(
        "POST",
        "/pkg.Svc/Call",
        headers=[("content-type", "application/grpc"), ("te", "trailers")],
        body=HELLO,
    )
    h2 = pair.upstream.accept().h2()
    rq = h2.request()
    h2.respond(rq.sid, 200, GRPC_RESP_HEADERS, body=HELLO, trailers=[("grpc-status", "0")])
    resp = client.response(sid)
    assert resp.header("content-type") == b"application/grpc"
    assert resp.body == HELLO and resp.trailer("grpc-status") == b"0"
    assert pair.stat("cluster.grpc.grpc-web.pkg.Svc.Call.total") == 0
    pair.assert_settled()


def test_the_router_treats_a_bridged_call_as_grpc() -> None:
    # Envoy's router judges the headers grpc_web rewrote: a grpc-timeout under max_grpc_timeout
    # is the call's deadline for a browser's call too (before, the 15 s route timeout applied).
    boot = bootstrap_yaml(
        routes=[{"match": {"prefix": "/"}, "route": {"cluster": "grpc", "max_grpc_timeout": "0s"}}],
        http_filters=[FILTER],
        clusters=[cluster("grpc", [("10.0.0.1", 80)], http2_protocol_options={})],
    )
    p = Pair(boot)
    try:
        c = p.connect()
        c.send(
            b"POST /pkg.Svc/Call HTTP/1.1\r\nhost: a\r\ncontent-type: application/grpc-web+proto\r\n"
            b"grpc-timeout: 200m\r\ncontent-length: %d\r\n\r\n" % len(HELLO) + HELLO
        )
        h2 = p.upstream.accept().h2()
        rq = h2.request()
        assert rq.header("content-type") == b"application/grpc"
        p.advance(0.5)  # past the call's 200 ms, far from the route's 15 s
        r = c.response()
        assert r.status == 504
        # The router's 504 is a non-gRPC answer for grpc_web, mapped as Envoy maps 504.
        assert r.header("grpc-status") == b"14"
    finally:
        p.close()
