"""TLS on a real Listener (uvloop, loopback) with real peers: openssl s_client and Python ssl.

Covers downstream termination (SNI certificate choice, ALPN, TLS versions, mTLS with SPIFFE SAN
matching, CRL), the tls_inspector / http_inspector listener filters and SNI chain selection,
certificate rotation from files and from an SDS file, upstream TLS with client certificates, and
config errors (SDS over gRPC from Istio's config dump).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from moorline.testing.fixtures import FIXTURES as SHARED_FIXTURES

sys.path.insert(0, str(Path(__file__).parent))
from test_tls_certs import Pki, cert_info

import moorline.filters.listener.http_inspector
import moorline.filters.listener.tls_inspector  # noqa: F401  (they register themselves)
from moorline.config import registry
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.config.matchers import StringMatcher
from moorline.net.conn_info import ConnInfo
from moorline.net.listener import Listener
from moorline.net.tls import SanMatcher, compile_downstream, serve_accepted
from moorline.observability.stats import Store

DTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
SPIFFE = "spiffe://cluster.local/ns/default/sa/foo"


# --- a terminal filter that serves an echo protocol through moorline.net.tls ---------------------


class Echo(asyncio.Protocol):
    def __init__(self, term: EchoTerminal, info: ConnInfo) -> None:
        self.term = term
        self.info = info

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        self.term.served.append(self.info)
        transport.write(f"chain={self.term.path} alpn={self.info.negotiated_alpn}\n".encode())

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        if data.endswith(b"\n"):
            self.transport.close()  # one line per connection: s_client -ign_eof then exits

    def connection_lost(self, exc: Exception | None) -> None:
        self.info.notify_closed()


class EchoTerminal:
    terminal = True

    def __init__(self, path: str) -> None:
        self.path = path.split(".")[-2] if "filter_chains" in path else path
        self.served: list[ConnInfo] = []
        self.accepted: list[ConnInfo] = []

    def on_accept(self, sock: socket.socket, info: ConnInfo) -> None:
        self.accepted.append(info)
        serve_accepted(asyncio.get_running_loop(), sock, info, lambda: Echo(self, info))


TERMS: dict[str, EchoTerminal] = {}


def _echo_factory(cfg: Any, ctx: Any, path: str) -> EchoTerminal:
    t = TERMS[path] = EchoTerminal(path)
    return t


registry.register("network", ["test.tls.echo"], [], _echo_factory)
ECHO = [{"name": "test.tls.echo"}]


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(coro_fn())


def make(d: dict[str, Any], store: Store | None = None) -> tuple[Listener, BuildContext]:
    ctx = BuildContext(stats=store if store is not None else Store())
    TERMS.clear()
    return Listener(parse_message(d, listener_pb2.Listener), ctx, "listeners[0]"), ctx


def listener(chains: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": "tls",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": chains,
        **extra,
    }


def tls_socket(common: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": DTLS, "common_tls_context": common, **extra},
    }


def certs(*pairs: tuple[Path, Path]) -> list[dict[str, Any]]:
    return [
        {"certificate_chain": {"filename": str(c)}, "private_key": {"filename": str(k)}} for c, k in pairs
    ]


def stat(store: Store, name: str) -> int:
    s = store.get(name)
    return 0 if s is None else s.value  # type: ignore[union-attr]


P = "listener.127.0.0.1_0."


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pems(pki: Pki) -> dict[str, tuple[Path, Path]]:
    return {
        "a": pki.issue("a", "a.example.com", ["DNS:a.example.com"]),
        "wild": pki.issue("wild", "wild", ["DNS:*.b.example.com"]),
        "default": pki.issue("default", "default", ["DNS:default.example.com"]),
        "client": pki.issue("client", "client", [f"URI:{SPIFFE}"], client=True),
        "client_bad": pki.issue("client_bad", "client_bad", ["URI:spiffe://evil/ns/x/sa/y"], client=True),
    }


async def s_client(port: int, *args: str, data: bytes = b"ping\n") -> tuple[int, str]:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("openssl is not installed")
    p = await asyncio.create_subprocess_exec(
        exe, "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(p.communicate(data), 20)
    return p.returncode or 0, out.decode(errors="replace")


def client_ctx(
    pki: Pki, cert: tuple[Path, Path] | None = None, alpn: list[str] | None = None
) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.load_verify_locations(cafile=str(pki.ca_cert))
    if cert:
        c.load_cert_chain(str(cert[0]), str(cert[1]))
    if alpn:
        c.set_alpn_protocols(alpn)
    return c


def py_client(port: int, ctx: ssl.SSLContext, sni: str) -> tuple[str, dict[str, Any], str | None]:
    """Blocking: handshake, read the greeting line; returns (line, peer cert, alpn). A peer that
    refuses us after the handshake (TLS 1.3 client-auth alerts arrive then) gives line ``""``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            cert, alpn = s.getpeercert() or {}, s.selected_alpn_protocol()
            buf = b""
            try:
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1024)
                    if not chunk:
                        break
                    buf += chunk
            except (ssl.SSLError, ConnectionError):
                buf = b""
            return buf.decode(), cert, alpn


def rejected(port: int, ctx: ssl.SSLContext, sni: str) -> bool:
    try:
        line, _, _ = py_client(port, ctx, sni)
    except (ssl.SSLError, ConnectionError):
        return True
    return line == ""


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# --- downstream termination ---------------------------------------------------------------------


def test_sni_picks_certificate_and_alpn_with_s_client(pems: dict[str, tuple[Path, Path]]) -> None:
    store = Store()
    d = listener(
        [
            {
                "transport_socket": tls_socket(
                    {
                        "tls_certificates": certs(pems["default"], pems["a"], pems["wild"]),
                        "alpn_protocols": ["h2", "http/1.1"],
                    }
                ),
                "filters": ECHO,
            }
        ]
    )

    async def main() -> None:
        lst, _ = make(d, store)
        await lst.start()
        port = lst.bound_address[2]
        try:
            _, out = await s_client(port, "-servername", "a.example.com", "-alpn", "h2")
            assert "subject=CN = a.example.com" in out, out
            assert "ALPN protocol: h2" in out
            assert "alpn=h2" in out  # what the echo protocol saw in info.negotiated_alpn
            _, out = await s_client(port, "-servername", "x.b.example.com", "-alpn", "http/1.1")
            assert "subject=CN = wild" in out and "ALPN protocol: http/1.1" in out
            _, out = await s_client(port, "-servername", "nope.example.com")
            assert "subject=CN = default" in out and "alpn=None" in out
            # A fully qualified name with its trailing dot names the same host.
            _, out = await s_client(port, "-servername", "a.example.com.")
            assert "subject=CN = a.example.com" in out, out
            _, out = await s_client(port, "-noservername")
            assert "subject=CN = default" in out
            term = next(iter(TERMS.values()))
            assert [i.server_name for i in term.served] == [
                "a.example.com",
                "x.b.example.com",
                "nope.example.com",
                "a.example.com",
                None,
            ]
            assert all(i.tls_version == "TLSv1.3" for i in term.served)
            await asyncio.sleep(0.05)
            assert stat(store, P + "ssl.handshake") == 5
            assert stat(store, P + "ssl.versions.TLSv1.3") == 5
            assert stat(store, P + "ssl.no_certificate") == 5
            assert stat(store, P + "downstream_cx_active") == 0
        finally:
            lst.close()

    run(main)


def test_tls_version_bounds_and_ciphers(pems: dict[str, tuple[Path, Path]], pki: Pki) -> None:
    store = Store()
    d = listener(
        [
            {
                "transport_socket": tls_socket(
                    {
                        "tls_certificates": certs(pems["a"]),
                        "tls_params": {
                            "tls_minimum_protocol_version": "TLSv1_2",
                            "tls_maximum_protocol_version": "TLSv1_2",
                            "cipher_suites": [
                                "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]"
                            ],
                            "ecdh_curves": ["P-256"],
                        },
                    }
                ),
                "filters": ECHO,
            }
        ]
    )

    async def main() -> None:
        lst, _ = make(d, store)
        await lst.start()
        port = lst.bound_address[2]
        try:
            _, out = await s_client(port, "-servername", "a.example.com", "-tls1_3")
            assert "alpn=" not in out  # TLS 1.3 refused: no application bytes
            _, out = await s_client(port, "-servername", "a.example.com", "-tls1_2")
            assert "Protocol  : TLSv1.2" in out and "ECDHE-ECDSA-AES128-GCM-SHA256" in out, out
            await asyncio.sleep(0.05)
            assert stat(store, P + "ssl.versions.TLSv1.2") == 1
            assert stat(store, P + "ssl.ciphers.ECDHE-ECDSA-AES128-GCM-SHA256") == 1
            assert stat(store, P + "ssl.connection_error") == 1
            assert stat(store, P + "downstream_cx_active") == 0
        finally:
            lst.close()

    run(main)


def _mtls_listener(pems: dict[str, tuple[Path, Path]], pki: Pki, **vc: Any) -> dict[str, Any]:
    return listener(
        [
            {
                "transport_socket": tls_socket(
                    {
                        "tls_certificates": certs(pems["a"]),
                        "validation_context": {
                            "trusted_ca": {"filename": str(pki.ca_cert)},
                            "match_typed_subject_alt_names": [
                                {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
                            ],
                            **vc,
                        },
                    },
                    require_client_certificate=True,
                ),
                "filters": ECHO,
            }
        ]
    )


def test_mtls_spiffe_san_accept_and_reject(pems: dict[str, tuple[Path, Path]], pki: Pki) -> None:
    store = Store()

    async def main() -> None:
        lst, _ = make(_mtls_listener(pems, pki), store)
        await lst.start()
        port = lst.bound_address[2]
        try:
            line, _cert, _ = await in_thread(
                py_client, port, client_ctx(pki, pems["client"]), "a.example.com"
            )
            assert line.startswith("chain=")
            term = next(iter(TERMS.values()))
            assert ("URI", SPIFFE) in term.served[0].peer_certificate["subjectAltName"]  # type: ignore[index]
            # No client certificate: the handshake fails (TLS 1.3: seen on the first read).
            assert await in_thread(rejected, port, client_ctx(pki), "a.example.com")
            # A certificate from the right CA with a SAN outside spiffe://cluster.local/.
            assert await in_thread(rejected, port, client_ctx(pki, pems["client_bad"]), "a.example.com")
            # openssl s_client with the good certificate.
            _, out = await s_client(
                port,
                "-servername",
                "a.example.com",
                "-cert",
                str(pems["client"][0]),
                "-key",
                str(pems["client"][1]),
            )
            assert "chain=" in out and "ping" in out
            await asyncio.sleep(0.1)
            assert stat(store, P + "ssl.handshake") == 2
            assert stat(store, P + "ssl.fail_verify_no_cert") == 1
            assert stat(store, P + "ssl.fail_verify_san") == 1
            assert len(term.served) == 2
            assert stat(store, P + "downstream_cx_active") == 0
        finally:
            lst.close()

    run(main)


def test_crl_rejects_revoked_client(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "crlpki")
    srv = pki.issue("srv", "srv", ["DNS:srv"])
    good = pki.issue("good", "good", [f"URI:{SPIFFE}"], client=True)
    bad = pki.issue("bad", "bad", [f"URI:{SPIFFE}"], client=True)
    pki.revoke(bad[0])
    crl = pki.crl()
    store = Store()
    d = _mtls_listener({"a": srv}, pki, crl={"filename": str(crl)})

    async def main() -> None:
        lst, _ = make(d, store)
        await lst.start()
        port = lst.bound_address[2]
        try:
            line, _, _ = await in_thread(py_client, port, client_ctx(pki, good), "srv")
            assert line.startswith("chain=")
            assert await in_thread(rejected, port, client_ctx(pki, bad), "srv")
            await asyncio.sleep(0.05)
            assert stat(store, P + "ssl.fail_verify_error") == 1
        finally:
            lst.close()

    run(main)


# --- listener filters ----------------------------------------------------------------------------


def test_tls_inspector_routes_by_sni_and_alpn_without_terminating(pems: dict[str, tuple[Path, Path]]) -> None:
    """Chains by server_names (exact, wildcard), application_protocols and transport_protocol;
    the passthrough chains do not terminate: the recorder sees the raw ClientHello."""
    store = Store()
    d = listener(
        [
            {"filter_chain_match": {"server_names": ["a.example.com"]}, "filters": ECHO},
            {"filter_chain_match": {"server_names": ["*.example.com"]}, "filters": ECHO},
            {
                "filter_chain_match": {"transport_protocol": "tls", "application_protocols": ["h2"]},
                "filters": ECHO,
            },
            {"filter_chain_match": {"transport_protocol": "tls"}, "filters": ECHO},
            {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": ECHO},
        ],
        listener_filters=[
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
        ],
    )  # fmt: skip

    def hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.check_hostname = False
        c.verify_mode = ssl.CERT_NONE
        if alpn:
            c.set_alpn_protocols(alpn)
        i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = c.wrap_bio(i, o, server_hostname=sni)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        return o.read()

    async def main() -> None:
        lst, _ = make(d, store)
        await lst.start()
        port = lst.bound_address[2]
        loop = asyncio.get_running_loop()
        try:
            cases = [
                (hello("a.example.com"), "filter_chains[0]"),
                (hello("zz.example.com"), "filter_chains[1]"),
                (hello("other.org", ["h2", "http/1.1"]), "filter_chains[2]"),
                (hello(None, ["http/1.1"]), "filter_chains[3]"),
                (b"GET / HTTP/1.1\r\n\r\n", "filter_chains[4]"),
            ]
            for data, want in cases:
                s = socket.create_connection(("127.0.0.1", port))
                s.setblocking(False)
                # Send the hello in two pieces: the inspector must wait for the rest.
                await loop.sock_sendall(s, data[:7])
                await asyncio.sleep(0.02)
                await loop.sock_sendall(s, data[7:])
                for _ in range(200):
                    got = [k for k, t in TERMS.items() if t.accepted]
                    if got:
                        break
                    await asyncio.sleep(0.01)
                assert len(got) == 1 and got[0].endswith(f"{want}.filters[0]"), (want, got)
                t = TERMS[got[0]]
                t.accepted.clear()
                s.close()
            assert stat(store, "tls_inspector.tls_found") == 4
            assert stat(store, "tls_inspector.tls_not_found") == 1
            assert stat(store, "tls_inspector.sni_found") == 3
            assert stat(store, "tls_inspector.alpn_found") == 2
        finally:
            lst.close()

    run(main)


@pytest.mark.parametrize("cont", [False, True])
def test_listener_filter_timeout_closes_or_continues(cont: bool) -> None:
    store = Store()
    d = listener(
        [{"filters": ECHO}],
        listener_filters=[{"name": "envoy.filters.listener.tls_inspector"}],
        listener_filters_timeout="0.1s",
        continue_on_listener_filters_timeout=cont,
    )

    async def main() -> None:
        lst, _ = make(d, store)
        await lst.start()
        port = lst.bound_address[2]
        loop = asyncio.get_running_loop()
        try:
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            await loop.sock_sendall(s, b"\x16\x03\x01")  # a hello that never completes
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 100), 5)
            except ConnectionResetError:  # closed with our unread bytes: RST
                data = b""
            term = next(iter(TERMS.values()))
            if cont:
                assert data.startswith(b"chain=")  # plain echo chain after the timeout
                assert len(term.accepted) == 1
            else:
                assert data == b""
                assert not term.accepted
                assert stat(store, P + "downstream_pre_cx_timeout") == 1
            assert stat(store, P + "downstream_pre_cx_active") == 0
            s.close()
        finally:
            lst.close()

    run(main)


def test_http_inspector_sets_alpn_for_chain_match() -> None:
    store = Store()
    d = listener(
        [
            {"filter_chain_match": {"application_protocols": ["h2c"]}, "filters": ECHO},
            {"filter_chain_match": {"application_protocols": ["http/1.1"]}, "filters": ECHO},
            {"filters": ECHO},
        ],
        listener_filters=[
            {"name": "envoy.filters.listener.tls_inspector"},
            {"name": "envoy.filters.listener.http_inspector"},
        ],
    )

    async def main() -> None:
        lst, _ = make(d, store)
        await lst.start()
        port = lst.bound_address[2]
        loop = asyncio.get_running_loop()
        try:
            for data, want in (
                (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "filter_chains[0]"),
                (b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n", "filter_chains[1]"),
                (b"\x00\x01binary", "filter_chains[2]"),
            ):
                s = socket.create_connection(("127.0.0.1", port))
                s.setblocking(False)
                await loop.sock_sendall(s, data)
                line = await asyncio.wait_for(loop.sock_recv(s, 200), 5)
                assert line.startswith(f"chain={want}".encode()), (want, line)
                s.close()
            assert stat(store, "http_inspector.http2_found") == 1
            assert stat(store, "http_inspector.http11_found") == 1
            assert stat(store, "http_inspector.http_not_found") == 1
        finally:
            lst.close()

    run(main)


# --- rotation ------------------------------------------------------------------------------------


def _serial_of(port: int, pki: Pki, sni: str) -> int:
    _, cert, _ = py_client(port, client_ctx(pki), sni)
    return int(cert["serialNumber"], 16)


def test_rotation_from_files_keeps_old_until_pair_is_complete(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "rot")
    c1, k1 = pki.issue("v1", "srv", ["DNS:srv"], serial=101)
    c2, k2 = pki.issue("v2", "srv", ["DNS:srv"], serial=202)
    live_c, live_k = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(c1, live_c)
    shutil.copy(k1, live_k)
    d = listener(
        [{"transport_socket": tls_socket({"tls_certificates": certs((live_c, live_k))}), "filters": ECHO}]
    )

    async def main() -> None:
        lst, ctx = make(d)
        await lst.start()
        port = lst.bound_address[2]
        tls = lst.filter_chains[0].tls
        try:
            assert await in_thread(_serial_of, port, pki, "srv") == 101
            # Certificate replaced, key not yet: the reload fails, the old pair stays in use.
            shutil.copy(c2, live_c)
            os.utime(live_c, ns=(1, 1))
            assert ctx.secrets.watcher.poll_now() >= 1
            assert tls.last_error is not None
            assert await in_thread(_serial_of, port, pki, "srv") == 101
            shutil.copy(k2, live_k)
            os.utime(live_k, ns=(2, 2))
            assert ctx.secrets.watcher.poll_now() >= 1
            assert tls.last_error is None and tls.generation == 1
            assert await in_thread(_serial_of, port, pki, "srv") == 202
        finally:
            lst.close()

    run(main)


def test_rotation_through_sds_file(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "sds")
    c1, k1 = pki.issue("v1", "srv", ["DNS:srv"], serial=11)
    c2, k2 = pki.issue("v2", "srv", ["DNS:srv"], serial=22)
    sds = tmp_path / "sds.yaml"

    def write(c: Path, k: Path) -> None:
        doc = {
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                    "name": "server_cert",
                    "tls_certificate": {
                        "certificate_chain": {"filename": str(c)},
                        "private_key": {"inline_string": k.read_text()},
                    },
                }
            ]
        }
        tmp = tmp_path / "sds.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, sds)  # atomic, as a control plane agent would

    write(c1, k1)
    common = {
        "tls_certificate_sds_secret_configs": [
            {"name": "server_cert", "sds_config": {"path_config_source": {"path": str(sds)}}}
        ]
    }
    d = listener([{"transport_socket": tls_socket(common), "filters": ECHO}])

    async def main() -> None:
        lst, ctx = make(d)
        await lst.start()
        port = lst.bound_address[2]
        try:
            assert await in_thread(_serial_of, port, pki, "srv") == 11
            write(c2, k2)
            assert ctx.secrets.watcher.poll_now() >= 1
            assert await in_thread(_serial_of, port, pki, "srv") == 22
        finally:
            lst.close()

    run(main)


# --- config errors -------------------------------------------------------------------------------


def test_sds_over_grpc_from_istio_dump_is_a_clear_config_error() -> None:
    dump = json.loads((SHARED_FIXTURES / "istio" / "sidecar_configdump_compare.json").read_text())
    lst = dump["configs"][1]["dynamic_listeners"][0]["active_state"]["listener"]
    lst = {k: v for k, v in lst.items() if k != "@type"}
    with pytest.raises(ConfigError) as ei:
        make(lst)
    assert ei.value.path.endswith(
        "transport_socket.typed_config.common_tls_context.tls_certificate_sds_secret_configs[0]"
        ".sds_config.api_config_source"
    ), ei.value.path
    assert "SDS over gRPC is not supported yet" in str(ei.value)


@pytest.mark.parametrize(
    ("common", "extra", "field"),
    [
        ({}, {}, "common_tls_context"),
        ({"tls_certificates": [{"certificate_chain": {"filename": "/nonexistent.pem"},
                                 "private_key": {"filename": "/nonexistent.key"}}]}, {},
         "tls_certificates[0].certificate_chain.filename"),
        ("CERT", {"require_client_certificate": True}, "validation_context.trusted_ca"),
        ("CERT+SPKI", {}, "validation_context.verify_certificate_spki"),
        ("CERT+TLS", {}, "tls_params.tls_maximum_protocol_version"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(
    pems: dict[str, tuple[Path, Path]], common: Any, extra: dict[str, Any], field: str
) -> None:
    if isinstance(common, str):
        base: dict[str, Any] = {"tls_certificates": certs(pems["a"])}
        if "SPKI" in common:
            base["validation_context"] = {"verify_certificate_spki": ["x"]}
        if "TLS" in common:
            base["tls_params"] = {
                "tls_minimum_protocol_version": "TLSv1_3",
                "tls_maximum_protocol_version": "TLSv1_2",
            }
        common = base
    d = listener([{"transport_socket": tls_socket(common, **extra), "filters": ECHO}])
    with pytest.raises(ConfigError) as ei:
        make(d)
    assert field in ei.value.path, ei.value.path


def test_inline_certificates(pems: dict[str, tuple[Path, Path]], pki: Pki) -> None:
    c, k = pems["a"]
    common = {
        "tls_certificates": [
            {
                "certificate_chain": {"inline_string": c.read_text()},
                # inline_bytes is base64 in the JSON mapping of protobuf bytes
                "private_key": {"inline_bytes": base64.b64encode(k.read_bytes()).decode()},
            }
        ]
    }
    d = listener([{"transport_socket": tls_socket(common), "filters": ECHO}])

    async def main() -> None:
        lst, _ = make(d)
        await lst.start()
        try:
            _, cert, _ = await in_thread(py_client, lst.bound_address[2], client_ctx(pki), "a.example.com")
            assert cert["serialNumber"] == cert_info(c)["serialNumber"]
        finally:
            lst.close()

    run(main)


def test_session_resumption_options_and_notices(pems: dict[str, tuple[Path, Path]]) -> None:
    def build(**extra: Any) -> tuple[Listener, BuildContext]:
        ts = tls_socket({"tls_certificates": certs(pems["a"])}, **extra)
        return make(listener([{"transport_socket": ts, "filters": ECHO}]))

    lst, _ = build(disable_stateless_session_resumption=True)
    assert lst.filter_chains[0].tls.server_context.options & ssl.OP_NO_TICKET
    lst, ctx = build(session_ticket_keys={"keys": [{"inline_bytes": base64.b64encode(b"k" * 80).decode()}]})
    assert not lst.filter_chains[0].tls.server_context.options & ssl.OP_NO_TICKET
    assert any("session_ticket_keys" in n for n in ctx.notices)


# --- SAN matching (mTLS), checked against Envoy -----------------------------------------------


def _matcher(san_type: str | None, **sm: Any) -> SanMatcher:
    from envoy.type.matcher.v3 import string_pb2

    return SanMatcher(san_type, StringMatcher.compile(parse_message(sm, string_pb2.StringMatcher), "m"))


def test_san_any_of_several_uri_sans_matches_like_envoy() -> None:
    # Envoy accepts a certificate when any of its SANs matches any matcher.
    m = _matcher("URI", exact="spiffe://good")
    assert m.matches([("URI", "spiffe://bad"), ("URI", "spiffe://good")])
    assert not m.matches([("URI", "spiffe://bad"), ("URI", "spiffe://good/extra")])


def test_san_type_is_enforced() -> None:
    # A DNS SAN spelled like the wanted URI must not pass a URI matcher.
    m = _matcher("URI", exact="spiffe://good")
    assert not m.matches([("DNS", "spiffe://good"), ("email", "spiffe://good")])


def test_san_wildcard_in_certificate_covers_one_label_only() -> None:
    m_one = _matcher("DNS", exact="a.example.com")
    m_two = _matcher("DNS", exact="a.b.example.com")
    m_apex = _matcher("DNS", exact="example.com")
    sans = [("DNS", "*.example.com")]
    assert m_one.matches(sans)
    assert not m_two.matches(sans)
    assert not m_apex.matches(sans)


def test_san_check_ignores_common_name() -> None:
    # No SANs at all: the CN is never consulted (Envoy does not fall back to it either).
    m = _matcher("DNS", exact="client.example.com")
    assert not m.matches([])


def _dtls(d: dict[str, Any]) -> Any:
    return parse_message(d, tls_pb2.DownstreamTlsContext)


def test_downstream_san_matchers_without_trusted_ca_are_rejected(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("srv", "srv", ["DNS:srv.example.com"])
    proto = _dtls(
        {
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                ],
                "validation_context": {
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": "spiffe://only-this-client"}}
                    ]
                },
            }
        }
    )
    ctx = BuildContext(stats=Store())
    with pytest.raises(ConfigError) as ei:
        tls = compile_downstream(proto, ctx, "tls")
        # What happens today: no client certificate is even requested, so the SAN matcher
        # can never run and every client is admitted.
        assert tls.server_context.verify_mode == ssl.CERT_NONE
    assert "trusted_ca" in ei.value.path or "trusted" in str(ei.value)
