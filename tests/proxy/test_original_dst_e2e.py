"""Istio's PassthroughCluster (ORIGINAL_DST) and BlackHoleCluster (STATIC, no endpoints) through
a real moorline on loopback, without iptables: the HTTP router with the
``x-envoy-original-dst-host`` override, a connection that was not redirected (no original
destination: 503 ``UH`` / closed, as Envoy), the blackhole for both tcp_proxy and the router,
and a ``bind_to_port: false`` listener that is compiled and listed but never bound. The
iptables path is tests/net/test_original_dst_netns.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from moorline.testing.procs import (
    bootstrap,
    free_port,
    hcm_listener,
    http_request,
    port_is_free,
    tcp_listener,
    wait_for_log,
)
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e


def _passthrough(**extra: Any) -> dict[str, Any]:
    return {
        "name": "PassthroughCluster",
        "type": "ORIGINAL_DST",
        "connect_timeout": "2s",
        "lb_policy": "CLUSTER_PROVIDED",
        **extra,
    }


BLACKHOLE = {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "2s"}


def _closed_without_answer(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True


def test_router_passthrough_override_header_blackhole_and_no_destination(
    moorline: Any, upstream: TestUpstream, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "access.log"
    routes = [
        {"match": {"prefix": "/blackhole"}, "route": {"cluster": "BlackHoleCluster"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "PassthroughCluster"}},
    ]
    lst = hcm_listener("http", port, routes, access_log_path=log)
    cfg = bootstrap([lst], [_passthrough(original_dst_lb_config={"use_http_header": True}), BLACKHOLE])
    proc = moorline(cfg)
    target = f"127.0.0.1:{upstream.port}"
    r = http_request("127.0.0.1", port, "GET", "/via-header", headers={"x-envoy-original-dst-host": target})
    assert r.status == 200 and json.loads(r.body)["path"] == "/via-header"
    assert upstream.requests[-1].path == "/via-header"
    assert wait_for_log(log, "path=/via-header")
    assert f"upstream={target} cluster=PassthroughCluster" in log.read_text()
    # No header and no original destination (this listener has no original_dst filter and
    # nothing redirected the connection): no host, as Envoy.
    r = http_request("127.0.0.1", port, "GET", "/nowhere")
    assert r.status == 503 and b"no healthy upstream" in r.body
    assert "code=503 flags=UH method=GET path=/nowhere" in wait_for_log(log, "path=/nowhere")
    r = http_request(
        "127.0.0.1", port, "GET", "/bad", headers={"x-envoy-original-dst-host": "upstream.svc:80"}
    )
    assert r.status == 503
    r = http_request("127.0.0.1", port, "GET", "/blackhole")
    assert r.status == 503
    assert "code=503 flags=UH method=GET path=/blackhole" in wait_for_log(log, "path=/blackhole")
    st = proc.stats()
    assert st["cluster.PassthroughCluster.original_dst_host_invalid"] == 1
    assert st["cluster.PassthroughCluster.upstream_rq_total"] == 1
    assert st["cluster.PassthroughCluster.membership_total"] == 1
    assert all(rec.path not in ("/nowhere", "/bad", "/blackhole") for rec in upstream.requests)
    assert f"PassthroughCluster::{target}::" in proc.admin_get("/clusters").body.decode()


def test_tcp_proxy_blackhole_and_passthrough_without_destination(moorline: Any) -> None:
    bh, pt = free_port(), free_port()
    cfg = bootstrap(
        [tcp_listener("bh", bh, "BlackHoleCluster"), tcp_listener("pt", pt, "PassthroughCluster")],
        [_passthrough(), BLACKHOLE],
    )
    proc = moorline(cfg)
    assert _closed_without_answer(bh)
    assert _closed_without_answer(pt)
    st = proc.stats()
    assert st["cluster.BlackHoleCluster.upstream_cx_none_healthy"] == 1
    assert st["cluster.PassthroughCluster.upstream_cx_none_healthy"] == 1
    assert st["cluster.PassthroughCluster.upstream_cx_total"] == 0


def test_bind_to_port_false_listener_is_compiled_listed_and_not_bound(moorline: Any) -> None:
    bound, unbound = free_port(), free_port()
    lst = hcm_listener(
        "svc_unbound", unbound, [{"match": {"prefix": "/"}, "route": {"cluster": "PassthroughCluster"}}]
    )
    lst["bind_to_port"] = False
    lst["address"]["socket_address"]["address"] = "0.0.0.0"
    proc = moorline(bootstrap([tcp_listener("vo", bound, "PassthroughCluster"), lst], [_passthrough()]))
    assert port_is_free(unbound)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", unbound), timeout=2).close()
    listed = proc.admin_get("/listeners").body.decode()
    assert f"svc_unbound::0.0.0.0:{unbound}" in listed
    dump = json.loads(proc.admin_get("/config_dump").body)
    names = {}
    for cfg in dump["configs"]:
        if cfg["@type"].endswith("ListenersConfigDump"):
            for entry in cfg.get("static_listeners", []):
                names[entry["listener"]["name"]] = entry["listener"]
    assert names["svc_unbound"].get("bind_to_port") is False
    assert "vo" in names
