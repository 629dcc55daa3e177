"""The server: owns the loop, listeners, cluster manager and admin; start, drain, stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from typing import Any

from moorline import __version__
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.ignored import check_bootstrap_fields
from moorline.config.util import addr_str, address_of
from moorline.extensions import register_builtin
from moorline.observability.stats import Store

log = logging.getLogger("moorline.main")

_REDACT_KEYS = frozenset(
    ("private_key", "password", "session_ticket_keys", "hmac_secret", "inline_string_secret")
)


class Server:
    """Compiled bootstrap plus the running state. Implements the admin's ``AdminHost``."""

    def __init__(
        self, bootstrap: Any, source: str, drain_time: float = 600.0, options: dict | None = None
    ) -> None:
        from moorline.admin.server import compile_allow_paths
        from moorline.net.listener import Listener
        from moorline.upstream.manager import ClusterManager

        register_builtin()
        self.bootstrap = bootstrap
        self.source = source
        self.drain_time = drain_time
        self.options = options or {}
        self.stats = Store()
        self.cluster_manager = ClusterManager(self.stats)
        self.ctx = BuildContext(
            stats=self.stats, cluster_manager=self.cluster_manager, source=source, server=self
        )
        self.state = "PRE_INITIALIZING"
        self.health_check_failed = False
        self.start_time = time.time()
        self.admin: Any = None
        self._stop: asyncio.Event | None = None
        self._exit_code = 0
        sr = bootstrap.static_resources
        from moorline.net.secrets import set_static_secrets

        set_static_secrets(sr.secrets)
        try:
            for i, c in enumerate(sr.clusters):
                self.cluster_manager.add(c, f"static_resources.clusters[{i}]")
            self.listeners = []
            for i, lp in enumerate(sr.listeners):
                self.listeners.append(Listener(lp, self.ctx, f"static_resources.listeners[{i}]"))
            self.admin_address = None
            if bootstrap.HasField("admin") and bootstrap.admin.HasField("address"):
                self.admin_address = address_of(bootstrap.admin.address, "admin.address")
            self.admin_allow_paths = compile_allow_paths(bootstrap.admin.allow_paths, "admin.allow_paths")
            if bootstrap.HasField("dynamic_resources"):
                self.ctx.notice(
                    "dynamic_resources: xDS is not supported yet; only static_resources are served"
                )
            # Cluster notices carry paths relative to their cluster.
            for i, cp in enumerate(sr.clusters):
                for n in getattr(self.cluster_manager.get(cp.name), "notices", None) or []:
                    self.ctx.notice(f"static_resources.clusters[{i}].{n}")
            check_bootstrap_fields(bootstrap, self.ctx)
        except ConfigError as e:
            raise e.with_source(source) from None
        self.server_stats()

    def server_stats(self) -> None:
        s = self.stats
        self.st_uptime = s.gauge("server.uptime")
        self.st_live = s.gauge("server.live")
        self.st_state = s.gauge("server.state")
        self.st_concurrency = s.gauge("server.concurrency")
        self.st_concurrency.value = 1
        self.st_version = s.gauge("server.version")
        self.st_total_connections = s.gauge("server.total_connections")
        self.st_memory = s.gauge("server.memory_allocated")

    # -- lifecycle ------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for n in self.ctx.notices:
            log.info("notice: %s", n)
        await self.cluster_manager.start()
        for lst in self.listeners:
            await lst.start(loop)
            log.info("listener %s on %s", lst.name, _fmt_addr(lst.bound_address))
        if self.admin_address is not None:
            from moorline.admin.server import AdminServer

            self.admin = AdminServer(self, self.admin_address, allow_paths=self.admin_allow_paths)
            await self.admin.start()
            log.info("admin on %s", _fmt_addr(self.admin.bound_address))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_shutdown)
        try:
            loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        except (ValueError, RuntimeError):
            pass
        self.state = "LIVE"
        self.st_live.value = 1
        # Everything built so far lives until shutdown: keep the GC from scanning it.
        gc.collect()
        gc.freeze()
        # Per-request objects mostly die by reference counting; a larger young generation means
        # far fewer collections scanning objects that are about to be freed anyway (measured in
        # bench/: gc_collect_main fell from ~8% of proxy CPU). MOORLINE_GC_GEN0 overrides.
        gc.set_threshold(int(os.environ.get("MOORLINE_GC_GEN0", "20000")), 50, 100)
        uptime_task = loop.create_task(self._tick())
        log.info("moorline %s ready", __version__)
        await self._stop.wait()
        uptime_task.cancel()
        await self._drain()
        return self._exit_code

    async def _tick(self) -> None:
        while True:
            self.st_uptime.value = int(time.time() - self.start_time)
            self.st_memory.value = _rss_bytes()
            await asyncio.sleep(1.0)

    def begin_shutdown(self) -> None:
        if self._stop is not None and not self._stop.is_set():
            log.info("shutting down: draining for up to %ss", self.drain_time)
            self._stop.set()

    async def _drain(self) -> None:
        self.state = "DRAINING"
        self.st_state.value = 1
        self.st_live.value = 0
        for lst in self.listeners:
            lst.stop_accepting()
        terminals = list(self._terminals())
        for t in terminals:
            d = getattr(t, "drain", None)
            if d is not None:
                d()
        deadline = time.monotonic() + self.drain_time
        while time.monotonic() < deadline:
            if not any(_active(t) for t in terminals):
                break
            await asyncio.sleep(0.05)
        for t in terminals:
            # Past the drain time: cut what is still open.
            c = getattr(t, "close_all", None)
            if c is not None:
                c()
        for lst in self.listeners:
            lst.close()
        if self.admin is not None:
            await self.admin.close()
        self.cluster_manager.stop()
        if self.ctx.access_logs is not None:
            self.ctx.access_logs.flush_all()

    def _terminals(self) -> list[Any]:
        return [ch.terminal for lst in self.listeners for ch in lst.filter_chains]

    def _reopen_logs(self) -> None:
        if self.ctx.access_logs is not None:
            self.ctx.access_logs.reopen_all()

    # -- AdminHost ------------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.state == "LIVE" and not self.health_check_failed

    def server_info(self) -> dict:
        from google.protobuf import json_format

        node = (
            json_format.MessageToDict(self.bootstrap.node, preserving_proto_field_name=True)
            if (self.bootstrap.HasField("node"))
            else {}
        )
        up = int(time.time() - self.start_time)
        return {
            "version": f"moorline/{__version__}/Python-{sys.version.split()[0]}",
            "state": "DRAINING" if (self.health_check_failed and self.state == "LIVE") else self.state,
            "hot_restart_version": "disabled",
            "command_line_options": self.options,
            "node": node,
            "uptime_current_epoch": f"{up}s",
            "uptime_all_epochs": f"{up}s",
        }

    def config_dump(self) -> dict:
        from google.protobuf import json_format

        try:
            boot = json_format.MessageToDict(self.bootstrap, preserving_proto_field_name=True)
        except Exception:  # an opaque Any the pool cannot print: fall back without it
            boot = {"error": "bootstrap contains types that cannot be rendered"}
        _redact(boot)
        sr = boot.get("static_resources", {})
        return {
            "configs": [
                {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": boot},
                {
                    "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                    "static_clusters": [{"cluster": c} for c in sr.get("clusters", [])],
                },
                {
                    "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
                    "static_listeners": [{"listener": lst} for lst in sr.get("listeners", [])],
                },
            ]
        }

    def clusters_text(self) -> str:
        lines = []
        for c in self.cluster_manager.clusters.values():
            name = c.name
            lines.append(f"{name}::default_priority::max_connections::{c.max_connections}")
            lines.append(f"{name}::default_priority::max_pending_requests::{c.max_pending_requests}")
            lines.append(f"{name}::default_priority::max_requests::{c.max_requests}")
            lines.append(f"{name}::default_priority::max_retries::{c.max_retries}")
            for h in c.hosts:
                p = f"{name}::{h.addr_str}"
                lines.append(f"{p}::cx_active::{h.active_cx}")
                lines.append(f"{p}::rq_active::{h.active_rq}")
                lines.append(f"{p}::weight::{h.weight}")
                lines.append(f"{p}::health_flags::{'healthy' if h.healthy else '/failed_eds_health'}")
                lines.append(f"{p}::hostname::{h.hostname}")
        return "\n".join(lines) + ("\n" if lines else "")

    def clusters_json(self) -> dict:
        out = []
        for c in self.cluster_manager.clusters.values():
            out.append(
                {
                    "name": c.name,
                    "host_statuses": [
                        {
                            "address": {"socket_address": {"address": h.address, "port_value": h.port}}
                            if h.port is not None
                            else {"pipe": {"path": h.address}},
                            "weight": h.weight,
                            "hostname": h.hostname,
                            "health_status": {"eds_health_status": "HEALTHY" if h.healthy else "UNHEALTHY"},
                            "stats": [
                                {"name": "cx_active", "value": str(h.active_cx), "type": "GAUGE"},
                                {"name": "rq_active", "value": str(h.active_rq), "type": "GAUGE"},
                            ],
                        }
                        for h in c.hosts
                    ],
                }
            )
        return {"cluster_statuses": out}

    def listeners_info(self) -> list[dict]:
        out = []
        for lst in self.listeners:
            a = lst.bound_address
            out.append({"name": lst.name, "address": _fmt_addr(a), "local_address": a})
        return out

    def set_health_check_failed(self, failed: bool) -> None:
        self.health_check_failed = failed
        self.stats.gauge("server.health_check_failed").value = 1 if failed else 0

    def drain_listeners(self, inbound_only: bool = False) -> None:
        for lst in self.listeners:
            lst.stop_accepting()
        for t in self._terminals():
            d = getattr(t, "drain", None)
            if d is not None:
                d()

    def quit(self) -> None:
        self.begin_shutdown()


def _active(terminal: Any) -> bool:
    f = getattr(terminal, "active_requests", None)
    if f is not None:
        return f() > 0
    f = getattr(terminal, "active_connections", None)
    if f is not None:
        return f() > 0
    return False


def _fmt_addr(a: Any) -> str:
    if isinstance(a, tuple) and len(a) == 3:
        return addr_str(a)
    if isinstance(a, tuple) and len(a) >= 2:
        host, port = a[0], a[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(a)


def _redact(d: Any) -> None:
    if isinstance(d, dict):
        for k in list(d):
            if k in _REDACT_KEYS:
                d[k] = "[redacted]"
            else:
                _redact(d[k])
    elif isinstance(d, list):
        for x in d:
            _redact(x)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
