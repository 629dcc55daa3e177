"""xDS over gRPC with live traffic, state of the world and delta, against the test control plane
(``moorline.testing.xds_server``) and a real moorline process: CDS with EDS clusters, LDS with RDS
listeners, warming, removal while requests are in flight, route swaps under load, NACKs while
traffic flows, control-plane restarts and listener drains."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf import any_pb2

from moorline.config.loader import parse_message
from moorline.testing import procs
from moorline.testing.procs import free_port, http_request, wait_until
from moorline.testing.upstream import TestUpstream
from moorline.testing.xds_server import XdsServer
from moorline.xds.files import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE

pytestmark = pytest.mark.e2e

MODES = ["sotw", "delta"]


_wait = wait_until


def eds_cluster(name: str, fetch_timeout: str | None = None) -> Cluster:
    src: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if fetch_timeout is not None:
        src["initial_fetch_timeout"] = fetch_timeout
    return parse_message(  # type: ignore[return-value]
        {
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {"service_name": name, "eds_config": src},
        },
        Cluster,
    )


def cla(name: str, ports: list[int]) -> ClusterLoadAssignment:
    eps = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": q}}}}
        for q in ports
    ]
    return parse_message({"cluster_name": name, "endpoints": [{"lb_endpoints": eps}]}, ClusterLoadAssignment)  # type: ignore[return-value]


def rds_listener(name: str, port: int, route_name: str, fetch_timeout: str | None = None) -> Listener:
    doc = procs.hcm_listener(name, port, [])
    tc = doc["filter_chains"][0]["filters"][0]["typed_config"]
    tc.pop("route_config", None)
    src: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if fetch_timeout is not None:
        src["initial_fetch_timeout"] = fetch_timeout
    tc["rds"] = {"route_config_name": route_name, "config_source": src}
    return parse_message(doc, Listener)  # type: ignore[return-value]


def routes(
    name: str, cluster: str | None = None, body: str | None = None, prefix: str = "/"
) -> RouteConfiguration:
    action: dict[str, Any] = (
        {"route": {"cluster": cluster}}
        if cluster is not None
        else {"direct_response": {"status": 200, "body": {"inline_string": body or ""}}}
    )
    vh = {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": prefix}, **action}]}
    return parse_message({"name": name, "virtual_hosts": [vh]}, RouteConfiguration)  # type: ignore[return-value]


def boot(tmp_path: Path, cp_port: int, mode: str, drain_s: float | None = None) -> Path:
    doc = yaml.safe_load(procs.bootstrap([], [procs.cluster("xds", [cp_port])], free_port()))
    doc["node"] = {"id": "sidecar~10.0.0.1~live~default.svc.cluster.local", "cluster": "live"}
    doc["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    doc["dynamic_resources"] = {
        "ads_config": {
            "api_type": "DELTA_GRPC" if mode == "delta" else "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
        },
        "cds_config": {"ads": {}, "resource_api_version": "V3"},
        "lds_config": {"ads": {}, "resource_api_version": "V3"},
    }
    path = tmp_path / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def cp() -> Iterator[XdsServer]:
    s = XdsServer().start()
    yield s
    s.stop()


@pytest.fixture
def ups() -> Iterator[tuple[TestUpstream, TestUpstream]]:
    a = TestUpstream(upstream_id="a").start()
    b = TestUpstream(upstream_id="b").start()
    yield a, b
    a.stop()
    b.stop()


def _start(moorline: Any, tmp_path: Path, cp: XdsServer, mode: str, **kw: Any) -> Any:
    return moorline(boot(tmp_path, cp.port, mode, **kw))


def _dump(p: Any, query: str = "") -> dict[str, Any]:
    import json

    r = p.admin_get(f"/config_dump{query}")
    assert r.status == 200, r.body
    return {c["@type"].rsplit(".", 1)[-1]: c for c in json.loads(r.body)["configs"]}


def _up(port: int, path: str = "/") -> tuple[int, str | None, bytes]:
    r = http_request("127.0.0.1", port, "GET", path)
    return r.status, r.header("x-upstream-id"), r.body


@pytest.mark.parametrize("mode", MODES)
def test_cds_eds_lds_rds_serve_update_and_remove(
    tmp_path: Path, moorline: Any, cp: XdsServer, ups: Any, mode: str
) -> None:
    a, b = ups
    port = free_port()
    cp.push(CLUSTER_TYPE, "c1", [eds_cluster("svc")])
    cp.push(LISTENER_TYPE, "l1", [rds_listener("edge", port, "r")])
    p = _start(moorline, tmp_path, cp, mode)
    ask = cp.wait_for(lambda r: r.type_url == ENDPOINT_TYPE)
    names = ask.resource_names_subscribe if mode == "delta" else ask.resource_names
    assert list(names) == ["svc"]
    # The cluster warms on its endpoints, the listener on its routes.
    _wait(lambda: p.stat("cluster_manager.warming_clusters") == 1, "the cluster to warm")
    _wait(lambda: p.stat("listener_manager.total_listeners_warming") == 1, "the listener to warm")
    dump = _dump(p)
    assert [c["cluster"]["name"] for c in dump["ClustersConfigDump"].get("dynamic_warming_clusters", [])] == [
        "svc"
    ]
    assert [d["warming_state"]["version_info"] for d in dump["ListenersConfigDump"]["dynamic_listeners"]] == [
        "l1"
    ]
    cp.push(ENDPOINT_TYPE, "e1", [cla("svc", [a.port])])
    _wait(lambda: p.stat("cluster_manager.warming_clusters") == 0, "the cluster to be active")
    cp.push(ROUTE_TYPE, "r1", [routes("r", "svc")])
    _wait(lambda: p.stat("listener_manager.total_listeners_warming") == 0, "the listener to be active")
    assert _up(port)[:2] == (200, "a")
    dump = _dump(p)
    (dc,) = dump["ClustersConfigDump"]["dynamic_active_clusters"]
    assert dc["version_info"] == "c1" and dc["cluster"]["name"] == "svc"
    (dl,) = dump["ListenersConfigDump"]["dynamic_listeners"]
    assert dl["active_state"]["version_info"] == "l1" and "warming_state" not in dl
    (rc,) = dump["RoutesConfigDump"]["dynamic_route_configs"]
    assert rc["version_info"] == "r1" and rc["route_config"]["name"] == "r"
    assert "EndpointsConfigDump" not in dump  # only with ?include_eds, as Envoy
    eds = _dump(p, "?include_eds")["EndpointsConfigDump"]["dynamic_endpoint_configs"]
    (ep,) = [e["endpoint_config"] for e in eds if e["endpoint_config"]["cluster_name"] == "svc"]
    sa = ep["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert sa["port_value"] == a.port
    # EDS moves traffic.
    cp.push(ENDPOINT_TYPE, "e2", [cla("svc", [b.port])])
    cp.acked(ENDPOINT_TYPE)
    assert _up(port)[:2] == (200, "b")
    # A second cluster added by CDS asks for its own endpoints; a route change reaches it.
    cp.push(CLUSTER_TYPE, "c2", [eds_cluster("svc"), eds_cluster("other")])
    cp.wait_for(
        lambda r: (
            r.type_url == ENDPOINT_TYPE
            and "other" in (r.resource_names_subscribe if mode == "delta" else r.resource_names)
        )
    )
    cp.push(ENDPOINT_TYPE, "e3", [cla("svc", [b.port]), cla("other", [a.port])])
    _wait(lambda: p.stat("cluster_manager.active_clusters") == 3, "two dynamic clusters")
    cp.push(ROUTE_TYPE, "r2", [routes("r", "other")])
    cp.acked(ROUTE_TYPE)
    assert _up(port)[:2] == (200, "a")
    # CDS removal: the route's cluster is gone -> 503 (no cluster), as in Envoy.
    cp.push(CLUSTER_TYPE, "c3", [eds_cluster("svc")])
    cp.acked(CLUSTER_TYPE)
    _wait(lambda: p.stat("cluster_manager.active_clusters") == 2, "the cluster removed")
    assert _up(port)[0] == 503
    # LDS removal closes the port.
    cp.push(LISTENER_TYPE, "l2", [])
    cp.acked(LISTENER_TYPE)
    _wait(lambda: procs.port_is_free(port), "the listener's port to close")
    assert p.stat("cluster_manager.cds.update_success") == 3
    assert p.stat("listener_manager.lds.update_success") == 2
    assert p.stat("control_plane.connected_state") == 1
    assert "Traceback" not in p.stderr_text()


@pytest.mark.parametrize("mode", MODES)
def test_initial_fetch_timeout_lets_warming_resources_go_ahead(
    tmp_path: Path, moorline: Any, cp: XdsServer, mode: str
) -> None:
    port = free_port()
    cp.push(CLUSTER_TYPE, "c1", [eds_cluster("svc", fetch_timeout="0.5s")])
    cp.push(LISTENER_TYPE, "l1", [rds_listener("edge", port, "r", fetch_timeout="0.5s")])
    p = _start(moorline, tmp_path, cp, mode)
    # Nothing comes for EDS or RDS: after the timeout both serve without it.
    _wait(lambda: p.stat("listener_manager.total_listeners_active") == 1, "the listener after the timeout")
    _wait(lambda: p.stat("cluster_manager.active_clusters") == 2, "the cluster after the timeout")
    assert p.stat("cluster_manager.warming_clusters") == 0
    assert _up(port)[0] == 404  # no routes yet
    cp.push(ROUTE_TYPE, "r1", [routes("r", "svc")])
    cp.acked(ROUTE_TYPE)
    assert _up(port)[0] == 503  # the cluster has no hosts yet (flag UH)
    assert "nothing received within the initial fetch timeout" in p.stderr_text()


class _Load:
    """Clients sending requests in a loop on keep-alive connections; every outcome recorded."""

    def __init__(self, port: int, clients: int = 3) -> None:
        self.port = port
        self.stop = threading.Event()
        self.results: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.results) + len(self.errors)

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/")
                r = conn.getresponse()
                body = r.read().decode()
                with self._lock:
                    self.results.append((r.status, r.getheader("x-upstream-id") or body))
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                # A keep-alive connection the proxy closed between requests is retried once on
                # a new connection (as any HTTP client does); a second failure is an error.
                if conn is not None:
                    conn.close()
                    conn = None
                try:
                    c2 = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                    c2.request("GET", "/")
                    r = c2.getresponse()
                    body = r.read().decode()
                    with self._lock:
                        self.results.append((r.status, r.getheader("x-upstream-id") or body))
                    conn = c2
                except (OSError, http.client.HTTPException) as e2:
                    with self._lock:
                        self.errors.append(f"{e!r} then {e2!r}")
        if conn is not None:
            conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_route_swaps_and_a_nack_under_load_fail_no_request(
    tmp_path: Path, moorline: Any, cp: XdsServer, ups: Any, mode: str
) -> None:
    a, b = ups
    port = free_port()
    cp.push(CLUSTER_TYPE, "c1", [eds_cluster("ca"), eds_cluster("cb")])
    cp.push(ENDPOINT_TYPE, "e1", [cla("ca", [a.port]), cla("cb", [b.port])])
    cp.push(ROUTE_TYPE, "r0", [routes("r", "ca")])
    cp.push(LISTENER_TYPE, "l1", [rds_listener("edge", port, "r")])
    p = _start(moorline, tmp_path, cp, mode)
    _wait(lambda: p.stat("listener_manager.total_listeners_active") == 1, "the listener")
    with _Load(port) as load:
        for i in range(1, 9):
            target = "cb" if i % 2 else "ca"
            nonce = cp.push(ROUTE_TYPE, f"r{i}", [routes("r", target)])
            cp.acked(ROUTE_TYPE, nonce)
            seen = load.count()
            _wait(lambda s=seen: load.count() >= s + 5, "requests after the swap")  # type: ignore[misc]
            if i == 4:
                bad = routes("r", "ca")
                bad.virtual_hosts[0].routes[0].match.safe_regex.regex = "(unclosed"
                nonce = cp.push(ROUTE_TYPE, "bad", [bad])
                nack = cp.nacked(ROUTE_TYPE, nonce)
                assert "regex" in nack.error_detail.message or "safe_regex" in nack.error_detail.message
                seen = load.count()
                _wait(lambda s=seen: load.count() >= s + 5, "requests after the NACK")  # type: ignore[misc]
    assert not load.errors, load.errors[:3]
    statuses = {s for s, _ in load.results}
    assert statuses == {200}, statuses
    assert {u for _, u in load.results} == {"a", "b"}
    assert p.stat("http.edge.rds.r.update_rejected") == 1
    assert "Traceback" not in p.stderr_text()


@pytest.mark.parametrize("mode", MODES)
def test_a_cluster_removed_with_requests_in_flight_lets_them_finish(
    tmp_path: Path, moorline: Any, cp: XdsServer, ups: Any, mode: str
) -> None:
    a, _b = ups
    port = free_port()
    cp.push(CLUSTER_TYPE, "c1", [eds_cluster("svc")])
    cp.push(ENDPOINT_TYPE, "e1", [cla("svc", [a.port])])
    cp.push(ROUTE_TYPE, "r1", [routes("r", "svc")])
    cp.push(LISTENER_TYPE, "l1", [rds_listener("edge", port, "r")])
    p = _start(moorline, tmp_path, cp, mode)
    _wait(lambda: p.stat("listener_manager.total_listeners_active") == 1, "the listener")
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(http_request("127.0.0.1", port, "GET", "/delay/1500")))
    t.start()
    _wait(lambda: any(r.path == "/delay/1500" for r in a.requests), "the request at the upstream")
    cp.push(CLUSTER_TYPE, "c2", [])
    cp.acked(CLUSTER_TYPE)
    _wait(lambda: p.stat("cluster_manager.active_clusters") == 1, "the cluster removed")
    assert _up(port)[0] == 503  # new requests: no cluster
    t.join(30)
    assert out and out[0].status == 200 and out[0].header("x-upstream-id") == "a"


@pytest.mark.parametrize("mode", MODES)
def test_a_changed_listener_drains_its_connections_while_new_ones_use_the_new_one(
    tmp_path: Path, moorline: Any, cp: XdsServer, ups: Any, mode: str
) -> None:
    a, b = ups
    port = free_port()
    cp.push(CLUSTER_TYPE, "c1", [eds_cluster("ca"), eds_cluster("cb")])
    cp.push(ENDPOINT_TYPE, "e1", [cla("ca", [a.port]), cla("cb", [b.port])])
    cp.push(ROUTE_TYPE, "r1", [routes("r1", "ca")])
    cp.push(LISTENER_TYPE, "l1", [rds_listener("edge", port, "r1")])
    p = _start(moorline, tmp_path, cp, mode)
    _wait(lambda: p.stat("listener_manager.total_listeners_active") == 1, "the listener")
    old = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    old.request("GET", "/")
    r0 = old.getresponse()
    r0.read()
    assert r0.getheader("x-upstream-id") == "a"
    old.request("GET", "/delay/1500")  # in flight on the old listener during the change
    _wait(lambda: any(r.path == "/delay/1500" for r in a.requests), "the slow request upstream")
    # The new version of the listener names other routes: it warms on them, then takes over.
    cp.push(ROUTE_TYPE, "r2", [routes("r1", "ca"), routes("r2", "cb")])
    cp.push(LISTENER_TYPE, "l2", [rds_listener("edge", port, "r2")])
    cp.acked(LISTENER_TYPE)
    _wait(lambda: p.stat("listener_manager.listener_modified") == 1, "the listener replaced")
    assert http_request("127.0.0.1", port, "GET", "/").header("x-upstream-id") == "b"
    assert p.stat("listener_manager.total_listeners_draining") == 1
    # The request in flight finishes on the old listener's routes and its connection is told
    # to close (drain); then the drain is over.
    r = old.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("x-upstream-id") == "a"
    assert r.getheader("connection") == "close"
    old.close()
    _wait(lambda: p.stat("listener_manager.total_listeners_draining") == 0, "the drain to finish")


@pytest.mark.parametrize("mode", MODES)
def test_control_plane_restart_reconnects_and_keeps_serving(
    tmp_path: Path, moorline: Any, ups: Any, mode: str
) -> None:
    a, b = ups
    cp = XdsServer().start()
    cp_port = cp.port
    port = free_port()
    try:
        cp.push(CLUSTER_TYPE, "c1", [eds_cluster("svc")])
        cp.push(ENDPOINT_TYPE, "e1", [cla("svc", [a.port])])
        cp.push(ROUTE_TYPE, "r1", [routes("r", "svc")])
        cp.push(LISTENER_TYPE, "l1", [rds_listener("edge", port, "r")])
        p = _start(moorline, tmp_path, cp, mode)
        _wait(lambda: p.stat("listener_manager.total_listeners_active") == 1, "the listener")
        assert _up(port)[:2] == (200, "a")
    finally:
        cp.stop()
    _wait(lambda: p.stat("control_plane.connected_state") == 0, "the disconnect")
    assert _up(port)[:2] == (200, "a")  # the last good config keeps serving
    cp2 = XdsServer(port=cp_port).start()
    try:
        cp2.push(CLUSTER_TYPE, "c1", [eds_cluster("svc")])
        cp2.push(ENDPOINT_TYPE, "e2", [cla("svc", [b.port])])
        cp2.push(ROUTE_TYPE, "r1", [routes("r", "svc")])
        cp2.push(LISTENER_TYPE, "l1", [rds_listener("edge", port, "r")])
        first = cp2.wait_for(lambda r: True)
        assert first.node.id.startswith("sidecar~")  # the node again on the new stream's first request
        if mode == "delta":
            # The new stream says what it already has, so nothing unchanged is sent again.
            cds = cp2.wait_for(lambda r: r.type_url == CLUSTER_TYPE)
            assert "svc" in cds.initial_resource_versions
        _wait(lambda: _up(port)[1] == "b", "the new endpoints")
        _wait(lambda: p.stat("control_plane.connected_state") == 1, "the reconnect")
    finally:
        cp2.stop()


def test_delta_nack_keeps_the_last_good_state_and_names_the_resource(
    tmp_path: Path, moorline: Any, cp: XdsServer, ups: Any
) -> None:
    a, _b = ups
    port = free_port()
    cp.push(CLUSTER_TYPE, "c1", [eds_cluster("svc")])
    cp.push(ENDPOINT_TYPE, "e1", [cla("svc", [a.port])])
    cp.push(ROUTE_TYPE, "r1", [routes("r", "svc")])
    cp.push(LISTENER_TYPE, "l1", [rds_listener("edge", port, "r")])
    p = _start(moorline, tmp_path, cp, "delta")
    _wait(lambda: p.stat("listener_manager.total_listeners_active") == 1, "the listener")
    garbage = any_pb2.Any(type_url=CLUSTER_TYPE, value=b"\xff\xff\xff")
    nonce = cp.push(CLUSTER_TYPE, "c2", [eds_cluster("svc"), garbage])
    nack = cp.nacked(CLUSTER_TYPE, nonce)
    assert "cannot decode" in nack.error_detail.message
    assert _up(port)[:2] == (200, "a")
    assert p.stat("cluster_manager.cds.update_rejected") == 1
