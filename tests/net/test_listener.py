"""Listener over real sockets on uvloop: IPv4, IPv6, pipes, filter chain matching, reuse_port, drain."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format

from moorline.config import registry
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.net.conn_info import ConnInfo
from moorline.net.listener import Listener
from moorline.observability.stats import Store


class Recorder:
    """Fake terminal filter: keeps the accepted sockets (it owns them)."""

    terminal = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.accepted: list[tuple[socket.socket, ConnInfo]] = []

    def on_accept(self, sock: socket.socket, info: ConnInfo) -> None:
        self.accepted.append((sock, info))

    def close_all(self) -> None:
        for s, info in self.accepted:
            s.close()
            info.notify_closed()


class Exploding:
    terminal = True

    def on_accept(self, sock: socket.socket, info: ConnInfo) -> None:
        raise RuntimeError("boom")


RECORDERS: dict[str, Recorder] = {}


def _recorder_factory(cfg: Any, ctx: Any, path: str) -> Recorder:
    r = RECORDERS[path] = Recorder(path)
    return r


registry.register("network", ["test.listener.recorder"], [], _recorder_factory)
registry.register("network", ["test.listener.exploding"], [], lambda cfg, ctx, path: Exploding())

REC = [{"name": "test.listener.recorder"}]


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(coro_fn())


def make(
    d: dict[str, Any], store: Store | None = None, path: str = "listeners[0]"
) -> tuple[Listener, BuildContext]:
    ctx = BuildContext(stats=store if store is not None else Store())
    RECORDERS.clear()
    return Listener(json_format.ParseDict(d, listener_pb2.Listener()), ctx, path), ctx


def tcp(addr: str, port: int = 0, chains: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": "test",
        "address": {"socket_address": {"address": addr, "port_value": port}},
        "filter_chains": chains if chains is not None else [{"filters": REC}],
        **extra,
    }


def rec(i: int = 0) -> Recorder:
    return RECORDERS[f"listeners[0].filter_chains[{i}].filters[0]"]


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


def connect(addr: tuple[str, int], source: str | None = None) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    c = socket.socket(fam, socket.SOCK_STREAM)
    if source:
        c.bind((source, 0))
    c.settimeout(5)
    c.connect(addr)
    return c


def stat_of(store: Store, name: str) -> int:
    s = store.get(name)
    assert s is not None, name
    return s.value  # type: ignore[union-attr]


def test_ipv4_accept_hands_over_and_counts() -> None:
    store = Store()

    async def main() -> None:
        lst, _ = make(tcp("127.0.0.1", per_connection_buffer_limit_bytes=32768), store)
        await lst.start(asyncio.get_running_loop())
        try:
            kind, host, port = lst.bound_address
            assert kind == "tcp" and host == "127.0.0.1" and port
            c = connect((host, port))
            await until(lambda: len(rec().accepted) == 1)
            sock, info = rec().accepted[0]
            assert info.local == ("127.0.0.1", port)
            assert info.remote == c.getsockname()
            assert info.remote_str() == f"127.0.0.1:{c.getsockname()[1]}"
            assert info.listener_name == "test"
            assert info.buffer_limit == 32768
            assert info.server_name is None and info.alpn is None
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert not sock.getblocking()
            p = "listener.127.0.0.1_0."
            assert stat_of(store, p + "downstream_cx_total") == 1
            assert stat_of(store, p + "downstream_cx_active") == 1
            # The filter owns the socket: data flows both ways.
            sock.sendall(b"hi")
            assert c.recv(2) == b"hi"
            rec().close_all()
            rec().close_all()  # notify_closed twice is harmless
            assert stat_of(store, p + "downstream_cx_active") == 0
            assert stat_of(store, p + "downstream_cx_destroy") == 1
            h = store.get(p + "downstream_cx_length_ms")
            assert h is not None and h.count == 1  # type: ignore[union-attr]
            c.close()
            # A second connection gets a new id.
            c2 = connect((host, port))
            await until(lambda: len(rec().accepted) == 2)
            assert rec().accepted[1][1].connection_id > info.connection_id
            c2.close()
            rec().close_all()
        finally:
            lst.close()

    run(main)


def test_ipv6_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    store = Store()

    async def main() -> None:
        lst, _ = make(tcp("::1"), store)
        await lst.start(asyncio.get_running_loop())
        try:
            _, host, port = lst.bound_address
            assert port and host == "::1"
            c = connect(("::1", port))
            await until(lambda: len(rec().accepted) == 1)
            info = rec().accepted[0][1]
            assert info.local == ("::1", port)
            assert info.local_str() == f"[::1]:{port}"
            assert stat_of(store, "listener.[__1]_0.downstream_cx_total") == 1
            c.close()
            rec().close_all()
        finally:
            lst.close()

    run(main)


def test_pipe_listener_replaces_stale_socket_and_sets_mode(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # leaves the socket file behind, like a crashed previous run
    assert os.path.exists(path)

    async def main() -> None:
        lst, _ = make(
            {
                "name": "p",
                "address": {"pipe": {"path": path, "mode": 0o600}},
                "filter_chains": [{"filters": REC}],
            }
        )
        await lst.start(asyncio.get_running_loop())
        try:
            assert lst.bound_address == ("pipe", path, None)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            await until(lambda: len(rec().accepted) == 1)
            sock, info = rec().accepted[0]
            assert info.local == path
            sock.sendall(b"ok")
            assert c.recv(2) == b"ok"
            c.close()
            rec().close_all()
        finally:
            lst.close()
        assert not os.path.exists(path)

    run(main)


def test_pipe_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "regular"
    path.write_text("data")

    async def main() -> None:
        lst, _ = make({"address": {"pipe": {"path": str(path)}}, "filter_chains": [{"filters": REC}]})
        with pytest.raises(OSError):
            await lst.start(asyncio.get_running_loop())
        assert path.read_text() == "data"

    run(main)


def test_destination_port_mismatch_closes_and_counts() -> None:
    store = Store()

    async def main() -> None:
        lst, _ = make(
            tcp("127.0.0.1", chains=[{"filter_chain_match": {"destination_port": 1}, "filters": REC}]), store
        )
        await lst.start(asyncio.get_running_loop())
        try:
            c = connect(lst.bound_address[1:])  # type: ignore[arg-type]
            await until(lambda: stat_of(store, "listener.127.0.0.1_0.no_filter_chain_match") == 1)
            assert c.recv(1) == b""
            assert rec().accepted == []
            assert stat_of(store, "listener.127.0.0.1_0.downstream_cx_total") == 0
        finally:
            lst.close()

    run(main)


def test_source_prefix_ranges() -> None:
    chains = [
        {
            "filter_chain_match": {
                "source_prefix_ranges": [{"address_prefix": "127.0.0.2", "prefix_len": 32}]
            },
            "filters": REC,
        },
        {"filters": REC},
    ]

    async def main() -> None:
        lst, _ = make(tcp("127.0.0.1", chains=chains))
        await lst.start(asyncio.get_running_loop())
        try:
            addr = ("127.0.0.1", lst.bound_address[2])
            c1 = connect(addr, source="127.0.0.2")  # type: ignore[arg-type]
            c2 = connect(addr, source="127.0.0.1")  # type: ignore[arg-type]
            await until(lambda: len(rec(0).accepted) + len(rec(1).accepted) == 2)
            assert [i.remote[0] for _, i in rec(0).accepted] == ["127.0.0.2"]  # type: ignore[index]
            assert [i.remote[0] for _, i in rec(1).accepted] == ["127.0.0.1"]  # type: ignore[index]
            for c in (c1, c2):
                c.close()
            rec(0).close_all()
            rec(1).close_all()
        finally:
            lst.close()

    run(main)


def test_destination_prefix_most_specific_wins() -> None:
    def cidr(p: str, n: int) -> dict[str, Any]:
        return {"address_prefix": p, "prefix_len": n}

    chains = [
        {"filter_chain_match": {"prefix_ranges": [cidr("127.0.0.0", 8)]}, "filters": REC},
        {"filter_chain_match": {"prefix_ranges": [cidr("127.0.0.1", 32)]}, "filters": REC},
        {"filters": REC},
    ]

    async def main() -> None:
        lst, _ = make(tcp("0.0.0.0", chains=chains))
        await lst.start(asyncio.get_running_loop())
        try:
            port = lst.bound_address[2]
            c1 = connect(("127.0.0.1", port))  # type: ignore[arg-type]
            c3 = connect(("127.0.0.3", port))  # type: ignore[arg-type]
            await until(lambda: sum(len(rec(i).accepted) for i in range(3)) == 2)
            assert [i.local for _, i in rec(1).accepted] == [("127.0.0.1", port)]
            assert [i.local for _, i in rec(0).accepted] == [("127.0.0.3", port)]
            assert rec(2).accepted == []
            for c in (c1, c3):
                c.close()
            for i in range(3):
                rec(i).close_all()
        finally:
            lst.close()

    run(main)


def test_reuse_port_two_listeners_one_port() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        store = Store()
        l1, _ = make(tcp("127.0.0.1"), store)
        await l1.start(loop)
        r1 = rec()
        port = l1.bound_address[2]
        assert port is not None
        l2, _ = make(tcp("127.0.0.1", port), store)
        await l2.start(loop)
        r2 = rec()
        assert l2.bound_address[2] == port
        l3, _ = make(tcp("127.0.0.1", port, enable_reuse_port=False), store)
        with pytest.raises(OSError) as ei:
            await l3.start(loop)
        assert ei.value.errno == errno.EADDRINUSE
        try:
            clients = [connect(("127.0.0.1", port)) for _ in range(20)]
            await until(lambda: len(r1.accepted) + len(r2.accepted) == 20)
            for c in clients:
                c.close()
            r1.close_all()
            r2.close_all()
        finally:
            l1.close()
            l2.close()

    run(main)


def test_stop_accepting_keeps_live_connections() -> None:
    store = Store()

    async def main() -> None:
        lst, _ = make(tcp("127.0.0.1"), store)
        await lst.start(asyncio.get_running_loop())
        addr = ("127.0.0.1", lst.bound_address[2])
        c1 = connect(addr)  # type: ignore[arg-type]
        await until(lambda: len(rec().accepted) == 1)
        lst.stop_accepting()
        with pytest.raises(ConnectionRefusedError):
            connect(addr)  # type: ignore[arg-type]
        sock, _ = rec().accepted[0]
        sock.sendall(b"still here")
        assert c1.recv(100) == b"still here"
        c1.sendall(b"me too")
        await until(lambda: _readable(sock))
        assert sock.recv(100) == b"me too"
        assert stat_of(store, "listener.127.0.0.1_0.downstream_cx_active") == 1
        c1.close()
        rec().close_all()
        assert stat_of(store, "listener.127.0.0.1_0.downstream_cx_active") == 0
        lst.close()

    run(main)


def test_failing_terminal_does_not_stop_listener() -> None:
    store = Store()

    async def main() -> None:
        lst, _ = make(tcp("127.0.0.1", chains=[{"filters": [{"name": "test.listener.exploding"}]}]), store)
        await lst.start(asyncio.get_running_loop())
        try:
            addr = ("127.0.0.1", lst.bound_address[2])
            for _ in range(2):
                c = connect(addr)  # type: ignore[arg-type]
                await until(lambda c=c: _readable(c))  # type: ignore[misc]
                assert c.recv(1) == b""
                c.close()
            assert stat_of(store, "listener.127.0.0.1_0.downstream_cx_total") == 2
            assert stat_of(store, "listener.127.0.0.1_0.downstream_cx_active") == 0
        finally:
            lst.close()

    run(main)


def _readable(s: socket.socket) -> bool:
    import select

    r, _, _ = select.select([s], [], [], 0)
    return bool(r)


def test_config_notices_and_errors() -> None:
    _, ctx = make(
        tcp(
            "127.0.0.1",
            listener_filters=[{"name": "envoy.filters.listener.proxy_protocol"}],
            connection_balance_config={"exact_balance": {}},
        )
    )
    assert any("proxy_protocol" in n for n in ctx.notices)
    assert any("connection_balance_config" in n for n in ctx.notices)

    with pytest.raises(ConfigError) as ei:
        make(tcp("localhost"))
    assert ei.value.path == "listeners[0].address.socket_address.address"
    with pytest.raises(ConfigError) as ei:
        make({"name": "x", "filter_chains": [{"filters": REC}]})
    assert ei.value.path == "listeners[0].address"
    with pytest.raises(ConfigError) as ei:
        make(tcp("127.0.0.1", chains=[{"filters": [{"name": "no.such.filter"}]}]))
    assert ei.value.path == "listeners[0].filter_chains[0].filters[0]"
    with pytest.raises(ConfigError) as ei:
        make(tcp("127.0.0.1", chains=[]))
    assert ei.value.path == "listeners[0].filter_chains"


def test_bind_to_port_false_does_not_bind() -> None:
    async def main() -> None:
        lst, _ = make(tcp("127.0.0.1", bind_to_port=False))
        await lst.start(asyncio.get_running_loop())
        assert lst.bound_address == ("tcp", "127.0.0.1", 0)
        lst.close()

    run(main)
