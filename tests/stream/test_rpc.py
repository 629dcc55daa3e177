"""moorline.stream.rpc: the x-protocol downstream connection and upstream pools, over loopback
with the test codecs of moorline.testing.xcodecs and real STATIC clusters."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from moorline.observability.stats import Store
from moorline.protocol.xprotocol.api import FrameKind, Reason
from moorline.stream import rpc
from moorline.testing import xcodecs
from moorline.testing.xcodecs import MUX, PINGPONG, run, static_cluster, until
from moorline.testing.xcodecs import stat_value as val
from moorline.upstream.cluster import Cluster


def make_cluster(store: Store, ports: list[int], name: str = "c", **extra: Any) -> Cluster:
    return static_cluster(store, name, ports, **extra)


class Req:
    """What the proxy's ActiveRpc gives a pool."""

    def __init__(self, codec: Any, raw: bytes) -> None:
        self.frame = codec.decode(raw)
        self.oneway = self.frame.kind == FrameKind.ONEWAY
        self.up_conn: Any = None
        self.up_id = 0
        self.up_pool: Any = None
        self.up_state = rpc.IDLE
        self.response: Any = None
        self.failure: tuple[Reason, str, bool] | None = None
        self.sent = False

    def on_upstream_response(self, f: Any) -> None:
        self.response = f

    def on_upstream_failure(self, reason: Reason, detail: str, connect_failure: bool) -> None:
        self.failure = (reason, detail, connect_failure)

    def on_oneway_sent(self) -> None:
        self.sent = True

    @property
    def finished(self) -> bool:
        return self.response is not None or self.failure is not None or self.sent


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_multiplex_pool_one_connection_ids_rewritten_and_restored() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        host = c.choose_host()
        loop = asyncio.get_running_loop()
        pool = rpc.pool_for(host, MUX, loop)
        assert isinstance(pool, rpc.MultiplexPool)
        # The same downstream id twice (two clients), both in flight at once.
        r1 = Req(MUX, MUX.request(7, body=b"one"))
        r2 = Req(MUX, MUX.request(7, body=b"two"))
        pool.send(r1)
        pool.send(r2)
        assert r1.up_state == rpc.QUEUED and r2.up_state == rpc.QUEUED
        await until(lambda: r1.finished and r2.finished)
        assert bytes(r1.response.body) == b"a:one"
        assert bytes(r2.response.body) == b"a:two"
        assert srv.connections == 1
        ids = [f.request_id for f in srv.received]
        assert len(set(ids)) == 2  # rewritten: distinct upstream ids on the one connection
        assert val(store, "cluster.c.upstream_cx_total") == 1
        assert val(store, "cluster.c.upstream_rq_total") == 2
        assert val(store, "cluster.c.upstream_rq_active") == 0
        assert val(store, "cluster.c.upstream_rq_pending_active") == 0
        # A third request goes straight onto the open connection.
        r3 = Req(MUX, MUX.request(1, body=b"three"))
        pool.send(r3)
        assert r3.up_state == rpc.IN_FLIGHT
        await until(lambda: r3.finished)
        assert srv.connections == 1
        srv.close()

    run(main)


def test_multiplex_requests_of_one_loop_turn_go_out_in_one_write() -> None:
    # Many clients share the upstream connection: what they send in one loop turn is written
    # once (one syscall), in order, and still reaches the server whole.
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        first = Req(MUX, MUX.request(1, body=b"open"))
        pool.send(first)
        await until(lambda: first.finished)
        reads = srv.reads
        reqs = [Req(MUX, MUX.request(i, body=b"r%d" % i)) for i in range(20)]
        for r in reqs:
            pool.send(r)
        assert all(r.up_state == rpc.IN_FLIGHT for r in reqs)
        await until(lambda: all(r.finished for r in reqs))
        assert [bytes(r.response.body) for r in reqs] == [b"a:r%d" % i for i in range(20)]
        assert srv.reads == reads + 1
        assert [bytes(f.body) for f in srv.received[1:]] == [b"r%d" % i for i in range(20)]
        srv.close()

    run(main)


def test_multiplex_unknown_id_dropped_and_counted_after_cancel() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        slow = Req(MUX, MUX.request(1, method="sleep", body=b"0.2"))
        pool.send(slow)
        await until(lambda: slow.up_state == rpc.IN_FLIGHT)
        pool.cancel(slow)
        assert val(store, "cluster.c.upstream_rq_active") == 0
        await until(lambda: val(store, "cluster.c.rpc.upstream_rq_unknown_id") == 1)
        assert slow.response is None
        # The connection stays usable.
        r = Req(MUX, MUX.request(2, body=b"x"))
        pool.send(r)
        await until(lambda: r.finished)
        assert bytes(r.response.body) == b"a:x"
        assert srv.connections == 1
        srv.close()

    run(main)


def test_upstream_dies_mid_request_fails_in_flight_with_reset() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        waiting = Req(MUX, MUX.request(1, method="sleep", body=b"5"))
        killer = Req(MUX, MUX.request(2, method="close"))
        pool.send(waiting)
        pool.send(killer)
        await until(lambda: waiting.finished and killer.finished)
        assert waiting.failure is not None and waiting.failure[0] == Reason.UPSTREAM_RESET
        assert waiting.failure[2] is False  # not a connect failure
        assert killer.failure is not None and killer.failure[0] == Reason.UPSTREAM_RESET
        assert val(store, "cluster.c.upstream_cx_destroy_with_active_rq") == 1
        assert val(store, "cluster.c.upstream_rq_active") == 0
        assert val(store, "cluster.c.upstream_cx_active") == 0
        # The next request opens a new connection.
        r = Req(MUX, MUX.request(3))
        pool.send(r)
        await until(lambda: r.finished)
        assert r.response is not None and srv.connections == 2
        srv.close()

    run(main)


def test_upstream_garbage_is_a_protocol_error_and_reset() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        r = Req(MUX, MUX.request(1, method="garbage"))
        pool.send(r)
        await until(lambda: r.finished)
        assert r.failure is not None and r.failure[0] == Reason.UPSTREAM_RESET
        assert val(store, "cluster.c.upstream_cx_protocol_error") == 1
        srv.close()

    run(main)


def test_an_answer_before_garbage_in_the_same_read_is_delivered() -> None:
    # The good answer is not lost to the garbage behind it: it reaches its request, then the
    # connection is closed as a protocol error (failing only what was still in flight).
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        r = Req(MUX, MUX.request(1, method="tail_garbage"))
        pool.send(r)
        await until(lambda: r.finished)
        assert r.failure is None and bytes(r.response.body) == b"a:ok"
        await until(lambda: val(store, "cluster.c.upstream_cx_protocol_error") == 1)
        assert val(store, "cluster.c.upstream_cx_active") == 0
        srv.close()

    run(main)


def test_connect_failure_fails_queued_as_connect_failure() -> None:
    async def main() -> None:
        store = Store()
        c = make_cluster(store, [refused_port()])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        reqs = [Req(MUX, MUX.request(i)) for i in range(3)]
        for r in reqs:
            pool.send(r)
        await until(lambda: all(r.finished for r in reqs))
        for r in reqs:
            assert r.failure is not None
            assert r.failure[0] == Reason.UPSTREAM_RESET and r.failure[2] is True
        assert val(store, "cluster.c.upstream_cx_connect_fail") == 1
        assert val(store, "cluster.c.upstream_rq_pending_active") == 0
        assert val(store, "cluster.c.upstream_rq_active") == 0
        assert val(store, "cluster.c.upstream_cx_active") == 0

    run(main)


def test_overflow_max_pending_and_max_requests() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        cb = {"thresholds": [{"max_pending_requests": 1, "max_requests": 2}]}
        c = make_cluster(store, [srv.port], circuit_breakers=cb)
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        a = Req(MUX, MUX.request(1, method="sleep", body=b"0.1"))
        b = Req(MUX, MUX.request(2))
        pool.send(a)  # queued while connecting
        pool.send(b)  # the queue is full
        assert b.failure is not None and b.failure[0] == Reason.OVERFLOW
        await until(lambda: a.up_state == rpc.IN_FLIGHT)
        x = Req(MUX, MUX.request(3, method="sleep", body=b"0.1"))
        y = Req(MUX, MUX.request(4))
        pool.send(x)
        pool.send(y)  # max_requests 2: a and x are active
        assert y.failure is not None and y.failure[0] == Reason.OVERFLOW
        assert val(store, "cluster.c.upstream_rq_pending_overflow") == 2
        await until(lambda: a.finished and x.finished)
        assert a.response is not None and x.response is not None
        srv.close()

    run(main)


def test_oneway_needs_no_answer() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        r = Req(MUX, MUX.request(5, oneway=True, body=b"fire"))
        pool.send(r)
        await until(lambda: r.sent and len(srv.received) == 1)
        assert srv.received[0].kind == FrameKind.ONEWAY
        assert val(store, "cluster.c.upstream_rq_active") == 0
        srv.close()

    run(main)


def test_ping_pong_pool_one_request_per_connection() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(PINGPONG, "p")
        store = Store()
        cb = {"thresholds": [{"max_connections": 2}]}
        c = make_cluster(store, [srv.port], circuit_breakers=cb)
        pool = rpc.pool_for(c.choose_host(), PINGPONG, asyncio.get_running_loop())
        assert isinstance(pool, rpc.PingPongPool)
        reqs = [Req(PINGPONG, PINGPONG.request(1, method="sleep", body=b"0.05")) for _ in range(4)]
        for r in reqs:
            pool.send(r)
        await until(lambda: all(r.finished for r in reqs))
        assert all(r.response is not None and bytes(r.response.body) == b"p:slept" for r in reqs)
        assert srv.connections == 2  # max_connections: the other two waited for a free one
        assert val(store, "cluster.c.upstream_cx_overflow") >= 1
        # Idle connections are reused.
        r = Req(PINGPONG, PINGPONG.request(9))
        pool.send(r)
        await until(lambda: r.finished)
        assert srv.connections == 2
        srv.close()

    run(main)


def test_ping_pong_cancel_closes_the_connection() -> None:
    """An abandoned request's late answer must never become the next request's."""

    async def main() -> None:
        srv = await xcodecs.serve(PINGPONG, "p")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), PINGPONG, asyncio.get_running_loop())
        slow = Req(PINGPONG, PINGPONG.request(1, method="sleep", body=b"0.1"))
        pool.send(slow)
        await until(lambda: slow.up_state == rpc.IN_FLIGHT)
        pool.cancel(slow)
        nxt = Req(PINGPONG, PINGPONG.request(2, body=b"mine"))
        pool.send(nxt)
        await until(lambda: nxt.finished)
        assert bytes(nxt.response.body) == b"p:mine"
        assert srv.connections == 2
        await asyncio.sleep(0.15)
        assert slow.response is None
        srv.close()

    run(main)


class Handler:
    def __init__(self, store: Store, max_pending: int = 10) -> None:
        from moorline.proxy.rpc_proxy import RpcProxyStats

        self.stats = RpcProxyStats(store.scope("rpc_proxy.t."))
        self.max_pending = max_pending
        self.requests: list[tuple[Any, Any]] = []
        self.overflow: list[Any] = []
        self.codec_errors: list[str] = []
        self.closed: list[Any] = []

    def on_rpc_request(self, conn: Any, frame: Any) -> None:
        self.requests.append((conn, frame))
        conn.active.add(frame)

    def on_rpc_overflow(self, conn: Any, frame: Any) -> None:
        self.overflow.append(frame)

    def on_rpc_codec_error(self, conn: Any, frame: Any, detail: str) -> None:
        self.codec_errors.append(detail)
        conn.send(conn.codec.local_reply(frame, Reason.CODEC_ERROR, detail))

    def on_rpc_closed(self, conn: Any, active: set[Any]) -> None:
        self.closed.append(active)


class Info:
    buffer_limit = 1024 * 1024

    def __init__(self) -> None:
        self.notified = 0

    def notify_closed(self) -> None:
        self.notified += 1


async def serve_conn(handler: Handler, codec: Any = MUX, sniff: tuple[Any, ...] = ()) -> tuple[Any, Info]:
    loop = asyncio.get_running_loop()
    info = Info()
    server = await loop.create_server(
        lambda: rpc.RpcServerConnection(handler, info, codec, sniff), "127.0.0.1", 0
    )
    return server, info


def test_server_connection_frames_heartbeat_and_split_reads() -> None:
    async def main() -> None:
        store = Store()
        h = Handler(store)
        server, info = await serve_conn(h)
        cl = await xcodecs.connect_client(MUX, server.sockets[0].getsockname()[1])
        data = MUX.heartbeat_request(3) + MUX.request(4, body=b"abc") + MUX.request(5, oneway=True)
        for i in range(len(data)):  # one byte at a time
            cl.send(data[i : i + 1])
        await until(lambda: len(h.requests) == 2 and cl.frames)
        assert cl.frames[0].kind == FrameKind.HEARTBEAT_RESPONSE and cl.frames[0].request_id == 3
        assert [f.request_id for _, f in h.requests] == [4, 5]
        assert bytes(h.requests[0][1].body) == b"abc"
        assert val(store, "rpc_proxy.t.heartbeat") == 1
        assert val(store, "rpc_proxy.t.cx_active") == 1
        cl.transport.close()
        await until(lambda: info.notified == 1)
        assert len(h.closed) == 1 and len(h.closed[0]) == 2
        assert val(store, "rpc_proxy.t.cx_active") == 0
        server.close()

    run(main)


def test_server_connection_bounds_requests_in_flight() -> None:
    async def main() -> None:
        store = Store()
        h = Handler(store, max_pending=2)
        server, _ = await serve_conn(h)
        cl = await xcodecs.connect_client(MUX, server.sockets[0].getsockname()[1])
        cl.send(b"".join(MUX.request(i) for i in range(4)))
        await until(lambda: len(h.requests) + len(h.overflow) == 4)
        assert len(h.requests) == 2 and [f.request_id for f in h.overflow] == [2, 3]
        cl.transport.close()
        server.close()

    run(main)


def test_server_connection_codec_errors() -> None:
    async def main() -> None:
        store = Store()
        h = Handler(store)
        server, info = await serve_conn(h)
        port = server.sockets[0].getsockname()[1]
        # Bytes that are not the protocol: closed.
        cl = await xcodecs.connect_client(MUX, port)
        cl.send(b"GET / HTTP/1.1\r\n\r\n")
        await until(lambda: cl.closed)
        assert val(store, "rpc_proxy.t.codec_error") == 1
        # A response from a client: its id is known, so it is answered, then closed.
        cl2 = await xcodecs.connect_client(MUX, port)
        cl2.send(MUX.response(9, b"?"))
        await until(lambda: cl2.closed)
        assert cl2.frames and cl2.frames[0].request_id == 9
        assert cl2.frames[0].status == xcodecs.STATUS_OF[Reason.CODEC_ERROR]
        assert val(store, "rpc_proxy.t.codec_error") == 2
        # A frame the codec rejects (decode): closed.
        cl3 = await xcodecs.connect_client(MUX, port)
        cl3.send(MUX.request(1, headers={"bad": "1"}))
        await until(lambda: cl3.closed)
        assert val(store, "rpc_proxy.t.codec_error") == 3
        assert not h.requests
        await until(lambda: info.notified == 3)
        server.close()

    run(main)


def test_server_connection_sniffs_the_protocol() -> None:
    async def main() -> None:
        store = Store()
        h = Handler(store)
        server, _ = await serve_conn(h, None, (MUX, PINGPONG))
        port = server.sockets[0].getsockname()[1]
        cl = await xcodecs.connect_client(PINGPONG, port)
        raw = PINGPONG.request(1)
        cl.send(raw[:1])
        await asyncio.sleep(0.02)
        cl.send(raw[1:])
        await until(lambda: len(h.requests) == 1)
        conn, f = h.requests[0]
        assert conn.codec is PINGPONG and f.request_id == 1
        bad = await xcodecs.connect_client(MUX, port)
        bad.send(b"\x00\x01")
        await until(lambda: bad.closed)
        assert val(store, "rpc_proxy.t.codec_error") == 1
        cl.transport.close()
        server.close()

    run(main)


def test_max_requests_per_connection_opens_the_next_connection() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port], max_requests_per_connection=2)
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        for i in range(3):
            r = Req(MUX, MUX.request(i))
            pool.send(r)
            await until(lambda r=r: r.finished)  # type: ignore[misc]
            assert r.response is not None
        assert srv.connections == 2
        assert val(store, "cluster.c.upstream_cx_max_requests") == 1
        await until(lambda: val(store, "cluster.c.upstream_cx_active") == 1)  # the first closed
        srv.close()

    run(main)


def test_connection_reset_before_the_connect_callback_fails_the_queue(monkeypatch: Any) -> None:
    """The connect race: the connection is made and lost before the pool hears of the connect.
    The queued requests fail as on a connect failure, nothing is handed a dead connection and
    the counts come back to zero."""

    class DeadTransport:
        def set_write_buffer_limits(self, high: int, low: int) -> None:
            pass

        def write(self, data: bytes) -> None:
            raise AssertionError("written to a dead connection")

        def close(self) -> None:
            pass

    def connect(loop: Any, host: Any, protocol: Any, timeout: float, keepalive: Any, on_done: Any) -> Any:
        def later() -> None:
            protocol.connection_made(DeadTransport())
            protocol.connection_lost(ConnectionResetError())
            on_done(None, False)

        h = loop.call_soon(later)
        return h.cancel

    monkeypatch.setattr(rpc.net_upstream, "connect", connect)

    async def main() -> None:
        store = Store()
        c = make_cluster(store, [1])
        for codec in (MUX, PINGPONG):
            pool = rpc.pool_for(c.choose_host(), codec, asyncio.get_running_loop())
            reqs = [Req(codec, codec.request(i)) for i in range(2)]
            for r in reqs:
                pool.send(r)
            await until(lambda reqs=reqs: all(r.finished for r in reqs))  # type: ignore[misc]
            for r in reqs:
                assert r.failure is not None and r.failure[0] == Reason.UPSTREAM_RESET and r.failure[2]
        assert val(store, "cluster.c.upstream_cx_active") == 0
        assert val(store, "cluster.c.upstream_rq_active") == 0
        assert val(store, "cluster.c.upstream_rq_pending_active") == 0

    run(main)


def test_ping_pong_answer_out_of_step_closes_the_connection() -> None:
    """A second answer to a request must not pass for the answer of the request after it."""

    async def main() -> None:
        srv = await xcodecs.serve(PINGPONG, "p")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), PINGPONG, asyncio.get_running_loop())
        first = Req(PINGPONG, PINGPONG.request(1, method="double"))
        pool.send(first)
        await until(lambda: first.finished)
        nxt = Req(PINGPONG, PINGPONG.request(2, method="sleep", body=b"0.3"))
        pool.send(nxt)  # in flight on the same connection when the extra answer comes
        await until(lambda: nxt.finished)
        assert nxt.response is None
        assert nxt.failure is not None and nxt.failure[0] == Reason.UPSTREAM_RESET
        assert val(store, "cluster.c.upstream_cx_protocol_error") == 1
        again = Req(PINGPONG, PINGPONG.request(3, body=b"ok"))
        pool.send(again)
        await until(lambda: again.finished)
        assert bytes(again.response.body) == b"p:ok" and srv.connections == 2
        srv.close()

    run(main)


IDLE = {
    "typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "0.05s"},
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
}


def test_idle_connections_close_after_the_idle_timeout() -> None:
    async def main() -> None:
        for codec in (MUX, PINGPONG):
            srv = await xcodecs.serve(codec, "a")
            store = Store()
            c = make_cluster(store, [srv.port], **IDLE)
            pool = rpc.pool_for(c.choose_host(), codec, asyncio.get_running_loop())
            busy = Req(codec, codec.request(1, method="sleep", body=b"0.2"))
            pool.send(busy)
            await until(lambda busy=busy: busy.finished)  # type: ignore[misc]
            assert busy.response is not None  # a busy connection is not idle, however long
            await until(lambda store=store: val(store, "cluster.c.upstream_cx_active") == 0)
            assert val(store, "cluster.c.upstream_cx_idle_timeout") == 1
            srv.close()

    run(main)


def _fast_keepalive(monkeypatch: Any) -> None:
    monkeypatch.setattr(rpc, "KEEPALIVE_INTERVAL", 0.05)
    monkeypatch.setattr(rpc, "KEEPALIVE_TIMEOUT", 0.05)
    monkeypatch.setattr(rpc, "KEEPALIVE_TICK", 0.02)


def test_quiet_upstream_connections_get_heartbeats(monkeypatch: Any) -> None:
    _fast_keepalive(monkeypatch)

    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        r = Req(MUX, MUX.request(1))
        pool.send(r)
        await until(lambda: r.finished)
        await until(lambda: srv.heartbeats >= 3)  # answered: the connection stays
        assert srv.connections == 1
        assert val(store, "cluster.c.rpc.upstream_heartbeat") >= 3
        assert val(store, "cluster.c.rpc.upstream_heartbeat_timeout") == 0
        # Requests still flow on it, with ids that never collide with a heartbeat's.
        r2 = Req(MUX, MUX.request(2, body=b"after"))
        pool.send(r2)
        await until(lambda: r2.finished)
        assert bytes(r2.response.body) == b"a:after"
        pool.close()
        srv.close()

    run(main)


def test_an_upstream_that_stops_answering_heartbeats_is_closed(monkeypatch: Any) -> None:
    _fast_keepalive(monkeypatch)

    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        srv.answer_heartbeats = False
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        r = Req(MUX, MUX.request(1))
        pool.send(r)
        await until(lambda: r.finished)
        await until(lambda: val(store, "cluster.c.upstream_cx_active") == 0)
        assert val(store, "cluster.c.rpc.upstream_heartbeat_timeout") == rpc.KEEPALIVE_MAX_MISSES
        assert srv.heartbeats == rpc.KEEPALIVE_MAX_MISSES
        # The next request opens a new connection.
        r2 = Req(MUX, MUX.request(2))
        pool.send(r2)
        await until(lambda: r2.finished)
        assert srv.connections == 2
        pool.close()


def test_ping_pong_connection_retired_while_busy_closes_after_its_answer() -> None:
    """max_requests_per_connection reached with the request in flight: once answered, the
    connection is neither kept idle nor left open (it would hold a max_connections slot)."""

    async def main() -> None:
        srv = await xcodecs.serve(PINGPONG, "p")
        store = Store()
        cb = {"thresholds": [{"max_connections": 1}]}
        c = make_cluster(store, [srv.port], circuit_breakers=cb, max_requests_per_connection=1)
        pool = rpc.pool_for(c.choose_host(), PINGPONG, asyncio.get_running_loop())
        for i in range(3):
            r = Req(PINGPONG, PINGPONG.request(i, body=b"x%d" % i))
            pool.send(r)
            await until(lambda r=r: r.finished)  # type: ignore[misc]
            assert r.response is not None and bytes(r.response.body) == b"p:x%d" % i
        assert srv.connections == 3
        assert val(store, "cluster.c.upstream_cx_max_requests") == 3
        await until(lambda: val(store, "cluster.c.upstream_cx_active") == 0)
        srv.close()

    run(main)


def test_multiplex_queue_flushed_on_connect_respects_max_requests_per_connection() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port], max_requests_per_connection=2)
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        reqs = [Req(MUX, MUX.request(i, body=b"%d" % i)) for i in range(5)]
        for r in reqs:
            pool.send(r)  # all queued behind the first connect
        await until(lambda: all(r.finished for r in reqs))
        assert all(
            r.response is not None and bytes(r.response.body) == b"a:%d" % i for i, r in enumerate(reqs)
        )
        assert srv.connections == 3  # 2 + 2 + 1
        await until(lambda: val(store, "cluster.c.upstream_cx_active") == 1)
        srv.close()

    run(main)


def _never_reading_server() -> socket.socket:
    """A listener whose connections are accepted (by the kernel) and never read."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_oneways_to_an_upstream_that_does_not_read_stay_within_the_buffer_limit() -> None:
    """Oneways finish once written, so max_requests does not bound them: over the connection's
    write high-water mark they are dropped (overflow) rather than buffered without end."""

    async def main() -> None:
        lsock = _never_reading_server()
        store = Store()
        limit = 64 * 1024
        c = make_cluster(store, [lsock.getsockname()[1]], per_connection_buffer_limit_bytes=limit)
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        first = Req(MUX, MUX.request(1, oneway=True, body=b"x"))
        pool.send(first)
        await until(lambda: first.sent)
        body = b"y" * 60000
        reqs = [Req(MUX, MUX.request(i, oneway=True, body=body)) for i in range(500)]  # 30 MB
        conn = pool.conns[0]
        turn = 5  # oneways per loop turn (a multiplexed connection writes a turn's frames at once)
        for at in range(0, len(reqs), turn):
            for r in reqs[at : at + turn]:
                pool.send(r)
            await asyncio.sleep(0)
            assert conn.transport.get_write_buffer_size() <= limit + turn * 61000
        dropped = [r for r in reqs if r.failure is not None]
        assert dropped and all(r.failure[0] == Reason.OVERFLOW for r in dropped)  # type: ignore[index]
        assert val(store, "cluster.c.upstream_rq_pending_overflow") == len(dropped)
        assert val(store, "cluster.c.upstream_rq_active") == 0
        lsock.close()

    run(main)


def test_heartbeat_flood_from_an_upstream_that_does_not_read_is_not_buffered() -> None:
    """Answers to an upstream's heartbeats are skipped while it does not read what it is sent."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        flood = MUX.heartbeat_request(3) * 20000  # 360 KB a write
        writes = 40

        class Flooder(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                transport.pause_reading()  # never reads what the proxy sends
                for _ in range(writes):
                    transport.write(flood)

        server = await loop.create_server(Flooder, "127.0.0.1", 0)
        store = Store()
        limit = 16 * 1024
        c = make_cluster(store, [server.sockets[0].getsockname()[1]], per_connection_buffer_limit_bytes=limit)
        pool = rpc.pool_for(c.choose_host(), MUX, loop)
        r = Req(MUX, MUX.request(1, body=b"x"))
        pool.send(r)
        total = len(flood) * writes
        await until(lambda: val(store, "cluster.c.upstream_cx_rx_bytes_total") >= total, timeout=20)
        conn = pool.conns[0]
        assert not conn.closed
        assert conn.transport.get_write_buffer_size() <= limit + len(flood)
        server.close()

    run(main)


def test_upstream_request_ids_wrap_around_skipping_ids_in_flight() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "a")
        store = Store()
        c = make_cluster(store, [srv.port])
        pool = rpc.pool_for(c.choose_host(), MUX, asyncio.get_running_loop())
        first = Req(MUX, MUX.request(1, method="sleep", body=b"0.2"))
        pool.send(first)
        await until(lambda: first.up_state == rpc.IN_FLIGHT and first.up_conn is not None)
        conn = first.up_conn
        assert first.up_id == 1
        conn.next_id = rpc.MAX_ID - 1
        reqs = [Req(MUX, MUX.request(7, body=b"%d" % i)) for i in range(3)]
        for r in reqs:
            pool.send(r)
        assert [r.up_id for r in reqs] == [rpc.MAX_ID, 2, 3]  # 1 is still in flight
        await until(lambda: first.finished and all(r.finished for r in reqs))
        assert [bytes(r.response.body) for r in reqs] == [b"a:0", b"a:1", b"a:2"]
        assert bytes(first.response.body) == b"a:slept"
        srv.close()

    run(main)
