"""Istio's own output, pushed by a control plane: moorline starts on the bootstrap pilot-agent
renders (``bootstrap_default_golden.json``: delta ADS to ``xds-grpc`` on a Unix socket, SDS from
``sds-grpc`` on another), and every listener, cluster, route configuration and endpoint
assignment in the Istio config dumps is pushed as the xDS resource it is, and ACKed.

Fixtures are never edited: the copies get test socket paths and, for the few listeners that bind
a port, a free loopback port (Istio's 15001 / 15006 / 15008 / 15021 / 15090 on 0.0.0.0). The
secrets are a test PKI's under Istio's names (``default``, ``ROOTCA``): the dumps' own have their
keys redacted.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret

from moorline.config.loader import parse_message
from moorline.testing.fixtures import FIXTURES
from moorline.testing.procs import free_port, http_request, wait_until
from moorline.testing.xds_server import XdsServer
from moorline.xds.files import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from moorline.xds.sds import SECRET_TYPE

pytestmark = pytest.mark.e2e

ISTIO = FIXTURES / "istio"
DUMPS = ["sidecar_configdump_authz.json", "sidecar_config_dump_full.json", "sidecar_configdump_compare.json"]

_spec = importlib.util.spec_from_file_location(
    "tls_certs_istio", Path(__file__).parent.parent / "net" / "test_tls_certs.py"
)
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)


def dynamic_resources(dump: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The xDS resources a control plane sent (the dump's dynamic entries), by kind."""
    out: dict[str, list[dict[str, Any]]] = {
        "listener": [],
        "cluster": [],
        "route_config": [],
        "endpoint_config": [],
    }
    for cfg in dump["configs"]:
        for list_name, entries in cfg.items():
            if not isinstance(entries, list) or not list_name.startswith("dynamic"):
                continue
            for entry in entries:
                holder = entry.get("active_state", entry)
                for kind in out:
                    if kind in holder:
                        out[kind].append(holder[kind])
    return out


def local_copy(listener: dict[str, Any]) -> dict[str, Any]:
    """A listener that binds a port gets a free loopback one (the copy; the fixture stays)."""
    lst = copy.deepcopy(listener)
    sa = lst.get("address", {}).get("socket_address")
    binds = lst.get("bind_to_port", lst.get("bindToPort", True)) is not False
    if sa is not None and binds:
        sa["address"] = "127.0.0.1"
        sa["port_value"] = free_port()
    return lst


def istio_bootstrap(tmp_path: Path, xds_sock: Path, sds_sock: Path) -> tuple[Path, int, int]:
    boot = json.loads((ISTIO / "bootstrap_default_golden.json").read_text())
    admin = free_port()
    boot["admin"]["address"]["socket_address"]["port_value"] = admin
    boot["admin"].pop("profile_path", None)
    ports = {}
    for lst in boot["static_resources"]["listeners"]:
        sa = lst["address"]["socket_address"]
        ports[sa["port_value"]] = p = free_port()
        sa["address"], sa["port_value"] = "127.0.0.1", p
    for c in boot["static_resources"]["clusters"]:
        for lle in c.get("load_assignment", {}).get("endpoints", []):
            for lbe in lle["lb_endpoints"]:
                addr = lbe["endpoint"]["address"]
                if c["name"] == "xds-grpc":
                    addr["pipe"]["path"] = str(xds_sock)
                elif c["name"] == "sds-grpc":
                    addr["pipe"]["path"] = str(sds_sock)
                elif c["name"] == "prometheus_stats":
                    addr["socket_address"]["port_value"] = admin
                elif "socket_address" in addr:
                    addr["socket_address"]["port_value"] = free_port()
    path = tmp_path / "envoy-rev.json"
    path.write_text(json.dumps(boot))
    return path, admin, ports[15090]


def test_every_istio_resource_is_pushed_acked_and_served(tmp_path: Path, moorline: Any) -> None:
    pki = _certs.Pki(tmp_path / "pki")
    cert, key = pki.issue(
        "workload", "workload", ["URI:spiffe://cluster.local/ns/default/sa/test"], client=False
    )
    xds_sock, sds_sock = tmp_path / "XDS", tmp_path / "SDS"
    cp = XdsServer(unix_path=str(xds_sock)).start()
    sds = XdsServer(unix_path=str(sds_sock)).start()
    try:
        sds.push(
            SECRET_TYPE,
            "1",
            [
                parse_message(
                    {
                        "name": "default",
                        "tls_certificate": {
                            "certificate_chain": {"inline_string": cert.read_text()},
                            "private_key": {"inline_string": key.read_text()},
                        },
                    },
                    Secret,
                ),
                parse_message(
                    {
                        "name": "ROOTCA",
                        "validation_context": {"trusted_ca": {"inline_string": pki.ca_cert.read_text()}},
                    },
                    Secret,
                ),
            ],
        )
        boot, _admin, prom_port = istio_bootstrap(tmp_path, xds_sock, sds_sock)
        p = moorline(boot)
        first = cp.wait_for(lambda r: True)
        assert first.node.id.startswith("sidecar~"), first.node  # Istio's node, on the first request
        pushed: dict[str, int] = {}
        route_msgs: list[Any] = []
        for i, fname in enumerate(DUMPS, start=1):
            res = dynamic_resources(json.loads((ISTIO / fname).read_text()))
            eds_all = dynamic_resources(json.loads((ISTIO / "endpoints_configdump.json").read_text()))
            kinds = [
                (CLUSTER_TYPE, Cluster, res["cluster"]),
                (ENDPOINT_TYPE, ClusterLoadAssignment, res["endpoint_config"] + eds_all["endpoint_config"]),
                (ROUTE_TYPE, RouteConfiguration, res["route_config"]),
                (LISTENER_TYPE, Listener, [local_copy(x) for x in res["listener"]]),
            ]
            for type_url, cls, items in kinds:
                msgs = [parse_message(x, cls, f"{fname}: {type_url.rsplit('.', 1)[-1]}") for x in items]
                nonce = cp.push(type_url, f"{fname}-{i}", msgs)
                if type_url == LISTENER_TYPE:
                    # istiod answers every route configuration a sidecar asks for; a dump holds
                    # only some of them (the authz one none): the others go out empty (no routes).
                    asked = _rds_names(cp, p, res)
                    have = {m.name for m in route_msgs}
                    cp.push(
                        ROUTE_TYPE,
                        f"{fname}-{i}-all",
                        route_msgs + [RouteConfiguration(name=n) for n in sorted(asked - have)],
                    )
                if type_url == ROUTE_TYPE:
                    route_msgs = msgs
                if type_url in (CLUSTER_TYPE, LISTENER_TYPE):
                    r = cp.wait_for(lambda r, n=nonce, t=type_url: r.type_url == t and r.response_nonce == n)
                    assert not r.HasField("error_detail"), f"{fname}: {r.error_detail.message}"
                pushed[f"{fname}:{type_url.rsplit('.', 1)[-1]}"] = len(msgs)
            n_listeners = len(res["listener"])
            assert p.stat("listener_manager.lds.update_rejected") == 0, p.stderr_text()[-3000:]
            assert p.stat("cluster_manager.cds.update_rejected") == 0, p.stderr_text()[-3000:]

            def settled(n: int = n_listeners) -> bool:
                return (
                    p.stat("listener_manager.total_listeners_active") == n + 2  # (+ the 2 static ones)
                    and p.stat("listener_manager.total_listeners_warming") == 0
                )

            try:
                _wait(settled, f"{fname}: every listener active")
            except AssertionError:
                dump = json.loads(p.admin_get("/config_dump").body)
                lds = next(c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump"))
                warming = [d["name"] for d in lds.get("dynamic_listeners", []) if "warming_state" in d]
                have = {d["name"] for d in lds.get("dynamic_listeners", []) if "active_state" in d}
                missing = [x["name"] for x in res["listener"] if x["name"] not in have]
                raise AssertionError(
                    f"{fname}: {p.stat('listener_manager.total_listeners_active')} active of {n_listeners} + 2, "
                    f"warming: {warming}, missing: {missing}; log: {p.stderr_text()[-2500:]}"
                ) from None
        assert p.stat("sds.default.update_success") >= 1
        # Live traffic through Istio's own static listener: Prometheus stats via its compressor.
        r = http_request(
            "127.0.0.1", prom_port, "GET", "/stats/prometheus", headers={"accept-encoding": "gzip"}
        )
        assert r.status == 200 and r.header("content-encoding") == "gzip"
        assert b"envoy_control_plane_connected_state 1" in gzip.decompress(r.body)
        assert "Traceback" not in p.stderr_text()
    finally:
        cp.stop()
        sds.stop()


def _rds_names(cp: XdsServer, p: Any, res: dict[str, Any]) -> set[str]:
    """The route configurations the pushed listeners name (waiting until moorline asked for
    them all)."""
    wanted = set()
    for lst in res["listener"]:
        for fc in lst.get("filter_chains", []):
            for f in fc.get("filters", []):
                rds = f.get("typed_config", {}).get("rds")
                if rds:
                    wanted.add(rds["route_config_name"])

    def asked() -> set[str]:
        with cp._lock:
            reqs = [r for r in cp.requests if r.type_url == ROUTE_TYPE]
        names: set[str] = set()
        for r in reqs:
            names |= set(r.resource_names_subscribe)
        return names

    _wait(lambda: wanted <= asked(), f"moorline to ask for {sorted(wanted - asked())}")
    return wanted


_wait = functools.partial(wait_until, timeout=30.0, interval=0.1)
