"""What only the nghttp2 backend (``moorline/protocol/_nghttp2.pyx``) can get wrong: per-stream
bookkeeping that must die with its stream, and C-level argument checks."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from hyperframe.frame import RstStreamFrame
from moorline.protocol._nghttp2 import NgCodec  # type: ignore[import-not-found,unused-ignore]

from moorline.protocol import http2 as h2c

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


def _pair() -> tuple[Any, Any]:
    c, s = NgCodec(True), NgCodec(False)
    c.initiate()
    s.initiate()
    _shuttle(c, s)
    return c, s


def _shuttle(c: Any, s: Any) -> None:
    for _ in range(20):
        a, b = c.data_to_send(), s.data_to_send()
        if not a and not b:
            return
        s.receive(a) if a else None
        c.receive(b) if b else None


def _held_ids(codec: Any) -> set[int]:
    """Stream ids in the codec's per-stream sets and dicts (gc sees its object fields)."""
    out: set[int] = set()
    for r in gc.get_referents(codec):
        if isinstance(r, (set, dict)):
            out.update(k for k in r if isinstance(k, int))
    return out


def test_resets_on_closed_streams_leave_nothing_behind() -> None:
    # RST_STREAM from the peer on a stream already closed, and reset() by the glue of one: no
    # close callback follows either, so nothing may be remembered for them (a client sending
    # RST_STREAM for every old stream id grew the codec without bound).
    c, s = _pair()
    for _ in range(3):
        sid = c.next_stream_id()
        c.send_headers(sid, GET, True)
        _shuttle(c, s)
        s.send_headers(sid, [(b":status", b"200")], True)
        _shuttle(c, s)
        s.receive(RstStreamFrame(sid, error_code=h2c.CANCEL).serialize())
        s.reset(sid, h2c.NO_ERROR)
        c.reset(sid, h2c.CANCEL)
        _shuttle(c, s)
    assert _held_ids(s) == set()
    assert _held_ids(c) == set()


def test_a_reset_request_not_yet_sent_reports_no_reset_back() -> None:
    # A request nghttp2 has not sent yet (it opens the stream when it frames the HEADERS):
    # reset() drops it there, and the codec neither reports that as the peer's RESET nor keeps it.
    c, _ = _pair()
    sid = c.next_stream_id()
    c.send_headers(sid, GET, True)
    c.reset(sid, h2c.CANCEL)
    c.data_to_send()
    assert [e for e in c.receive(b"") if e[0] == h2c.RESET] == []
    assert _held_ids(c) == set()


@pytest.mark.parametrize("call", ["receive", "send_data", "goaway", "ping"])
def test_none_for_bytes_is_a_type_error_not_a_crash(call: str) -> None:
    c, _ = _pair()
    with pytest.raises(TypeError):
        if call == "receive":
            c.receive(None)
        elif call == "send_data":
            c.send_data(1, None, False)
        elif call == "goaway":
            c.goaway(0, None, None)
        else:
            c.ping(None)
