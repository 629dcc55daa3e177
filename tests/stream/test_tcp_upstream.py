"""CONNECT termination's upstream (``moorline.stream.tcp_upstream.TcpUpstream``) driven directly
on an in-memory transport: the tunnel opens at once, bytes and half-closes pass both ways, a
host that vanishes mid-tunnel resets the exchange, and the cluster's connection counts balance."""

from __future__ import annotations

from typing import Any

import pytest

from moorline.protocol.headers import RequestHeaders
from moorline.stream.api import ResetReason
from moorline.stream.tcp_upstream import TcpUpstream
from moorline.testing.pair import MemTransport, VirtualLoop


class _Counter:
    def __init__(self) -> None:
        self.value = 0


class _Stats:
    def __getattr__(self, name: str) -> _Counter:
        c = _Counter()
        setattr(self, name, c)
        return c


class _Cluster:
    def __init__(self) -> None:
        self.stats = _Stats()
        self.per_connection_buffer_limit = 1 << 20


class _Host:
    def __init__(self) -> None:
        self.cluster = _Cluster()
        self.active_cx = 1


class _Router:
    """What the router is told (the ``UpstreamCallbacks`` side)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_upstream_headers(self, headers: Any, end_stream: bool) -> None:
        self.events.append(("headers", headers.status, end_stream))

    def on_upstream_upgrade(self, rest: bytes) -> None:
        self.events.append(("upgrade", rest))

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        self.events.append(("data", data, end_stream))

    def on_upstream_reset(self, reason: ResetReason, detail: str = "") -> None:
        self.events.append(("reset", reason))

    def on_upstream_write_paused(self) -> None:
        self.events.append(("paused",))

    def on_upstream_write_resumed(self) -> None:
        self.events.append(("resumed",))


@pytest.fixture
def tunnel() -> Any:
    loop = VirtualLoop()
    host = _Host()
    conn = TcpUpstream(host, loop)
    conn.counted = True  # as connect() leaves it
    host.cluster.stats.upstream_cx_active.value = 1
    t = MemTransport(loop, conn)
    conn.connection_made(t)
    router = _Router()
    conn.send_headers(router, RequestHeaders.make(b"CONNECT", b"", b"echo:7", b"http", []), False)
    yield loop, host, conn, t, router
    loop.close()


def test_the_tunnel_opens_at_once_and_bytes_pass_both_ways(tunnel: Any) -> None:
    _loop, host, conn, t, router = tunnel
    assert router.events == [("headers", 200, False), ("upgrade", b"")]
    assert t.write_limits == (1 << 20, 1 << 18)
    conn.send_data(b"ping", False)
    assert bytes(t.data) == b"ping"
    conn.data_received(b"pong")
    assert router.events[-1] == ("data", b"pong", False)
    st = host.cluster.stats
    assert (st.upstream_cx_tx_bytes_total.value, st.upstream_cx_rx_bytes_total.value) == (4, 4)


def test_half_close_both_ways_then_a_graceful_close(tunnel: Any) -> None:
    loop, host, conn, t, router = tunnel
    conn.send_data(b"last", True)
    assert t.eof_written
    conn.send_data(b"more", False)  # after the client's end: nothing more is written
    assert bytes(t.data) == b"last"
    assert conn.eof_received() is True  # our write side stays open until both ends closed
    assert router.events[-1] == ("data", b"", True)
    conn.release()
    assert t.closed and not t.aborted
    loop.run_ready()  # connection_lost
    assert ("reset", ResetReason.CONNECTION_TERMINATION) not in router.events
    st = host.cluster.stats
    assert st.upstream_cx_active.value == 0 and st.upstream_cx_destroy_local.value == 1
    assert host.active_cx == 0


def test_a_host_that_vanishes_mid_tunnel_resets_the_exchange(tunnel: Any) -> None:
    _loop, host, conn, t, router = tunnel
    conn.data_received(b"partial")
    conn.connection_lost(ConnectionResetError())
    assert router.events[-1] == ("reset", ResetReason.CONNECTION_TERMINATION)
    st = host.cluster.stats
    assert st.upstream_cx_destroy_remote.value == 1 and st.upstream_cx_active.value == 0
    conn.send_data(b"late", False)  # the router's late write goes nowhere, no error
    assert bytes(t.data) == b""


def test_an_abort_before_both_ends_closed_is_not_graceful(tunnel: Any) -> None:
    loop, host, conn, t, router = tunnel
    conn.send_data(b"x", False)
    conn.abort()
    assert t.aborted
    loop.run_ready()
    assert router.events[-1] == ("upgrade", b"")  # the router went away first: no reset back
    assert host.cluster.stats.upstream_cx_destroy_local.value == 1


def test_backpressure_both_ways(tunnel: Any) -> None:
    _loop, _host, conn, t, router = tunnel
    conn.pause_reading()
    conn.pause_reading()
    assert not t.reading and t.pauses == 1
    conn.resume_reading()
    assert t.reading
    conn.pause_writing()
    conn.resume_writing()
    assert router.events[-2:] == [("paused",), ("resumed",)]
