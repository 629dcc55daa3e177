"""TLS and HTTP/2 together, end to end with a real moorline process: ALPN h2 downstream (curl
over HTTPS picks HTTP/2 or HTTP/1.1 on the same listener), gRPC over TLS and mTLS (grpcio
secure channels, unary and bidi streaming) to an insecure grpcio upstream, and HTTP/2 over TLS
to the upstream (nginx ``ssl http2``) for an HTTP/1.1 client."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorline.testing import procs
from moorline.testing.upstream import TestUpstream

sys.path.insert(0, str(Path(__file__).parent / "grpc_svc"))
from grpc_test_service import OPTIONS, SERVICE, TestGrpcServer, method

pytestmark = pytest.mark.e2e

# The test PKI helper lives in a test file; load it by path (tests dirs are not packages).
_spec = importlib.util.spec_from_file_location(
    "tls_certs_h2", Path(__file__).parent.parent / "net" / "test_tls_certs.py"
)
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)
Pki = _certs.Pki

DTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
NAME = "front.example.com"


def _need(binary: str) -> str:
    p = shutil.which(binary)
    if p is None:
        pytest.skip(f"{binary} is not installed")
    return p


def _h2_options() -> dict[str, Any]:
    return {
        HPO: {"@type": f"type.googleapis.com/{HPO}", "explicit_http_config": {"http2_protocol_options": {}}}
    }


def _downstream_tls(cert: Path, key: Path, ca: Path | None = None) -> dict[str, Any]:
    """DownstreamTlsContext offering h2 then http/1.1; with ``ca``, client certificates are
    required and verified against it."""
    common: dict[str, Any] = {
        "tls_certificates": [
            {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
        ],
        "alpn_protocols": ["h2", "http/1.1"],
    }
    ctx: dict[str, Any] = {"@type": DTLS, "common_tls_context": common}
    if ca is not None:
        common["validation_context"] = {"trusted_ca": {"filename": str(ca)}}
        ctx["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def _tls_listener(name: str, port: int, routes: list[dict[str, Any]], tls: dict[str, Any]) -> dict[str, Any]:
    lst = procs.hcm_listener(name, port, routes)
    lst["filter_chains"][0]["transport_socket"] = tls
    return lst


@dataclass
class Env:
    pki: Any
    port: int  # TLS, server cert only
    mtls_port: int  # TLS, client certificate required
    client_cert: tuple[Path, Path]
    up: TestUpstream
    grpc_srv: TestGrpcServer
    proc: procs.MoorlineProc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("tls_h2")
    pki = Pki(tmp / "pki")
    cert, key = pki.issue("front", "front", [f"DNS:{NAME}"])
    client = pki.issue("client", "client", ["URI:spiffe://cluster.local/ns/default/sa/client"], client=True)
    up = TestUpstream(upstream_id="h1").start()
    srv = TestGrpcServer().start()
    port, mtls_port = procs.free_port(), procs.free_port()
    routes = [
        {"match": {"prefix": f"/{SERVICE}/"}, "route": {"cluster": "grpc", "timeout": "10s"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "h1"}},
    ]
    cfg = procs.bootstrap(
        [
            _tls_listener("tls", port, routes, _downstream_tls(cert, key)),
            _tls_listener("mtls", mtls_port, routes, _downstream_tls(cert, key, pki.ca_cert)),
        ],
        [
            procs.cluster("h1", [up.port]),
            procs.cluster("grpc", [srv.port], typed_extension_protocol_options=_h2_options()),
        ],
    )
    proc = procs.start_moorline(cfg, tmp / "moorline")
    try:
        yield Env(pki, port, mtls_port, client, up, srv, proc)
    finally:
        proc.stop()
        srv.stop()
        up.stop()


def _curl(env: Env, flag: str, path: str) -> tuple[str, int, str]:
    """(HTTP version curl used, status, body) for one HTTPS request with ``flag``."""
    r = subprocess.run(
        [_need("curl"), "-sS", flag, "--max-time", "10", "--cacert", str(env.pki.ca_cert),
         "--resolve", f"{NAME}:{env.port}:127.0.0.1", "-o", "-", "-w", "\n%{http_version} %{http_code}",
         f"https://{NAME}:{env.port}{path}"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    body, _, tail = r.stdout.rpartition("\n")
    version, _, code = tail.partition(" ")
    assert r.returncode == 0, r.stderr
    return version, int(code), body


def test_curl_http2_over_tls_negotiates_h2(env: Env) -> None:
    before = env.proc.stat("http.tls.downstream_rq_http2_total")
    version, code, body = _curl(env, "--http2", "/alpn/h2?x=1")
    assert version == "2"
    assert code == 200, body
    echo = json.loads(body)
    assert echo["path"] == "/alpn/h2?x=1" and echo["method"] == "GET"
    # The upstream is HTTP/1.1 whatever the downstream spoke.
    assert env.up.requests[-1].path == "/alpn/h2?x=1"
    assert env.proc.stat("http.tls.downstream_rq_http2_total") == before + 1


def test_curl_http11_over_tls_on_the_same_listener(env: Env) -> None:
    before = env.proc.stat("http.tls.downstream_rq_http1_total")
    version, code, body = _curl(env, "--http1.1", "/alpn/h1")
    assert version == "1.1"
    assert code == 200, body
    assert json.loads(body)["path"] == "/alpn/h1"
    assert env.proc.stat("http.tls.downstream_rq_http1_total") == before + 1


def _secure_channel(env: Env, port: int, with_client_cert: bool) -> grpc.Channel:
    kw: dict[str, bytes] = {"root_certificates": env.pki.ca_cert.read_bytes()}
    if with_client_cert:
        kw["certificate_chain"] = env.client_cert[0].read_bytes()
        kw["private_key"] = env.client_cert[1].read_bytes()
    creds = grpc.ssl_channel_credentials(**kw)
    # The certificate names front.example.com; the channel connects to 127.0.0.1.
    opts = [*OPTIONS, ("grpc.ssl_target_name_override", NAME), ("grpc.default_authority", NAME)]
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts)


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_grpc_secure_channel_unary_and_bidi(env: Env, mtls: bool) -> None:
    port = env.mtls_port if mtls else env.port
    ch = _secure_channel(env, port, with_client_cert=mtls)
    try:
        assert method(ch, "Unary", "uu")(b"over tls", timeout=10) == b"over tls"
        big = bytes(range(256)) * 4096  # 1 MiB: many DATA frames and window updates
        assert method(ch, "Unary", "uu")(big, timeout=20) == big
        msgs = [b"b%d" % i * (i + 1) for i in range(25)]
        assert list(method(ch, "Bidi", "ss")(iter(msgs), timeout=10)) == msgs
        with pytest.raises(grpc.RpcError) as ei:
            method(ch, "Unary", "uu")(b"status:7", timeout=10)
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()


def test_mtls_listener_refuses_a_client_without_certificate(env: Env) -> None:
    ch = _secure_channel(env, env.mtls_port, with_client_cert=False)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            method(ch, "Unary", "uu")(b"x", timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()


def test_upstream_h2_over_tls_to_nginx(tmp_path: Path) -> None:
    _need("nginx")
    pki = Pki(tmp_path / "pki")
    srv_cert, srv_key = pki.issue("nginx", "nginx", ["DNS:backend.internal"])
    nport = procs.free_port()
    access = tmp_path / "nginx-access.log"
    snippet = f"""
    log_format proto '$server_protocol $ssl_protocol $ssl_server_name $request_uri';
    server {{
        listen 127.0.0.1:{nport} ssl http2;
        ssl_certificate {srv_cert};
        ssl_certificate_key {srv_key};
        access_log {access} proto;
        location / {{ default_type text/plain; return 200 "h2-tls-ok $server_protocol $ssl_server_name\\n"; }}
    }}
    """
    nginx = procs.start_nginx(tmp_path, snippet, nport)
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UTLS,
            "sni": "backend.internal",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {"trusted_ca": {"filename": str(pki.ca_cert)}},
            },
        },
    }
    port = procs.free_port()
    cfg = procs.bootstrap(
        [procs.hcm_listener("http", port, [{"match": {"prefix": "/"}, "route": {"cluster": "ngx"}}])],
        [procs.cluster("ngx", [nport], transport_socket=tls, typed_extension_protocol_options=_h2_options())],
    )
    proc = procs.start_moorline(cfg, tmp_path / "moorline")
    try:
        for path in ("/first", "/second"):
            r = procs.http_request("127.0.0.1", port, "GET", path)
            assert r.status == 200, r.body
            assert r.body == b"h2-tls-ok HTTP/2.0 backend.internal\n"
            line = procs.wait_for_log(access, path)
            # Envoy's (and moorline's) upstream default is TLS 1.2 at most; either is TLS.
            proto, tls_version, sni, _ = line.split(" ", 3)
            assert (proto, sni) == ("HTTP/2.0", "backend.internal"), line
            assert tls_version in ("TLSv1.2", "TLSv1.3"), line
        assert proc.stat("cluster.ngx.upstream_cx_http2_total") >= 1
        assert proc.stat("cluster.ngx.ssl.handshake") >= 1
    finally:
        proc.stop()
        nginx.stop()
