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


def _parse_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of each frame in ``data``."""
    out = []
    off = 0
    while off + 9 <= len(data):
        n = int.from_bytes(data[off : off + 3], "big")
        t = data[off + 3]
        sid = int.from_bytes(data[off + 5 : off + 9], "big") & 0x7FFFFFFF
        out.append((t, sid, data[off + 9 : off + 9 + n]))
        off += 9 + n
    return out


def _goaway_codes(data: bytes) -> list[int]:
    return [int.from_bytes(p[4:8], "big") for t, _, p in _parse_frames(data) if t == 0x7]


def test_rst_answers_on_a_reset_stream_count_as_control_frames(backend: str) -> None:
    # Issue 11's probe: each empty DATA frame on a stream the client reset gets an RST_STREAM back
    # from h2; a client that never reads made the server queue them without limit. nghttp2
    # answers the first such frame with GOAWAY STREAM_CLOSED (RFC 9113 5.1): nothing to amplify.
    s, pre = raw_client()
    if backend == "nghttp2":
        enc = Encoder()
        rst = RstStreamFrame(1)
        rst.error_code = h2c.CANCEL
        s.receive(pre + headers_frame(enc, 1, REQ, end=False) + rst.serialize())
        s.data_to_send()
        with pytest.raises(Http2Error) as ei:
            s.receive(DataFrame(1).serialize())
        assert ei.value.code == h2c.STREAM_CLOSED
        assert _goaway_codes(s.data_to_send()) == [h2c.STREAM_CLOSED]
        return
    enc = Encoder()
    rst = RstStreamFrame(1)
    rst.error_code = h2c.CANCEL
    s.receive(pre + headers_frame(enc, 1, REQ, end=False) + rst.serialize())
    s.data_to_send()
    s.flushed()
    empty = DataFrame(1).serialize()
    answered = 0
    with pytest.raises(Http2Error) as ei:
        for _ in range(3000):  # never flushed(): the socket is not draining
            s.receive(empty)
            answered += sum(1 for t, _, _ in _parse_frames(s.data_to_send()) if t == 0x3)
    assert ei.value.stat == "outbound_control_flood"
    assert ei.value.code == h2c.ENHANCE_YOUR_CALM
    assert 900 <= answered <= 1000  # the RST answers went out until the limit, then GOAWAY
    assert _goaway_codes(s.data_to_send()) == [h2c.ENHANCE_YOUR_CALM]


def test_control_frame_count_restarts_when_flushed(backend: str) -> None:
    if backend == "nghttp2":
        # No RST answers to count there (see above): PING answers are control frames too.
        s, pre = raw_client()
        s.receive(pre)
        ping = PingFrame(0)
        ping.opaque_data = b"12345678"
        for _ in range(3):
            s.receive(ping.serialize() * 900)
            s.data_to_send()
            s.flushed()
        assert s.ctrl_queued == 0
        return
    s, pre = raw_client()
    enc = Encoder()
    rst = RstStreamFrame(1)
    rst.error_code = h2c.CANCEL
    s.receive(pre + headers_frame(enc, 1, REQ, end=False) + rst.serialize())
    for _ in range(5):
        s.receive(DataFrame(1).serialize() * 1)
        s.receive(b"".join([DataFrame(1).serialize()] * 1))
    for _ in range(3):
        for _ in range(900):
            s.receive(DataFrame(1).serialize())
        s.data_to_send()
        s.flushed()  # the answers reached the socket: 2,700 answers in all, no flood
    assert s.ctrl_queued == 0


def test_outbound_frames_limit_counts_every_frame_kind() -> None:
    # Envoy's max_outbound_frames: frames of any kind queued and not written, DATA included.
    s = Http2Codec(False, Http2Options(max_outbound_frames=50))
    s.initiate()
    s.data_to_send()
    enc = Encoder()
    s.receive(h2c.PREFACE + SettingsFrame(0).serialize() + headers_frame(enc, 1, GET))
    s.send_headers(1, [(b":status", b"200")], False)
    # Each write of the glue makes a frame (nghttp2 would coalesce chunks queued together).
    for _ in range(40):
        s.send_data(1, b"x", False)
        assert s.data_to_send() and s.error is None
    data = b""
    for _ in range(20):
        s.send_data(1, b"x", False)
        data += s.data_to_send()
    assert s.error is not None and s.error.stat == "outbound_flood"
    assert _goaway_codes(data) == [h2c.ENHANCE_YOUR_CALM]
    # Written and flushed, the same number is fine.
    s = Http2Codec(False, Http2Options(max_outbound_frames=50))
    s.initiate()
    s.receive(h2c.PREFACE + SettingsFrame(0).serialize() + headers_frame(Encoder(), 1, GET))
    s.send_headers(1, [(b":status", b"200")], False)
    for _ in range(60):
        s.send_data(1, b"x", False)
        s.data_to_send()
        s.flushed()
    assert s.error is None


def test_outbound_frames_limit_in_receive() -> None:
    s = Http2Codec(False, Http2Options(max_outbound_frames=100))
    s.initiate()
    s.data_to_send()
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    with pytest.raises(Http2Error) as ei:
        s.receive(h2c.PREFACE + SettingsFrame(0).serialize() + ping.serialize() * 120)
    assert ei.value.stat == "outbound_flood"


def test_outbound_limits_from_proto() -> None:
    p = protocol_pb2.Http2ProtocolOptions()
    p.max_outbound_frames.value = 77
    p.max_outbound_control_frames.value = 8
    o, err = Http2Options.from_proto(p, "h2")
    assert err is None and (o.max_outbound_frames, o.max_outbound_control_frames) == (77, 8)
    assert Http2Options().max_outbound_frames == 10000
    p.max_outbound_frames.value = 0
    assert Http2Options.from_proto(p, "h2")[1] == ("h2.max_outbound_frames", "must be at least 1")


BAD_BLOCKS = [
    pytest.param([*GET, (b"X-Upper", b"1")], id="uppercase-name"),
    pytest.param([*GET, (b"connection", b"close")], id="connection-specific"),
    pytest.param([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x")], id="no-path"),
    pytest.param([*GET, (b":bogus", b"1")], id="unknown-pseudo"),
    pytest.param([*GET, (b"content-length", b"abc")], id="bad-content-length"),
]


@pytest.mark.parametrize("block", BAD_BLOCKS)
def test_invalid_headers_end_the_connection_by_default(block: list[tuple[bytes, bytes]]) -> None:
    # Envoy's default (stream_error_on_invalid_http_messaging false): GOAWAY PROTOCOL_ERROR.
    s, pre = raw_client()
    enc = Encoder()
    s.receive(pre + headers_frame(enc, 1, GET))
    s.data_to_send()
    with pytest.raises(Http2Error) as ei:
        s.receive(headers_frame(enc, 3, block))
    assert ei.value.code == h2c.PROTOCOL_ERROR and ei.value.stat == "rx_messaging_error"
    assert _goaway_codes(s.data_to_send()) == [h2c.PROTOCOL_ERROR]


def _stream_error_server() -> tuple[Http2Codec, bytes]:
    s = Http2Codec(False, Http2Options(stream_error_on_invalid_http_messaging=True))
    s.initiate()
    s.data_to_send()
    return s, h2c.PREFACE + SettingsFrame(0).serialize()


@pytest.mark.parametrize("block", BAD_BLOCKS)
def test_invalid_headers_reset_only_their_stream_with_stream_errors(block: list[tuple[bytes, bytes]]) -> None:
    s, pre = _stream_error_server()
    enc = Encoder()
    ev = s.receive(pre + headers_frame(enc, 1, GET, end=False))
    assert kinds(ev, h2c.HEADERS)
    s.data_to_send()
    ev = s.receive(headers_frame(enc, 3, block, end=False) + DataFrame(3, data=b"zz").serialize())
    assert [e[:2] for e in ev] == [(h2c.MALFORMED, 3)]
    frames = _parse_frames(s.data_to_send())
    rst = [(sid, int.from_bytes(p, "big")) for t, sid, p in frames if t == 0x3]
    assert rst[0] == (3, h2c.PROTOCOL_ERROR)  # (the DATA after it gets h2's STREAM_CLOSED answer)
    assert not _goaway_codes(b"".join(p for _, _, p in frames))
    # The connection and its other stream go on; the HPACK state is intact.
    ev = s.receive(DataFrame(1, data=b"ok", flags=["END_STREAM"]).serialize() + headers_frame(enc, 5, GET))
    assert [e[0] for e in ev] == [h2c.DATA, h2c.HEADERS]
    # More frames on the reset stream get RST_STREAM, not a connection error.
    s.receive(DataFrame(3, data=b"late").serialize())


def test_content_length_mismatch_is_a_stream_error_with_stream_errors(backend: str) -> None:
    s, pre = _stream_error_server()
    enc = Encoder()
    req = [*REQ, (b"content-length", b"2")]
    ev = s.receive(pre + headers_frame(enc, 1, req, end=False))
    assert kinds(ev, h2c.HEADERS)
    ev = s.receive(DataFrame(1, data=b"toolong", flags=["END_STREAM"]).serialize())
    assert [e[:2] for e in ev] == [(h2c.MALFORMED, 1)]
    s2, pre = raw_client()
    s2.receive(pre + headers_frame(Encoder(), 1, req, end=False))
    if backend == "nghttp2":
        # nghttp2 checks content-length on DATA itself and resets only the stream whatever the
        # option (Envoy, on nghttp2, behaves the same): the glue still sees MALFORMED.
        ev = s2.receive(DataFrame(1, data=b"toolong", flags=["END_STREAM"]).serialize())
        assert [e[:2] for e in ev] == [(h2c.MALFORMED, 1)]
        return
    with pytest.raises(Http2Error) as ei:
        s2.receive(DataFrame(1, data=b"toolong", flags=["END_STREAM"]).serialize())
    assert ei.value.stat == "rx_messaging_error"


def test_invalid_response_headers_on_the_client_side() -> None:
    c, s = pair(client_opts=Http2Options(stream_error_on_invalid_http_messaging=True))
    sid = c.next_stream_id()
    c.send_headers(sid, GET, True)
    shuttle(c, s)
    # A response with an uppercase header name, encoded by hand (both codecs lower-case theirs).
    ce = c.receive(headers_frame(Encoder(), sid, [(b":status", b"200"), (b"X-Bad", b"1")]))
    assert [e[:2] for e in ce] == [(h2c.MALFORMED, sid)]


def test_stream_error_option_precedence() -> None:
    # Envoy: the options' override_stream_error_on_invalid_http_message, else the HCM's
    # stream_error_on_invalid_http_message, else the deprecated stream_error_on_invalid_http_messaging.
    p = protocol_pb2.Http2ProtocolOptions()
    assert Http2Options.from_proto(p, "h2")[0].stream_error_on_invalid_http_messaging is False
    p.stream_error_on_invalid_http_messaging = True
    assert Http2Options.from_proto(p, "h2")[0].stream_error_on_invalid_http_messaging is True
    assert (
        Http2Options.from_proto(p, "h2", hcm_stream_error=False)[0].stream_error_on_invalid_http_messaging
        is False
    )
    p.override_stream_error_on_invalid_http_message.value = False
    assert (
        Http2Options.from_proto(p, "h2", hcm_stream_error=True)[0].stream_error_on_invalid_http_messaging
        is False
    )
    assert (
        Http2Options.from_proto(None, "h2", hcm_stream_error=True)[0].stream_error_on_invalid_http_messaging
        is True
    )


def test_peer_stream_limit_is_100_until_its_settings_arrive() -> None:
    c = Http2Codec(True)
    c.initiate()
    assert c.peer_max_concurrent_streams == 100
    s = Http2Codec(False, Http2Options(max_concurrent_streams=250))
    s.initiate()
    c.receive(s.data_to_send())
    assert c.peer_max_concurrent_streams == 250


def test_hpack_bomb_is_bounded(backend: str) -> None:
    # One 4 KB table entry referenced 10,000 times (one byte each): a 10 KB frame that decodes
    # to 40 MB. Neither backend keeps it: h2's decoder stops at hard_header_cap (connection
    # error), nghttp2 resets that stream alone and the next request is served.
    s, pre = raw_client()
    enc = Encoder()
    first = headers_frame(enc, 1, [*GET, (b"x-bomb", b"b" * 4000)])  # indexes the 4 KB field
    s.receive(pre + first)
    s.data_to_send()
    f = HeadersFrame(3)
    f.data = enc.encode(GET) + b"\xbe" * 10_000  # 0xbe: dynamic table index 62, the bomb
    f.flags.add("END_HEADERS")
    f.flags.add("END_STREAM")
    if backend == "h2":
        with pytest.raises(Http2Error) as ei:
            s.receive(f.serialize())
        assert ei.value.stat == "header_overflow"
        return
    ev = s.receive(f.serialize())
    assert kinds(ev, h2c.OVERSIZED) == [(h2c.OVERSIZED, 3)]
    ev = s.receive(headers_frame(enc, 5, GET))
    assert [e[1] for e in kinds(ev, h2c.HEADERS)] == [5]


def test_trailers_behind_a_full_stream_window_stay_pending_until_sent() -> None:
    # The body fills the client's stream window exactly; the trailers (or END_STREAM) then wait
    # on nghttp2 for a window update. pending() must not say 0 meanwhile: the glues forget or
    # reset (NO_ERROR) a stream whose pending() is 0, which lost the trailers and reset it.
    small = Http2Options(initial_stream_window_size=65535, initial_connection_window_size=65535)
    c, s = pair(client_opts=small)
    sid = c.next_stream_id()
    c.send_headers(sid, GET, True)
    shuttle(c, s)
    s.send_headers(sid, [(b":status", b"200")], False)
    s.send_data(sid, b"x" * 65535, False)
    assert s.pending(sid) == 0  # all within the window (the glue asks after each send_data)
    s.send_trailers(sid, [(b"grpc-status", b"0")])
    forgotten = False
    if not s.pending(sid):  # what the server glue does once the response ended
        s.forget(sid)
        forgotten = True
    ce, se = shuttle(c, s)
    c.ack(sid, sum(e[3] for e in kinds(ce, h2c.DATA)))
    ce2, se2 = shuttle(c, s)
    ce += ce2
    if not forgotten:
        assert kinds(se + se2, h2c.WRITABLE) == [(h2c.WRITABLE, sid)]
        assert s.pending(sid) == 0
    assert kinds(ce, h2c.TRAILERS) == [(h2c.TRAILERS, sid, [(b"grpc-status", b"0")])]
    assert not kinds(ce, h2c.RESET)


def test_dropped_rapid_reset_streams_hand_their_data_back_to_the_connection_window() -> None:
    s, preface = raw_client()
    enc = Encoder()
    b = preface + SettingsFrame(0, flags=["ACK"]).serialize()
    for sid in (1, 3, 5):  # 3 x 196608 bytes: past half the 1 MiB connection window
        b += headers_frame(enc, sid, REQ, end=False)
        for _ in range(12):
            b += DataFrame(sid, b"y" * 16384).serialize()
        b += RstStreamFrame(sid, error_code=h2c.CANCEL).serialize()
    events = s.receive(b)
    assert not [e for e in events if e[0] in (h2c.HEADERS, h2c.DATA)]
    updates = [p for t, sid, p in _parse_frames(s.data_to_send()) if t == 0x8 and sid == 0]
    assert sum(int.from_bytes(p, "big") for p in updates) >= 512 * 1024  # h2 and nghttp2 update at half
