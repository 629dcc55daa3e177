"""Starting the backend and the proxies under test, each with its equivalent configuration.

A proxy that does not come up raises :class:`StartError` with the reason (its stderr or error
log tail); the caller records that run as failed and goes on.
"""

from __future__ import annotations

import http.client
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import configs
from bench.children import Child, pin_tree, spawn
from moorline.testing.procs import free_port

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"
WRK = "/usr/bin/wrk"
IPERF3 = "/usr/bin/iperf3"
REPO_ROOT = Path(__file__).resolve().parents[1]
H = "127.0.0.1"
START_TIMEOUT_S = 30.0

# Proxy variants: HTTP scenarios run "moorline", "nginx", "haproxy"; l4-iperf runs moorline twice
# (splice and userspace copy).
HTTP_VARIANTS = ("moorline", "nginx", "haproxy")
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

    def pids(self) -> list[int]:
        return self.child.pids()

    def alive(self) -> bool:
        return self.child.alive()

    def stop(self) -> None:
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


def start_proxy(
    lab: Lab,
    variant: str,
    upstream_port: int,
    *,
    l4: bool = False,
    route_rules: bool = False,
    check_path: str | None = None,
    check_body: bytes | None = None,
) -> Running:
    """Start ``variant`` (see HTTP_VARIANTS / L4_VARIANTS) proxying to 127.0.0.1:upstream_port,
    pinned to the proxy CPU; for HTTP, one GET of ``check_path`` must answer 200 ``check_body``
    (this also opens the first upstream connection)."""
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
            else configs.moorline_http(port, upstream_port, admin, route_rules)
        )
        d = lab.subdir(variant)
        cfg = d / "moorline.yaml"
        cfg.write_text(text)
        env = {
            "PYTHONPATH": str(REPO_ROOT),
            "MOORLINE_NO_SPLICE": "1" if variant == "moorline-copy" else "0",
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
            return configs.nginx_http_proxy(p, port, upstream_port, route_rules)

        child, prefix, text = _start_nginx(lab, variant, conf, lab.proxy_cpus)
        running = Running(variant, child, port, None, text)
        try:
            wait_port(port, child)
        except StartError as exc:
            child.stop(signal.SIGKILL, 1)
            raise StartError(f"{exc} {_error_log(prefix)}") from None
    elif variant.startswith("haproxy"):
        text = (
            configs.haproxy_tcp(port, upstream_port)
            if l4
            else configs.haproxy_http(port, upstream_port, route_rules)
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
    else:
        raise StartError(f"unknown proxy {variant!r}")
    if lab.proxy_cpus:
        # taskset at exec already covers threads and workers; this is the belt to its braces.
        pin_tree(running.child.pid, lab.proxy_cpus)
    if check_path is not None:
        try:
            status, body = http_get(port, check_path)
        except OSError as exc:
            running.stop()
            raise StartError(f"check request failed: {exc!r}") from None
        if status != 200 or (check_body is not None and body != check_body):
            running.stop()
            raise StartError(f"check request answered {status} with {len(body)} bytes: {body[:80]!r}")
    return running
