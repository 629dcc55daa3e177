"""One port, four protocols, real peers: HTTP/1.1 and h2c (curl) to a test upstream through the
HTTP connection manager, SOFARPC Bolt (sofa-rpc-node) to a sofa-rpc-node server and Dubbo
(dubbo-ssl-python) to the Dubbo test server through rpc_proxy, each connection's protocol told by
the rpc_inspector listener filter from its first bytes and its chain chosen by
``filter_chain_match.application_protocols``, as MOSN's ``auto`` protocol does."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dubbo_ssl.client import DubboClient

from moorline.testing import procs, sofa
from moorline.testing.dubbo_server import DubboTestServer
from moorline.testing.procs import MoorlineProc
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

TS = "type.googleapis.com/xds.type.v3.TypedStruct"


def _rpc_chain(protocol: str, cluster: str) -> dict[str, Any]:
    chain = sofa.rpc_proxy_listener(
        protocol, 0, cluster_name=cluster, protocol=protocol, stat_prefix=protocol
    )["filter_chains"][0]
    chain["filter_chain_match"] = {"application_protocols": [protocol]}
    return chain


def config(port: int, web: int, bolt: int, dubbo: int) -> str:
    lst = procs.hcm_listener("mixed", port, [{"match": {"prefix": "/"}, "route": {"cluster": "web"}}])
    hcm_chain = lst["filter_chains"][0]
    hcm_chain["filter_chain_match"] = {"application_protocols": ["http/1.1", "h2c"]}
    lst["filter_chains"] = [hcm_chain, _rpc_chain("bolt", "bolt_svc"), _rpc_chain("dubbo", "dubbo_svc")]
    lst["listener_filters"] = [
        {
            "name": "moorline.filters.listener.rpc_inspector",
            "typed_config": {
                "@type": TS,
                "type_url": "type.googleapis.com/moorline.filters.listener.rpc_inspector.v1.RpcInspector",
                "value": {},
            },
        }
    ]
    lst["listener_filters_timeout"] = "5s"
    clusters = [
        procs.cluster("web", [web]),
        procs.cluster("bolt_svc", [bolt]),
        procs.cluster("dubbo_svc", [dubbo]),
    ]
    return procs.bootstrap([lst], clusters)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[sofa.SofaServerProc, DubboTestServer]]:
    s = sofa.start_sofa_server(0, tmp_path)
    d = DubboTestServer(server_id="d").start()
    try:
        yield s, d
    finally:
        s.stop(signal.SIGTERM, 5)
        d.stop()


def test_http_h2c_bolt_and_dubbo_on_one_port(
    moorline: Callable[..., MoorlineProc],
    upstream: TestUpstream,
    peers: tuple[sofa.SofaServerProc, DubboTestServer],
) -> None:
    bolt_srv, dubbo_srv = peers
    port = procs.free_port()
    proc = moorline(config(port, upstream.port, bolt_srv.port, dubbo_srv.port))
    curl = procs.require_binary("curl")
    for flag in ("--http1.1", "--http2-prior-knowledge"):
        r = subprocess.run(
            [
                curl,
                "-sS",
                "--max-time",
                "10",
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
                f"http://127.0.0.1:{port}/x",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == "200"
    assert [q.path for q in upstream.requests] == ["/x", "/x"]

    results = sofa.run_sofa_client(port, {"steps": [sofa.call("echo", {"string": "via one port"}, count=3)]})
    assert [(x["ok"], x.get("value")) for x in results] == [(True, "via one port")] * 3

    dc = DubboClient("com.example.EchoService", "", version="1.0.0", host=f"127.0.0.1:{port}")
    assert dc.call("echo", ["dubbo via one port"], timeout=10) == "dubbo via one port"

    assert proc.stat("rpc_proxy.bolt.response_success") == 3
    assert proc.stat("rpc_proxy.dubbo.response_success") == 1
    assert proc.stat("rpc_inspector.http1_found") >= 1
    assert proc.stat("cluster.web.upstream_rq_total") == 2
