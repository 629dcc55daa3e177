"""The "example" x-protocol codec byte by byte: fixtures, round trips, request id rewrite,
heartbeats, local replies, sniffing, every split of a stream through ``FrameReader`` and
garbage (only ``CodecError``, never another exception)."""

from __future__ import annotations

import struct

import pytest
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
from moorline.protocol.xprotocol.example import (
    CODEC,
    HEAD_LEN,
    STATUS_BUSY,
    STATUS_ERROR,
    encode_frame,
)

# A request for HelloService.sayHello with a tenant header and payload "hi", id 7, written out
# by hand from the module docstring's table.
REQUEST = (
    bytes.fromhex(
        "eb"  # magic
        "01"  # type: request
        "00"  # status
        "00000007"  # request id
        "0016"  # header block: 22 bytes
        "00000002"  # payload: 2 bytes
    )
    + (b"\x0cHelloService" + b"\x08sayHello")
    + b"hi"
)
# Its response: status 0, no header block, payload "ok".
RESPONSE = bytes.fromhex("eb 03 00 00000007 0000 00000002") + b"ok"

KINDS = [
    FrameKind.REQUEST,
    FrameKind.ONEWAY,
    FrameKind.RESPONSE,
    FrameKind.HEARTBEAT,
    FrameKind.HEARTBEAT_RESPONSE,
]


def test_registered_and_satisfies_the_contract() -> None:
    codecs = builtin_codecs()
    assert codecs["example"] is CODEC
    assert isinstance(CODEC, XCodec)
    assert (CODEC.multiplexed, CODEC.heartbeat, CODEC.goaway) == (True, True, False)


def test_request_fixture_encodes_and_decodes() -> None:
    assert len(REQUEST) == 13 + 22 + 2
    assert encode_frame(FrameKind.REQUEST, 7, "HelloService", "sayHello", b"hi") == REQUEST
    assert CODEC.frame_length(REQUEST) == len(REQUEST)
    f = CODEC.decode(REQUEST)
    assert isinstance(f, Frame)
    assert (f.kind, f.request_id, f.status, f.timeout_ms) == (FrameKind.REQUEST, 7, 0, 0)
    assert (f.service, f.method) == ("HelloService", "sayHello")
    assert dict(f.headers) == {"service": "HelloService", "method": "sayHello"}
    assert bytes(f.body) == b"hi"
    assert f.raw is REQUEST


def test_response_fixture() -> None:
    assert encode_frame(FrameKind.RESPONSE, 7, payload=b"ok") == RESPONSE
    f = CODEC.decode(RESPONSE)
    assert (f.kind, f.request_id, f.status) == (FrameKind.RESPONSE, 7, 0)
    assert (f.service, f.method, dict(f.headers)) == ("", "", {})
    assert bytes(f.body) == b"ok"
    assert CODEC.is_success(f) and not CODEC.is_retriable(f)


def test_user_headers() -> None:
    raw = encode_frame(FrameKind.REQUEST, 1, "s", "m", b"", headers=[("tenant", "a"), ("zone", "")])
    assert dict(CODEC.decode(raw).headers) == {"service": "s", "method": "m", "tenant": "a", "zone": ""}


names = st.text(max_size=20).filter(lambda s: len(s.encode()) <= 255)
user_names = names.filter(lambda s: s not in ("service", "method"))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(KINDS))
    status = draw(st.integers(0, 255)) if kind is FrameKind.RESPONSE else 0
    service, method = draw(names), draw(names)
    hdrs = draw(st.lists(st.tuples(user_names, names), max_size=3))
    payload = draw(st.binary(max_size=300))
    return encode_frame(kind, draw(st.integers(0, 2**32 - 1)), service, method, payload, status, hdrs)


@given(
    kind=st.sampled_from(KINDS),
    rid=st.integers(0, 2**32 - 1),
    service=names,
    method=names,
    payload=st.binary(max_size=2000),
    hdrs=st.lists(st.tuples(user_names, names), max_size=4),
)
def test_round_trip(kind: FrameKind, rid: int, service: str, method: str, payload: bytes, hdrs: list) -> None:
    raw = encode_frame(kind, rid, service, method, payload, headers=hdrs)
    assert CODEC.frame_length(raw) == len(raw)
    f = CODEC.decode(raw)
    assert (f.kind, f.request_id, bytes(f.body)) == (kind, rid, payload)
    if service or method or hdrs:
        assert (f.service, f.method) == (service, method)
        assert dict(f.headers) == {"service": service, "method": method, **dict(hdrs)}
    else:
        assert dict(f.headers) == {}


@given(raw=frames(), new_id=st.integers(0, 2**32 - 1))
def test_with_request_id_patches_only_the_id(raw: bytes, new_id: int) -> None:
    f = CODEC.decode(raw)
    out = CODEC.with_request_id(f, new_id)
    assert len(out) == len(raw)
    assert out[:3] == raw[:3] and out[7:] == raw[7:]
    g = CODEC.decode(out)
    assert g.request_id == new_id
    assert (g.kind, g.status, dict(g.headers), bytes(g.body)) == (
        f.kind,
        f.status,
        dict(f.headers),
        bytes(f.body),
    )
    # and back: the proxy restores the client's id on the way down
    assert CODEC.with_request_id(g, f.request_id) == raw


def test_heartbeats() -> None:
    ping = CODEC.heartbeat_request(42)
    assert ping == bytes.fromhex("eb 04 00 0000002a 0000 00000000")
    f = CODEC.decode(ping)
    assert (f.kind, f.request_id) == (FrameKind.HEARTBEAT, 42)
    pong = CODEC.decode(CODEC.heartbeat_reply(f))
    assert (pong.kind, pong.request_id, pong.status, len(pong.raw)) == (
        FrameKind.HEARTBEAT_RESPONSE,
        42,
        0,
        HEAD_LEN,
    )


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (Reason.NO_ROUTE, 3),
        (Reason.NO_HEALTHY_UPSTREAM, 4),
        (Reason.OVERFLOW, 5),
        (Reason.TIMEOUT, 6),
        (Reason.CODEC_ERROR, 7),
        (Reason.UPSTREAM_RESET, 8),
    ],
)
def test_local_replies(reason: Reason, status: int) -> None:
    req = CODEC.decode(REQUEST)
    raw = CODEC.local_reply(req, reason, "no route for HelloService")
    assert CODEC.frame_length(raw) == len(raw)
    r = CODEC.decode(raw)
    assert (r.kind, r.request_id, r.status) == (FrameKind.RESPONSE, 7, status)
    assert bytes(r.body) == b"no route for HelloService"
    assert not CODEC.is_success(r)
    assert not CODEC.is_retriable(r)


def test_retriable_and_error_statuses() -> None:
    busy = CODEC.decode(encode_frame(FrameKind.RESPONSE, 1, status=STATUS_BUSY))
    err = CODEC.decode(encode_frame(FrameKind.RESPONSE, 1, status=STATUS_ERROR))
    assert CODEC.is_retriable(busy) and not CODEC.is_success(busy)
    assert not CODEC.is_retriable(err) and not CODEC.is_success(err)


def test_match() -> None:
    for n in range(HEAD_LEN):
        assert CODEC.match(REQUEST[:n]) is Match.NEED_MORE, n
    assert CODEC.match(REQUEST[:HEAD_LEN]) is Match.YES
    assert CODEC.match(REQUEST) is Match.YES
    assert CODEC.match(RESPONSE) is Match.YES
    for other in (
        b"GET / HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        bytes.fromhex("01 01 0001 01 00000001 01 00000bb8 0000 0000 00000000"),  # a Bolt request
        bytes.fromhex("dabb c2 00 0000000000000001 00000000"),  # a Dubbo request
        b"\xeb\x09",  # magic, then an unknown type
        b"\xeb\x01\x05" + REQUEST[3:],  # a status on a request
        struct.pack(">BBBIHI", 0xEB, 1, 0, 1, 0, MAX_FRAME),  # longer than MAX_FRAME
    ):
        assert CODEC.match(other) is Match.NO, other


def test_frame_length_and_garbage() -> None:
    assert CODEC.frame_length(b"") == NEED_MORE
    for n in range(1, HEAD_LEN):
        assert CODEC.frame_length(REQUEST[:n]) == NEED_MORE
    assert CODEC.frame_length(memoryview(REQUEST)[:HEAD_LEN]) == len(REQUEST)
    with pytest.raises(CodecError, match="bad magic"):
        CODEC.frame_length(b"G")  # the first byte is enough
    with pytest.raises(CodecError, match="unknown frame type"):
        CODEC.frame_length(b"\xeb\x00")
    with pytest.raises(CodecError, match="limit"):
        CODEC.frame_length(struct.pack(">BBBIHI", 0xEB, 1, 0, 1, 0xFFFF, MAX_FRAME))


def test_user_headers_cannot_replace_the_routing_key() -> None:
    for name in ("service", "method"):
        raw = encode_frame(FrameKind.REQUEST, 1, "s", "m", headers=[(name, "other")])
        with pytest.raises(CodecError, match="reserved"):
            CODEC.decode(raw)


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (REQUEST[:-1], "does not match"),
        (REQUEST + b"x", "does not match"),
        (b"\xeb\x01\x00", "shorter than its head"),
        (b"\x00" + REQUEST[1:], "bad magic"),
        (b"\xeb\x06" + REQUEST[2:], "unknown frame type"),  # GOAWAY is not in this protocol
        (b"\xeb\x04\x01" + REQUEST[3:], "status 1 on a heartbeat"),
        (struct.pack(">BBBIHI", 0xEB, 1, 0, 1, 2, 0) + b"\x05a", "runs past"),
        (struct.pack(">BBBIHI", 0xEB, 1, 0, 1, 2, 0) + b"\x01\xff", "not UTF-8"),
        (struct.pack(">BBBIHI", 0xEB, 1, 0, 1, 2, 0) + b"\x01s", "needs a service"),
        (struct.pack(">BBBIHI", 0xEB, 1, 0, 1, 6, 0) + b"\x01s\x01m\x01k", "needs a service"),
    ],
)
def test_decode_rejects(raw: bytes, detail: str) -> None:
    with pytest.raises(CodecError, match=detail):
        CODEC.decode(raw)


def _frames_through(stream: bytes, cuts: list[int]) -> list[bytes]:
    reader = FrameReader(CODEC)
    out: list[bytes] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        out += reader.feed(stream[prev:c])
        prev = c
    assert reader.pending == 0
    return out


def test_every_byte_boundary() -> None:
    """Two frames back to back, cut once at every offset, and fed one byte at a time."""
    stream = REQUEST + RESPONSE
    for cut in range(len(stream) + 1):
        assert _frames_through(stream, [cut]) == [REQUEST, RESPONSE], cut
    assert _frames_through(stream, list(range(1, len(stream)))) == [REQUEST, RESPONSE]


@settings(max_examples=200)
@given(data=st.data(), raws=st.lists(frames(), min_size=1, max_size=5))
def test_split_anywhere(data: st.DataObject, raws: list[bytes]) -> None:
    stream = b"".join(raws)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=12)))
    got = _frames_through(stream, cuts)
    assert got == raws
    assert [CODEC.decode(g).request_id for g in got] == [CODEC.decode(r).request_id for r in raws]


def test_frame_reader_rejects_garbage_after_a_frame() -> None:
    # The whole frame before the garbage is not lost: it comes back, the error is kept and
    # raised by the next feed.
    reader = FrameReader(CODEC)
    assert reader.feed(REQUEST[:5]) == []
    assert reader.feed(REQUEST[5:] + b"GET / HTTP/1.1\r\n") == [REQUEST]
    assert reader.error is not None and "bad magic" in reader.error.detail
    with pytest.raises(CodecError, match="bad magic"):
        reader.feed(REQUEST)
    # Garbage first: raised at once.
    with pytest.raises(CodecError, match="bad magic"):
        FrameReader(CODEC).feed(b"GET / HTTP/1.1\r\n")
    # On the fast path too (no bytes held before).
    r2 = FrameReader(CODEC)
    assert r2.feed(REQUEST + b"\x00garbage") == [REQUEST] and r2.error is not None


@settings(max_examples=300)
@given(junk=st.binary(max_size=200), prefix=st.sampled_from([b"", b"\xeb", b"\xeb\x01", REQUEST[:9]]))
def test_fuzz_only_codec_errors(junk: bytes, prefix: bytes) -> None:
    """Random bytes (some starting like a frame): FrameReader and decode either work or raise
    CodecError; what they hold stays under one frame."""
    reader = FrameReader(CODEC)
    try:
        for raw in reader.feed(prefix + junk):
            f = CODEC.decode(raw)
            assert len(f.raw) == len(raw)
    except CodecError as exc:
        assert exc.detail.startswith("example: ") or "not positive" in exc.detail
    assert reader.pending <= len(prefix + junk)
