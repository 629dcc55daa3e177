"""Admin API over real loopback sockets: http.client, raw sockets and curl."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moorline.admin.server import MAX_HEAD, AdminServer, compile_allow_paths
from moorline.observability import logging as mlog
from moorline.observability.stats import Store


class FakeHost:
    def __init__(self) -> None:
        self.stats = Store()
        self.stats.counter("cluster.backend.upstream_rq_200").value = 4
        self.stats.counter("http.ingress_http.downstream_rq_2xx").value = 4
        self.stats.counter("listener.127.0.0.1_10000.downstream_cx_total").value = 2
        self.stats.gauge("server.live").value = 1
        self.stats.gauge("cluster.backend.upstream_cx_active").value = 0
        self.stats.histogram("cluster.backend.upstream_rq_time").record(3)
        self.ready = True
        self.hc_failed: list[bool] = []
        self.drained: list[bool] = []
        self.drain_calls: list[tuple[bool, bool, bool]] = []
        self.dump_calls: list[bool] = []
        self.quit_calls = 0
        self.on_quit: Any = None

    def is_ready(self) -> bool:
        return self.ready

    def server_info(self) -> dict[str, Any]:
        return {
            "version": "moorline/0.1.0",
            "state": "LIVE" if self.ready else "DRAINING",
            "uptime_current_epoch": "5s",
            "uptime_all_epochs": "5s",
            "hot_restart_version": "disabled",
            "command_line_options": {},
            "node": {"id": "n1"},
        }

    def config_dump(self, include_eds: bool = False) -> dict[str, Any]:
        self.dump_calls.append(include_eds)
        return {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"}]}

    def clusters_text(self) -> str:
        return "backend::10.0.0.1:8080::health_flags::healthy\n"

    def clusters_json(self) -> dict[str, Any]:
        return {"cluster_statuses": [{"name": "backend"}]}

    def listeners_info(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "ingress",
                "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
            },
            {"name": "v6", "local_address": {"socket_address": {"address": "::1", "port_value": 10001}}},
            {"name": "tuple", "local_address": ("127.0.0.2", 10002)},
            {"name": "pipe", "local_address": "/tmp/l.sock"},
        ]

    def set_health_check_failed(self, failed: bool) -> None:
        self.hc_failed.append(failed)

    def drain_listeners(
        self, inbound_only: bool = False, graceful: bool = False, skip_exit: bool = False
    ) -> None:
        self.drained.append(inbound_only)
        self.drain_calls.append((inbound_only, graceful, skip_exit))

    def quit(self) -> None:
        self.quit_calls += 1
        if self.on_quit is not None:
            self.on_quit()


class Running:
    def __init__(
        self,
        host: FakeHost,
        address: tuple[str, str, int | None] = ("tcp", "127.0.0.1", 0),
        allow_paths: tuple[Any, ...] = (),
    ) -> None:
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = AdminServer(host, address, allow_paths=allow_paths)
        self.call(self.server.start())
        self.addr = self.server.bound_address

    def call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(10)

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def admin() -> Iterator[Running]:
    r = Running(FakeHost())
    try:
        yield r
    finally:
        r.stop()


def _get(r: Running, path: str, method: str = "GET") -> tuple[int, str, str]:
    c = http.client.HTTPConnection(*r.addr, timeout=5)
    try:
        c.request(method, path)
        resp = c.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read().decode()
    finally:
        c.close()


def _raw(r: Running, data: bytes) -> bytes:
    with socket.create_connection(r.addr, timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)


def test_bound_to_real_port(admin: Running) -> None:
    assert admin.addr[0] == "127.0.0.1" and admin.addr[1] > 0


def test_ready_live_and_not(admin: Running) -> None:
    assert _get(admin, "/ready") == (200, "text/plain; charset=UTF-8", "LIVE\n")
    admin.host.ready = False
    status, _, body = _get(admin, "/ready")
    assert (status, body) == (503, "DRAINING\n")


def test_json_endpoints(admin: Running) -> None:
    status, ctype, body = _get(admin, "/server_info")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body)["state"] == "LIVE"
    status, _, body = _get(admin, "/config_dump?include_eds")
    assert status == 200 and json.loads(body)["configs"][0]["@type"].endswith("BootstrapConfigDump")
    assert _get(admin, "/config_dump")[0] == 200
    assert admin.host.dump_calls == [True, False]  # ?include_eds reaches the host
    assert json.loads(_get(admin, "/clusters?format=json")[2]) == {"cluster_statuses": [{"name": "backend"}]}
    assert json.loads(_get(admin, "/runtime")[2]) == {"layers": [], "entries": {}}
    mem = json.loads(_get(admin, "/memory")[2])
    assert int(mem["allocated"]) > 0 and int(mem["total_physical_bytes"]) == int(mem["allocated"])


def test_clusters_and_listeners_text(admin: Running) -> None:
    assert _get(admin, "/clusters")[2] == "backend::10.0.0.1:8080::health_flags::healthy\n"
    assert _get(admin, "/listeners")[2] == (
        "ingress::127.0.0.1:10000\nv6::[::1]:10001\ntuple::127.0.0.2:10002\npipe::/tmp/l.sock\n"
    )
    lj = json.loads(_get(admin, "/listeners?format=json")[2])
    assert [s["name"] for s in lj["listener_statuses"]] == ["ingress", "v6", "tuple", "pipe"]
    assert lj["listener_statuses"][2]["local_address"] == {
        "socket_address": {"address": "127.0.0.2", "port_value": 10002}
    }


def test_stats_text_filter_json(admin: Running) -> None:
    status, ctype, body = _get(admin, "/stats")
    assert status == 200 and ctype.startswith("text/plain")
    assert "cluster.backend.upstream_rq_200: 4\n" in body
    assert "cluster.backend.upstream_rq_time: P0(nan," in body
    body = _get(admin, "/stats?filter=%5Ecluster%5C.&usedonly")[2]
    assert "cluster.backend.upstream_rq_200: 4" in body
    assert "upstream_cx_active" not in body and "server.live" not in body
    status, ctype, body = _get(admin, "/stats?format=json")
    assert ctype == "application/json"
    names = [e.get("name") for e in json.loads(body)["stats"]]
    assert "server.live" in names
    assert _get(admin, "/stats?filter=(")[0] == 400
    assert _get(admin, "/stats?format=xml")[0] == 400


@pytest.mark.parametrize("path", ["/stats/prometheus", "/stats?format=prometheus"])
def test_prometheus(admin: Running, path: str) -> None:
    status, ctype, body = _get(admin, path)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    (s,) = fams["envoy_cluster_upstream_rq"].samples
    assert s.labels == {"envoy_cluster_name": "backend", "envoy_response_code": "200"} and s.value == 4
    assert (
        fams["envoy_listener_downstream_cx"].samples[0].labels
    )  # parser drops "_total" == {"envoy_listener_address": "127.0.0.1_10000"}
    assert fams["envoy_server_live"].type == "gauge"
    assert fams["envoy_cluster_upstream_rq_time"].type == "histogram"


def test_mutating_endpoints_need_post(admin: Running) -> None:
    for path in (
        "/healthcheck/fail",
        "/healthcheck/ok",
        "/drain_listeners",
        "/quitquitquit",
        "/reset_counters",
        "/logging?level=debug",
    ):
        status, _, body = _get(admin, path)
        assert (status, body) == (405, "Method GET not allowed, POST required."), path
    assert admin.host.hc_failed == [] and admin.host.drained == [] and admin.host.quit_calls == 0

    assert _get(admin, "/healthcheck/fail", "POST")[::2] == (200, "OK\n")
    assert _get(admin, "/healthcheck/ok", "POST")[::2] == (200, "OK\n")
    assert admin.host.hc_failed == [True, False]
    assert _get(admin, "/drain_listeners?graceful&inboundonly", "POST")[0] == 200
    assert _get(admin, "/drain_listeners", "POST")[0] == 200
    assert admin.host.drained == [True, False]
    assert admin.host.drain_calls == [(True, True, False), (False, False, False)]
    # pilot-agent's two spellings, and Envoy's skip_exit (which needs graceful)
    assert _get(admin, "/drain_listeners?graceful", "POST")[0] == 200
    assert _get(admin, "/drain_listeners?graceful&skip_exit", "POST")[0] == 200
    assert _get(admin, "/drain_listeners?skip_exit", "POST")[::2] == (400, "skip_exit requires graceful\n")
    assert admin.host.drain_calls[2:] == [(False, True, False), (False, True, True)]
    assert _get(admin, "/reset_counters", "POST")[0] == 200
    assert admin.host.stats.counter("cluster.backend.upstream_rq_200").value == 0
    assert admin.host.stats.gauge("server.live").value == 1


def test_logging_endpoint(admin: Running) -> None:
    import logging

    logging.getLogger("moorline.upstream")
    try:
        status, _, body = _get(admin, "/logging")
        assert status == 200 and body.startswith("active loggers:\n")
        status, _, body = _get(admin, "/logging?level=debug", "POST")
        assert status == 200 and "  upstream: debug\n" in body and "  main: debug\n" in body
        status, _, body = _get(admin, "/logging?upstream=error", "POST")
        assert "  upstream: error\n" in body and "  main: debug\n" in body
        assert mlog.levels()["upstream"] == "error"
        assert _get(admin, "/logging?level=loud", "POST")[0] == 404
        assert _get(admin, "/logging?nosuchcomponent=info", "POST")[0] == 404
    finally:
        mlog.set_level("info")


def test_unknown_path_404_lists_endpoints(admin: Running) -> None:
    status, _, body = _get(admin, "/nope")
    assert status == 404
    assert body.startswith("invalid path. admin commands are:\n")
    assert "  /stats/prometheus: " in body
    status, ctype, body = _get(admin, "/")
    assert status == 200 and ctype.startswith("text/html") and 'action="/quitquitquit"' in body
    assert _get(admin, "/help")[2].startswith("admin commands are:\n")


def test_head_has_no_body(admin: Running) -> None:
    raw = _raw(admin, b"HEAD /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in head and rest == b""


def test_keep_alive_reuses_connection(admin: Running) -> None:
    c = http.client.HTTPConnection(*admin.addr, timeout=5)
    try:
        c.request("GET", "/ready")
        r1 = c.getresponse()
        assert r1.read() == b"LIVE\n"
        sock = c.sock
        c.request("POST", "/healthcheck/fail")
        r2 = c.getresponse()
        assert r2.read() == b"OK\n"
        c.request("GET", "/clusters")
        assert c.getresponse().read().startswith(b"backend::")
        assert c.sock is sock  # same TCP connection throughout
    finally:
        c.close()


def test_pipelined_requests_answered_in_order(admin: Running) -> None:
    raw = _raw(
        admin,
        b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /clusters HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert statuses == [b"200", b"404", b"200"]
    assert raw.endswith(b"backend::10.0.0.1:8080::health_flags::healthy\n")


def test_bad_request_400_and_close(admin: Running) -> None:
    raw = _raw(admin, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK")  # the good request before the bytes is still answered
    assert raw.count(b"HTTP/1.1 400 Bad Request") == 1
    assert b"connection: close" in raw.split(b"HTTP/1.1 400", 1)[1]


def test_oversized_requests(admin: Running) -> None:
    big = b"x" * (MAX_HEAD + 10)
    raw = _raw(admin, b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431 ")
    body = b"y" * (64 * 1024 + 1)
    raw = _raw(
        admin, b"POST /healthcheck/ok HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert admin.host.hc_failed == []


def test_quitquitquit_answers_then_quits(admin: Running) -> None:
    # The server closes the connection only after quit() ran, so EOF orders the checks.
    raw = _raw(admin, b"POST /quitquitquit HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in head
    assert body == b"OK\n"
    assert admin.host.quit_calls == 1


def test_quit_runs_after_the_response_is_written(admin: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_encode = AdminServer._encode

    def encode(req: Any, resp: Any, closing: bool) -> bytes:
        order.append("encode")
        return real_encode(req, resp, closing)

    monkeypatch.setattr(AdminServer, "_encode", staticmethod(encode))
    admin.host.on_quit = lambda: order.append("quit")
    assert _raw(admin, b"POST /quitquitquit HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"OK\n")
    assert order == ["encode", "quit"]


def test_handler_exception_is_500_not_a_dead_server(admin: Running) -> None:
    def boom() -> dict[str, Any]:
        raise RuntimeError("bug")

    admin.host.config_dump = boom  # type: ignore[method-assign]
    assert _get(admin, "/config_dump")[0] == 500
    assert _get(admin, "/ready")[0] == 200


def test_unix_socket_admin(tmp_path: Path) -> None:
    path = str(tmp_path / "admin.sock")
    r = Running(FakeHost(), ("pipe", path, None))
    try:
        assert r.addr == (path, 0)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"LIVE\n")
    finally:
        r.stop()


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl not installed")
def test_with_curl(admin: Running) -> None:
    base = f"http://{admin.addr[0]}:{admin.addr[1]}"

    def curl(*args: str) -> str:
        return subprocess.run(
            [CURL, "-sS", *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout  # type: ignore[list-item]

    assert curl(f"{base}/ready") == "LIVE\n"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/quitquitquit") == "405"
    assert curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/nope") == "404"
    assert curl("-X", "POST", f"{base}/healthcheck/fail") == "OK\n"
    assert admin.host.hc_failed == [True]
    prom = curl(f"{base}/stats/prometheus")
    assert {f.name for f in text_string_to_metric_families(prom)} >= {
        "envoy_cluster_upstream_rq",
        "envoy_server_live",
    }
    # Two URLs in one curl run: the second transfer reuses the first connection.
    out = curl(
        "-o", "/dev/null", "-o", "/dev/null", "-w", "%{num_connects}\n", f"{base}/ready", f"{base}/stats"
    )
    assert out.split() == ["1", "0"]
    # An h2c upgrade offer is declined: answered over HTTP/1.1, then closed.
    assert curl("--http2", f"{base}/ready") == "LIVE\n"
    # Expect: 100-continue gets its interim response, then the real one.
    body = "a" * 3000
    out = curl(
        "-H", "Expect: 100-continue", "--data-binary", body, "-w", "%{http_code}", f"{base}/healthcheck/ok"
    )
    assert out == "OK\n200"
    assert admin.host.hc_failed == [True, False]
    assert curl("-X", "POST", f"{base}/quitquitquit") == "OK\n"


def test_allow_paths_forbid_every_other_path() -> None:
    """``admin.allow_paths`` (Envoy string matchers on the path without the query): a path none
    of them matches answers 403 whatever the endpoint, also for POST; matching ones work."""
    from envoy.type.matcher.v3 import string_pb2

    matchers = [
        string_pb2.StringMatcher(exact="/ready"),
        string_pb2.StringMatcher(prefix="/stats"),
        string_pb2.StringMatcher(safe_regex={"regex": "/clusters|/listeners"}),
    ]
    r = Running(FakeHost(), allow_paths=compile_allow_paths(matchers, "admin.allow_paths"))
    try:
        assert _get(r, "/ready")[0] == 200
        assert _get(r, "/stats?filter=cluster")[0] == 200
        assert _get(r, "/stats/prometheus")[0] == 200
        assert _get(r, "/clusters?format=json")[0] == 200
        status, _, body = _get(r, "/config_dump")
        assert status == 403 and "allow_paths" in body
        assert _get(r, "/quitquitquit", "POST")[0] == 403
        assert r.host.quit_calls == 0
        assert _get(r, "/clusters2")[0] == 403  # the regex matches the whole path
        assert _get(r, "/no-such-endpoint")[0] == 403
    finally:
        r.stop()


def test_allow_paths_bad_regex_is_a_config_error() -> None:
    from envoy.type.matcher.v3 import string_pb2

    from moorline.config.errors import ConfigError

    with pytest.raises(ConfigError) as ei:
        compile_allow_paths([string_pb2.StringMatcher(safe_regex={"regex": "(a"})], "admin.allow_paths")
    assert ei.value.path.startswith("admin.allow_paths[0].safe_regex")
