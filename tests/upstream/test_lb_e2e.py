"""Locality weighted load balancing end to end: a real moorline with a STATIC cluster of test
upstreams in two localities (load_balancing_weight 1 and 3), driven with http.client. The
locality picker is an EDF schedule, so the split is exact up to the schedule's random start; a
stopped locality is noticed by active health checks and its traffic moves to the other one."""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from moorline.testing.procs import MoorlineProc, config_http, free_port, wait_until
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e


def _lle(zone: str, ups: list[TestUpstream], weight: int) -> dict[str, Any]:
    return {
        "locality": {"region": "eu", "zone": zone},
        "load_balancing_weight": weight,
        "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": u.port}}}}
            for u in ups
        ],
    }


def _svc(a: list[TestUpstream], b: list[TestUpstream]) -> dict[str, Any]:
    return {
        "name": "svc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "common_lb_config": {"locality_weighted_lb_config": {}},
        "load_assignment": {"cluster_name": "svc", "endpoints": [_lle("a", a, 1), _lle("b", b, 3)]},
        "health_checks": [
            {
                "timeout": "0.5s",
                "interval": "0.1s",
                "no_traffic_interval": "0.1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "tcp_health_check": {},
            }
        ],
    }


def _flags(ml: MoorlineProc) -> dict[int, str]:
    out = {}
    for line in ml.admin_get("/clusters").body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "svc" and parts[2] == "health_flags":
            out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return out


def _split(port: int, n: int) -> Counter[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen: Counter[str] = Counter()
    try:
        for _ in range(n):
            conn.request("GET", "/work")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
            seen[r.getheader("x-upstream-id") or ""] += 1
    finally:
        conn.close()
    return seen


def test_locality_weights_split_traffic_and_a_stopped_locality_fails_over(
    moorline: Callable[..., MoorlineProc], upstreams: Callable[..., TestUpstream]
) -> None:
    a1 = upstreams(upstream_id="a1")
    b1, b2 = upstreams(upstream_id="b1"), upstreams(upstream_id="b2")
    port = free_port()
    ml = moorline(config_http(port, [_svc([a1], [b1, b2])]))
    ports = {a1.port, b1.port, b2.port}
    wait_until(lambda: _flags(ml) == dict.fromkeys(ports, "healthy"), "every host's first health check")

    # 1 : 3 by locality, exact up to the schedule's random start (EDF, no randomness per pick);
    # inside b round robin alternates its two hosts.
    seen = _split(port, 400)
    assert set(seen) == {"a1", "b1", "b2"}
    assert abs(seen["a1"] - 100) <= 2, seen
    assert abs(seen["b1"] - 150) <= 2 and abs(seen["b2"] - 150) <= 2, seen
    assert sum(seen.values()) == 400

    # /clusters names each host's locality; the EDS view of the config dump has the weights.
    text = ml.admin_get("/clusters").body.decode()
    assert f"svc::127.0.0.1:{a1.port}::zone::a" in text and f"svc::127.0.0.1:{b2.port}::zone::b" in text
    assert f"svc::127.0.0.1:{b1.port}::region::eu" in text
    doc = json.loads(ml.admin_get("/clusters?format=json").body)
    (svc,) = [c for c in doc["cluster_statuses"] if c["name"] == "svc"]
    assert {h["locality"]["zone"] for h in svc["host_statuses"]} == {"a", "b"}
    dump = json.loads(ml.admin_get("/config_dump?include_eds").body)
    weights = {
        e["locality"]["zone"]: e["load_balancing_weight"]
        for cfg in dump["configs"]
        if cfg.get("@type", "").endswith("EndpointsConfigDump")
        for st in cfg.get("static_endpoint_configs", [])
        if st["endpoint_config"]["cluster_name"] == "svc"
        for e in st["endpoint_config"]["endpoints"]
    }
    assert weights == {"a": 1, "b": 3}

    # Locality a's only host stops: the health checker notices, and b takes every request (2 of
    # 3 hosts healthy: no panic).
    a1.stop()
    wait_until(lambda: _flags(ml).get(a1.port) == "/failed_active_hc", "a1's failed health check")
    seen = _split(port, 60)
    assert seen == Counter({"b1": 30, "b2": 30})
