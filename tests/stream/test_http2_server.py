"""The downstream HTTP/2 glue (``moorline.stream.http2_server``) in memory: invalid messages
(Envoy's stream_error_on_invalid_http_message and its HTTP/2 override) and outbound floods
while the client does not read."""

from __future__ import annotations

from typing import Any

import pytest
from hyperframe.frame import DataFrame

from moorline.protocol import http2_backends
from moorline.testing.pair import Pair, bootstrap_yaml

UP = [("10.0.0.1", 80)]


def make(hcm_extra: dict[str, Any] | None = None, h2opts: dict[str, Any] | None = None) -> Pair:
    extra = dict(hcm_extra or {})
    extra["codec_type"] = "HTTP2"
    if h2opts is not None:
        extra["http2_protocol_options"] = h2opts
    return Pair(bootstrap_yaml(clusters={"be": UP}, hcm_extra=extra))


def goaways(h: Any) -> list[int]:
    import h2.events

    return [int(e.error_code) for e in h.events if isinstance(e, h2.events.ConnectionTerminated)]


INVALID = {
    "uppercase": {"headers": [("X-Upper", "1")]},
    "connection-specific": {"headers": [("connection", "close")]},
    "no-path": {"path": None},
    "connect-with-path": {"method": "CONNECT"},
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_request_ends_the_connection_by_default(case: str) -> None:
    with make() as pair:
        h = pair.connect_h2()
        ok = h.request(path="/first")
        pair.upstream.accept()
        h.request(**INVALID[case])
        h.poll()
        assert goaways(h) == [1]  # PROTOCOL_ERROR
        assert pair.stat("http2.rx_messaging_error") == 1
        assert h.down.closed
        assert h.streams[ok].status is None


@pytest.mark.parametrize("case", list(INVALID))
def test_hcm_stream_error_resets_only_the_stream(case: str) -> None:
    with make({"stream_error_on_invalid_http_message": True}) as pair:
        h = pair.connect_h2()
        bad = h.request(**INVALID[case])
        assert h.response(bad).reset_code == 1
        assert pair.stat("http2.rx_messaging_error") == 1
        assert not goaways(h) and not h.down.closed
        ok = h.request(path="/after")
        up = pair.upstream.accept()
        assert up.request().target == b"/after"
        up.respond(200, body=b"fine")
        r = h.response(ok)
        assert r.status == 200 and r.body == b"fine"


def test_http2_override_wins_over_the_hcm() -> None:
    h2opts = {"override_stream_error_on_invalid_http_message": False}
    with make({"stream_error_on_invalid_http_message": True}, h2opts) as pair:
        h = pair.connect_h2()
        h.request(headers=[("X-Upper", "1")])
        h.poll()
        assert goaways(h) == [1] and h.down.closed
    with make(
        {"stream_error_on_invalid_http_message": False},
        {"override_stream_error_on_invalid_http_message": True},
    ) as pair:
        h = pair.connect_h2()
        bad = h.request(headers=[("X-Upper", "1")])
        assert h.response(bad).reset_code == 1 and not h.down.closed


def test_content_length_mismatch_resets_the_proxied_stream() -> None:
    with make({"stream_error_on_invalid_http_message": True}) as pair:
        h = pair.connect_h2()
        sid = h.request("POST", "/up", headers=[("content-length", "3")], end_stream=False)
        up = pair.upstream.accept()
        h.send_data(sid, b"toolong", end_stream=True)
        assert h.response(sid).reset_code == 1
        assert pair.stat("http2.rx_messaging_error") == 1
        assert up.aborted or up.closed  # the upstream request is abandoned, not completed
        assert not h.down.closed


def test_rst_answers_to_a_client_that_does_not_read_end_in_goaway() -> None:
    # Issue 11's probe finding: empty DATA frames on a reset stream, each answered by an
    # RST_STREAM; a client that never reads. Envoy's max_outbound_control_frames (1000) ends it.
    with make() as pair:
        h = pair.connect_h2()
        sid = h.request("POST", "/p", end_stream=False)
        pair.upstream.accept()
        h.reset(sid)
        h.poll()
        h.down.block_writes()  # the socket buffer is full from here on
        frame = DataFrame(sid).serialize()
        for _ in range(30):
            h.down.send(frame * 50)
            if h.down.closed:
                break
        assert h.down.closed
        # nghttp2 answers the first DATA on the closed stream with GOAWAY STREAM_CLOSED (nothing
        # piles up); h2 answers each with RST_STREAM until the control-frame limit.
        nghttp2 = http2_backends.BACKEND == "nghttp2"
        assert pair.stat("http2.outbound_control_flood") == (0 if nghttp2 else 1)
        h.down.unblock_writes()
        data = h.down.read()
        codes = []
        off = 0
        while off + 9 <= len(data):
            n = int.from_bytes(data[off : off + 3], "big")
            if data[off + 3] == 0x7:  # GOAWAY: last stream id, then the error code
                codes.append(int.from_bytes(data[off + 13 : off + 17], "big"))
            off += 9 + n
        assert codes[-1:] == [5 if nghttp2 else 11]  # STREAM_CLOSED / ENHANCE_YOUR_CALM


def test_frames_queued_for_a_client_that_does_not_read_end_in_outbound_flood() -> None:
    # Envoy's max_outbound_frames: DATA frames of a response pile up while the socket is full.
    with make(h2opts={"max_outbound_frames": 20}) as pair:
        h = pair.connect_h2()
        sid = h.request(path="/big")
        up = pair.upstream.accept()
        h.down.block_writes()
        up.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(30):
            up.send(b"1\r\nx\r\n")  # one DATA frame each
            if h.down.closed:
                break
        assert h.down.closed
        assert pair.stat("http2.outbound_flood") == 1
        assert h.streams[sid].reset_code is None  # the connection ended, not the stream
