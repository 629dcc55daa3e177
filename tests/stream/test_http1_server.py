"""The downstream HTTP/1.1 codec glue (moorline/stream/http1_server.py): response framing,
1xx, 204/304, HEAD, keep-alive decisions, the delayed close, flow control and request limits.
Driven in memory through the real connection manager with moorline.testing.pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from moorline.testing.pair import Pair, bootstrap_yaml


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(**kw: Any) -> Pair:
        p = Pair(bootstrap_yaml(**kw))
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


def exchange(pair: Pair, request: bytes, response: bytes, head: bool | None = None) -> tuple[Any, Any, Any]:
    """A new client connection sends ``request``; the upstream answers ``response`` bytes."""
    c = pair.connect()
    c.send(request)
    up = pair.upstream.accept() if pair.upstream.pending else pair.upstream.connections[-1]
    up.request()
    up.send(response)
    return c, up, c.response(head)


GET = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
HTTP10 = {"http_protocol_options": {"accept_http_10": True}}


# -- response framing ----------------------------------------------------------------------------


def test_content_length_response_is_kept(make: Any) -> None:
    pair = make()
    c, _, r = exchange(pair, GET, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
    assert r.header("content-length") == b"5" and r.header("transfer-encoding") is None and r.body == b"hello"
    assert not c.closed
    pair.assert_settled()


def test_chunked_response_is_rechunked(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(GET)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
    up.send(b"6\r\n world\r\n0\r\n\r\n")
    r = c.response()
    assert r.chunked and r.body == b"hello world"
    pair.assert_settled()


def test_close_delimited_upstream_response_is_chunked_to_an_http11_client(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(GET)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\n\r\nuntil")
    up.send(b" the end")
    up.close()
    r = c.response()
    assert r.chunked and r.body == b"until the end"
    assert not c.closed  # chunked framing keeps the client connection usable
    pair.assert_settled()


def test_close_delimited_upstream_response_to_an_http10_client_closes(make: Any) -> None:
    pair = make(hcm_extra=HTTP10)
    c = pair.connect()
    c.send(b"GET / HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\n\r\nbody")
    up.close()
    assert c.closed
    r = c.response()
    assert r.version == b"HTTP/1.0" and r.header("connection") == b"close" and r.body == b"body"
    pair.assert_settled()


def test_local_reply_without_body_has_content_length_zero(make: Any) -> None:
    pair = make(routes=[{"match": {"prefix": "/"}, "direct_response": {"status": 200}}])
    c = pair.connect()
    c.send(GET)
    assert c.response().header("content-length") == b"0"


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_status_gets_no_framing_added(make: Any, status: int) -> None:
    pair = make()
    c, up, r = exchange(pair, GET, b"HTTP/1.1 %d X\r\netag: e\r\n\r\n" % status)
    assert r.status == status
    assert r.header("transfer-encoding") is None and r.header("content-length") is None
    assert r.body == b""
    c.send(GET)  # the connection is still in step
    up.request()
    up.respond(200, body=b"next")
    assert c.response().body == b"next"
    pair.assert_settled()


def test_head_response_keeps_content_length_without_body(make: Any) -> None:
    pair = make()
    c, up, r = exchange(
        pair,
        b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
        head=True,
    )
    assert r.header("content-length") == b"1000" and r.body == b""
    c.send(GET)
    up.request()
    up.respond(200, body=b"x")
    assert c.response().body == b"x"
    pair.assert_settled()


def test_response_head_and_first_body_bytes_leave_in_one_write(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(GET)
    up = pair.upstream.accept()
    up.request()
    writes: list[bytes] = []
    real_write = c.transport.write
    c.transport.write = lambda d: (writes.append(bytes(d)), real_write(d))  # type: ignore[method-assign]
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody")
    assert len(writes) == 1 and writes[0].endswith(b"\r\n\r\nbody")


def test_response_head_without_body_in_the_same_read_is_flushed(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(GET)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
    assert c.data.startswith(b"HTTP/1.1 200 OK\r\n")  # not held until the body comes
    up.send(b"body")
    assert c.response().body == b"body"


# -- 1xx -----------------------------------------------------------------------------------------


def test_expect_100_continue_is_answered_by_the_proxy(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
    interim = c.response()
    assert interim.status == 100
    up = pair.upstream.accept()
    c.send(b"data")
    req = up.request()
    assert req.header("expect") is None and req.body == b"data"
    up.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    final = c.response()
    assert final.status == 200 and final.body == b"ok"
    assert c.next_response() is None  # the upstream's own 100 is not forwarded
    pair.assert_settled()


# -- keep-alive decisions --------------------------------------------------------------------------


def test_http10_keep_alive_is_honoured(make: Any) -> None:
    pair = make(hcm_extra=HTTP10)
    c, _, r = exchange(
        pair,
        b"GET / HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx",
    )
    assert r.version == b"HTTP/1.0" and r.header("connection") == b"keep-alive"
    assert not c.closed
    pair.assert_settled()


def test_http10_without_keep_alive_closes(make: Any) -> None:
    pair = make(hcm_extra=HTTP10)
    c, _, r = exchange(
        pair, b"GET / HTTP/1.0\r\nhost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx"
    )
    assert r.header("connection") == b"close" and c.closed


def test_draining_answers_with_connection_close(make: Any) -> None:
    pair = make()
    idle, up, _ = exchange(pair, GET, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    c = pair.connect()
    c.send(GET)
    up.request()  # the idle upstream connection carries it
    with pair.loop.active():
        pair.hcm.drain()
    pair.run()
    assert idle.closed  # no request in flight: closed at once
    assert not c.closed
    up.respond(200)
    r = c.response()
    assert r.header("connection") == b"close" and c.closed
    pair.assert_settled()


def test_early_response_before_the_request_body_ends_closes_with_a_delay(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\npartial")
    up = pair.upstream.accept()
    up.respond(413, body=b"too big")
    r = c.response()
    assert r.status == 413
    assert c.transport.eof_written and not c.closed  # FIN sent; still reading (and dropping)
    assert c.reading
    c.send(b"rest of the body that nobody reads")
    pair.advance(0.9)
    assert not c.closed
    pair.advance(0.2)  # delayed_close_timeout: 1 s
    assert c.closed
    assert c.next_response() is None
    assert up.closed  # the upstream request never finished: the connection is not reused
    pair.assert_settled()


def test_delayed_close_timeout_zero_closes_at_once(make: Any) -> None:
    pair = make(hcm_extra={"delayed_close_timeout": "0s"})
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\npartial")
    up = pair.upstream.accept()
    up.respond(200)
    assert c.response().status == 200
    assert c.closed


# -- headers written by the codec ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("OVERWRITE", [b"edge"]), ("APPEND_IF_ABSENT", [b"backend"]), ("PASS_THROUGH", [b"backend"])],
)
def test_server_header_transformation(make: Any, mode: str, expected: list[bytes]) -> None:
    pair = make(hcm_extra={"server_name": "edge", "server_header_transformation": mode})
    _, _, r = exchange(pair, GET, b"HTTP/1.1 200 OK\r\nserver: backend\r\ncontent-length: 0\r\n\r\n")
    assert r.header_all("server") == expected


def test_server_header_added_when_absent_unless_pass_through(make: Any) -> None:
    pair = make(hcm_extra={"server_header_transformation": "PASS_THROUGH"})
    _, _, r = exchange(pair, GET, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert r.header("server") is None
    pair2 = make(hcm_extra={"server_header_transformation": "APPEND_IF_ABSENT"})
    _, _, r = exchange(pair2, GET, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert r.header("server") == b"moorline"


def test_date_header_added_only_when_absent(make: Any) -> None:
    pair = make()
    _, _, r = exchange(pair, GET, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert r.header("date") is not None and r.header("date").endswith(b" GMT")  # type: ignore[union-attr]
    _, _, r = exchange(
        pair, GET, b"HTTP/1.1 200 OK\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\ncontent-length: 0\r\n\r\n"
    )
    assert r.header_all("date") == [b"Mon, 01 Jan 2024 00:00:00 GMT"]


# -- flow control --------------------------------------------------------------------------------


def test_client_write_backpressure_pauses_the_upstream(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(GET)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabc")
    c.block_writes()
    assert not up.reading
    c.unblock_writes()
    assert up.reading
    up.send(b"def")
    assert c.response().body == b"abcdef"
    pair.assert_settled()


def test_transport_write_limits_are_the_listener_buffer_limit(make: Any) -> None:
    pair = make(listener_extra={"per_connection_buffer_limit_bytes": 4096})
    c = pair.connect()
    c.send(b"GET")  # the AUTO codec picks HTTP/1.1 on the first bytes
    assert c.transport.write_limits == (4096, 1024)


# -- request framing and limits ------------------------------------------------------------------


def test_chunked_request_body_is_forwarded_chunked(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    up = pair.upstream.accept()
    c.send(b"2\r\nde\r\n0\r\n\r\n")
    req = up.request()
    assert req.chunked and req.body == b"abcde" and req.header("content-length") is None


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "bad-chunk-size"],
)
def test_ambiguous_or_bad_request_framing_is_400(make: Any, request_bytes: bytes) -> None:
    pair = make()
    c = pair.connect()
    c.send(request_bytes)
    r = c.response()
    assert r.status == 400 and r.header("connection") == b"close"
    assert not any(u.has_request() for u in pair.upstream.connections)


def test_request_headers_over_the_limit_are_431(make: Any) -> None:
    pair = make(hcm_extra={"max_request_headers_kb": 1})
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"v" * 2000 + b"\r\n\r\n")
    r = c.response()
    assert r.status == 431
    assert pair.upstream.attempts == []


def test_too_many_request_headers_are_431(make: Any) -> None:
    pair = make(hcm_extra={"common_http_protocol_options": {"max_headers_count": 5}})
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(10)) + b"\r\n")
    assert c.response().status == 431
    assert pair.upstream.attempts == []


def test_request_split_into_single_bytes(make: Any) -> None:
    pair = make()
    c = pair.connect()
    for b in b"POST /split HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nok":
        c.send(bytes((b,)))
    up = pair.upstream.accept()
    req = up.request()
    assert req.target == b"/split" and req.body == b"ok"
    up.respond(200)
    assert c.response().status == 200
    pair.assert_settled()


# -- memory of idle keep-alive connections ---------------------------------------------------------


def test_crowded_keep_alive_connection_frees_its_parser_between_requests(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Above RELEASE_PARSERS_ABOVE connections a keep-alive connection gives llhttp's parser
    # back once a bodiless request is answered, and builds a new one for the next request.
    import moorline.stream.http1_server as h1s

    monkeypatch.setattr(h1s, "RELEASE_PARSERS_ABOVE", 0)
    pair = make()
    c = pair.connect()
    for i in range(3):
        c.send(b"GET /%d HTTP/1.1\r\nhost: a\r\n\r\n" % i)
        server = c.transport.get_protocol()  # (the codec, once the sniffer handed over)
        up = pair.upstream.accept() if pair.upstream.pending else pair.upstream.connections[-1]
        assert up.request().target == b"/%d" % i
        up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        assert c.response().body == b"ok"
        assert server.parser.released  # freed while idle
    # A request with a body cannot prove the boundary: the parser is kept, and all still works.
    c.send(b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhi")
    up = pair.upstream.connections[-1]
    assert up.request().body == b"hi"
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert c.response().status == 200
    assert not server.parser.released
    pair.assert_settled()


def test_few_connections_keep_their_parser(make: Any) -> None:
    pair = make()
    c, _, r = exchange(pair, GET, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert r.status == 200 and not c.transport.get_protocol().parser.released


@pytest.mark.parametrize("rest", [b"", b"ho"])
def test_crowded_connection_answered_inside_a_read_keeps_the_pipelined_request(
    make: Any, monkeypatch: pytest.MonkeyPatch, rest: bytes
) -> None:
    # A request answered at once when its body ends (buffer filter, direct response) completes
    # its response inside the parser's callback: the parser must not be freed under the rest of
    # that read (a pipelined request, whole or begun).
    import moorline.stream.http1_server as h1s

    monkeypatch.setattr(h1s, "RELEASE_PARSERS_ABOVE", 0)
    buf = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 1000,
        },
    }
    pair = make(routes=[{"match": {"prefix": "/"}, "direct_response": {"status": 200}}], http_filters=[buf])
    c = pair.connect()
    second = b"GET /2 HTTP/1.1\r\nhost: a\r\n\r\n"
    c.send(
        b"POST /1 HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhi"
        + (second[:17] + rest if rest else second)
    )
    if rest:
        c.send(second[17 + len(rest) :])
    assert [r.status for r in c.responses()] == [200, 200]
    assert not c.closed
    pair.assert_settled()


def test_a_keep_alive_connection_is_swept_finely_only_while_a_request_is_in_progress(make: Any) -> None:
    # stream.connections: idle connections are ticked every idle period, busy ones every period.
    pair = make()
    c, _, r = exchange(pair, GET, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    server = c.transport.get_protocol()
    rt = server.cfg.runtime
    assert r.status == 200 and server in rt.conns and server not in rt.busy
    c.send(b"GET /next HTTP/1.1\r\nho")  # a head arriving: its deadlines need the fine sweep
    assert server in rt.busy
    c.send(b"st: a\r\n\r\n")
    up = pair.upstream.connections[-1]
    assert up.request().target == b"/next"
    assert server in rt.busy  # the stream is open
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert c.response().status == 200
    assert server not in rt.busy
