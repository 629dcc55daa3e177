"""Route tables from real control-plane output: every route_config in the shared fixtures compiles,
and lookups return the clusters written in the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import udpa.type.v1.typed_struct_pb2  # noqa: F401  (registers TypedStruct so ParseDict resolves it)
import yaml
from envoy.config.route.v3 import route_pb2
from google.protobuf.json_format import ParseDict

from moorline.protocol.headers import HeaderMap
from moorline.proxy.route_table import DIRECT_RESPONSE, ROUTE, RouteTable
from moorline.testing.fixtures import FIXTURES as SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES
if not FIXTURES.exists():
    # CI lays shared/ beside the checkout.
    FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"

pytestmark = pytest.mark.skipif(not FIXTURES.exists(), reason="shared fixtures not present")


def _walk(o: Any, path: str, out: list[tuple[str, dict]]) -> None:
    if isinstance(o, dict):
        if "virtual_hosts" in o or path.endswith(".route_config"):
            out.append((path, o))
        for k, v in o.items():
            _walk(v, f"{path}.{k}", out)
    elif isinstance(o, list):
        for i, v in enumerate(o):
            _walk(v, f"{path}[{i}]", out)


def _strip_tpfc(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _strip_tpfc(v) for k, v in o.items() if k != "typed_per_filter_config"}
    if isinstance(o, list):
        return [_strip_tpfc(v) for v in o]
    return o


def load_route_configs(name: str) -> dict[str, tuple[RouteTable, bool]]:
    """All route_config objects anywhere in fixture ``name`` (RoutesConfigDump entries and HCMs'
    inline route_config), compiled; value: (table, whether typed_per_filter_config was stripped).

    ``typed_per_filter_config`` is only stripped when ParseDict cannot resolve an ``Any`` type
    (an extension xds-protos does not ship); the route matching under test does not read it.
    """
    f = FIXTURES / name
    doc = yaml.safe_load(f.read_text()) if f.suffix == ".yaml" else json.loads(f.read_text())
    found: list[tuple[str, dict]] = []
    _walk(doc, "", found)
    out: dict[str, tuple[RouteTable, bool]] = {}
    for path, rc in found:
        d = {k: v for k, v in rc.items() if k != "@type"}
        stripped = False
        try:
            proto = ParseDict(d, route_pb2.RouteConfiguration())
        except Exception:
            proto = ParseDict(_strip_tpfc(d), route_pb2.RouteConfiguration())
            stripped = True
        out[path] = (RouteTable.compile(proto, path.lstrip(".")), stripped)
    return out


def cluster_for(
    t: RouteTable, path: bytes = b"/", authority: bytes = b"svc:80", method: bytes = b"GET"
) -> str | None:
    r = t.match(authority, path, method, HeaderMap([(b"user-agent", b"curl")]))
    return None if r is None else r.pick_cluster(HeaderMap())


@pytest.mark.parametrize(
    "name",
    [
        "istio/sidecar_config_dump_full.json",
        "istio/sidecar_configdump_compare.json",
        "istio/sidecar_configdump_authz.json",
        "istio/bootstrap_default_golden.json",
        "istio/bootstrap_authsds_golden.json",
        "istio/bootstrap_running_golden.json",
        "envoy/envoy-demo.yaml",
        "envoy/envoy-edge.yaml",
    ],
)
def test_every_fixture_route_config_compiles(name: str) -> None:
    tables = load_route_configs(name)
    assert tables, name
    for path, (t, _) in tables.items():
        for vh in t.virtual_hosts:
            assert vh.routes or not vh.domains, path


def test_full_dump_routes() -> None:
    tables = load_route_configs("istio/sidecar_config_dump_full.json")
    static = tables[".configs[5].static_route_configs[0].route_config"][0]
    assert static.name == "inbound-vip|8000|http|httpbin.default.svc.cluster.local"
    assert cluster_for(static, b"/status/418?x=1", b"httpbin.default:8000") == (
        "inbound-vip|8000|http|httpbin.default.svc.cluster.local"
    )
    r = static.match(b"httpbin", b"/", b"GET", HeaderMap())
    assert r.name == "default" and r.kind == ROUTE
    # Istio: "timeout: 0s" disables the route timeout, grpc_timeout_header_max 0s = unlimited.
    assert r.timeout == 0.0 and r.max_grpc_timeout == 0.0 and r.max_stream_duration == 0.0
    names = {t.name: t for t, _ in tables.values()}
    assert cluster_for(names["inbound-vip|8100|http|httpbin.default.svc.cluster.local"]) == (
        "inbound-vip|8100|http|httpbin.default.svc.cluster.local"
    )
    assert cluster_for(names["encap"], b"/anything") == "encap"


def test_compare_dump_routes() -> None:
    tables = load_route_configs("istio/sidecar_configdump_compare.json")
    dyn = tables[".configs[2].dynamic_route_configs[0].route_config"][0]
    assert (
        cluster_for(dyn, b"/reviews/1", b"reviews:9080")
        == "inbound-vip|9080|http|reviews-v3.default.svc.cluster.local"
    )
    names = {t.name: t for t, _ in tables.values()}
    assert cluster_for(names["inbound-vip|9080|http|details.default.svc.cluster.local"], b"/details/0") == (
        "inbound-vip|9080|http|details.default.svc.cluster.local"
    )
    # The waypoint-style CONNECT route only answers CONNECT.
    connect = names["default"]
    assert cluster_for(connect, b"", b"10.0.0.1:9080", b"CONNECT") == "main_internal"
    assert cluster_for(connect, b"/", b"10.0.0.1:9080", b"GET") is None
    r = connect.match(b"10.0.0.1:9080", b"", b"CONNECT", HeaderMap())
    assert r.upgrade_configs == {b"connect": True}


def test_authz_dump_typed_per_filter_config_kept() -> None:
    tables = load_route_configs("istio/sidecar_configdump_authz.json")
    connect = [(t, s) for t, s in tables.values() if t.name == "default"]
    assert connect
    t, stripped = connect[0]
    assert not stripped  # TypedStruct is known once udpa's module is imported
    r = t.match(b"x:1", b"", b"CONNECT", HeaderMap())
    assert r.pick_cluster(HeaderMap()) == "main_internal"
    tpfc = r.typed_per_filter_config["connect_authority"]
    assert tpfc.type_url == "type.googleapis.com/udpa.type.v1.TypedStruct"
    assert any(cluster_for(t) == "inbound|80||" for t, _ in tables.values())


def test_bootstrap_golden_routes() -> None:
    tables = [t for t, _ in load_route_configs("istio/bootstrap_default_golden.json").values()]
    clusters = {cluster_for(t, b"/stats/prometheus") for t in tables} | {
        cluster_for(t, b"/healthz/ready") for t in tables
    }
    assert {"prometheus_stats", "agent"} <= clusters
    assert all(cluster_for(t, b"/other") is None for t in tables)


def test_envoy_example_routes() -> None:
    demo = [t for t, _ in load_route_configs("envoy/envoy-demo.yaml").values()]
    assert any(cluster_for(t, b"/x") == "loopback" for t in demo)
    edge = next(t for t, _ in load_route_configs("envoy/envoy-edge.yaml").values() if t.name == "local_route")
    r = edge.match(b"example.com", b"/content/a", b"GET", HeaderMap())
    assert r.cluster == "service_foo" and r.idle_timeout == 15.0
    r = edge.match(b"example.com", b"/other", b"GET", HeaderMap())
    assert r.kind == DIRECT_RESPONSE and (r.direct_status, r.direct_body) == (403, b"denied\n")
