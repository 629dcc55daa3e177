"""Interop with an xDS implementation written by others: gRPC's own xDS client (grpc C-core,
in the grpcio package: proxyless gRPC's ``xds:///`` resolver) takes its listener, routes,
cluster and endpoints from ``moorline xds-serve``, and its calls reach the server those name.
No third-party xDS *server* installs from the registries here (go-control-plane is not packaged
for Debian and Go modules are out of reach), so this checks the protocol from the other side:
moorline's control plane against a client moorline did not write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moorline.testing.procs import free_port, wait_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e" / "grpc_svc"))
from grpc_test_service import TestGrpcServer

pytestmark = pytest.mark.e2e

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _resources(port: int) -> str:
    return textwrap.dedent(
        f"""\
        resources:
        - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
          name: echo.test
          api_listener:
            api_listener:
              "@type": {HCM}
              stat_prefix: echo
              rds:
                route_config_name: echo-routes
                config_source: {{ads: {{}}, resource_api_version: V3}}
              http_filters:
              - name: envoy.filters.http.router
                typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
        - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
          name: echo-routes
          virtual_hosts:
          - name: echo
            domains: ["*"]
            routes:
            - match: {{prefix: ""}}
              route: {{cluster: echo-cluster}}
        - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
          name: echo-cluster
          type: EDS
          eds_cluster_config:
            eds_config: {{ads: {{}}, resource_api_version: V3}}
        - "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
          cluster_name: echo-cluster
          endpoints:
          - locality: {{region: local}}
            load_balancing_weight: 1  # (gRPC's balancer uses only weighted localities)
            lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
        """
    )


CLIENT = """
import sys
import grpc
sys.path.insert(0, sys.argv[2])
from grpc_test_service import method
ch = grpc.insecure_channel("xds:///echo.test")
grpc.channel_ready_future(ch).result(timeout=30)
print(method(ch, "Unary", "uu")(b"through xds", timeout=20).decode())
"""


def test_grpcs_own_xds_client_resolves_through_xds_serve(tmp_path: Path) -> None:
    backend = TestGrpcServer().start()
    xds_dir = tmp_path / "xds"
    xds_dir.mkdir()
    (xds_dir / "mesh.yaml").write_text(_resources(backend.port))
    cp_port = free_port()
    log = (tmp_path / "xds-serve.log").open("w")
    cp = subprocess.Popen(
        [sys.executable, "-m", "moorline", "xds-serve", str(xds_dir), "--listen", f"127.0.0.1:{cp_port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port("127.0.0.1", cp_port, 20)
        boot = tmp_path / "grpc-bootstrap.json"
        boot.write_text(
            json.dumps(
                {
                    "xds_servers": [
                        {
                            "server_uri": f"127.0.0.1:{cp_port}",
                            "channel_creds": [{"type": "insecure"}],
                            "server_features": ["xds_v3"],
                        }
                    ],
                    "node": {"id": "proxyless-client", "cluster": "interop"},
                }
            )
        )
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(boot)}
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                CLIENT,
                "x",
                str(Path(__file__).resolve().parents[1] / "e2e" / "grpc_svc"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == "through xds"
    finally:
        cp.terminate()
        cp.wait(10)
        log.close()
        backend.stop()
    text = (tmp_path / "xds-serve.log").read_text()
    assert "Traceback" not in text
