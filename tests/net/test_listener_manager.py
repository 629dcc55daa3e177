"""The listener manager driven through its public API while real clients send traffic.

An in-process server (``moorline.testing.inproc.ServerThread``) on its own loop; the test thread
swaps, adds and removes listeners through ``ServerThread.call`` and talks to them with
``http.client`` and raw sockets, as the xDS layer and real clients will.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2

from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.testing.inproc import ServerThread
from moorline.testing.procs import (
    RawConn,
    bootstrap,
    cluster,
    free_port,
    hcm_listener,
    http_request,
    port_is_free,
    tcp_listener,
)
from moorline.testing.upstream import TcpEchoServer, TestUpstream

H = "127.0.0.1"


def listener_proto(d: dict[str, Any]) -> Any:
    return parse_message(d, listener_pb2.Listener)


def web(port: int, answer: str, name: str = "web", **extra: Any) -> Any:
    """``/delay/...`` goes to the test upstream (a request that stays in flight); everything else
    is a direct response naming the config version."""
    routes = [
        {"match": {"prefix": "/delay"}, "route": {"cluster": "up", "timeout": "30s"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": answer}}},
    ]
    d = hcm_listener(name, port, routes)
    d.update(extra)
    return listener_proto(d)


@pytest.fixture
def server(upstream: TestUpstream) -> Iterator[ServerThread]:
    cfg = bootstrap([], [cluster("up", [upstream.port])])
    with ServerThread(cfg, drain_time=5.0) as srv:
        yield srv


class Traffic:
    """Requests on fresh connections, back to back, from a thread; records every outcome with
    the time its connection was started."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.results: list[tuple[float, int, bytes]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = http_request(H, self.port, "GET", "/")
            except OSError as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                continue
            if r.status != 200:
                self.errors.append(f"status {r.status}")
            self.results.append((t0, r.status, r.body))

    def start(self) -> Traffic:
        self._t.start()
        return self

    def wait_for(self, body: bytes, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for _, _, b in list(self.results) if b == body) >= n:
                return
            time.sleep(0.01)
        raise AssertionError(f"fewer than {n} answers {body!r}; errors: {self.errors[:5]}")

    def stop(self) -> None:
        self._stop.set()
        self._t.join(20)


def _keepalive_get(c: RawConn, path: str) -> None:
    c.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def test_update_swaps_config_for_new_connections_and_drains_old_ones(
    server: ServerThread, upstream: TestUpstream
) -> None:
    lm = server.server.listener_manager
    port = free_port()
    server.call(lm.add_or_update, web(port, "v1"), "", "1")
    traffic = Traffic(port).start()
    try:
        traffic.wait_for(b"v1", 5)
        # An idle keep-alive connection and one with a request in flight, both on v1.
        idle = RawConn(H, port)
        _keepalive_get(idle, "/")
        r = idle.read_response()
        assert r.body == b"v1" and (r.header("connection") or "").lower() != "close"
        busy = RawConn(H, port)
        _keepalive_get(busy, "/delay/1500")
        upstream.wait_for_requests(1)

        sock = server.call(lambda: lm.get("web")._sock)
        server.call(lm.add_or_update, web(port, "v2"), "", "2")
        swapped = time.monotonic()
        # The very same listening socket serves on: the port was never unbound.
        assert server.call(lambda: lm.get("web")._sock) is sock

        # A connection made from now on is accepted by the new listener.
        assert http_request(H, port, "GET", "/").body == b"v2"
        # The in-flight request finishes on the old config and is told to close.
        r = busy.read_response()
        assert r.status == 200 and b'"path": "/delay/1500"' in r.body
        assert (r.header("connection") or "").lower() == "close"
        assert busy.is_closed_by_peer()
        # The idle keep-alive connection is closed by the drain.
        assert idle.is_closed_by_peer()
        traffic.wait_for(b"v2", 5)
    finally:
        traffic.stop()
    assert traffic.errors == []
    after = [b for t0, _, b in traffic.results if t0 > swapped]
    assert after and set(after) == {b"v2"}
    st = server.server.stats
    assert st.counter("listener_manager.listener_modified").value == 1
    assert st.counter("listener_manager.listener_added").value == 1
    dump = server.call(server.server.config_dump)
    lis = next(c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump"))
    (dl,) = lis["dynamic_listeners"]
    assert dl["name"] == "web" and dl["active_state"]["version_info"] == "2"


def test_remove_releases_the_port_and_drains(server: ServerThread, upstream: TestUpstream) -> None:
    lm = server.server.listener_manager
    port = free_port()
    server.call(lm.add_or_update, web(port, "v1"))
    assert http_request(H, port, "GET", "/").body == b"v1"
    busy = RawConn(H, port)
    _keepalive_get(busy, "/delay/1000")
    upstream.wait_for_requests(1)
    assert server.call(lm.remove, "web") is True
    assert server.call(lm.remove, "web") is False
    assert server.call(lm.get, "web") is None
    # Not accepting any more, and the port can be bound by someone else.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((H, port), timeout=5).close()
    assert port_is_free(port)
    # The connection accepted before the removal still gets its answer, then is closed.
    r = busy.read_response()
    assert r.status == 200 and (r.header("connection") or "").lower() == "close"
    assert busy.is_closed_by_peer()
    assert server.server.stats.counter("listener_manager.listener_removed").value == 1


def test_new_listener_binds_and_an_address_change_moves_it(server: ServerThread) -> None:
    lm = server.server.listener_manager
    p1, p2 = free_port(), free_port()
    server.call(lm.add_or_update, web(p1, "one", name="a"))
    assert http_request(H, p1, "GET", "/").body == b"one"
    server.call(lm.add_or_update, web(p2, "two", name="a"))
    assert http_request(H, p2, "GET", "/").body == b"two"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((H, p1), timeout=5).close()
    assert [lst.name for lst in server.call(list, lm)] == ["a"]


def test_past_the_drain_time_old_connections_are_cut(upstream: TestUpstream) -> None:
    cfg = bootstrap([], [cluster("up", [upstream.port])])
    with ServerThread(cfg, drain_time=0.3) as srv:
        lm = srv.server.listener_manager
        port = free_port()
        srv.call(lm.add_or_update, web(port, "v1"))
        slow = RawConn(H, port)
        _keepalive_get(slow, "/delay/20000")
        upstream.wait_for_requests(1)
        srv.call(lm.add_or_update, web(port, "v2"))
        assert http_request(H, port, "GET", "/").body == b"v2"
        # The upstream would answer after 20 s; the drain time ends the connection first.
        assert slow.is_closed_by_peer(timeout=10)
        assert srv.call(lambda: len(lm.draining)) == 0


def test_tcp_listener_update_keeps_old_sessions_until_the_drain_ends() -> None:
    with TcpEchoServer() as echo:
        cfg = bootstrap([], [cluster("echo", [echo.port])])
        with ServerThread(cfg, drain_time=1.0) as srv:
            lm = srv.server.listener_manager
            port = free_port()
            srv.call(lm.add_or_update, listener_proto(tcp_listener("tcp", port, "echo")))
            old = socket.create_connection((H, port), timeout=10)
            old.sendall(b"before")
            assert old.recv(100) == b"before"
            d = tcp_listener("tcp", port, "echo")
            d["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = "tcp_v2"
            srv.call(lm.add_or_update, listener_proto(d))
            with socket.create_connection((H, port), timeout=10) as new:
                new.sendall(b"new")
                assert new.recv(100) == b"new"
            old.sendall(b"after")  # the old session runs on while it drains
            assert old.recv(100) == b"after"
            old.settimeout(10)
            assert old.recv(100) == b""  # cut at the end of the drain time
            old.close()
            st = srv.server.stats
            assert st.counter("tcp.tcp_v2.downstream_cx_total").value == 1
            assert st.counter("tcp.tcp.downstream_cx_total").value == 1


def test_errors_leave_the_running_listener_alone(upstream: TestUpstream) -> None:
    static_port, port = free_port(), free_port()
    cfg = bootstrap(
        [hcm_listener("static", static_port, [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}])],
        [cluster("up", [upstream.port])],
    )
    with ServerThread(cfg) as srv:
        lm = srv.server.listener_manager
        srv.call(lm.add_or_update, web(port, "v1"), "", "1")
        # A static listener cannot be changed or removed through the dynamic API.
        with pytest.raises(ConfigError) as ei:
            srv.call(lm.add_or_update, web(static_port, "x", name="static"), "listeners[0]")
        assert ei.value.path == "listeners[0].name" and "static" in ei.value.message
        assert srv.call(lm.remove, "static") is False
        # A broken update: the error names the field, v1 keeps serving.
        d = hcm_listener("web", port, [])
        d["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = ""
        with pytest.raises(ConfigError) as ei:
            srv.call(lm.add_or_update, listener_proto(d), "listeners[1]")
        assert ei.value.path.startswith("listeners[1].filter_chains[0].filters[0]")
        # Another listener's address.
        with pytest.raises(ConfigError) as ei:
            srv.call(lm.add_or_update, web(port, "dup", name="other"), "listeners[2]")
        assert ei.value.path == "listeners[2].address" and "already used" in ei.value.message
        # Socket options cannot change on a bound address.
        with pytest.raises(ConfigError) as ei:
            srv.call(lm.add_or_update, web(port, "v3", freebind=True), "listeners[3]")
        assert ei.value.path == "listeners[3].socket_options"
        # An address the kernel refuses (held by a socket without SO_REUSEPORT).
        taken = socket.socket()
        taken.bind((H, 0))
        taken.listen(1)
        try:
            with pytest.raises(ConfigError) as ei:
                srv.call(lm.add_or_update, web(taken.getsockname()[1], "x", name="third"), "listeners[4]")
            assert ei.value.path == "listeners[4].address" and "cannot bind" in ei.value.message
        finally:
            taken.close()
        assert srv.call(lm.get, "third") is None
        # An unchanged proto keeps the running object.
        before = srv.call(lm.get, "web")
        assert srv.call(lm.add_or_update, web(port, "v1"), "", "1b") is before
        assert before.version_info == "1b"
        assert http_request(H, port, "GET", "/").body == b"v1"
        assert http_request(H, static_port, "GET", "/").status == 200


def test_static_listeners_names_and_addresses() -> None:
    from moorline.config.context import BuildContext
    from moorline.extensions import register_builtin
    from moorline.net.listener_manager import ListenerManager
    from moorline.observability.stats import Store

    register_builtin()
    lm = ListenerManager(BuildContext(stats=Store()))

    def unnamed(port: int) -> Any:
        d = hcm_listener("x", port, [])
        del d["name"]
        return listener_proto(d)

    a = lm.add(unnamed(0), "static_resources.listeners[0]")
    b = lm.add(unnamed(0), "static_resources.listeners[1]")
    assert a.name == "127.0.0.1:0" and b.name == "127.0.0.1:0#2"
    lm.add(web(free_port(), "x", name="n"), "static_resources.listeners[2]")
    with pytest.raises(ConfigError) as ei:
        lm.add(web(free_port(), "x", name="n"), "static_resources.listeners[3]")
    assert ei.value.path == "static_resources.listeners[3].name" and "duplicate" in ei.value.message
    p = free_port()
    lm.add(web(p, "x", name="p1"), "static_resources.listeners[4]")
    with pytest.raises(ConfigError) as ei:
        lm.add(web(p, "x", name="p2"), "static_resources.listeners[5]")
    assert ei.value.path == "static_resources.listeners[5].address"
    assert not any(lst.added_via_api for lst in lm)
