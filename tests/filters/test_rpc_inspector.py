"""rpc_inspector's detection, driven directly over peeked bytes (every prefix of each start),
its ordering among codecs that wait, its bounds, and its config through a real Listener
compile (TypedStruct, Empty, none; bad values are ConfigErrors with the field path)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2

import moorline.filters.listener.rpc_inspector as ri
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.net.conn_info import ConnInfo
from moorline.net.listener import Listener
from moorline.observability.stats import Store
from moorline.protocol.xprotocol.api import CodecError, FrameKind, Match
from moorline.protocol.xprotocol.example import encode_frame

TS = "type.googleapis.com/xds.type.v3.TypedStruct"
TYPE_URL = "type.googleapis.com/" + ri.TYPE
EXAMPLE = encode_frame(FrameKind.REQUEST, 1, "HelloService", "sayHello", b"x" * 100)
LONG_LINE = b"GET /" + b"a" * 500 + b"?q=1 HTTP/1.1\r\nhost: x\r\n\r\n"


def inspector(codecs: dict[str, Any] | None = None) -> tuple[ri.RpcInspector, Store]:
    store = Store()
    ctx = BuildContext(stats=store)
    if codecs is None:
        return ri._factory(None, ctx, "listener_filters[0]"), store
    return ri.RpcInspector(ctx, codecs), store


def info() -> ConnInfo:
    return ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), "l")


def stat(store: Store, name: str) -> int:
    s = store.get(name)
    return 0 if s is None else s.value  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "alpn", "counter"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", ["h2c"], "http2_found"),
        (b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n", ["http/1.1"], "http1_found"),
        (b"POST /x HTTP/1.1\r\n", ["http/1.1"], "http1_found"),  # starts like the h2 preface
        (b"PRI /x HTTP/1.1\r\n", ["http/1.1"], "http1_found"),  # so does this, longer
        (b"GET / HTTP/1.0\r\n\r\n", ["http/1.0"], "http1_found"),
        (LONG_LINE, ["http/1.1"], "http1_found"),  # a request line longer than MATCH_BYTES
        (EXAMPLE, ["example"], "example_found"),
        (encode_frame(FrameKind.HEARTBEAT, 9), ["example"], "example_found"),
        (b"GET / HTTP/2.0\r\n\r\n", None, "not_found"),
        (b"GET /\r\n", None, "not_found"),  # HTTP/0.9
        (b"\x00\x01binary", None, "not_found"),
        (b"\xeb\x09" + bytes(11), None, "not_found"),  # the example magic, an unknown type
        (b"SSH-2.0-OpenSSH_9.2\r\n", None, "not_found"),
    ],
)
def test_detection_at_every_prefix(data: bytes, alpn: list[str] | None, counter: str) -> None:
    """Each prefix either waits (False, nothing set) or gives the same answer as the whole."""
    decided_at = None
    for n in range(1, len(data) + 1):
        flt, store = inspector()
        i = info()
        done = flt.on_data(data[:n], i)
        if not done:
            assert i.alpn is None and decided_at is None, n
            continue
        decided_at = decided_at or n
        assert i.alpn == alpn, (n, i.alpn)
        assert stat(store, f"rpc_inspector.{counter}") == 1
    assert decided_at is not None


def test_binary_protocols_decide_on_their_head() -> None:
    flt, _ = inspector()
    i = info()
    assert flt.on_data(EXAMPLE[:12], i) is False
    assert flt.on_data(EXAMPLE[:13], i) is True and i.alpn == ["example"]
    i = info()
    assert flt.on_data(b"\x01\x01\x00\x01", i) is True and i.alpn is None  # not HTTP, not example


def test_tls_is_left_to_the_client_hello() -> None:
    flt, store = inspector()
    i = info()
    i.transport_protocol = "tls"
    i.alpn = ["h2"]
    assert flt.on_data(b"GET / HTTP/1.1\r\n", i) is True
    assert i.alpn == ["h2"]
    assert stat(store, "rpc_inspector.http1_found") == 0


def test_nothing_found_leaves_alpn_alone() -> None:
    flt, store = inspector()
    i = info()
    i.alpn = ["set-before"]
    assert flt.on_data(b"\x16garbage", i) is True
    assert i.alpn == ["set-before"]
    assert stat(store, "rpc_inspector.not_found") == 1


def test_http_line_bound() -> None:
    flt, store = inspector()
    assert flt.max_read_bytes == ri.MAX_READ
    i = info()
    assert flt.on_data(b"GET /" + b"a" * (ri.MAX_READ - 100), i) is False
    assert flt.on_data(b"GET /" + b"a" * ri.MAX_READ, i) is True
    assert i.alpn is None and stat(store, "rpc_inspector.not_found") == 1


class FakeCodec:
    def __init__(self, name: str, answer: Any) -> None:
        self.name = name
        self.answer = answer
        self.seen: list[int] = []

    def match(self, data: bytes) -> Match:
        self.seen.append(len(data))
        return self.answer(data)


def test_an_earlier_undecided_codec_holds_a_later_yes() -> None:
    slow = FakeCodec("slow", lambda d: Match.NEED_MORE if len(d) < 6 else Match.NO)
    eager = FakeCodec("eager", lambda d: Match.YES)
    flt, store = inspector({"slow": slow, "eager": eager})
    i = info()
    assert flt.on_data(b"\xff\xff", i) is False and i.alpn is None
    assert flt.on_data(b"\xff" * 6, i) is True and i.alpn == ["eager"]
    assert stat(store, "rpc_inspector.eager_found") == 1
    # and a first codec saying YES wins over the later one
    first = FakeCodec("first", lambda d: Match.YES)
    flt, _ = inspector({"first": first, "eager": eager})
    i = info()
    assert flt.on_data(b"\xff", i) is True and i.alpn == ["first"]


def test_a_codec_raising_codec_error_is_a_no() -> None:
    def refuse(d: bytes) -> Match:
        raise CodecError("bad magic")

    flt, _ = inspector(
        {"picky": FakeCodec("picky", refuse), "eager": FakeCodec("eager", lambda d: Match.YES)}
    )
    i = info()
    assert flt.on_data(b"\xff", i) is True and i.alpn == ["eager"]


def test_a_codec_sees_at_most_match_bytes_and_waiting_there_is_no() -> None:
    forever = FakeCodec("forever", lambda d: Match.NEED_MORE)
    flt, store = inspector({"forever": forever})
    i = info()
    assert flt.on_data(b"\xff" * 10, i) is False
    assert flt.on_data(b"\xff" * 1000, i) is True
    assert max(forever.seen) == ri.MATCH_BYTES
    assert i.alpn is None and stat(store, "rpc_inspector.not_found") == 1


def test_alpn_lists_are_per_connection() -> None:
    flt, _ = inspector()
    a, b = info(), info()
    flt.on_data(EXAMPLE, a)
    flt.on_data(EXAMPLE, b)
    assert a.alpn == b.alpn == ["example"] and a.alpn is not b.alpn


# --- config, through a real Listener compile -------------------------------------------------


def compile_listener(filter_cfg: dict[str, Any]) -> Listener:
    d = {
        "name": "l",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "listener_filters": [{"name": ri.NAME, **filter_cfg}],
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "t",
                            "cluster": "c",
                        },
                    }
                ]
            }
        ],
    }
    import moorline.proxy.tcp_proxy  # noqa: F401  (registers tcp_proxy)

    return Listener(parse_message(d, listener_pb2.Listener), BuildContext(stats=Store()), "listeners[0]")


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"typed_config": {"@type": "type.googleapis.com/google.protobuf.Empty"}},
        {"typed_config": {"@type": TS, "type_url": TYPE_URL, "value": {}}},
        {"typed_config": {"@type": TS, "type_url": TYPE_URL}},
        {"typed_config": {"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": TYPE_URL}},
    ],
)
def test_accepted_configs(cfg: dict[str, Any]) -> None:
    lst = compile_listener(cfg)
    assert [type(f) for f in lst.listener_filters] == [ri.RpcInspector]
    assert lst.peek_bytes == ri.MAX_READ


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (
            {"typed_config": {"@type": TS, "type_url": TYPE_URL, "value": {"max_read_bytes": 10}}},
            "listeners[0].listener_filters[0].typed_config.value.max_read_bytes",
        ),
        (
            {"typed_config": {"@type": TS, "type_url": "type.googleapis.com/some.Other", "value": {}}},
            "listeners[0].listener_filters[0].typed_config",
        ),
        (
            {"typed_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}},
            "listeners[0].listener_filters[0].typed_config",
        ),
    ],
)
def test_rejected_configs(cfg: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        compile_listener(cfg)
    assert exc.value.path == field
