"""The connection manager's request lifecycle (moorline.proxy.hcm), driven in memory.

``MemPair`` builds a real ``Server`` from YAML (never started), one downstream HTTP/1.1
connection and pooled upstream HTTP/1.1 connections over in-memory transports, on an asyncio
loop whose clock the test sets (``pair.clock``). The test plays both peers byte by byte:
``down.data_received`` is the client, ``up.data_received`` the upstream, ``on_tick(now)`` the
connection manager's sweep. Nothing runs the loop, so no timer fires behind the test's back.

Tests marked ``xfail(strict=True, reason="review: ...")`` pin bugs found by the review of the
rebuilt L7 core; remove the marker together with the fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from moorline.config.loader import load_bootstrap
from moorline.net.conn_info import ConnInfo
from moorline.stream.http1_client import Http1ClientConnection, pool_for
from moorline.stream.http1_server import Http1ServerConnection

ROUTER = {"name": "envoy.filters.http.router"}

BASE = """
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: t
          codec_type: HTTP1
          stream_idle_timeout: {idle}
          upgrade_configs: [{{upgrade_type: websocket}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/direct"}}
                direct_response: {{status: 200, body: {{inline_string: "d"}}}}
              - match: {{prefix: "/admin"}}
                direct_response: {{status: 403}}
              - match: {{prefix: "/"}}
                route: {{cluster: be, timeout: 0s}}
          http_filters:
{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: be
    type: STATIC
    load_assignment:
      cluster_name: be
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}
"""

# A filter that lets everything through (it only answers requests carrying x-hc), so that the
# stream gets a FilterManager.
HC_FILTER = """\
          - name: envoy.filters.http.health_check
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: false
              headers: [{name: x-hc, present_match: true}]
"""


def config(idle: str = "300s", filters: str = "") -> str:
    return BASE.format(idle=idle, filters=filters)


class MemTransport:
    """An asyncio transport that records writes. Like uvloop's, it refuses a write after
    ``close``, ``abort`` or ``write_eof``."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.eof = False
        self.reading = True

    def write(self, data: bytes) -> None:
        if self.closed or self.eof:
            raise RuntimeError("write on a closed or half-closed transport")
        self.out.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for d in data:
            self.write(d)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def data(self) -> bytes:
        return b"".join(self.out)


class MemPair:
    """See the module docstring."""

    def __init__(self, yaml_text: str) -> None:
        from moorline.server import Server

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.clock = 1000.0
        self.loop.time = lambda: self.clock  # type: ignore[method-assign]
        self.server = Server(load_bootstrap(yaml_text=yaml_text), "<test>")
        lst = self.server.listener_manager.get("l")
        assert lst is not None
        self.hcm = lst.filter_chains[0].terminal
        cluster = self.server.cluster_manager.get("be")
        assert cluster is not None
        self.cluster = cluster
        self.host = cluster.hosts[0]
        self.pool = pool_for(self.host, self.loop)
        self.ups: list[tuple[Http1ClientConnection, MemTransport]] = []
        self.add_upstream()
        self.down, self.dt = self.connect()

    def add_upstream(self) -> tuple[Http1ClientConnection, MemTransport]:
        """One more idle pooled upstream connection (the pool never dials out in memory)."""
        up = Http1ClientConnection(self.pool)
        t = MemTransport()
        up.connection_made(t)
        self.pool.total += 1
        self.cluster.stats.upstream_cx_active.value += 1
        self.host.active_cx += 1
        self.pool.idle.append(up)
        self.ups.append((up, t))
        return up, t

    def connect(self) -> tuple[Http1ServerConnection, MemTransport]:
        info = ConnInfo(("127.0.0.1", 10000), ("127.0.0.1", 40000), "l")
        down = Http1ServerConnection(self.hcm, info)
        t = MemTransport()
        down.connection_made(t)
        return down, t

    @property
    def up(self) -> Http1ClientConnection:
        return self.ups[0][0]

    @property
    def ut(self) -> MemTransport:
        return self.ups[0][1]

    def gauge(self, name: str) -> int:
        return int(getattr(self.hcm.stats, name).value)

    @property
    def upstream_rq_active(self) -> int:
        return int(self.cluster.stats.upstream_rq_active.value)

    def close(self) -> None:
        # Connection attempts the pool started (tasks never run: nothing runs this loop) are
        # cancelled and run to their end, so no coroutine is left un-awaited.
        tasks = asyncio.all_tasks(self.loop)
        for t in tasks:
            t.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def pair() -> Iterator[MemPair]:
    p = MemPair(config())
    yield p
    p.close()


WS_HEAD = (
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_harness_proxies_one_request(pair: MemPair) -> None:
    pair.down.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert pair.ut.data().startswith(b"GET /x HTTP/1.1\r\n")
    pair.up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert pair.dt.data().startswith(b"HTTP/1.1 200 OK\r\n") and pair.dt.data().endswith(b"\r\n\r\nok")
    assert pair.gauge("downstream_rq_active") == 0 and pair.upstream_rq_active == 0


# -- connections cut while a stream is active ----------------------------------------------------


def test_cut_connection_resets_its_active_stream(pair: MemPair) -> None:
    pair.down.data_received(WS_HEAD)
    pair.up.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    assert pair.dt.data().startswith(b"HTTP/1.1 101")
    pair.hcm.close_all()  # the listener manager's cut after the drain time
    pair.down.connection_lost(None)
    assert pair.gauge("downstream_rq_active") == 0
    assert pair.gauge("downstream_cx_upgrades_active") == 0
    assert pair.upstream_rq_active == 0
    assert pair.host.active_rq == 0
    assert pair.ut.closed, "the upstream half of the tunnel stays open"


# -- upgrades ------------------------------------------------------------------------------------


def test_refused_upgrade_gets_the_upstream_response(pair: MemPair) -> None:
    pair.down.data_received(WS_HEAD)
    pair.up.data_received(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
    out = pair.dt.data()
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n"), out
    assert out.endswith(b"\r\n\r\nno")
    assert pair.gauge("downstream_rq_active") == 0
    assert pair.upstream_rq_active == 0


def test_bytes_before_the_101_are_held_until_the_upgrade_is_accepted(pair: MemPair) -> None:
    pair.down.data_received(WS_HEAD + b"GET /admin/secret HTTP/1.1\r\nHost: a\r\n\r\n")
    assert pair.ut.data().startswith(b"GET /ws HTTP/1.1\r\n")
    assert b"/admin" not in pair.ut.data(), "sent to the upstream before it accepted the upgrade"
    pair.up.data_received(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
    assert b"/admin" not in pair.ut.data()


def test_client_fin_before_the_101_reaches_the_upstream(pair: MemPair) -> None:
    pair.down.data_received(WS_HEAD + b"hello")
    assert pair.down.eof_received() is True  # half-close: the tunnel's write side stays open
    pair.up.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    assert pair.ut.data().endswith(b"hello")
    assert pair.ut.eof, "the client's FIN never reaches the upstream"


# -- request body after the response started -----------------------------------------------------


def test_request_body_after_the_response_started_reaches_the_upstream() -> None:
    pair = MemPair(config(filters=HC_FILTER))
    try:
        pair.down.data_received(
            b"POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        assert pair.ut.data().endswith(b"5\r\nfirst\r\n")
        pair.up.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        assert pair.dt.data().startswith(b"HTTP/1.1 200 OK\r\n")
        pair.down.data_received(b"6\r\nsecond\r\n0\r\n\r\n")
        assert pair.ut.data().endswith(b"6\r\nsecond\r\n0\r\n\r\n"), pair.ut.data()
    finally:
        pair.close()


def test_request_body_after_the_response_started_reaches_the_upstream_without_filters(
    pair: MemPair,
) -> None:
    """The same exchange on the fast path (no FilterManager) works: the control for the test
    above."""
    pair.down.data_received(
        b"POST /s HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
    )
    pair.up.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    pair.down.data_received(b"6\r\nsecond\r\n0\r\n\r\n")
    assert pair.ut.data().endswith(b"6\r\nsecond\r\n0\r\n\r\n")


# -- timeouts --------------------------------------------------------------------------------


def test_stream_idle_timeout_counts_response_progress() -> None:
    pair = MemPair(config(idle="10s"))
    try:
        pair.down.data_received(b"GET /download HTTP/1.1\r\nHost: a\r\n\r\n")
        pair.clock += 8
        pair.up.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n")
        pair.clock += 8
        pair.up.data_received(b"2\r\ncd\r\n")
        pair.clock += 1
        pair.down.on_tick(pair.clock)  # 17 s after the request, 1 s after the last byte
        assert pair.hcm.stats.downstream_rq_idle_timeout.value == 0
        assert not pair.dt.closed and not pair.ut.closed
        pair.up.data_received(b"0\r\n\r\n")
        assert pair.dt.data().endswith(b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")
    finally:
        pair.close()
