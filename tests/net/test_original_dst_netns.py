"""Transparent interception for real: iptables REDIRECT in a network namespace, as istio-iptables
sets up a pod, and moorline as the sidecar in it.

The namespace has two service addresses on its loopback (10.44.0.2, 10.44.0.3) where the test
upstreams listen, and nat OUTPUT rules that send every TCP connection to moorline's
virtualOutbound port, except moorline's own (it runs with group 1337, as Istio's proxy runs with
uid 1337) and connections to 127.0.0.1. A client in the namespace connects to a service's real
address; the checks are that the connection reached that service *through* moorline (stats,
access log and /clusters name the original destination) on the path Istio's config gives it:

- TCP: virtualOutbound (``use_original_dst``) has no listener for the port, so its own catch-all
  chain runs tcp_proxy to ``PassthroughCluster`` (ORIGINAL_DST), which connects to the original
  destination;
- HTTP: virtualOutbound hands the connection to the ``bind_to_port: false`` listener of the
  destination's port (``0.0.0.0:44080``, or the exact ``10.44.0.3:44080``), whose HCM routes to
  ``PassthroughCluster``;
- IPv6 the same way (ip6tables, ``IP6T_SO_ORIGINAL_DST``), through a ``[::]`` virtualOutbound;
- a connection straight to virtualOutbound's own port hits Istio's ``virtualOutbound-blackhole``
  chain (``BlackHoleCluster``: no endpoints) and is closed.

Inbound, as Istio's virtualInbound: a second namespace (the client) reaches the pod over a veth
pair; the pod's PREROUTING REDIRECT sends the connection to virtualInbound, whose original_dst
listener filter and ``destination_port`` chains take it to the app through
``InboundPassthroughClusterIpv4`` (ORIGINAL_DST), as HTTP on a port it knows and as TCP on one it
does not.

Needs root (CI runs as root) and iptables (scripts/install-deps.sh); without them the tests fail.
The namespace, with its rules and addresses, is deleted at the end even when a test fails.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moorline.testing.netns import NetNs, connect_veth, iptables_binary, redirect_inbound, redirect_outbound
from moorline.testing.procs import (
    MoorlineProc,
    bootstrap,
    file_access_log,
    http_request,
    parse_stats_text,
    start_moorline,
    wait_ready,
)
from moorline.testing.upstream import TcpEchoServer, TestUpstream

pytestmark = pytest.mark.e2e

# Inside the namespace (its own port space); kept in this worker's range all the same.
OUTBOUND_PORT = 44001
ADMIN_PORT = 44900
HTTP_PORT = 44080
TCP_PORT = 44090
SVC_A = "10.44.0.2"
SVC_B = "10.44.0.3"
SVC_V6 = "fd00:44::2"
PROXY_GID = 1337
LOG_FORMAT = (
    "listener=%REQ(X-ML-LISTENER?:X-FORWARDED-PROTO)% local=%DOWNSTREAM_LOCAL_ADDRESS% "
    "upstream=%UPSTREAM_HOST% cluster=%UPSTREAM_CLUSTER% code=%RESPONSE_CODE% path=%REQ(:PATH)%\n"
)

TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _tcp_proxy(cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP_PROXY, "stat_prefix": cluster, "cluster": cluster},
    }


def _http_listener(name: str, address: str, log: Path, inspectors: bool) -> dict[str, Any]:
    """An Istio outbound service listener: never bound, found by the original destination."""
    hcm = {
        "@type": HCM,
        "stat_prefix": f"outbound_{name}",
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": "allow_any",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "PassthroughCluster", "timeout": "0s"},
                            "response_headers_to_add": [{"header": {"key": "x-ml-listener", "value": name}}],
                        }
                    ],
                }
            ],
        },
        "http_filters": [ROUTER],
        "access_log": file_access_log(log, LOG_FORMAT),
    }
    lst: dict[str, Any] = {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": HTTP_PORT}},
        "bind_to_port": False,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [
            {
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
            }
        ],
    }
    if inspectors:
        # As Istio writes 0.0.0.0_80: inspectors, chains by transport and ALPN, a TCP fallback.
        lst["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
                },
            },
            {
                "name": "envoy.filters.listener.http_inspector",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
                },
            },
        ]
        lst["listener_filters_timeout"] = "0s"
        lst["continue_on_listener_filters_timeout"] = True
        lst["filter_chains"][0]["filter_chain_match"] = {
            "transport_protocol": "raw_buffer",
            "application_protocols": ["http/1.1", "h2c"],
        }
        lst["default_filter_chain"] = {
            "filter_chain_match": {},
            "filters": [_tcp_proxy("PassthroughCluster")],
            "name": "PassthroughFilterChain",
        }
    return lst


def _config(log: Path) -> str:
    virtual_outbound = {
        "name": "virtualOutbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND_PORT}},
        "use_original_dst": True,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [
            {
                "name": "virtualOutbound-blackhole",
                "filter_chain_match": {"destination_port": OUTBOUND_PORT},
                "filters": [_tcp_proxy("BlackHoleCluster")],
            },
            {"name": "virtualOutbound-catchall-tcp", "filters": [_tcp_proxy("PassthroughCluster")]},
        ],
    }
    clusters = [
        {
            "name": "PassthroughCluster",
            "type": "ORIGINAL_DST",
            "connect_timeout": "10s",
            "lb_policy": "CLUSTER_PROVIDED",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "use_downstream_protocol_config": {},
                }
            },
        },
        {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "10s"},
    ]
    # IPv6 capture (ip6tables REDIRECT to [::1]:44001; IP6T_SO_ORIGINAL_DST): the same chains.
    virtual_outbound6 = {
        **virtual_outbound,
        "name": "virtualOutbound6",
        "address": {"socket_address": {"address": "::", "port_value": OUTBOUND_PORT}},
    }
    listeners = [
        virtual_outbound,
        virtual_outbound6,
        _http_listener(f"0.0.0.0_{HTTP_PORT}", "0.0.0.0", log, inspectors=True),
        _http_listener(f"{SVC_B}_{HTTP_PORT}", SVC_B, log, inspectors=False),
    ]
    return bootstrap(listeners, clusters, ADMIN_PORT)


@dataclass
class Pod:
    ns: NetNs
    proxy: MoorlineProc
    svc_a: TestUpstream
    svc_b: TestUpstream
    echo: TcpEchoServer
    echo6: TcpEchoServer
    log: Path

    def admin(self, path: str) -> str:
        res = self.ns.run(http_request, "127.0.0.1", ADMIN_PORT, "GET", path)
        assert res.status == 200, (path, res.status)
        return res.body.decode()

    def stats(self) -> dict[str, int | str]:
        return parse_stats_text(self.admin("/stats"))

    def log_lines(self, n: int, timeout: float = 10.0) -> list[str]:
        """The access log once it has ``n`` lines (it is written in batches, off the request path)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log.read_text().splitlines() if self.log.exists() else []
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    tmp = tmp_path_factory.mktemp("origdst")
    log = tmp / "access.log"
    ns = NetNs("mlod", addresses=[f"{SVC_A}/32", f"{SVC_B}/32", f"{SVC_V6}/128"])
    started: list[Any] = []
    try:
        redirect_outbound(ns, OUTBOUND_PORT, PROXY_GID)
        redirect_outbound(ns, OUTBOUND_PORT, PROXY_GID, ipv6=True)
        svc_a = ns.run(TestUpstream(SVC_A, HTTP_PORT, upstream_id="svc-a").start)
        started.append(svc_a)
        svc_b = ns.run(TestUpstream(SVC_B, HTTP_PORT, upstream_id="svc-b").start)
        started.append(svc_b)
        echo = ns.run(TcpEchoServer(SVC_A, TCP_PORT).start)
        started.append(echo)
        echo6 = ns.run(TcpEchoServer(SVC_V6, TCP_PORT).start)
        started.append(echo6)
        wrap = ns.argv(["setpriv", f"--regid={PROXY_GID}", "--clear-groups", "--"])
        proxy = start_moorline(_config(log), tmp, wrap=wrap, wait="none", admin=("127.0.0.1", ADMIN_PORT))
        started.append(proxy)
        ns.run(wait_ready, "127.0.0.1", ADMIN_PORT, 20.0, proxy, timeout=30.0)
        yield Pod(ns, proxy, svc_a, svc_b, echo, echo6, log)
    finally:
        for s in reversed(started):
            s.stop()
        ns.close()


def test_rules_are_istio_like_and_scoped_to_the_namespace(pod: Pod) -> None:
    rules = pod.ns.iptables_rules()
    assert f"--gid-owner {PROXY_GID} -j RETURN" in rules
    assert f"--to-ports {OUTBOUND_PORT}" in rules
    # The host's own nat table does not carry them.
    host = subprocess.run([iptables_binary(), "-t", "nat", "-S"], capture_output=True, text=True, check=True)
    assert "MOORLINE_OUTPUT" not in host.stdout


def test_http_is_handed_to_the_unbound_listener_of_its_port(pod: Pod) -> None:
    before = pod.stats()
    res = pod.ns.run(http_request, SVC_A, HTTP_PORT, "GET", "/hello", headers={"x-ml-listener": "client"})
    assert res.status == 200
    body = json.loads(res.body)
    assert body["path"] == "/hello"
    # Reached the intended server, through moorline's 0.0.0.0:44080 listener.
    assert res.header("x-upstream-id") == "svc-a"
    assert res.header("x-ml-listener") == f"0.0.0.0_{HTTP_PORT}"
    assert pod.svc_a.requests[-1].path == "/hello"
    assert pod.svc_a.requests[-1].header("x-request-id")  # added by moorline's HCM
    after = pod.stats()
    key = f"listener.0.0.0.0_{HTTP_PORT}.downstream_cx_total"
    assert int(after[key]) == int(before.get(key, 0)) + 1
    rq = f"http.outbound_0.0.0.0_{HTTP_PORT}.downstream_rq_total"
    assert int(after[rq]) == int(before.get(rq, 0)) + 1
    # The handoff counts on the target listener, not on virtualOutbound.
    vo = f"listener.0.0.0.0_{OUTBOUND_PORT}.downstream_cx_total"
    assert int(after.get(vo, 0)) == int(before.get(vo, 0))
    up = "cluster.PassthroughCluster.upstream_rq_total"
    assert int(after[up]) == int(before.get(up, 0)) + 1
    lines = [ln for ln in pod.log_lines(1) if "path=/hello" in ln]
    assert lines, pod.log_lines(1)
    assert f"local={SVC_A}:{HTTP_PORT}" in lines[-1]
    assert f"upstream={SVC_A}:{HTTP_PORT}" in lines[-1]
    assert "cluster=PassthroughCluster code=200" in lines[-1]
    assert f"PassthroughCluster::{SVC_A}:{HTTP_PORT}::" in pod.admin("/clusters")


def test_http_exact_address_listener_wins_over_the_wildcard(pod: Pod) -> None:
    res = pod.ns.run(http_request, SVC_B, HTTP_PORT, "GET", "/exact")
    assert res.status == 200
    assert res.header("x-upstream-id") == "svc-b"
    assert res.header("x-ml-listener") == f"{SVC_B}_{HTTP_PORT}"
    assert pod.svc_b.requests[-1].path == "/exact"
    lines = [ln for ln in pod.log_lines(2) if "path=/exact" in ln]
    assert lines and f"local={SVC_B}:{HTTP_PORT}" in lines[-1]


def _echo_through(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def _closed_by_peer(host: str, port: int) -> bool:
    """Connect, say nothing, and see the other side close (FIN or reset) within the timeout."""
    with socket.create_connection((host, port), timeout=10) as s:
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True


def test_tcp_without_a_listener_goes_to_passthrough_cluster(pod: Pod) -> None:
    before = pod.stats()
    n = pod.echo.connections_total
    payload = b"through the sidecar " * 1000
    assert pod.ns.run(_echo_through, SVC_A, TCP_PORT, payload) == payload
    assert pod.echo.connections_total == n + 1
    after = pod.stats()
    vo = f"listener.0.0.0.0_{OUTBOUND_PORT}.downstream_cx_total"
    assert int(after[vo]) == int(before.get(vo, 0)) + 1
    t = "tcp.PassthroughCluster.downstream_cx_total"
    assert int(after[t]) == int(before.get(t, 0)) + 1
    rx = "tcp.PassthroughCluster.downstream_cx_rx_bytes_total"
    assert int(after[rx]) - int(before.get(rx, 0)) == len(payload)
    # The host made for the original destination is listed with its address.
    assert f"PassthroughCluster::{SVC_A}:{TCP_PORT}::" in pod.admin("/clusters")


def test_ipv6_tcp_is_captured_and_passed_through(pod: Pod) -> None:
    assert "--to-ports" in pod.ns.iptables_rules(ipv6=True)
    before = pod.stats()
    n = pod.echo6.connections_total
    payload = b"v6 " * 5000
    assert pod.ns.run(_echo_through, SVC_V6, TCP_PORT, payload) == payload
    assert pod.echo6.connections_total == n + 1
    after = pod.stats()
    vo6 = f"listener.[__]_{OUTBOUND_PORT}.downstream_cx_total"
    assert int(after[vo6]) == int(before.get(vo6, 0)) + 1
    assert f"PassthroughCluster::[{SVC_V6}]:{TCP_PORT}::" in pod.admin("/clusters")


def test_direct_connection_to_the_capture_port_is_blackholed(pod: Pod) -> None:
    before = pod.stats()
    # 127.0.0.1 is not redirected: this reaches virtualOutbound as itself, its destination
    # port is 44001, and Istio's blackhole chain closes it instead of looping back to itself.
    assert pod.ns.run(_closed_by_peer, "127.0.0.1", OUTBOUND_PORT)
    after = pod.stats()
    key = "cluster.BlackHoleCluster.upstream_cx_none_healthy"
    assert int(after[key]) == int(before.get(key, 0)) + 1
    t = "tcp.PassthroughCluster.downstream_cx_total"
    assert int(after[t]) == int(before.get(t, 0))


# -- inbound: virtualInbound behind a PREROUTING REDIRECT, a client in another namespace ----------

INBOUND_PORT = 44006
INBOUND_ADMIN = 44901
POD_IP = "10.45.0.2"
CLIENT_IP = "10.45.0.1"
APP_PORT = 44080  # an HTTP port the config knows (its own chain)
APP_TCP_PORT = 44090  # a port it does not (the passthrough chain)


def _inbound_config(log: Path) -> str:
    hcm = {
        "@type": HCM,
        "stat_prefix": f"inbound_0.0.0.0_{APP_PORT}",
        "route_config": {
            "name": f"inbound|{APP_PORT}||",
            "virtual_hosts": [
                {
                    "name": "inbound|http|0",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "InboundPassthroughClusterIpv4", "timeout": "0s"},
                            "response_headers_to_add": [
                                {"header": {"key": "x-ml-listener", "value": "inbound"}}
                            ],
                        }
                    ],
                }
            ],
        },
        "http_filters": [ROUTER],
        "access_log": file_access_log(log, LOG_FORMAT),
    }
    virtual_inbound = {
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": INBOUND_PORT}},
        "traffic_direction": "INBOUND",
        # As Istio writes it: the filter listed explicitly, chains by the original port.
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                },
            }
        ],
        "filter_chains": [
            {
                "name": "virtualInbound-blackhole",
                "filter_chain_match": {"destination_port": INBOUND_PORT},
                "filters": [_tcp_proxy("BlackHoleCluster")],
            },
            {
                "name": f"0.0.0.0_{APP_PORT}",
                "filter_chain_match": {"destination_port": APP_PORT},
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
            },
            {
                "name": "virtualInbound-catchall",
                "filter_chain_match": {"prefix_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 0}]},
                "filters": [_tcp_proxy("InboundPassthroughClusterIpv4")],
            },
        ],
    }
    clusters = [
        {
            "name": "InboundPassthroughClusterIpv4",
            "type": "ORIGINAL_DST",
            "connect_timeout": "10s",
            "lb_policy": "CLUSTER_PROVIDED",
        },
        {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "10s"},
    ]
    return bootstrap([virtual_inbound], clusters, INBOUND_ADMIN)


@dataclass
class InboundPod:
    pod: NetNs
    client: NetNs
    app: TestUpstream
    app_tcp: TcpEchoServer
    log: Path

    def stats(self) -> dict[str, int | str]:
        res = self.pod.run(http_request, "127.0.0.1", INBOUND_ADMIN, "GET", "/stats")
        assert res.status == 200
        return parse_stats_text(res.body.decode())


@pytest.fixture(scope="module")
def inbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InboundPod]:
    tmp = tmp_path_factory.mktemp("origdst-in")
    log = tmp / "access.log"
    started: list[Any] = []
    namespaces: list[NetNs] = []
    try:
        pod = NetNs("mlod")
        namespaces.append(pod)
        client = NetNs("mlod")
        namespaces.append(client)
        connect_veth(client, pod, f"{CLIENT_IP}/24", f"{POD_IP}/24")
        redirect_inbound(pod, INBOUND_PORT)
        app = pod.run(TestUpstream(POD_IP, APP_PORT, upstream_id="app").start)
        started.append(app)
        app_tcp = pod.run(TcpEchoServer(POD_IP, APP_TCP_PORT).start)
        started.append(app_tcp)
        wrap = pod.argv(["setpriv", f"--regid={PROXY_GID}", "--clear-groups", "--"])
        proxy = start_moorline(
            _inbound_config(log), tmp, wrap=wrap, wait="none", admin=("127.0.0.1", INBOUND_ADMIN)
        )
        started.append(proxy)
        pod.run(wait_ready, "127.0.0.1", INBOUND_ADMIN, 20.0, proxy, timeout=30.0)
        yield InboundPod(pod, client, app, app_tcp, log)
    finally:
        for s in reversed(started):
            s.stop()
        for ns in namespaces:
            ns.close()


def test_inbound_http_reaches_the_app_through_virtual_inbound(inbound: InboundPod) -> None:
    before = inbound.stats()
    res = inbound.client.run(http_request, POD_IP, APP_PORT, "GET", "/in")
    assert res.status == 200
    assert res.header("x-upstream-id") == "app" and res.header("x-ml-listener") == "inbound"
    rec = inbound.app.requests[-1]
    assert rec.path == "/in" and rec.header("x-request-id")
    after = inbound.stats()
    key = f"http.inbound_0.0.0.0_{APP_PORT}.downstream_rq_total"
    assert int(after[key]) == int(before.get(key, 0)) + 1
    deadline = time.monotonic() + 10
    while "path=/in" not in (inbound.log.read_text() if inbound.log.exists() else ""):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.05)
    line = next(ln for ln in inbound.log.read_text().splitlines() if "path=/in" in ln)
    assert (
        f"local={POD_IP}:{APP_PORT} upstream={POD_IP}:{APP_PORT} cluster=InboundPassthroughClusterIpv4"
        in line
    )


def test_inbound_tcp_on_an_unknown_port_is_passed_through(inbound: InboundPod) -> None:
    before = inbound.stats()
    payload = b"inbound " * 2000
    assert inbound.client.run(_echo_through, POD_IP, APP_TCP_PORT, payload) == payload
    after = inbound.stats()
    key = "tcp.InboundPassthroughClusterIpv4.downstream_cx_total"
    assert int(after[key]) == int(before.get(key, 0)) + 1
    bh = "cluster.BlackHoleCluster.upstream_cx_none_healthy"
    assert int(after.get(bh, 0)) == int(before.get(bh, 0))
