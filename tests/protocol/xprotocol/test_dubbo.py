"""The Dubbo codec byte by byte: heads, kinds, the lazily read routing fields and attachments,
request id rewriting, heartbeats, local replies, and frames split at every byte boundary."""

from __future__ import annotations

import gc

import pytest
from dubbo_ssl.codec.encoder import Object, Request
from dubbo_ssl.common.constants import CLI_HEARTBEAT_REQ_HEAD, CLI_HEARTBEAT_RES_HEAD, CLI_HEARTBEAT_TAIL
from hypothesis import given, settings
from hypothesis import strategies as st

from moorline.protocol.xprotocol import builtin_codecs
from moorline.protocol.xprotocol.api import (
    MAX_FRAME,
    NEED_MORE,
    CodecError,
    Frame,
    FrameKind,
    FrameReader,
    Match,
    Reason,
    XCodec,
)
from moorline.protocol.xprotocol.dubbo import CODEC, CODECS, DubboFrame, _count_params, request, response
from moorline.protocol.xprotocol.hessian2 import Hessian2Reader, encode

# A two-way Hessian2 request, id 7: dubbo "2.0.2", path com.example.Echo, version 1.0.0, method
# sayHello, one String argument "hi", attachments {path, tenant: a, timeout: 2500}.
REQUEST_HEX = (
    "dabbc20000000000000000070000" + "006a"  # head (body length 0x6a = 106)
    "05322e302e32"  # "2.0.2"
    "10636f6d2e6578616d706c652e4563686f"  # "com.example.Echo"
    "05312e302e30"  # "1.0.0"
    "0873617948656c6c6f"  # "sayHello"
    "124c6a6176612f6c616e672f537472696e673b"  # "Ljava/lang/String;"
    "026869"  # "hi"
    "48"
    "0470617468"
    "10636f6d2e6578616d706c652e4563686f"
    "0674656e616e74"
    "0161"
    "0774696d656f7574"
    "0432353030"
    "5a"
)
REQUEST = bytes.fromhex(REQUEST_HEX)


def client_request(**kw: object) -> bytes:
    """A request as the dubbo-ssl-python client encodes it."""
    params = {
        "dubbo_version": "2.4.10",
        "version": "1.0.0",
        "method": "echo",
        "path": "com.example.Echo",
        "arguments": ["hello", 5, [1, 2], Object("com.x.P", {"a": 1, "b": "x"}), 3.5, True, 10**12],
        "group": "g",
        "context": {"tenant": "t1"},
    }
    params.update(kw)
    return bytes(Request(params).encode())


def test_registered_and_satisfies_the_contract() -> None:
    assert builtin_codecs()["dubbo"] is CODEC
    assert CODECS == (CODEC,)
    assert isinstance(CODEC, XCodec)
    assert isinstance(CODEC.decode(REQUEST), Frame)
    assert CODEC.multiplexed and CODEC.heartbeat


def test_fixture_length_is_consistent() -> None:
    assert CODEC.frame_length(REQUEST) == len(REQUEST) == 16 + 0x6A


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"", Match.NEED_MORE),
        (b"\xda", Match.NEED_MORE),
        (b"\xda\xbb", Match.YES),
        (REQUEST, Match.YES),
        (b"\xdb", Match.NO),
        (b"\xda\xbc", Match.NO),
        (b"GET / HTTP/1.1\r\n", Match.NO),
        (b"\x01\x01", Match.NO),
    ],
)
def test_match(data: bytes, want: Match) -> None:
    assert CODEC.match(data) is want


def test_frame_length() -> None:
    for n in range(16):
        assert CODEC.frame_length(REQUEST[:n]) == NEED_MORE
    with pytest.raises(CodecError):
        CODEC.frame_length(b"\xdb")
    with pytest.raises(CodecError):
        CODEC.frame_length(b"\xda\x00")
    big = bytearray(REQUEST[:16])
    big[12:16] = (MAX_FRAME - 15).to_bytes(4, "big")
    with pytest.raises(CodecError, match="too large"):
        CODEC.frame_length(big)
    big[12:16] = (MAX_FRAME - 16).to_bytes(4, "big")
    assert CODEC.frame_length(big) == MAX_FRAME


def test_request_routing_fields() -> None:
    f = CODEC.decode(REQUEST)
    assert f.kind == FrameKind.REQUEST
    assert f.request_id == 7
    assert f.status == 0
    assert f.service == "com.example.Echo"
    assert f.method == "sayHello"
    assert f.version == "1.0.0"
    assert f.raw is REQUEST
    assert bytes(f.body) == REQUEST[16:]
    h = f.headers
    assert (h["service"], h["method"], h["version"], h["dubbo"]) == (
        "com.example.Echo",
        "sayHello",
        "1.0.0",
        "2.0.2",
    )
    assert h["tenant"] == "a"
    assert h.get("missing") is None
    assert dict(h) == {
        "service": "com.example.Echo",
        "method": "sayHello",
        "version": "1.0.0",
        "dubbo": "2.0.2",
        "path": "com.example.Echo",
        "tenant": "a",
        "timeout": "2500",
    }
    assert f.timeout_ms == 2500


def test_attachments_are_read_only_when_asked_for() -> None:
    # Garbage in place of the arguments: the prefix routes, the attachments are just absent.
    body = encode("2.0.2", "svc", "1.0", "m", "I") + b"\x40\x40\x40"
    f = CODEC.decode(request(1, body))
    assert (f.service, f.method) == ("svc", "m")
    assert f.headers["service"] == "svc"
    assert f.headers.get("tenant") is None
    assert f.timeout_ms == 0
    # No attachments map at all (old clients).
    f = CODEC.decode(request(1, encode("2.0.2", "svc", "1.0", "m", "I", 5)))
    assert dict(f.headers) == {"service": "svc", "version": "1.0", "method": "m", "dubbo": "2.0.2"}


def test_body_fields_win_over_attachments_and_non_string_attachments_are_dropped() -> None:
    body = encode(
        "2.0.2", "svc", "1.0", "m", "", {"service": "other", "method": "x", "n": 5, "s": "v", "timeout": "x"}
    )
    f = CODEC.decode(request(2, body))
    assert dict(f.headers) == {
        "service": "svc",
        "version": "1.0",
        "method": "m",
        "dubbo": "2.0.2",
        "s": "v",
        "timeout": "x",
    }
    assert f.timeout_ms == 0  # not a number of milliseconds


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "-5", "99999999999", ""])
def test_timeout_attachment_that_is_not_plain_digits_is_no_timeout(value: str) -> None:
    # "\u00b2".isdigit() is true, int() of it raises: only ASCII digits count.
    f = CODEC.decode(request(2, encode("2.0.2", "svc", "1.0", "m", "", {"timeout": value})))
    assert f.timeout_ms == 0


def test_no_reference_cycle_between_a_frame_and_its_headers() -> None:
    # A frame per request must be freed by reference counting alone (no cyclic GC on the path).
    f = CODEC.decode(REQUEST)
    assert f.headers["tenant"] == "a"
    assert all(r is not f for r in gc.get_referents(f.headers))


def test_real_client_request() -> None:
    raw = client_request()
    f = CODEC.decode(raw)
    assert f.kind == FrameKind.REQUEST
    assert (f.service, f.method, f.version) == ("com.example.Echo", "echo", "1.0.0")
    assert f.param_types == "Ljava/lang/String;I[ILcom/x/P;DZJ"
    assert f.headers["tenant"] == "t1"
    assert f.headers["group"] == "g"
    assert f.headers["interface"] == "com.example.Echo"
    r = Hessian2Reader(raw, f.args_at)
    assert [r.read() for _ in range(7)] == ["hello", 5, [1, 2], {"a": 1, "b": "x"}, 3.5, True, 10**12]


@pytest.mark.parametrize(
    ("desc", "n"), [("", 0), ("I", 1), ("Ljava/lang/String;I[I", 3), ("[[Lx;JZ", 3), ("BCSFD", 5)]
)
def test_count_params(desc: str, n: int) -> None:
    assert _count_params(desc) == n


@pytest.mark.parametrize("desc", ["Lx", "[", "Q", "I["])
def test_count_params_bad(desc: str) -> None:
    with pytest.raises(CodecError):
        _count_params(desc)


def test_kinds() -> None:
    hb = bytes(CLI_HEARTBEAT_REQ_HEAD) + (9).to_bytes(8, "big") + bytes(CLI_HEARTBEAT_TAIL)
    f = CODEC.decode(hb)
    assert (f.kind, f.request_id) == (FrameKind.HEARTBEAT, 9)
    assert f.headers == {} and f.service == ""
    resp = CODEC.decode(CODEC.heartbeat_reply(f))
    assert resp.kind == FrameKind.HEARTBEAT_RESPONSE and resp.status == 20
    assert CODEC.decode(request(3, encode("2.0.2", "s", "", "m", ""), two_way=False)).kind == FrameKind.ONEWAY
    readonly = b"\xda\xbb\xa2\x00" + bytes(8) + b"\x00\x00\x00\x02\x01R"
    assert CODEC.decode(readonly).kind == FrameKind.GOAWAY
    other_event = b"\xda\xbb\xa2\x00" + bytes(8) + b"\x00\x00\x00\x01N"
    assert CODEC.decode(other_event).kind == FrameKind.ONEWAY
    longer = b"\xda\xbb\xa2\x00" + bytes(8) + b"\x00\x00\x00\x03\x01RN"  # "R" then more: not read-only
    assert CODEC.decode(longer).kind == FrameKind.ONEWAY
    r = CODEC.decode(response(5, 70, encode("boom")))
    assert (r.kind, r.request_id, r.status) == (FrameKind.RESPONSE, 5, 70)
    assert not CODEC.is_success(r) and not CODEC.is_retriable(r)
    assert CODEC.is_success(CODEC.decode(response(5, 20, encode(1, "x"))))
    assert CODEC.is_retriable(CODEC.decode(response(5, 100, encode("busy"))))


def test_other_serializations_pass_through_with_empty_headers() -> None:
    f = CODEC.decode(request(4, b"\x00\x01 not hessian", serialization=6))
    assert f.kind == FrameKind.REQUEST
    assert f.headers == {} and f.service == "" and f.timeout_ms == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"\xda\xbb\xc2\x00" + bytes(8),  # shorter than a head
        b"\xdb\xbb\xc2\x00" + bytes(12),  # bad magic
        b"\xda\xbb\xc2\x00" + bytes(8) + b"\x00\x00\x00\x05N",  # length says 5, has 1
        request(1, b"\x90"),  # the prefix is not a string
        request(1, encode("2.0.2", "svc")),  # the prefix is cut short
    ],
)
def test_bad_frames_are_codec_errors(raw: bytes) -> None:
    with pytest.raises(CodecError):
        CODEC.decode(raw)


def test_with_request_id_changes_only_the_id() -> None:
    f = CODEC.decode(REQUEST)
    out = CODEC.with_request_id(f, 0x0102030405060708)
    assert out[:4] == REQUEST[:4] and out[12:] == REQUEST[12:]
    assert out[4:12] == bytes.fromhex("0102030405060708")
    g = CODEC.decode(out)
    assert g.request_id == 0x0102030405060708 and g.service == f.service
    assert CODEC.decode(CODEC.with_request_id(g, 7)).raw == REQUEST


def test_heartbeats_match_what_a_real_client_sends_and_expects() -> None:
    assert CODEC.heartbeat_request(0x11) == bytes(CLI_HEARTBEAT_REQ_HEAD) + (0x11).to_bytes(8, "big") + bytes(
        CLI_HEARTBEAT_TAIL
    )
    f = CODEC.decode(CODEC.heartbeat_request(0x11))
    assert CODEC.heartbeat_reply(f) == bytes(CLI_HEARTBEAT_RES_HEAD) + (0x11).to_bytes(8, "big") + bytes(
        CLI_HEARTBEAT_TAIL
    )


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (Reason.NO_ROUTE, 60),
        (Reason.NO_HEALTHY_UPSTREAM, 60),
        (Reason.OVERFLOW, 40),
        (Reason.TIMEOUT, 31),
        (Reason.CODEC_ERROR, 40),
        (Reason.UPSTREAM_RESET, 80),
    ],
)
def test_local_reply(reason: Reason, status: int) -> None:
    out = CODEC.local_reply(CODEC.decode(REQUEST), reason, "no route for com.example.Echo é")
    f = CODEC.decode(out)
    assert (f.kind, f.request_id, f.status) == (FrameKind.RESPONSE, 7, status)
    assert out[2] == 0x02  # a Hessian2 response
    assert Hessian2Reader(f.body).read_string() == "no route for com.example.Echo é"
    assert not CODEC.is_success(f)


frames = st.one_of(
    st.just(REQUEST),
    st.builds(lambda i: CODEC.heartbeat_request(i), st.integers(0, 2**64 - 1)),
    st.builds(
        lambda i, s, m, v: request(i, encode("2.0.2", s, "1.0", m, "Ljava/lang/String;", v, {"k": s})),
        st.integers(0, 2**64 - 1),
        st.text(max_size=30),
        st.text(max_size=10),
        st.text(max_size=300),
    ),
    st.builds(lambda i, b: response(i, 20, b), st.integers(0, 2**64 - 1), st.binary(max_size=200)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(frames, min_size=1, max_size=4))
def test_split_at_every_byte_boundary(fs: list[bytes]) -> None:
    stream = b"".join(fs)
    want = [(f.kind, f.request_id, f.service, f.method, dict(f.headers)) for f in map(CODEC.decode, fs)]
    for cut in range(len(stream) + 1):
        reader = FrameReader(CODEC)
        got = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert got == fs
        assert reader.pending == 0
        assert [
            (f.kind, f.request_id, f.service, f.method, dict(f.headers)) for f in map(CODEC.decode, got)
        ] == want


@settings(max_examples=100, deadline=None)
@given(st.lists(frames, min_size=1, max_size=3), st.data())
def test_byte_by_byte(fs: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(fs)
    reader = FrameReader(CODEC)
    got: list[bytes] = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == fs


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80), st.booleans())
def test_garbage_raises_only_codec_errors(junk: bytes, with_head: bool) -> None:
    if with_head:  # a valid head around garbage: the body parser sees it
        junk = request(1, junk) if len(junk) % 2 else response(1, junk[0] if junk else 20, junk)
    reader = FrameReader(CODEC)
    try:
        for raw in reader.feed(junk):
            f: DubboFrame = CODEC.decode(raw)
            dict(f.headers)
            _ = f.timeout_ms
            CODEC.local_reply(f, Reason.CODEC_ERROR, "bad")
    except CodecError:
        pass
