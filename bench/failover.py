"""The ``failover`` scenarios: three backends behind the proxy, one of which fails during the run.

Per run: three nginx backends (the same static bodies), the proxy with its equivalent failover
settings, and wrk (``-c32``, ``--timeout 5s``) for the run's duration. A third of the way in,
backend 3 fails in one of three ways:

* ``kill``: its nginx is SIGKILLed (connections reset, then refused);
* ``5xx``: it is replaced by an nginx answering 503 to everything on the same port;
* ``blackhole``: it is SIGKILLed and its port taken by a listening socket that never accepts
  (connections hang in the backlog, then time out).

The proxies' settings, each its own project's way of saying "retry elsewhere and stop using a
bad backend":

* moorline: route retries (``retry_on: 5xx,reset,connect-failure``, 2 retries, ``per_try_timeout``
  1 s, ``previous_hosts`` host predicate, ``max_retries`` circuit breaker lifted from Envoy's 3 to
  1024: the peers have no such cap), cluster ``connect_timeout`` 0.5 s, ``outlier_detection``
  (consecutive 5xx / gateway failures 3, 1 s interval, 30 s base ejection) and an HTTP
  ``health_checks`` (1 s interval, 2 unhealthy) where moorline implements them (else they are
  noticed and do nothing: the retries alone carry the run);
* nginx: ``max_fails=1 fail_timeout=30s``, ``proxy_next_upstream error timeout http_502 http_503
  http_504`` with 3 tries, ``proxy_connect_timeout 0.5s``, ``proxy_read_timeout 1s``;
* HAProxy: ``check inter 1s fall 2 rise 2``, ``observe layer7 error-limit 3 on-error mark-down``,
  ``retries 2``, ``option redispatch 1``, ``retry-on all-retryable-errors``, ``timeout connect
  500ms``.

Metrics: the success rate (2xx/3xx over all requests wrk finished or errored), failed requests,
req/s and p99.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import configs, measure
from bench.children import Child
from bench.proxies import (
    HAPROXY,
    Lab,
    StartError,
    _error_log,
    _start_nginx,
    http_get,
    wait_moorline_ready,
    wait_port,
)
from moorline.testing import procs
from moorline.testing.procs import free_port

MODES = ("kill", "5xx", "blackhole")
CONNECTIONS = 32


def _nginx_503(prefix: Path, port: int) -> str:
    return f"""{configs._nginx_main(prefix)}
http {{
{configs._nginx_http_common(prefix)}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 503 "failing\\n"; }}
    }}
}}
"""


def _backend(lab: Lab, name: str, docroot: Path, port: int, failing: bool = False) -> Child:
    conf = (lambda p: _nginx_503(p, port)) if failing else (lambda p: configs.nginx_backend(p, port, docroot))
    child, prefix, _ = _start_nginx(lab, name, conf, lab.load_cpus)
    try:
        wait_port(port, child)
    except StartError as exc:
        child.stop(signal.SIGKILL, 1)
        raise StartError(f"backend {name}: {exc} {_error_log(prefix)}") from None
    return child


def moorline_config(port: int, ports: list[int], admin: int) -> str:
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "backend",
                "retry_policy": {
                    "retry_on": "5xx,reset,connect-failure",
                    "num_retries": 2,
                    "per_try_timeout": "1s",
                    "retry_host_predicate": [
                        {
                            "name": "envoy.retry_host_predicates.previous_hosts",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                            },
                        }
                    ],
                    "host_selection_retry_max_attempts": 3,
                },
            },
        }
    ]
    listener = procs.hcm_listener(
        "bench_http", port, routes, hcm_extra={"generate_request_id": False}, stat_prefix="bench"
    )
    cluster = procs.cluster("backend", list[int | tuple[str, int]](ports))
    cluster["connect_timeout"] = "0.5s"
    # Envoy's default allows 3 retries in flight per cluster; under 32 connections a failing host
    # makes far more at once. The peers have no such cap: lift it, as an Envoy user would.
    cluster["circuit_breakers"] = {"thresholds": [{"max_retries": 1024}]}
    cluster["outlier_detection"] = {
        "consecutive_5xx": 3,
        "consecutive_gateway_failure": 3,
        "interval": "1s",
        "base_ejection_time": "30s",
        "max_ejection_percent": 50,
    }
    cluster["health_checks"] = [
        {
            "timeout": "0.5s",
            "interval": "1s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 2,
            "http_health_check": {"path": "/small"},
        }
    ]
    return procs.bootstrap([listener], [cluster], admin)


def nginx_config(prefix: Path, port: int, ports: list[int]) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in ports)
    return f"""{configs._nginx_main(prefix)}
http {{
{configs._nginx_http_common(prefix)}
    upstream backend {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 500ms;
            proxy_read_timeout 1s;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


def haproxy_config(port: int, ports: list[int]) -> str:
    servers = "\n".join(
        f"    server s{i} 127.0.0.1:{p} check inter 1s fall 2 rise 2 observe layer7 error-limit 3 on-error mark-down"
        for i, p in enumerate(ports, start=1)
    )
    return f"""{configs._haproxy_head("http")}    option http-keep-alive
    http-reuse always
    timeout connect 500ms
    retries 2
    option redispatch 1
    retry-on all-retryable-errors

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    option httpchk GET /small
{servers}
"""


class _Blackhole:
    """A listening socket that never accepts: connections wait in its backlog."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:
            try:
                self.sock.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.listen(1)

    def close(self) -> None:
        self.sock.close()


def run_once(lab: Lab, proxy: str, mode: str, duration_s: int) -> dict[str, Any]:
    from bench.children import spawn
    from bench.proxies import REPO_ROOT

    docroot = configs.write_docroot(lab.workdir / "docroot")
    ports = [free_port() for _ in range(3)]
    backends = [_backend(lab, f"failover-be{i}", docroot, p) for i, p in enumerate(ports, start=1)]
    port, admin = free_port(), free_port()
    extra: list[Any] = []
    try:
        if proxy == "moorline":
            d = lab.subdir("failover-moorline")
            cfg = d / "moorline.yaml"
            cfg.write_text(moorline_config(port, ports, admin))
            child = spawn(
                "moorline",
                [sys.executable, "-m", "moorline", "run", "-c", str(cfg), "--log-level", "warning"],
                d,
                cpus=lab.proxy_cpus,
                env={"PYTHONPATH": str(REPO_ROOT)},
            )
            wait_moorline_ready(admin, child)
        elif proxy == "nginx":
            child, _prefix, _ = _start_nginx(
                lab, "failover-nginx", lambda p: nginx_config(p, port, ports), lab.proxy_cpus
            )
            wait_port(port, child)
        elif proxy == "haproxy":
            d = lab.subdir("failover-haproxy")
            cfg = d / "haproxy.cfg"
            cfg.write_text(haproxy_config(port, ports))
            child = spawn("haproxy", [HAPROXY, "-f", str(cfg), "-db"], d, cpus=lab.proxy_cpus)
            wait_port(port, child)
        else:
            raise StartError(f"unknown proxy {proxy}")
        extra.append(child)
        status, _ = http_get(port, "/small")
        if status != 200:
            raise StartError(f"{proxy} answered {status} before the run")

        def fail() -> None:
            time.sleep(duration_s / 3)
            be3 = backends[2]
            be3.stop(signal.SIGKILL, 1)
            if mode == "5xx":
                backends[2] = _backend(lab, "failover-be3-503", docroot, ports[2], failing=True)
            elif mode == "blackhole":
                extra.append(_Blackhole(ports[2]))

        t = threading.Thread(target=fail, daemon=True)
        t.start()
        res, _out = measure.run_wrk(
            f"http://127.0.0.1:{port}/small",
            duration_s,
            lab.workdir / "wrk",
            lab.load_cpus,
            connections=CONNECTIONS,
        )
        t.join(10)
        total = res.requests + res.socket_errors
        failed = res.socket_errors + res.non_2xx
        return {
            "ok": True,
            "success_pct": 100.0 * (total - failed) / total if total else 0.0,
            "failed": failed,
            "rps": res.rps,
            "p99_ms": res.p99_ms,
        }
    finally:
        for x in extra:
            if isinstance(x, Child):
                x.stop(signal.SIGTERM, 5)
            else:
                x.close()
        for b in backends:
            b.stop(signal.SIGKILL, 1)


__all__ = ["MODES", "run_once"]
