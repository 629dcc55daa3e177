"""The sans-IO HTTP/2 codec: exchanges between a client and a server codec, flow control,
GOAWAY that keeps streams in flight, and each flood protection fed the attack's frames.

Every test runs against both backends: ``h2`` (the reference) and ``nghttp2`` (required: the
build is part of ``make test``; without it these cases fail rather than skip)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import protocol_pb2
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from moorline.protocol import http2 as h2c
from moorline.protocol.http2 import Http2Codec, Http2Error, Http2Options


def _nghttp2() -> Any:
    from moorline.protocol._nghttp2 import NgCodec  # type: ignore[import-not-found,unused-ignore]

    return NgCodec


@pytest.fixture(autouse=True, params=["h2", "nghttp2"])
def backend(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test with ``Http2Codec`` (the name the helpers below use) bound to one backend."""
    if request.param == "nghttp2":
        monkeypatch.setitem(globals(), "Http2Codec", _nghttp2())
    return str(request.param)


REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/p")]
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


def pair(
    client_opts: Http2Options | None = None, server_opts: Http2Options | None = None
) -> tuple[Http2Codec, Http2Codec]:
    c = Http2Codec(True, client_opts)
    s = Http2Codec(False, server_opts)
    c.initiate()
    s.initiate()
    shuttle(c, s)
    return c, s


def shuttle(c: Http2Codec, s: Http2Codec) -> tuple[list[Any], list[Any]]:
    """Move bytes both ways until quiet; returns (client events, server events)."""
    ce: list[Any] = []
    se: list[Any] = []
    for _ in range(50):
        a = c.data_to_send()
        b = s.data_to_send()
        if not a and not b:
            break
        if a:
            se.extend(s.receive(a))
        if b:
            ce.extend(c.receive(b))
    return ce, se


def kinds(events: list[Any], kind: int) -> list[Any]:
    return [e for e in events if e[0] == kind]


def raw_client() -> tuple[Http2Codec, bytes]:
    """A server codec and the client preface + SETTINGS bytes that open a connection to it."""
    s = Http2Codec(False, Http2Options(premature_reset_min_streams=100))
    s.initiate()
    s.data_to_send()
    return s, h2c.PREFACE + SettingsFrame(0).serialize()


def headers_frame(enc: Encoder, sid: int, headers: list[tuple[bytes, bytes]], end: bool = True) -> bytes:
    f = HeadersFrame(sid)
    f.data = enc.encode(headers)
    f.flags.add("END_HEADERS")
    if end:
        f.flags.add("END_STREAM")
    return f.serialize()


def test_request_response_with_trailers() -> None:
    c, s = pair()
    sid = c.next_stream_id()
    c.send_headers(sid, [*REQ, (b"te", b"trailers")], False)
    c.send_data(sid, b"hello", False)
    c.send_trailers(sid, [(b"x-req-trailer", b"1")])
    _, se = shuttle(c, s)
    assert kinds(se, h2c.HEADERS)[0][2][:4] == REQ
    data = kinds(se, h2c.DATA)
    assert data[0][2] == b"hello" and data[0][3] == 5
    assert kinds(se, h2c.TRAILERS)[0][2] == [(b"x-req-trailer", b"1")]
    s.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")], False)
    s.send_data(sid, b"world", False)
    s.send_trailers(sid, [(b"grpc-status", b"0")])
    ce, _ = shuttle(c, s)
    assert kinds(ce, h2c.HEADERS)[0][2][0] == (b":status", b"200")
    assert kinds(ce, h2c.DATA)[0][2] == b"world"
    assert kinds(ce, h2c.TRAILERS)[0][2] == [(b"grpc-status", b"0")]


def test_outbound_data_beyond_window_is_queued_until_acked() -> None:
    small = Http2Options(initial_stream_window_size=65535, initial_connection_window_size=65535)
    c, s = pair(client_opts=small)
    sid = c.next_stream_id()
    c.send_headers(sid, GET, True)
    shuttle(c, s)
    body = bytes(range(256)) * 800  # 204800 bytes, > the client's 65535 window
    s.send_headers(sid, [(b":status", b"200")], False)
    s.send_data(sid, body, True)
    assert s.pending(sid) == len(body) - 65535
    ce, _ = shuttle(c, s)
    got = b"".join(e[2] for e in kinds(ce, h2c.DATA))
    assert got == body[:65535]  # the client acknowledged nothing: nothing more came
    assert not any(e[4] for e in kinds(ce, h2c.DATA))
    received = 65535
    while received < len(body):
        c.ack(sid, sum(e[3] for e in kinds(ce, h2c.DATA)))
        ce, _ = shuttle(c, s)
        chunk = b"".join(e[2] for e in kinds(ce, h2c.DATA))
        assert chunk, "window updates must release queued data"
        got += chunk
        received += len(chunk)
    assert got == body
    assert kinds(ce, h2c.DATA)[-1][4] is True  # END_STREAM after the queued bytes
    assert s.pending(sid) == 0


def test_inbound_window_bounds_what_a_peer_can_send() -> None:
    small = Http2Options(initial_stream_window_size=65535, initial_connection_window_size=65535)
    c, s = pair(server_opts=small)
    sid = c.next_stream_id()
    c.send_headers(sid, REQ, False)
    c.send_data(sid, b"x" * 300_000, True)
    _, se = shuttle(c, s)
    assert sum(e[3] for e in kinds(se, h2c.DATA)) == 65535  # the server acks nothing yet
    assert c.pending(sid) == 300_000 - 65535
    s.ack(sid, 65535)
    ce, se = shuttle(c, s)
    assert kinds(ce, h2c.WRITABLE) == [] or c.pending(sid) < 300_000 - 65535
    assert sum(e[3] for e in kinds(se, h2c.DATA)) > 0


def test_graceful_goaway_keeps_streams_in_flight() -> None:
    c, s = pair()
    sid = c.next_stream_id()
    c.send_headers(sid, GET, True)
    shuttle(c, s)
    s.goaway(h2c.NO_ERROR, last_stream_id=sid)
    s.send_headers(sid, [(b":status", b"200")], False)
    s.send_data(sid, b"after goaway", True)
    ce, _ = shuttle(c, s)
    assert kinds(ce, h2c.GOAWAY) == [(h2c.GOAWAY, sid, 0)]
    assert kinds(ce, h2c.DATA)[0][2] == b"after goaway"
    assert c.goaway_received


def test_rapid_reset_same_batch_is_dropped_and_ends_connection() -> None:
    s, pre = raw_client()
    enc = Encoder()
    out = [pre]
    for i in range(120):
        sid = 1 + 2 * i
        out.append(headers_frame(enc, sid, GET))
        r = RstStreamFrame(sid)
        r.error_code = h2c.CANCEL
        out.append(r.serialize())
    with pytest.raises(Http2Error) as ei:
        s.receive(b"".join(out))
    assert ei.value.stat == "too_many_premature_resets"
    assert ei.value.code == h2c.ENHANCE_YOUR_CALM
    assert b"\x00\x00\x00\x0b" in s.data_to_send()  # GOAWAY ENHANCE_YOUR_CALM queued


def test_rapid_reset_across_reads_counts_streams_whose_response_had_not_ended() -> None:
    s, pre = raw_client()
    enc = Encoder()
    s.receive(pre)
    seen = 0
    with pytest.raises(Http2Error) as ei:
        for i in range(200):
            sid = 1 + 2 * i
            ev = s.receive(headers_frame(enc, sid, GET))
            seen += len(kinds(ev, h2c.HEADERS))
            r = RstStreamFrame(sid)
            r.error_code = h2c.CANCEL
            s.receive(r.serialize())
    assert ei.value.stat == "too_many_premature_resets"
    assert seen == 100  # detected at the configured minimum of closed streams


def test_resets_after_complete_responses_are_not_premature() -> None:
    s, pre = raw_client()
    enc = Encoder()
    s.receive(pre)
    for i in range(300):
        sid = 1 + 2 * i
        s.receive(headers_frame(enc, sid, GET))
        s.send_headers(sid, [(b":status", b"204")], True)
        r = RstStreamFrame(sid)
        r.error_code = h2c.CANCEL
        s.receive(r.serialize())
        s.data_to_send()
    assert s.premature_resets == 0


def test_ping_flood_is_detected_until_flushed() -> None:
    s, pre = raw_client()
    s.receive(pre)
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    s.receive(ping.serialize() * 900)
    s.flushed()  # the answers reached the socket
    s.receive(ping.serialize() * 900)
    with pytest.raises(Http2Error) as ei:
        s.receive(ping.serialize() * 200)
    assert ei.value.stat == "outbound_control_flood"


def test_settings_flood_is_detected() -> None:
    s, pre = raw_client()
    with pytest.raises(Http2Error) as ei:
        s.receive(pre + SettingsFrame(0).serialize() * 1500)
    assert ei.value.stat == "outbound_control_flood"


def test_empty_data_frames_flood() -> None:
    s, pre = raw_client()
    enc = Encoder()
    s.receive(pre + headers_frame(enc, 1, REQ, end=False))
    with pytest.raises(Http2Error) as ei:
        s.receive(DataFrame(1).serialize() * 3)
    assert ei.value.stat == "inbound_empty_frames_flood"


def test_priority_frame_flood() -> None:
    # Envoy's max_inbound_priority_frames_per_stream (100) x (1 + streams opened): a stream of
    # PRIORITY frames stalls every other client of the loop; the 101st for no stream is a flood.
    s, pre = raw_client()
    s.receive(pre + PriorityFrame(3, depends_on=0, stream_weight=15).serialize() * 100)
    with pytest.raises(Http2Error) as ei:
        s.receive(PriorityFrame(5, depends_on=0, stream_weight=15).serialize())
    assert ei.value.stat == "inbound_priority_frames_flood"
    assert ei.value.code == h2c.ENHANCE_YOUR_CALM
    # Each stream the client opens allows 100 more.
    s, pre = raw_client()
    enc = Encoder()
    s.receive(pre + headers_frame(enc, 1, REQ) + PriorityFrame(3, depends_on=0).serialize() * 200)


def test_window_update_flood() -> None:
    # Envoy's rule: at most 5 + 2 x (streams opened + 10 x DATA frames we sent) WINDOW_UPDATEs.
    s, pre = raw_client()
    s.receive(pre + WindowUpdateFrame(0, window_increment=1).serialize() * 5)
    with pytest.raises(Http2Error) as ei:
        s.receive(WindowUpdateFrame(0, window_increment=1).serialize())
    assert ei.value.stat == "inbound_window_update_frames_flood"
    # A client reading our DATA may update its windows for each frame: well within the limit.
    s, pre = raw_client()
    enc = Encoder()
    s.receive(pre + headers_frame(enc, 1, REQ))
    s.send_headers(1, [(b":status", b"200")], False)
    for _ in range(8):
        s.send_data(1, b"x" * 1000, False)
    s.receive(
        (
            WindowUpdateFrame(0, window_increment=1000).serialize()
            + WindowUpdateFrame(1, window_increment=1000).serialize()
        )
        * 8
    )


def test_flood_limits_from_proto() -> None:
    p = protocol_pb2.Http2ProtocolOptions()
    p.max_inbound_priority_frames_per_stream.value = 7
    p.max_inbound_window_update_frames_per_data_frame_sent.value = 3
    o, err = Http2Options.from_proto(p, "h2")
    assert err is None
    assert (
        o.max_inbound_priority_frames_per_stream,
        o.max_inbound_window_update_frames_per_data_frame_sent,
    ) == (7, 3)
    p.max_inbound_window_update_frames_per_data_frame_sent.value = 0
    _, err = Http2Options.from_proto(p, "h2")
    assert err == ("h2.max_inbound_window_update_frames_per_data_frame_sent", "must be at least 1")


def test_oversized_header_list_resets_only_its_stream(backend: str) -> None:
    # Past max_header_list_size the stream is reset (INTERNAL_ERROR, OVERSIZED for the glue's
    # http2.header_overflow), the HPACK state stays right and the next request is served.
    s = Http2Codec(False, Http2Options(max_header_list_size=8 * 1024))
    s.initiate()
    s.data_to_send()
    enc = Encoder()
    big = GET + [(b"x-big-%d" % i, b"v" * 600) for i in range(20)]  # 12 KB, one frame
    ev = s.receive(h2c.PREFACE + SettingsFrame(0).serialize() + headers_frame(enc, 1, big))
    assert kinds(ev, h2c.OVERSIZED) == [(h2c.OVERSIZED, 1)]
    assert kinds(ev, h2c.HEADERS) == []
    out = s.data_to_send()
    assert RstStreamFrame(1, error_code=h2c.INTERNAL_ERROR).serialize() in out
    ev = s.receive(headers_frame(enc, 3, [*GET, (b"x-big-0", b"v" * 600)]))
    assert [e[1] for e in kinds(ev, h2c.HEADERS)] == [3]


def test_a_header_block_far_past_the_limit_ends_the_connection_on_h2(backend: str) -> None:
    # The h2 backend's decoder stops a bomb at hard_header_cap; nghttp2 decodes without keeping
    # what it does not hand over, so there the stream alone is reset.
    s = Http2Codec(False, Http2Options(max_header_list_size=8 * 1024))
    s.initiate()
    s.data_to_send()
    enc = Encoder()
    f = HeadersFrame(1)
    f.data = enc.encode(GET + [(b"x-big-%d" % i, b"v" * 1000) for i in range(300)])  # 300 KB
    f.flags.add("END_HEADERS")
    f.flags.add("END_STREAM")
    settings = SettingsFrame(0)
    settings.settings = {SettingsFrame.MAX_FRAME_SIZE: 1 << 20}
    data = h2c.PREFACE + settings.serialize() + f.serialize()
    if backend == "h2":
        s.h2.max_inbound_frame_size = 1 << 20
        with pytest.raises(Http2Error) as ei:
            s.receive(data)
        assert ei.value.stat == "header_overflow"
    else:
        with pytest.raises(Http2Error) as ei:  # one 300 KB frame is past our max_frame_size
            s.receive(data)
        assert ei.value.code == h2c.FRAME_SIZE_ERROR


def test_continuation_flood() -> None:
    s, pre = raw_client()
    enc = Encoder()
    f = HeadersFrame(1)
    f.data = enc.encode(GET)
    f.flags.add("END_STREAM")  # no END_HEADERS: CONTINUATION frames follow
    cont = ContinuationFrame(1)
    cont.data = b""
    with pytest.raises(Http2Error) as ei:
        s.receive(pre + f.serialize() + cont.serialize() * 100)
    assert ei.value.stat == "too_many_header_frames"


def test_peer_hpack_table_size_is_capped_for_our_encoder() -> None:
    # The peer allows a 1 GiB table; our encoder's is our memory: it stays at MAX_ENCODER_TABLE,
    # which a decoder refusing any larger table size update checks.
    from hpack import Decoder
    from hyperframe.frame import Frame

    s, pre = raw_client()
    st = SettingsFrame(0)
    st.settings = {0x1: 2**30}  # SETTINGS_HEADER_TABLE_SIZE
    enc = Encoder()
    s.receive(pre + st.serialize() + headers_frame(enc, 1, GET))
    s.data_to_send()
    s.send_headers(1, [(b":status", b"200")] + [(b"x-h%d" % i, b"v" * 1000) for i in range(100)], True)
    out = memoryview(s.data_to_send())
    dec = Decoder()
    dec.max_allowed_table_size = 2**30
    dec.max_header_list_size = 2**20
    block = b""
    while out:
        f, n = Frame.parse_frame_header(out[:9])
        f.parse_body(out[9 : 9 + n])
        out = out[9 + n :]
        if isinstance(f, (HeadersFrame, ContinuationFrame)):
            block += f.data
    headers = dec.decode(block, raw=True)
    assert len(headers) == 101
    assert dec.header_table_size <= h2c.MAX_ENCODER_TABLE


def test_our_decoder_table_is_capped_at_the_advertised_size() -> None:
    s, pre = raw_client()
    enc = Encoder()
    enc.header_table_size = 2**20  # emits a table size update larger than we allow
    with pytest.raises(Http2Error):
        s.receive(pre + headers_frame(enc, 1, GET))


def test_options_from_proto() -> None:
    p = protocol_pb2.Http2ProtocolOptions()
    p.max_concurrent_streams.value = 7
    p.initial_stream_window_size.value = 70000
    p.initial_connection_window_size.value = 1 << 20
    o, err = Http2Options.from_proto(p, "x", max_header_list_size=4096)
    assert err is None
    assert (o.max_concurrent_streams, o.initial_stream_window_size, o.max_header_list_size) == (
        7,
        70000,
        4096,
    )
    p.initial_stream_window_size.value = 100
    _, err = Http2Options.from_proto(p, "x")
    assert err is not None and err[0] == "x.initial_stream_window_size"
    from hyperframe.frame import Frame

    c = Http2Codec(False, o)
    c.initiate()
    out = c.data_to_send()
    f, n = Frame.parse_frame_header(out[:9])
    f.parse_body(memoryview(out[9 : 9 + n]))
    assert isinstance(f, SettingsFrame)
    assert f.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 7
    assert f.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 70000


def _goaway_code(data: bytes) -> int | None:
    """The error code of the last GOAWAY frame in ``data`` (frames from one codec)."""
    code = None
    off = 0
    while off + 9 <= len(data):
        n = int.from_bytes(data[off : off + 3], "big")
        if data[off + 3] == 0x7:
            code = int.from_bytes(data[off + 13 : off + 17], "big")
        off += 9 + n
    return code


def test_a_field_block_that_does_not_decode_is_a_compression_error() -> None:
    # RFC 9113 4.3: COMPRESSION_ERROR, where h2 itself answers PROTOCOL_ERROR.
    s, pre = raw_client()
    f = HeadersFrame(1)
    f.data = b"\x82\x86\x84\xc6"  # index 70: past the static table, the dynamic one is empty
    f.flags.add("END_HEADERS")
    f.flags.add("END_STREAM")
    with pytest.raises(Http2Error) as ei:
        s.receive(pre + f.serialize())
    assert ei.value.code == h2c.COMPRESSION_ERROR
    assert _goaway_code(s.data_to_send()) == h2c.COMPRESSION_ERROR


def test_a_settings_ack_with_a_payload_is_a_frame_size_error() -> None:
    # RFC 9113 6.5: FRAME_SIZE_ERROR, where h2 itself answers PROTOCOL_ERROR.
    s, pre = raw_client()
    ack = b"\x00\x00\x06\x04\x01\x00\x00\x00\x00" + b"\x00\x02\x00\x00\x00\x00"
    with pytest.raises(Http2Error) as ei:
        s.receive(pre + ack)
    assert ei.value.code == h2c.FRAME_SIZE_ERROR
    assert _goaway_code(s.data_to_send()) == h2c.FRAME_SIZE_ERROR


def test_other_protocol_errors_keep_h2s_code() -> None:
    s, pre = raw_client()
    ping_on_stream = b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"\x00" * 8
    with pytest.raises(Http2Error) as ei:
        s.receive(pre + ping_on_stream)
    assert ei.value.code == h2c.PROTOCOL_ERROR
    assert _goaway_code(s.data_to_send()) == h2c.PROTOCOL_ERROR
