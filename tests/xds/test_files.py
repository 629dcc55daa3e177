"""LDS and CDS from watched files (``xds.files``): a real moorline process, real requests, the
files rewritten the way Envoy's dynamic-config-fs example does it (write aside, rename)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from moorline.testing import procs
from moorline.testing.procs import free_port, http_request, wait_until
from moorline.xds.files import config_source_path, version_hash

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _listener(name: str, port: int, route: dict[str, Any]) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM,
                            "stat_prefix": name,
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [{"match": {"prefix": "/"}, **route}],
                                    }
                                ]
                            },
                            "http_filters": [ROUTER],
                        },
                    }
                ]
            }
        ],
    }


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


def _write(path: Path, doc: Any) -> None:
    """Atomically, as Envoy's example does (mv of a file written aside)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


_wait = functools.partial(wait_until, interval=0.1)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.port = free_port()  # the LDS listener
        self.be_port = free_port()  # a static listener answering as the CDS cluster's backend
        self.admin_port = free_port()
        self.lds = tmp_path / "lds.yaml"
        self.cds = tmp_path / "cds.yaml"
        backend = procs.hcm_listener(
            "backend",
            self.be_port,
            [
                {
                    "match": {"prefix": "/"},
                    "direct_response": {"status": 200, "body": {"inline_string": "from be"}},
                }
            ],
        )
        doc = yaml.safe_load(procs.bootstrap([backend], [], self.admin_port))
        doc["dynamic_resources"] = {
            "cds_config": {"path_config_source": {"path": str(self.cds)}, "resource_api_version": "V3"},
            "lds_config": {"path_config_source": {"path": str(self.lds)}, "resource_api_version": "V3"},
        }
        self.boot = tmp_path / "bootstrap.yaml"
        self.boot.write_text(yaml.safe_dump(doc, sort_keys=False))

    def get(self) -> tuple[int, bytes]:
        r = http_request("127.0.0.1", self.port, "GET", "/")
        return r.status, r.body


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


@pytest.mark.e2e
def test_listeners_and_clusters_from_files_serve_and_follow_updates(setup: Setup, moorline: Any) -> None:
    _write(setup.cds, {"version_info": "c1", "resources": [_cluster("be", setup.be_port)]})
    _write(
        setup.lds,
        {"version_info": "l1", "resources": [_listener("dyn", setup.port, {"route": {"cluster": "be"}})]},
    )
    p = moorline(setup.boot)
    assert setup.get() == (200, b"from be")  # LDS listener -> CDS cluster -> backend
    assert p.stat("listener_manager.lds.update_success") == 1
    assert p.stat("cluster_manager.cds.update_success") == 1
    assert p.stat("listener_manager.lds.version") == version_hash("l1")

    # A route change: the listener is replaced, the next request sees it.
    direct = {"direct_response": {"status": 200, "body": {"inline_string": "v2"}}}
    _write(setup.lds, {"version_info": "l2", "resources": [_listener("dyn", setup.port, direct)]})
    _wait(lambda: setup.get() == (200, b"v2"), "the LDS update")
    assert p.stat("listener_manager.lds.update_success") == 2
    assert p.stat("listener_manager.lds.version") == version_hash("l2")
    dump = json.loads(p.admin_get("/config_dump").body)
    dyn = [
        d
        for c in dump["configs"]
        if c["@type"].endswith("ListenersConfigDump")
        for d in c.get("dynamic_listeners", [])
    ]
    assert [(d["name"], d["active_state"]["version_info"]) for d in dyn] == [("dyn", "l2")]


@pytest.mark.e2e
def test_a_bad_update_is_rejected_and_the_last_good_version_keeps_serving(
    setup: Setup, moorline: Any
) -> None:
    _write(setup.cds, {"version_info": "c1", "resources": [_cluster("be", setup.be_port)]})
    _write(
        setup.lds,
        {"version_info": "l1", "resources": [_listener("dyn", setup.port, {"route": {"cluster": "be"}})]},
    )
    p = moorline(setup.boot)
    bad = _listener("dyn", setup.port, {"route": {"cluster": "be"}})
    bad["filter_chains"][0]["filters"][0]["typed_config"]["no_such_field"] = 1
    good_too = _listener("other", free_port(), {"route": {"cluster": "be"}})
    _write(setup.lds, {"version_info": "l2", "resources": [good_too, bad]})
    _wait(lambda: p.stat("listener_manager.lds.update_rejected") == 1, "the rejection")
    # All or nothing: the good resource of the rejected file was not applied either.
    assert setup.get() == (200, b"from be")
    assert p.stat("listener_manager.lds.update_success") == 1
    assert p.stat("listener_manager.lds.version") == version_hash("l1")
    log = p.stderr_text()
    assert (
        str(setup.lds) in log and "resources[1].filter_chains[0].filters[0].typed_config.no_such_field" in log
    ), log
    # Then a good file applies again.
    direct = {"direct_response": {"status": 200, "body": {"inline_string": "v3"}}}
    _write(setup.lds, {"version_info": "l3", "resources": [_listener("dyn", setup.port, direct)]})
    _wait(lambda: setup.get() == (200, b"v3"), "the next good update")


@pytest.mark.e2e
def test_a_file_that_no_longer_names_a_cluster_removes_it(setup: Setup, moorline: Any) -> None:
    _write(
        setup.cds, {"version_info": "c1", "resources": [_cluster("be", setup.be_port), _cluster("spare", 9)]}
    )
    _write(
        setup.lds,
        {"version_info": "l1", "resources": [_listener("dyn", setup.port, {"route": {"cluster": "be"}})]},
    )
    p = moorline(setup.boot)
    assert setup.get() == (200, b"from be")
    clusters = p.admin_get("/clusters").body.decode()
    assert "be::" in clusters and "spare::" in clusters
    _write(setup.cds, {"version_info": "c2", "resources": [_cluster("spare", 9)]})  # state of the world
    _wait(lambda: p.stat("cluster_manager.cds.update_success") == 2, "the CDS update")
    status, _ = setup.get()
    assert status == 503  # Envoy's cluster_not_found_response_code default
    assert "be::" not in p.admin_get("/clusters").body.decode()


@pytest.mark.e2e
def test_a_bad_file_at_start_up_exits_2_naming_the_file_and_the_field(setup: Setup) -> None:
    _write(setup.cds, {"version_info": "c1", "resources": [_cluster("be", setup.be_port)]})
    wrong = _cluster("x", 1)
    wrong["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
    _write(setup.lds, {"resources": [wrong]})
    r = subprocess.run(
        [sys.executable, "-m", "moorline", "validate", str(setup.boot)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert str(setup.lds) in r.stderr and "resources[0]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    setup.lds.unlink()
    r = subprocess.run(
        [sys.executable, "-m", "moorline", "validate", str(setup.boot)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "dynamic_resources.lds_config" in r.stderr and "cannot read" in r.stderr, (
        r.stderr
    )


def test_config_source_path_and_version_hash() -> None:
    from envoy.config.core.v3.config_source_pb2 import ConfigSource

    assert config_source_path(ConfigSource(path_config_source={"path": "/a"})) == "/a"
    assert config_source_path(ConfigSource(path="/b")) == "/b"
    assert config_source_path(ConfigSource(ads={})) is None
    assert version_hash("") == 0
    assert version_hash("1") == version_hash("1") != version_hash("2")
    assert 0 < version_hash("1") < 2**63


class FakeManager:
    """Records what a subscription does to it; ``bad`` names fail to compile."""

    def __init__(self, bad: str = "") -> None:
        self.bad = bad
        self.live: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []
        self.explode = False

    def compile(self, proto: Any, path: str = "") -> Any:
        from moorline.config.errors import ConfigError

        if proto.name == self.bad:
            raise ConfigError(f"{path}.name", "refused")
        return proto

    def add_or_update(self, proto: Any, path: str = "", version_info: str = "") -> Any:
        if self.explode:
            raise KeyError("bug")
        self.calls.append(("put", proto.name))
        res = type("R", (), {"name": proto.name, "added_via_api": True})()
        self.live[proto.name] = res
        return res

    def remove(self, name: str) -> bool:
        self.calls.append(("remove", name))
        return self.live.pop(name, None) is not None

    def __iter__(self) -> Any:
        return iter(list(self.live.values()))


def _sub(tmp_path: Path, mgr: FakeManager) -> Any:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    from moorline.observability.stats import Store
    from moorline.xds.files import CLUSTER_TYPE, FileSubscription

    store = Store()
    sub = FileSubscription(
        str(tmp_path / "c.yaml"), CLUSTER_TYPE, Cluster, mgr, store, "cluster_manager.cds", "x"
    )
    return sub, store


def _stat(store: Any, name: str) -> int:
    return int(store.counter(name).value)


def test_a_file_is_applied_all_or_nothing(tmp_path: Path) -> None:
    mgr = FakeManager(bad="b")
    sub, store = _sub(tmp_path, mgr)
    _write(tmp_path / "c.yaml", {"version_info": "1", "resources": [_cluster("a", 1)]})
    sub.load_initial()
    assert mgr.calls == [("put", "a")] and sub.version_info == "1"
    _write(tmp_path / "c.yaml", {"version_info": "2", "resources": [_cluster("c", 1), _cluster("b", 1)]})
    assert not sub.reload()
    assert mgr.calls == [("put", "a")]  # "c" was valid, but the file as a whole was refused
    assert sub.version_info == "1" and "resources[1].name" in (sub.last_error or "")
    assert _stat(store, "cluster_manager.cds.update_rejected") == 1
    _write(tmp_path / "c.yaml", {"version_info": "3", "resources": [_cluster("c", 1)]})
    assert sub.reload()
    assert mgr.calls[1:] == [("remove", "a"), ("put", "c")]  # state of the world (removals first)
    assert _stat(store, "cluster_manager.cds.update_success") == 2


def test_duplicates_wrong_types_and_unknown_fields_are_refused(tmp_path: Path) -> None:
    mgr = FakeManager()
    sub, store = _sub(tmp_path, mgr)
    cases = [
        ({"resources": [_cluster("a", 1), _cluster("a", 2)]}, "resources[1].name"),
        ({"resources": [{**_cluster("a", 1), "@type": "type.googleapis.com/x.Y"}]}, "resources[0].@type"),
        ({"resources": [_cluster("a", 1)], "surprise": 1}, "surprise"),
        ({"version_info": 3, "resources": []}, "version_info"),
        ("just text", ""),
    ]
    for doc, where in cases:
        _write(tmp_path / "c.yaml", doc)
        assert not sub.reload()
        assert where in (sub.last_error or ""), (doc, sub.last_error)
    assert mgr.calls == []
    assert _stat(store, "cluster_manager.cds.update_rejected") == len(cases)


def test_a_bug_while_applying_is_counted_and_the_subscription_goes_on(tmp_path: Path) -> None:
    mgr = FakeManager()
    sub, store = _sub(tmp_path, mgr)
    _write(tmp_path / "c.yaml", {"resources": [_cluster("a", 1)]})
    mgr.explode = True
    assert not sub.reload()
    assert _stat(store, "cluster_manager.cds.update_failure") == 1 and "KeyError" in (sub.last_error or "")
    mgr.explode = False
    assert sub.reload() and mgr.live.keys() == {"a"}
    (tmp_path / "c.yaml").unlink()
    assert not sub.reload()  # unreadable: a failure, the last good version stays
    assert _stat(store, "cluster_manager.cds.update_failure") == 2 and mgr.live.keys() == {"a"}


def _route_config(name: str, body: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": name,
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": body}},
                    }
                ],
            }
        ],
    }


def _rds_bootstrap(tmp_path: Path, port: int, rds_file: Path, name: str = "routes") -> Path:
    listener = procs.hcm_listener("l", port, [])
    tc = listener["filter_chains"][0]["filters"][0]["typed_config"]
    tc.pop("route_config", None)
    tc["rds"] = {"route_config_name": name, "config_source": {"path_config_source": {"path": str(rds_file)}}}
    boot = tmp_path / "rds-bootstrap.yaml"
    boot.write_text(procs.bootstrap([listener], [], free_port()))
    return boot


@pytest.mark.e2e
def test_routes_from_an_rds_file_follow_updates_and_a_bad_one_keeps_the_last(
    tmp_path: Path, moorline: Any
) -> None:
    port = free_port()
    rds = tmp_path / "rds.yaml"
    _write(
        rds,
        {
            "version_info": "r1",
            "resources": [_route_config("other", "not me"), _route_config("routes", "r1")],
        },
    )
    p = moorline(_rds_bootstrap(tmp_path, port, rds))
    get = lambda: http_request("127.0.0.1", port, "GET", "/").body  # noqa: E731
    assert get() == b"r1"
    _write(rds, {"version_info": "r2", "resources": [_route_config("routes", "r2")]})
    _wait(lambda: get() == b"r2", "the RDS update")
    assert p.stat("http.l.rds.routes.update_success") == 2
    # The named route configuration missing from the file: rejected, r2 keeps serving.
    _write(rds, {"version_info": "r3", "resources": [_route_config("other", "x")]})
    _wait(lambda: p.stat("http.l.rds.routes.update_rejected") == 1, "the rejection")
    assert get() == b"r2"
    dump = json.loads(p.admin_get("/config_dump").body)
    routes = next(c for c in dump["configs"] if c["@type"].endswith("RoutesConfigDump"))
    assert [(d["route_config"]["name"], d["version_info"]) for d in routes["dynamic_route_configs"]] == [
        ("routes", "r2")
    ]


def test_an_rds_file_without_the_named_routes_is_a_config_error(tmp_path: Path) -> None:
    rds = tmp_path / "rds.yaml"
    _write(rds, {"resources": [_route_config("other", "x")]})
    boot = _rds_bootstrap(tmp_path, free_port(), rds)
    r = subprocess.run(
        [sys.executable, "-m", "moorline", "validate", str(boot)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and str(rds) in r.stderr and "no resource named 'routes'" in r.stderr, r.stderr


def _assignment(name: str, ports: list[int], unhealthy: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                        },
                        **({"health_status": "UNHEALTHY"} if p in unhealthy else {}),
                    }
                    for p in ports
                ]
            }
        ],
    }


@pytest.mark.e2e
def test_endpoints_from_an_eds_file_move_traffic_and_a_bad_one_keeps_the_hosts(
    tmp_path: Path, moorline: Any
) -> None:
    port, be_a, be_b = free_port(), free_port(), free_port()
    eds = tmp_path / "eds.yaml"
    _write(eds, {"version_info": "e1", "resources": [_assignment("svc", [be_a])]})

    def backend(name: str, p: int) -> dict[str, Any]:
        body = {"inline_string": name}
        return procs.hcm_listener(
            name, p, [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": body}}]
        )

    front = procs.hcm_listener("front", port, [{"match": {"prefix": "/"}, "route": {"cluster": "dyn"}}])
    cluster = {
        "name": "dyn",
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {
            "service_name": "svc",
            "eds_config": {"path_config_source": {"path": str(eds)}},
        },
    }
    boot = tmp_path / "eds-bootstrap.yaml"
    boot.write_text(procs.bootstrap([front, backend("a", be_a), backend("b", be_b)], [cluster], free_port()))
    p = moorline(boot)
    get = lambda: http_request("127.0.0.1", port, "GET", "/").body  # noqa: E731
    assert get() == b"a"
    # b joins, a is marked unhealthy: all traffic moves to b.
    _write(eds, {"version_info": "e2", "resources": [_assignment("svc", [be_a, be_b], unhealthy=(be_a,))]})
    _wait(lambda: p.stat("cluster.dyn.update_success") == 2, "the EDS update")
    assert {get() for _ in range(6)} == {b"b"}
    assert p.stat("cluster.dyn.version") == version_hash("e2")
    # A port 0 endpoint: rejected, the hosts in use stay.
    _write(eds, {"version_info": "e3", "resources": [_assignment("svc", [0])]})
    _wait(lambda: p.stat("cluster.dyn.update_rejected") == 1, "the rejection")
    assert {get() for _ in range(4)} == {b"b"}
    assert str(eds) in p.stderr_text() and "resources[0].endpoints[0].lb_endpoints[0]" in p.stderr_text()


def test_a_change_before_the_watch_starts_is_applied_when_it_starts(tmp_path: Path) -> None:
    from moorline.net.secrets import FileWatcher

    mgr = FakeManager()
    sub, _ = _sub(tmp_path, mgr)
    _write(tmp_path / "c.yaml", {"version_info": "1", "resources": [_cluster("a", 1)]})
    sub.load_initial()
    _write(tmp_path / "c.yaml", {"version_info": "2", "resources": [_cluster("b", 1)]})  # (before the watch)
    sub.watch(FileWatcher())
    assert sub.version_info == "2" and mgr.live.keys() == {"b"}


def test_an_eds_source_naming_ads_without_ads_config_is_a_config_error(tmp_path: Path) -> None:
    cluster = {
        "name": "dyn",
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}}},
    }
    boot = tmp_path / "b.yaml"
    boot.write_text(procs.bootstrap([], [cluster], free_port()))
    r = subprocess.run(
        [sys.executable, "-m", "moorline", "validate", str(boot)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r
    assert (
        "static_resources.clusters[0].eds_cluster_config.eds_config: ads is named, but "
        "dynamic_resources.ads_config is not set" in r.stderr
    ), r.stderr
