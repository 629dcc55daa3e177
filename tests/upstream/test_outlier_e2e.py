"""Outlier detection end to end: a real moorline in front of real test upstreams, one of them
broken (always 503, resetting every connection, or a closed port), driven with http.client and
raw sockets. Assertions are on the order of events and on stats, never on durations: loops wait
for a state with a generous deadline."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from moorline.testing.procs import MoorlineProc, cluster, config_http, free_port, http_request
from moorline.testing.upstream import TcpEchoServer, TestUpstream

pytestmark = pytest.mark.e2e

OD = "cluster.svc.outlier_detection."
DEADLINE = 30.0


class ResetServer:
    """Accepts every connection and closes it with SO_LINGER 0: the peer sees a TCP RST."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def reset_server() -> Iterator[ResetServer]:
    s = ResetServer()
    try:
        yield s
    finally:
        s.stop()


def _od_cluster(ports: list[int], **od: Any) -> dict[str, Any]:
    return cluster("svc", list(ports), outlier_detection=od)


def _config(port: int, clusters: list[dict[str, Any]], event_log: Path | None = None) -> str:
    doc = yaml.safe_load(config_http(port, clusters))
    if event_log is not None:
        doc["cluster_manager"] = {"outlier_detection": {"event_log_path": str(event_log)}}
    return yaml.safe_dump(doc, sort_keys=False)


def _get(port: int) -> tuple[int, str | None]:
    r = http_request("127.0.0.1", port, "GET", "/")
    return r.status, r.header("x-upstream-id")


def _until(cond: Callable[[], bool], what: str, step: Callable[[], Any] | None = None) -> None:
    end = time.monotonic() + DEADLINE
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.05)


def _host_flags(ml: MoorlineProc, port: int) -> str:
    text = ml.admin_get("/clusters").body.decode()
    for line in text.splitlines():
        if line.startswith(f"svc::127.0.0.1:{port}::health_flags::"):
            return line.rsplit("::", 1)[1]
    raise AssertionError(f"no health_flags line for {port} in {text!r}")


def test_consecutive_5xx_ejects_then_readmits(
    moorline: Any, upstreams: Callable[..., TestUpstream], tmp_path: Path
) -> None:
    good1, good2 = upstreams(upstream_id="g1"), upstreams(upstream_id="g2")
    bad = upstreams(upstream_id="bad", always_status=503)
    port = free_port()
    log = tmp_path / "outlier.log"
    c = _od_cluster(
        [good1.port, bad.port, good2.port],
        consecutive_5xx=3,
        base_ejection_time="1s",
        interval="0.5s",
        max_ejection_percent=34,
    )
    ml = moorline(_config(port, [c], log))
    assert _host_flags(ml, bad.port) == "healthy"
    _until(
        lambda: ml.stat(OD + "ejections_enforced_consecutive_5xx") == 1, "the ejection", lambda: _get(port)
    )
    assert ml.stat(OD + "ejections_detected_consecutive_5xx") == 1
    assert _host_flags(ml, bad.port) == "/failed_outlier_check"
    assert _host_flags(ml, good1.port) == "healthy"
    # Ejected: every request now lands on the two good hosts (the 1 s ejection may end while
    # we look; the stats tell whether it has).
    before = len(bad.requests)
    results = [_get(port) for _ in range(6)]
    if ml.stat(OD + "ejections_active") == 1:
        assert all(s == 200 for s, _ in results), results
        assert {u for _, u in results} == {"g1", "g2"}
        assert len(bad.requests) == before
    # After the ejection time the host is back in the balancer and takes requests again.
    _until(lambda: ml.stat(OD + "ejections_active") == 0, "the uneject")
    n = len(bad.requests)
    _until(lambda: len(bad.requests) > n, "the readmitted host to get a request", lambda: _get(port))
    assert ml.stat(OD + "ejections_enforced_total") >= 1
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(e["action"], e.get("type")) for e in events[:2]] == [
        ("EJECT", "CONSECUTIVE_5XX"),
        ("UNEJECT", None),
    ]
    assert {e["upstream_url"] for e in events} == {f"127.0.0.1:{bad.port}"}


def test_resets_count_as_gateway_failures(
    moorline: Any, upstreams: Callable[..., TestUpstream], reset_server: ResetServer
) -> None:
    good1, good2 = upstreams(upstream_id="g1"), upstreams(upstream_id="g2")
    port = free_port()
    c = _od_cluster(
        [good1.port, reset_server.port, good2.port],
        consecutive_5xx=1000,
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
        base_ejection_time="60s",
        interval="0.5s",
    )
    ml = moorline(_config(port, [c]))
    seen: list[int] = []
    _until(
        lambda: ml.stat(OD + "ejections_enforced_consecutive_gateway_failure") == 1,
        "the gateway-failure ejection",
        lambda: seen.append(_get(port)[0]),
    )
    assert 503 in seen  # the resets reached the client before the ejection
    assert reset_server.accepted >= 3
    assert ml.stat(OD + "ejections_enforced_consecutive_5xx") == 0
    assert _host_flags(ml, reset_server.port) == "/failed_outlier_check"
    accepted = reset_server.accepted
    results = [_get(port) for _ in range(8)]
    assert all(s == 200 for s, _ in results), results
    assert reset_server.accepted == accepted


def test_max_ejection_percent_caps_ejections(moorline: Any, upstreams: Callable[..., TestUpstream]) -> None:
    good = upstreams(upstream_id="g")
    bad1 = upstreams(upstream_id="b1", always_status=503)
    bad2 = upstreams(upstream_id="b2", always_status=503)
    port = free_port()
    c = _od_cluster(
        [good.port, bad1.port, bad2.port],
        consecutive_5xx=2,
        base_ejection_time="60s",
        interval="0.5s",
        max_ejection_percent=30,  # one of three (0 % ejected < 30 %), not two (33 % is not)
    )
    ml = moorline(_config(port, [c]))
    _until(lambda: ml.stat(OD + "ejections_overflow") >= 1, "an overflowed ejection", lambda: _get(port))
    assert ml.stat(OD + "ejections_active") == 1
    assert ml.stat(OD + "ejections_enforced_consecutive_5xx") == 1
    flags = sorted(_host_flags(ml, p) for p in (bad1.port, bad2.port))
    assert flags == ["/failed_outlier_check", "healthy"]
    doc = json.loads(ml.admin_get("/clusters?format=json").body)
    (svc,) = [c for c in doc["cluster_statuses"] if c["name"] == "svc"]
    ejected = [h["address"]["socket_address"]["port_value"] for h in svc["host_statuses"]
               if h["health_status"].get("failed_outlier_check")]  # fmt: skip
    assert len(ejected) == 1 and ejected[0] in (bad1.port, bad2.port)
    assert all(h["health_status"]["eds_health_status"] == "HEALTHY" for h in svc["host_statuses"])
    # The second bad host stays in: it keeps answering 503 through the proxy.
    statuses = [_get(port)[0] for _ in range(6)]
    assert 503 in statuses and 200 in statuses


def test_tcp_proxy_connect_failures_eject(moorline: Any, echo_server: TcpEchoServer) -> None:
    dead = free_port()  # nothing listens: every connect is refused
    port = free_port()
    doc = yaml.safe_load(config_http(port, [_od_cluster([echo_server.port, dead], consecutive_5xx=2,
                                                        base_ejection_time="60s", interval="0.5s")]))  # fmt: skip
    doc["static_resources"]["listeners"][0]["filter_chains"] = [
        {
            "filters": [
                {
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "tcp",
                        "cluster": "svc",
                    },
                }
            ]
        }
    ]
    ml = moorline(yaml.safe_dump(doc, sort_keys=False))

    def echo_once() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"ping")
            try:
                return s.recv(16) == b"ping"
            except OSError:
                return False

    _until(lambda: ml.stat(OD + "ejections_enforced_consecutive_5xx") == 1, "the ejection", echo_once)
    assert _host_flags(ml, dead) == "/failed_outlier_check"
    fails = ml.stat("cluster.svc.upstream_cx_connect_fail")
    assert all(echo_once() for _ in range(6))
    assert ml.stat("cluster.svc.upstream_cx_connect_fail") == fails


def test_event_log_path_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    doc = yaml.safe_load(config_http(free_port(), [_od_cluster([free_port()], consecutive_5xx=3)]))
    doc["cluster_manager"] = {"outlier_detection": {"event_log_path": str(tmp_path / "missing" / "od.log")}}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    r = subprocess.run(
        [sys.executable, "-m", "moorline", "validate", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "cluster_manager.outlier_detection.event_log_path" in r.stderr
