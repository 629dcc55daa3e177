"""Starting the backend and the proxies under test, each with its equivalent configuration.

A proxy that does not come up raises :class:`StartError` with the reason (its stderr or error
log tail); the caller records that run as failed and goes on.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import configs
from bench.children import Child, pin_tree, read_line, spawn
from moorline.testing.procs import free_port

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"
WRK = "/usr/bin/wrk"
IPERF3 = "/usr/bin/iperf3"
H2LOAD = "/usr/bin/h2load"
CURL = "/usr/bin/curl"
REPO_ROOT = Path(__file__).resolve().parents[1]
H = "127.0.0.1"
START_TIMEOUT_S = 30.0

# Proxy variants: HTTP scenarios run "moorline", "nginx", "haproxy", and the HTTP/1.1 ones (and
# idle-conns) also "floor", the calibration forwarder (bench/floor.py); l4-iperf runs moorline
# twice (splice and userspace copy).
HTTP_VARIANTS = ("moorline", "nginx", "haproxy")
H1_VARIANTS = (*HTTP_VARIANTS, "floor")
L4_VARIANTS = ("moorline-splice", "moorline-copy", "nginx", "haproxy")


class StartError(Exception):
    """A proxy or the backend did not come up; the message says why."""


@dataclass
class Lab:
    """Where a run keeps its files and which CPUs each side uses (None: no pinning)."""

    workdir: Path
    proxy_cpus: list[int] | None
    load_cpus: list[int] | None
    seq: int = 0

    def subdir(self, name: str) -> Path:
        self.seq += 1
        d = self.workdir / f"{self.seq:04d}-{name}"
        d.mkdir(parents=True)
        return d


@dataclass
class Running:
    name: str
    child: Child
    port: int
    admin_port: int | None = None
    config_text: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    borrowed: bool = False  # "direct": the child is the backend, which this run must not stop

    def pids(self) -> list[int]:
        return self.child.pids()

    def alive(self) -> bool:
        return self.child.alive()

    def stop(self) -> None:
        if self.borrowed:
            return
        # nginx: SIGQUIT is its graceful stop; the others take SIGTERM.
        sig = signal.SIGQUIT if self.name.startswith("nginx") else signal.SIGTERM
        self.child.stop(sig, 5)


def variant_binary_missing(variant: str) -> str | None:
    """Why ``variant`` cannot run on this machine, or None."""
    if variant.startswith("nginx") and not Path(NGINX).exists():
        return f"{NGINX} is not installed"
    if variant.startswith("haproxy") and not Path(HAPROXY).exists():
        return f"{HAPROXY} is not installed"
    return None


def wait_port(port: int, child: Child, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((H, port), timeout=1.0):
                return
        except OSError:
            pass
        if not child.alive():
            raise StartError(f"exited with code {child.popen.returncode}: {child.stderr_tail()}")
        if time.monotonic() > deadline:
            raise StartError(f"port {port} not accepting after {timeout:.0f}s: {child.stderr_tail()}")
        time.sleep(0.02)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(H, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def https_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes, str | None]:
    """One HTTPS GET without certificate verification (the harness's own self-signed
    certificate); (status, body, TLS version)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(H, port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        version = conn.sock.version() if isinstance(conn.sock, ssl.SSLSocket) else None
        return resp.status, resp.read(), version
    finally:
        conn.close()


def h2c_get(port: int, path: str, workdir: Path, timeout: float = 10.0) -> tuple[str, int, bytes]:
    """One GET with HTTP/2 prior knowledge (curl); (HTTP version, status, body)."""
    out = workdir / "h2c-check.body"
    res = subprocess.run(
        [CURL, "-sS", "--http2-prior-knowledge", "--max-time", str(timeout), "-o", str(out),
         "-w", "%{http_version} %{http_code}", f"http://{H}:{port}{path}"],
        capture_output=True, text=True, timeout=timeout + 5,
    )  # fmt: skip
    if res.returncode != 0:
        raise OSError(f"curl exited with {res.returncode}: {res.stderr.strip()[-300:]}")
    version, _, code = res.stdout.partition(" ")
    body = out.read_bytes() if out.exists() else b""
    return version, int(code or 0), body


def grpc_check(port: int, workdir: Path, timeout: float = 20.0, stream: bool = False) -> str | None:
    """One gRPC unary echo through the proxy (``bench.grpc_backend check``, a child process),
    or with ``stream`` one server-streaming call (``check-stream``); None if it came back
    intact, else why not."""
    res = subprocess.run(
        [sys.executable, "-m", "bench.grpc_backend", "check-stream" if stream else "check", str(port)],
        capture_output=True, text=True, timeout=timeout, cwd=str(workdir),
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    return None if res.returncode == 0 else (res.stderr.strip()[-300:] or f"exit {res.returncode}")


def wait_moorline_ready(
    admin_port: int, child: Child, timeout: float = START_TIMEOUT_S, poll: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if not child.alive():
            raise StartError(f"exited with code {child.popen.returncode}: {child.stderr_tail()}")
        try:
            status, body = http_get(admin_port, "/ready", timeout=1.0)
            if status == 200:
                return
            last = f"{status} {body[:80]!r}"
        except OSError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise StartError(f"/ready not 200 after {timeout:.0f}s (last: {last}): {child.stderr_tail()}")
        time.sleep(poll)


def _error_log(prefix: Path) -> str:
    try:
        return (prefix / "error.log").read_text(errors="replace")[-1500:].strip()
    except FileNotFoundError:
        return ""


def _start_nginx(
    lab: Lab, name: str, conf_for: Callable[[Path], str], cpus: list[int] | None
) -> tuple[Child, Path, str]:
    prefix = lab.subdir(name)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir()
    text = conf_for(prefix)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    argv = [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    return spawn(name, argv, prefix, cpus=cpus), prefix, text


@dataclass
class Backend:
    child: Child
    port: int
    docroot: Path

    def alive(self) -> bool:
        return self.child.alive()

    def stop(self) -> None:
        self.child.stop(signal.SIGQUIT, 5)


def start_backend(lab: Lab) -> Backend:
    """nginx serving the fixed bodies, on the load generator's CPU."""
    if not Path(NGINX).exists():
        raise StartError(f"{NGINX} is not installed (the backend is nginx)")
    docroot = configs.write_docroot(lab.workdir / "docroot")
    port = free_port()
    child, prefix, _ = _start_nginx(
        lab, "backend", lambda p: configs.nginx_backend(p, port, docroot), lab.load_cpus
    )
    try:
        wait_port(port, child)
        status, body = http_get(port, "/small")
        if status != 200 or body != configs.BODIES["small"]:
            raise StartError(f"backend answered {status} {body[:80]!r}")
    except (StartError, OSError) as exc:
        child.stop(signal.SIGKILL, 1)
        raise StartError(f"backend nginx: {exc} {_error_log(prefix)}") from None
    if lab.load_cpus:
        pin_tree(child.pid, lab.load_cpus)
    return Backend(child, port, docroot)


@dataclass
class GrpcBackend:
    """``python -m bench.grpc_backend serve`` (or, for grpc-stream, ``node
    bench/grpc_stream_server.js``) on the load generator's CPU."""

    child: Child
    port: int

    def alive(self) -> bool:
        return self.child.alive()

    def stop(self) -> None:
        if self.child.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.child.popen.stdin.close()
        self.child.stop(signal.SIGTERM, 5)


def start_grpc_backend(lab: Lab) -> GrpcBackend:
    argv = [sys.executable, "-m", "bench.grpc_backend", "serve"]
    child = spawn(
        "grpc-backend",
        argv,
        lab.workdir / "grpc-backend",
        cpus=lab.load_cpus,
        env={"PYTHONPATH": str(REPO_ROOT)},
        pipes=True,
    )
    line = read_line(child, START_TIMEOUT_S)
    if line is None or not line.startswith("READY port="):
        tail = child.stderr_tail()
        child.stop(signal.SIGKILL, 1)
        raise StartError(f"gRPC backend did not report READY ({line!r}): {tail}")
    port = int(line.split("=", 1)[1])
    err = grpc_check(port, lab.workdir)
    if err:
        child.stop(signal.SIGKILL, 1)
        raise StartError(f"gRPC backend check failed: {err}")
    return GrpcBackend(child, port)


NODE = "/usr/bin/node"
STREAM_SERVER_JS = REPO_ROOT / "bench" / "grpc_stream_server.js"


def start_grpc_stream_backend(lab: Lab) -> GrpcBackend:
    """The grpc-stream backend: Node's http2 answering every call with 1,000 x 1 KiB gRPC
    messages and grpc-status 0, checked with a real grpcio streaming call."""
    if not Path(NODE).exists():
        raise StartError(f"{NODE} is not installed (the grpc-stream backend runs on Node's http2)")
    child = spawn(
        "grpc-stream-backend",
        [NODE, str(STREAM_SERVER_JS)],
        lab.workdir / "grpc-stream-backend",
        cpus=lab.load_cpus,
        pipes=True,
    )
    line = read_line(child, START_TIMEOUT_S)
    if line is None or not line.startswith("READY port="):
        tail = child.stderr_tail()
        child.stop(signal.SIGKILL, 1)
        raise StartError(f"gRPC stream backend did not report READY ({line!r}): {tail}")
    port = int(line.split("=", 1)[1])
    err = grpc_check(port, lab.workdir, stream=True)
    if err:
        child.stop(signal.SIGKILL, 1)
        raise StartError(f"gRPC stream backend check failed: {err}")
    return GrpcBackend(child, port)


# Listener/upstream protocol of an HTTP scenario: "h1" (HTTP/1.1 both sides), "h2" (h2c prior
# knowledge downstream, HTTP/1.1 upstream), "grpc" (h2c both sides), "grpc-stream" (h2c both
# sides, the server-streaming backend), "tls" (HTTP/1.1 over TLS 1.3 downstream, HTTP/1.1
# upstream).
MODES = ("h1", "h2", "grpc", "grpc-stream", "tls")
GRPC_MODES = ("grpc", "grpc-stream")


def start_proxy(
    lab: Lab,
    variant: str,
    upstream_port: int,
    *,
    l4: bool = False,
    route_rules: bool = False,
    check_path: str | None = None,
    check_body: bytes | None = None,
    mode: str = "h1",
    tls: configs.TlsFiles | None = None,
    upstream_child: Child | None = None,
) -> Running:
    """Start ``variant`` (see HTTP_VARIANTS / L4_VARIANTS) proxying to 127.0.0.1:upstream_port,
    pinned to the proxy CPU; for HTTP, one GET of ``check_path`` must answer 200 ``check_body``
    (this also opens the first upstream connection), over the scenario's protocol (``mode``,
    see :data:`MODES`): h2c for ``h2``, a gRPC echo call for ``grpc``, a streaming call for
    ``grpc-stream``, TLS 1.3 for ``tls``. ``direct`` starts nothing: its port is the backend's
    and its process ``upstream_child`` (the backend's CPU is what gets measured)."""
    if mode not in MODES:
        raise StartError(f"unknown mode {mode!r}")
    if mode == "tls" and tls is None:
        raise StartError("mode tls needs the certificate files")
    missing = variant_binary_missing(variant)
    if missing:
        raise StartError(missing)
    port = free_port()
    running: Running
    if variant.startswith("moorline"):
        admin = free_port()
        text = (
            configs.moorline_tcp(port, upstream_port, admin)
            if l4
            else configs.moorline_http(
                port,
                upstream_port,
                admin,
                route_rules,
                upstream_h2=mode in GRPC_MODES,
                tls=tls if mode == "tls" else None,
            )
        )
        d = lab.subdir(variant)
        cfg = d / "moorline.yaml"
        cfg.write_text(text)
        env = {
            # MOORLINE_BENCH_SRC: run another checkout's moorline under this harness (before /
            # after comparisons of a change, same machine, same peers).
            "PYTHONPATH": os.environ.get("MOORLINE_BENCH_SRC") or str(REPO_ROOT),
            "MOORLINE_NO_SPLICE": "1" if variant == "moorline-copy" else "0",
            # moorline-h2: HTTP/2 on the pure-Python h2 backend (the reference, and the "before").
            "MOORLINE_HTTP2_BACKEND": "h2" if variant == "moorline-h2" else "",
        }
        argv = [sys.executable, "-m", "moorline", "run", "-c", str(cfg), "--log-level", "warning"]
        child = spawn(variant, argv, d, cpus=lab.proxy_cpus, env=env)
        running = Running(variant, child, port, admin, text)
        try:
            wait_moorline_ready(admin, child)
            wait_port(port, child)
        except StartError:
            child.stop(signal.SIGKILL, 1)
            raise
    elif variant.startswith("nginx"):
        if l4 and not configs.NGINX_STREAM_MODULE.exists():
            raise StartError(
                f"nginx stream module missing ({configs.NGINX_STREAM_MODULE}; Debian package libnginx-mod-stream)"
            )

        def conf(p: Path) -> str:
            if l4:
                return configs.nginx_stream_proxy(p, port, upstream_port)
            if mode in GRPC_MODES:
                return configs.nginx_grpc_proxy(p, port, upstream_port)
            return configs.nginx_http_proxy(
                p, port, upstream_port, route_rules, h2=mode == "h2", tls=tls if mode == "tls" else None
            )

        child, prefix, text = _start_nginx(lab, variant, conf, lab.proxy_cpus)
        running = Running(variant, child, port, None, text)
        try:
            wait_port(port, child)
        except StartError as exc:
            child.stop(signal.SIGKILL, 1)
            raise StartError(f"{exc} {_error_log(prefix)}") from None
    elif variant.startswith("haproxy"):
        bind_opts = {"h2": "proto h2", "grpc": "proto h2", "grpc-stream": "proto h2"}.get(mode, "")
        if mode == "tls":
            assert tls is not None
            bind_opts = configs.haproxy_tls_bind(tls)
        text = (
            configs.haproxy_tcp(port, upstream_port)
            if l4
            else configs.haproxy_http(
                port,
                upstream_port,
                route_rules,
                bind_opts=bind_opts,
                server_opts="proto h2" if mode in GRPC_MODES else "",
            )
        )
        d = lab.subdir(variant)
        cfg = d / "haproxy.cfg"
        cfg.write_text(text)
        child = spawn(variant, [HAPROXY, "-db", "-f", str(cfg)], d, cpus=lab.proxy_cpus)
        running = Running(variant, child, port, None, text)
        try:
            wait_port(port, child)
        except StartError:
            child.stop(signal.SIGKILL, 1)
            raise
    elif variant == "direct":
        # No proxy: the load goes straight to the backend (what the backend alone can do, so
        # the proxies' numbers can be read against it). Nothing is started or stopped here.
        if upstream_child is None:
            raise StartError("direct needs the backend's process")
        port = upstream_port
        running = Running(
            variant, upstream_child, port, None, "(no proxy: straight to the backend)", borrowed=True
        )
    elif variant == "floor":
        if l4 or mode != "h1":
            raise StartError("the floor forwards HTTP/1.1 only")
        argv = configs.floor_argv(sys.executable, port, upstream_port)
        d = lab.subdir(variant)
        child = spawn(variant, argv, d, cpus=lab.proxy_cpus, env={"PYTHONPATH": str(REPO_ROOT)})
        running = Running(variant, child, port, None, configs.floor_config_text(argv))
        try:
            wait_port(port, child)
        except StartError:
            child.stop(signal.SIGKILL, 1)
            raise
    else:
        raise StartError(f"unknown proxy {variant!r}")
    if lab.proxy_cpus and not running.borrowed:
        # taskset at exec already covers threads and workers; this is the belt to its braces.
        pin_tree(running.child.pid, lab.proxy_cpus)
    if mode in GRPC_MODES:
        err = grpc_check(port, lab.workdir, stream=mode == "grpc-stream")
        if err:
            running.stop()
            raise StartError(f"check gRPC call failed: {err}")
    elif check_path is not None:
        problem = _check_http(port, mode, check_path, check_body, lab.workdir)
        if problem:
            running.stop()
            raise StartError(problem)
    return running


def _check_http(port: int, mode: str, path: str, want: bytes | None, workdir: Path) -> str | None:
    """Why the check request over ``mode`` failed, or None."""
    try:
        if mode == "h2":
            version, status, body = h2c_get(port, path, workdir)
            if version != "2":
                return f"check request was answered over HTTP/{version}, not HTTP/2"
        elif mode == "tls":
            status, body, tls_version = https_get(port, path)
            if tls_version != "TLSv1.3":
                return f"check request negotiated {tls_version}, not TLSv1.3"
        else:
            status, body = http_get(port, path)
    except (OSError, ssl.SSLError, subprocess.TimeoutExpired) as exc:
        return f"check request failed: {exc!r}"
    if status != 200 or (want is not None and body != want):
        return f"check request answered {status} with {len(body)} bytes: {body[:80]!r}"
    return None
