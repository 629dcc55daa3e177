"""moorline started the way Istio's pilot-agent starts Envoy, and polled the way it polls Envoy.

The bootstrap is one of Istio's golden bootstraps (``/work/shared/fixtures/istio``), copied and
rewritten: loopback ports instead of 15000/15090/15021, the agent cluster pointed at a test
upstream standing in for pilot-agent's status server, the xDS and SDS pipes pointed at paths
where nothing listens (so the ADS stream never connects, as before istiod answers). The argv is
what ``pkg/envoy/proxy.go`` (``envoy.args``) builds: no sub-command, ``-c FILE --drain-time-s N
--drain-strategy immediate --local-address-ip-version v4 --file-flush-interval-msec 1000
--disable-hot-restart --allow-unknown-static-fields``, then the log levels and ``--concurrency``.
The admin requests are those of ``pilot/cmd/pilot-agent/status/util/stats.go``
(``GetReadinessStats``, ``GetUpdateStatusStats``), ``pkg/envoy/admin.go`` (``/server_info``,
``/config_dump``, ``/drain_listeners``, ``/quitquitquit``) and ``pkg/envoy/agent.go``
(``activeProxyConnections``), parsed the way they parse the answers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2, server_info_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import json_format

from moorline.config.typeindex import descriptor_pool_resolver
from moorline.testing import procs
from moorline.testing.procs import MoorlineProc, free_port, http_request
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

FIXTURES = Path("/work/shared/fixtures/istio")
H = "127.0.0.1"
READY_STATS = "/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)"
UPDATE_STATS = "/stats?usedonly&filter=^(cluster_manager\\.cds|listener_manager\\.lds)\\.(update_success|update_rejected)$"
ACTIVE_CX = "/stats?usedonly&filter=downstream_cx_active$"


def _rewrite(src: Path, dst: Path, ports: dict[str, int], tmp: Path) -> dict[str, Any]:
    """A copy of an Istio bootstrap on loopback ports under ``tmp`` (the fixture is not touched)."""
    d = json.loads(src.read_text())
    d["admin"]["address"]["socket_address"].update(address=H, port_value=ports["admin"])
    by_name = {"0.0.0.0_15090": ports["prometheus"], "0.0.0.0_15021": ports["status"]}
    for lst in d["static_resources"]["listeners"]:
        lst["address"]["socket_address"].update(address=H, port_value=by_name[lst["name"]])
    for c in d["static_resources"]["clusters"]:
        for e in c.get("load_assignment", {}).get("endpoints", []):
            for lb in e["lb_endpoints"]:
                a = lb["endpoint"]["address"]
                if "pipe" in a:  # xds-grpc, sds-grpc: nothing listens there
                    a["pipe"]["path"] = str(tmp / f"{c['name']}.sock")
                elif c["name"] == "prometheus_stats":
                    a["socket_address"].update(address=H, port_value=ports["admin"])
                elif c["name"] == "agent":
                    a["socket_address"].update(address=H, port_value=ports["agent"])
    dst.write_text(json.dumps(d, indent=1))
    return d


def _pilot_agent_argv(config: Path, drain_s: int, log_level: str, concurrency: int) -> list[str]:
    # envoy.args() in istio/istio pkg/envoy/proxy.go, then NewProxy's extra args.
    return [
        "-c",
        str(config),
        "--drain-time-s",
        str(drain_s),
        "--drain-strategy",
        "immediate",
        "--local-address-ip-version",
        "v4",
        "--file-flush-interval-msec",
        "1000",
        "--disable-hot-restart",
        "--allow-unknown-static-fields",
        "-l",
        log_level,
        "--component-log-level",
        "misc:error",
        "--concurrency",
        str(concurrency),
    ]


def _parse_stats(body: bytes, names: list[str]) -> dict[str, int]:
    """parseStats in pilot-agent's status/util/stats.go: the first line starting with each name,
    split on ":" into exactly two parts, the value an unsigned integer."""
    out: dict[str, int] = {}
    for line in body.decode().splitlines(keepends=True):
        for name in names:
            if name not in out and line.startswith(name):
                parts = line.split(":")
                assert len(parts) == 2, line
                out[name] = int(parts[1].strip())
    return out


def _start(
    tmp_path: Path, fixture: str, agent: TestUpstream, log_level: str = "info"
) -> tuple[MoorlineProc, dict[str, int], dict[str, Any]]:
    ports = {k: free_port() for k in ("admin", "prometheus", "status")}
    ports["agent"] = agent.port
    cfg = tmp_path / "envoy-rev.json"
    boot = _rewrite(FIXTURES / f"bootstrap_{fixture}_golden.json", cfg, ports, tmp_path)
    drain_s = int(float(boot["node"]["metadata"]["PROXY_CONFIG"]["drainDuration"].rstrip("s")))
    argv = _pilot_agent_argv(cfg, drain_s, log_level, 2)
    proc = procs.start_moorline(
        None, tmp_path / "run", subcommand=argv, admin=(H, ports["admin"]), wait="ready"
    )
    return proc, ports, boot


@pytest.fixture
def agent() -> Any:
    up = TestUpstream(upstream_id="pilot-agent-status").start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(autouse=True)
def _fixtures_present() -> None:
    if not (FIXTURES / "bootstrap_default_golden.json").is_file():
        pytest.skip("the shared fixtures checkout is absent")


@pytest.mark.parametrize("fixture", ["default", "running", "authsds"])
def test_ready_the_way_pilot_agent_checks(tmp_path: Path, agent: TestUpstream, fixture: str) -> None:
    """Started with pilot-agent's argv on an Istio bootstrap whose xDS server does not answer,
    moorline serves its static listeners and admin, and the readiness stats read LIVE (0) with
    the workers started; the update stats answer (zero, no xDS yet) in the same line format."""
    proc, ports, _ = _start(tmp_path, fixture, agent)
    try:
        res = proc.admin_get(READY_STATS)
        assert res.status == 200
        text = res.body.decode()
        assert "server.state" in text and "listener_manager.workers_started" in text, text
        got = _parse_stats(res.body, ["server.state", "listener_manager.workers_started"])
        assert got == {"server.state": 0, "listener_manager.workers_started": 1}
        res = proc.admin_get(UPDATE_STATS)
        assert res.status == 200
        names = [
            f"{p}.{s}"
            for p in ("cluster_manager.cds", "listener_manager.lds")
            for s in ("update_success", "update_rejected")
        ]
        assert set(_parse_stats(res.body, names).values()) <= {0}
        # The kubelet's readiness probe: the 15021 listener routes /healthz/ready to the agent.
        r = http_request(H, ports["status"], "GET", "/healthz/ready")
        assert r.status == 200 and json.loads(r.body)["upstream_id"] == "pilot-agent-status"
        # Prometheus scrapes the 15090 listener, which routes to the admin's /stats/prometheus.
        r = http_request(H, ports["prometheus"], "GET", "/stats/prometheus")
        assert r.status == 200 and b"# TYPE envoy_server_live gauge" in r.body
    finally:
        proc.stop()


def test_flags_server_info_config_dump_and_shutdown(tmp_path: Path, agent: TestUpstream) -> None:
    """Each flag pilot-agent passes is either visible in /server_info (Envoy's
    CommandLineOptions, decoded as pilot-agent decodes it) or named in the start-up log as
    ignored; /config_dump?include_eds decodes as a ConfigDump with the endpoints; active
    connections, /healthcheck/fail, graceful inbound-only and full drains, and /quitquitquit
    behave as pilot-agent expects."""
    proc, ports, boot = _start(tmp_path, "default", agent)
    procs.wait_for_log(proc.stderr_path, " ready (")
    log = proc.stderr_text()
    for flag in ("--disable-hot-restart", "--allow-unknown-static-fields"):
        assert f"{flag}: accepted and ignored" in log, log
    assert "--concurrency 2: moorline runs one worker" in log
    assert "--component-log-level misc:error: moorline has no 'misc' component; ignored" in log
    # application_log_config's text_format is the process log's line format
    assert "\tinfo\tenvoy main " in log and "\tthread=" in log, log

    info = json_format.Parse(
        proc.admin_get("/server_info").body, server_info_pb2.ServerInfo(), ignore_unknown_fields=True
    )
    assert info.state == server_info_pb2.ServerInfo.LIVE
    o = info.command_line_options
    assert o.config_path.endswith("envoy-rev.json")
    assert o.drain_time.ToSeconds() == 2 and o.file_flush_interval.ToMilliseconds() == 1000
    assert o.drain_strategy == o.Immediate and o.local_address_ip_version == o.v4
    assert o.concurrency == 2 and o.disable_hot_restart and o.allow_unknown_static_fields
    assert (o.log_level, o.component_log_level) == ("info", "misc:error")
    assert info.node.id == boot["node"]["id"] and info.node.cluster == "istio-proxy"

    dump = json_format.Parse(
        proc.admin_get("/config_dump?include_eds").body,
        config_dump_pb2.ConfigDump(),
        ignore_unknown_fields=True,
        descriptor_pool=descriptor_pool_resolver(),
    )
    types = [c.type_url.rsplit(".", 1)[-1] for c in dump.configs]
    assert types[:3] == ["BootstrapConfigDump", "ClustersConfigDump", "EndpointsConfigDump"]
    eds = config_dump_shared_pb2.EndpointsConfigDump()
    assert dump.configs[2].Unpack(eds)
    cla = {}
    for item in eds.static_endpoint_configs:
        a = endpoint_pb2.ClusterLoadAssignment()
        assert item.endpoint_config.Unpack(a)
        cla[a.cluster_name] = a
    sa = cla["agent"].endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == (H, agent.port)
    assert cla["xds-grpc"].endpoints[0].lb_endpoints[0].endpoint.address.pipe.path.endswith("xds-grpc.sock")
    plain = json.loads(proc.admin_get("/config_dump").body)
    assert "EndpointsConfigDump" not in json.dumps([c["@type"] for c in plain["configs"]])

    # activeProxyConnections: listener.* lines, summed, while one client holds a connection.
    held = socket.create_connection((H, ports["status"]), timeout=5)
    try:
        held.sendall(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.recv(65536).startswith(b"HTTP/1.1 200")
        lines = [
            ln for ln in proc.admin_get(ACTIVE_CX).body.decode().splitlines() if ln.startswith("listener.")
        ]
        assert sum(int(ln.split(":")[1]) for ln in lines) == 1, lines
        assert f"listener.{H}_{ports['status']}.downstream_cx_active: 1" in lines

        # /healthcheck/fail: server.state reads DRAINING (1), /ready answers 503.
        assert proc.admin_post("/healthcheck/fail").status == 200
        assert _parse_stats(proc.admin_get(READY_STATS).body, ["server.state"]) == {"server.state": 1}
        assert proc.admin_get("/ready").status == 503
        assert proc.admin_post("/healthcheck/ok").status == 200

        # Istio's listeners carry no traffic_direction: an inbound-only drain leaves them be.
        assert proc.admin_post("/drain_listeners?inboundonly&graceful").status == 200
        held.sendall(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = held.recv(65536)
        assert resp.startswith(b"HTTP/1.1 200") and b"connection: close" not in resp.lower()

        # A graceful drain of every listener: the idle keep-alive connection is closed at once
        # (--drain-strategy immediate), new connections are still accepted during the drain
        # time and answered with connection: close, and afterwards the listener stops accepting.
        assert proc.admin_post("/drain_listeners?graceful").status == 200
        held.settimeout(10)
        try:
            assert held.recv(65536) == b""
        except ConnectionResetError:
            pass
        r = http_request(H, ports["status"], "GET", "/healthz/ready")
        assert r.status == 200 and (r.header("connection") or "").lower() == "close"
    finally:
        held.close()
    deadline = time.monotonic() + 30
    while not procs.port_is_free(ports["status"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(OSError):
        socket.create_connection((H, ports["status"]), timeout=2).close()
    assert proc.admin_get("/ready").status == 200  # the admin still serves

    assert proc.admin_post("/quitquitquit").status == 200
    assert proc.wait(30) == 0


def test_log_format_and_service_node_flags(tmp_path: Path, agent: TestUpstream) -> None:
    """Older pilot-agents passed --log-format (and --service-cluster / --service-node): the
    pattern is the process log's line format, and the node id / cluster are the flags' values,
    as Envoy overrides the bootstrap's node with them."""
    ports = {k: free_port() for k in ("admin", "prometheus", "status")}
    ports["agent"] = agent.port
    cfg = tmp_path / "envoy-rev.json"
    boot = _rewrite(FIXTURES / "bootstrap_default_golden.json", cfg, ports, tmp_path)
    del boot["application_log_config"]  # Envoy refuses both at once
    cfg.write_text(json.dumps(boot))
    argv = [
        *_pilot_agent_argv(cfg, 2, "info", 1),
        "--service-cluster",
        "reviews.default",
        "--service-node",
        "sidecar~10.1.1.1~reviews-v1.default~default.svc.cluster.local",
        "--log-format",
        "[%Y-%m-%d %T.%e][%t][%l][%n] %v",
        "--parent-shutdown-time-s",
        "60",
    ]
    proc = procs.start_moorline(None, tmp_path / "run", subcommand=argv, admin=(H, ports["admin"]))
    try:
        info = json.loads(proc.admin_get("/server_info").body)
        assert info["node"]["cluster"] == "reviews.default"
        assert info["node"]["id"].startswith("sidecar~10.1.1.1~reviews-v1")
        assert info["command_line_options"]["parent_shutdown_time"] == "60s"
        procs.wait_for_log(proc.stderr_path, " ready (")
        log = proc.stderr_text()
        assert "[info][main] --parent-shutdown-time-s: accepted and ignored" in log, log
        assert re.search(
            r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\]\[\d+\]\[info\]\[main\] moorline .* ready", log, re.M
        ), log
    finally:
        proc.stop()


def test_both_log_formats_is_a_config_error(tmp_path: Path, agent: TestUpstream) -> None:
    """--log-format together with the bootstrap's application_log_config: exit 2 naming the
    field, as Envoy refuses it."""
    ports = {k: free_port() for k in ("admin", "prometheus", "status")}
    ports["agent"] = agent.port
    cfg = tmp_path / "envoy-rev.json"
    _rewrite(FIXTURES / "bootstrap_default_golden.json", cfg, ports, tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "moorline", *_pilot_agent_argv(cfg, 2, "info", 1), "--log-format", "%v"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert r.returncode == 2, r.stderr
    assert "application_log_config.log_format: cannot be set together with the --log-format" in r.stderr
