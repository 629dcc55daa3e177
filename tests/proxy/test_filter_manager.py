"""The HTTP filter manager (moorline/proxy/filter_manager.py): Envoy's filter semantics in both
directions, driven through the real connection manager with moorline.testing.pair.

The filters here are scripted: each hook returns what the test says (a value, or a function of
the call) and every call is logged as ``(filter, hook, detail)``, so a test asserts exactly which
filter saw which event, in which order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from moorline.proxy.filter import (
    CONTINUE,
    STOP_ALL_ITERATION_AND_BUFFER,
    STOP_ITERATION,
    STOP_ITERATION_NO_BUFFER,
    HttpFilter,
)
from moorline.testing.pair import Pair, bootstrap_yaml

Log = list[tuple[Any, ...]]


class Scripted(HttpFilter):
    """Logs every hook; returns ``script[hook]`` (an int, or ``f(filter, *args) -> int``)."""

    def __init__(self, name: str, log: Log, script: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.log = log
        self.script = script
        self.destroyed = 0

    def _run(self, hook: str, detail: Any, *args: Any) -> int:
        self.log.append((self.name, hook, detail))
        r = self.script.get(hook, CONTINUE)
        return int(r(self, *args)) if callable(r) else int(r)

    def decode_headers(self, headers: Any, end_stream: bool) -> int:
        return self._run("decode_headers", end_stream, headers, end_stream)

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        return self._run("decode_data", (data, end_stream), data, end_stream)

    def decode_trailers(self, trailers: Any) -> int:
        return self._run("decode_trailers", list(trailers), trailers)

    def encode_headers(self, headers: Any, end_stream: bool) -> int:
        return self._run("encode_headers", (headers.status, end_stream), headers, end_stream)

    def encode_data(self, data: bytes, end_stream: bool) -> int:
        return self._run("encode_data", (data, end_stream), data, end_stream)

    def encode_trailers(self, trailers: Any) -> int:
        return self._run("encode_trailers", list(trailers), trailers)

    def on_destroy(self) -> None:
        self.destroyed += 1
        self.log.append((self.name, "destroy", None))


class Chain:
    """Filter factories for a pair, and the instances they made."""

    def __init__(self, **scripts: dict[str, Any]) -> None:
        self.log: Log = []
        self.scripts = scripts
        self.instances: list[Scripted] = []

    def factories(self) -> list[Callable[[Any], Scripted]]:
        def factory(name: str) -> Callable[[Any], Scripted]:
            def make(stream: Any) -> Scripted:
                f = Scripted(name, self.log, self.scripts[name])
                self.instances.append(f)
                return f

            return make

        return [factory(n) for n in self.scripts]

    def get(self, name: str) -> Scripted:
        return [f for f in self.instances if f.name == name][-1]

    def calls(self, name: str | None = None, prefix: str = "") -> list[tuple[Any, ...]]:
        return [e for e in self.log if (name is None or e[0] == name) and e[1].startswith(prefix)]


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(chain: Chain, **kw: Any) -> Pair:
        p = Pair(bootstrap_yaml(**kw), filters=chain.factories())
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


def later(pair: Pair, fn: Callable[[], None]) -> None:
    """Call ``fn`` from a loop callback, as a filter finishing asynchronous work would."""
    pair.loop.call_soon(fn)
    pair.run()


SMALL_BUFFER = {"per_connection_buffer_limit_bytes": 16}


# -- decoding ------------------------------------------------------------------------------------


def test_continue_runs_decoders_in_order_and_encoders_in_reverse(make: Any) -> None:
    def add_req(f: Scripted, headers: Any, end: bool) -> int:
        headers.add(b"x-by-" + f.name.encode(), b"1")
        return CONTINUE

    def add_resp(f: Scripted, headers: Any, end: bool) -> int:
        headers.add(b"x-resp-by-" + f.name.encode(), b"1")
        return CONTINUE

    chain = Chain(
        a={"decode_headers": add_req, "encode_headers": add_resp},
        b={"decode_headers": add_req, "encode_headers": add_resp},
    )
    pair = make(chain)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc")
    up = pair.upstream.accept()
    req = up.request()
    assert req.header("x-by-a") == b"1" and req.header("x-by-b") == b"1" and req.body == b"abc"
    up.respond(200, body=b"ok")
    r = c.response()
    assert r.header("x-resp-by-a") == b"1" and r.header("x-resp-by-b") == b"1"
    hooks = [e[:2] for e in chain.log if e[1] != "decode_data" and e[1] != "encode_data"]
    assert hooks == [
        ("a", "decode_headers"),
        ("b", "decode_headers"),
        ("b", "encode_headers"),
        ("a", "encode_headers"),
        ("a", "destroy"),
        ("b", "destroy"),
    ]
    # every body chunk reaches a before b on the way in and b before a on the way out
    assert [e for e in chain.log if e[1] == "decode_data"] == [
        ("a", "decode_data", (b"abc", False)),
        ("b", "decode_data", (b"abc", False)),
        ("a", "decode_data", (b"", True)),
        ("b", "decode_data", (b"", True)),
    ]
    # The upstream's body and its end arrive in one read: one data event ending the stream.
    assert [e for e in chain.log if e[1] == "encode_data"] == [
        ("b", "encode_data", (b"ok", True)),
        ("a", "encode_data", (b"ok", True)),
    ]
    pair.assert_settled()


def test_stop_iteration_on_headers_holds_the_request_until_data_continues(make: Any) -> None:
    def hold_until_end(f: Scripted, data: bytes, end: bool) -> int:
        return CONTINUE if end else STOP_ITERATION

    chain = Chain(a={"decode_headers": STOP_ITERATION, "decode_data": hold_until_end}, b={})
    pair = make(chain)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\n\r\nabc")
    assert pair.upstream.attempts == []  # the router has not seen the headers
    assert chain.calls("b") == []
    c.send(b"def")
    # the holding filter saw every chunk; the filters after it get the headers, then the body at once
    assert chain.calls("a", "decode_data") == [
        ("a", "decode_data", (b"abc", False)),
        ("a", "decode_data", (b"def", False)),
        ("a", "decode_data", (b"", True)),
    ]
    assert chain.calls("b") == [("b", "decode_headers", False), ("b", "decode_data", (b"abcdef", True))]
    up = pair.upstream.accept()
    assert up.request().body == b"abcdef"
    up.respond(200)
    assert c.response().status == 200
    pair.assert_settled()


def test_stop_all_iteration_buffers_unseen_until_continue_decoding(make: Any) -> None:
    chain = Chain(a={"decode_headers": STOP_ALL_ITERATION_AND_BUFFER}, b={})
    pair = make(chain)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\n\r\nabc")
    c.send(b"def")
    assert chain.calls("a", "decode_data") == []  # not shown to the filter that stopped all
    assert chain.calls("b") == [] and pair.upstream.attempts == []
    assert chain.get("a").callbacks.decoding_buffer() == b"abcdef"  # type: ignore[union-attr]
    later(pair, chain.get("a").callbacks.continue_decoding)  # type: ignore[union-attr]
    assert chain.calls("b") == [("b", "decode_headers", False), ("b", "decode_data", (b"abcdef", True))]
    up = pair.upstream.accept()
    assert up.request().body == b"abcdef"
    up.respond(200)
    assert c.response().status == 200
    pair.assert_settled()


def test_stop_all_iteration_filter_sees_the_buffered_body_after_continue(make: Any) -> None:
    chain = Chain(a={"decode_headers": STOP_ALL_ITERATION_AND_BUFFER}, b={})
    pair = make(chain)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\n\r\nabcdef")
    later(pair, chain.get("a").callbacks.continue_decoding)  # type: ignore[union-attr]
    assert chain.calls("a", "decode_data") == [("a", "decode_data", (b"abcdef", True))]


def test_headers_only_request_gets_no_data_after_end_stream(make: Any) -> None:
    chain = Chain(a={})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert chain.calls("a", "decode") == [("a", "decode_headers", True)]


def test_headers_only_h2_request_gets_no_data_after_end_stream(make: Any) -> None:
    chain = Chain(a={})
    pair = make(chain)
    h = pair.connect_h2()
    h.request("GET", "/", "a")
    assert chain.calls("a", "decode") == [("a", "decode_headers", True)]


def test_stop_iteration_no_buffer_drops_what_the_filter_keeps(make: Any) -> None:
    def keep_first(f: Scripted, data: bytes, end: bool) -> int:
        return STOP_ITERATION_NO_BUFFER if data == b"secret" else CONTINUE

    chain = Chain(a={"decode_data": keep_first}, b={})
    pair = make(chain)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n6\r\nsecret\r\n")
    up = pair.upstream.accept()  # headers went on (the filter continued them)
    assert chain.calls("b", "decode_data") == []
    assert chain.get("a").callbacks.decoding_buffer() == b""  # type: ignore[union-attr]
    c.send(b"6\r\npublic\r\n0\r\n\r\n")
    req = up.request()
    assert req.body == b"public"
    assert chain.calls("b", "decode_data") == [
        ("b", "decode_data", (b"public", False)),
        ("b", "decode_data", (b"", True)),
    ]
    up.respond(200)
    assert c.response().status == 200
    pair.assert_settled()


def test_decoder_buffer_over_the_limit_is_413(make: Any) -> None:
    chain = Chain(a={"decode_headers": STOP_ITERATION, "decode_data": STOP_ITERATION}, b={})
    pair = make(chain, listener_extra=SMALL_BUFFER)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 40\r\n\r\n" + b"x" * 10)
    assert c.data == b""
    c.send(b"y" * 10)  # 20 buffered > 16
    r = c.response()
    assert r.status == 413 and r.body == b"Payload Too Large"
    assert r.header("connection") == b"close"  # the rest of the body is not read
    assert pair.upstream.attempts == []
    assert pair.http("downstream_rq_too_large") == 1
    assert chain.calls("b", "decode") == []
    # the local reply ran through the encoders, the router's filters saw nothing of the request
    assert chain.calls("a", "encode_headers") == [("a", "encode_headers", (413, False))]
    pair.assert_settled()


def test_add_decoded_data_goes_upstream_with_the_buffered_body(make: Any) -> None:
    def hold(f: Scripted, data: bytes, end: bool) -> int:
        if end:
            f.callbacks.add_decoded_data(b"+added")  # type: ignore[union-attr]
            return CONTINUE
        return STOP_ITERATION

    chain = Chain(a={"decode_headers": STOP_ITERATION, "decode_data": hold})
    pair = make(chain)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    c.send(b"0\r\n\r\n")
    up = pair.upstream.accept()
    assert up.request().body == b"abc+added"
    up.respond(200)
    assert c.response().status == 200


# -- encoding ------------------------------------------------------------------------------------


def test_encoder_holds_headers_and_data_until_continue_encoding(make: Any) -> None:
    chain = Chain(a={"encode_headers": STOP_ITERATION, "encode_data": STOP_ITERATION})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    up.send(b"3\r\ndef\r\n0\r\n\r\n")
    assert c.data == b""  # nothing reached the client
    assert chain.get("a").callbacks.encoding_buffer() == b"abcdef"  # type: ignore[union-attr]
    later(pair, chain.get("a").callbacks.continue_encoding)  # type: ignore[union-attr]
    r = c.response()
    assert r.status == 200 and r.body == b"abcdef"
    assert chain.get("a").destroyed == 1
    pair.assert_settled()


def test_encoder_stop_iteration_on_headers_continue_on_data(make: Any) -> None:
    def rewrite(f: Scripted, data: bytes, end: bool) -> int:
        return CONTINUE if end else STOP_ITERATION

    chain = Chain(a={"encode_headers": STOP_ITERATION, "encode_data": rewrite})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabc")
    assert c.data == b""
    up.send(b"def")
    r = c.response()
    assert r.status == 200 and r.body == b"abcdef" and r.header("content-length") == b"6"
    pair.assert_settled()


def test_encoder_buffer_overflow_before_headers_is_500(make: Any) -> None:
    chain = Chain(a={"encode_headers": STOP_ITERATION, "encode_data": STOP_ITERATION})
    pair = make(chain, listener_extra=SMALL_BUFFER)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n" + b"x" * 20)
    r = c.response()
    assert r.status == 500 and r.body == b""
    assert up.aborted  # the rest of the upstream response is not wanted
    assert pair.http("downstream_rq_5xx") == 1 and pair.http("downstream_rq_2xx") == 0
    assert pair.access_log.entries[0].response_code_details == "response_payload_too_large"
    assert not c.closed  # the request was complete: the connection stays usable
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up2 = pair.upstream.accept()
    up2.request()
    up2.respond(200, body=b"small")
    later(pair, chain.get("a").callbacks.continue_encoding)  # type: ignore[union-attr]
    assert c.response().body == b"small"
    pair.assert_settled()


def test_encoder_buffer_overflow_after_headers_resets(make: Any) -> None:
    chain = Chain(a={"encode_data": STOP_ITERATION})
    pair = make(chain, listener_extra=SMALL_BUFFER)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n")
    pair.run()
    assert c.data.startswith(b"HTTP/1.1 200 OK\r\n")  # the head went out (at the end of the read)
    up.send(b"x" * 20)
    assert c.aborted and up.aborted
    assert pair.http("downstream_rq_tx_reset") == 1
    assert chain.get("a").destroyed == 1
    pair.assert_settled()


# -- trailers ------------------------------------------------------------------------------------


def test_trailers_in_both_directions(make: Any) -> None:
    chain = Chain(a={})
    pair = make(chain)
    c = pair.connect()
    c.send(
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-req-trailer: 1\r\n\r\n"
    )
    up = pair.upstream.accept()
    req = up.request()
    assert req.body == b"abc" and req.trailer("x-req-trailer") == b"1"
    up.respond(200, body=b"def", chunked=True, trailers=[("x-resp-trailer", "2")])
    r = c.response()
    assert r.body == b"def" and r.trailer("x-resp-trailer") == b"2"
    assert chain.calls("a", "decode_trailers") == [("a", "decode_trailers", [(b"x-req-trailer", b"1")])]
    assert chain.calls("a", "encode_trailers") == [("a", "encode_trailers", [(b"x-resp-trailer", b"2")])]
    pair.assert_settled()


def test_decoder_holding_trailers_until_continue(make: Any) -> None:
    chain = Chain(a={"decode_trailers": STOP_ITERATION}, b={})
    pair = make(chain)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n")
    up = pair.upstream.accept()
    assert up.next_request() is None  # body sent, the last chunk with the trailers held
    assert chain.calls("b", "decode_trailers") == []
    later(pair, chain.get("a").callbacks.continue_decoding)  # type: ignore[union-attr]
    req = up.request()
    assert req.trailer("x-t") == b"1"
    assert chain.calls("b", "decode_trailers") == [("b", "decode_trailers", [(b"x-t", b"1")])]
    up.respond(200)
    assert c.response().status == 200
    pair.assert_settled()


def test_encoder_holding_trailers_until_continue(make: Any) -> None:
    chain = Chain(a={"encode_trailers": STOP_ITERATION})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.respond(200, body=b"abc", chunked=True, trailers=[("grpc-status", "0")])
    assert c.next_response() is None
    later(pair, chain.get("a").callbacks.continue_encoding)  # type: ignore[union-attr]
    r = c.response()
    assert r.body == b"abc" and r.trailer("grpc-status") == b"0"
    pair.assert_settled()


# -- local replies, destroy, per-route config ----------------------------------------------------


def test_local_reply_from_a_decoder_runs_through_every_encoder(make: Any) -> None:
    def deny(f: Scripted, headers: Any, end: bool) -> int:
        f.callbacks.send_local_reply(403, b"denied")  # type: ignore[union-attr]
        return STOP_ITERATION

    def tag(f: Scripted, headers: Any, end: bool) -> int:
        headers.add(b"x-tag-" + f.name.encode(), b"1")
        return CONTINUE

    chain = Chain(a={"decode_headers": deny, "encode_headers": tag}, b={"encode_headers": tag})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    r = c.response()
    assert r.status == 403 and r.body == b"denied"
    assert r.header("x-tag-a") == b"1" and r.header("x-tag-b") == b"1"
    assert chain.calls("b", "decode") == []  # the chain stopped at a
    assert [e[:2] for e in chain.calls(prefix="encode")] == [
        ("b", "encode_headers"),
        ("a", "encode_headers"),
        ("b", "encode_data"),
        ("a", "encode_data"),
    ]
    assert pair.upstream.attempts == []
    pair.assert_settled()


def test_local_reply_from_an_encoder_is_a_direct_reply(make: Any) -> None:
    # Envoy's sendLocalReply from encodeHeaders, before the response reached the codec: the
    # reply goes straight to the client (past the filters), the upstream response is dropped.
    def refuse(f: Scripted, headers: Any, end: bool) -> int:
        if headers.status == 200:
            f.callbacks.send_local_reply(502, b"refused by filter")  # type: ignore[union-attr]
        return STOP_ITERATION

    def tag(f: Scripted, headers: Any, end: bool) -> int:
        headers.add(b"x-tag-" + f.name.encode(), b"1")
        return CONTINUE

    chain = Chain(a={"encode_headers": tag}, b={"encode_headers": refuse})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.respond(200, body=b"from upstream")
    r = c.response()
    assert r.status == 502 and r.body == b"refused by filter"
    assert r.header("x-tag-a") is None  # past the filters
    assert chain.calls("a", "encode_headers") == []  # a (after b in encode order) never ran
    assert pair.access_log.entries[0].response_code == 502
    pair.assert_settled()


def test_router_local_reply_runs_through_the_encoders(make: Any) -> None:
    chain = Chain(a={})
    pair = make(chain, routes=[{"match": {"prefix": "/x"}, "route": {"cluster": "be"}}])
    c = pair.connect()
    c.send(b"GET /nothing HTTP/1.1\r\nhost: a\r\n\r\n")
    assert c.response().status == 404
    assert chain.calls("a", "encode_headers") == [("a", "encode_headers", (404, True))]
    pair.assert_settled()


@pytest.mark.parametrize("ending", ["complete", "client_reset", "local_reply", "upstream_reset_mid_response"])
def test_filters_are_destroyed_exactly_once(make: Any, ending: str) -> None:
    def maybe_deny(f: Scripted, headers: Any, end: bool) -> int:
        if ending == "local_reply":
            f.callbacks.send_local_reply(429)  # type: ignore[union-attr]
            return STOP_ITERATION
        return CONTINUE

    chain = Chain(a={"decode_headers": maybe_deny}, b={})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    if ending != "local_reply":
        up = pair.upstream.accept()
        up.request()
        if ending == "complete":
            up.respond(200)
        elif ending == "client_reset":
            c.reset()
        else:
            up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            up.reset()
            assert c.aborted
    pair.advance(2)
    c.reset()
    assert [f.destroyed for f in chain.instances] == [1, 1]
    pair.assert_settled()


def test_route_config_is_none_without_a_route(make: Any) -> None:
    seen: list[Any] = []

    def look(f: Scripted, headers: Any, end: bool) -> int:
        seen.append(f.callbacks.route_config("test.filter"))  # type: ignore[union-attr]
        return CONTINUE

    chain = Chain(a={"decode_headers": look})
    pair = make(chain, routes=[{"match": {"prefix": "/only"}, "route": {"cluster": "be"}}])
    c = pair.connect()
    c.send(b"GET /other HTTP/1.1\r\nhost: a\r\n\r\n")
    assert c.response().status == 404
    assert seen == [None]


def test_route_config_finds_the_most_specific_per_route_config(make: Any) -> None:
    seen: list[Any] = []

    def look(f: Scripted, headers: Any, end: bool) -> int:
        seen.append(f.callbacks.route_config("envoy.filters.http.buffer"))  # type: ignore[union-attr]
        return CONTINUE

    per_route = {
        "envoy.filters.http.buffer": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
            "disabled": True,
        }
    }
    chain = Chain(a={"decode_headers": look})
    pair = make(
        chain,
        virtual_hosts=[
            {
                "name": "v",
                "domains": ["*"],
                "typed_per_filter_config": per_route,
                "routes": [
                    {
                        "match": {"prefix": "/own"},
                        "route": {"cluster": "be"},
                        "typed_per_filter_config": per_route,
                    },
                    {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
                ],
            }
        ],
    )
    c = pair.connect()
    c.send(b"GET /own HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.respond(200)
    assert c.response().status == 200
    c.send(b"GET /vhost HTTP/1.1\r\nhost: a\r\n\r\n")
    # Compiled at load by the buffer filter's per-route factory: (disabled, limit), from the
    # route's own entry and from the virtual host's.
    assert seen == [(True, None), (True, None)]


# -- filters that replace the chunk (set_encoded_data / set_decoded_data) --------------------------


def _upper_enc(f: Scripted, data: bytes, end: bool) -> int:
    f.callbacks.set_encoded_data(data.upper())  # type: ignore[union-attr]
    return CONTINUE


def _tail_enc(f: Scripted, trailers: Any) -> int:
    f.callbacks.set_encoded_data(b"<end>")  # type: ignore[union-attr]
    return CONTINUE


def test_encoder_replaces_chunks_and_adds_a_last_one_before_trailers(make: Any) -> None:
    # Encoding runs b then a: a sees b's replacement, the client sees a's.
    chain = Chain(a={}, b={"encode_data": _upper_enc, "encode_trailers": _tail_enc})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n")
    r = c.response()
    assert r.body == b"ABC<end>" and r.trailer("x-t") == b"1"
    assert [e for e in chain.calls("a") if e[1] in ("encode_data", "encode_trailers")] == [
        ("a", "encode_data", (b"ABC", False)),
        ("a", "encode_data", (b"<end>", False)),
        ("a", "encode_trailers", [(b"x-t", b"1")]),
    ]
    pair.assert_settled()


def test_chunk_added_from_trailers_waits_behind_a_holding_filter(make: Any) -> None:
    """b adds its last chunk from its trailers hook while a (after it, encoding) holds the
    headers: a sees that chunk, then the trailers; continue_encoding releases all in order."""
    chain = Chain(
        a={
            "encode_headers": STOP_ITERATION,
            "encode_data": STOP_ITERATION,
            "encode_trailers": STOP_ITERATION,
        },
        b={"encode_data": _upper_enc, "encode_trailers": _tail_enc},
    )
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n")
    assert c.data == b""
    assert chain.get("a").callbacks.encoding_buffer() == b"ABC<end>"  # type: ignore[union-attr]
    later(pair, chain.get("a").callbacks.continue_encoding)  # type: ignore[union-attr]
    r = c.response()
    assert r.body == b"ABC<end>" and r.trailer("x-t") == b"1"
    assert [e[1:] for e in chain.calls("a") if e[1] in ("encode_data", "encode_trailers")] == [
        ("encode_data", (b"ABC", False)),
        ("encode_data", (b"<end>", False)),
        ("encode_trailers", [(b"x-t", b"1")]),
    ]
    pair.assert_settled()


def test_chunk_added_from_trailers_then_held_by_a_later_filter(make: Any) -> None:
    """Nothing held when the trailers come; a (later, encoding) stops on b's added chunk: the
    trailers reach a (which holds them too) and wait behind that chunk instead of overtaking
    it."""

    def hold_tail(f: Scripted, data: bytes, end: bool) -> int:
        return STOP_ITERATION if data == b"<end>" else CONTINUE

    chain = Chain(
        a={"encode_data": hold_tail, "encode_trailers": STOP_ITERATION}, b={"encode_trailers": _tail_enc}
    )
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n")
    assert chain.calls("a", "encode_trailers") == [("a", "encode_trailers", [(b"x-t", b"1")])]
    assert b"<end>" not in c.data and b"x-t" not in c.data
    later(pair, chain.get("a").callbacks.continue_encoding)  # type: ignore[union-attr]
    r = c.response()
    assert r.body == b"abc<end>" and r.trailer("x-t") == b"1"
    pair.assert_settled()


def test_decoder_replaces_request_chunks(make: Any) -> None:
    def upper(f: Scripted, data: bytes, end: bool) -> int:
        f.callbacks.set_decoded_data(data.upper())  # type: ignore[union-attr]
        return CONTINUE

    chain = Chain(a={"decode_data": upper}, b={})
    pair = make(chain)
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    up = pair.upstream.accept()
    assert up.request().body == b"ABC"
    assert ("b", "decode_data", (b"ABC", False)) in chain.log
    up.respond(200, body=b"ok")
    assert c.response().status == 200


# -- a filter that keeps the body and releases it later (inject_encoded_data) ----------------------


def _keep(f: Scripted, data: bytes, end: bool) -> int:
    f.kept = getattr(f, "kept", b"") + data  # type: ignore[attr-defined]
    return STOP_ITERATION_NO_BUFFER


def test_injected_parts_reach_the_codec_in_order_and_end_the_stream_once(make: Any) -> None:
    chain = Chain(k={"encode_data": _keep})
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n")
    k = chain.get("k")
    assert k.kept == b"abcdef"  # type: ignore[attr-defined]
    cb: Any = k.callbacks
    later(pair, lambda: cb.inject_encoded_data(k, b"abc", False))
    assert c.responses() == []
    later(pair, lambda: cb.inject_encoded_data(k, b"def", True))
    r = c.response()
    assert r.body == b"abcdef"
    assert c.data.endswith(b"3\r\ndef\r\n0\r\n\r\n")  # one end, no empty chunk before it
    assert k.destroyed == 1
    pair.assert_settled()


def test_injected_parts_wait_behind_a_later_filter_holding_iteration(make: Any) -> None:
    # Encoding runs k first, then h; h holds the headers and everything after them.
    chain = Chain(
        h={"encode_headers": STOP_ITERATION, "encode_data": STOP_ITERATION}, k={"encode_data": _keep}
    )
    pair = make(chain)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabcdef")
    k, h = chain.get("k"), chain.get("h")
    cb: Any = k.callbacks
    later(pair, lambda: cb.inject_encoded_data(k, b"abc", False))
    later(pair, lambda: cb.inject_encoded_data(k, b"def", True))
    assert c.data == b""
    assert [e[2] for e in chain.calls("h", "encode_data")] == [(b"abc", False), (b"def", True)]
    assert cb.encoding_buffer() == b"abcdef"
    later(pair, cb.continue_encoding)
    assert c.response().body == b"abcdef"
    assert h.destroyed == 1
    pair.assert_settled()
