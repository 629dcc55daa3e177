"""Configuration text for the backend and for each proxy under test, built to be equivalent:
one worker/thread, keep-alive to the upstream, no access log, streaming (no response buffering),
no per-connection request limits, the same regex route table in ``h1-route-rules``.

Differences that remain on purpose (see bench/README.md): moorline's HCM is told
``generate_request_id: false`` because nginx and HAProxy add no request id either; everything
else is each proxy's default.
"""

from __future__ import annotations

import grp
import os
import pwd
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorline.testing import procs

# Bodies the backend serves (path suffix -> bytes).
BODIES: dict[str, bytes] = {
    "small": b"hello, world\n",
    "1k": (b"0123456789abcdef" * 64)[:1024],
    "100k": (b"0123456789abcdef" * 6400)[:102400],
}

# h1-route-rules: 50 regex routes that do not match, then the one that does and adds a header.
N_DECOY_ROUTES = 50
ROUTE_HEADER = ("x-bench-route", "target")
TARGET_REGEX = "^/svc/target/.*$"
ROUTE_RULES_PATH = "/svc/target/small"

# File descriptors: idle-conns holds 8,000 downstream connections plus upstream ones.
NOFILE = 20000
NGINX_WORKER_CONNECTIONS = 19000
HAPROXY_MAXCONN = 9500  # HAProxy sizes its fd limit to about 2 x maxconn: stays under 20,000

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

# grpc-unary: nginx keeps one upstream connection per stream in flight (h2load -c16 -m10 = 160).
GRPC_UPSTREAM_KEEPALIVE = 256
GRPC_METHOD = "/bench.Echo/Unary"
GRPC_PAYLOAD = b"hello, world\n"  # echoed back: 13 bytes of message, as in h1-small / h2-small
GRPC_STREAM_METHOD = "/bench.Echo/Stream"  # grpc-stream: 1,000 messages of 1 KiB per call

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class TlsFiles:
    """The certificate every proxy serves in ``tls-handshake``: ECDSA P-256, self-signed."""

    cert: Path
    key: Path
    combined: Path  # cert + key in one file, for HAProxy


def make_tls_files(directory: Path, openssl: str = OPENSSL) -> TlsFiles:
    """An ECDSA P-256 key and a self-signed certificate for ``localhost``/127.0.0.1, made with
    the openssl CLI (raises RuntimeError with its stderr on failure). ECDSA P-256 rather than
    RSA 2048: it is what current deployments (and Istio's workload certificates) use, and it
    makes the server's signature cheap, so the handshake cost is mostly key exchange + proxy."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    ]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"openssl failed: {res.stderr.strip()[-500:]}")
    combined = directory / "combined.pem"
    combined.write_text(cert.read_text() + key.read_text())
    return TlsFiles(cert, key, combined)


def grpc_frame(payload: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def decoy_regex(i: int) -> str:
    return f"^/api/svc{i}/[a-z0-9]+/items/[0-9]+$"


def write_docroot(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in BODIES.items():
        (directory / name).write_bytes(body)
    return directory


def _nginx_user_line() -> str:
    # As root nginx would switch its worker to "nobody", who cannot enter a 0700 temp dir.
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"


def _nginx_main(prefix: Path, load_stream: bool = False) -> str:
    load = f"load_module {NGINX_STREAM_MODULE};\n" if load_stream else ""
    return f"""{load}{_nginx_user_line()}
worker_processes 1;
worker_rlimit_nofile {NOFILE};
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections {NGINX_WORKER_CONNECTIONS}; }}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""


def nginx_backend(prefix: Path, port: int, docroot: Path) -> str:
    """The backend: static files, keep-alive without a request limit. Paths ending in ``1k`` or
    ``100k`` get those bodies, every other path the 13-byte one."""
    return f"""{_nginx_main(prefix)}
http {{
{_nginx_http_common(prefix)}
    sendfile on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {docroot};
        default_type text/plain;
        location / {{ try_files /small =404; }}
        location ~ 100k$ {{ try_files /100k =404; }}
        location ~ 1k$ {{ try_files /1k =404; }}
    }}
}}
"""


_NGINX_PROXY = """proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
            proxy_request_buffering off;"""


def nginx_http_proxy(
    prefix: Path,
    port: int,
    upstream_port: int,
    route_rules: bool = False,
    *,
    h2: bool = False,
    tls: TlsFiles | None = None,
) -> str:
    """HTTP/1.1 keep-alive to the backend; the listener speaks HTTP/1.1, or h2c (``h2``: nginx
    1.22 accepts prior-knowledge HTTP/2 on a plain ``http2`` listener), or HTTP/1.1 over TLS."""
    if route_rules:
        locations = [
            f"        location ~ {decoy_regex(i)} {{\n            {_NGINX_PROXY}\n        }}"
            for i in range(N_DECOY_ROUTES)
        ]
        # proxy_set_header in a location replaces the inherited list, so Connection "" is
        # repeated inside _NGINX_PROXY here as in every location.
        locations.append(
            f'        location ~ {TARGET_REGEX} {{\n            {_NGINX_PROXY}\n            proxy_set_header {ROUTE_HEADER[0]} "{ROUTE_HEADER[1]}";\n        }}'
        )
        body = "\n".join(locations)
    else:
        body = f"        location / {{\n            {_NGINX_PROXY}\n        }}"
    return f"""{_nginx_main(prefix)}
http {{
{_nginx_http_common(prefix)}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        {_nginx_listen(port, h2, tls)}
{body}
    }}
}}
"""


def _nginx_listen(port: int, h2: bool, tls: TlsFiles | None) -> str:
    opts = " http2" if h2 else ""
    if tls is None:
        return f"listen 127.0.0.1:{port}{opts} backlog=4096;"
    # OpenSSL's defaults otherwise (session tickets on, as in moorline and HAProxy).
    return f"""listen 127.0.0.1:{port} ssl{opts} backlog=4096;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.3;"""


def nginx_grpc_proxy(prefix: Path, port: int, upstream_port: int) -> str:
    """h2c listener, ``grpc_pass`` to the gRPC backend. nginx sends one stream per upstream
    connection (it does not multiplex upstream), so its pool is sized for every stream the
    load keeps in flight: a smaller pool would open and close connections during the run."""
    return f"""{_nginx_main(prefix)}
http {{
{_nginx_http_common(prefix)}
    upstream grpcbe {{
        server 127.0.0.1:{upstream_port};
        keepalive {GRPC_UPSTREAM_KEEPALIVE};
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        location / {{
            grpc_pass grpc://grpcbe;
            grpc_buffer_size 16k;
        }}
    }}
}}
"""


def nginx_stream_proxy(prefix: Path, port: int, upstream_port: int) -> str:
    return f"""{_nginx_main(prefix, load_stream=True)}
stream {{
    upstream backend {{ server 127.0.0.1:{upstream_port}; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass backend;
    }}
}}
"""


def _haproxy_head(mode: str) -> str:
    return f"""global
    nbthread 1
    maxconn {HAPROXY_MAXCONN}

defaults
    mode {mode}
    maxconn {HAPROXY_MAXCONN}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
"""


def haproxy_http(
    port: int,
    upstream_port: int,
    route_rules: bool = False,
    *,
    bind_opts: str = "",
    server_opts: str = "",
) -> str:
    """``bind_opts``: ``proto h2`` (h2c prior knowledge) or ``ssl crt ...``; ``server_opts``:
    ``proto h2`` for an HTTP/2 (gRPC) backend."""
    rules = ""
    default = "    default_backend be\n"
    if route_rules:
        lines = [f"    acl r{i} path_reg {decoy_regex(i)}" for i in range(N_DECOY_ROUTES)]
        lines.append(f"    acl target path_reg {TARGET_REGEX}")
        lines.append(f"    http-request set-header {ROUTE_HEADER[0]} {ROUTE_HEADER[1]} if target")
        # use_backend rules are evaluated in order: every decoy regex runs before the target's.
        lines += [f"    use_backend be if r{i}" for i in range(N_DECOY_ROUTES)]
        lines.append("    use_backend be if target")
        rules = "\n".join(lines) + "\n"
        default = ""
    return f"""{_haproxy_head("http")}    option http-keep-alive
    http-reuse always

frontend fe
    bind 127.0.0.1:{port}{" " + bind_opts if bind_opts else ""}
{rules}{default}
backend be
    server s1 127.0.0.1:{upstream_port}{" " + server_opts if server_opts else ""}
"""


def haproxy_tls_bind(tls: TlsFiles) -> str:
    # HAProxy reads certificate and key from one PEM file.
    return f"ssl crt {tls.combined} ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3"


def haproxy_tcp(port: int, upstream_port: int) -> str:
    return f"""{_haproxy_head("tcp")}
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{upstream_port}
"""


def moorline_http(
    port: int,
    upstream_port: int,
    admin_port: int,
    route_rules: bool = False,
    *,
    upstream_h2: bool = False,
    tls: TlsFiles | None = None,
) -> str:
    """HCM with codec AUTO (h2c prior knowledge is detected by its preface); ``upstream_h2``:
    the cluster speaks HTTP/2 (``explicit_http_config.http2_protocol_options``); ``tls``: the
    filter chain terminates TLS 1.3 with that certificate."""
    routes: list[dict[str, Any]]
    if route_rules:
        routes = [
            {"match": {"safe_regex": {"regex": decoy_regex(i)}}, "route": {"cluster": "backend"}}
            for i in range(N_DECOY_ROUTES)
        ]
        routes.append(
            {
                "match": {"safe_regex": {"regex": TARGET_REGEX}},
                "route": {"cluster": "backend"},
                "request_headers_to_add": [
                    {
                        "header": {"key": ROUTE_HEADER[0], "value": ROUTE_HEADER[1]},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
            }
        )
    else:
        routes = [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]
    listener = procs.hcm_listener(
        "bench_http", port, routes, hcm_extra={"generate_request_id": False}, stat_prefix="bench"
    )
    if tls is not None:
        listener["filter_chains"][0]["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(tls.cert)},
                            "private_key": {"filename": str(tls.key)},
                        }
                    ],
                    "tls_params": {
                        "tls_minimum_protocol_version": "TLSv1_3",
                        "tls_maximum_protocol_version": "TLSv1_3",
                    },
                },
            },
        }
    extra: dict[str, Any] = {}
    if upstream_h2:
        hpo = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        extra["typed_extension_protocol_options"] = {
            hpo: {
                "@type": f"type.googleapis.com/{hpo}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return procs.bootstrap([listener], [procs.cluster("backend", [upstream_port], **extra)], admin_port)


def floor_argv(python: str, port: int, upstream_port: int) -> list[str]:
    """The calibration floor (``bench/floor.py``): a bare uvloop + httptools HTTP/1.1 forwarder
    with one upstream connection per downstream connection; its command line is its config."""
    return [
        python,
        "-m",
        "bench.floor",
        "--listen",
        f"127.0.0.1:{port}",
        "--to",
        f"127.0.0.1:{upstream_port}",
    ]


def floor_config_text(argv: list[str]) -> str:
    """What the JSON report stores under ``configs.floor``."""
    return (
        " ".join(argv[1:]) + "\n"
        "# bench/floor.py: no routing, no stats, no request id, no filters, no access log;"
        " one upstream connection per downstream connection (opened on accept), keep-alive both ways;"
        " heads rebuilt from httptools' fields, Content-Length bodies passed through, chunked re-chunked.\n"
    )


def moorline_tcp(port: int, upstream_port: int, admin_port: int) -> str:
    listener = procs.tcp_listener("bench_tcp", port, "backend")
    return procs.bootstrap([listener], [procs.cluster("backend", [upstream_port])], admin_port)
