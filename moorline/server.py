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
from moorline.protocol import http1, http2_backends
from moorline.stream import builtin_codecs

# The "moorline" logger itself prints as [main] (Envoy's component); a "moorline.main" child
# would shadow it in the per-component level table.
log = logging.getLogger("moorline")

# Envoy's ``envoy.admin.v3.ServerInfo.State`` numbers: the value of the ``server.state`` gauge,
# which pilot-agent reads (``/stats?usedonly&filter=^(server\.state|...)``) to decide readiness.
STATE_NUMBERS = {"LIVE": 0, "DRAINING": 1, "PRE_INITIALIZING": 2, "INITIALIZING": 3}


class Server:
    """Compiled bootstrap plus the running state. Implements the admin's ``AdminHost``.

    The running configuration lives in three managers, which static config (here) and the
    dynamic API (``add_or_update`` / ``remove`` on each; xDS will drive them) both go through:
    ``secrets`` (``moorline.net.secrets.SecretsManager``), ``cluster_manager``
    (``moorline.upstream.manager.ClusterManager``) and ``listener_manager``
    (``moorline.net.listener_manager.ListenerManager``). ``/config_dump`` renders what they hold.

    ``run()`` is the process entry point (signals, GC tuning, waits for SIGTERM); ``start()`` and
    ``shutdown()`` are its two halves, for embedding a server in a running loop (tests)."""

    def __init__(
        self, bootstrap: Any, source: str, drain_time: float = 600.0, options: dict | None = None
    ) -> None:
        from moorline.admin.server import compile_allow_paths
        from moorline.net.listener_manager import ListenerManager
        from moorline.net.secrets import SecretsManager
        from moorline.net.upstream import UpstreamTransportFactory
        from moorline.net.upstream import connect as upstream_connect
        from moorline.upstream.manager import ClusterManager

        register_builtin()
        self.options = options or {}
        self.bootstrap = _with_cli_node(bootstrap, self.options)
        self.source = source
        self.drain_time = drain_time
        self.drain_strategy = self.options.get("drain_strategy", "immediate")
        self.stats = Store()
        self.secrets = SecretsManager()
        from moorline.xds.files import FileSources

        self.xds_files = FileSources(self.stats)
        self.cluster_manager = ClusterManager(
            self.stats,
            transport_factory=UpstreamTransportFactory(self.secrets),
            eds_sources=self.xds_files.eds_source,
            health_connect=upstream_connect,
        )
        od_log = bootstrap.cluster_manager.outlier_detection.event_log_path
        if od_log:
            from moorline.upstream.outlier import EventLog

            try:
                self.cluster_manager.outlier_event_log = EventLog(od_log)
            except OSError as e:
                raise ConfigError(
                    "cluster_manager.outlier_detection.event_log_path", f"cannot open {od_log!r}: {e}"
                ) from e
        self.ctx = BuildContext(
            stats=self.stats,
            cluster_manager=self.cluster_manager,
            source=source,
            server=self,
            secrets=self.secrets,
            codecs=builtin_codecs(),
        )
        flush_ms = self.options.get("file_flush_interval_msec")
        if flush_ms is not None:
            from moorline.observability.access_log import AccessLogSinks

            # Before anything compiles an access log, so every file logger gets the interval.
            self.ctx.access_logs = AccessLogSinks(flush_interval=max(0, flush_ms) / 1000.0)
        from moorline.overload import OverloadManager

        try:
            # Before any listener or connection manager compiles: they keep ctx.overload.
            self.overload = OverloadManager.compile(bootstrap, self.ctx)
        except ConfigError as e:
            raise e.with_source(source) from None
        if self.overload is not None:
            self.ctx.overload = self.overload.state
        self.listener_manager = ListenerManager(self.ctx, drain_time=drain_time)
        self.listener_manager.drain_decision = self.drain_decision
        self._graceful_stop: asyncio.TimerHandle | None = None
        self.state = "PRE_INITIALIZING"
        self.health_check_failed = False
        self.start_time = time.time()
        self.admin: Any = None
        self._stop: asyncio.Event | None = None
        self._exit_code = 0
        sr = bootstrap.static_resources
        try:
            self._xds_clients(bootstrap)
            for i, sec in enumerate(sr.secrets):
                self.secrets.add_static(sec, f"static_resources.secrets[{i}]")
            for i, c in enumerate(sr.clusters):
                self.cluster_manager.add(c, f"static_resources.clusters[{i}]")
            for i, lp in enumerate(sr.listeners):
                self.listener_manager.add(lp, f"static_resources.listeners[{i}]")
            self.admin_address = None
            if bootstrap.HasField("admin") and bootstrap.admin.HasField("address"):
                self.admin_address = address_of(bootstrap.admin.address, "admin.address")
            self.admin_allow_paths = compile_allow_paths(bootstrap.admin.allow_paths, "admin.allow_paths")
            self._dynamic_resources(bootstrap)
            self.app_log_formatter = _app_log_formatter(bootstrap, self.options)
            # Cluster notices carry paths relative to their cluster.
            for i, cp in enumerate(sr.clusters):
                for n in getattr(self.cluster_manager.get(cp.name), "notices", None) or []:
                    self.ctx.notice(f"static_resources.clusters[{i}].{n}")
            check_bootstrap_fields(bootstrap, self.ctx)
        except ConfigError as e:
            raise e.with_source(source) from None
        self.server_stats()

    def _xds_clients(self, bootstrap: Any) -> None:
        """The gRPC xDS streams, made before any resource compiles (static clusters, listeners
        and TLS contexts may name ``ads`` or an ``api_config_source``): the ADS stream of
        ``dynamic_resources.ads_config`` (state of the world ``GRPC`` or ``DELTA_GRPC``), and
        SDS over gRPC for every TLS context (``xds.sds``)."""
        from moorline.xds.ads import XdsClient, XdsClients, grpc_target
        from moorline.xds.sds import sds_client_factory

        self.xds = XdsClients(bootstrap.node, self.stats, bootstrap.static_resources.clusters)
        self.xds_files.grpc = self.xds
        self.secrets.register_sds_client(sds_client_factory(self.xds, self.stats))
        dr = bootstrap.dynamic_resources
        if not bootstrap.HasField("dynamic_resources") or not dr.HasField("ads_config"):
            return
        ac = dr.ads_config
        p = "dynamic_resources.ads_config"
        if ac.api_type not in (ac.GRPC, ac.DELTA_GRPC):
            raise ConfigError(f"{p}.api_type", "only GRPC and DELTA_GRPC are supported for ADS")
        if not ac.grpc_services:
            raise ConfigError(f"{p}.grpc_services", "a gRPC service is required")
        target = grpc_target(
            ac.grpc_services[0], bootstrap.static_resources.clusters, f"{p}.grpc_services[0]"
        )
        self.xds.ads = XdsClient(target, bootstrap.node, [], self.stats, delta=ac.api_type == ac.DELTA_GRPC)

    @property
    def ads(self) -> Any:
        """The ADS stream (``xds.ads.XdsClient``), or None."""
        return self.xds.ads

    def _dynamic_resources(self, bootstrap: Any) -> None:
        """``dynamic_resources``: CDS and LDS from watched files (``xds.files``), over ADS or a
        type's own gRPC stream (``xds.ads``), state of the world or delta."""
        from envoy.config.cluster.v3.cluster_pb2 import Cluster as ClusterProto
        from envoy.config.listener.v3.listener_pb2 import Listener as ListenerProto

        from moorline.xds.ads import WildcardKind
        from moorline.xds.files import CLUSTER_TYPE, LISTENER_TYPE, FileSubscription, config_source_path

        sources = self.xds_files
        if not bootstrap.HasField("dynamic_resources"):
            return
        dr = bootstrap.dynamic_resources
        kinds = (
            ("cds_config", CLUSTER_TYPE, ClusterProto, self.cluster_manager, "cluster_manager.cds"),
            ("lds_config", LISTENER_TYPE, ListenerProto, self.listener_manager, "listener_manager.lds"),
        )
        for field, type_url, cls, manager, prefix in kinds:
            if not dr.HasField(field):
                continue
            fpath = f"dynamic_resources.{field}"
            src = getattr(dr, field)
            file = config_source_path(src)
            if file is not None:
                sources.add(FileSubscription(file, type_url, cls, manager, self.stats, prefix, fpath))
                continue
            client = self.xds.for_source(src, type_url, fpath)
            if client is None:
                raise ConfigError(
                    fpath, "a file (path_config_source), ads or a gRPC api_config_source is required"
                )
            client.add_wildcard(WildcardKind(type_url, cls, manager, prefix))
        for field in ("cds_resources_locator", "lds_resources_locator"):
            if getattr(dr, field):
                self.ctx.notice(
                    f"dynamic_resources.{field}: xDS-TP resource locators are not supported; ignored"
                )
        sources.load_initial()

    @property
    def listeners(self) -> list[Any]:
        """The active listeners (``moorline.net.listener.Listener``), in the order added."""
        return list(self.listener_manager)

    def server_stats(self) -> None:
        s = self.stats
        self.st_uptime = s.gauge("server.uptime")
        self.st_live = s.gauge("server.live")
        self.st_state = s.state_gauge("server.state")
        self.st_state.value = STATE_NUMBERS[self.state]
        # 1 once the listeners accept (Envoy: the workers started); pilot-agent waits for it.
        self.st_workers_started = s.gauge("listener_manager.workers_started")
        self.st_concurrency = s.gauge("server.concurrency")
        self.st_concurrency.value = 1
        self.st_version = s.gauge("server.version")
        self.st_total_connections = s.gauge("server.total_connections")
        self.st_memory = s.gauge("server.memory_allocated")

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve clusters, bind the listeners and the admin; the server is LIVE afterwards.
        Raises ``OSError`` when a static listener or the admin cannot be bound."""
        loop = asyncio.get_running_loop()
        for n in self.ctx.notices:
            log.info("notice: %s", n)
        self._set_state("INITIALIZING")
        self.secrets.start(loop)
        await self.cluster_manager.start()
        await self.listener_manager.start(loop)
        self.st_workers_started.value = 1
        if self.overload is not None:
            self.overload.start(loop)
        self.xds_files.start(loop)
        self.xds.start(loop)
        if self.admin_address is not None:
            from moorline.admin.server import AdminServer

            self.admin = AdminServer(self, self.admin_address, allow_paths=self.admin_allow_paths)
            await self.admin.start()
            log.info("admin on %s", _fmt_addr(self.admin.bound_address))
        self._set_state("LIVE")
        self.st_live.value = 1

    def _set_state(self, state: str) -> None:
        self.state = state
        self.st_state.value = STATE_NUMBERS[self.reported_state()]

    def reported_state(self) -> str:
        """The state ``/server_info`` and ``server.state`` show: DRAINING while health checks
        are failed (``/healthcheck/fail``), as Envoy reports it."""
        return "DRAINING" if (self.health_check_failed and self.state == "LIVE") else self.state

    def drain_decision(self) -> Any:
        """What terminals get in ``drain(decision)``: True for ``--drain-strategy immediate``
        (moorline's default), a fresh ``GradualDrain`` over the drain time for ``gradual``."""
        if self.drain_strategy != "gradual":
            return True
        import random

        from moorline.stream.connections import GradualDrain

        return GradualDrain(self.drain_time, time.monotonic, random.random)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_shutdown)
        try:
            loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        except (ValueError, RuntimeError):
            pass
        # Everything built so far lives until shutdown: keep the GC from scanning it.
        gc.collect()
        gc.freeze()
        # Per-request objects mostly die by reference counting; a larger young generation means
        # far fewer collections scanning objects that are about to be freed anyway (measured in
        # bench/: gc_collect_main fell from ~8% of proxy CPU). MOORLINE_GC_GEN0 overrides.
        gc.set_threshold(int(os.environ.get("MOORLINE_GC_GEN0", "20000")), 50, 100)
        uptime_task = loop.create_task(self._tick())
        if http2_backends.FALLBACK:
            log.warning("notice: HTTP/2 runs on the pure-Python h2 backend: %s", http2_backends.FALLBACK)
        log.info(
            "moorline %s ready (HTTP/1.1 parsers: %s; HTTP/2 codec: %s)",
            __version__,
            "compiled, llhttp" if http1.NATIVE else "pure Python on httptools",
            "libnghttp2" if http2_backends.BACKEND == "nghttp2" else "pure Python h2",
        )
        await self._stop.wait()
        uptime_task.cancel()
        await self.shutdown()
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

    async def shutdown(self) -> None:
        """Drain: stop accepting, let in-flight requests finish for up to ``drain_time``, cut
        the rest, close the admin and stop the clusters."""
        self._set_state("DRAINING")
        self.st_live.value = 0
        if self._graceful_stop is not None:
            self._graceful_stop.cancel()
            self._graceful_stop = None
        self.listener_manager.stop_accepting()
        terminals = self._terminals()
        for t in terminals:
            d = getattr(t, "drain", None)
            if d is not None:
                d(self.drain_decision())
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
        self.listener_manager.close()
        if self.overload is not None:
            self.overload.stop()
        if self.admin is not None:
            await self.admin.close()
        self.cluster_manager.stop()
        self.secrets.stop()
        self.xds_files.stop()
        self.xds.stop()
        if self.ctx.access_logs is not None:
            self.ctx.access_logs.flush_all()

    def _terminals(self) -> list[Any]:
        return self.listener_manager.terminals()

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
            "state": self.reported_state(),
            "hot_restart_version": "disabled",
            "command_line_options": command_line_options(self.options),
            "node": node,
            "uptime_current_epoch": f"{up}s",
            "uptime_all_epochs": f"{up}s",
        }

    def config_dump(self, include_eds: bool = False) -> dict:
        """What the managers hold, in Envoy's ``envoy.admin.v3.ConfigDump`` JSON shape (secrets
        redacted as Envoy does, see ``moorline.admin.config_dump``); the endpoints only with
        ``include_eds``, as Envoy's ``?include_eds``."""
        from google.protobuf import json_format

        from moorline.admin.config_dump import restore_opaque

        sections = [
            ("BootstrapConfigDump", self._dump_bootstrap),
            ("ClustersConfigDump", self._dump_clusters),
            ("ListenersConfigDump", self._dump_listeners),
            ("RoutesConfigDump", self._dump_routes),
            ("SecretsConfigDump", self._dump_secrets),
        ]
        if include_eds:
            sections.insert(2, ("EndpointsConfigDump", self._dump_endpoints))
        configs = []
        for type_name, build in sections:
            try:
                d = restore_opaque(json_format.MessageToDict(build(), preserving_proto_field_name=True))
            except Exception as e:  # a type the descriptor pool cannot print: say so, keep the rest
                d = {"error": f"cannot render: {type(e).__name__}: {e}"}
            configs.append({"@type": f"type.googleapis.com/envoy.admin.v3.{type_name}", **d})
        return {"configs": configs}

    def _dump_bootstrap(self) -> Any:
        from envoy.admin.v3 import config_dump_pb2

        from moorline.admin.config_dump import redact, timestamp

        m = config_dump_pb2.BootstrapConfigDump()
        m.bootstrap.CopyFrom(redact(self.bootstrap))
        m.last_updated.CopyFrom(timestamp(self.start_time))
        return m

    def _dump_clusters(self) -> Any:
        from envoy.admin.v3 import config_dump_shared_pb2

        from moorline.admin.config_dump import redact, timestamp

        m = config_dump_shared_pb2.ClustersConfigDump()
        for c in self.cluster_manager:
            if c.proto is None:
                continue
            if c.added_via_api:
                item = m.dynamic_active_clusters.add()
                item.version_info = c.version_info
            else:
                item = m.static_clusters.add()
            item.cluster.Pack(redact(c.proto))
            item.last_updated.CopyFrom(timestamp(c.last_updated))
        for c in self.cluster_manager.warming.values():
            item = m.dynamic_warming_clusters.add()
            item.version_info = c.version_info
            item.cluster.Pack(redact(c.proto))
            item.last_updated.CopyFrom(timestamp(c.last_updated))
        return m

    def _dump_endpoints(self) -> Any:
        """Each cluster's membership as a ``ClusterLoadAssignment`` (rebuilt from its hosts, as
        Envoy's dump is): EDS clusters dynamic, with the version of their last assignment."""
        from envoy.admin.v3 import config_dump_shared_pb2

        from moorline.admin.config_dump import timestamp

        m = config_dump_shared_pb2.EndpointsConfigDump()
        for c in self.cluster_manager:
            if (c.type == "EDS" and c.added_via_api) or c.eds_subscription is not None:
                item: Any = m.dynamic_endpoint_configs.add()
                item.version_info = str(getattr(c.eds_subscription, "version_info", "") or "")
            else:
                item = m.static_endpoint_configs.add()
            item.endpoint_config.Pack(c.load_assignment_view())
            item.last_updated.CopyFrom(timestamp(c.last_updated))
        return m

    def _dump_listeners(self) -> Any:
        from envoy.admin.v3 import config_dump_shared_pb2

        from moorline.admin.config_dump import redact, timestamp

        m = config_dump_shared_pb2.ListenersConfigDump()
        dynamic: dict[str, Any] = {}
        for lst in self.listener_manager:
            if not lst.added_via_api:
                item = m.static_listeners.add()
                item.listener.Pack(redact(lst.proto))
                item.last_updated.CopyFrom(timestamp(lst.last_updated))
                continue
            dl = dynamic[lst.name] = m.dynamic_listeners.add()
            dl.name = lst.name
            st = dl.active_state
            st.version_info = lst.version_info
            st.listener.Pack(redact(lst.proto))
            st.last_updated.CopyFrom(timestamp(lst.last_updated))
        for lst in self.listener_manager.warming.values():
            dl = dynamic.get(lst.name)
            if dl is None:
                dl = dynamic[lst.name] = m.dynamic_listeners.add()
                dl.name = lst.name
            st = dl.warming_state
            st.version_info = lst.version_info
            st.listener.Pack(redact(lst.proto))
            st.last_updated.CopyFrom(timestamp(lst.last_updated))
        for d in self.listener_manager.draining:
            old = d.listener
            if not old.added_via_api:
                continue
            dl = dynamic.get(old.name)
            if dl is None:
                dl = dynamic[old.name] = m.dynamic_listeners.add()
                dl.name = old.name
            st = dl.draining_state
            st.version_info = old.version_info
            st.listener.Pack(redact(old.proto))
            st.last_updated.CopyFrom(timestamp(old.last_updated))
        return m

    def _dump_routes(self) -> Any:
        from envoy.admin.v3 import config_dump_shared_pb2

        from moorline.admin.config_dump import redact, timestamp

        m = config_dump_shared_pb2.RoutesConfigDump()
        seen: set[int] = set()
        for lst in self.listener_manager:
            for ch in lst.filter_chains:
                p = getattr(ch.terminal, "route_provider", None)
                if p is None or p.proto is None or id(p) in seen:
                    continue
                seen.add(id(p))
                if p.static:
                    item = m.static_route_configs.add()
                else:
                    item = m.dynamic_route_configs.add()
                    item.version_info = p.version_info
                item.route_config.Pack(redact(p.proto))
                item.last_updated.CopyFrom(timestamp(p.last_updated))
        return m

    def _dump_secrets(self) -> Any:
        from envoy.admin.v3 import config_dump_pb2

        from moorline.admin.config_dump import redact, timestamp

        m = config_dump_pb2.SecretsConfigDump()
        for name, e in self.secrets.entries():
            item: Any = m.static_secrets.add() if e.static else m.dynamic_active_secrets.add()
            item.name = name
            if not e.static:
                item.version_info = e.version_info
            item.secret.Pack(redact(e.secret))
            item.last_updated.CopyFrom(timestamp(e.last_updated))
        for fp in [*self.secrets.file_providers(), *self.secrets.xds_providers()]:
            sec = fp.get()
            if sec is None:
                item = m.dynamic_warming_secrets.add()  # (asked for over SDS, not received yet)
                item.name = fp.name
                continue
            item = m.dynamic_active_secrets.add()
            item.name = fp.name
            item.version_info = fp.version_info
            item.secret.Pack(redact(sec))
            item.last_updated.CopyFrom(timestamp(fp.last_updated))
        return m

    def clusters_text(self) -> str:
        lines = []
        for c in self.cluster_manager:
            name = c.name
            lines.append(f"{name}::default_priority::max_connections::{c.max_connections}")
            lines.append(f"{name}::default_priority::max_pending_requests::{c.max_pending_requests}")
            lines.append(f"{name}::default_priority::max_requests::{c.max_requests}")
            lines.append(f"{name}::default_priority::max_retries::{c.max_retries}")
            lines.append(f"{name}::high_priority::max_connections::{c.high.max_connections}")
            lines.append(f"{name}::high_priority::max_pending_requests::{c.high.max_pending_requests}")
            lines.append(f"{name}::high_priority::max_requests::{c.high.max_requests}")
            lines.append(f"{name}::high_priority::max_retries::{c.high.max_retries}")
            for h in c.hosts:
                p = f"{name}::{h.addr_str}"
                lines.append(f"{p}::cx_active::{h.active_cx}")
                lines.append(f"{p}::rq_active::{h.active_rq}")
                lines.append(f"{p}::weight::{h.weight}")
                lines.append(f"{p}::health_flags::{_health_flags(h)}")
                lines.append(f"{p}::hostname::{h.hostname}")
                region, zone, sub_zone = h.locality
                lines.append(f"{p}::region::{region}")
                lines.append(f"{p}::zone::{zone}")
                lines.append(f"{p}::sub_zone::{sub_zone}")
                lines.append(f"{p}::priority::{h.priority}")
        return "\n".join(lines) + ("\n" if lines else "")

    def clusters_json(self) -> dict:
        out = []
        for c in self.cluster_manager:
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
                            "health_status": _health_status(h),
                            "locality": dict(zip(("region", "zone", "sub_zone"), h.locality, strict=True)),
                            "priority": h.priority,
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
        self._set_state(self.state)

    def drain_listeners(
        self, inbound_only: bool = False, graceful: bool = False, skip_exit: bool = False
    ) -> None:
        """``POST /drain_listeners``. ``inboundonly``: only listeners whose
        ``traffic_direction`` is INBOUND (pilot-agent drains those while the app's outbound
        calls go on). Without ``graceful`` they stop accepting now and their connections are
        told to close; with it they keep accepting for the drain time while their connections
        are told to close (per ``--drain-strategy``), then stop accepting, unless ``skip_exit``."""
        lsts = [lst for lst in self.listener_manager if not inbound_only or _inbound(lst)]
        decision = self.drain_decision() if graceful else True
        for lst in lsts:
            for ch in lst.filter_chains:
                d = getattr(ch.terminal, "drain", None)
                if d is not None:
                    d(decision)
        if not graceful:
            self.listener_manager.stop_accepting(lsts)
            return
        if skip_exit:
            return
        if self._graceful_stop is not None:
            self._graceful_stop.cancel()
        loop = asyncio.get_running_loop()
        self._graceful_stop = loop.call_later(self.drain_time, self.listener_manager.stop_accepting, lsts)

    def quit(self) -> None:
        self.begin_shutdown()


def _health_flags(h: Any) -> str:
    """Envoy's ``/clusters`` health flags: ``healthy`` or the reasons concatenated."""
    flags = (
        ("/failed_active_hc" if h.failed_active_hc else "")
        + ("" if h.eds_healthy else "/failed_eds_health")
        + ("/failed_outlier_check" if h.outlier_ejected else "")
    )
    return flags or "healthy"


def _health_status(h: Any) -> dict:
    st: dict = {"eds_health_status": "HEALTHY" if h.eds_healthy else "UNHEALTHY"}
    if h.failed_active_hc:
        st["failed_active_health_check"] = True
    if h.outlier_ejected:
        st["failed_outlier_check"] = True
    return st


def _app_log_formatter(bootstrap: Any, options: dict) -> Any:
    """``application_log_config.log_format`` compiled at load; installed by the CLI
    (``moorline.cli``), so a server embedded in tests leaves the process log alone."""
    from google.protobuf import json_format

    from moorline.observability.logging import LogSetupError, app_log_formatter

    lf = bootstrap.application_log_config.log_format
    kind = lf.WhichOneof("log_format") if bootstrap.application_log_config.HasField("log_format") else None
    path = "application_log_config.log_format"
    if bootstrap.application_log_config.HasField("log_format") and kind is None:
        raise ConfigError(path, "one of text_format or json_format is required")
    try:
        return app_log_formatter(
            lf.text_format if kind == "text_format" else None,
            json_format.MessageToDict(lf.json_format) if kind == "json_format" else None,
            options.get("log_format"),
            bool(options.get("log_format_escaped")),
        )
    except LogSetupError as e:
        raise ConfigError(path, str(e)) from None


def _inbound(lst: Any) -> bool:
    from envoy.config.core.v3 import base_pb2

    proto = getattr(lst, "proto", None)
    return proto is not None and proto.traffic_direction == base_pb2.INBOUND


def _with_cli_node(bootstrap: Any, options: dict) -> Any:
    """``--service-cluster`` / ``--service-node`` / ``--service-zone`` override the bootstrap's
    ``node.cluster`` / ``node.id`` / ``node.locality.zone``, as Envoy's do."""
    cluster, node, zone = (options.get(k) for k in ("service_cluster", "service_node", "service_zone"))
    if cluster is not None:
        bootstrap.node.cluster = cluster
    if node is not None:
        bootstrap.node.id = node
    if zone is not None:
        bootstrap.node.locality.zone = zone
    return bootstrap


def command_line_options(options: dict) -> dict:
    """The CLI options as Envoy's ``envoy.admin.v3.CommandLineOptions`` JSON (what pilot-agent
    and istioctl decode from ``/server_info``); options Envoy has no field for are left out."""
    from envoy.admin.v3 import server_info_pb2
    from google.protobuf import json_format

    m = server_info_pb2.CommandLineOptions()
    for key, field in (
        ("config", "config_path"),
        ("config_yaml", "config_yaml"),
        ("log_level", "log_level"),
        ("component_log_level", "component_log_level"),
        ("log_format", "log_format"),
        ("log_path", "log_path"),
        ("service_cluster", "service_cluster"),
        ("service_node", "service_node"),
        ("service_zone", "service_zone"),
    ):
        v = options.get(key)
        if isinstance(v, str):
            setattr(m, field, v)
    for key in (
        "log_format_escaped",
        "disable_hot_restart",
        "allow_unknown_static_fields",
        "ignore_unknown_dynamic_fields",
        "skip_deprecated_logs",
        "enable_core_dump",
        "enable_fine_grain_logging",
        "enable_mutex_tracing",
        "cpuset_threads",
        "use_dynamic_base_id",
    ):
        if options.get(key):
            setattr(m, key, True)
    if options.get("reject_ignored"):
        m.reject_unknown_dynamic_fields = True
    conc = options.get("concurrency")
    if isinstance(conc, int) and conc >= 0:
        m.concurrency = conc
    if isinstance(options.get("restart_epoch"), int) and options["restart_epoch"] >= 0:
        m.restart_epoch = options["restart_epoch"]
    base_id = options.get("base_id")
    if isinstance(base_id, str) and base_id.isdigit():
        m.base_id = int(base_id)
    for key, field in (("drain_time_s", "drain_time"), ("parent_shutdown_time_s", "parent_shutdown_time")):
        v = options.get(key)
        if isinstance(v, int | float) and v >= 0:
            getattr(m, field).FromNanoseconds(int(v * 1e9))
    ms = options.get("file_flush_interval_msec")
    if isinstance(ms, int) and ms >= 0:
        m.file_flush_interval.FromMilliseconds(ms)
    m.local_address_ip_version = m.v6 if options.get("local_address_ip_version") == "v6" else m.v4
    m.drain_strategy = m.Gradual if options.get("drain_strategy") == "gradual" else m.Immediate
    m.mode = {"validate": m.Validate, "init_only": m.InitOnly}.get(str(options.get("mode")), m.Serve)
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


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


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
