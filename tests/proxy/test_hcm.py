"""The HTTP connection manager (moorline/proxy/hcm.py), driven in memory with moorline.testing.pair.

Each test builds the real server from a bootstrap, plays the downstream client and the upstream
server byte by byte, and moves the virtual clock for timeouts. Every scenario ends with the
stream counters settled (``Pair.assert_settled``: nothing active, every request completed, one
access-log entry each).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from moorline.protocol import http2_backends
from moorline.proxy.filter import CONTINUE, HttpFilter
from moorline.proxy.phases import Phase
from moorline.testing.pair import Pair, bootstrap_yaml

UUID4 = re.compile(rb"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(filters: Any = (), **kw: Any) -> Pair:
        p = Pair(bootstrap_yaml(**kw), filters=filters)
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


def proxied(pair: Pair, request: bytes, status: int = 200, body: bytes = b"ok") -> tuple[Any, Any, Any]:
    """Send ``request`` on a new connection, answer it upstream; (client, upstream request, response)."""
    c = pair.connect()
    c.send(request)
    up = upstream_with_request(pair)
    req = up.request()
    up.respond(status, body=body)
    return c, req, c.response()


def upstream_with_request(pair: Pair) -> Any:
    """The upstream connection the last request went to: a new one, or a reused idle one."""
    if pair.upstream.pending:
        return pair.upstream.accept()
    for up in pair.upstream.connections:
        if up.has_request():
            return up
    raise AssertionError("no upstream connection carries a new request")


# -- request header handling ---------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_removed(make: Any) -> None:
    pair = make()
    _, req, resp = proxied(
        pair,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, x-hop\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\n"
        b"proxy-connection: keep-alive\r\nte: gzip, trailers\r\nupgrade: websocket\r\n"
        b"http2-settings: AAMAAABkAAQAAP__\r\nx-custom: kept\r\n\r\n",
    )
    assert resp.status == 200
    names = req.names()
    for hop in (b"connection", b"x-hop", b"keep-alive", b"proxy-connection", b"upgrade", b"http2-settings"):
        assert hop not in names, (hop, req.headers)
    assert req.header("te") == b"trailers"  # only "trailers" survives (gRPC needs it)
    assert req.header("x-custom") == b"kept"
    assert req.header("host") == b"a"
    pair.assert_settled()


def test_te_without_trailers_is_dropped(make: Any) -> None:
    pair = make()
    _, req, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\nte: gzip\r\n\r\n")
    assert req.header("te") is None


def test_hop_by_hop_response_headers_are_removed(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nkeep-alive: timeout=9\r\nproxy-connection: close\r\n"
        b"upgrade: h2c\r\nx-up: 1\r\n\r\nok"
    )
    r = c.response()
    assert r.status == 200 and r.body == b"ok"
    for hop in (b"keep-alive", b"proxy-connection", b"upgrade"):
        assert hop not in r.names()
    assert r.header("x-up") == b"1"
    assert not c.closed
    pair.assert_settled()


def test_x_forwarded_proto_added_and_client_value_kept_without_use_remote_address(make: Any) -> None:
    pair = make()
    _, req, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert req.header("x-forwarded-proto") == b"http"
    assert req.header("x-forwarded-for") is None  # appended only with use_remote_address
    _, req, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-proto: https\r\n\r\n")
    assert req.header_all("x-forwarded-proto") == [b"https"]
    pair.assert_settled()


def test_use_remote_address_appends_peer_and_overwrites_proto(make: Any) -> None:
    pair = make(hcm_extra={"use_remote_address": True})
    _, req, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert req.header("x-forwarded-for") == b"10.1.0.1"
    _, req, _ = proxied(
        pair, b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: https\r\n\r\n"
    )
    assert req.header_all("x-forwarded-for") == [b"192.0.2.7, 10.1.0.1"]
    assert req.header_all("x-forwarded-proto") == [b"http"]  # the connection's scheme, not the client's
    pair.assert_settled()


def test_skip_xff_append(make: Any) -> None:
    pair = make(hcm_extra={"use_remote_address": True, "skip_xff_append": True})
    _, req, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 192.0.2.7\r\n\r\n")
    assert req.header_all("x-forwarded-for") == [b"192.0.2.7"]


def test_x_request_id_generated_when_absent_and_logged(make: Any) -> None:
    pair = make()
    _, r1, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    _, r2, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    id1, id2 = r1.header("x-request-id"), r2.header("x-request-id")
    assert id1 is not None and UUID4.match(id1), id1
    assert id2 is not None and UUID4.match(id2) and id1 != id2
    assert [e.request_id for e in pair.access_log.entries] == [id1.decode(), id2.decode()]


def test_x_request_id_from_client_is_kept(make: Any) -> None:
    pair = make()
    _, req, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\nx-request-id: abc-123\r\n\r\n")
    assert req.header_all("x-request-id") == [b"abc-123"]
    assert pair.access_log.entries[0].request_id == "abc-123"


def test_headers_named_in_connection_are_gone_before_the_hcm_uses_them(make: Any) -> None:
    # "Connection: x-request-id" makes the client's id hop-by-hop: the upstream gets a fresh id
    # and the access log records that one (not the dropped one); a nominated x-forwarded-for
    # is not passed on either.
    pair = make()
    _, req, _ = proxied(
        pair,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: x-request-id, x-forwarded-for\r\n"
        b"x-request-id: client-id\r\nx-forwarded-for: 192.0.2.9\r\n\r\n",
    )
    rid = req.header("x-request-id")
    assert rid is not None and rid != b"client-id" and UUID4.match(rid), rid
    assert pair.access_log.entries[0].request_id == rid.decode()
    assert req.header("x-forwarded-for") is None
    pair.assert_settled()


def test_generate_request_id_off(make: Any) -> None:
    pair = make(hcm_extra={"generate_request_id": False})
    _, req, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert req.header("x-request-id") is None


def test_h2c_upgrade_offer_is_stripped_and_served_over_http11(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
        b"http2-settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    up = pair.upstream.accept()
    req = up.request()
    for n in (b"upgrade", b"connection", b"http2-settings"):
        assert n not in req.names()
    up.respond(200, body=b"ok")
    r = c.response()
    assert r.status == 200 and r.version == b"HTTP/1.1" and r.body == b"ok"
    assert r.header("upgrade") is None
    # still a keep-alive HTTP/1.1 connection
    c.send(b"GET /2 HTTP/1.1\r\nhost: a\r\n\r\n")
    assert up.request().target == b"/2"
    up.respond(200)
    assert c.response().status == 200
    assert pair.http("downstream_rq_ws_on_non_ws_route") == 0
    pair.assert_settled()


@pytest.mark.parametrize("host", [b"a b", b"a\tb", b"{}", b"/", b"?", b"evil/x?y", b"illegal{}"])
def test_invalid_host_is_400_and_not_forwarded(make: Any, host: bytes) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: " + host + b"\r\n\r\n")
    r = c.response()
    assert r.status == 400
    assert r.header("connection") == b"close"
    assert c.closed
    assert pair.upstream.attempts == []
    assert pair.http("downstream_rq_4xx") == 1
    assert pair.access_log.entries[0].response_flags == ["DPE"]
    pair.assert_settled()


def test_good_authorities_are_remembered_bad_ones_never(make: Any) -> None:
    # The connection manager remembers authorities it has checked (a keep-alive client repeats
    # its Host): a bad one after good ones is still refused, and the memory is bounded.
    pair = make()
    c = pair.connect()
    for _ in range(3):
        c.send(b"GET / HTTP/1.1\r\nhost: good.example\r\n\r\n")
        up = upstream_with_request(pair)
        up.request()
        up.respond(200)
        assert c.response().status == 200
    c.send(b"GET / HTTP/1.1\r\nhost: good.example{}\r\n\r\n")
    assert c.response().status == 400
    cfg = pair.hcm
    assert b"good.example" in cfg.good_authorities and b"good.example{}" not in cfg.good_authorities
    for i in range(3000):
        assert cfg.check_authority(b"h%d.example" % i)
    assert len(cfg.good_authorities) <= 1024
    assert not cfg.check_authority(b"a b")
    pair.assert_settled()


def test_remembered_authorities_are_bounded_in_bytes_too(make: Any) -> None:
    # A client may send a new, long Host on each request (up to the header limit): what the
    # connection manager keeps of them must stay small, not 1,024 times the header limit.
    pair = make()
    c = pair.connect()
    long_host = b"h" * 8000 + b".example"
    c.send(b"GET / HTTP/1.1\r\nhost: " + long_host + b"\r\n\r\n")
    up = upstream_with_request(pair)
    up.request()
    up.respond(200)
    assert c.response().status == 200
    cfg = pair.hcm
    for i in range(1100):
        assert cfg.check_authority(b"%d." % i + long_host)
    assert sum(map(len, cfg.good_authorities)) <= 1024 * 256
    pair.assert_settled()


def assert_h2_rejected(pair: Any, h: Any, sid: int) -> None:
    """An invalid request header block: the h2 backend lets it through to moorline's own checks,
    which answer 400; nghttp2 rejects it in the codec, and as Envoy does by default
    (stream_error_on_invalid_http_messaging false) the connection ends with GOAWAY
    PROTOCOL_ERROR. Either way nothing goes upstream."""
    r = h.response(sid)
    if http2_backends.BACKEND == "nghttp2":
        assert r.status is None
        assert h.goaway_code() == 1
        assert pair.stat("http2.rx_messaging_error") >= 1
    else:
        assert r.status == 400
    assert pair.upstream.attempts == []


@pytest.mark.parametrize("authority", ["evil/x?y", "illegal{}", "a b"])
def test_invalid_h2_authority_is_rejected(make: Any, authority: str) -> None:
    pair = make()
    h = pair.connect_h2()
    sid = h.request("GET", "/", authority)
    assert_h2_rejected(pair, h, sid)
    pair.assert_settled()


def test_h2_request_over_the_header_count_limit_is_reset_not_forwarded(make: Any) -> None:
    # The limit HTTP/1.1 answers 431 for (max_headers_count, 100 by default) applies to
    # HTTP/2 too: the stream is reset (as Envoy's codec does), nothing goes upstream, and the
    # connection's other streams are served.
    pair = make()
    h = pair.connect_h2()
    sid = h.request("GET", "/", "example.com", headers=[(f"x-h{i}", "v") for i in range(1000)])
    r = h.response(sid)
    assert r.reset_code == 2 and r.headers is None  # INTERNAL_ERROR
    assert pair.upstream.attempts == []
    assert pair.stat("http2.header_overflow") == 1
    ok = h.request("GET", "/", "example.com", headers=[(f"x-h{i}", "v") for i in range(50)])
    up = pair.upstream.accept()
    assert len([k for k, _ in up.request().headers if k.startswith(b"x-h")]) == 50
    up.respond(200)
    assert h.response(ok).status == 200


def test_h2_trailers_past_the_header_list_limit_reset_only_that_stream(make: Any) -> None:
    # The trailers of a proxied request decode past max_request_headers_kb: the codec resets
    # that stream (http2.header_overflow), the proxied request ends instead of hanging, and the
    # connection serves the next request.
    pair = make()
    h = pair.connect_h2()
    sid = h.request("POST", "/", "example.com", body=b"abc", end_stream=False)
    up = pair.upstream.accept()  # the body is on its way upstream; the request is not complete
    h.send_trailers(sid, [(f"x-t{i}", "v" * 1000) for i in range(70)])  # 70 KB > 60 KiB
    r = h.response(sid)
    assert r.reset_code == 2 and r.headers is None  # INTERNAL_ERROR
    assert pair.stat("http2.header_overflow") == 1
    assert up.closed  # the half-sent upstream request was abandoned, not left open
    ok = h.request("GET", "/", "example.com")
    up2 = pair.upstream.accept()
    up2.request()
    up2.respond(200)
    assert h.response(ok).status == 200


def test_h2_window_update_flood_ends_the_connection(make: Any) -> None:
    # One client sending WINDOW_UPDATEs with nothing to update them for stalled every other
    # client of the loop: past Envoy's limit the connection gets GOAWAY ENHANCE_YOUR_CALM.
    import h2.events

    pair = make()
    h = pair.connect_h2()
    for _ in range(50):
        h.h2.increment_flow_control_window(1)
    h._flush()
    goaways = [e for e in h.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].error_code == 11  # ENHANCE_YOUR_CALM
    assert pair.stat("http2.inbound_window_update_frames_flood") == 1
    assert pair.upstream.attempts == []


def test_invalid_h2_method_cannot_inject_a_request_line(make: Any) -> None:
    pair = make()
    h = pair.connect_h2()
    sid = h.request("GET /raw/admin", "/raw/public", "example.com")
    assert_h2_rejected(pair, h, sid)
    h = pair.connect_h2()
    sid = h.request("GET", "/raw/public /raw/admin", "example.com")
    assert_h2_rejected(pair, h, sid)
    pair.assert_settled()


def test_invalid_http1_method_is_400_and_closes(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"G(ET / HTTP/1.1\r\nhost: a\r\n\r\n")
    r = c.response()
    assert r.status == 400 and r.header("connection") == b"close"
    assert c.transport.eof_written  # delayed close: FIN now, the socket after the delay
    pair.advance(1.5)
    assert c.closed
    assert pair.upstream.attempts == []
    assert pair.http("downstream_cx_protocol_error") == 1
    pair.assert_settled()


def test_http10_gets_426_by_default(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"GET / HTTP/1.0\r\nhost: a\r\n\r\n")
    r = c.response()
    assert r.status == 426 and r.version == b"HTTP/1.0"
    assert c.closed
    assert pair.upstream.attempts == []
    assert pair.access_log.entries[0].response_code_details == "low_version"
    pair.assert_settled()


def test_http10_accepted_with_default_host(make: Any) -> None:
    pair = make(
        hcm_extra={
            "http_protocol_options": {"accept_http_10": True, "default_host_for_http_10": "legacy.local"}
        }
    )
    c = pair.connect()
    c.send(b"GET /old HTTP/1.0\r\n\r\n")
    up = pair.upstream.accept()
    req = up.request()
    assert req.header("host") == b"legacy.local" and req.target == b"/old"
    up.respond(200, body=b"ok")
    r = c.response()
    assert r.status == 200 and r.version == b"HTTP/1.0" and r.body == b"ok"
    assert c.closed  # HTTP/1.0 without keep-alive
    pair.assert_settled()


def test_absolute_form_target_routes_by_its_authority(make: Any) -> None:
    pair = make(
        virtual_hosts=[
            {
                "name": "ex",
                "domains": ["example.com"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "be"}}],
            },
            {
                "name": "rest",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 418}}],
            },
        ]
    )
    c, req, resp = proxied(pair, b"GET http://example.com/p?q=1 HTTP/1.1\r\nhost: other\r\n\r\n")
    assert resp.status == 200
    assert req.target == b"/p?q=1"
    assert req.header_all("host") == [b"example.com"]
    c.send(b"GET /p HTTP/1.1\r\nhost: other\r\n\r\n")
    assert c.response().status == 418
    pair.assert_settled()


def test_connect_without_a_connect_route_is_404(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
    assert c.response().status == 404
    assert pair.upstream.attempts == []
    assert pair.http("no_route") == 1
    pair.assert_settled()


CONNECT_ROUTES = [
    {
        "match": {"connect_matcher": {}},
        "route": {"cluster": "be", "upgrade_configs": [{"upgrade_type": "CONNECT"}]},
    }
]


@pytest.mark.parametrize("same_read", [False, True])
def test_connect_200_and_tunnel_bytes_reach_the_client_raw(make: Any, same_read: bool) -> None:
    pair = make(routes=CONNECT_ROUTES)
    c = pair.connect()
    c.send(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
    up = pair.upstream.accept()
    req = up.request()
    assert req.method == b"CONNECT" and req.target == b"example.com:443"
    if same_read:
        up.send(b"HTTP/1.1 200 OK\r\n\r\nserver-first")
    else:
        up.send(b"HTTP/1.1 200 OK\r\n\r\n")
        up.send(b"server-first")
    r = c.response()
    assert r.status == 200
    assert r.header("transfer-encoding") is None and r.header("content-length") is None
    assert c.data.endswith(b"\r\n\r\nserver-first")


def test_connect_request_upstream_has_no_body_framing(make: Any) -> None:
    pair = make(routes=CONNECT_ROUTES)
    c = pair.connect()
    c.send(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\nclient-first")
    up = pair.upstream.accept()
    req = up.request()
    assert req.header("transfer-encoding") is None
    assert not up.data.endswith(b"client-first")  # held until the tunnel is established
    up.send(b"HTTP/1.1 200 OK\r\n\r\n")
    assert up.data.endswith(b"\r\n\r\nclient-first")


def test_connect_exchange_settles_when_both_sides_close(make: Any) -> None:
    pair = make(routes=CONNECT_ROUTES)
    c = pair.connect()
    c.send(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
    up = pair.upstream.accept()
    assert up.request().method == b"CONNECT"
    up.send(b"HTTP/1.1 200 OK\r\n\r\n")
    c.send(b"from-client")
    assert b"from-client" in up.data
    up.eof()
    c.eof()
    assert pair.http("downstream_rq_active") == 0
    assert pair.cluster_stat("be", "upstream_rq_active") == 0
    pair.assert_settled()


# -- keep-alive, close, pipelining ---------------------------------------------------------------


def test_keep_alive_reuses_both_connections(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    assert up.request().target == b"/1"
    up.respond(200, body=b"one")
    assert c.response().body == b"one"
    c.send(b"GET /2 HTTP/1.1\r\nhost: a\r\n\r\n")
    assert pair.upstream.pending == []  # the idle upstream connection was reused
    assert up.request().target == b"/2"
    up.respond(200, body=b"two")
    r = c.response()
    assert r.body == b"two" and r.header("connection") is None
    assert not c.closed and not up.closed
    assert pair.cluster_stat("be", "upstream_cx_total") == 1
    pair.assert_settled()


def test_client_connection_close_closes_after_the_response(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    up = pair.upstream.accept()
    assert up.request().header("connection") is None
    up.respond(200, body=b"ok")
    r = c.response()
    assert r.header("connection") == b"close"
    assert c.closed
    assert not up.closed  # the upstream connection goes back to the pool
    assert len(pair.cluster("be").hosts[0].pool.idle) == 1
    pair.assert_settled()


def test_upstream_connection_close_keeps_the_client_connection(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.respond(200, [("connection", "close")], body=b"ok")
    r = c.response()
    assert r.status == 200 and r.header("connection") is None
    assert up.closed and not c.closed
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up2 = pair.upstream.accept()  # a new upstream connection
    up2.request()
    up2.respond(200)
    assert c.response().status == 200
    pair.assert_settled()


def test_pipelined_requests_are_forwarded_one_at_a_time_and_answered_in_order(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(
        b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nGET /2 HTTP/1.1\r\nhost: a\r\n\r\nGET /3 HTTP/1.1\r\nhost: a\r\n\r\n"
    )
    up = pair.upstream.accept()
    assert [m.target for m in up.requests()] == [b"/1"]
    assert not c.reading  # the rest waits in the backlog
    assert pair.upstream.pending == []
    up.respond(200, body=b"one")
    assert [m.target for m in up.requests()] == [b"/2"]
    up.respond(200, body=b"two")
    assert [m.target for m in up.requests()] == [b"/3"]
    up.respond(200, body=b"three")
    assert [r.body for r in c.responses()] == [b"one", b"two", b"three"]
    assert c.reading and not c.closed
    pair.assert_settled()


def test_malformed_request_behind_a_good_one_is_answered_after_it(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"POST /good HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhiGARBAGE\r\n\r\n")
    up = pair.upstream.accept()
    req = up.request()
    assert req.target == b"/good" and req.body == b"hi"
    assert c.data == b""  # nothing before the forwarded request is answered
    up.respond(201, body=b"made")
    first, second = c.responses()
    assert (first.status, first.body) == (201, b"made")
    assert second.status == 400 and second.header("connection") == b"close"
    assert c.transport.eof_written
    pair.advance(1.5)  # delayed_close_timeout (1 s)
    assert c.closed
    assert pair.http("downstream_rq_2xx") == 1 and pair.http("downstream_rq_4xx") == 1
    pair.assert_settled()


def test_client_reset_cancels_the_upstream_request(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    c.reset()
    assert up.aborted
    assert pair.http("downstream_rq_rx_reset") == 1
    assert pair.access_log.entries[0].response_flags == ["DC"]
    assert pair.cluster_stat("be", "upstream_rq_tx_reset") == 1
    pair.assert_settled()


# -- timeouts ------------------------------------------------------------------------------------


def test_stream_idle_timeout_on_a_half_received_head_is_408(make: Any) -> None:
    pair = make(hcm_extra={"stream_idle_timeout": "10s"})
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n")  # the head never ends (slowloris)
    pair.advance(9)
    assert c.data == b"" and not c.transport.eof_written
    pair.advance(2)
    r = c.response()
    assert r.status == 408 and r.header("connection") == b"close"
    assert pair.http("downstream_rq_idle_timeout") == 1
    assert pair.upstream.attempts == []
    pair.advance(2)
    assert c.closed
    pair.assert_settled()


def test_stream_idle_timeout_is_reset_by_activity(make: Any) -> None:
    pair = make(hcm_extra={"stream_idle_timeout": "10s"})
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\n")
    up = pair.upstream.accept()
    for _ in range(3):
        pair.advance(6)
        c.send(b"x")  # every byte is activity
    assert c.data == b""
    pair.advance(11)
    r = c.response()
    assert r.status == 408 and r.body == b"stream timeout"
    assert up.aborted
    assert pair.access_log.entries[0].response_flags == ["SI"]
    pair.assert_settled()


def test_stream_idle_timeout_after_response_started_resets(make: Any) -> None:
    pair = make(hcm_extra={"stream_idle_timeout": "10s"})
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    pair.advance(12)
    assert c.aborted and up.aborted
    assert pair.http("downstream_rq_idle_timeout") == 1
    assert pair.http("downstream_rq_tx_reset") == 1
    pair.assert_settled()


def test_request_timeout_is_408_while_the_body_is_arriving(make: Any) -> None:
    pair = make(hcm_extra={"request_timeout": "5s"})
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc")
    up = pair.upstream.accept()
    pair.advance(4)
    c.send(b"d")  # activity does not extend the overall request timeout
    pair.advance(2)
    r = c.response()
    assert r.status == 408 and r.body == b"request timeout"
    assert r.header("connection") == b"close"
    assert up.aborted
    assert pair.http("downstream_rq_timeout") == 1
    assert pair.access_log.entries[0].response_code_details == "request_overall_timeout"
    pair.assert_settled()


def test_request_timeout_does_not_cut_a_started_response(make: Any) -> None:
    pair = make(hcm_extra={"request_timeout": "5s"})
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
    pair.advance(6)
    up.send(b"cd")
    r = c.response()
    assert r.status == 200 and r.body == b"abcd"
    assert pair.http("downstream_rq_timeout") == 0
    pair.assert_settled()


def test_idle_connection_closes_after_idle_timeout(make: Any) -> None:
    pair = make(hcm_extra={"common_http_protocol_options": {"idle_timeout": "30s"}})
    c, _, _ = proxied(pair, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    pair.advance(29)
    assert not c.closed
    pair.advance(3)
    assert c.closed
    assert pair.http("downstream_cx_idle_timeout") == 1
    assert pair.http("downstream_cx_active") == 0


# -- lifecycle: phases, stats, access log ----------------------------------------------------------


class PhaseSpy(HttpFilter):
    seen: list[tuple[str, Phase]] = []

    def decode_headers(self, headers: Any, end_stream: bool) -> int:
        self.seen.append(("decode_headers", self.callbacks.phase))  # type: ignore[union-attr]
        return CONTINUE

    def encode_headers(self, headers: Any, end_stream: bool) -> int:
        self.seen.append(("encode_headers", self.callbacks.phase))  # type: ignore[union-attr]
        return CONTINUE

    def on_destroy(self) -> None:
        self.seen.append(("destroy", self.callbacks.phase))  # type: ignore[union-attr]


def test_phases_progress_from_init_to_end(make: Any) -> None:
    seen: list[tuple[str, Phase]] = []
    spy = type("Spy", (PhaseSpy,), {"seen": seen})
    pair = make(filters=[lambda s: spy()])
    streams: list[Any] = []
    new_stream = pair.hcm.new_stream

    def record_new(conn: Any) -> Any:
        s = new_stream(conn)
        streams.append(s)
        seen.append(("created", s.phase))
        return s

    pair.hcm.new_stream = record_new
    table = pair.hcm.route_provider.current

    class SpyTable:
        def __getattr__(self, name: str) -> Any:
            return getattr(table, name)

        def match(self, *a: Any) -> Any:
            seen.append(("match", streams[-1].phase))
            return table.match(*a)

    pair.hcm.route_provider.current = SpyTable()
    cluster = pair.cluster("be")
    choose = cluster.choose_host

    def spy_choose(*a: Any) -> Any:
        seen.append(("choose_host", streams[-1].phase))
        return choose(*a)

    cluster.choose_host = spy_choose
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    assert streams[0].phase == Phase.UPSTREAM_REQUEST
    up.respond(200, body=b"ok")
    assert c.response().status == 200
    assert seen == [
        ("created", Phase.INIT),
        ("decode_headers", Phase.DOWNSTREAM_FILTERS),
        ("match", Phase.MATCH_ROUTE),
        ("choose_host", Phase.CHOOSE_HOST),
        ("encode_headers", Phase.UPSTREAM_RESPONSE),
        ("destroy", Phase.END),
    ]
    assert streams[0].phase == Phase.END and streams[0].done
    pair.assert_settled()


def test_stats_and_access_log_for_a_mix_of_outcomes(make: Any) -> None:
    pair = make(
        routes=[
            {"match": {"prefix": "/direct"}, "direct_response": {"status": 204}},
            {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
        ]
    )
    c = pair.connect()
    c.send(b"GET /direct HTTP/1.1\r\nhost: a\r\n\r\n")
    assert c.response().status == 204
    c.send(b"GET /up HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.respond(503, body=b"busy")
    assert c.response().status == 503
    c.send(b"GET /up HTTP/1.1\r\nhost: a\r\n\r\n")
    up.request()
    up.respond(302, [("location", "/x")])
    assert c.response().status == 302
    c.send(b"GET /up HTTP/1.1\r\nhost: a\r\n\r\n")
    up.request()
    c.reset()
    assert pair.http("downstream_rq_total") == 4
    assert pair.http("downstream_rq_completed") == 4
    assert pair.http("downstream_rq_active") == 0
    assert (
        pair.http("downstream_rq_2xx"),
        pair.http("downstream_rq_3xx"),
        pair.http("downstream_rq_5xx"),
    ) == (1, 1, 1)
    assert pair.http("rq_direct_response") == 1
    assert pair.http("downstream_rq_rx_reset") == 1
    log = pair.access_log.entries
    assert [e.response_code for e in log] == [204, 503, 302, 0]
    assert [e.upstream_cluster for e in log] == [None, "be", "be", "be"]
    assert log[3].response_flags == ["DC"]
    assert all(e.protocol == "HTTP/1.1" for e in log)
    assert pair.http("downstream_cx_active") == 0
    pair.assert_settled()


def test_http2_requests_use_the_same_connection_manager(make: Any) -> None:
    pair = make()
    h = pair.connect_h2()
    s1 = h.request("GET", "/a", "example.com", headers=[("x-forwarded-proto", "https")])
    s2 = h.request("POST", "/b", "example.com", body=b"data")
    up1 = pair.upstream.accept()
    up2 = pair.upstream.accept()  # HTTP/1.1 upstream: one connection per concurrent request
    reqs = {m.target: m for m in (up1.request(), up2.request())}
    assert reqs[b"/a"].header("host") == b"example.com"
    assert reqs[b"/a"].header("x-forwarded-proto") == b"https"
    assert reqs[b"/b"].body == b"data"
    up1.respond(200, body=b"1")
    up2.respond(200, body=b"2")
    assert {h.response(s1).body, h.response(s2).body} == {b"1", b"2"}
    assert h.response(s1).ended and h.response(s2).ended
    assert [e.protocol for e in pair.access_log.entries] == ["HTTP/2", "HTTP/2"]
    assert pair.http("downstream_rq_http1_total") == 0
    pair.assert_settled()


def test_file_access_log_gets_one_line_per_request(make: Any, tmp_path: Any) -> None:
    from moorline.testing.procs import file_access_log

    path = tmp_path / "access.log"
    pair = make(
        hcm_extra={"access_log": file_access_log(path, "%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_FLAGS%\n")}
    )
    c = pair.connect()
    c.send(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.respond(200)
    c.send(b"GET /b HTTP/1.1\r\nhost: a b\r\n\r\n")
    pair.run()
    pair.server.ctx.access_logs.flush_all()
    assert path.read_text().splitlines() == ["200 /a -", "400 /b DPE"]


def test_stream_info_downstream_addresses_come_from_the_connection(make: Any) -> None:
    # Formatted when read (an idle connection keeps no address strings), from the ConnInfo.
    pair = make()
    c = pair.connect(remote=("10.1.0.7", 40001), local=("10.0.0.1", 10000))
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = upstream_with_request(pair)
    up.request()
    up.respond(200)
    assert c.response().status == 200
    e = pair.access_log.entries[0]
    assert (e.downstream_remote_address, e.downstream_local_address) == ("10.1.0.7:40001", "10.0.0.1:10000")
    e.downstream_remote_address = "1.2.3.4:5"  # a given address wins (L4 and tests set them)
    assert e.downstream_remote_address == "1.2.3.4:5"
    pair.assert_settled()


def test_gradual_drain_closes_connections_as_its_probability_grows() -> None:
    """``drain(GradualDrain)`` (``--drain-strategy gradual``): idle keep-alive connections stay;
    each response closes its connection with the drain's probability; past the drain time every
    response does. ``drain(True)`` afterwards tightens it to immediate; a second gradual drain
    does not restart the first."""
    from moorline.stream.connections import GradualDrain

    now = [0.0]
    with Pair(bootstrap_yaml()) as pair:
        idle = pair.connect()
        idle.request("GET", "/idle")
        up0 = pair.upstream.accept()
        up0.request()
        up0.respond(200, body=b"i")
        assert idle.response().status == 200  # now an idle keep-alive connection
        busy = pair.connect()
        decision = GradualDrain(10.0, lambda: now[0], lambda: 0.5)
        pair.hcm.drain(decision)
        assert not idle.closed
        now[0] = 2.0  # 20% < 0.5: kept alive
        busy.request("GET", "/a")
        up = up0  # the pool reuses its keep-alive upstream connection
        up.request()
        up.respond(200, body=b"a")
        assert busy.response().header("connection") is None and not busy.closed
        pair.hcm.drain(GradualDrain(10.0, lambda: 100.0, lambda: 0.5))
        assert pair.hcm.runtime.draining is decision
        now[0] = 6.0  # 60% > 0.5: this response closes
        busy.request("GET", "/b")
        up.request()
        up.respond(200, body=b"b")
        assert busy.response().header("connection") == b"close"
        pair.hcm.drain(True)
        assert pair.hcm.runtime.draining is True and idle.closed
