"""Warming through a server's own managers, in memory (a ``moorline.server.Server`` built from a
bootstrap whose ADS stream is never started): what a warming listener or cluster waits on, and
that nothing keeps a replaced or removed one alive."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import yaml
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_pb2 import Listener

from moorline.config.loader import load_bootstrap, parse_message
from moorline.server import Server
from moorline.testing import procs
from moorline.xds.sds import SECRET_TYPE

DTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _sds(secret: str, fetch_timeout: str = "0s") -> dict[str, Any]:
    # Istio asks for its secrets with initial_fetch_timeout 0: wait for them as long as it takes.
    return {
        "tls_certificate_sds_secret_configs": [
            {"name": secret, "sds_config": {"ads": {}, "initial_fetch_timeout": fetch_timeout}}
        ]
    }


def tls_listener(body: str, secret: str = "default", name: str = "tls", port: int = 0) -> Listener:
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}
    doc = procs.hcm_listener(name, port, [route])
    doc["filter_chains"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": DTLS, "common_tls_context": _sds(secret)},
    }
    return parse_message(doc, Listener)  # type: ignore[return-value]


def eds_tls_cluster(name: str, secret: str = "default", timeout: str = "1s") -> Cluster:
    doc = {
        "name": name,
        "type": "EDS",
        "connect_timeout": timeout,
        "eds_cluster_config": {
            "eds_config": {"ads": {}, "initial_fetch_timeout": "0s"},
            "service_name": name,
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": UTLS, "common_tls_context": _sds(secret)},
        },
    }
    return parse_message(doc, Cluster)  # type: ignore[return-value]


def ads_server() -> Server:
    """A server with CDS and LDS over ADS (to 127.0.0.1:1; the stream is never started)."""
    doc = yaml.safe_load(procs.bootstrap([], [procs.cluster("xds", [1])]))
    doc["node"] = {"id": "sidecar", "cluster": "test"}
    doc["dynamic_resources"] = {
        "ads_config": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
        "cds_config": {"ads": {}},
        "lds_config": {"ads": {}},
    }
    return Server(load_bootstrap(yaml_text=yaml.safe_dump(doc)), "test")


def test_a_listener_replaced_while_it_warms_on_a_shared_secret_is_not_kept_alive() -> None:
    s = ads_server()
    lm = s.listener_manager
    first = lm.add_or_update(tls_listener("one"))
    assert list(lm.warming) == ["tls"]
    gone = weakref.ref(first)
    del first
    # The secret never comes; every new version of the listener replaces the warming one.
    for i in range(3):
        lm.add_or_update(tls_listener(f"v{i}"))
    gc.collect()
    assert gone() is None
    lm.remove("tls")
    assert not lm.warming


def test_an_eds_cluster_with_an_sds_secret_warms_on_both() -> None:
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

    s = ads_server()
    cm = s.cluster_manager
    c = cm.add_or_update(eds_tls_cluster("svc"))
    assert sorted(t.name for t in c.init_targets) == ["eds svc", "sds default"]
    # The assignment alone does not install it: it would have no certificates.
    ads = s.xds.ads
    assert ads is not None
    eds = ads.named["type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"]
    for ref in eds.targets["svc"]:
        ref().apply(ClusterLoadAssignment(cluster_name="svc"), "1")
    assert "svc" in cm.warming and cm.get("svc") is None
    for ref in ads.named[SECRET_TYPE].targets["default"]:
        ref().on_fetch_timeout()
    assert cm.get("svc") is c and not cm.warming


def test_a_cluster_replaced_while_it_warms_on_a_shared_secret_is_not_kept_alive() -> None:
    s = ads_server()
    cm = s.cluster_manager
    first = cm.add_or_update(eds_tls_cluster("svc", timeout="1s"))
    assert list(cm.warming) == ["svc"]
    gone = weakref.ref(first)
    del first
    cm.add_or_update(eds_tls_cluster("svc", timeout="2s"))
    gc.collect()
    assert gone() is None


def test_a_secret_no_listener_uses_any_more_leaves_the_subscription() -> None:
    s = ads_server()
    lm = s.listener_manager
    ads = s.xds.ads
    assert ads is not None
    lm.add_or_update(tls_listener("one", secret="first"))
    lm.add_or_update(tls_listener("two", secret="second"))  # replaces the warming one
    lm.compile(tls_listener("refused", secret="third"))  # (an update's check, then refused)
    gc.collect()
    assert ads.named[SECRET_TYPE].names() == ["second"]
    assert [p.name for p in s.secrets.xds_providers()] == ["second"]  # (/config_dump's warming ones)
    lm.remove("tls")
    gc.collect()
    assert ads.named[SECRET_TYPE].names() == []
    assert s.secrets.xds_providers() == []


def _sotw(type_url: str, version: str, nonce: str, protos: list[Any]) -> Any:
    from envoy.service.discovery.v3 import discovery_pb2 as pb
    from google.protobuf import any_pb2

    anys = []
    for p in protos:
        a = any_pb2.Any()
        a.Pack(p)
        anys.append(a)
    return pb.DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce, resources=anys)


def test_an_update_naming_a_static_resource_is_refused_whole() -> None:
    from moorline.xds.files import CLUSTER_TYPE

    s = ads_server()
    ads = s.xds.ads
    assert ads is not None
    new = parse_message(procs.cluster("new", [1]), Cluster)
    static = parse_message(procs.cluster("xds", [2]), Cluster)  # the bootstrap's own
    nack = ads.handle(_sotw(CLUSTER_TYPE, "1", "n1", [new, static]))
    assert nack.error_detail.code == 3 and "resources[1].name" in nack.error_detail.message
    assert s.cluster_manager.get("new") is None  # nothing of it applied
    assert s.cluster_manager.get("xds") is not None and not s.cluster_manager.get("xds").added_via_api


def test_an_address_moves_from_a_removed_listener_to_a_new_one_in_one_update() -> None:
    from moorline.xds.files import LISTENER_TYPE

    s = ads_server()
    ads = s.xds.ads
    assert ads is not None
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    old = parse_message(procs.hcm_listener("old", 48001, [route]), Listener)
    new = parse_message(procs.hcm_listener("new", 48001, [route]), Listener)
    assert not ads.handle(_sotw(LISTENER_TYPE, "1", "n1", [old])).HasField("error_detail")
    ack = ads.handle(_sotw(LISTENER_TYPE, "2", "n2", [new]))
    assert not ack.HasField("error_detail"), ack.error_detail.message
    assert [lst.name for lst in s.listener_manager] == ["new"]


def eds_cluster(name: str, timeout: str = "1s") -> Cluster:
    doc = {
        "name": name,
        "type": "EDS",
        "connect_timeout": timeout,
        "eds_cluster_config": {"eds_config": {"ads": {}}, "service_name": name},
    }
    return parse_message(doc, Cluster)  # type: ignore[return-value]


def _eds(version: str, nonce: str, ports: list[int]) -> Any:
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

    from moorline.xds.files import ENDPOINT_TYPE

    cla = parse_message(
        {
            "cluster_name": "svc",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                            }
                        }
                        for p in ports
                    ]
                }
            ],
        },
        ClusterLoadAssignment,
    )
    return _sotw(ENDPOINT_TYPE, version, nonce, [cla])


def test_a_replaced_or_removed_eds_cluster_takes_no_more_assignments() -> None:
    s = ads_server()
    cm = s.cluster_manager
    ads = s.xds.ads
    assert ads is not None
    first = cm.add_or_update(eds_cluster("svc"))  # (kept: requests in flight hold it)
    assert not ads.handle(_eds("1", "n1", [48001])).HasField("error_detail")
    assert cm.get("svc") is first
    second = cm.add_or_update(eds_cluster("svc", timeout="2s"))  # warmed at once on the kept one
    assert cm.get("svc") is second and first.retired
    success = s.stats.counter("cluster.svc.update_success")
    before = success.value
    assert not ads.handle(_eds("2", "n2", [48001, 48002])).HasField("error_detail")
    assert success.value == before + 1  # counted once, by the cluster in service
    assert [h.port for h in first.hosts] == [48001]  # the retired one keeps what it had
    assert sorted(h.port for h in second.hosts) == [48001, 48002]
    cm.remove("svc")
    assert not ads.handle(_eds("3", "n3", [48003])).HasField("error_detail")
    assert second.hosts == [] and first.hosts != [] and success.value == before + 1
    assert s.stats.gauge("cluster.svc.membership_total").value == 0  # the removed one stays empty


def test_an_address_a_warming_listener_holds_is_refused_to_another() -> None:
    import pytest

    from moorline.config.errors import ConfigError

    s = ads_server()
    lm = s.listener_manager
    lm.add_or_update(tls_listener("one", name="a", port=48005))
    assert list(lm.warming) == ["a"]
    other = parse_message(
        procs.hcm_listener("b", 48005, [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]),
        Listener,
    )
    with pytest.raises(ConfigError, match="already used by listener 'a'"):
        lm.add_or_update(other)
    # Its own next version may keep the address.
    lm.add_or_update(tls_listener("two", name="a", port=48005))
    assert list(lm.warming) == ["a"] and lm.get("b") is None
