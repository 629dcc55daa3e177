"""RBAC end to end with a real moorline process and real clients (curl, openssl-made certificates,
Python sockets): Istio's AuthorizationPolicy output from a sidecar config dump enforced on an
HTTP listener, ALLOW by method and path, DENY by header, shadow rules counted, SPIFFE identities
over mTLS for the HTTP filter and for the network filter in front of tcp_proxy, and source-IP
rules. Every decision is checked in the admin /stats too."""

from __future__ import annotations

import importlib.util
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from moorline.testing.fixtures import FIXTURES
from moorline.testing.procs import bootstrap, cluster, free_port, hcm_listener, require_binary
from moorline.testing.upstream import TcpEchoServer, TestUpstream

pytestmark = pytest.mark.e2e

_spec = importlib.util.spec_from_file_location(
    "tls_certs_rbac", Path(__file__).parent.parent / "net" / "test_tls_certs.py"
)
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)
Pki = _certs.Pki

DUMP = FIXTURES / "istio" / "sidecar_configdump_authz.json"
HTTP_RBAC = "envoy.filters.http.rbac"
NET_RBAC = "envoy.filters.network.rbac"
HTTP_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NET_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
DTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
INTRUDER = "spiffe://cluster.local/ns/default/sa/intruder"
NAME = "svc.local"


def _dump_doc() -> dict[str, Any]:
    return json.loads(DUMP.read_text())  # type: ignore[no-any-return]


def dump_http_filters() -> list[dict[str, Any]]:
    """The HTTP filters of the dump's listener on port 80 (virtualInbound's "0.0.0.0_80" chain),
    exactly as Istio wrote them, router last."""
    lst = _dump_doc()["configs"][0]["dynamic_listeners"][23]["active_state"]["listener"]
    chain = next(c for c in lst["filter_chains"] if c.get("name") == "0.0.0.0_80")
    hcm = chain["filters"][-1]["typed_config"]
    return [f for f in hcm["http_filters"] if f["name"] in (HTTP_RBAC, "envoy.filters.http.router")]


def dump_rbac(name: str, *, shadow: bool) -> dict[str, Any]:
    lst = _dump_doc()["configs"][0]["dynamic_listeners"][23]["active_state"]["listener"]
    for c in lst["filter_chains"]:
        for f in c["filters"]:
            cands = [f, *f.get("typed_config", {}).get("http_filters", [])]
            for x in cands:
                if x.get("name") == name and ("shadow_rules" in x["typed_config"]) == shadow:
                    return x["typed_config"]  # type: ignore[no-any-return]
    raise AssertionError(f"{name} not in the dump")


def curl(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: tuple[str, ...] = (),
    tls: tuple[Path, Path, Path] | None = None,
    interface: str | None = None,
) -> tuple[int, str]:
    """(status, body) from curl; ``tls`` is (CA, client certificate, client key)."""
    args = [
        require_binary("curl"),
        "-sS",
        "--max-time",
        "10",
        "-X",
        method,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ]
    for h in headers:
        args += ["-H", h]
    if interface:
        args += ["--interface", interface]
    if tls is not None:
        ca, cert, key = tls
        args += ["--cacert", str(ca), "--cert", str(cert), "--key", str(key)]
        args += ["--resolve", f"{NAME}:{port}:127.0.0.1", f"https://{NAME}:{port}{path}"]
    else:
        args.append(f"http://127.0.0.1:{port}{path}")
    r = subprocess.run(args, capture_output=True, text=True, timeout=20)
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body + r.stderr


def _dtls(pki: Any, server: tuple[Path, Path]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DTLS,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(server[0])},
                        "private_key": {"filename": str(server[1])},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(pki.ca_cert)}},
            },
        },
    }


def _tcp_listener(
    name: str, port: int, rbac: dict[str, Any], cluster_name: str, **chain: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                **chain,
                "filters": [
                    {"name": NET_RBAC, "typed_config": rbac},
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {"@type": TCP_PROXY, "stat_prefix": name, "cluster": cluster_name},
                    },
                ],
            }
        ],
    }


def _policy(perms: list[dict[str, Any]], prins: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"permissions": perms, "principals": prins or [{"any": True}]}


def settled(proc: Any, names: list[str]) -> dict[str, int | str]:
    """/stats once every gauge in ``names`` is back to 0 (closing is asynchronous; polled,
    without asserting how long it takes)."""
    deadline = time.monotonic() + 10
    while True:
        stats = proc.stats()
        if all(stats.get(n) == 0 for n in names) or time.monotonic() > deadline:
            return stats  # type: ignore[no-any-return]
        time.sleep(0.05)


def _echo(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` and read until it came back, or until the proxy closed the connection."""
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        got += chunk
    return got


# ------------------------------------------------------------------------------------- HTTP


def test_istio_http_policies_from_the_dump_are_enforced(moorline: Any, upstream: TestUpstream) -> None:
    """The dump's two HTTP RBAC filters as they are, in their order, under the dump's stat prefix
    (Istio's other HTTP filters, ext_authz, fault, cors, stats, are left out). The ALLOW policy
    wants JWT claims (dynamic metadata from Istio's JWT filter, which moorline does not have),
    so every request is denied naming no policy, as Envoy without that filter denies it; the
    ext-authz shadow filter behind it never sees a denied request."""
    port = free_port()
    lst = hcm_listener(
        "inbound",
        port,
        [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}],
        stat_prefix="inbound_0.0.0.0_80",
    )
    filters = dump_http_filters()
    assert [f["name"] for f in filters] == [HTTP_RBAC, HTTP_RBAC, "envoy.filters.http.router"]
    lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"] = filters
    proc = moorline(bootstrap([lst], [cluster("svc", [upstream.port])]))
    code, body = curl(port, "/info")
    assert code == 403 and body.startswith("RBAC: access denied"), body
    code, _ = curl(port, "/data", method="POST")
    assert code == 403
    assert upstream.requests == []
    stats = proc.stats()
    prefix = "http.inbound_0.0.0.0_80.rbac."
    assert stats[prefix + "denied"] == 2
    assert stats[prefix + "allowed"] == 0
    # The first filter has no shadow rules (its dry-run counters stay 0); the second, whose
    # shadow rules are ext-authz's, is behind the denial.
    assert stats[prefix + "istio_dry_run_allow_shadow_allowed"] == 0
    assert stats[prefix + "istio_ext_authz_shadow_allowed"] == 0
    assert stats[prefix + "istio_ext_authz_shadow_denied"] == 0


def test_allow_by_method_and_path_deny_by_header_shadow_counted(
    moorline: Any, upstream: TestUpstream, tmp_path: Path
) -> None:
    """The dump's permissions (GET /info*, POST /data) under an ALLOW policy for any principal,
    a DENY filter on a header in front of it, and a shadow DENY on /info/secret."""
    perms = dump_rbac(HTTP_RBAC, shadow=False)["rules"]["policies"]["ns[default]-policy[httpbin]-rule[0]"][
        "permissions"
    ]
    deny = {
        "@type": HTTP_TYPE,
        "rules": {
            "action": "DENY",
            "policies": {"block-debug": _policy([{"header": {"name": "x-debug", "present_match": True}}])},
        },
        "rules_stat_prefix": "hdr_",
    }
    allow = {
        "@type": HTTP_TYPE,
        "rules": {"action": "ALLOW", "policies": {"httpbin": _policy(perms)}},
        "shadow_rules": {
            "action": "DENY",
            "policies": {"secret": _policy([{"url_path": {"path": {"prefix": "/info/secret"}}}])},
        },
        "shadow_rules_stat_prefix": "dry_",
    }
    port = free_port()
    log = tmp_path / "access.log"
    lst = hcm_listener(
        "web",
        port,
        [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}],
        hcm_extra={
            "http_filters": [
                {"name": HTTP_RBAC, "typed_config": deny},
                {"name": HTTP_RBAC, "typed_config": allow},
                ROUTER,
            ],
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": str(log),
                        "log_format": {"text_format_source": {"inline_string": "%RESPONSE_CODE_DETAILS%\n"}},
                    },
                }
            ],
        },
    )
    proc = moorline(bootstrap([lst], [cluster("svc", [upstream.port])]))
    assert curl(port, "/info")[0] == 200
    assert curl(port, "/info/secret?x=1")[0] == 200  # the shadow DENY is not enforced
    assert curl(port, "/data", method="POST")[0] == 200
    code, body = curl(port, "/data")  # GET /data: no permission matches
    assert code == 403 and body.startswith("RBAC: access denied")
    code, body = curl(port, "/info", headers=("x-debug: 1",))
    assert code == 403 and body.startswith("RBAC: access denied")
    assert [r.path for r in upstream.requests] == ["/info", "/info/secret?x=1", "/data"]
    stats = proc.stats()
    assert (stats["http.web.rbac.hdr_allowed"], stats["http.web.rbac.hdr_denied"]) == (4, 1)
    assert (stats["http.web.rbac.allowed"], stats["http.web.rbac.denied"]) == (3, 1)
    # The header-denied request never reached the second filter's shadow rules.
    assert stats["http.web.rbac.dry_shadow_denied"] == 1
    assert stats["http.web.rbac.dry_shadow_allowed"] == 3
    proc.stop()
    details = log.read_text().split()
    assert details.count("rbac_access_denied_matched_policy[none]") == 1
    assert details.count("rbac_access_denied_matched_policy[block-debug]") == 1


def test_http_source_ip_rule(moorline: Any, upstream: TestUpstream) -> None:
    """Only 127.0.0.1 may call; the same client from 127.0.0.2 is refused."""
    rbac = {
        "@type": HTTP_TYPE,
        "rules": {
            "policies": {
                "local-only": _policy(
                    [{"any": True}], [{"direct_remote_ip": {"address_prefix": "127.0.0.1", "prefix_len": 32}}]
                )
            }
        },
    }
    port = free_port()
    lst = hcm_listener(
        "src",
        port,
        [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}],
        hcm_extra={"http_filters": [{"name": HTTP_RBAC, "typed_config": rbac}, ROUTER]},
    )
    proc = moorline(bootstrap([lst], [cluster("svc", [upstream.port])]))
    assert curl(port, "/a", interface="127.0.0.1")[0] == 200
    code, body = curl(port, "/b", interface="127.0.0.2")
    assert code == 403, body
    assert [r.path for r in upstream.requests] == ["/a"]
    stats = proc.stats()
    assert (stats["http.src.rbac.allowed"], stats["http.src.rbac.denied"]) == (1, 1)


def test_http_mtls_spiffe_identity(moorline: Any, upstream: TestUpstream, tmp_path: Path) -> None:
    """The dump's peer-principal shape (filter state io.istio.peer_principal, the client
    certificate's SPIFFE URI SAN) decides per identity over mTLS."""
    pki = Pki(tmp_path / "pki")
    server = pki.issue("server", NAME, [f"DNS:{NAME}"])
    sleep = pki.issue("sleep", "sleep", [f"URI:{SLEEP}"], client=True)
    intruder = pki.issue("intruder", "intruder", [f"URI:{INTRUDER}"], client=True)
    principal = dump_rbac(HTTP_RBAC, shadow=False)["rules"]["policies"][
        "ns[default]-policy[httpbin]-rule[0]"
    ]["principals"][0]["and_ids"]["ids"][0]  # or_ids: filter_state io.istio.peer_principal == sleep
    assert principal["or_ids"]["ids"][0]["filter_state"]["key"] == "io.istio.peer_principal"
    rbac = {"@type": HTTP_TYPE, "rules": {"policies": {"sleep": _policy([{"any": True}], [principal])}}}
    port = free_port()
    lst = hcm_listener(
        "mtls",
        port,
        [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}],
        hcm_extra={"http_filters": [{"name": HTTP_RBAC, "typed_config": rbac}, ROUTER]},
    )
    lst["filter_chains"][0]["transport_socket"] = _dtls(pki, server)
    proc = moorline(bootstrap([lst], [cluster("svc", [upstream.port])]))
    code, body = curl(port, "/hello", tls=(pki.ca_cert, *sleep))
    assert code == 200, body
    code, body = curl(port, "/hello", tls=(pki.ca_cert, *intruder))
    assert code == 403 and body.startswith("RBAC: access denied"), body
    assert len(upstream.requests) == 1
    stats = settled(proc, [f"listener.127.0.0.1_{port}.downstream_cx_active"])
    assert stats[f"listener.127.0.0.1_{port}.downstream_cx_active"] == 0
    assert (stats["http.mtls.rbac.allowed"], stats["http.mtls.rbac.denied"]) == (1, 1)


# ---------------------------------------------------------------------------------- network


def test_network_rbac_mtls_spiffe_identity_in_front_of_tcp_proxy(moorline: Any, tmp_path: Path) -> None:
    """A TLS-terminating tcp_proxy chain: the network filter decides after the handshake, on
    the client certificate's URI SAN; a refused connection is closed and sends nothing upstream."""
    pki = Pki(tmp_path / "pki")
    server = pki.issue("server", NAME, [f"DNS:{NAME}"])
    sleep = pki.issue("sleep", "sleep", [f"URI:{SLEEP}"], client=True)
    intruder = pki.issue("intruder", "intruder", [f"URI:{INTRUDER}"], client=True)
    rbac = {
        "@type": NET_TYPE,
        "stat_prefix": "tcp.",
        "rules": {
            "policies": {
                "sleep-only": _policy(
                    [{"any": True}], [{"authenticated": {"principal_name": {"exact": SLEEP}}}]
                )
            }
        },
        "shadow_rules": {"action": "DENY", "policies": {"all": _policy([{"any": True}])}},
        "shadow_rules_stat_prefix": "dry_",
    }
    echo = TcpEchoServer().start()
    try:
        port = free_port()
        lst = _tcp_listener("tls_in", port, rbac, "echo", transport_socket=_dtls(pki, server))
        proc = moorline(bootstrap([lst], [cluster("echo", [echo.port])]))

        def client(cert: tuple[Path, Path]) -> bytes:
            ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                try:
                    s = ctx.wrap_socket(raw, server_hostname=NAME)
                except (ssl.SSLError, ConnectionResetError):
                    return b""  # (TLS 1.2 would fail here; TLS 1.3 fails on the first read)
                with s:
                    return _echo(s, b"ping from a mesh client")

        assert client(sleep) == b"ping from a mesh client"
        assert client(intruder) == b""
        # Nothing is left behind by the refused connection (downstream, session, upstream).
        gauges = [f"listener.127.0.0.1_{port}.downstream_cx_active", "cluster.echo.upstream_cx_active"]
        stats = settled(proc, gauges)
        assert [stats[g] for g in gauges] == [0, 0]
        assert (stats["tcp.rbac.allowed"], stats["tcp.rbac.denied"]) == (1, 1)
        assert (stats["tcp.rbac.dry_shadow_denied"], stats["tcp.rbac.dry_shadow_allowed"]) == (2, 0)
        # Only the allowed connection's bytes went upstream.
        assert stats["cluster.echo.upstream_cx_tx_bytes_total"] == len(b"ping from a mesh client")
    finally:
        echo.stop()


def test_network_rbac_source_ip_and_istio_deny_all(moorline: Any) -> None:
    """Plain TCP: a source-IP ALLOW (127.0.0.1 only) decides before the upstream is dialled;
    the dump's TCP chain RBAC (``rules: {}``, Istio's answer to an HTTP-only policy on a TCP
    port) refuses every connection."""
    echo = TcpEchoServer().start()
    try:
        p1, p2 = free_port(), free_port()
        src = {
            "@type": NET_TYPE,
            "stat_prefix": "src",
            "rules": {
                "policies": {
                    "lo1": _policy(
                        [{"any": True}], [{"source_ip": {"address_prefix": "127.0.0.1", "prefix_len": 32}}]
                    )
                }
            },
        }
        istio = dump_rbac(NET_RBAC, shadow=False)
        assert istio["rules"] == {}
        proc = moorline(
            bootstrap(
                [_tcp_listener("by_src", p1, src, "echo"), _tcp_listener("istio", p2, istio, "echo")],
                [cluster("echo", [echo.port])],
            )
        )

        def client(port: int, source: str) -> bytes:
            s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            with s:
                return _echo(s, b"hello")

        assert client(p1, "127.0.0.1") == b"hello"
        assert client(p1, "127.0.0.2") == b""
        assert client(p2, "127.0.0.1") == b""
        gauges = [f"listener.127.0.0.1_{p}.downstream_cx_active" for p in (p1, p2)]
        stats = settled(proc, [*gauges, "cluster.echo.upstream_cx_active"])
        assert [stats[g] for g in gauges] == [0, 0]
        assert (stats["src.rbac.allowed"], stats["src.rbac.denied"]) == (1, 1)
        assert (stats["tcp.rbac.allowed"], stats["tcp.rbac.denied"]) == (0, 1)
        # Refused plain connections never dialled the upstream.
        assert stats["cluster.echo.upstream_cx_total"] == 1
        assert echo.connections_total == 1
    finally:
        echo.stop()


def test_network_rbac_in_front_of_the_http_connection_manager(
    moorline: Any, upstream: TestUpstream, tmp_path: Path
) -> None:
    """Network RBAC before the HCM on an mTLS chain: a refused identity's connection is closed
    after the handshake, before the codec sees its request; plain TCP is decided at accept."""
    pki = Pki(tmp_path / "pki")
    server = pki.issue("server", NAME, [f"DNS:{NAME}"])
    sleep = pki.issue("sleep", "sleep", [f"URI:{SLEEP}"], client=True)
    intruder = pki.issue("intruder", "intruder", [f"URI:{INTRUDER}"], client=True)
    rbac = {
        "@type": NET_TYPE,
        "stat_prefix": "h.",
        "rules": {
            "policies": {
                "sleep": _policy([{"any": True}], [{"authenticated": {"principal_name": {"exact": SLEEP}}}])
            }
        },
    }
    port, plain = free_port(), free_port()
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}]
    lst = hcm_listener("mtls", port, routes)
    lst["filter_chains"][0]["filters"].insert(0, {"name": NET_RBAC, "typed_config": rbac})
    lst["filter_chains"][0]["transport_socket"] = _dtls(pki, server)
    lst2 = hcm_listener("plain", plain, routes)
    lst2["filter_chains"][0]["filters"].insert(
        0, {"name": NET_RBAC, "typed_config": {**rbac, "stat_prefix": "p."}}
    )
    proc = moorline(bootstrap([lst, lst2], [cluster("svc", [upstream.port])]))
    code, body = curl(port, "/ok", tls=(pki.ca_cert, *sleep))
    assert code == 200, body
    code, body = curl(port, "/no", tls=(pki.ca_cert, *intruder))
    assert code == 0, body  # no HTTP answer at all: the connection was closed
    code, body = curl(plain, "/no")
    assert code == 0, body  # plain TCP is never authenticated
    assert [r.path for r in upstream.requests] == ["/ok"]
    gauges = [f"listener.127.0.0.1_{p}.downstream_cx_active" for p in (port, plain)]
    stats = settled(proc, gauges)
    assert [stats[g] for g in gauges] == [0, 0]
    assert (stats["h.rbac.allowed"], stats["h.rbac.denied"]) == (1, 1)
    assert (stats["p.rbac.allowed"], stats["p.rbac.denied"]) == (0, 1)
    assert stats["http.mtls.downstream_rq_total"] == 1
