"""The in-memory harness itself (moorline/testing/pair.py): the virtual clock, errors raised in
loop callbacks, the transports and the strict HTTP/1.1 reader the other unit tests rely on."""

from __future__ import annotations

import asyncio

import pytest

from moorline.testing.pair import (
    LoopCallbackError,
    MemTransport,
    Pair,
    VirtualLoop,
    WireError,
    bootstrap_yaml,
    build_request,
    build_response,
    parse_message,
)


def test_advance_fires_timers_in_order_at_their_own_time() -> None:
    loop = VirtualLoop()
    fired: list[tuple[str, float]] = []
    t0 = loop.time()
    loop.call_later(2.0, lambda: fired.append(("b", loop.time() - t0)))
    loop.call_later(1.0, lambda: fired.append(("a", loop.time() - t0)))
    h = loop.call_later(1.5, lambda: fired.append(("cancelled", 0.0)))
    h.cancel()
    loop.advance(1.9)
    assert fired == [("a", 1.0)]
    loop.advance(0.2)
    assert fired == [("a", 1.0), ("b", 2.0)]
    assert loop.time() == pytest.approx(t0 + 2.1)
    loop.close()


def test_timers_scheduled_by_timers_fire_within_the_same_advance() -> None:
    loop = VirtualLoop()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(loop.time())
        if len(ticks) < 5:
            loop.call_later(1.0, tick)

    loop.call_later(1.0, tick)
    loop.advance(10)
    assert [round(t - ticks[0], 6) for t in ticks] == [0.0, 1.0, 2.0, 3.0, 4.0]
    loop.close()


def test_a_failing_callback_fails_the_action() -> None:
    loop = VirtualLoop()

    def boom() -> None:
        raise ValueError("inside a callback")

    loop.call_soon(boom)
    with pytest.raises(LoopCallbackError) as ei:
        loop.run_ready()
    assert isinstance(ei.value.__cause__, ValueError)
    loop.close()


def test_a_callback_storm_fails_instead_of_hanging() -> None:
    loop = VirtualLoop()

    def again() -> None:
        loop.call_soon(again)

    loop.call_soon(again)
    with pytest.raises(LoopCallbackError, match="rescheduling"):
        loop.run_ready()
    loop.close()


def test_loop_is_running_only_inside_actions() -> None:
    loop = VirtualLoop()
    seen: list[object] = []
    loop.call_soon(lambda: seen.append(asyncio.get_running_loop()))
    loop.run_ready()
    assert seen == [loop]
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    loop.close()


def test_mem_transport_records_and_behaves_like_asyncio() -> None:
    loop = VirtualLoop()
    lost: list[object] = []

    class P(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)

    t = MemTransport(loop, P())
    t.write(b"a")
    t.writelines([b"b", b"c"])
    assert t.take() == b"abc" and t.take() == b""
    t.pause_reading()
    t.pause_reading()
    assert not t.reading and t.pauses == 1
    t.write_eof()
    with pytest.raises(RuntimeError):
        t.write(b"after eof")
    t.close()
    assert lost == []  # connection_lost comes on the next loop iteration
    loop.run_ready()
    assert lost == [None]
    loop.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n",
        b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    ],
)
def test_reader_rejects_what_a_strict_client_would(raw: bytes) -> None:
    with pytest.raises(WireError):
        parse_message(raw, response=True)


def test_reader_frames_messages() -> None:
    req = build_request("POST", "/x", [("a", "1")], body=b"hi", chunked=True)
    m, n = parse_message(req + b"next", response=False) or (None, 0)
    assert m is not None and (m.method, m.target, m.body, m.chunked) == (b"POST", b"/x", b"hi", True)
    assert n == len(req)
    resp = build_response(200, [("x", "y")], b"body", chunked=True, trailers=[("t", "1")])
    m2, _ = parse_message(resp, response=True) or (None, 0)
    assert m2 is not None and m2.body == b"body" and m2.trailer("t") == b"1" and m2.header("x") == b"y"
    assert parse_message(b"HTTP/1.1 200 OK\r\n\r\nuntil close", response=True) is None
    m3, _ = parse_message(b"HTTP/1.1 200 OK\r\n\r\nuntil close", response=True, eof=True) or (None, 0)
    assert m3 is not None and m3.body == b"until close"
    head, _ = parse_message(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", response=True, no_body=True) or (
        None,
        0,
    )
    assert head is not None and head.body == b""


def test_pair_serves_a_request_without_sockets() -> None:
    with Pair(bootstrap_yaml()) as pair:
        c = pair.connect()
        c.request("GET", "/hello", host="svc")
        up = pair.upstream.accept()
        assert up.address == ("10.0.0.1", 80)
        assert up.request().header("host") == b"svc"
        up.respond(200, body=b"world")
        assert c.response().body == b"world"
        pair.assert_settled()
    assert pair.loop.is_closed()


def test_assert_settled_reports_what_is_in_flight() -> None:
    with Pair(bootstrap_yaml()) as pair:
        c = pair.connect()
        c.request("GET", "/")
        with pytest.raises(AssertionError, match="downstream_rq_active=1"):
            pair.assert_settled()
        c.reset()
        pair.assert_settled()


def test_upstream_attempts_can_be_refused_or_left_to_time_out() -> None:
    with Pair(bootstrap_yaml()) as pair:
        c = pair.connect()
        c.request("GET", "/")
        a = pair.upstream.attempt()
        assert a.pending
        pair.advance(1.1)  # the cluster's connect_timeout (1 s)
        assert a.cancelled
        assert c.response().status == 503
        with pytest.raises(AssertionError, match="no pending upstream connection attempt"):
            pair.upstream.accept()
