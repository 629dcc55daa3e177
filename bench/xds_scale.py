"""The ``xds-scale`` scenarios: how fast moorline applies a whole mesh pushed over ADS, and what
each cluster costs in memory.

One run: moorline starts with only an ADS bootstrap (state of the world or delta); the test
control plane (``moorline.testing.xds_server``, in this process) pushes ``clusters`` EDS
clusters, then their assignments (two endpoints each), one route configuration with one route
per cluster and one listener that takes it over RDS. Measured from the CDS push:

* ``cds_ack_ms``: the CDS response ACKed (every cluster compiled and warming on its EDS);
* ``applied_ms``: every cluster active (its endpoints in) and the listener serving its routes,
  read from the admin's stats;
* ``resend_ms``: the same clusters pushed again with one changed (a control plane resends the
  whole type), until ACKed;
* ``rss_per_cluster_kib``: the RSS growth over the push, per cluster (routes and endpoints
  included, as they come with clusters in a mesh).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.children import rss_kib, spawn
from bench.proxies import REPO_ROOT, StartError, wait_moorline_ready
from moorline.testing.procs import free_port

ENDPOINTS_PER_CLUSTER = 2


def _stats(admin: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json", timeout=5) as r:
        doc = json.loads(r.read())
    return {s["name"]: s["value"] for s in doc.get("stats", []) if "value" in s}


def _resources(n: int, port: int) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
    from envoy.config.listener.v3.listener_pb2 import Listener
    from envoy.config.route.v3.route_pb2 import RouteConfiguration

    from moorline.config.loader import parse_message
    from moorline.testing import procs

    clusters, clas = [], []
    for i in range(n):
        c = Cluster(name=f"svc-{i}", type=Cluster.EDS)
        c.connect_timeout.seconds = 1
        c.eds_cluster_config.eds_config.ads.SetInParent()
        clusters.append(c)
        cla = ClusterLoadAssignment(cluster_name=f"svc-{i}")
        lle = cla.endpoints.add()
        for j in range(ENDPOINTS_PER_CLUSTER):
            sa = lle.lb_endpoints.add().endpoint.address.socket_address
            sa.address = f"127.{1 + i // 250}.{i % 250}.{j + 1}"
            sa.port_value = 8080
        clas.append(cla)
    rc = RouteConfiguration(name="mesh")
    vh = rc.virtual_hosts.add(name="all", domains=["*"])
    for i in range(n):
        r = vh.routes.add()
        r.match.prefix = f"/svc-{i}/"
        r.route.cluster = f"svc-{i}"
    doc = procs.hcm_listener("edge", port, [])
    tc = doc["filter_chains"][0]["filters"][0]["typed_config"]
    tc.pop("route_config", None)
    tc["rds"] = {"route_config_name": "mesh", "config_source": {"ads": {}}}
    return clusters, clas, [rc], [parse_message(doc, Listener)]


def run_once(n: int, delta: bool, workdir: Path, cpus: list[int] | None) -> dict[str, Any]:
    from moorline.testing import procs
    from moorline.testing.xds_server import XdsServer
    from moorline.xds.files import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE

    # The control plane starts after moorline is spawned (gRPC's threads and fork do not mix);
    # moorline's first connection attempt may fail and be retried, before anything is measured.
    admin, port, cp_port = free_port(), free_port(), free_port()
    boot = yaml.safe_load(procs.bootstrap([], [procs.cluster("xds", [cp_port])], admin))
    boot["node"] = {"id": "bench", "cluster": "bench"}
    boot["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    boot["dynamic_resources"] = {
        "ads_config": {
            "api_type": "DELTA_GRPC" if delta else "GRPC",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
        },
        "cds_config": {"ads": {}},
        "lds_config": {"ads": {}},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "xds-scale.yaml"
    cfg.write_text(yaml.safe_dump(boot))
    clusters, clas, routes, listeners = _resources(n, port)
    child = spawn(
        "moorline-xds",
        [sys.executable, "-m", "moorline", "run", "-c", str(cfg), "--log-level", "warning"],
        workdir,
        cpus=cpus,
        env={"PYTHONPATH": str(REPO_ROOT)},
    )
    cp = XdsServer(port=cp_port).start()
    try:
        wait_moorline_ready(admin, child)
        cp.wait_for(lambda r: r.type_url == LISTENER_TYPE)  # the stream is up
        time.sleep(0.5)
        rss0 = rss_kib(child.pids())
        t0 = time.perf_counter()
        nonce = cp.push(CLUSTER_TYPE, "1", clusters)
        cp.wait_for(lambda r: r.type_url == CLUSTER_TYPE and r.response_nonce == nonce, 120)
        t_cds = time.perf_counter()

        def asks_all(r: Any) -> bool:
            names = r.resource_names_subscribe if delta else r.resource_names
            return bool(r.type_url == ENDPOINT_TYPE and len(names) >= n)

        cp.wait_for(asks_all, 120)  # (the clusters ask for their endpoints in one request)
        # An ACK is sent once its response is applied: the three ACKs mean every cluster has its
        # endpoints (and so left warming) and the listener serves its routes. (Polling the admin
        # meanwhile would cost the proxy's one thread more than what is measured.)
        nonces = [
            (ENDPOINT_TYPE, cp.push(ENDPOINT_TYPE, "1", clas)),
            (LISTENER_TYPE, cp.push(LISTENER_TYPE, "1", listeners)),
        ]

        def asks_routes(r: Any) -> bool:
            names = r.resource_names_subscribe if delta else r.resource_names
            return bool(r.type_url == ROUTE_TYPE and "mesh" in names)

        cp.wait_for(asks_routes, 120)  # (the listener, warming, asks for its routes)
        nonces.append((ROUTE_TYPE, cp.push(ROUTE_TYPE, "1", routes)))
        for t, nn in nonces:

            def acked(r: Any, t: str = t, nn: str = nn) -> bool:
                return bool(r.type_url == t and r.response_nonce == nn)

            cp.wait_for(acked, 120)
        t_all = time.perf_counter()
        st = _stats(admin)
        if st.get("cluster_manager.active_clusters", 0) < n + 1 or st.get(
            "cluster_manager.warming_clusters", 1
        ):
            raise RuntimeError(
                f"clusters not all active after the ACKs: {st.get('cluster_manager.active_clusters')}"
            )
        if st.get("listener_manager.total_listeners_active", 0) < 1:
            raise RuntimeError("the listener is not active after the ACKs")
        rss1 = rss_kib(child.pids())
        changed = list(clusters)
        c0 = type(changed[0])()
        c0.CopyFrom(changed[0])
        c0.connect_timeout.seconds = 2
        changed[0] = c0
        t1 = time.perf_counter()
        nonce = cp.push(CLUSTER_TYPE, "2", changed)
        ack = cp.wait_for(lambda r: r.type_url == CLUSTER_TYPE and r.response_nonce == nonce, 120)
        t_resend = time.perf_counter()
        if ack.HasField("error_detail"):
            raise RuntimeError(f"NACK: {ack.error_detail.message}")
        return {
            "ok": True,
            "clusters": n,
            "cds_ack_ms": (t_cds - t0) * 1000,
            "applied_ms": (t_all - t0) * 1000,
            "resend_ms": (t_resend - t1) * 1000,
            "rss_per_cluster_kib": (rss1 - rss0) / n,
            "rss_mib": rss1 / 1024,
        }
    except StartError:
        raise
    finally:
        child.stop()
        cp.stop()


__all__ = ["run_once"]
