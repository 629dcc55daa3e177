"""Active health checks driven in memory: a fake connect function plays each host (answers,
refusals, silence) on a real event loop; the checker's verdicts, thresholds, intervals, stats and
its lifecycle with the cluster are checked. Real sockets: tests/e2e/test_health_check_e2e.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

from moorline.config.errors import ConfigError
from moorline.observability.stats import Store
from moorline.upstream import health_check as hcmod
from moorline.upstream.cluster import Cluster, compile_cluster


def ep(port: int, health: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
    }
    if health:
        d["health_status"] = health
    return d


def make(
    hc: dict[str, Any], ports: tuple[int, ...] = (1, 2, 3), store: Store | None = None, **extra: Any
) -> Cluster:
    # (one connection per check unless a test says otherwise: the fake hosts here answer by
    # what is scripted when a connection is made; reuse has its own tests)
    check = {
        "timeout": "0.2s",
        "interval": "0.01s",
        "no_traffic_interval": "0.01s",
        "reuse_connection": False,
        **hc,
    }
    d = {
        "name": "svc",
        "type": "STATIC",
        "load_assignment": {"cluster_name": "svc", "endpoints": [{"lb_endpoints": [ep(p) for p in ports]}]},
        "health_checks": [check],
        **extra,
    }
    return compile_cluster(
        json_format.ParseDict(d, cluster_pb2.Cluster()),
        store if store is not None else Store(),
        rng=random.Random(1),
    )


class FakeTransport(asyncio.Transport):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, proto: asyncio.Protocol, answer: Callable[[bytes], Any]
    ):
        super().__init__()
        self.loop = loop
        self.proto = proto
        self.answer = answer
        self.written = bytearray()
        self.is_closed = False

    def write(self, data: Any) -> None:
        self.written += data
        reply = self.answer(bytes(self.written))
        if reply is None:
            return
        if reply == "close":
            self.loop.call_soon(self.close)
        else:
            self.loop.call_soon(self._deliver, reply)

    def _deliver(self, data: bytes) -> None:
        if not self.is_closed:
            self.proto.data_received(data)

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            self.loop.call_soon(self.proto.connection_lost, None)

    def is_closing(self) -> bool:
        return self.is_closed


class World:
    """What each host (by port) does: ``"refuse"``, ``"hang"`` (connects, never answers),
    ``"blackhole"`` (the connect never completes) or a function of the bytes written so far."""

    def __init__(self) -> None:
        self.behaviour: dict[int, Any] = {}
        self.connects: dict[int, int] = {}
        self.open: set[FakeTransport] = set()
        self.pending: list[Callable[[], None]] = []

    def connect(self, loop: Any, host: Any, proto: Any, timeout: float, keepalive: Any, on_done: Any) -> Any:
        self.connects[host.port] = self.connects.get(host.port, 0) + 1
        b = self.behaviour.get(host.port, http(200))
        cancelled = []
        if b == "refuse":
            loop.call_soon(on_done, ConnectionRefusedError(111, "refused"), False)
            return lambda: None
        if b == "blackhole":

            def cancel() -> None:
                cancelled.append(1)
                on_done(asyncio.CancelledError(), True)

            return cancel
        t = FakeTransport(loop, proto, (lambda data: None) if b in ("hang", "tls_fail") else b)
        self.open.add(t)
        proto.connection_made(t)
        if b == "tls_fail":  # (made, then the certificate check failed: net/ reports an error)
            on_done(OSError("SAN mismatch"), False)
            return lambda: None
        on_done(None, False)
        return lambda: None


def http(status: int, extra: bytes = b"") -> Callable[[bytes], bytes | None]:
    def answer(data: bytes) -> bytes | None:
        if b"\r\n\r\n" not in data:
            return None
        return b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n%s\r\n" % (status, extra)

    return answer


async def until(cond: Callable[[], bool], limit: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def run(c: Cluster, world: World, body: Callable[[], Any]) -> None:
    async def main() -> None:
        c.health_connect = world.connect
        await c.start()
        try:
            await body()
        finally:
            c.stop()

    asyncio.run(main())


def stat(store: Store, name: str) -> int:
    s = store.get(f"cluster.svc.health_check.{name}")
    assert s is not None, name
    return s.value  # type: ignore[union-attr,no-any-return]


def test_hosts_start_unhealthy_until_first_pass_then_503_ejects_at_once_and_recovery_needs_threshold() -> (
    None
):
    store = Store()
    c = make(
        {"unhealthy_threshold": 3, "healthy_threshold": 2, "http_health_check": {"path": "/healthz"}},
        store=store,
    )
    w = World()
    h1, h2, h3 = c.hosts
    # Not checked yet: every host is failed, so the balancer is in panic mode (all hosts).
    assert all(h.failed_active_hc and not h.healthy for h in c.hosts)
    assert c.choose_host() is not None and c.stats.lb_healthy_panic.value == 1

    async def body() -> None:
        await until(lambda: all(not h.failed_active_hc for h in c.hosts))
        assert stat(store, "healthy") == 3
        # One pass was enough at first; a 503 (not retriable) ejects on the first answer.
        w.behaviour[3] = http(503)
        before = w.connects[3]
        await until(lambda: bool(h3.failed_active_hc))
        assert w.connects[3] == before + 1
        assert not h3.healthy and h3.eds_healthy
        assert {c.choose_host() for _ in range(30)} == {h1, h2}
        assert stat(store, "healthy") == 2 and stat(store, "failure") >= 1
        assert stat(store, "network_failure") == 0
        # Back: healthy_threshold passes in a row.
        w.behaviour[3] = http(200)
        n = w.connects[3]
        await until(lambda: not h3.failed_active_hc)
        assert w.connects[3] >= n + 2
        assert h3 in {c.choose_host() for _ in range(30)}
        assert stat(store, "attempt") >= stat(store, "success") + stat(store, "failure") - 3

    run(c, w, body)


def test_retriable_status_and_network_failures_count_towards_the_threshold() -> None:
    store = Store()
    c = make(
        {
            "unhealthy_threshold": 3,
            "healthy_threshold": 1,
            "http_health_check": {"path": "/h", "retriable_statuses": [{"start": 503, "end": 504}]},
        },
        ports=(1, 2),
        store=store,
    )
    w = World()
    h1, h2 = c.hosts
    seen: list[tuple[int, bool]] = []

    async def body() -> None:
        await until(lambda: not h1.failed_active_hc and not h2.failed_active_hc)
        orig = hcmod._Session.outcome

        def spy(self: Any, outcome: str, degraded: bool) -> None:
            orig(self, outcome, degraded)
            if self.host is h1:
                seen.append((len(seen), bool(h1.failed_active_hc)))

        hcmod._Session.outcome = spy  # type: ignore[method-assign]
        try:
            w.behaviour[1] = http(503)
            await until(lambda: bool(h1.failed_active_hc))
            # Failures 1 and 2 kept the host; the third ejected it.
            assert [f for _, f in seen[:3]] == [False, False, True]
            seen.clear()
            w.behaviour[2] = "refuse"
            await until(lambda: bool(h2.failed_active_hc))
            assert stat(store, "network_failure") >= 3
        finally:
            hcmod._Session.outcome = orig  # type: ignore[method-assign]

    run(c, w, body)


def test_timeout_and_blackhole_are_network_failures() -> None:
    store = Store()
    c = make(
        {"timeout": "0.05s", "unhealthy_threshold": 2, "healthy_threshold": 1, "tcp_health_check": {}},
        (1, 2),
        store,
    )
    w = World()
    w.behaviour[1] = "hang"  # (a TCP check with nothing to receive passes on connect)
    w.behaviour[2] = "blackhole"
    h1, h2 = c.hosts

    async def body() -> None:
        await until(lambda: not h1.failed_active_hc)
        await until(lambda: stat(store, "network_failure") >= 3)
        assert h2.failed_active_hc and not h2.healthy
        assert c.choose_host() is h1

    run(c, w, body)


def test_tcp_send_and_receive_in_order() -> None:
    store = Store()
    check = {
        "unhealthy_threshold": 5,
        "healthy_threshold": 1,
        "tcp_health_check": {"send": {"text": "50494e47"}, "receive": [{"text": "504f"}, {"binary": "Tkc="}]},
    }
    c = make(check, (1, 2, 3), store)
    w = World()
    w.behaviour[1] = lambda data: b"xxPOyyNGzz" if data == b"PING" else None  # PO ... NG in order
    w.behaviour[2] = lambda data: b"NGPO"  # wrong order, more to come never: the peer then closes
    w.behaviour[3] = lambda data: "close"  # closes without a byte: a network failure
    h1, h2, h3 = c.hosts

    async def body() -> None:
        await until(lambda: not h1.failed_active_hc)

        # host 2 sent bytes that never matched then closed: an active failure (ejected at once,
        # although it was never healthy, so the flag just stays)
        await until(lambda: stat(store, "failure") >= 4 and stat(store, "network_failure") >= 1)
        assert h2.failed_active_hc and h3.failed_active_hc

    orig = w.behaviour[2]

    def closing(data: bytes) -> Any:
        return orig(data)

    w.behaviour[2] = closing
    # host 2: deliver the bytes, then close.
    real_connect = w.connect

    def connect(loop: Any, host: Any, proto: Any, *a: Any) -> Any:
        r = real_connect(loop, host, proto, *a)
        if host.port == 2:
            t = next(t for t in w.open if t.proto is proto)
            loop.call_later(0.01, t.close)
        return r

    w.connect = connect  # type: ignore[method-assign]
    run(c, w, body)


def test_eds_health_is_kept_apart_from_active_health() -> None:
    c = make({"unhealthy_threshold": 1, "healthy_threshold": 1, "http_health_check": {"path": "/h"}}, (1, 2))
    w = World()
    h1, h2 = c.hosts

    async def body() -> None:
        await until(lambda: not h1.failed_active_hc and not h2.failed_active_hc)
        # EDS says host 1 is unhealthy: it is out although its checks pass, and stays out.
        c.update_hosts([c.make_host("127.0.0.1", 1, healthy=False), c.make_host("127.0.0.1", 2)])
        assert c.hosts[0] is h1 and not h1.healthy and not h1.eds_healthy and not h1.failed_active_hc
        n = w.connects[1]
        await until(lambda: w.connects[1] > n + 1)
        assert not h1.healthy
        assert {c.choose_host() for _ in range(10)} == {h2}
        # Active check fails host 2; EDS saying it is healthy does not bring it back.
        w.behaviour[2] = http(500)
        await until(lambda: bool(h2.failed_active_hc))
        c.update_hosts([c.make_host("127.0.0.1", 1), c.make_host("127.0.0.1", 2)])
        assert h1.healthy and not h2.healthy and h2.eds_healthy
        # A new host joins unhealthy and gets its own session.
        c.update_hosts([c.make_host("127.0.0.1", p) for p in (1, 2, 4)])
        h4 = c.hosts[2]
        assert h4.failed_active_hc and not h4.healthy
        await until(lambda: not h4.failed_active_hc)
        # A host that leaves is no longer checked.
        c.update_hosts([c.make_host("127.0.0.1", p) for p in (1, 4)])
        n2 = w.connects[2]
        await asyncio.sleep(0.1)
        assert w.connects[2] <= n2 + 1  # (at most the check that was in flight)

    run(c, w, body)


def test_retire_stops_every_session_and_copies_keep_the_verdict() -> None:
    c = make({"unhealthy_threshold": 1, "healthy_threshold": 1, "http_health_check": {"path": "/h"}}, (1, 2))
    w = World()
    w.behaviour[2] = http(503)

    async def body() -> None:
        await until(lambda: not c.hosts[0].failed_active_hc and w.connects.get(2, 0) >= 2)
        c.retire()
        assert not c.health_checker.running and not c.health_checker._sessions
        n = dict(w.connects)
        await asyncio.sleep(0.1)
        assert w.connects == n
        copies = [h.copy_for(c) for h in c.hosts]
        assert [bool(h.failed_active_hc) for h in copies] == [False, True]

    run(c, w, body)


def test_degraded_header_and_request_bytes() -> None:
    store = Store()
    check = {
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "http_health_check": {
            "path": "/healthz",
            "host": "svc.local",
            "request_headers_to_add": [{"header": {"key": "x-probe", "value": "1"}}],
            "request_headers_to_remove": ["user-agent"],
            "expected_statuses": [{"start": 200, "end": 300}],
        },
    }
    c = make(check, (1,), store)
    w = World()
    w.behaviour[1] = http(204, b"x-envoy-degraded: 1\r\n")

    async def body() -> None:
        await until(lambda: not c.hosts[0].failed_active_hc)
        await until(lambda: stat(store, "degraded") == 1)
        t = next(iter(w.open))
        req = bytes(t.written)
        assert req.startswith(b"GET /healthz HTTP/1.1\r\nhost: svc.local\r\n")
        assert b"x-probe: 1\r\n" in req and b"user-agent" not in req

    run(c, w, body)


def test_oversized_answer_head_is_a_failure_not_a_growing_buffer() -> None:
    c = make({"unhealthy_threshold": 1, "healthy_threshold": 1, "http_health_check": {"path": "/h"}}, (1,))
    w = World()
    w.behaviour[1] = lambda data: b"HTTP/1.1 200 OK\r\nx: " + b"a" * (hcmod.MAX_RESPONSE_HEAD + 10)
    store_fail: list[int] = []

    async def body() -> None:
        await until(lambda: c.health_checker.stats.failure.value >= 2)
        store_fail.append(1)
        assert c.hosts[0].failed_active_hc

    run(c, w, body)
    assert store_fail


def test_intervals_follow_traffic_edges_and_jitter() -> None:
    c = make(
        {
            "interval": "10s",
            "no_traffic_interval": "60s",
            "no_traffic_healthy_interval": "30s",
            "unhealthy_interval": "20s",
            "unhealthy_edge_interval": "1s",
            "healthy_edge_interval": "2s",
            "interval_jitter": "1s",
            "interval_jitter_percent": 10,
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "tcp_health_check": {},
        },
        (1,),
    )
    ck = c.health_checker.checkers[0]
    h = c.hosts[0]
    assert ck.next_interval(h, False) >= 60  # failed, no traffic
    h.failed_active_hc = False
    assert 30 <= ck.next_interval(h, False) <= 30 + 3 + 1
    c.stats.upstream_cx_total.value = 1
    for _ in range(50):
        v = ck.next_interval(h, False)
        assert 10 <= v <= 10 + 1 + 1
    assert 2 <= ck.next_interval(h, True) <= 2 + 0.2 + 1
    h.failed_active_hc = True
    assert 1 <= ck.next_interval(h, True) <= 1 + 0.1 + 1
    assert 20 <= ck.next_interval(h, False) <= 20 + 2 + 1


def test_defaults_for_intervals() -> None:
    c = make(
        {
            "interval": "3s",
            "no_traffic_interval": None,
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "tcp_health_check": {},
        },
        (1,),
    )
    ck = c.health_checker.checkers[0]
    assert (ck.unhealthy_interval, ck.unhealthy_edge_interval, ck.healthy_edge_interval) == (3.0, 3.0, 3.0)
    assert ck.no_traffic_interval == 60.0


def test_grpc_health_messages() -> None:
    assert hcmod._grpc_request("") == b"\x00\x00\x00\x00\x00"
    assert hcmod._grpc_request("svc") == b"\x00\x00\x00\x00\x05\x0a\x03svc"
    assert hcmod.grpc_serving_status(b"\x00\x00\x00\x00\x02\x08\x01") == 1
    assert hcmod.grpc_serving_status(b"\x00\x00\x00\x00\x02\x08\x02") == 2
    assert hcmod.grpc_serving_status(b"\x00\x00\x00\x00\x00") == 0
    assert hcmod.grpc_serving_status(b"\x00\x00\x00\x00\x05\x08") is None
    assert hcmod.grpc_serving_status(b"") is None


@pytest.mark.parametrize(
    "check, field",
    [
        (
            {"interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}},
            "health_checks[0].timeout",
        ),
        (
            {"timeout": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}},
            "health_checks[0].interval",
        ),
        (
            {"timeout": "1s", "interval": "1s", "healthy_threshold": 1, "tcp_health_check": {}},
            "health_checks[0].unhealthy_threshold",
        ),
        (
            {"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1},
            "health_checks[0]",
        ),
        (
            {
                "timeout": "1s",
                "interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "x"},
            },
            "health_checks[0].http_health_check.path",
        ),
        (
            {
                "timeout": "1s",
                "interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/", "expected_statuses": [{"start": 300, "end": 200}]},
            },
            "health_checks[0].http_health_check.expected_statuses[0]",
        ),
        (
            {
                "timeout": "1s",
                "interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "tcp_health_check": {"send": {"text": "zz"}},
            },
            "health_checks[0].tcp_health_check.send.text",
        ),
        (
            {
                "timeout": "1s",
                "interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/", "codec_client_type": "HTTP3"},
            },
            "health_checks[0].http_health_check.codec_client_type",
        ),
    ],
)
def test_config_errors_name_the_field(check: dict[str, Any], field: str) -> None:
    d = {"name": "svc", "type": "STATIC", "health_checks": [check]}
    with pytest.raises(ConfigError) as ei:
        compile_cluster(json_format.ParseDict(d, cluster_pb2.Cluster()), Store())
    assert ei.value.path == field


def test_notices_for_what_is_not_run_and_no_checker_without_config() -> None:
    c = make(
        {
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "event_log_path": "/tmp/x",
            "tcp_health_check": {},
        },
        (1,),
    )
    assert any(n.startswith("health_checks[0].event_log_path:") for n in c.notices)
    assert not any("active health checks not implemented" in n for n in c.notices)
    d = {
        "name": "plain",
        "type": "STATIC",
        "load_assignment": {"cluster_name": "plain", "endpoints": [{"lb_endpoints": [ep(1)]}]},
    }
    p = compile_cluster(json_format.ParseDict(d, cluster_pb2.Cluster()), Store())
    assert p.health_checker is None and p.hosts[0].healthy and not p.hosts[0].failed_active_hc


def test_connect_error_after_the_transport_was_made_closes_it() -> None:
    store = Store()
    c = make(
        {"unhealthy_threshold": 1, "healthy_threshold": 1, "http_health_check": {"path": "/h"}}, (1,), store
    )
    w = World()
    w.behaviour[1] = "tls_fail"

    async def body() -> None:
        await until(lambda: stat(store, "network_failure") >= 3)
        await asyncio.sleep(0.02)
        assert len(w.open) >= 3
        assert sum(1 for t in w.open if not t.is_closed) <= 1  # (at most the check in flight)

    run(c, w, body)


def h2_server(status: int, seen: list[dict[str, str]]) -> Callable[[bytes], Any]:
    """An in-memory HTTP/2 peer (the h2 library's server side) for one connection."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    fed = [0]

    def answer(data: bytes) -> bytes | None:
        new, fed[0] = data[fed[0] :], len(data)
        for ev in conn.receive_data(new):
            if isinstance(ev, h2.events.RequestReceived):
                seen.append(dict(ev.headers))
                conn.send_headers(ev.stream_id, [(":status", str(status))], end_stream=True)
        return conn.data_to_send() or None

    return answer


def test_http2_checks_judge_the_status() -> None:
    store = Store()
    hc = {"unhealthy_threshold": 1, "healthy_threshold": 1}
    c = make(
        {**hc, "http_health_check": {"path": "/hz", "host": "a.b", "codec_client_type": "HTTP2"}},
        (1, 2),
        store,
    )
    w = World()
    h1, h2 = c.hosts
    seen: list[dict[str, str]] = []
    real = w.connect

    def connect(loop: Any, host: Any, proto: Any, *a: Any) -> Any:
        # A fresh server connection per check (each check is its own connection).
        w.behaviour[host.port] = h2_server(200 if host.port == 1 else 503, seen)
        return real(loop, host, proto, *a)

    w.connect = connect  # type: ignore[method-assign]

    async def body() -> None:
        await until(lambda: not h1.failed_active_hc and stat(store, "failure") >= 2)
        assert h2.failed_active_hc and not h2.healthy
        assert {(r[":method"], r[":path"], r[":authority"]) for r in seen} == {("GET", "/hz", "a.b")}
        assert stat(store, "network_failure") == 0

    run(c, w, body)


# -- the first round (warming) ----------------------------------------------------------------


def test_start_waits_for_every_hosts_first_check_and_marks_init_done() -> None:
    store = Store()
    c = make(
        {
            "timeout": "5s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "http_health_check": {"path": "/h"},
        },
        (1, 2),
        store,
    )
    w = World()
    w.behaviour[1] = lambda data: None  # (answered below, by hand)
    w.behaviour[2] = "refuse"
    hc = c.health_checker
    assert hc.init in c.init_targets and not hc.init.ready

    async def main() -> None:
        c.health_connect = w.connect
        task = asyncio.ensure_future(c.start())
        try:
            await until(lambda: w.connects.get(1, 0) == 1 and stat(store, "network_failure") >= 1)
            for _ in range(5):
                await asyncio.sleep(0)
            # Host 2 has had its first check (refused); host 1's is still owed.
            assert not task.done() and not hc.init.ready
            t = next(t for t in w.open if not t.is_closed)
            t.proto.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await asyncio.wait_for(task, 5)
            assert hc.init.ready
            assert not c.hosts[0].failed_active_hc and c.hosts[1].failed_active_hc
        finally:
            c.stop()

    asyncio.run(main())


def test_the_first_round_ends_when_first_checks_time_out() -> None:
    c = make(
        {"timeout": "0.05s", "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}},
        (1,),
    )
    w = World()
    w.behaviour[1] = "blackhole"

    async def body() -> None:
        assert c.health_checker.init.ready  # (start() returned: the timeout ended the round)
        assert c.hosts[0].failed_active_hc

    run(c, w, body)


def test_a_cds_cluster_with_checks_warms_until_its_first_round_while_the_old_one_serves() -> None:
    from moorline.upstream.manager import ClusterManager

    store = Store()
    w = World()
    w.behaviour[7] = lambda data: None
    cm = ClusterManager(store, rng=random.Random(1), health_connect=w.connect)

    def proto(with_hc: bool) -> Any:
        d: dict[str, Any] = {
            "name": "svc",
            "type": "STATIC",
            "load_assignment": {"cluster_name": "svc", "endpoints": [{"lb_endpoints": [ep(7)]}]},
        }
        if with_hc:
            d["health_checks"] = [
                {
                    "timeout": "5s",
                    "interval": "1s",
                    "unhealthy_threshold": 1,
                    "healthy_threshold": 1,
                    "http_health_check": {"path": "/h"},
                }
            ]
        return json_format.ParseDict(d, cluster_pb2.Cluster())

    async def main() -> None:
        await cm.start()
        try:
            old = cm.add_or_update(proto(False), version_info="1")
            new = cm.add_or_update(proto(True), version_info="2")
            assert cm.get("svc") is old and "svc" in cm.warming
            await until(lambda: w.connects.get(7, 0) == 1)
            assert cm.get("svc") is old  # (its first check has no answer yet)
            t = next(t for t in w.open if not t.is_closed)
            t.proto.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await until(lambda: cm.get("svc") is new)
            assert "svc" not in cm.warming and old.retired
            assert not new.hosts[0].failed_active_hc
            # A warming cluster's checks stop with the manager.
            cm.add_or_update(proto(False), version_info="3")
            assert cm.get("svc") is not new and new.retired
        finally:
            cm.stop()
        assert all(t.is_closed for t in w.open)

    asyncio.run(main())


# -- several checks ---------------------------------------------------------------------------


def test_several_checks_all_run_and_a_host_is_healthy_only_when_every_one_passes() -> None:
    store = Store()
    hc = {"unhealthy_threshold": 1, "healthy_threshold": 1, "reuse_connection": False}
    d = {
        "name": "svc",
        "type": "STATIC",
        "load_assignment": {"cluster_name": "svc", "endpoints": [{"lb_endpoints": [ep(1), ep(2)]}]},
        "health_checks": [
            {
                "timeout": "0.1s",
                "interval": "0.01s",
                "no_traffic_interval": "0.01s",
                **hc,
                "http_health_check": {"path": "/a"},
            },
            {
                "timeout": "0.1s",
                "interval": "0.01s",
                "no_traffic_interval": "0.01s",
                **hc,
                "tcp_health_check": {"send": {"text": "50494e47"}, "receive": [{"text": "504f4e47"}]},
            },
        ],
    }
    c = compile_cluster(json_format.ParseDict(d, cluster_pb2.Cluster()), store, rng=random.Random(1))
    assert not any("health_checks" in n for n in c.notices)
    assert len(c.health_checker.checkers) == 2
    pong = {1: b"NOPE", 2: b"PONG"}

    def peer(port: int) -> Callable[[bytes], Any]:
        def answer(data: bytes) -> Any:
            if data.startswith(b"GET /a "):
                return http(200)(data)
            if data == b"PING":
                return pong[port]
            return None

        return answer

    w = World()
    w.behaviour[1], w.behaviour[2] = peer(1), peer(2)
    h1, h2 = c.hosts

    async def body() -> None:
        await until(lambda: not h2.failed_active_hc)
        # Host 1 passes the HTTP check and fails the TCP one: it stays out.
        sess1 = c.health_checker._sessions[h1]
        await until(lambda: stat(store, "failure") >= 3)
        assert not sess1[0].failed and sess1[1].failed
        assert h1.failed_active_hc and not h1.healthy
        assert {c.choose_host() for _ in range(10)} == {h2}
        assert stat(store, "healthy") == 1
        # Its TCP check passes too now: back in.
        pong[1] = b"PONG"
        await until(lambda: not h1.failed_active_hc)
        assert {c.choose_host() for _ in range(10)} == {h1, h2}
        # And the HTTP check alone can take host 2 out.
        w.behaviour[2] = lambda data: (
            http(500)(data) if data.startswith(b"GET") else (b"PONG" if data == b"PING" else None)
        )
        await until(lambda: bool(h2.failed_active_hc))
        s2 = c.health_checker._sessions[h2]
        assert s2[0].failed and not s2[1].failed

    run(c, w, body)


# -- reuse_connection -------------------------------------------------------------------------


def keepalive(w: World, port: int, status: list[int], extra: list[bytes]) -> None:
    """Host ``port`` answers each HTTP/1.1 request on a connection with ``status[0]`` and a
    2-byte body, ``extra[0]`` added to the head."""

    def factory() -> Callable[[bytes], Any]:
        answered = [0]

        def answer(data: bytes) -> Any:
            n = data.count(b"\r\n\r\n")
            if n <= answered[0]:
                return None
            answered[0] = n
            return b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n%s\r\nok" % (status[0], extra[0])

        return answer

    real = w.connect

    def connect(loop: Any, host: Any, proto: Any, *a: Any) -> Any:
        if host.port == port:
            w.behaviour[port] = factory()  # (a fresh peer per connection)
        return real(loop, host, proto, *a)

    w.connect = connect  # type: ignore[method-assign]


def test_http1_reuses_its_connection_until_the_peer_closes_or_says_close() -> None:
    store = Store()
    c = make(
        {
            "reuse_connection": True,
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "http_health_check": {"path": "/h"},
        },
        (1,),
        store,
    )
    w = World()
    status, extra = [200], [b""]
    keepalive(w, 1, status, extra)
    h = c.hosts[0]

    async def body() -> None:
        await until(lambda: stat(store, "success") >= 4)
        assert w.connects[1] == 1 and not h.failed_active_hc
        t1 = next(iter(w.open))
        assert b"connection: close" not in bytes(t1.written)
        assert bytes(t1.written).count(b"GET /h HTTP/1.1\r\n") >= 4
        # The peer closes the idle connection: the next check reconnects.
        t1.close()
        await until(lambda: w.connects[1] == 2)
        n = stat(store, "success")
        await until(lambda: stat(store, "success") >= n + 3)
        assert w.connects[1] == 2
        # An answer that says close: the connection ends with it, the next check reconnects.
        extra[0] = b"connection: close\r\n"
        await until(lambda: w.connects[1] >= 4)
        assert not h.failed_active_hc
        assert sum(1 for t in w.open if not t.is_closed) <= 1
        # A failed check closes its connection too.
        extra[0] = b""
        status[0] = 503
        await until(lambda: bool(h.failed_active_hc))
        n = w.connects[1]
        await until(lambda: stat(store, "failure") >= 3)
        assert w.connects[1] >= n + 2  # (each failure reconnected)
        assert sum(1 for t in w.open if not t.is_closed) <= 1

    run(c, w, body)
    assert all(t.is_closed for t in w.open)  # (stop closed the kept connection)


def test_tcp_reuse_sends_the_next_payload_on_the_same_connection() -> None:
    store = Store()
    c = make(
        {
            "reuse_connection": True,
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "tcp_health_check": {"send": {"text": "50494e47"}, "receive": [{"text": "504f4e47"}]},
        },
        (1,),
        store,
    )
    w = World()
    sent = [0]

    def answer(data: bytes) -> Any:
        n = data.count(b"PING")
        if n <= sent[0]:
            return None
        sent[0] = n
        return b"PONG"

    w.behaviour[1] = answer

    async def body() -> None:
        await until(lambda: stat(store, "success") >= 4)
        assert w.connects[1] == 1
        t = next(iter(w.open))
        assert bytes(t.written).startswith(b"PINGPINGPINGPING")
        # A timeout closes it: a silent peer, then a fresh connection for the next check.
        w.behaviour[1] = lambda data: None
        t.answer = lambda data: None
        await until(lambda: stat(store, "network_failure") >= 1)
        assert t.is_closed
        await until(lambda: w.connects[1] >= 2)

    run(c, w, body)
    assert all(t.is_closed for t in w.open)


def test_h2_and_grpc_reuse_one_connection_a_stream_per_check() -> None:
    store = Store()
    hc = {"reuse_connection": True, "unhealthy_threshold": 1, "healthy_threshold": 1}
    c = make({**hc, "http_health_check": {"path": "/hz", "codec_client_type": "HTTP2"}}, (1,), store)
    w = World()
    seen: list[dict[str, str]] = []
    real = w.connect

    def connect(loop: Any, host: Any, proto: Any, *a: Any) -> Any:
        w.behaviour[host.port] = h2_server(200, seen)
        return real(loop, host, proto, *a)

    w.connect = connect  # type: ignore[method-assign]

    async def body() -> None:
        await until(lambda: stat(store, "success") >= 4)
        assert w.connects[1] == 1 and len(seen) >= 4
        assert not c.hosts[0].failed_active_hc

    run(c, w, body)
    assert all(t.is_closed for t in w.open)


def _pong_per_ping() -> Callable[[bytes], bytes | None]:
    sent = [0]

    def answer(data: bytes) -> bytes | None:
        n = data.count(b"PING")
        if n <= sent[0]:
            return None
        sent[0] = n
        return b"PONG"

    return answer


def test_a_tcp_connect_check_opens_a_connection_per_check_even_with_reuse() -> None:
    # No receive payload: only the connect is tested, so a kept connection would prove nothing
    # (a peer that stopped serving but kept its socket would pass for ever).
    store = Store()
    c = make(
        {"reuse_connection": True, "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {}},
        (1,),
        store,
    )
    w = World()
    w.behaviour[1] = lambda data: None

    async def body() -> None:
        await until(lambda: stat(store, "success") >= 3)
        assert w.connects[1] >= 3
        assert sum(1 for t in w.open if not t.is_closed) <= 1

    run(c, w, body)
    assert all(t.is_closed for t in w.open)


def test_a_host_that_leaves_takes_its_kept_connection_with_it() -> None:
    store = Store()
    c = make(
        {
            "reuse_connection": True,
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "tcp_health_check": {"send": {"text": "50494e47"}, "receive": [{"text": "504f4e47"}]},
        },
        (1, 2),
        store,
    )
    w = World()
    w.behaviour[1] = _pong_per_ping()
    w.behaviour[2] = _pong_per_ping()

    async def body() -> None:
        await until(lambda: stat(store, "success") >= 4)
        assert w.connects == {1: 1, 2: 1}
        c.update_hosts([c.make_host("127.0.0.1", 1)])
        await asyncio.sleep(0)
        open_now = [t for t in w.open if not t.is_closed]
        assert len(open_now) == 1  # (host 2's connection closed with it)
        c.retire()
        assert all(t.is_closed for t in w.open)  # (and retiring closes the rest)

    run(c, w, body)
    assert all(t.is_closed for t in w.open)


def test_no_socket_is_left_open_after_stop_with_real_connections() -> None:
    import os

    from moorline.net.upstream import connect

    store = Store()

    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []
        eof: list[int] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            except asyncio.IncompleteReadError:
                eof.append(1)  # (the checker closed its end)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = make(
            {
                "reuse_connection": True,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/h"},
            },
            (port,),
            store,
        )
        fds = len(os.listdir("/proc/self/fd"))
        c.health_connect = connect
        await c.start()
        try:
            await until(lambda: stat(store, "success") >= 5)
            assert len(accepted) == 1  # (one kept connection for every check)
            assert len(os.listdir("/proc/self/fd")) == fds + 2  # (its two ends, in this process)
        finally:
            c.stop()
        await until(lambda: bool(eof))
        for wr in accepted:
            wr.close()
        await until(lambda: len(os.listdir("/proc/self/fd")) == fds)
        server.close()
        await server.wait_closed()

    asyncio.run(main())


@pytest.mark.parametrize(
    "answer, kept",
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", True),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcEXTRA", False),  # (out of step)
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 5\r\n\r\nabc", False),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the close", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
    ],
)
def test_http1_keeps_a_connection_only_after_an_answer_it_framed_exactly(answer: bytes, kept: bool) -> None:
    loop = asyncio.new_event_loop()
    try:
        conn = hcmod._Http1Check(b"GET /h HTTP/1.1\r\n\r\n", _judge, reuse=True)
        out: list[str] = []
        conn.begin(lambda o, d: out.append(o))
        t = FakeTransport(loop, conn, lambda data: None)
        conn.connection_made(t)
        conn.data_received(answer)
        assert out == ["pass"] and conn.reusable is kept and t.is_closed is not kept
    finally:
        loop.close()


def _judge(status: int) -> str:
    return "pass" if 200 <= status < 300 else "fail"


def test_a_kept_http1_answer_body_is_counted_and_dropped_not_buffered() -> None:
    loop = asyncio.new_event_loop()
    try:
        conn = hcmod._Http1Check(b"GET /h HTTP/1.1\r\n\r\n", _judge, reuse=True)
        out: list[str] = []
        conn.begin(lambda o, d: out.append(o))
        conn.connection_made(FakeTransport(loop, conn, lambda data: None))
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n")
        for _ in range(100):
            conn.data_received(b"x" * 65536)
        assert out == [] and len(conn.buf) == 0 and conn.skip == 1000000000 - 100 * 65536
    finally:
        loop.close()
