"""TLS end to end with a real moorline process: Envoy's edge example over HTTPS with curl,
certificate rotation under load, tcp_proxy TLS termination and SNI passthrough (tls_inspector),
upstream mTLS to nginx."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from moorline.testing.fixtures import FIXTURES as SHARED_FIXTURES
from moorline.testing.procs import bootstrap, cluster, free_port, hcm_listener, start_moorline, start_nginx
from moorline.testing.upstream import TcpEchoServer

pytestmark = pytest.mark.e2e

_spec = importlib.util.spec_from_file_location(
    "tls_certs", Path(__file__).parent.parent / "net" / "test_tls_certs.py"
)
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)
Pki = _certs.Pki

EDGE = SHARED_FIXTURES / "envoy" / "envoy-edge.yaml"
DTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
SPIFFE = "spiffe://cluster.local/ns/default/sa/client"


def _need(binary: str) -> str:
    p = shutil.which(binary)
    if p is None:
        pytest.skip(f"{binary} is not installed")
    return p


def curl(port: int, path: str, ca: Path, name: str = "edge.example.com") -> tuple[int, str]:
    r = subprocess.run(
        [_need("curl"), "-sS", "--max-time", "10", "--cacert", str(ca), "--resolve", f"{name}:{port}:127.0.0.1",
         "-o", "-", "-w", "\n%{http_code}", f"https://{name}:{port}{path}"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body + r.stderr


def served_serial(port: int, ca: Path, name: str = "edge.example.com") -> int:
    c = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        c.wrap_socket(raw, server_hostname=name) as s,
    ):
        return int(s.getpeercert()["serialNumber"], 16)  # type: ignore[index]


def _edge_config(tmp_path: Path, cert: Path, key: Path, port: int, upstream_port: int, admin: int) -> Path:
    text = EDGE.read_text()
    assert text.count("certs/servercert.pem") == 1 and "port_value: 10002" in text
    text = (
        text.replace("certs/servercert.pem", str(cert))
        .replace("certs/serverkey.pem", str(key))
        .replace("port_value: 10000", f"port_value: {port}")
        .replace("address: 0.0.0.0", "address: 127.0.0.1")
        .replace("port_value: 10002", f"port_value: {upstream_port}")
    )
    doc = yaml.safe_load(text)
    doc["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
    cfg = tmp_path / "envoy-edge.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


def test_envoy_edge_example_serves_https_and_rotates_under_load(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    c1, k1 = pki.issue("edge1", "edge-v1", ["DNS:edge.example.com"], serial=0x1111)
    c2, k2 = pki.issue("edge2", "edge-v2", ["DNS:edge.example.com"], serial=0x2222)
    live_c, live_k = tmp_path / "servercert.pem", tmp_path / "serverkey.pem"
    shutil.copy(c1, live_c)
    shutil.copy(k1, live_k)
    port = free_port()
    # The edge example's cluster speaks HTTP/2 (explicit_http_config): nginx with h2c prior
    # knowledge is the upstream.
    _need("nginx")
    up_port = free_port()
    snippet = f"""
    server {{
        listen 127.0.0.1:{up_port} http2;
        location / {{ default_type text/plain; return 200 "edge-upstream $request_uri $server_protocol\\n"; }}
    }}
    """
    nginx = start_nginx(tmp_path, snippet, up_port)
    cfg = _edge_config(tmp_path, live_c, live_k, port, up_port, free_port())
    proc = start_moorline(cfg, tmp_path)
    try:
        code, body = curl(port, "/content/x", pki.ca_cert)
        assert code == 200, body
        assert "edge-upstream /content/x HTTP/2.0" in body, body
        code, body = curl(port, "/other", pki.ca_cert)
        assert code == 403 and "denied" in body
        assert served_serial(port, pki.ca_cert) == 0x1111

        # Rotation under load: a loop of curl requests (each a new TLS connection) while the
        # files are replaced (certificate first, then key: the mismatch in between must
        # not break anything).
        failures: list[str] = []
        done = threading.Event()
        count = [0]

        def load() -> None:
            while not done.is_set():
                code, body = curl(port, "/content/load", pki.ca_cert)
                count[0] += 1
                if code != 200:
                    failures.append(f"{code} {body[:200]}")

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        tmpc, tmpk = tmp_path / "new.pem", tmp_path / "new.key"
        shutil.copy(c2, tmpc)
        shutil.copy(k2, tmpk)
        os.replace(tmpc, live_c)
        time.sleep(0.3)
        os.replace(tmpk, live_k)
        deadline = time.monotonic() + 10
        while served_serial(port, pki.ca_cert) != 0x2222:
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.1)
        time.sleep(0.5)
        done.set()
        for t in threads:
            t.join(30)
        assert not failures, failures[:3]
        assert count[0] >= 6
        stats = proc.stats()
        assert int(stats.get(f"listener.127.0.0.1_{port}.ssl.handshake", 0)) >= count[0]
    finally:
        proc.stop()
        nginx.stop()


class _TlsBackend:
    """A Python ssl server in a thread that answers every connection with its name."""

    def __init__(self, name: str, cert: Path, key: Path) -> None:
        self.name = name
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(5)
                with self.ctx.wrap_socket(conn, server_side=True) as s:
                    data = s.recv(100)
                    s.sendall(f"{self.name}:{data.decode()}".encode())
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def _tcp_chain(cluster_name: str, **chain: Any) -> dict[str, Any]:
    return {
        **chain,
        "filters": [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": cluster_name,
                    "cluster": cluster_name,
                },
            }
        ],
    }


def test_tcp_proxy_sni_passthrough_and_termination(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    one = pki.issue("one", "one", ["DNS:one.example.com"])
    two = pki.issue("two", "two", ["DNS:two.example.com"])
    front = pki.issue("front", "front", ["DNS:front.example.com"])
    b1, b2 = _TlsBackend("backend-one", *one), _TlsBackend("backend-two", *two)
    echo = TcpEchoServer()
    echo.start()
    pass_port, term_port = free_port(), free_port()
    passthrough = {
        "name": "sni_passthrough",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": pass_port}},
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector"}],
        "filter_chains": [
            _tcp_chain("one", filter_chain_match={"server_names": ["one.example.com"]}),
            _tcp_chain("two", filter_chain_match={"server_names": ["two.example.com"]}),
        ],
    }
    terminate = {
        "name": "terminate",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": term_port}},
        "filter_chains": [
            _tcp_chain(
                "echo",
                transport_socket={
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": DTLS,
                        "common_tls_context": {
                            "tls_certificates": [
                                {"certificate_chain": {"filename": str(front[0])},
                                 "private_key": {"filename": str(front[1])}}
                            ]
                        },
                    },
                },
            )
        ],
    }  # fmt: skip
    cfg = bootstrap(
        [passthrough, terminate],
        [cluster("one", [b1.port]), cluster("two", [b2.port]), cluster("echo", [echo.port])],
    )
    proc = start_moorline(cfg, tmp_path)
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        for name, want in (("one.example.com", "backend-one"), ("two.example.com", "backend-two")):
            with socket.create_connection(("127.0.0.1", pass_port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=name) as s:  # verifies the backend's cert
                    s.sendall(b"hello")
                    assert s.recv(100).decode() == f"{want}:hello"
        with socket.create_connection(("127.0.0.1", term_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="front.example.com") as s:
                payload = os.urandom(200_000)
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    assert chunk
                    got += chunk
                assert got == payload
        stats = proc.stats()
        assert int(stats["tls_inspector.sni_found"]) == 2
        assert int(stats[f"listener.127.0.0.1_{term_port}.ssl.handshake"]) == 1
    finally:
        proc.stop()
        b1.close()
        b2.close()
        echo.stop()


def test_upstream_mtls_to_nginx(tmp_path: Path) -> None:
    _need("nginx")
    pki = Pki(tmp_path / "pki")
    srv = pki.issue(
        "nginx", "nginx", ["DNS:backend.internal", "URI:spiffe://cluster.local/ns/default/sa/backend"]
    )
    client = pki.issue("client", "client", [f"URI:{SPIFFE}"], client=True)
    nport = free_port()
    snippet = f"""
    server {{
        listen 127.0.0.1:{nport} ssl;
        ssl_certificate {srv[0]};
        ssl_certificate_key {srv[1]};
        ssl_client_certificate {pki.ca_cert};
        ssl_verify_client on;
        location / {{ return 200 "mtls-ok $ssl_client_s_dn $ssl_server_name\\n"; }}
    }}
    """
    nginx = start_nginx(tmp_path, snippet, nport)

    def tls(san_prefix: str, with_client_cert: bool = True) -> dict[str, Any]:
        common: dict[str, Any] = {
            "validation_context": {
                "trusted_ca": {"filename": str(pki.ca_cert)},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"prefix": san_prefix}}],
            }
        }
        if with_client_cert:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": str(client[0])},
                    "private_key": {"filename": str(client[1])},
                }
            ]
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": UTLS, "sni": "backend.internal", "common_tls_context": common},
        }

    port = free_port()
    routes = [
        {"match": {"prefix": "/good"}, "route": {"cluster": "good"}},
        {"match": {"prefix": "/badsan"}, "route": {"cluster": "badsan"}},
        {"match": {"prefix": "/nocert"}, "route": {"cluster": "nocert"}},
    ]
    cfg = bootstrap(
        [hcm_listener("http", port, routes)],
        [
            cluster("good", [nport], transport_socket=tls("spiffe://cluster.local/ns/default/sa/backend")),
            cluster("badsan", [nport], transport_socket=tls("spiffe://other/")),
            cluster(
                "nocert", [nport], transport_socket=tls("spiffe://cluster.local/", with_client_cert=False)
            ),
        ],
    )
    proc = start_moorline(cfg, tmp_path)
    try:

        def get(path: str) -> tuple[int, str]:
            r = subprocess.run(
                [_need("curl"), "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}",
                 f"http://127.0.0.1:{port}{path}"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            body, _, code = r.stdout.rpartition("\n")
            return int(code or 0), body

        code, body = get("/good")
        assert code == 200 and "mtls-ok CN=client backend.internal" in body, body
        code, body = get("/good/again")
        assert code == 200
        code, _ = get("/badsan")
        assert code == 503
        code, body = get("/nocert")
        assert code == 400 and "No required SSL certificate" in body  # nginx's answer over TLS
        stats = proc.stats()
        assert int(stats["cluster.good.ssl.handshake"]) >= 1
        assert int(stats["cluster.badsan.ssl.fail_verify_san"]) >= 1
    finally:
        proc.stop()
        nginx.stop()
