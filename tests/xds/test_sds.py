"""SDS over gRPC: a dynamic listener's certificate by name over the ADS stream, and Istio's shape
(a separate ``sds-grpc`` cluster on a Unix socket, SecretDiscoveryService); the listener warms
until its secret arrives; rotation changes what new handshakes see and drops no connection."""

from __future__ import annotations

import importlib.util
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret

from moorline.config.loader import parse_message
from moorline.testing import procs
from moorline.testing.procs import free_port, wait_until
from moorline.testing.xds_server import XdsServer
from moorline.xds.files import CLUSTER_TYPE, LISTENER_TYPE
from moorline.xds.sds import SECRET_TYPE

pytestmark = pytest.mark.e2e

_spec = importlib.util.spec_from_file_location(
    "tls_certs_sds", Path(__file__).parent.parent / "net" / "test_tls_certs.py"
)
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)
Pki = _certs.Pki

DTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


_wait = wait_until


def secret(name: str, cert: Path, key: Path) -> Secret:
    return parse_message(  # type: ignore[return-value]
        {
            "name": name,
            "tls_certificate": {
                "certificate_chain": {"inline_string": cert.read_text()},
                "private_key": {"inline_string": key.read_text()},
            },
        },
        Secret,
    )


def tls_listener(port: int, sds_config: dict[str, Any]) -> Listener:
    doc = procs.hcm_listener(
        "tls",
        port,
        [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "secure"}}}],
    )
    doc["filter_chains"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DTLS,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds_config}]
            },
        },
    }
    return parse_message(doc, Listener)  # type: ignore[return-value]


def serial_of(port: int, ca: Path) -> int:
    c = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        c.wrap_socket(raw, server_hostname="svc.example.com") as s,
    ):
        return int(s.getpeercert()["serialNumber"], 16)  # type: ignore[index]


def _get(s: ssl.SSLSocket) -> bytes:
    s.sendall(b"GET / HTTP/1.1\r\nhost: svc.example.com\r\n\r\n")
    data = b""
    while b"secure" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _boot(tmp_path: Path, ads_port: int, sds_socket: Path | None) -> Path:
    clusters = [procs.cluster("xds", [ads_port])]
    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    clusters[0]["typed_extension_protocol_options"] = h2
    if sds_socket is not None:
        # As Istio's bootstrap writes it: a static cluster on pilot-agent's Unix socket.
        clusters.append(
            {
                "name": "sds-grpc",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": h2,
                "load_assignment": {
                    "cluster_name": "sds-grpc",
                    "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(sds_socket)}}}}]}
                    ],
                },
            }
        )
    doc = yaml.safe_load(procs.bootstrap([], clusters, free_port()))
    doc["node"] = {"id": "sidecar~10.0.0.2~sds~default.svc.cluster.local", "cluster": "sds"}
    doc["dynamic_resources"] = {
        "ads_config": {"api_type": "GRPC", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
        "cds_config": {"ads": {}},
        "lds_config": {"ads": {}},
    }
    path = tmp_path / "sds.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("shape", ["ads", "istio-sds-grpc"])
def test_sds_secret_warms_the_listener_and_rotates_without_dropping_connections(
    tmp_path: Path, moorline: Any, shape: str
) -> None:
    pki = Pki(tmp_path / "pki")
    c1, k1 = pki.issue("v1", "svc", ["DNS:svc.example.com"], serial=0x1111)
    c2, k2 = pki.issue("v2", "svc", ["DNS:svc.example.com"], serial=0x2222)
    port = free_port()
    cp = XdsServer().start()
    sock = tmp_path / "SDS"
    sds = XdsServer(unix_path=str(sock)).start() if shape != "ads" else cp
    sds_config: dict[str, Any] = (
        {"ads": {}}
        if shape == "ads"
        else {
            "api_config_source": {
                "api_type": "GRPC",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
                "transport_api_version": "V3",
            },
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3",
        }
    )
    try:
        cp.push(CLUSTER_TYPE, "c1", [])
        cp.push(LISTENER_TYPE, "l1", [tls_listener(port, sds_config)])
        p = moorline(_boot(tmp_path, cp.port, sock if shape != "ads" else None))
        ask = sds.wait_for(lambda r: r.type_url == SECRET_TYPE)
        assert list(ask.resource_names) == ["default"]
        # No secret yet: the listener warms (its port is not open).
        _wait(lambda: p.stat("listener_manager.total_listeners_warming") == 1, "the listener to warm")
        assert procs.port_is_free(port)
        sds.push(SECRET_TYPE, "s1", [secret("default", c1, k1)])
        sds.acked(SECRET_TYPE)
        _wait(lambda: p.stat("listener_manager.total_listeners_active") == 1, "the listener to serve")
        assert serial_of(port, pki.ca_cert) == 0x1111
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        kept = ctx.wrap_socket(raw, server_hostname="svc.example.com")
        assert b"secure" in _get(kept)
        # Rotation: new handshakes get the new certificate, the open connection keeps working.
        sds.push(SECRET_TYPE, "s2", [secret("default", c2, k2)])
        sds.acked(SECRET_TYPE)
        _wait(lambda: serial_of(port, pki.ca_cert) == 0x2222, "the rotated certificate")
        assert b"secure" in _get(kept)
        kept.close()
        # A secret that holds nothing is NACKed; the certificate in use stays.
        nonce = sds.push(SECRET_TYPE, "s3", [Secret(name="default")])
        nack = sds.nacked(SECRET_TYPE, nonce)
        assert nack.version_info == "s2" and "holds nothing" in nack.error_detail.message
        assert serial_of(port, pki.ca_cert) == 0x2222
        import json

        secrets = next(
            c
            for c in json.loads(p.admin_get("/config_dump").body)["configs"]
            if c["@type"].endswith("SecretsConfigDump")
        )
        (dyn,) = secrets["dynamic_active_secrets"]
        assert dyn["name"] == "default" and dyn["version_info"] == "s2"
        tc = dyn["secret"]["tls_certificate"]
        assert (
            tc["private_key"]["inline_string"] == "[redacted]"
            and "BEGIN" in tc["certificate_chain"]["inline_string"]
        )
        assert p.stat("sds.default.update_success") == 2
        assert p.stat("sds.default.update_rejected") == 1
        assert "Traceback" not in p.stderr_text()
    finally:
        cp.stop()
        if sds is not cp:
            sds.stop()
