"""EDS over ADS (``moorline.testing.xds_server``) with locality weighted load balancing: each
assignment's ``LocalityLbEndpoints.load_balancing_weight`` rebuilds the locality schedule of the
running cluster, seen through real requests to test upstreams."""

from __future__ import annotations

import http.client
import importlib.util
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

from moorline.config.loader import parse_message
from moorline.testing.procs import free_port
from moorline.testing.upstream import TestUpstream
from moorline.testing.xds_server import XdsServer
from moorline.xds.files import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE

_spec = importlib.util.spec_from_file_location("_test_ads", Path(__file__).with_name("test_ads.py"))
assert _spec is not None and _spec.loader is not None
_ads: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ads)

pytestmark = pytest.mark.e2e


@pytest.fixture
def cp() -> Iterator[XdsServer]:
    s = XdsServer().start()
    yield s
    s.stop()


def _cla(a: TestUpstream, wa: int, b: TestUpstream, wb: int) -> ClusterLoadAssignment:
    def lle(zone: str, up: TestUpstream, w: int) -> dict[str, Any]:
        ep = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": up.port}}}}
        return {"locality": {"zone": zone}, "load_balancing_weight": w, "lb_endpoints": [ep]}

    return parse_message(  # type: ignore[return-value]
        {"cluster_name": "svc-eds", "endpoints": [lle("a", a, wa), lle("b", b, wb)]}, ClusterLoadAssignment
    )


def _split(port: int, n: int) -> Counter[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen: Counter[str] = Counter()
    try:
        for _ in range(n):
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            seen[r.getheader("x-upstream-id") or str(r.status)] += 1
    finally:
        conn.close()
    return seen


def test_eds_updates_rebuild_the_locality_schedule(
    tmp_path: Path, moorline: Any, cp: XdsServer, upstreams: Callable[..., TestUpstream]
) -> None:
    a, b = upstreams(upstream_id="a"), upstreams(upstream_id="b")
    port = free_port()
    eds_cluster = parse_message(
        {
            "name": "svc",
            "type": "EDS",
            "connect_timeout": "1s",
            "common_lb_config": {"locality_weighted_lb_config": {}},
            "eds_cluster_config": {
                "service_name": "svc-eds",
                "eds_config": {"ads": {}, "resource_api_version": "V3"},
            },
        },
        Cluster,
    )
    cp.push(CLUSTER_TYPE, "c1", [eds_cluster])
    cp.push(LISTENER_TYPE, "l1", [_ads._listener(port, {"route": {"cluster": "svc"}})])
    moorline(_ads._boot(tmp_path, cp.port, free_port()))
    cp.wait_for(lambda r: r.type_url == ENDPOINT_TYPE)

    nonce = cp.push(ENDPOINT_TYPE, "e1", [_cla(a, 1, b, 3)])
    cp.wait_for(lambda r: r.type_url == ENDPOINT_TYPE and r.response_nonce == nonce)
    seen = _split(port, 400)
    assert abs(seen["a"] - 100) <= 2 and seen["a"] + seen["b"] == 400, seen

    # Same hosts, weights swapped: the schedule follows the new assignment.
    nonce = cp.push(ENDPOINT_TYPE, "e2", [_cla(a, 3, b, 1)])
    ack = cp.wait_for(lambda r: r.type_url == ENDPOINT_TYPE and r.response_nonce == nonce)
    assert not ack.HasField("error_detail")
    seen = _split(port, 400)
    assert abs(seen["a"] - 300) <= 2 and seen["a"] + seen["b"] == 400, seen

    # A locality weight of 0 is refused (Envoy's validation): NACK, the last good weights stay.
    nonce = cp.push(ENDPOINT_TYPE, "e3", [_cla(a, 0, b, 1)])
    nack = cp.wait_for(lambda r: r.type_url == ENDPOINT_TYPE and r.response_nonce == nonce)
    assert nack.HasField("error_detail") and "load_balancing_weight" in nack.error_detail.message
    seen = _split(port, 400)
    assert abs(seen["a"] - 300) <= 2, seen
