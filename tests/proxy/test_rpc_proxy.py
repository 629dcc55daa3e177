"""moorline.proxy.rpc_proxy: routing, timeouts, retries, local replies, stats and config errors,
with the test codecs of moorline.testing.xcodecs over loopback (real STATIC clusters)."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2

from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.net.conn_info import ConnInfo
from moorline.net.listener import Listener
from moorline.observability.stats import Store
from moorline.protocol.xprotocol.api import FrameKind, Reason
from moorline.proxy import rpc_proxy
from moorline.testing import xcodecs
from moorline.testing.xcodecs import MUX, PINGPONG, STATUS_OF, run, static_cluster, until
from moorline.testing.xcodecs import stat_value as val
from moorline.upstream.cluster import Cluster

TABLE = {c.name: c for c in xcodecs.CODECS}


def make_cluster(store: Store, name: str, ports: list[int], **extra: Any) -> Cluster:
    return static_cluster(store, name, ports, **extra)


class FakeCM:
    def __init__(self, *clusters: Cluster) -> None:
        self.clusters = {c.name: c for c in clusters}

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


class Front:
    """A proxy listening on loopback (the RpcServerConnection factory on an asyncio server)."""

    def __init__(self, proxy: rpc_proxy.RpcProxy, server: asyncio.Server) -> None:
        self.proxy = proxy
        self.server = server
        self.port = int(server.sockets[0].getsockname()[1])

    async def client(self, codec: Any = MUX) -> xcodecs.RpcTestClient:
        return await xcodecs.connect_client(codec, self.port)


async def front(
    store: Store,
    clusters: list[Cluster],
    value: dict[str, Any],
    ctx: Any = None,
    buffer_limit: int = 1 << 20,
    rcvbuf: int = 0,
) -> Front:
    ctx = ctx or BuildContext(stats=store, cluster_manager=FakeCM(*clusters))
    value = {"stat_prefix": "t", "protocol": "xmux", **value}
    proxy = rpc_proxy.RpcProxy(value, ctx, "v", codecs=TABLE)
    loop = asyncio.get_running_loop()

    def make() -> Any:
        return proxy.protocol(ConnInfo(("127.0.0.1", 0), ("127.0.0.1", 0), "l", buffer_limit=buffer_limit))

    lsock = socket.socket()
    if rcvbuf:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # accepted sockets inherit it
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    lsock.bind(("127.0.0.1", 0))
    server = await loop.create_server(make, sock=lsock)
    return Front(proxy, server)


def route(cluster: str, **kw: Any) -> dict[str, Any]:
    return {"route": {"cluster": cluster, **kw}}


async def ask(cl: xcodecs.RpcTestClient, raw: bytes, rid: int) -> Any:
    cl.send(raw)
    await until(lambda: cl.by_id(rid) is not None)
    return cl.by_id(rid)


def test_two_clients_with_the_same_ids_share_one_upstream_connection() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "up")
        store = Store()
        f = await front(store, [make_cluster(store, "c", [srv.port])], {"routes": [route("c")]})
        a, b = await f.client(), await f.client()
        for i in range(1, 6):
            a.send(MUX.request(i, body=b"a%d" % i))
            b.send(MUX.request(i, body=b"b%d" % i))
        await until(lambda: len(a.frames) == 5 and len(b.frames) == 5)
        for i in range(1, 6):
            assert bytes(a.by_id(i).body) == b"up:a%d" % i  # type: ignore[union-attr]
            assert bytes(b.by_id(i).body) == b"up:b%d" % i  # type: ignore[union-attr]
        assert srv.connections == 1
        assert len({fr.request_id for fr in srv.received}) == 10  # rewritten ids, all distinct
        assert val(store, "rpc_proxy.t.request") == 10
        assert val(store, "rpc_proxy.t.response_success") == 10
        assert val(store, "rpc_proxy.t.cx_active") == 2
        assert val(store, "cluster.c.upstream_rq_total") == 10
        assert val(store, "cluster.c.upstream_rq_active") == 0
        srv.close()

    run(main)


def test_oneway_and_heartbeat() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "up")
        store = Store()
        f = await front(store, [make_cluster(store, "c", [srv.port])], {"routes": [route("c")]})
        cl = await f.client()
        cl.send(MUX.request(1, oneway=True, body=b"fire"))
        cl.send(MUX.heartbeat_request(2))
        await until(lambda: len(srv.received) == 1 and len(cl.frames) == 1)
        assert srv.received[0].kind == FrameKind.ONEWAY and bytes(srv.received[0].body) == b"fire"
        assert cl.frames[0].kind == FrameKind.HEARTBEAT_RESPONSE and cl.frames[0].request_id == 2
        # A later request is answered: the oneway got no reply of its own.
        r = await ask(cl, MUX.request(3), 3)
        assert r.status == 0 and len(cl.frames) == 2
        assert val(store, "rpc_proxy.t.oneway") == 1
        assert val(store, "rpc_proxy.t.heartbeat") == 1
        assert val(store, "cluster.c.upstream_rq_active") == 0
        srv.close()

    run(main)


def test_routes_by_service_method_and_header() -> None:
    async def main() -> None:
        s1, s2, s3, s4 = [await xcodecs.serve(MUX, n) for n in ("svc", "meth", "hdr", "any")]
        store = Store()
        clusters = [make_cluster(store, s.name, [s.port]) for s in (s1, s2, s3, s4)]
        routes = [
            {"match": {"service": {"exact": "com.a.Hello:1.0"}}, **route("svc")},
            {"match": {"method": {"prefix": "say"}}, **route("meth")},
            {"match": {"headers": [{"name": "tenant", "regex": "a+"}]}, **route("hdr")},
            {"match": {"headers": [{"name": "tenant", "present": False}]}, **route("any")},
        ]
        f = await front(store, clusters, {"routes": routes})
        cl = await f.client()
        cases = [
            (MUX.request(1, service="com.a.Hello:1.0"), "svc"),
            (MUX.request(2, method="sayHi"), "meth"),
            (MUX.request(3, headers={"tenant": "aaa"}), "hdr"),
            (MUX.request(4), "any"),
        ]
        for raw, want in cases:
            rid = MUX.decode(raw).request_id
            r = await ask(cl, raw, rid)
            assert bytes(r.body).split(b":")[0] == want.encode()
        # Nothing matches: NO_ROUTE.
        r = await ask(cl, MUX.request(5, headers={"tenant": "b"}), 5)
        assert r.status == STATUS_OF[Reason.NO_ROUTE]
        assert val(store, "rpc_proxy.t.local_reply.no_route") == 1
        # Per service and method (":" sanitized as Envoy does).
        hello = "rpc_proxy.t.service.com.a.Hello_1.0.method.echo."
        assert val(store, hello + "request") == 1 and val(store, hello + "response_success") == 1
        assert val(store, "rpc_proxy.t.service.svc.method.sayHi.request") == 1
        # svc/echo: the header-routed, the catch-all and the NO_ROUTE request (answered here).
        assert val(store, "rpc_proxy.t.service.svc.method.echo.request") == 3
        assert val(store, "rpc_proxy.t.service.svc.method.echo.response_success") == 2
        assert val(store, "rpc_proxy.t.service.svc.method.echo.local_reply") == 1
        for s in (s1, s2, s3, s4):
            s.close()

    run(main)


def test_weighted_clusters() -> None:
    async def main() -> None:
        sa, sb = await xcodecs.serve(MUX, "a"), await xcodecs.serve(MUX, "b")
        store = Store()
        clusters = [make_cluster(store, "a", [sa.port]), make_cluster(store, "b", [sb.port])]
        wc = {"clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}
        f = await front(store, clusters, {"routes": [{"route": {"weighted_clusters": wc}}]})
        f.proxy.rng = random.Random(3)
        cl = await f.client()
        for i in range(1, 41):
            cl.send(MUX.request(i))
        await until(lambda: len(cl.frames) == 40)
        got = [bytes(fr.body).split(b":")[0] for fr in cl.frames]
        assert got.count(b"a") > 0 and got.count(b"b") > got.count(b"a")
        assert val(store, "cluster.a.upstream_rq_total") == got.count(b"a")
        sa.close()
        sb.close()

    run(main)


def test_timeout_replies_and_drops_the_late_response() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "up")
        store = Store()
        routes = [
            {"match": {"service": {"exact": "own"}}, **route("c")},  # the frame's own timeout
            route("c", timeout="0.05s"),
        ]
        f = await front(store, [make_cluster(store, "c", [srv.port])], {"routes": routes})
        cl = await f.client()
        r = await ask(cl, MUX.request(1, method="sleep", body=b"0.3"), 1)
        assert r.status == STATUS_OF[Reason.TIMEOUT]
        r = await ask(cl, MUX.request(2, service="own", method="sleep", body=b"0.3", timeout_ms=50), 2)
        assert r.status == STATUS_OF[Reason.TIMEOUT]
        await until(lambda: val(store, "cluster.c.rpc.upstream_rq_unknown_id") == 2)
        assert len(cl.frames) == 2  # the late answers never reached the client
        assert val(store, "rpc_proxy.t.request_timeout") == 2
        assert val(store, "cluster.c.upstream_rq_timeout") == 2
        assert val(store, "cluster.c.upstream_rq_active") == 0
        srv.close()

    run(main)


def test_upstream_dies_mid_request_is_an_upstream_reset_reply() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "up")
        store = Store()
        f = await front(store, [make_cluster(store, "c", [srv.port])], {"routes": [route("c")]})
        cl = await f.client()
        cl.send(MUX.request(1, method="sleep", body=b"5"))
        cl.send(MUX.request(2, method="close"))
        await until(lambda: len(cl.frames) == 2)
        assert {fr.status for fr in cl.frames} == {STATUS_OF[Reason.UPSTREAM_RESET]}
        assert val(store, "rpc_proxy.t.local_reply.upstream_reset") == 2
        srv.close()

    run(main)


def test_retry_on_connect_failure_goes_to_another_host() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "good")
        store = Store()
        c = make_cluster(store, "c", [refused_port(), srv.port])
        nr = make_cluster(store, "nr", [refused_port()])
        routes = [
            {"match": {"service": {"exact": "noretry"}}, **route("nr")},
            route("c", retry_policy={"num_retries": 1, "retry_on": ["connect_failure"]}),
        ]
        f = await front(store, [c, nr], {"routes": routes})
        cl = await f.client()
        for i in range(1, 5):
            r = await ask(cl, MUX.request(i), i)
            assert bytes(r.body) == b"good:"
        assert val(store, "cluster.c.upstream_rq_retry") >= 1
        assert val(store, "cluster.c.upstream_cx_connect_fail") >= 1
        r = await ask(cl, MUX.request(9, service="noretry"), 9)
        assert r.status == STATUS_OF[Reason.UPSTREAM_RESET]
        srv.close()

    run(main)


def test_retries_within_the_max_retries_circuit_breaker() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "good")
        store = Store()
        cb = {"thresholds": [{"max_retries": 0}]}
        c = make_cluster(store, "c", [refused_port(), srv.port], circuit_breakers=cb)
        rp = {"num_retries": 1, "retry_on": ["connect_failure"]}
        f = await front(store, [c], {"routes": [route("c", retry_policy=rp)]})
        cl = await f.client()
        r = await ask(cl, MUX.request(1), 1)  # round robin: the refused host first
        assert r.status == STATUS_OF[Reason.UPSTREAM_RESET]
        assert val(store, "cluster.c.upstream_rq_retry_overflow") == 1
        assert val(store, "cluster.c.upstream_rq_retry") == 0
        assert c.active_retries == 0
        srv.close()

    run(main)


def test_retry_on_retriable_status_and_outlier_reports() -> None:
    async def main() -> None:
        busy = await xcodecs.serve(MUX, "busy", always=xcodecs.STATUS_BUSY)
        good = await xcodecs.serve(MUX, "good")
        store = Store()
        od = {
            "consecutive_5xx": 2,
            "interval": "10s",
            "base_ejection_time": "30s",
            "max_ejection_percent": 100,
        }
        c = make_cluster(store, "c", [busy.port, good.port], outlier_detection=od)
        rp = {"num_retries": 1, "retry_on": ["retriable_status"]}
        f = await front(store, [c], {"routes": [route("c", retry_policy=rp)]})
        cl = await f.client()
        for i in range(1, 5):
            r = await ask(cl, MUX.request(i), i)
            assert bytes(r.body) == b"good:" and r.status == 0
        busy_host = next(h for h in c.hosts if h.port == busy.port)
        assert busy_host.outlier_ejected  # two 503-like answers in a row
        assert val(store, "rpc_proxy.t.retry") >= 2
        assert val(store, "cluster.c.upstream_rq_retry_success") == val(store, "rpc_proxy.t.retry")
        assert c.active_retries == 0  # every retry slot given back
        busy.close()
        good.close()

    run(main)


def test_no_healthy_upstream_and_unknown_cluster() -> None:
    async def main() -> None:
        store = Store()
        empty = make_cluster(store, "empty", [])
        routes = [{"match": {"method": {"exact": "x"}}, **route("missing")}, route("empty")]
        f = await front(store, [empty], {"routes": routes})
        cl = await f.client()
        r = await ask(cl, MUX.request(1), 1)
        assert r.status == STATUS_OF[Reason.NO_HEALTHY_UPSTREAM]
        r = await ask(cl, MUX.request(2, method="x"), 2)
        assert r.status == STATUS_OF[Reason.NO_ROUTE] and b"missing" in bytes(r.body)
        assert val(store, "rpc_proxy.t.local_reply.no_healthy_upstream") == 1

    run(main)


def test_overflow_per_connection_and_circuit_breaker() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "up")
        store = Store()
        c = make_cluster(store, "c", [srv.port])
        cb = make_cluster(store, "cb", [srv.port], circuit_breakers={"thresholds": [{"max_requests": 1}]})
        routes = [{"match": {"service": {"exact": "cb"}}, **route("cb")}, route("c")]
        f = await front(store, [c, cb], {"routes": routes, "max_pending_per_connection": 1})
        cl = await f.client()
        cl.send(MUX.request(1, method="sleep", body=b"0.1") + MUX.request(2))
        await until(lambda: len(cl.frames) == 2)
        assert cl.by_id(2).status == STATUS_OF[Reason.OVERFLOW]  # type: ignore[union-attr]
        assert cl.by_id(1).status == 0  # type: ignore[union-attr]
        c1, c2 = await f.client(), await f.client()
        c1.send(MUX.request(1, service="cb", method="sleep", body=b"0.1"))
        await until(lambda: val(store, "cluster.cb.upstream_rq_active") == 1)
        r = await ask(c2, MUX.request(1, service="cb"), 1)
        assert r.status == STATUS_OF[Reason.OVERFLOW]
        assert val(store, "cluster.cb.upstream_rq_pending_overflow") == 1
        assert val(store, "rpc_proxy.t.local_reply.overflow") == 2
        srv.close()

    run(main)


def test_codec_error_replies_then_closes() -> None:
    async def main() -> None:
        store = Store()
        f = await front(store, [], {"routes": []})
        cl = await f.client()
        cl.send(MUX.response(4, b"not a request"))
        await until(lambda: cl.closed)
        assert cl.frames[0].request_id == 4 and cl.frames[0].status == STATUS_OF[Reason.CODEC_ERROR]
        assert val(store, "rpc_proxy.t.codec_error") == 1
        await until(lambda: val(store, "rpc_proxy.t.cx_active") == 0)
        assert f.proxy.active_connections() == 0

    run(main)


def test_downstream_gone_cancels_upstream_requests() -> None:
    async def main() -> None:
        srv = await xcodecs.serve(PINGPONG, "up")
        store = Store()
        f = await front(
            store, [make_cluster(store, "c", [srv.port])], {"protocol": "xpp", "routes": [route("c")]}
        )
        cl = await f.client(PINGPONG)
        cl.send(PINGPONG.request(1, method="sleep", body=b"5"))
        await until(lambda: len(srv.received) == 1)
        cl.transport.close()
        await until(lambda: val(store, "cluster.c.upstream_rq_active") == 0)
        assert val(store, "cluster.c.upstream_rq_cancelled") == 1
        # The ping-pong connection of the abandoned request is closed, not reused.
        await until(lambda: val(store, "cluster.c.upstream_cx_active") == 0)
        srv.close()

    run(main)


def test_auto_protocol_sniffs_each_connection() -> None:
    async def main() -> None:
        sm, sp = await xcodecs.serve(MUX, "m"), await xcodecs.serve(PINGPONG, "p")
        store = Store()
        clusters = [make_cluster(store, "m", [sm.port]), make_cluster(store, "p", [sp.port])]
        routes = [{"match": {"service": {"exact": "m"}}, **route("m")}, route("p")]
        f = await front(store, clusters, {"protocol": "auto", "routes": routes})
        a, b = await f.client(MUX), await f.client(PINGPONG)
        ra = await ask(a, MUX.request(1, service="m"), 1)
        rb = await ask(b, PINGPONG.request(1, service="p"), 1)
        assert bytes(ra.body) == b"m:" and bytes(rb.body) == b"p:"
        sm.close()
        sp.close()

    run(main)


def test_a_client_that_does_not_read_stops_being_read() -> None:
    """Answers wait in the downstream write buffer only up to its high-water mark plus the
    requests in flight: above it the client's requests are not read (small socket buffers on
    both sides, so the kernel cannot take the whole burst)."""

    async def main() -> None:
        srv = await xcodecs.serve(MUX, "up")
        store = Store()
        value = {"routes": [route("c")]}
        f = await front(
            store, [make_cluster(store, "c", [srv.port])], value, buffer_limit=64 * 1024, rcvbuf=65536
        )
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(("127.0.0.1", f.port))
        sock.setblocking(False)
        _, cl = await loop.create_connection(lambda: xcodecs.RpcTestClient(MUX), sock=sock)
        cl.transport.pause_reading()
        body = b"x" * 65536
        n = 200  # 13 MB each way
        cl.send(b"".join(MUX.request(i, body=body) for i in range(1, n + 1)))
        (conn,) = f.proxy.conns
        await until(lambda: conn.write_paused and not conn.active)
        assert len(srv.received) < n  # the rest waits, unread, in the client's buffers
        cl.transport.resume_reading()
        await until(lambda: len(cl.frames) == n, timeout=20)
        assert [fr.request_id for fr in cl.frames] == list(range(1, n + 1))
        assert {fr.status for fr in cl.frames} == {0}
        srv.close()

    run(main)


def test_access_log_rpc_fields(tmp_path: Path) -> None:
    async def main() -> None:
        srv = await xcodecs.serve(MUX, "up")
        store = Store()
        out = tmp_path / "access.log"
        fmt = "%RPC_PROTOCOL% %RPC_SERVICE% %RPC_METHOD% %RPC_STATUS% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER%\n"
        al = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(out),
                    "log_format": {"text_format_source": {"inline_string": fmt}},
                },
            }
        ]
        routes = [{"match": {"method": {"exact": "echo"}}, **route("c")}]
        f = await front(store, [make_cluster(store, "c", [srv.port])], {"routes": routes, "access_log": al})
        cl = await f.client()
        await ask(cl, MUX.request(1, service="S", method="echo"), 1)
        await ask(cl, MUX.request(2, service="S", method="nope"), 2)
        await until(lambda: out.exists() and len(out.read_text().splitlines()) == 2)
        assert out.read_text().splitlines() == ["xmux S echo 0 - c", "xmux S nope - NR -"]
        srv.close()

    run(main)


# -- config -------------------------------------------------------------------------------------


def listener(value: dict[str, Any], store: Store | None = None) -> Listener:
    d = {
        "name": "rpc",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": rpc_proxy.NAME,
                        "typed_config": {
                            "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                            "type_url": rpc_proxy.TYPE_URL,
                            "value": value,
                        },
                    }
                ]
            }
        ],
    }
    ctx = BuildContext(stats=store or Store())
    return Listener(parse_message(d, listener_pb2.Listener, "listeners[0]"), ctx, "listeners[0]")


P = "listeners[0].filter_chains[0].filters[0].typed_config.value"


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"protocol": "xmux"}, f"{P}.stat_prefix"),
        ({"stat_prefix": "t", "protocol": "nosuch"}, f"{P}.protocol"),
        ({"stat_prefix": "t", "protocol": "xmux", "extra": 1}, f"{P}.extra"),
        ({"stat_prefix": "t", "protocol": "xmux", "routes": [{"match": {}}]}, f"{P}.routes[0].route"),
        (
            {"stat_prefix": "t", "protocol": "xmux", "routes": [{"route": {"cluster": "c", "timeout": "3"}}]},
            f"{P}.routes[0].route.timeout",
        ),
        (
            {
                "stat_prefix": "t",
                "protocol": "xmux",
                "routes": [{"match": {"service": {"regex": "("}}, "route": {"cluster": "c"}}],
            },
            f"{P}.routes[0].match.service.regex",
        ),
        (
            {
                "stat_prefix": "t",
                "protocol": "xmux",
                "routes": [{"match": {"headers": [{"exact": "a"}]}, "route": {"cluster": "c"}}],
            },
            f"{P}.routes[0].match.headers[0].name",
        ),
        (
            {
                "stat_prefix": "t",
                "protocol": "xmux",
                "routes": [{"route": {"weighted_clusters": {"clusters": [{"name": "a", "weight": 0}]}}}],
            },
            f"{P}.routes[0].route.weighted_clusters.clusters[0].weight",
        ),
        (
            {
                "stat_prefix": "t",
                "protocol": "xmux",
                "routes": [{"route": {"cluster": "c", "retry_policy": {"retry_on": ["5xx"]}}}],
            },
            f"{P}.routes[0].route.retry_policy.retry_on[0]",
        ),
        (
            {"stat_prefix": "t", "protocol": "xmux", "max_pending_per_connection": 0},
            f"{P}.max_pending_per_connection",
        ),
    ],
)
def test_bad_configs_name_the_field(
    value: dict[str, Any], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moorline.protocol import xprotocol

    monkeypatch.setattr(xprotocol, "builtin_codecs", lambda: dict(TABLE))
    with pytest.raises(ConfigError) as ei:
        listener(value)
    assert ei.value.path == path, str(ei.value)


def test_typed_struct_config_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from moorline.protocol import xprotocol

    monkeypatch.setattr(xprotocol, "builtin_codecs", lambda: dict(TABLE))
    value = {
        "stat_prefix": "t",
        "protocol": "xmux",
        "routes": [
            {"route": {"weighted_clusters": {"clusters": [{"name": "a", "weight": 2}]}, "timeout": "1.5s"}}
        ],
    }
    lst = listener(value)
    proxy = lst.selector.chains[0].terminal
    assert isinstance(proxy, rpc_proxy.RpcProxy)
    assert proxy.codec is MUX
    assert proxy.routes[0].cum == [2] and proxy.routes[0].timeout == 1.5


def test_service_stats_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc_proxy, "MAX_SERVICE_STATS", 2)

    async def main() -> None:
        s = await xcodecs.serve(MUX, "a")
        store = Store()
        f = await front(store, [make_cluster(store, "a", [s.port])], {"routes": [route("a")]})
        cl = await f.client()
        for i, name in enumerate(("s1", "s2", "s3", "s4"), 1):
            await ask(cl, MUX.request(i, service=name), i)
        assert val(store, "rpc_proxy.t.service.s1.method.echo.request") == 1
        assert val(store, "rpc_proxy.t.service.s2.method.echo.request") == 1
        assert store.get("rpc_proxy.t.service.s3.method.echo.request") is None
        assert val(store, "rpc_proxy.t.service.other.method.other.request") == 2
        s.close()

    run(main)


def test_drain_closes_idle_connections_now_and_busy_ones_after_their_answer() -> None:
    # A draining server waits for requests, not for connections (RPC clients keep theirs for
    # good): drain() closes the idle one at once and the busy one right after its answer.
    async def main() -> None:
        s = await xcodecs.serve(MUX, "a")
        store = Store()
        f = await front(store, [make_cluster(store, "a", [s.port])], {"routes": [route("a")]})
        idle, busy = await f.client(), await f.client()
        await ask(idle, MUX.request(1), 1)
        busy.send(MUX.request(2, method="sleep", body=b"0.3"))
        await until(lambda: f.proxy.active_requests() == 1)
        f.proxy.drain()
        await until(lambda: idle.closed)
        assert f.proxy.active_connections() >= 1  # the busy one stays for its answer
        await until(lambda: busy.by_id(2) is not None)
        assert bytes(busy.by_id(2).body) == b"a:slept"
        await until(lambda: f.proxy.active_connections() == 0)
        assert f.proxy.active_requests() == 0
        s.close()

    run(main)


def test_idle_client_connections_close_after_the_idle_timeout() -> None:
    # Quiet and with nothing in flight: closed. Waiting for an answer, or sending heartbeats:
    # kept (a heartbeat is traffic).
    async def main() -> None:
        s = await xcodecs.serve(MUX, "a")
        store = Store()
        f = await front(
            store, [make_cluster(store, "a", [s.port])], {"routes": [route("a")], "idle_timeout": "1s"}
        )
        quiet, busy, beating = await f.client(), await f.client(), await f.client()
        await ask(quiet, MUX.request(1), 1)
        busy.send(MUX.request(2, method="sleep", body=b"30"))
        await until(lambda: f.proxy.active_requests() == 1)
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while not quiet.closed:
            assert loop.time() < end, "the quiet connection was never closed"
            beating.send(xcodecs.encode(MUX.magic, FrameKind.HEARTBEAT, 99))
            await asyncio.sleep(0.05)
        assert not beating.closed and not busy.closed
        assert f.proxy.active_requests() == 1
        assert val(store, "rpc_proxy.t.idle_timeout") == 1
        s.close()

    run(main)


def test_idle_timeout_is_a_duration() -> None:
    store = Store()
    with pytest.raises(ConfigError) as ei:
        rpc_proxy.RpcProxy(
            {"stat_prefix": "t", "protocol": "xmux", "idle_timeout": 5},
            BuildContext(stats=store, cluster_manager=FakeCM()),
            "v",
            codecs=TABLE,
        )
    assert ei.value.path == "v.idle_timeout"
