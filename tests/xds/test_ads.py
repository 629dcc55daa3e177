"""ADS (state of the world) against the test control plane (``moorline.testing.xds_server``),
with a real moorline process and real requests: ACK, NACK with the last good version kept,
state-of-the-world removal, and reconnection after the control plane restarts."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_pb2 import Listener
from google.protobuf import any_pb2

from moorline.config.loader import parse_message
from moorline.testing import procs
from moorline.testing.procs import free_port, http_request, wait_until
from moorline.testing.xds_server import XdsServer
from moorline.xds.files import CLUSTER_TYPE, LISTENER_TYPE

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _listener(port: int, route: dict[str, Any], name: str = "dyn") -> Listener:
    doc = procs.hcm_listener(name, port, [{"match": {"prefix": "/"}, **route}])
    return parse_message(doc, Listener)  # type: ignore[return-value]


def _cluster(name: str, port: int) -> Cluster:
    return parse_message(yaml.safe_load(yaml.safe_dump(procs.cluster(name, [port]))), Cluster)  # type: ignore[return-value]


_wait = functools.partial(wait_until, interval=0.1)


@pytest.fixture
def cp() -> Iterator[XdsServer]:
    s = XdsServer().start()
    yield s
    s.stop()


def _boot(tmp_path: Path, cp_port: int, be_port: int) -> Path:
    backend = procs.hcm_listener(
        "backend",
        be_port,
        [
            {
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "from be"}},
            }
        ],
    )
    doc = yaml.safe_load(procs.bootstrap([backend], [procs.cluster("xds", [cp_port])], free_port()))
    doc["node"] = {"id": "sidecar~10.0.0.1~test~default.svc.cluster.local", "cluster": "test"}
    doc["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    doc["dynamic_resources"] = {
        "ads_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
        },
        "cds_config": {"ads": {}, "resource_api_version": "V3"},
        "lds_config": {"ads": {}, "resource_api_version": "V3"},
    }
    boot = tmp_path / "ads.yaml"
    boot.write_text(yaml.safe_dump(doc, sort_keys=False))
    return boot


@pytest.mark.e2e
def test_ads_serves_acks_nacks_and_removes(tmp_path: Path, moorline: Any, cp: XdsServer) -> None:
    port, be = free_port(), free_port()
    cp.push(CLUSTER_TYPE, "c1", [_cluster("be", be)])
    cp.push(LISTENER_TYPE, "l1", [_listener(port, {"route": {"cluster": "be"}})])
    p = moorline(_boot(tmp_path, cp.port, be))
    first = cp.wait_for(lambda r: r.type_url == CLUSTER_TYPE)
    assert first.node.id.startswith("sidecar~") and not first.response_nonce  # the node, on the first request
    cp.wait_for(
        lambda r: r.type_url == LISTENER_TYPE and r.version_info == "l1" and not r.HasField("error_detail")
    )
    _wait(lambda: p.stat("listener_manager.lds.update_success") == 1, "the LDS ACK")
    assert http_request("127.0.0.1", port, "GET", "/").body == b"from be"
    assert p.stat("control_plane.connected_state") == 1

    # A NACK: a listener whose HCM config has a bad field. The last good version keeps serving.
    broken = Listener()
    broken.CopyFrom(_listener(port, {"route": {"cluster": "be"}}))
    broken.filter_chains[0].filters[0].typed_config.type_url = "type.googleapis.com/no.such.Type"
    nonce = cp.push(LISTENER_TYPE, "l2", [broken])
    nack = cp.wait_for(lambda r: r.type_url == LISTENER_TYPE and r.response_nonce == nonce)
    assert nack.HasField("error_detail") and nack.version_info == "l1", nack
    assert "resources[0]" in nack.error_detail.message
    assert http_request("127.0.0.1", port, "GET", "/").body == b"from be"
    assert p.stat("listener_manager.lds.update_rejected") == 1

    # A good update after the NACK, then removal (state of the world).
    direct = {"direct_response": {"status": 200, "body": {"inline_string": "l3"}}}
    nonce = cp.push(LISTENER_TYPE, "l3", [_listener(port, direct)])
    ack = cp.wait_for(lambda r: r.type_url == LISTENER_TYPE and r.response_nonce == nonce)
    assert ack.version_info == "l3" and not ack.HasField("error_detail")
    assert http_request("127.0.0.1", port, "GET", "/").body == b"l3"
    nonce = cp.push(CLUSTER_TYPE, "c2", [])
    cp.wait_for(lambda r: r.type_url == CLUSTER_TYPE and r.response_nonce == nonce)
    _wait(lambda: "be::" not in p.admin_get("/clusters").body.decode(), "the cluster removal")


@pytest.mark.e2e
def test_ads_reconnects_after_the_control_plane_restarts(tmp_path: Path, moorline: Any) -> None:
    port, be = free_port(), free_port()
    cp = XdsServer().start()
    cp_port = cp.port
    cp.push(CLUSTER_TYPE, "c1", [_cluster("be", be)])
    cp.push(LISTENER_TYPE, "l1", [_listener(port, {"route": {"cluster": "be"}})])
    p = moorline(_boot(tmp_path, cp_port, be))
    _wait(lambda: p.stat("listener_manager.lds.update_success") == 1, "the first LDS")
    cp.stop()
    _wait(lambda: p.stat("control_plane.connected_state") == 0, "the disconnect")
    assert http_request("127.0.0.1", port, "GET", "/").body == b"from be"  # still serving
    cp2 = XdsServer(port=cp_port).start()
    try:
        direct = {"direct_response": {"status": 200, "body": {"inline_string": "after restart"}}}
        cp2.push(CLUSTER_TYPE, "c1", [_cluster("be", be)])
        cp2.push(LISTENER_TYPE, "l2", [_listener(port, direct)])
        again = cp2.wait_for(lambda r: r.type_url == CLUSTER_TYPE, timeout=60)
        assert again.version_info == "c1"  # it resumes from what it has
        _wait(lambda: http_request("127.0.0.1", port, "GET", "/").body == b"after restart", "the update", 60)
        assert p.stat("control_plane.connected_state") == 1
    finally:
        cp2.stop()


@pytest.mark.e2e
def test_rds_over_ads_asks_by_name_and_follows_updates(tmp_path: Path, moorline: Any, cp: XdsServer) -> None:
    from envoy.config.route.v3.route_pb2 import RouteConfiguration

    from moorline.xds.files import ROUTE_TYPE

    port, be = free_port(), free_port()
    doc = procs.hcm_listener("dyn", port, [])
    tc = doc["filter_chains"][0]["filters"][0]["typed_config"]
    tc.pop("route_config", None)
    tc["rds"] = {"route_config_name": "r", "config_source": {"ads": {}, "resource_api_version": "V3"}}
    cp.push(CLUSTER_TYPE, "c1", [_cluster("be", be)])
    cp.push(LISTENER_TYPE, "l1", [parse_message(doc, Listener)])
    p = moorline(_boot(tmp_path, cp.port, be))
    ask = cp.wait_for(lambda r: r.type_url == ROUTE_TYPE)
    assert list(ask.resource_names) == ["r"]
    # Warming: the listener waits for its routes and is not bound meanwhile.
    _wait(lambda: p.stat("listener_manager.total_listeners_warming") == 1, "the listener to warm")
    with pytest.raises(ConnectionRefusedError):
        http_request("127.0.0.1", port, "GET", "/")

    def routes(body: str) -> RouteConfiguration:
        vh = {"name": "all", "domains": ["*"]}
        vh["routes"] = [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
        ]
        return parse_message({"name": "r", "virtual_hosts": [vh]}, RouteConfiguration)  # type: ignore[return-value]

    nonce = cp.push(ROUTE_TYPE, "r1", [routes("rds1")])
    ack = cp.wait_for(lambda r: r.type_url == ROUTE_TYPE and r.response_nonce == nonce)
    assert ack.version_info == "r1" and not ack.HasField("error_detail")
    _wait(lambda: p.stat("listener_manager.total_listeners_warming") == 0, "the listener to warm up")
    assert http_request("127.0.0.1", port, "GET", "/").body == b"rds1"
    assert p.stat("http.dyn.rds.r.update_success") == 1
    bad = routes("x")
    bad.virtual_hosts[0].routes[0].match.safe_regex.regex = "(unclosed"
    nonce = cp.push(ROUTE_TYPE, "r2", [bad])
    nack = cp.wait_for(lambda r: r.type_url == ROUTE_TYPE and r.response_nonce == nonce)
    assert nack.HasField("error_detail") and nack.version_info == "r1", nack
    assert http_request("127.0.0.1", port, "GET", "/").body == b"rds1"
    assert p.stat("http.dyn.rds.r.update_rejected") == 1


@pytest.mark.e2e
def test_eds_over_ads_asks_for_the_service_and_moves_traffic(
    tmp_path: Path, moorline: Any, cp: XdsServer
) -> None:
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

    from moorline.xds.files import ENDPOINT_TYPE

    port, be = free_port(), free_port()
    eds_cluster = parse_message(
        {
            "name": "svc",
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {
                "service_name": "svc-eds",
                "eds_config": {"ads": {}, "resource_api_version": "V3"},
            },
        },
        Cluster,
    )
    cp.push(CLUSTER_TYPE, "c1", [eds_cluster])
    cp.push(LISTENER_TYPE, "l1", [_listener(port, {"route": {"cluster": "svc"}})])
    p = moorline(_boot(tmp_path, cp.port, be))
    ask = cp.wait_for(lambda r: r.type_url == ENDPOINT_TYPE)
    assert list(ask.resource_names) == ["svc-eds"]
    assert http_request("127.0.0.1", port, "GET", "/").status == 503  # no endpoints yet

    def cla(ports: list[int]) -> ClusterLoadAssignment:
        eps = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": q}}}}
            for q in ports
        ]
        return parse_message(
            {"cluster_name": "svc-eds", "endpoints": [{"lb_endpoints": eps}]}, ClusterLoadAssignment
        )  # type: ignore[return-value]

    nonce = cp.push(ENDPOINT_TYPE, "e1", [cla([be])])
    ack = cp.wait_for(lambda r: r.type_url == ENDPOINT_TYPE and r.response_nonce == nonce)
    assert ack.version_info == "e1" and not ack.HasField("error_detail")
    assert http_request("127.0.0.1", port, "GET", "/").body == b"from be"
    nonce = cp.push(ENDPOINT_TYPE, "e2", [cla([0])])  # port 0: refused
    nack = cp.wait_for(lambda r: r.type_url == ENDPOINT_TYPE and r.response_nonce == nonce)
    assert nack.HasField("error_detail") and nack.version_info == "e1"
    assert http_request("127.0.0.1", port, "GET", "/").body == b"from be"
    assert p.stat("cluster.svc.update_rejected") == 1
    assert "Traceback" not in p.stderr_text()


class _Mgr:
    def __init__(self) -> None:
        self.live: dict[str, Any] = {}

    def compile(self, proto: Any, path: str = "") -> Any:
        return proto

    def add_or_update(self, proto: Any, path: str = "", version_info: str = "") -> Any:
        self.live[proto.name] = type("R", (), {"name": proto.name, "added_via_api": True})()

    def remove(self, name: str) -> bool:
        return self.live.pop(name, None) is not None

    def __iter__(self) -> Any:
        return iter(list(self.live.values()))


def test_responses_that_do_not_decode_or_were_not_asked_for_are_nacked() -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    from moorline.observability.stats import Store
    from moorline.xds.ads import AdsClient, AdsKind

    mgr = _Mgr()
    client = AdsClient(
        "127.0.0.1:1", None, [AdsKind(CLUSTER_TYPE, Cluster, mgr, "cluster_manager.cds")], Store()
    )
    good = any_pb2.Any()
    good.Pack(_cluster("a", 1))
    ack = client.handle(
        discovery_pb2.DiscoveryResponse(
            type_url=CLUSTER_TYPE, version_info="1", nonce="n1", resources=[good]
        ),
        discovery_pb2,
    )
    assert ack.version_info == "1" and ack.response_nonce == "n1" and not ack.HasField("error_detail")
    garbage = any_pb2.Any(type_url=CLUSTER_TYPE, value=b"\xff\xff\xff")
    wrong = any_pb2.Any()
    wrong.Pack(_listener(1, {"route": {"cluster": "a"}}))
    for resources, where in (([garbage], "cannot decode"), ([good, wrong], "resources[1]")):
        nack = client.handle(
            discovery_pb2.DiscoveryResponse(
                type_url=CLUSTER_TYPE, version_info="2", nonce="n2", resources=resources
            ),
            discovery_pb2,
        )
        assert nack.version_info == "1" and nack.response_nonce == "n2", nack
        assert nack.error_detail.code == 3 and where in nack.error_detail.message, nack
    assert set(mgr.live) == {"a"}  # nothing of the refused updates was applied
    other = client.handle(discovery_pb2.DiscoveryResponse(type_url=LISTENER_TYPE, nonce="n3"), discovery_pb2)
    assert other.HasField("error_detail") and "not subscribed" in other.error_detail.message


# --- the client on its own: delta, named resources, the initial fetch timeout -----------------


class _Named:
    """A named target recording what it was given."""

    def __init__(self, refuse: str | None = None) -> None:
        self.applied: list[tuple[str, str]] = []
        self.refuse = refuse
        self.timeouts = 0

    def check(self, proto: Any, path: str) -> None:
        from moorline.config.errors import ConfigError

        if self.refuse is not None and proto.name == self.refuse:
            raise ConfigError(path, "refused")

    def apply(self, proto: Any, version_info: str) -> None:
        self.applied.append((proto.name, version_info))

    def on_fetch_timeout(self) -> None:
        self.timeouts += 1


def _delta_resource(msg: Any, version: str) -> Any:
    from envoy.service.discovery.v3 import discovery_pb2

    a = any_pb2.Any()
    a.Pack(msg)
    return discovery_pb2.Resource(name=msg.name, version=version, resource=a)


def test_delta_client_applies_changes_and_removals_to_the_whole_state() -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    from moorline.observability.stats import Store
    from moorline.xds.ads import WildcardKind, XdsClient

    mgr = _Mgr()
    st = Store()
    client = XdsClient(
        "127.0.0.1:1", None, [WildcardKind(CLUSTER_TYPE, Cluster, mgr, "cluster_manager.cds")], st, delta=True
    )
    r1 = discovery_pb2.DeltaDiscoveryResponse(
        type_url=CLUSTER_TYPE,
        system_version_info="1",
        nonce="n1",
        resources=[_delta_resource(_cluster("a", 1), "va"), _delta_resource(_cluster("b", 2), "vb")],
    )
    ack = client.handle(r1)
    assert isinstance(ack, discovery_pb2.DeltaDiscoveryRequest)
    assert ack.response_nonce == "n1" and not ack.HasField("error_detail")
    assert set(mgr.live) == {"a", "b"}
    # Only "c" is sent and "a" removed: "b" stays (a delta never repeats what did not change).
    r2 = discovery_pb2.DeltaDiscoveryResponse(
        type_url=CLUSTER_TYPE,
        system_version_info="2",
        nonce="n2",
        resources=[_delta_resource(_cluster("c", 3), "vc")],
        removed_resources=["a"],
    )
    assert not client.handle(r2).HasField("error_detail")
    assert set(mgr.live) == {"b", "c"}
    # A reconnecting stream tells the server what it has.
    first = client._first_requests()
    assert dict(first[0].initial_resource_versions) == {"b": "vb", "c": "vc"}
    # A resource whose wrapper names another one, or that does not decode: NACK, nothing changes.
    wrong = _delta_resource(_cluster("d", 4), "vd")
    wrong.name = "e"
    nack = client.handle(
        discovery_pb2.DeltaDiscoveryResponse(type_url=CLUSTER_TYPE, nonce="n3", resources=[wrong])
    )
    assert nack.error_detail.code == 3 and "resources[0].name" in nack.error_detail.message
    assert set(mgr.live) == {"b", "c"}
    assert st.counter("cluster_manager.cds.update_rejected").value == 1
    assert st.counter("cluster_manager.cds.update_success").value == 2


def test_named_resources_are_kept_for_late_subscribers_and_time_out_when_absent() -> None:
    import asyncio

    from envoy.config.route.v3.route_pb2 import RouteConfiguration
    from envoy.service.discovery.v3 import discovery_pb2

    from moorline.observability.stats import Store
    from moorline.xds.ads import XdsClient
    from moorline.xds.files import ROUTE_TYPE

    client = XdsClient("127.0.0.1:1", None, [], Store())
    first, refusing = _Named(), _Named(refuse="r")
    client.subscribe(ROUTE_TYPE, RouteConfiguration, "r", first)
    a = any_pb2.Any()
    a.Pack(RouteConfiguration(name="r"))
    ok = client.handle(
        discovery_pb2.DiscoveryResponse(type_url=ROUTE_TYPE, version_info="1", nonce="n1", resources=[a])
    )
    assert ok.version_info == "1" and list(ok.resource_names) == ["r"]
    assert first.applied == [("r", "1")]
    # A target subscribing later (a listener replaced by an update) gets it at once.
    late = _Named()
    client.subscribe(ROUTE_TYPE, RouteConfiguration, "r", late)
    assert late.applied == [("r", "1")]
    # Every target checks before any applies: one refusing NACKs the response for all.
    client.subscribe(ROUTE_TYPE, RouteConfiguration, "r", refusing)
    nack = client.handle(
        discovery_pb2.DiscoveryResponse(type_url=ROUTE_TYPE, version_info="2", nonce="n2", resources=[a])
    )
    assert nack.HasField("error_detail") and nack.version_info == "1"
    assert first.applied == [("r", "1")]
    # A name nothing arrives for: the target hears of the timeout (and only then).
    loop = asyncio.new_event_loop()
    try:
        waiting, served = _Named(), _Named()
        client._loop = loop
        client.subscribe(ROUTE_TYPE, RouteConfiguration, "never", waiting, initial_fetch_timeout=0.05)
        client.subscribe(ROUTE_TYPE, RouteConfiguration, "r", served, initial_fetch_timeout=0.05)
        loop.run_until_complete(asyncio.sleep(0.2))
        assert waiting.timeouts == 1 and served.timeouts == 0
    finally:
        client._loop = None
        loop.close()
    # Targets that are gone are dropped from the next request, with what was kept for them.
    other = XdsClient("127.0.0.1:1", None, [], Store())
    keep, gone = _Named(), _Named()
    other.subscribe(ROUTE_TYPE, RouteConfiguration, "never", keep)
    other.subscribe(ROUTE_TYPE, RouteConfiguration, "r", gone)
    other.handle(
        discovery_pb2.DiscoveryResponse(type_url=ROUTE_TYPE, version_info="1", nonce="n1", resources=[a])
    )
    assert "r" in other.named[ROUTE_TYPE].received
    del gone
    assert other.named[ROUTE_TYPE].names() == ["never"]
    assert "r" not in other.named[ROUTE_TYPE].received
