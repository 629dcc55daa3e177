"""The Bolt codec (``moorline.protocol.xprotocol.bolt``) byte by byte: frames captured from
sofa-bolt-node, frames built by hand from the wire format, id rewriting, CRC32 in v2, local
replies and heartbeats, and property tests (any split through ``FrameReader``, garbage)."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moorline.protocol.xprotocol import bolt, builtin_codecs
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

C = bolt.BoltCodec()
SERVICE = "com.alipay.test.HelloService:1.0"
SOFA_REQUEST = "com.alipay.sofa.rpc.core.request.SofaRequest"
SOFA_RESPONSE = "com.alipay.sofa.rpc.core.response.SofaResponse"

# Captured from sofa-bolt-node 2.0.1 (lib/protocol requestEncode / responseEncode /
# heartbeatEncode / heartbeatAckEncode, hessian2): a SofaRequest for sayHello("Peter") with
# timeout 3000; v2crc_* with boltVersion 2 and crcEnable, v2_request with boltVersion 1.
NODE_HEX = {
    "v1_request": (
        "0101000101000000070100000bb8002c002f000000e6636f6d2e616c697061792e736f66612e7270632e636f72652e72"
        "6571756573742e536f666152657175657374000000077365727669636500000020636f6d2e616c697061792e74657374"
        "2e48656c6c6f536572766963653a312e304fbc636f6d2e616c697061792e736f66612e7270632e636f72652e72657175"
        "6573742e536f666152657175657374950a6d6574686f644e616d650d6d6574686f644172675369677317746172676574"
        "53657276696365556e697175654e616d650d7461726765744170704e616d650c7265717565737450726f70736f900873"
        "617948656c6c6f567400115b6a6176612e6c616e672e537472696e676e01106a6176612e6c616e672e537472696e677a"
        "530020636f6d2e616c697061792e746573742e48656c6c6f536572766963653a312e300270624d0674656e616e740161"
        "7a055065746572"
    ),
    "v1_oneway": (
        "0102000101000000080100000bb8002c002f000000e6636f6d2e616c697061792e736f66612e7270632e636f72652e72"
        "6571756573742e536f666152657175657374000000077365727669636500000020636f6d2e616c697061792e74657374"
        "2e48656c6c6f536572766963653a312e304fbc636f6d2e616c697061792e736f66612e7270632e636f72652e72657175"
        "6573742e536f666152657175657374950a6d6574686f644e616d650d6d6574686f644172675369677317746172676574"
        "53657276696365556e697175654e616d650d7461726765744170704e616d650c7265717565737450726f70736f900873"
        "617948656c6c6f567400115b6a6176612e6c616e672e537472696e676e01106a6176612e6c616e672e537472696e677a"
        "530020636f6d2e616c697061792e746573742e48656c6c6f536572766963653a312e300270624d0674656e616e740161"
        "7a055065746572"
    ),
    "v1_heartbeat": ("0101000001000000090100000bb80000000000000000"),
    "v1_heartbeat_ack": ("0100000001000000090100000000000000000000"),
    "v1_response": (
        "010000020100000007010000002e00000000006d636f6d2e616c697061792e736f66612e7270632e636f72652e726573"
        "706f6e73652e536f6661526573706f6e73654fbe636f6d2e616c697061792e736f66612e7270632e636f72652e726573"
        "706f6e73652e536f6661526573706f6e7365940769734572726f72086572726f724d73670b617070526573706f6e7365"
        "0d726573706f6e736550726f70736f90464e0b68656c6c6f2050657465724e"
    ),
    "v2crc_request": (
        "02020100010101020304010100000bb8002c002f000000e6636f6d2e616c697061792e736f66612e7270632e636f7265"
        "2e726571756573742e536f666152657175657374000000077365727669636500000020636f6d2e616c697061792e7465"
        "73742e48656c6c6f536572766963653a312e304fbc636f6d2e616c697061792e736f66612e7270632e636f72652e7265"
        "71756573742e536f666152657175657374950a6d6574686f644e616d650d6d6574686f64417267536967731774617267"
        "657453657276696365556e697175654e616d650d7461726765744170704e616d650c7265717565737450726f70736f90"
        "0873617948656c6c6f567400115b6a6176612e6c616e672e537472696e676e01106a6176612e6c616e672e537472696e"
        "677a530020636f6d2e616c697061792e746573742e48656c6c6f536572766963653a312e300270624d0674656e616e74"
        "01617a0550657465722a9bd23b"
    ),
    "v2crc_response": (
        "0202000002010102030401010000002e000000000064636f6d2e616c697061792e736f66612e7270632e636f72652e72"
        "6573706f6e73652e536f6661526573706f6e73654fbe636f6d2e616c697061792e736f66612e7270632e636f72652e72"
        "6573706f6e73652e536f6661526573706f6e7365940769734572726f72086572726f724d73670b617070526573706f6e"
        "73650d726573706f6e736550726f70736f90464e0268694e433e03cd"
    ),
    "v2_request": (
        "0201010001010000000b010000000bb8002c002f000000e6636f6d2e616c697061792e736f66612e7270632e636f7265"
        "2e726571756573742e536f666152657175657374000000077365727669636500000020636f6d2e616c697061792e7465"
        "73742e48656c6c6f536572766963653a312e304fbc636f6d2e616c697061792e736f66612e7270632e636f72652e7265"
        "71756573742e536f666152657175657374950a6d6574686f644e616d650d6d6574686f64417267536967731774617267"
        "657453657276696365556e697175654e616d650d7461726765744170704e616d650c7265717565737450726f70736f90"
        "0873617948656c6c6f567400115b6a6176612e6c616e672e537472696e676e01106a6176612e6c616e672e537472696e"
        "677a530020636f6d2e616c697061792e746573742e48656c6c6f536572766963653a312e300270624d0674656e616e74"
        "01617a055065746572"
    ),
}
NODE = {k: bytes.fromhex(v) for k, v in NODE_HEX.items()}


def decode(raw: bytes) -> bolt.BoltFrame:
    assert C.frame_length(raw) == len(raw)
    return C.decode(raw)


# -- frames from sofa-bolt-node ---------------------------------------------------------------


def test_node_v1_request() -> None:
    raw = NODE["v1_request"]
    f = decode(raw)
    assert (f.kind, f.request_id, f.timeout_ms, f.status) == (FrameKind.REQUEST, 7, 3000, 0)
    assert (f.proto, f.serializer, f.crc) == (1, bolt.HESSIAN2, False)
    assert f.class_name == SOFA_REQUEST
    assert dict(f.headers) == {"service": SERVICE}
    assert f.service == SERVICE
    assert f.method == ""  # sofa-bolt-node keeps the method in the Hessian2 body
    assert bytes(f.body[:1]) == b"O" and bytes(f.body).endswith(b"Peter")
    assert f.raw is raw
    # Re-encoding the decoded parts gives node's bytes back.
    again = bolt.encode_request(
        7, headers=f.headers, content=bytes(f.body), class_name=f.class_name, timeout_ms=3000
    )
    assert again == raw


def test_node_v1_oneway_and_heartbeat() -> None:
    f = decode(NODE["v1_oneway"])
    assert (f.kind, f.request_id, f.service) == (FrameKind.ONEWAY, 8, SERVICE)
    hb = decode(NODE["v1_heartbeat"])
    assert (hb.kind, hb.request_id, hb.timeout_ms, len(hb.raw)) == (FrameKind.HEARTBEAT, 9, 3000, 22)
    assert dict(hb.headers) == {} and hb.service == "" and bytes(hb.body) == b""
    ack = decode(NODE["v1_heartbeat_ack"])
    assert (ack.kind, ack.request_id, ack.status) == (FrameKind.HEARTBEAT_RESPONSE, 9, 0)
    assert C.is_success(ack)
    # Our answer to node's heartbeat is byte for byte what node itself answers.
    assert C.heartbeat_reply(hb) == NODE["v1_heartbeat_ack"]


def test_node_v1_response() -> None:
    f = decode(NODE["v1_response"])
    assert (f.kind, f.request_id, f.status, f.class_name) == (FrameKind.RESPONSE, 7, 0, SOFA_RESPONSE)
    assert C.is_success(f) and not C.is_retriable(f)
    assert bolt.encode_response(7, content=bytes(f.body), class_name=SOFA_RESPONSE) == f.raw


def test_node_v2_with_crc() -> None:
    raw = NODE["v2crc_request"]
    f = decode(raw)
    assert (f.proto, f.ver1, f.switch, f.crc) == (2, 2, 1, True)
    assert (f.kind, f.request_id, f.timeout_ms, f.service) == (FrameKind.REQUEST, 0x01020304, 3000, SERVICE)
    assert struct.unpack(">I", raw[-4:])[0] == zlib.crc32(raw[:-4])
    assert bytes(f.body).endswith(b"Peter")  # the CRC is not part of the body
    again = bolt.encode_request(
        0x01020304,
        headers=f.headers,
        content=bytes(f.body),
        class_name=SOFA_REQUEST,
        timeout_ms=3000,
        proto=2,
        ver1=2,
        switch=1,
    )
    assert again == raw
    r = decode(NODE["v2crc_response"])
    assert (r.kind, r.request_id, r.crc, r.status) == (FrameKind.RESPONSE, 0x01020304, True, 0)


def test_node_v2_without_crc() -> None:
    f = decode(NODE["v2_request"])
    assert (f.proto, f.ver1, f.switch, f.crc, f.request_id) == (2, 1, 0, False, 11)
    assert f.service == SERVICE and f.timeout_ms == 3000


# -- hand-built frames from the wire format ---------------------------------------------------

HDR = bytes.fromhex("00000007") + b"service" + bytes.fromhex("00000005") + b"a.B:1"
HDR += bytes.fromhex("00000015") + b"sofa_head_method_name" + bytes.fromhex("00000002") + b"hi"


def test_v1_request_by_hand() -> None:
    raw = (
        bytes.fromhex("01 01 0001 01 0000002a 01 000003e8")  # proto type cmdcode ver2 id codec timeout
        + struct.pack(">HHI", 3, len(HDR), 4)
        + b"Cls"
        + HDR
        + b"BODY"
    )
    assert len(raw) == 22 + 3 + len(HDR) + 4
    f = decode(raw)
    assert (f.kind, f.request_id, f.timeout_ms, f.class_name) == (FrameKind.REQUEST, 42, 1000, "Cls")
    assert (f.service, f.method) == ("a.B:1", "hi")
    assert bytes(f.body) == b"BODY"
    built = bolt.encode_request(
        42,
        headers={"service": "a.B:1", "sofa_head_method_name": "hi"},
        content=b"BODY",
        class_name="Cls",
        timeout_ms=1000,
    )
    assert built == raw


def test_v1_response_by_hand() -> None:
    raw = bytes.fromhex("01 00 0002 01 00000005 01 0004") + struct.pack(">HHI", 0, 0, 2) + b"ok"
    f = decode(raw)
    assert (f.kind, f.request_id, f.status, f.timeout_ms) == (FrameKind.RESPONSE, 5, 4, 0)
    assert bytes(f.body) == b"ok" and f.class_name == ""
    assert not C.is_success(f) and C.is_retriable(f)
    assert bolt.encode_response(5, 4, content=b"ok") == raw


def test_v2_request_and_response_by_hand() -> None:
    head = bytes.fromhex("02 01 02 0001 01 00000009 0b 00 ffffffff")  # oneway, protobuf, no timeout
    raw = head + struct.pack(">HHI", 0, len(HDR), 1) + HDR + b"x"
    assert len(head) + 8 == 24
    f = decode(raw)
    assert (f.kind, f.request_id, f.serializer, f.timeout_ms) == (FrameKind.ONEWAY, 9, 11, 0)
    assert f.method == "hi"
    resp = bytes.fromhex("02 02 00 0002 01 00000009 0b 01 0000") + struct.pack(">HHI", 0, 0, 0)
    resp += struct.pack(">I", zlib.crc32(resp))
    r = decode(resp)
    assert (r.kind, r.status, r.crc, len(r.raw)) == (FrameKind.RESPONSE, 0, True, 22 + 4)
    assert bolt.encode_response(9, serializer=11, proto=2, ver1=2, switch=1) == resp


def test_v2_version1_with_switch_has_no_crc() -> None:
    # sofa-bolt reads a CRC only when ver1 is 2, whatever the switch says.
    raw = bolt.encode_request(3, content=b"abc", proto=2, ver1=1, switch=1)
    assert len(raw) == 24 + 3
    assert not decode(raw).crc


def test_null_and_empty_header_values() -> None:
    block = struct.pack(">I", 1) + b"k" + struct.pack(">i", -1) + struct.pack(">I", 0) + struct.pack(">I", 0)
    raw = bytes.fromhex("01 01 0001 01 00000001 01 00000000") + struct.pack(">HHI", 0, len(block), 0) + block
    assert dict(decode(raw).headers) == {"k": "", "": ""}


def test_service_falls_back_to_target_service() -> None:
    raw = bolt.encode_request(1, headers={"sofa_head_target_service": "x.Y:2"})
    assert decode(raw).service == "x.Y:2"


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (bolt.encode_request(1, content=b"ab")[:-1], "length"),
        (bolt.encode_request(1, content=b"ab") + b"!", "length"),
        (bolt.encode_request(1, cmdcode=7), "command code"),
        (bolt.encode_response(1, cmdcode=1), "command code"),
        (
            bytes.fromhex("01 01 0001 01 00000001 01 00000000")
            + struct.pack(">HHI", 0, 5, 0)
            + b"\0\0\0\x09k",
            "header",
        ),
        (
            bytes.fromhex("01 01 0001 01 00000001 01 00000000")
            + struct.pack(">HHI", 0, 8, 0)
            + b"\0\0\0\0\xff\xff\xff\xfe",
            "header",
        ),
        (bytes.fromhex("03") + bytes(21), "protocol code"),
        (bytes.fromhex("01 05") + bytes(20), "command type"),
        (bytes.fromhex("02 07 01") + bytes(21), "version"),
    ],
)
def test_decode_rejects(raw: bytes, detail: str) -> None:
    with pytest.raises(CodecError, match=detail):
        C.decode(raw)


def test_a_response_with_a_malformed_header_block_is_forwarded_with_no_headers() -> None:
    # Forwarding a response needs only its head; its header block is read only if asked for,
    # and a malformed one then reads as empty (a request's is a codec error, see above).
    raw = bytes.fromhex("01 00 0002 01 00000009 01 0000") + struct.pack(">HHI", 0, 5, 0) + b"\0\0\0\x09k"
    f = C.decode(raw)
    assert f.kind is FrameKind.RESPONSE and f.request_id == 9 and C.is_success(f)
    assert dict(f.headers) == {}


def test_crc_mismatch_is_a_codec_error() -> None:
    raw = bytearray(NODE["v2crc_request"])
    raw[40] ^= 0x20
    assert C.frame_length(raw) == len(raw)
    with pytest.raises(CodecError, match="CRC32"):
        C.decode(bytes(raw))


# -- frame_length and match -------------------------------------------------------------------


def test_frame_length_needs_the_whole_head() -> None:
    for raw in (NODE["v1_request"], NODE["v2crc_request"], NODE["v1_response"], NODE["v2crc_response"]):
        head = 22 if raw[0] == 1 and raw[1] else 20 if raw[0] == 1 else 24 if raw[2] else 22
        for i in range(head):
            assert C.frame_length(raw[:i]) == NEED_MORE
            assert C.frame_length(memoryview(raw)[:i]) == NEED_MORE
        assert C.frame_length(raw[:head]) == len(raw)
        assert C.frame_length(bytearray(raw[:head])) == len(raw)


def test_oversize_lengths_are_codec_errors() -> None:
    head = bytes.fromhex("01 01 0001 01 00000001 01 00000000") + struct.pack(">HHI", 0, 0, MAX_FRAME)
    with pytest.raises(CodecError, match="exceeds"):
        C.frame_length(head)
    exact = bytes.fromhex("01 01 0001 01 00000001 01 00000000") + struct.pack(">HHI", 0, 0, MAX_FRAME - 22)
    assert C.frame_length(exact) == MAX_FRAME
    v2 = bytes.fromhex("02 02 00 0002 01 00000001 01 01 0000") + struct.pack(">HHI", 0, 0, MAX_FRAME - 22)
    with pytest.raises(CodecError):  # the CRC's 4 bytes push it over
        C.frame_length(v2)
    with pytest.raises(CodecError):
        FrameReader(C).feed(head)


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (b"", Match.NEED_MORE),
        (b"\x01", Match.NEED_MORE),
        (b"\x01\x01\x00", Match.NEED_MORE),
        (b"\x01\x01\x00\x01", Match.YES),
        (b"\x01\x02\x00\x01", Match.YES),
        (b"\x01\x01\x00\x00", Match.YES),
        (b"\x01\x00\x00\x02", Match.YES),
        (b"\x01\x00\x00\x01", Match.NO),
        (b"\x01\x01\x00\x02", Match.NO),
        (b"\x01\x09", Match.NO),
        (b"\x02\x01", Match.NEED_MORE),
        (b"\x02\x01\x01\x00\x01", Match.YES),
        (b"\x02\x02\x00\x00\x02", Match.YES),
        (b"\x02\x03\x01", Match.NO),
        (b"GET / HTTP/1.1\r\n", Match.NO),
        (b"PRI * HTTP/2.0\r\n", Match.NO),
        (b"\xda\xbb\xc2\x00", Match.NO),
        (b"\x16\x03\x01\x02\x00", Match.NO),
    ],
)
def test_match(data: bytes, want: Match) -> None:
    assert C.match(data) is want


def test_match_node_frames() -> None:
    for raw in NODE.values():
        assert C.match(raw[:8]) is Match.YES


# -- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1_request", "v1_response", "v2_request", "v1_heartbeat"])
def test_with_request_id_patches_only_the_id(name: str) -> None:
    raw = NODE[name]
    f = decode(raw)
    out = C.with_request_id(f, 0xDEADBEEF)
    at = 5 if raw[0] == 1 else 6
    assert out[:at] == raw[:at] and out[at + 4 :] == raw[at + 4 :]
    assert out[at : at + 4] == b"\xde\xad\xbe\xef"
    g = decode(out)
    assert (g.request_id, g.kind, dict(g.headers), bytes(g.body)) == (
        0xDEADBEEF,
        f.kind,
        dict(f.headers),
        bytes(f.body),
    )
    assert C.with_request_id(g, f.request_id) == raw
    assert f.raw == raw  # the frame itself is untouched


def test_with_request_id_recomputes_the_crc() -> None:
    raw = NODE["v2crc_request"]
    out = C.with_request_id(decode(raw), 77)
    assert out[:6] == raw[:6] and out[10:-4] == raw[10:-4] and out[-4:] != raw[-4:]
    g = decode(out)  # would raise on a stale CRC
    assert g.request_id == 77 and g.crc
    assert C.with_request_id(g, 0x01020304) == raw


def test_request_ids_are_32_bit() -> None:
    f = decode(NODE["v1_request"])
    assert decode(C.with_request_id(f, 0)).request_id == 0
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            C.with_request_id(f, bad)


# -- heartbeats, local replies, statuses ------------------------------------------------------


def test_heartbeat_request() -> None:
    raw = C.heartbeat_request(12345)
    assert raw == bytes.fromhex("01 01 0000 01 00003039 01 ffffffff") + bytes(8)
    f = decode(raw)
    assert (f.kind, f.request_id, f.timeout_ms) == (FrameKind.HEARTBEAT, 12345, 0)


def test_heartbeat_reply_v2_keeps_the_version_without_crc() -> None:
    hb = decode(bolt.encode_request(4, cmdcode=0, proto=2, ver1=2, switch=1))
    assert hb.kind is FrameKind.HEARTBEAT and hb.crc
    ack = C.heartbeat_reply(hb)
    assert ack == bytes.fromhex("02 02 00 0000 01 00000004 01 00 0000") + bytes(8)
    assert decode(ack).kind is FrameKind.HEARTBEAT_RESPONSE


@pytest.mark.parametrize(
    ("reason", "status", "retriable"),
    [
        (Reason.NO_ROUTE, 6, True),
        (Reason.NO_HEALTHY_UPSTREAM, 6, True),
        (Reason.OVERFLOW, 4, True),
        (Reason.TIMEOUT, 7, False),
        (Reason.CODEC_ERROR, 9, False),
        (Reason.UPSTREAM_RESET, 0x10, False),
    ],
)
def test_local_reply(reason: Reason, status: int, retriable: bool) -> None:
    req = decode(NODE["v1_request"])
    raw = C.local_reply(req, reason, "why")
    assert raw == bytes.fromhex("01 00 0002 01 00000007 01") + struct.pack(">H", status) + bytes(8)
    r = decode(raw)
    assert (r.kind, r.request_id, r.status) == (FrameKind.RESPONSE, 7, status)
    assert not C.is_success(r)
    assert C.is_retriable(r) is retriable
    # v2 with CRC: the reply has the request's version and switch, so a CRC too.
    req2 = decode(NODE["v2crc_request"])
    r2 = decode(C.local_reply(req2, reason, "why"))
    assert (r2.proto, r2.ver1, r2.switch, r2.crc, r2.request_id, r2.status) == (
        2,
        2,
        1,
        True,
        0x01020304,
        status,
    )


def test_local_reply_keeps_the_serializer() -> None:
    req = decode(bolt.encode_request(1, serializer=bolt.PROTOBUF))
    assert decode(C.local_reply(req, Reason.TIMEOUT, "")).serializer == bolt.PROTOBUF


def test_heartbeat_response_is_not_retriable() -> None:
    f = decode(bolt.encode_response(1, 4, cmdcode=0))
    assert f.kind is FrameKind.HEARTBEAT_RESPONSE and not C.is_retriable(f)


def test_registered_and_contract() -> None:
    codec = builtin_codecs()["bolt"]
    assert isinstance(codec, bolt.BoltCodec) and isinstance(codec, XCodec)
    assert (codec.multiplexed, codec.heartbeat, codec.goaway) == (True, True, False)
    assert isinstance(decode(NODE["v1_request"]), Frame)
    assert bolt.CODECS == (bolt.CODECS[0],) and bolt.CODECS[0].name == "bolt"


def test_goaway_from_mosn_decodes() -> None:
    f = decode(bolt.encode_request(0, cmdcode=bolt.CMD_GOAWAY, timeout_ms=0))
    assert f.kind is FrameKind.GOAWAY


# -- properties -------------------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    proto = draw(st.sampled_from((1, 2)))
    ver1 = draw(st.sampled_from((1, 2))) if proto == 2 else 1
    switch = draw(st.sampled_from((0, 1))) if proto == 2 else 0
    common = {
        "headers": draw(st.dictionaries(texts, texts, max_size=4)),
        "content": draw(st.binary(max_size=64)),
        "class_name": draw(texts),
        "serializer": draw(st.sampled_from((1, 11))),
        "proto": proto,
        "ver1": ver1,
        "switch": switch,
    }
    rid = draw(st.integers(0, 0xFFFFFFFF))
    if draw(st.booleans()):
        return bolt.encode_request(
            rid,
            timeout_ms=draw(st.integers(-(1 << 31), (1 << 31) - 1)),
            oneway=draw(st.booleans()),
            cmdcode=draw(st.sampled_from((0, 1))),
            **common,
        )
    return bolt.encode_response(
        rid, draw(st.integers(0, 0xFFFF)), cmdcode=draw(st.sampled_from((0, 2))), **common
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), min_size=1, max_size=4))
def test_any_split_gives_the_same_frames(seq: list[bytes]) -> None:
    stream = b"".join(seq)
    for i in range(len(stream) + 1):
        r = FrameReader(C)
        got = r.feed(stream[:i]) + r.feed(stream[i:])
        assert got == seq, i
        assert r.pending == 0
    r = FrameReader(C)
    got = [f for b in stream for f in r.feed(bytes([b]))]
    assert got == seq
    for raw in seq:
        f = C.decode(raw)
        assert f.raw == raw
        assert C.decode(C.with_request_id(f, 1)).request_id == 1


def _probe(data: bytes) -> None:
    """frame_length / decode / the lazy properties: a value or CodecError, nothing else."""
    try:
        n = C.frame_length(data)
    except CodecError:
        return
    assert n == NEED_MORE or n >= 20
    if n == NEED_MORE or n > len(data):
        return
    try:
        f = C.decode(data[:n])
    except CodecError:
        return
    assert f.raw == data[:n]
    dict(f.headers)
    f.service, f.method, f.class_name, bytes(f.body)
    C.is_success(f), C.is_retriable(f), C.with_request_id(f, 3)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_garbage_is_a_codec_error_or_need_more(data: bytes) -> None:
    _probe(data)
    assert C.match(data) in (Match.YES, Match.NO, Match.NEED_MORE)
    try:
        FrameReader(C).feed(data)
    except CodecError:
        pass


@settings(max_examples=300, deadline=None)
@given(frames(), st.data())
def test_mutated_frames_never_crash(raw: bytes, data: st.DataObject) -> None:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    _probe(bytes(buf))
    _probe(bytes(buf[: data.draw(st.integers(0, len(buf)))]))


def test_one_mib_frames_through_the_reader() -> None:
    body = bytes(range(256)) * 4096
    a = bolt.encode_request(1, headers={"service": SERVICE}, content=body, proto=2, ver1=2, switch=1)
    b = bolt.encode_response(2, content=body)
    r = FrameReader(C)
    got = r.feed(a[:1000]) + r.feed(a[1000:] + b[:30]) + r.feed(b[30:])
    assert got == [a, b] and r.pending == 0
    f = C.decode(got[0])
    assert bytes(f.body) == body
    out = C.with_request_id(f, 9)
    assert len(out) == len(a) and C.decode(out).request_id == 9
