"""tcp_proxy end to end: Listener + tcp_proxy + real upstream servers on loopback, uvloop.

The cluster manager is a small fake with the attributes tcp_proxy uses (docs/INTERNALS.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format

import moorline.proxy.tcp_proxy as tcp_proxy_mod  # registers the filter
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.net.listener import Listener
from moorline.observability.stats import Counter, Gauge, Histogram, Store

TYPE = "type.googleapis.com/" + tcp_proxy_mod.TCP_PROXY_TYPE
MODES = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]


# --- fakes -----------------------------------------------------------------------------------------


class FakeStats:
    COUNTERS = (
        "upstream_cx_total",
        "upstream_cx_connect_fail",
        "upstream_cx_connect_timeout",
        "upstream_cx_destroy",
        "upstream_cx_rx_bytes_total",
        "upstream_cx_tx_bytes_total",
        "upstream_cx_none_healthy",
        "upstream_cx_overflow",
    )

    def __init__(self, store: Store, name: str) -> None:
        scope = store.scope(f"cluster.{name}.")
        for n in self.COUNTERS:
            setattr(self, n, scope.counter(n))
        self.upstream_cx_active: Gauge = scope.gauge("upstream_cx_active")
        self.upstream_cx_connect_ms: Histogram = scope.histogram("upstream_cx_connect_ms")
        self.upstream_cx_total: Counter
        self.upstream_cx_connect_fail: Counter
        self.upstream_cx_connect_timeout: Counter
        self.upstream_cx_destroy: Counter
        self.upstream_cx_rx_bytes_total: Counter
        self.upstream_cx_tx_bytes_total: Counter
        self.upstream_cx_none_healthy: Counter
        self.upstream_cx_overflow: Counter


class FakeHost:
    def __init__(self, address: str, port: int | None) -> None:
        self.address = address
        self.port = port
        self.family = (
            socket.AF_UNIX if port is None else (socket.AF_INET6 if ":" in address else socket.AF_INET)
        )


class FakeCluster:
    """Hands out hosts in order, skipping excluded ones."""

    def __init__(self, store: Store, name: str, hosts: list[FakeHost], connect_timeout: float = 2.0) -> None:
        self.name = name
        self.stats = FakeStats(store, name)
        self.hosts = hosts
        self.connect_timeout = connect_timeout
        self.per_connection_buffer_limit = 1024 * 1024
        self.tcp_keepalive = (3, 30, 5)
        self.max_connections = 1024
        self.high = SimpleNamespace(cx_active=0)  # connections opened by HIGH requests
        self.chosen: list[FakeHost] = []

    def choose_host(self, exclude: Any = None, context: Any = None) -> FakeHost | None:
        for h in self.hosts:
            if not exclude or h not in exclude:
                self.chosen.append(h)
                return h
        return None


class FakeCM:
    def __init__(self, *clusters: FakeCluster) -> None:
        self.clusters = {c.name: c for c in clusters}

    def get(self, name: str) -> FakeCluster | None:
        return self.clusters.get(name)


# --- helpers ---------------------------------------------------------------------------------------


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(coro_fn())


def val(store: Store, name: str) -> int:
    s = store.get(name)
    assert s is not None, name
    return s.value  # type: ignore[union-attr]


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def make_proxy(store: Store, cm: FakeCM, proxy_cfg: dict[str, Any]) -> Listener:
    d = {
        "name": "tcp",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.tcp_proxy", "typed_config": {"@type": TYPE, **proxy_cfg}}
                ]
            }
        ],
    }
    ctx = BuildContext(stats=store, cluster_manager=cm)
    lst = Listener(json_format.ParseDict(d, listener_pb2.Listener()), ctx, "listeners[0]")
    await lst.start(asyncio.get_running_loop())
    return lst


def proxy_of(lst: Listener) -> tcp_proxy_mod.TcpProxy:
    t = lst.selector.chains[0].terminal
    assert isinstance(t, tcp_proxy_mod.TcpProxy)
    return t


async def sha_server() -> tuple[asyncio.Server, int]:
    """Reads until EOF, answers ``<count> <sha256>`` and closes."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        n = 0
        while True:
            d = await r.read(256 * 1024)
            if not d:
                break
            n += len(d)
            h.update(d)
        w.write(f"{n} {h.hexdigest()}".encode())
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def hello_server(text: bytes, path: str | None = None) -> tuple[asyncio.Server, int]:
    """Says ``text``, then echoes until EOF."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(text)
        while True:
            d = await r.read(65536)
            if not d:
                break
            w.write(d)
        await w.drain()
        w.close()

    if path is not None:
        srv = await asyncio.start_unix_server(handle, path)
        return srv, 0
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def client(port: int, data: bytes = b"", shut: bool = True) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    if data:
        w.write(data)
        await w.drain()
    if shut:
        w.write_eof()
    got = await asyncio.wait_for(r.read(), 10)
    w.close()
    return got


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_splice", MODES)
def test_end_to_end_bytes_and_stats(use_splice: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not use_splice:
        monkeypatch.setenv("MOORLINE_NO_SPLICE", "1")
    store = Store()
    data = os.urandom(5 * 1024 * 1024)

    async def main() -> None:
        srv, up_port = await sha_server()
        cluster = FakeCluster(store, "c1", [FakeHost("127.0.0.1", up_port)])
        lst = await make_proxy(store, FakeCM(cluster), {"stat_prefix": "t", "cluster": "c1"})
        try:
            assert proxy_of(lst).use_splice == use_splice
            got = await client(lst.bound_address[2], data)  # type: ignore[arg-type]
            assert got == f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
            await until(lambda: val(store, "listener.127.0.0.1_0.downstream_cx_active") == 0)
            assert val(store, "tcp.t.downstream_cx_total") == 1
            assert val(store, "tcp.t.downstream_cx_rx_bytes_total") == len(data)
            assert val(store, "tcp.t.downstream_cx_tx_bytes_total") == len(got)
            assert val(store, "cluster.c1.upstream_cx_total") == 1
            assert val(store, "cluster.c1.upstream_cx_active") == 0
            assert val(store, "cluster.c1.upstream_cx_destroy") == 1
            assert val(store, "cluster.c1.upstream_cx_tx_bytes_total") == len(data)
            assert val(store, "cluster.c1.upstream_cx_rx_bytes_total") == len(got)
            assert val(store, "cluster.c1.upstream_cx_connect_fail") == 0
            assert val(store, "listener.127.0.0.1_0.downstream_cx_destroy") == 1
            assert cluster.stats.upstream_cx_connect_ms.count == 1
            assert not proxy_of(lst).sessions
            assert proxy_of(lst).active_connections() == 0
            assert lst.filter_chains[0].terminal is proxy_of(lst)
        finally:
            lst.close()
            srv.close()

    run(main)


def test_weighted_clusters_pick_per_connection() -> None:
    store = Store()

    async def main() -> None:
        sa, pa = await hello_server(b"A")
        sb, pb = await hello_server(b"B")
        cm = FakeCM(
            FakeCluster(store, "a", [FakeHost("127.0.0.1", pa)]),
            FakeCluster(store, "b", [FakeHost("127.0.0.1", pb)]),
        )
        cfg = {
            "stat_prefix": "w",
            "weighted_clusters": {"clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]},
        }
        lst = await make_proxy(store, cm, cfg)
        try:
            port = lst.bound_address[2]
            seen = [await client(port) for _ in range(40)]  # type: ignore[arg-type]
            assert set(seen) == {b"A", b"B"}
            assert val(store, "cluster.a.upstream_cx_total") + val(store, "cluster.b.upstream_cx_total") == 40
            assert val(store, "cluster.a.upstream_cx_total") == seen.count(b"A")
        finally:
            lst.close()
            sa.close()
            sb.close()

    run(main)


def _refusing_port() -> tuple[socket.socket, int]:
    """A bound socket that does not listen: connects to it are refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def test_connect_attempts_move_to_next_host() -> None:
    store = Store()

    async def main() -> None:
        refusing, bad = _refusing_port()
        srv, good = await hello_server(b"hello ")
        cluster = FakeCluster(store, "c", [FakeHost("127.0.0.1", bad), FakeHost("127.0.0.1", good)])
        lst = await make_proxy(
            store, FakeCM(cluster), {"stat_prefix": "r", "cluster": "c", "max_connect_attempts": 2}
        )
        try:
            got = await client(lst.bound_address[2], b"world")  # type: ignore[arg-type]
            assert got == b"hello world"
            assert [h.port for h in cluster.chosen] == [bad, good]
            assert val(store, "cluster.c.upstream_cx_connect_fail") == 1
            assert val(store, "cluster.c.upstream_cx_total") == 2
            await until(lambda: val(store, "cluster.c.upstream_cx_active") == 0)
            assert val(store, "cluster.c.upstream_cx_destroy") == 2
            assert val(store, "tcp.r.upstream_cx_connect_attempts_exceeded") == 0
        finally:
            lst.close()
            srv.close()
            refusing.close()

    run(main)


def test_connect_failure_with_one_attempt_closes_downstream() -> None:
    store = Store()

    async def main() -> None:
        refusing, bad = _refusing_port()
        srv, good = await hello_server(b"never")
        cluster = FakeCluster(store, "c", [FakeHost("127.0.0.1", bad), FakeHost("127.0.0.1", good)])
        lst = await make_proxy(store, FakeCM(cluster), {"stat_prefix": "f", "cluster": "c"})
        try:
            got = await client(lst.bound_address[2], b"x", shut=False)  # type: ignore[arg-type]
            assert got == b""
            assert len(cluster.chosen) == 1
            assert val(store, "cluster.c.upstream_cx_connect_fail") == 1
            assert val(store, "cluster.c.upstream_cx_active") == 0
            assert val(store, "tcp.f.upstream_cx_connect_attempts_exceeded") == 1
            await until(lambda: val(store, "listener.127.0.0.1_0.downstream_cx_destroy") == 1)
            assert val(store, "listener.127.0.0.1_0.downstream_cx_active") == 0
        finally:
            lst.close()
            srv.close()
            refusing.close()

    run(main)


async def counting_echo() -> tuple[asyncio.Server, int, list[bytes]]:
    """Echoes until EOF; the list gets one entry per accepted connection (its first bytes)."""
    seen: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        i = len(seen)
        seen.append(b"")
        while d := await r.read(65536):
            seen[i] += d
            w.write(d)
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], seen


def test_max_connections_closes_the_session_over_the_limit() -> None:
    """Each session holds one of the cluster's max_connections: the third of two allowed is
    closed before any upstream connect (upstream_cx_overflow); a slot freed lets a new one in."""
    store = Store()

    async def main() -> None:
        srv, port, seen = await counting_echo()
        cluster = FakeCluster(store, "c", [FakeHost("127.0.0.1", port)])
        cluster.max_connections = 2
        lst = await make_proxy(store, FakeCM(cluster), {"stat_prefix": "mc", "cluster": "c"})
        lport = lst.bound_address[2]
        try:
            held = []
            for i in range(2):
                r, w = await asyncio.open_connection("127.0.0.1", lport)
                w.write(b"held%d" % i)
                assert await r.readexactly(5) == b"held%d" % i
                held.append((r, w))
            assert val(store, "cluster.c.upstream_cx_active") == 2
            got = await client(lport, b"third", shut=False)  # type: ignore[arg-type]
            assert got == b""
            assert val(store, "cluster.c.upstream_cx_overflow") == 1
            assert len(cluster.chosen) == 2  # no host was even picked for the third
            assert seen == [b"held0", b"held1"]
            assert val(store, "cluster.c.upstream_cx_total") == 2
            await until(lambda: val(store, "listener.127.0.0.1_0.downstream_cx_active") == 2)
            r, w = held.pop()
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            await until(lambda: val(store, "cluster.c.upstream_cx_active") == 1)
            assert await client(lport, b"fourth") == b"fourth"  # type: ignore[arg-type]
            assert val(store, "cluster.c.upstream_cx_overflow") == 1
            assert seen == [b"held0", b"held1", b"fourth"]
            for _r, w in held:
                w.close()
            await until(lambda: val(store, "cluster.c.upstream_cx_active") == 0)
        finally:
            lst.close()
            srv.close()

    run(main)


def test_failed_connect_attempt_gives_its_connection_back_before_the_retry() -> None:
    """max_connections 1 and two connect attempts: the refused first attempt does not hold the
    one slot, so the second attempt connects (no overflow)."""
    store = Store()

    async def main() -> None:
        refusing, bad = _refusing_port()
        srv, good = await hello_server(b"hello ")
        cluster = FakeCluster(store, "c", [FakeHost("127.0.0.1", bad), FakeHost("127.0.0.1", good)])
        cluster.max_connections = 1
        lst = await make_proxy(
            store, FakeCM(cluster), {"stat_prefix": "ma", "cluster": "c", "max_connect_attempts": 2}
        )
        try:
            got = await client(lst.bound_address[2], b"world")  # type: ignore[arg-type]
            assert got == b"hello world"
            assert [h.port for h in cluster.chosen] == [bad, good]
            assert val(store, "cluster.c.upstream_cx_overflow") == 0
            cluster.max_connections = 0
            assert await client(lst.bound_address[2], b"x", shut=False) == b""  # type: ignore[arg-type]
            assert val(store, "cluster.c.upstream_cx_overflow") == 1
            assert val(store, "tcp.ma.upstream_cx_connect_attempts_exceeded") == 0
        finally:
            lst.close()
            srv.close()
            refusing.close()

    run(main)


def test_connect_timeout() -> None:
    store = Store()

    async def main() -> None:
        # A listener that never accepts, its queue already full: SYNs are dropped.
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = socket.create_connection(("127.0.0.1", port), timeout=2)
        cluster = FakeCluster(store, "c", [FakeHost("127.0.0.1", port)], connect_timeout=0.3)
        lst = await make_proxy(store, FakeCM(cluster), {"stat_prefix": "ct", "cluster": "c"})
        try:
            assert await client(lst.bound_address[2], shut=False) == b""  # type: ignore[arg-type]
            assert val(store, "cluster.c.upstream_cx_connect_timeout") == 1
            assert val(store, "cluster.c.upstream_cx_connect_fail") == 1
            assert val(store, "cluster.c.upstream_cx_active") == 0
        finally:
            lst.close()
            queued.close()
            full.close()

    run(main)


def test_unknown_cluster_and_no_host() -> None:
    store = Store()

    async def main() -> None:
        empty = FakeCluster(store, "empty", [])
        lst = await make_proxy(store, FakeCM(empty), {"stat_prefix": "nr", "cluster": "missing"})
        lst2 = await make_proxy(store, FakeCM(empty), {"stat_prefix": "nh", "cluster": "empty"})
        try:
            assert await client(lst.bound_address[2], shut=False) == b""  # type: ignore[arg-type]
            assert val(store, "tcp.nr.downstream_cx_no_route") == 1
            assert await client(lst2.bound_address[2], shut=False) == b""  # type: ignore[arg-type]
            assert val(store, "cluster.empty.upstream_cx_none_healthy") == 1
            assert val(store, "tcp.nh.downstream_cx_no_route") == 0
        finally:
            lst.close()
            lst2.close()

    run(main)


def test_idle_timeout_and_max_duration() -> None:
    store = Store()

    async def main() -> None:
        srv, port = await hello_server(b"hi")
        cm = FakeCM(FakeCluster(store, "c", [FakeHost("127.0.0.1", port)]))
        idle = await make_proxy(store, cm, {"stat_prefix": "idle", "cluster": "c", "idle_timeout": "0.3s"})
        dur = await make_proxy(
            store,
            cm,
            {
                "stat_prefix": "dur",
                "cluster": "c",
                "idle_timeout": "0s",
                "max_downstream_connection_duration": "0.3s",
            },
        )
        try:
            assert await client(idle.bound_address[2], shut=False) == b"hi"  # type: ignore[arg-type]
            assert val(store, "tcp.idle.idle_timeout") == 1
            # idle_timeout 0 disables the idle timer; the duration limit still ends it.
            assert proxy_of(dur).idle_timeout is None
            r, w = await asyncio.open_connection("127.0.0.1", dur.bound_address[2])
            for _ in range(5):
                w.write(b"x")
                await asyncio.sleep(0.02)
            got = await asyncio.wait_for(r.read(), 5)
            assert got.startswith(b"hi")
            w.close()
            assert val(store, "tcp.dur.max_downstream_connection_duration") == 1
            assert val(store, "tcp.dur.idle_timeout") == 0
        finally:
            idle.close()
            dur.close()
            srv.close()

    run(main)


def test_pipe_upstream(tmp_path: Path) -> None:
    store = Store()
    path = str(tmp_path / "up.sock")

    async def main() -> None:
        srv, _ = await hello_server(b"pipe:", path=path)
        lst = await make_proxy(
            store,
            FakeCM(FakeCluster(store, "p", [FakeHost(path, None)])),
            {"stat_prefix": "p", "cluster": "p"},
        )
        try:
            assert await client(lst.bound_address[2], b"data") == b"pipe:data"  # type: ignore[arg-type]
        finally:
            lst.close()
            srv.close()

    run(main)


def test_config_errors_and_notices() -> None:
    store = Store()

    async def build(cfg: dict[str, Any]) -> Listener:
        return await make_proxy(store, FakeCM(), cfg)

    async def main() -> None:
        with pytest.raises(ConfigError) as ei:
            await build({"cluster": "c"})
        assert ei.value.path == "listeners[0].filter_chains[0].filters[0].typed_config.stat_prefix"
        with pytest.raises(ConfigError) as ei:
            await build({"stat_prefix": "x"})
        assert ei.value.path == "listeners[0].filter_chains[0].filters[0].typed_config"
        with pytest.raises(ConfigError) as ei:
            await build({"stat_prefix": "x", "weighted_clusters": {"clusters": [{"name": "a", "weight": 0}]}})
        assert ei.value.path.endswith("weighted_clusters.clusters[0].weight")
        ctx = BuildContext(stats=store, cluster_manager=FakeCM())
        tp = tcp_proxy_mod.TcpProxy(
            json_format.ParseDict(
                {"stat_prefix": "n", "cluster": "c", "access_log": [{"name": "envoy.access_loggers.stdout"}]},
                tcp_proxy_mod.tcp_proxy_pb2.TcpProxy(),  # type: ignore[attr-defined]
            ),
            ctx,
            "p",
            use_splice=False,
        )
        assert tp.idle_timeout == tcp_proxy_mod.DEFAULT_IDLE_TIMEOUT
        assert tp.max_connect_attempts == 1
        assert any("access_log" in n for n in ctx.notices)

    run(main)


def test_iperf3_through_proxy() -> None:
    iperf = shutil.which("iperf3")
    if iperf is None:
        pytest.skip("iperf3 is not installed")
    store = Store()

    async def main() -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        server = await asyncio.create_subprocess_exec(
            iperf, "-s", "-1", "-B", "127.0.0.1", "-p", str(port), "--forceflush",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        lst = None
        try:
            assert server.stdout is not None
            while True:  # wait for "Server listening on <port>"
                line = await asyncio.wait_for(server.stdout.readline(), 10)
                assert line, "iperf3 server exited"
                if b"listening" in line:
                    break
            cm = FakeCM(FakeCluster(store, "iperf", [FakeHost("127.0.0.1", port)]))
            lst = await make_proxy(store, cm, {"stat_prefix": "iperf", "cluster": "iperf"})
            cli = await asyncio.create_subprocess_exec(
                iperf, "-c", "127.0.0.1", "-p", str(lst.bound_address[2]), "-t", "1", "-J",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(cli.communicate(), 20)
            assert cli.returncode == 0, (out[-2000:], err[-2000:])
            report = json.loads(out)
            assert report["end"]["sum_sent"]["bytes"] > 0
            assert report["end"]["sum_received"]["bytes"] > 0
            assert val(store, "tcp.iperf.downstream_cx_rx_bytes_total") > 0
        finally:
            if lst is not None:
                lst.close()
            if server.returncode is None:
                server.kill()
            await server.wait()

    run(main)


def test_close_all_ends_live_connections() -> None:
    store = Store()

    async def main() -> None:
        srv, port = await hello_server(b"hi")
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = socket.create_connection(full.getsockname(), timeout=2)
        cm = FakeCM(
            FakeCluster(store, "c", [FakeHost("127.0.0.1", port)]),
            FakeCluster(store, "slow", [FakeHost("127.0.0.1", full.getsockname()[1])], connect_timeout=30),
        )
        lst = await make_proxy(store, cm, {"stat_prefix": "ca", "cluster": "c"})
        slow = await make_proxy(store, cm, {"stat_prefix": "slow", "cluster": "slow"})
        try:
            r, w = await asyncio.open_connection("127.0.0.1", lst.bound_address[2])
            assert await r.readexactly(2) == b"hi"
            r2, w2 = await asyncio.open_connection("127.0.0.1", slow.bound_address[2])  # stays connecting
            await until(
                lambda: proxy_of(lst).active_connections() == 1 and proxy_of(slow).active_connections() == 1
            )
            proxy_of(lst).close_all()
            proxy_of(slow).close_all()
            assert await asyncio.wait_for(r.read(), 5) == b""
            assert await asyncio.wait_for(r2.read(), 5) == b""
            for name in ("c", "slow"):
                assert val(store, f"cluster.{name}.upstream_cx_active") == 0
                assert val(store, f"cluster.{name}.upstream_cx_destroy") == 1
            assert val(store, "listener.127.0.0.1_0.downstream_cx_active") == 0
            w.close()
            w2.close()
        finally:
            lst.close()
            slow.close()
            queued.close()
            full.close()
            srv.close()

    run(main)
