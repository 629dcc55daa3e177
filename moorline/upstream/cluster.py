"""Runtime clusters compiled from ``envoy.config.cluster.v3.Cluster``.

``compile_cluster(proto, store)`` validates the proto (errors are ``ConfigError`` with the field
path relative to the cluster) and returns a ``Cluster``: plain attributes for what the pool,
router and tcp_proxy read per request (timeouts, circuit-breaker limits, protocol choice), the
member ``Host`` objects, and ``choose_host`` backed by a balancer from ``lb.py`` that is rebuilt
whenever membership or health changes.

Cluster types:

- ``STATIC``: hosts from ``load_assignment``, IP literals (or pipes) only, as in Envoy.
- ``STRICT_DNS``: every address of every endpoint's name is a host; re-resolved every
  ``dns_refresh_rate``; a failed lookup keeps that endpoint's previous addresses.
- ``LOGICAL_DNS``: exactly one endpoint; one host whose address is the first one resolved. Like
  Envoy's logical host, the ``Host`` object is kept and its address updated in place when DNS
  changes, so existing connections are not drained, only new ones go to the new address.
- ``EDS``: no hosts until the xDS layer calls ``update_load_assignment`` (or ``update_hosts``).
- ``ORIGINAL_DST`` (``OriginalDstCluster``): ``choose_host(exclude, context)`` asks the
  ``api.LbContext`` (the router or the tcp_proxy session) for the downstream connection's
  original destination, or the request's override header, and returns
  ``original_dst_host(ip, port)``. Hosts are cached (bounded) and swept every
  ``cleanup_interval`` when idle. Without a context or a destination: ``None``.

Host identity: hosts are keyed by ``(address, port)``. A membership update reuses the existing
``Host`` object for a key that stays (keeping ``active_rq``, ``pool`` and per-host counters);
hosts that go away get ``removed = True`` and are listed in ``cluster.last_removed`` while the
``on_membership_change`` callbacks run. A duplicate key inside one update is dropped (first wins).

Health: ``host.healthy`` comes from the endpoint's ``health_status`` (UNKNOWN/HEALTHY/DEGRADED ->
True, DEGRADED also sets ``degraded``; UNHEALTHY/DRAINING/TIMEOUT -> False). Outlier detection
(``outlier.py``) sets ``host.outlier_ejected`` instead, so the two never overwrite each other;
``_usable`` is the one filter the balancers use. Whoever flips either later must call
``cluster.health_changed()`` so the balancer is rebuilt. Panic mode is Envoy's: when the healthy share of hosts is below
``common_lb_config.healthy_panic_threshold`` (default 50 %), balance over all hosts and count
``lb_healthy_panic`` per pick; a threshold of 0 disables it (no healthy host -> no host).
"""

from __future__ import annotations

import asyncio
import random
import socket
import weakref
from collections.abc import Callable, Collection, Iterable
from typing import Any, NamedTuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from moorline.config.errors import ConfigError
from moorline.config.util import addr_str, address_of, opt_duration_s, opt_uint
from moorline.observability.stats import Counter, Gauge, Histogram, Scope, Store
from moorline.upstream import lb as lbmod
from moorline.upstream.api import ConnPool, LbContext, TransportFactory
from moorline.upstream.dns import LOOKUP_FAMILIES, Answer, DnsError, Resolver, ip_family
from moorline.upstream.health_check import compile_health_checks

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_BUFFER_LIMIT = 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 3600.0
DEFAULT_DNS_REFRESH = 5.0
DEFAULT_PANIC_THRESHOLD = 50.0
DEFAULT_CLEANUP_INTERVAL = 5.0
# Bounds: notices kept per cluster (EDS updates may repeat them), cached ORIGINAL_DST hosts.
MAX_NOTICES = 64
MAX_ORIGINAL_DST_HOSTS = 4096

_HS = health_check_pb2.HealthStatus
_UNHEALTHY = frozenset((_HS.UNHEALTHY, _HS.DRAINING, _HS.TIMEOUT))

_LB_EXTENSIONS = {
    "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin": "ROUND_ROBIN",
    "envoy.extensions.load_balancing_policies.random.v3.Random": "RANDOM",
    "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest": "LEAST_REQUEST",
    "envoy.extensions.load_balancing_policies.cluster_provided.v3.ClusterProvided": "CLUSTER_PROVIDED",
}


class ClusterStats:
    """Envoy's ``cluster.<name>.*`` stats, one slot each, looked up once at build time."""

    COUNTERS = (
        "upstream_cx_total",
        "upstream_cx_http1_total",
        "upstream_cx_http2_total",
        "upstream_cx_connect_fail",
        "upstream_cx_connect_timeout",
        "upstream_cx_destroy",
        "upstream_cx_destroy_local",
        "upstream_cx_destroy_remote",
        "upstream_cx_destroy_with_active_rq",
        "upstream_cx_destroy_local_with_active_rq",
        "upstream_cx_destroy_remote_with_active_rq",
        "upstream_cx_close_notify",
        "upstream_cx_rx_bytes_total",
        "upstream_cx_tx_bytes_total",
        "upstream_cx_idle_timeout",
        "upstream_cx_overflow",
        "upstream_cx_max_requests",
        "upstream_cx_none_healthy",
        "upstream_cx_protocol_error",
        "upstream_rq_total",
        "upstream_rq_pending_total",
        "upstream_rq_pending_overflow",
        "upstream_rq_pending_failure_eject",
        "upstream_rq_cancelled",
        "upstream_rq_retry",
        "upstream_rq_retry_success",
        "upstream_rq_retry_overflow",
        "upstream_rq_retry_limit_exceeded",
        "upstream_rq_retry_backoff_ratelimited",
        "upstream_rq_timeout",
        "upstream_rq_per_try_timeout",
        "upstream_rq_rx_reset",
        "upstream_rq_tx_reset",
        "upstream_rq_completed",
        "upstream_rq_maintenance_mode",
        "update_attempt",
        "update_success",
        "update_failure",
        "update_empty",
        "membership_change",
        "lb_healthy_panic",
        "original_dst_host_invalid",
        "upstream_flow_control_paused_reading_total",
        "upstream_flow_control_resumed_reading_total",
    )
    GAUGES = (
        "upstream_cx_active",
        "upstream_rq_active",
        "upstream_rq_pending_active",
        "membership_healthy",
        "membership_total",
        "membership_degraded",
        "max_host_weight",
    )
    HISTOGRAMS = ("upstream_rq_time", "upstream_cx_connect_ms", "upstream_cx_length_ms")
    # attribute -> Envoy name, for stats whose names contain dots
    CB_GAUGES = {
        "cb_cx_open": "circuit_breakers.default.cx_open",
        "cb_rq_pending_open": "circuit_breakers.default.rq_pending_open",
        "cb_rq_open": "circuit_breakers.default.rq_open",
        "cb_rq_retry_open": "circuit_breakers.default.rq_retry_open",
    }

    __slots__ = (
        *COUNTERS,
        *GAUGES,
        *HISTOGRAMS,
        *CB_GAUGES,
        "_codes",
        "scope",
    )

    upstream_cx_total: Counter
    upstream_cx_http1_total: Counter
    upstream_cx_http2_total: Counter
    upstream_cx_connect_fail: Counter
    upstream_cx_connect_timeout: Counter
    upstream_cx_destroy: Counter
    upstream_cx_destroy_local: Counter
    upstream_cx_destroy_remote: Counter
    upstream_cx_destroy_with_active_rq: Counter
    upstream_cx_destroy_local_with_active_rq: Counter
    upstream_cx_destroy_remote_with_active_rq: Counter
    upstream_cx_close_notify: Counter
    upstream_cx_rx_bytes_total: Counter
    upstream_cx_tx_bytes_total: Counter
    upstream_cx_idle_timeout: Counter
    upstream_cx_overflow: Counter
    upstream_cx_max_requests: Counter
    upstream_cx_none_healthy: Counter
    upstream_cx_protocol_error: Counter
    upstream_rq_total: Counter
    upstream_rq_pending_total: Counter
    upstream_rq_pending_overflow: Counter
    upstream_rq_pending_failure_eject: Counter
    upstream_rq_cancelled: Counter
    upstream_rq_retry: Counter
    upstream_rq_retry_success: Counter
    upstream_rq_retry_overflow: Counter
    upstream_rq_retry_limit_exceeded: Counter
    upstream_rq_retry_backoff_ratelimited: Counter
    upstream_rq_timeout: Counter
    upstream_rq_per_try_timeout: Counter
    upstream_rq_rx_reset: Counter
    upstream_rq_tx_reset: Counter
    upstream_rq_completed: Counter
    upstream_rq_maintenance_mode: Counter
    update_attempt: Counter
    update_success: Counter
    update_failure: Counter
    update_empty: Counter
    membership_change: Counter
    lb_healthy_panic: Counter
    original_dst_host_invalid: Counter
    upstream_flow_control_paused_reading_total: Counter
    upstream_flow_control_resumed_reading_total: Counter
    upstream_cx_active: Gauge
    upstream_rq_active: Gauge
    upstream_rq_pending_active: Gauge
    membership_healthy: Gauge
    membership_total: Gauge
    membership_degraded: Gauge
    max_host_weight: Gauge
    upstream_rq_time: Histogram
    upstream_cx_connect_ms: Histogram
    upstream_cx_length_ms: Histogram
    cb_cx_open: Gauge
    cb_rq_pending_open: Gauge
    cb_rq_open: Gauge
    cb_rq_retry_open: Gauge
    scope: Scope
    _codes: dict[int, tuple[Counter, Counter]]

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        for n in self.COUNTERS:
            setattr(self, n, scope.counter(n))
        for n in self.GAUGES:
            setattr(self, n, scope.gauge(n))
        for n in self.HISTOGRAMS:
            setattr(self, n, scope.histogram(n))
        # status code -> (upstream_rq_<code>, upstream_rq_<N>xx); bounded by the number of
        # distinct codes seen (three-digit codes: at most 900 entries).
        self._codes = {}

    def bind_breakers(self, cluster: Cluster) -> None:
        """The ``circuit_breakers.default.*_open`` gauges (1 while a limit is reached), read
        from the cluster's live counts when scraped. A weak reference: the store outlives a
        removed cluster and must not keep its hosts and pools alive."""
        ref = weakref.ref(cluster)
        st = self

        def opener(count: Callable[[Cluster], int], limit: Callable[[Cluster], int]) -> Callable[[], int]:
            def fn() -> int:
                c = ref()
                return 0 if c is None else int(count(c) >= limit(c))

            return fn

        for attr, n in self.CB_GAUGES.items():
            count, limit = _BREAKERS[n.rsplit(".", 1)[1][: -len("_open")]]
            setattr(st, attr, self.scope.derived_gauge(n, opener(count, limit)))
        for kind, (count, limit) in _HIGH_BREAKERS.items():
            self.scope.derived_gauge(f"circuit_breakers.high.{kind}_open", opener(count, limit))

    def track_remaining(self, cluster: Cluster, high: bool = False) -> None:
        """``circuit_breakers.<default|high>.remaining_*`` (``track_remaining``): limit minus
        count."""
        ref = weakref.ref(cluster)

        def remaining(count: Callable[[Cluster], int], limit: Callable[[Cluster], int]) -> Callable[[], int]:
            def fn() -> int:
                c = ref()
                return 0 if c is None else max(0, limit(c) - count(c))

            return fn

        table, level = (_HIGH_BREAKERS, "high") if high else (_BREAKERS, "default")
        for kind, name in (("cx", "cx"), ("rq_pending", "pending"), ("rq", "rq"), ("rq_retry", "retries")):
            count, limit = table[kind]
            self.scope.derived_gauge(f"circuit_breakers.{level}.remaining_{name}", remaining(count, limit))

    def rq_status(self, code: int) -> None:
        """Count one upstream response: ``upstream_rq_<code>`` and ``upstream_rq_<N>xx``."""
        pair = self._codes.get(code)
        if pair is None:
            pair = self._codes[code] = (
                self.scope.counter(f"upstream_rq_{code}"),
                self.scope.counter(f"upstream_rq_{code // 100}xx"),
            )
        pair[0].value += 1
        pair[1].value += 1


class Host:
    """One upstream endpoint. Identity (hash/eq) is the object: ``exclude`` sets hold hosts."""

    __slots__ = (
        "active_cx",
        "active_rq",
        "addr_str",
        "address",
        "cluster",
        "degraded",
        "eds_healthy",
        "failed_active_hc",
        "family",
        "h2pool",
        "healthy",
        "hostname",
        "locality",
        "locality_weight",
        "outlier_ejected",
        "pool",
        "port",
        "priority",
        "removed",
        "rpcpool",
        "stats_cx_connect_fail",
        "stats_cx_total",
        "stats_rq_error",
        "stats_rq_success",
        "stats_rq_timeout",
        "stats_rq_total",
        "weight",
    )

    def __init__(
        self,
        cluster: Cluster,
        address: str,
        port: int | None,
        hostname: str | None = None,
        weight: int = 1,
        healthy: bool = True,
        degraded: bool = False,
        locality: tuple[str, str, str] = ("", "", ""),
        priority: int = 0,
        locality_weight: int = 0,
    ) -> None:
        self.cluster = cluster
        self.priority = priority  # EDS priority level (0 is the highest)
        self.hostname = hostname or address
        self.weight = weight
        self.healthy = healthy
        # What the endpoint's own health status says, and the active health checker's verdict
        # (None: not checked yet; True: failed_active_hc). ``healthy`` is their combination.
        self.eds_healthy = healthy
        self.failed_active_hc: bool | None = None
        self.degraded = degraded
        self.locality = locality  # (region, zone, sub_zone), for /clusters
        # Its LocalityLbEndpoints' load_balancing_weight (0: none); read only with
        # common_lb_config.locality_weighted_lb_config.
        self.locality_weight = locality_weight
        self.active_rq = 0
        self.active_cx = 0
        self.removed = False
        self.outlier_ejected = False  # set by outlier.OutlierDetector, apart from EDS health
        # The host's connection pools (moorline.stream makes them on first use); they live and
        # die with the host, so a replaced or removed cluster takes its connections with it.
        self.pool: ConnPool | None = None
        self.h2pool: ConnPool | None = None
        # x-protocol pools (moorline.stream.rpc), one per protocol name.
        self.rpcpool: dict[str, ConnPool] | None = None
        self.stats_rq_total = 0
        self.stats_rq_error = 0
        self.stats_rq_success = 0
        self.stats_rq_timeout = 0
        self.stats_cx_total = 0
        self.stats_cx_connect_fail = 0
        self.address = address
        self.port = port
        self.family: int = socket.AF_INET
        self.addr_str = ""
        self.set_address(address, port)

    def set_address(self, address: str, port: int | None) -> None:
        self.address = address
        self.port = port
        if port is None:
            self.family = socket.AF_UNIX
            self.addr_str = address
        else:
            self.family = ip_family(address) or socket.AF_INET
            self.addr_str = addr_str(("tcp", address, port))

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.address, self.port)

    def copy_for(self, cluster: Cluster) -> Host:
        """The same endpoint as a member of ``cluster`` (a replacing cluster): weight, health and
        names carried over (and the active health checker's last verdict); counters and pools
        start empty."""
        h = Host(
            cluster,
            self.address,
            self.port,
            self.hostname,
            self.weight,
            self.healthy,
            self.degraded,
            self.locality,
            self.priority,
            self.locality_weight,
        )
        h.eds_healthy = self.eds_healthy
        h.failed_active_hc = self.failed_active_hc
        return h

    def drain_pools(self) -> None:
        """The host left its cluster: idle connections close now, busy ones after their request."""
        for p in (self.pool, self.h2pool):
            if p is not None:
                p.drain()
        if self.rpcpool:
            for p in self.rpcpool.values():
                p.drain()

    def __repr__(self) -> str:
        flags = ("" if self.healthy else " unhealthy") + (" ejected" if self.outlier_ejected else "")
        return f"<Host {self.cluster.name} {self.addr_str} w={self.weight}{flags}>"


def _usable(h: Host) -> bool:
    """The one healthy filter the balancers are built from: EDS health and not ejected."""
    return h.healthy and not h.outlier_ejected


class _Endpoint(NamedTuple):
    """An endpoint of ``load_assignment`` before DNS: ``address`` may be a name (DNS types)."""

    address: str
    port: int | None
    hostname: str
    weight: int
    healthy: bool
    degraded: bool
    locality: tuple[str, str, str]
    priority: int = 0
    locality_weight: int = 0


class HighPriority:
    """The cluster's HIGH ``RoutingPriority`` thresholds and their live counts. Requests on a
    route with ``priority: HIGH`` are checked against these instead of the DEFAULT ones
    (``Cluster.max_requests`` ...), so they keep flowing while DEFAULT's limits are exhausted.
    A HIGH request, its pending slot and the connections it opens are still counted in the
    cluster's gauges (``upstream_rq_active``, ``upstream_rq_pending_active``,
    ``upstream_cx_active``); the DEFAULT checks subtract the HIGH counts kept here. One pool per
    host serves both priorities (Envoy keeps one per priority): a connection counts against the
    priority of the request that opened it, and then carries requests of either."""

    __slots__ = (
        "active_retries",
        "cx_active",
        "max_connections",
        "max_pending_requests",
        "max_requests",
        "max_retries",
        "pending_active",
        "retry_budget",
        "rq_active",
    )

    def __init__(self) -> None:
        self.max_connections = 1024
        self.max_pending_requests = 1024
        self.max_requests = 1024
        self.max_retries = 3
        self.retry_budget: tuple[float, int] | None = None
        self.cx_active = 0
        self.pending_active = 0
        self.rq_active = 0
        self.active_retries = 0

    def retries_limit(self) -> int:
        """``Cluster.retries_limit`` for HIGH: ``max_retries``, or the budget's share of the
        HIGH requests in flight (at least ``min_retry_concurrency``)."""
        rb = self.retry_budget
        if rb is None:
            return self.max_retries
        return max(int(rb[0] * (self.rq_active + self.pending_active)), rb[1])


class Cluster:
    """A compiled cluster. See the module docstring; build with ``compile_cluster``."""

    def __init__(
        self,
        name: str,
        store: Store,
        *,
        type: str = "STATIC",
        lb_policy: str = "ROUND_ROBIN",
        stat_name: str | None = None,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.lb_policy = lb_policy
        self.stat_name = stat_name or name
        self.stats = ClusterStats(store.scope(f"cluster.{self.stat_name}."))
        self.proto: Any = None  # the Cluster proto compiled, for config_dump and change detection
        self.hosts: list[Host] = []
        self.healthy_hosts: list[Host] = []
        self.connect_timeout = DEFAULT_CONNECT_TIMEOUT
        self.per_connection_buffer_limit = DEFAULT_BUFFER_LIMIT
        # None: idle timeout disabled (Envoy: explicit 0).
        self.idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
        self.max_requests_per_connection: int | None = None
        self.max_connection_duration: float | None = None
        # True: HTTP/2 upstream; False: HTTP/1.1; None: same protocol as downstream.
        self.http2: bool | None = False
        self.http2_protocol_options: Any = None  # envoy.config.core.v3.Http2ProtocolOptions
        self.tcp_keepalive: tuple[int | None, int | None, int | None] | None = None
        self.transport_socket: Any = None  # envoy.config.core.v3.TransportSocket, or None
        # What net/ connects through: None is plain TCP, else what the TransportFactory built
        # (moorline.net.tls.UpstreamTls). ``transport_error`` set: every connect fails with it.
        self.transport: Any = None
        self.transport_error: str | None = None
        self.max_connections = 1024
        self.max_pending_requests = 1024
        self.max_requests = 1024
        self.max_retries = 3
        self.high = HighPriority()  # read only for requests on a priority HIGH route
        self.panic_threshold = DEFAULT_PANIC_THRESHOLD
        self.overprovisioning = lbmod.DEFAULT_OVERPROVISIONING  # the assignment's policy (percent)
        # common_lb_config.locality_weighted_lb_config (or a policy's locality_lb_config): each
        # level picks a locality by effective weight first (lb.LocalityLB). Off: locality
        # weights are ignored, as in Envoy, and nothing reads them.
        self.locality_weighted = False
        self.choice_count = 2
        self.active_request_bias = 1.0
        self.eds_service_name = name
        self.eds_subscription: Any = None  # xds.files: the watched file its assignment comes from
        # What the cluster warms on before it takes traffic (config.warming.InitTarget: its
        # first EDS assignment over xDS); empty for every other cluster.
        self.init_targets: list[Any] = []
        self.dns_lookup_family = "AUTO"
        self.dns_refresh_rate = DEFAULT_DNS_REFRESH
        self.dns_failure_refresh_rate: tuple[float, float] | None = None  # (base, max)
        self.dns_jitter = 0.0
        self.last_dns_error: str | None = None
        # ORIGINAL_DST (OriginalDstCluster): header name (lower case bytes) when the
        # use_http_header override is on, the port that replaces the destination's.
        self.original_dst_header: bytes | None = None
        self.original_dst_port_override: int | None = None
        self.cleanup_interval = DEFAULT_CLEANUP_INTERVAL
        self.notices: list[str] = []
        # Active health checking (health_check.HealthChecks) and the connect function net/
        # gives it (the ClusterManager sets it); started by start(), stopped by stop().
        self.health_checker: Any = None
        self.started = False  # (start() runs once: a warming cluster starts before it serves)
        self.health_connect: Any = None
        # Runtime state owned by this cluster (freed with it): concurrent retries for the
        # max_retries circuit breaker (the router takes and gives back slots), and the HTTP/2
        # pool's cluster.<name>.http2.* stats (moorline.stream.http2_client fills it).
        self.active_retries = 0
        # circuit_breakers retry_budget: (fraction of active + pending requests, minimum
        # concurrency); when set it replaces max_retries (Envoy's rule).
        self.retry_budget: tuple[float, int] | None = None
        self.h2_stats: Any = None
        # outlier.OutlierDetector when outlier_detection is configured; None costs the router
        # and tcp_proxy one attribute test per result.
        self.outlier: Any = None
        # Whether the router reports answers to the cluster (outlier detection or active health
        # checks configured): one attribute read per response when neither is.
        self.watches_responses = False
        # Management (the ClusterManager sets these): origin, version, when it was (re)built.
        self.added_via_api = False
        self.version_info = ""
        self.last_updated = 0.0
        # True once replaced or removed: no new request picks it, the ones on it finish.
        self.retired = False
        self.on_membership_change: list[Callable[[], None]] = []
        self.last_removed: list[Host] = []
        self._rng = rng or random.Random()
        self._resolver = resolver
        self._lb: lbmod.LoadBalancer | None = None
        self._panic = False
        self._endpoints: list[_Endpoint] = []  # DNS types: what to resolve
        self._resolved: dict[int, Answer] = {}  # endpoint index -> last good answer
        self._task: asyncio.Task[None] | None = None
        self._od_hosts: dict[tuple[str, int | None], Host] = {}
        self._od_used: set[Host] = set()
        self._od_timer: asyncio.TimerHandle | None = None

    # -- hot path -------------------------------------------------------------------------------

    def choose_host(
        self, exclude: Collection[Host] | None = None, context: LbContext | None = None
    ) -> Host | None:
        """A host for the next request; ``exclude`` holds hosts a retry already tried.
        ``context`` is only read by ORIGINAL_DST clusters (``OriginalDstCluster``)."""
        lb = self._lb
        if lb is None:
            return None
        if self._panic:
            self.stats.lb_healthy_panic.value += 1
        return lb.pick(exclude)

    def choose_host_excluding(
        self, priorities: Collection[int], exclude: Collection[Host] | None
    ) -> Host | None:
        """``choose_host`` for a retry that avoids the priority levels already tried
        (``retry_priority`` previous_priorities); one level only: the ordinary pick."""
        lb = self._lb
        if isinstance(lb, lbmod.PriorityLB):
            if self._panic:
                self.stats.lb_healthy_panic.value += 1
            return lb.pick_excluding(priorities, exclude)
        return self.choose_host(exclude)

    # -- membership -----------------------------------------------------------------------------

    def retries_limit(self) -> int:
        """Concurrent retries allowed: ``max_retries``, or with a ``retry_budget`` its share of
        the active and pending requests (at least ``min_retry_concurrency``)."""
        rb = self.retry_budget
        if rb is None:
            return self.max_retries
        st = self.stats
        hi = self.high
        active = st.upstream_rq_active.value - hi.rq_active
        share = int(rb[0] * (active + st.upstream_rq_pending_active.value - hi.pending_active))
        return max(share, rb[1])

    def notice(self, msg: str) -> None:
        if msg not in self.notices and len(self.notices) < MAX_NOTICES:
            self.notices.append(msg)

    def make_host(
        self,
        address: str,
        port: int | None,
        hostname: str | None = None,
        weight: int = 1,
        healthy: bool = True,
    ) -> Host:
        return Host(self, address, port, hostname, weight, healthy)

    def update_hosts(self, hosts: Iterable[Host]) -> None:
        """Replace membership (EDS, DNS). Hosts whose ``(address, port)`` stay keep their object,
        taking the new weight, hostname and health; callbacks run when hosts were added or
        removed."""
        old = {h.key: h for h in self.hosts}
        merged: list[Host] = []
        seen: set[tuple[str, int | None]] = set()
        added = False
        for h in hosts:
            key = h.key
            if key in seen:
                continue
            seen.add(key)
            o = old.pop(key, None)
            if o is None:
                h.cluster = self
                h.removed = False
                if self.health_checker is None:
                    h.failed_active_hc = None
                elif h.failed_active_hc is None:
                    h.failed_active_hc = True  # (unhealthy until its first check passes)
                h.healthy = h.eds_healthy and not h.failed_active_hc
                merged.append(h)
                added = True
            else:
                if o is not h:
                    o.weight = h.weight
                    o.hostname = h.hostname
                    o.eds_healthy = h.eds_healthy
                    o.healthy = h.eds_healthy and not o.failed_active_hc
                    o.degraded = h.degraded
                    o.locality = h.locality
                    o.priority = h.priority
                    o.locality_weight = h.locality_weight
                merged.append(o)
        removed = list(old.values())
        for h in removed:
            h.removed = True
            h.drain_pools()
        self.hosts = merged
        self._rebuild()
        if self.health_checker is not None and (added or removed):
            self.health_checker.sync()
        if added or removed:
            self.stats.membership_change.value += 1
            self.last_removed = removed
            try:
                for cb in list(self.on_membership_change):
                    cb()
            finally:
                self.last_removed = []

    def health_changed(self) -> None:
        """Call after flipping ``host.healthy`` (health checks, outlier detection)."""
        self._rebuild()

    def _rebuild(self) -> None:
        hosts = self.hosts
        healthy = [h for h in hosts if _usable(h)]
        self.healthy_hosts = healthy
        st = self.stats
        st.membership_total.value = len(hosts)
        st.membership_healthy.value = len(healthy)
        st.membership_degraded.value = sum(1 for h in hosts if h.degraded)
        st.max_host_weight.value = max((h.weight for h in hosts), default=0)
        self._panic = False
        if self.type == "ORIGINAL_DST" or not hosts:
            self._lb = None
            return
        if self.locality_weighted or hosts[-1].priority or any(h.priority for h in hosts):
            self._rebuild_priorities(hosts)
            return
        members = healthy
        if self.panic_threshold > 0 and len(healthy) * 100 < self.panic_threshold * len(hosts):
            self._panic = True
            members = hosts
        elif not healthy:
            self._lb = None
            return
        self._lb = lbmod.build(
            self.lb_policy, members, self._rng, self.choice_count, self.active_request_bias
        )

    def _rebuild_priorities(self, hosts: list[Host]) -> None:
        """Hosts on several priority levels: Envoy's priority load (``lb.priority_loads`` with the
        assignment's overprovisioning factor) picks the level, each level balances its healthy
        hosts; a level whose healthy share is under the panic threshold balances all of its
        hosts, and with no healthy host anywhere level 0 panics (as Envoy's)."""
        by_level: dict[int, list[Host]] = {}
        for h in hosts:
            by_level.setdefault(h.priority, []).append(h)
        # Only the levels that have hosts: a level with none takes no load anyway, and the
        # priority is a uint32 from the control plane (one of 4e9 must not make 4e9 levels).
        levels = [by_level[p] for p in sorted(by_level)]
        counts = [(sum(1 for h in lv if _usable(h)), len(lv)) for lv in levels]
        loads = lbmod.priority_loads(counts, self.overprovisioning)
        if not any(loads):
            loads = [100.0] + [0.0] * (len(levels) - 1)
        balancers: list[Any] = []
        for lv, (healthy, total), load in zip(levels, counts, loads, strict=True):
            if not lv or (load <= 0 and healthy == 0):
                balancers.append(None)
                continue
            members = [h for h in lv if _usable(h)]
            panic = self.panic_threshold > 0 and healthy * 100 < self.panic_threshold * total
            if panic:
                members = lv
                self._panic = self._panic or load > 0
            if not members:
                balancers.append(None)
            elif self.locality_weighted and not panic:
                balancers.append(self._locality_lb(lv, members))
            else:
                balancers.append(self._build_lb(members))
        if self.locality_weighted and len(levels) == 1:  # (one level: no priority draw per pick)
            self._lb = balancers[0]
            return
        self._lb = lbmod.PriorityLB(
            balancers, loads, self._rng, sorted(by_level), counts, self.overprovisioning
        )

    def _build_lb(self, members: list[Host]) -> lbmod.LoadBalancer:
        return lbmod.build(self.lb_policy, members, self._rng, self.choice_count, self.active_request_bias)

    def _locality_lb(self, level: list[Host], members: list[Host]) -> lbmod.LoadBalancer:
        """One priority level with locality weighting: each locality's effective weight (its
        ``load_balancing_weight`` times its availability, as ``lb.effective_locality_weight``)
        feeds a ``LocalityLB`` over per-locality balancers of its usable hosts. Localities
        without a weight take no load; when no locality has an effective weight the level is
        balanced without localities (as Envoy, whose locality schedule is then empty)."""
        by_loc: dict[tuple[str, str, str], list[Host]] = {}
        for h in level:
            by_loc.setdefault(h.locality, []).append(h)
        entries: list[tuple[float, lbmod.LoadBalancer]] = []
        for hs in by_loc.values():
            usable = [h for h in hs if _usable(h)]
            # (two LocalityLbEndpoints of one locality and priority: the first one's weight)
            w = lbmod.effective_locality_weight(
                hs[0].locality_weight, len(usable), len(hs), self.overprovisioning
            )
            if w > 0:
                entries.append((w, self._build_lb(usable)))
        if not entries:
            return self._build_lb(members)
        return lbmod.LocalityLB(entries, self._rng)

    def load_assignment_view(self) -> Any:
        """The membership as a ``ClusterLoadAssignment`` (for ``/config_dump?include_eds``)."""
        from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

        cla = ClusterLoadAssignment(cluster_name=self.eds_service_name)
        groups: dict[tuple[int, tuple[str, str, str]], Any] = {}
        for h in self.hosts:
            key = (h.priority, h.locality)
            lle = groups.get(key)
            if lle is None:
                lle = groups[key] = cla.endpoints.add()
                lle.priority = h.priority
                lle.locality.region, lle.locality.zone, lle.locality.sub_zone = h.locality
                if h.locality_weight:
                    lle.load_balancing_weight.value = h.locality_weight
            lbe = lle.lb_endpoints.add()
            if h.port is None:
                lbe.endpoint.address.pipe.path = h.address
            else:
                lbe.endpoint.address.socket_address.address = h.address
                lbe.endpoint.address.socket_address.port_value = h.port
            if h.hostname != h.address:
                lbe.endpoint.hostname = h.hostname
            lbe.load_balancing_weight.value = h.weight
            lbe.health_status = _HS.DEGRADED if h.degraded else (_HS.HEALTHY if h.healthy else _HS.UNHEALTHY)
        if self.overprovisioning != lbmod.DEFAULT_OVERPROVISIONING:
            cla.policy.overprovisioning_factor.value = self.overprovisioning
        return cla

    def update_load_assignment(self, cla: Any, path: str = "") -> None:
        """Apply an EDS ``ClusterLoadAssignment``; raises ``ConfigError`` (-> NACK) and then
        leaves membership unchanged. Counts ``update_attempt`` / ``update_success``."""
        self.stats.update_attempt.value += 1
        self.apply_load_assignment(cla, path)
        self.stats.update_success.value += 1

    def check_load_assignment(self, cla: Any, path: str = "") -> None:
        """Validate an assignment without applying it (``ConfigError`` with the field path)."""
        self._parse_assignment(cla, path, need_ip=True)

    def apply_load_assignment(self, cla: Any, path: str = "") -> None:
        """``update_load_assignment`` without the counting (the caller counts)."""
        endpoints = self._parse_assignment(cla, path, need_ip=True)
        op = cla.policy.overprovisioning_factor
        self.overprovisioning = (
            int(op.value)
            if cla.policy.HasField("overprovisioning_factor")
            else lbmod.DEFAULT_OVERPROVISIONING
        )
        self.update_hosts(
            Host(
                self,
                e.address,
                e.port,
                e.hostname,
                e.weight,
                e.healthy,
                e.degraded,
                e.locality,
                e.priority,
                e.locality_weight,
            )
            for e in endpoints
        )

    def _parse_assignment(self, cla: Any, path: str, need_ip: bool) -> list[_Endpoint]:
        pre = f"{path}." if path else ""
        if cla.named_endpoints:
            raise ConfigError(f"{pre}named_endpoints", "named endpoints are not supported")
        out: list[_Endpoint] = []
        for i, lle in enumerate(cla.endpoints):
            lpath = f"{pre}endpoints[{i}]"
            if lle.HasField("leds_cluster_locality_config") or lle.HasField("load_balancer_endpoints"):
                raise ConfigError(lpath, "LEDS endpoints are not supported")
            loc = lle.locality
            locality = (loc.region, loc.zone, loc.sub_zone)
            locality_weight = opt_uint(lle, "load_balancing_weight", 0)
            assert locality_weight is not None
            if lle.HasField("load_balancing_weight") and locality_weight < 1:
                # (Envoy's validation; leave it unset for a locality that takes no load)
                raise ConfigError(f"{lpath}.load_balancing_weight", "must be at least 1")
            for j, lbe in enumerate(lle.lb_endpoints):
                epath = f"{lpath}.lb_endpoints[{j}]"
                if lbe.WhichOneof("host_identifier") == "endpoint_name":
                    raise ConfigError(f"{epath}.endpoint_name", "named endpoints are not supported")
                ep = lbe.endpoint
                apath = f"{epath}.endpoint.address"
                if not ep.HasField("address"):
                    raise ConfigError(apath, "address is required")
                kind, host, port = address_of(ep.address, apath)
                if kind == "pipe":
                    if not need_ip:
                        raise ConfigError(f"{apath}.pipe", f"{self.type} clusters need socket addresses")
                    port = None
                else:
                    ppath = f"{apath}.socket_address"
                    if not port:
                        raise ConfigError(f"{ppath}.port_value", "port is required and must not be 0")
                    if ep.address.socket_address.resolver_name:
                        raise ConfigError(f"{ppath}.resolver_name", "custom resolvers are not supported")
                    if need_ip and ip_family(host) is None:
                        raise ConfigError(
                            f"{ppath}.address",
                            f"{self.type} clusters need IP addresses, got {host!r} "
                            "(use type STRICT_DNS or LOGICAL_DNS for host names)",
                        )
                weight = opt_uint(lbe, "load_balancing_weight", 1)
                assert weight is not None
                if weight < 1:
                    raise ConfigError(f"{epath}.load_balancing_weight", "must be at least 1")
                status = lbe.health_status
                out.append(
                    _Endpoint(
                        address=host,
                        port=port,
                        hostname=ep.hostname or host,
                        weight=weight,
                        healthy=status not in _UNHEALTHY,
                        degraded=status == _HS.DEGRADED,
                        locality=locality,
                        priority=lle.priority,
                        locality_weight=locality_weight,
                    )
                )
        return out

    # -- DNS ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """STATIC/EDS: nothing. DNS types: first resolution round (succeeded or failed), then
        periodic refresh in a background task. ORIGINAL_DST: start the host cleanup timer.
        Active health checks start here (when the manager gave a connect function), and their
        first round is awaited after the first DNS round; outlier detection's interval timer
        starts too."""
        if self.started:
            return
        self.started = True
        hc = self.health_checker
        if hc is not None and self.health_connect is not None and not self.retired:
            hc.start(asyncio.get_running_loop(), self.health_connect)
        if self.outlier is not None:
            self.outlier.start(asyncio.get_running_loop())
        if self.type in ("STRICT_DNS", "LOGICAL_DNS"):
            if self._task is not None:
                return
            ok = await self.refresh()
            if self.retired:
                return
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop(ok))
        elif self.type == "ORIGINAL_DST" and self._od_timer is None:
            self._od_timer = asyncio.get_running_loop().call_later(self.cleanup_interval, self._od_sweep)
        if hc is not None:
            await hc.initialize([t for t in self.init_targets if t is not hc.init])

    def stop(self) -> None:
        """Stop the background work (DNS refresh, ORIGINAL_DST sweeps, health checks, outlier
        intervals)."""
        if self.health_checker is not None:
            self.health_checker.stop()
        if self.outlier is not None:
            self.outlier.stop()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._od_timer is not None:
            self._od_timer.cancel()
            self._od_timer = None

    def retire(self) -> None:
        """Replaced or removed: stop the timers and drain every host's pools. Requests already
        routed here finish on their connections (a late retry still gets a connection, which
        closes after its request); nothing here is reused, so the cluster is freed once the last
        request on it ends."""
        self.retired = True
        self.stop()
        if self.outlier is not None:
            self.outlier.close()
        for h in list(self.hosts) + list(self._od_hosts.values()):
            h.removed = True
            h.drain_pools()
        self.on_membership_change = []

    async def _refresh_loop(self, ok: bool) -> None:
        failures = 0 if ok else 1
        while True:
            if failures and self.dns_failure_refresh_rate is not None:
                base, cap = self.dns_failure_refresh_rate
                delay = min(base * 2 ** (failures - 1), cap)
            else:
                delay = self.dns_refresh_rate
            if self.dns_jitter:
                delay += self._rng.random() * self.dns_jitter
            await asyncio.sleep(delay)
            try:
                ok = await self.refresh()
            except Exception as e:  # a failing membership callback must not end the refreshes
                self.last_dns_error = f"refresh failed: {type(e).__name__}: {e}"
                ok = False
            failures = 0 if ok else failures + 1

    async def refresh(self) -> bool:
        """One resolution round over every endpoint; True when all lookups succeeded.
        ``update_attempt`` / ``update_success`` / ``update_failure`` count per lookup."""
        if self._resolver is None:
            self._resolver = Resolver()
        results = await asyncio.gather(*(self._resolve(i, e) for i, e in enumerate(self._endpoints)))
        if self.type == "LOGICAL_DNS":
            self._apply_logical()
        else:
            self._apply_strict()
        return all(results)

    async def _resolve(self, i: int, ep: _Endpoint) -> bool:
        st = self.stats
        st.update_attempt.value += 1
        assert self._resolver is not None
        try:
            answer = await self._resolver.resolve(ep.address, self.dns_lookup_family)
        except DnsError as e:
            st.update_failure.value += 1
            self.last_dns_error = str(e)
            return False
        st.update_success.value += 1
        self._resolved[i] = answer
        return True

    def _apply_strict(self) -> None:
        hosts = []
        for i, ep in enumerate(self._endpoints):
            for _fam, ip in self._resolved.get(i, ()):
                hosts.append(
                    Host(
                        self,
                        ip,
                        ep.port,
                        ep.hostname,
                        ep.weight,
                        ep.healthy,
                        ep.degraded,
                        ep.locality,
                        ep.priority,
                        ep.locality_weight,
                    )
                )
        self.update_hosts(hosts)

    def _apply_logical(self) -> None:
        answer = self._resolved.get(0)
        if not answer:
            return  # nothing resolved yet, or an empty answer: keep the current address
        ep = self._endpoints[0]
        ip = answer[0][1]
        if self.hosts:
            h = self.hosts[0]
            if h.address != ip:
                h.set_address(ip, ep.port)  # logical host: same object, new connections follow
            return
        self.update_hosts(
            [
                Host(
                    self,
                    ip,
                    ep.port,
                    ep.hostname,
                    ep.weight,
                    ep.healthy,
                    ep.degraded,
                    ep.locality,
                    ep.priority,
                    ep.locality_weight,
                )
            ]
        )

    # -- ORIGINAL_DST ---------------------------------------------------------------------------

    def original_dst_host(self, address: str, port: int) -> Host:
        """The host for a connection's original destination (ORIGINAL_DST clusters): made on
        first use, kept while used, dropped by the sweep after ``cleanup_interval`` idle."""
        key = (address, port)
        h = self._od_hosts.get(key)
        if h is None:
            h = Host(self, address, port)
            if len(self._od_hosts) >= MAX_ORIGINAL_DST_HOSTS:
                # Full: drop what the next sweep would, keeping the marks of hosts used since
                # the last one (a burst of new destinations must not evict the busy ones).
                self._od_sweep(reschedule=False, keep_marks=True)
            if len(self._od_hosts) >= MAX_ORIGINAL_DST_HOSTS or self.retired:
                # Over the bound (every cached host busy) or retired: serve this connection
                # with a host nothing keeps, whose pools close with its last request.
                h.removed = True
                return h
            self._od_hosts[key] = h
            self.hosts.append(h)
            self.stats.membership_change.value += 1
            self._rebuild()
        self._od_used.add(h)
        return h

    def _od_sweep(self, reschedule: bool = True, keep_marks: bool = False) -> None:
        # A host survives a sweep if used since the previous one or still carrying traffic:
        # requests in flight, or connections of its own (tcp_proxy sessions). Idle keep-alive
        # connections in its pools do not keep it (as in Envoy, an unused host goes; its pools
        # drain), or every destination ever seen would stay until the pools' idle timeout.
        gone = [
            h
            for h in self._od_hosts.values()
            if h not in self._od_used
            and not h.active_rq
            and not (h.active_cx and h.pool is None and h.h2pool is None and not h.rpcpool)
        ]
        if not keep_marks:
            self._od_used.clear()
        if gone:
            for h in gone:
                del self._od_hosts[h.key]
            self.update_hosts(list(self._od_hosts.values()))
        if reschedule and self._od_timer is not None:
            self._od_timer = asyncio.get_running_loop().call_later(self.cleanup_interval, self._od_sweep)

    def __repr__(self) -> str:
        return f"<Cluster {self.name} {self.type} hosts={len(self.hosts)}>"


class OriginalDstCluster(Cluster):
    """``type: ORIGINAL_DST`` (``lb_policy: CLUSTER_PROVIDED``): the upstream host is where the
    downstream connection was going before an iptables REDIRECT (Istio's
    ``PassthroughCluster``), or, with ``original_dst_lb_config.use_http_header``, the ``ip:port``
    in the request's ``x-envoy-original-dst-host`` (or ``http_header_name``) header. A header
    that is not an ``ip:port`` counts ``original_dst_host_invalid`` and the connection's
    destination is used. No destination at all (the connection was not redirected): no host.
    Its own subclass so that other clusters' ``choose_host`` never looks at the context."""

    def choose_host(
        self, exclude: Collection[Host] | None = None, context: LbContext | None = None
    ) -> Host | None:
        if context is None:
            return None
        dst: tuple[str, int] | None = None
        name = self.original_dst_header
        if name is not None:
            v = context.downstream_header(name)
            if v is not None:
                dst = parse_ip_port(v)
                if dst is None:
                    self.stats.original_dst_host_invalid.value += 1
        if dst is None:
            dst = context.downstream_local_address()
            if dst is None:
                return None
        port = self.original_dst_port_override
        return self.original_dst_host(dst[0], port if port is not None else dst[1])


def parse_ip_port(v: bytes) -> tuple[str, int] | None:
    """``b"10.1.2.3:80"`` / ``b"[::1]:80"`` -> ``(ip, port)``; ``None`` for anything else (host
    names included: the override names an address, it is not resolved)."""
    try:
        text = v.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or len(port_s) > 5:
        return None
    port = int(port_s)
    if not 0 < port < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        fam = socket.AF_INET6
    elif ":" in host:
        return None  # IPv6 needs brackets
    else:
        fam = socket.AF_INET
    try:
        packed = socket.inet_pton(fam, host)
    except OSError:
        return None
    return socket.inet_ntop(fam, packed), port


# -- compilation ----------------------------------------------------------------------------------


def _lb_policy(proto: Any, c: Cluster) -> str:
    if proto.HasField("load_balancing_policy"):
        # Envoy: the first policy in the list that the proxy supports is used.
        names = []
        for i, pol in enumerate(proto.load_balancing_policy.policies):
            tc = pol.typed_extension_config.typed_config
            type_name = tc.type_url.rpartition("/")[2]
            names.append(type_name)
            policy = _LB_EXTENSIONS.get(type_name)
            if policy is None:
                continue
            tpath = f"load_balancing_policy.policies[{i}].typed_extension_config.typed_config"
            if policy in ("ROUND_ROBIN", "RANDOM"):
                _policy_locality(tc, policy, c, tpath)
            if policy == "LEAST_REQUEST":
                from envoy.extensions.load_balancing_policies.least_request.v3 import (
                    least_request_pb2,
                )

                lr = least_request_pb2.LeastRequest()
                if not tc.Unpack(lr):
                    raise ConfigError(f"load_balancing_policy.policies[{i}]", "cannot decode LeastRequest")
                _least_request(lr, c, tpath)
                _locality_config(lr.locality_lb_config, c, f"{tpath}.locality_lb_config")
            return policy
        raise ConfigError(
            "load_balancing_policy.policies",
            f"no supported policy among {names}; supported: round_robin, random, least_request",
        )
    return cluster_pb2.Cluster.LbPolicy.Name(proto.lb_policy)


def _locality_config(cfg: Any, c: Cluster, path: str) -> None:
    """``locality_weighted_lb_config`` / ``zone_aware_lb_config`` of a ``CommonLbConfig`` or a
    policy's ``LocalityLbConfig`` (a oneof in both)."""
    if cfg.HasField("locality_weighted_lb_config"):
        c.locality_weighted = True
    elif cfg.HasField("zone_aware_lb_config"):
        c.notice(
            f"{path}.zone_aware_lb_config: zone-aware routing is not implemented (it needs the local "
            "cluster, cluster_manager.local_cluster_name); hosts are balanced without zones; ignored"
        )


def _policy_locality(tc: Any, policy: str, c: Cluster, path: str) -> None:
    """A ROUND_ROBIN or RANDOM policy extension's own options."""
    if policy == "ROUND_ROBIN":
        from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2

        cfg: Any = round_robin_pb2.RoundRobin()
    else:
        from envoy.extensions.load_balancing_policies.random.v3 import random_pb2

        cfg = random_pb2.Random()
    if not tc.Unpack(cfg):
        raise ConfigError(path, f"cannot decode {cfg.DESCRIPTOR.name}")
    if policy == "ROUND_ROBIN" and cfg.HasField("slow_start_config"):
        c.notice(f"{path}.slow_start_config: slow start is not implemented, ignored")
    _locality_config(cfg.locality_lb_config, c, f"{path}.locality_lb_config")


def _least_request(cfg: Any, c: Cluster, path: str) -> None:
    choice = opt_uint(cfg, "choice_count", 2)
    assert choice is not None
    if choice < 2:
        raise ConfigError(f"{path}.choice_count", "must be at least 2")
    c.choice_count = choice
    if cfg.HasField("active_request_bias"):
        bias = cfg.active_request_bias.default_value
        if bias < 0:
            raise ConfigError(f"{path}.active_request_bias", "must not be negative")
        c.active_request_bias = bias
    if cfg.HasField("slow_start_config"):
        c.notice(f"{path}.slow_start_config: slow start is not implemented, ignored")


def _protocol_options(proto: Any, c: Cluster) -> None:
    # Legacy cluster-level fields first; the typed extension options override them.
    if proto.HasField("common_http_protocol_options"):
        _common_http(proto.common_http_protocol_options, c, "common_http_protocol_options")
    if proto.HasField("http2_protocol_options"):
        c.http2 = True
        c.http2_protocol_options = proto.http2_protocol_options
    if proto.protocol_selection == cluster_pb2.Cluster.USE_DOWNSTREAM_PROTOCOL:
        c.http2 = None
    for key in sorted(proto.typed_extension_protocol_options):
        anyv = proto.typed_extension_protocol_options[key]
        path = f'typed_extension_protocol_options["{key}"]'
        if key != HTTP_PROTOCOL_OPTIONS:
            c.notice(f"{path}: protocol options {key!r} are not used, ignored")
            continue
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        if not anyv.Is(opts.DESCRIPTOR) or not anyv.Unpack(opts):
            raise ConfigError(path, f"expected {HTTP_PROTOCOL_OPTIONS}, got {anyv.type_url!r}")
        if opts.HasField("common_http_protocol_options"):
            _common_http(opts.common_http_protocol_options, c, f"{path}.common_http_protocol_options")
        which = opts.WhichOneof("upstream_protocol_options")
        if which == "explicit_http_config":
            e = opts.explicit_http_config
            kind = e.WhichOneof("protocol_config")
            if kind == "http3_protocol_options":
                raise ConfigError(
                    f"{path}.explicit_http_config.http3_protocol_options",
                    "HTTP/3 upstreams are not supported",
                )
            c.http2 = kind == "http2_protocol_options"
            c.http2_protocol_options = e.http2_protocol_options if c.http2 else None
        elif which == "use_downstream_protocol_config":
            u = opts.use_downstream_protocol_config
            if u.HasField("http3_protocol_options"):
                raise ConfigError(
                    f"{path}.use_downstream_protocol_config.http3_protocol_options",
                    "HTTP/3 upstreams are not supported",
                )
            c.http2 = None
            c.http2_protocol_options = (
                u.http2_protocol_options if u.HasField("http2_protocol_options") else None
            )
        elif which == "auto_config":
            c.http2 = False
            c.notice(f"{path}.auto_config: ALPN protocol selection is not implemented; using HTTP/1.1")
        if opts.http_filters:
            c.notice(f"{path}.http_filters: upstream HTTP filters are not implemented, ignored")


def _common_http(o: Any, c: Cluster, path: str) -> None:
    if o.HasField("idle_timeout"):
        t = opt_duration_s(o, "idle_timeout")
        c.idle_timeout = t if t else None  # Envoy: 0 disables the idle timeout
    mrpc = opt_uint(o, "max_requests_per_connection")
    if mrpc is not None:
        c.max_requests_per_connection = mrpc or None
    if o.HasField("max_connection_duration"):
        c.max_connection_duration = opt_duration_s(o, "max_connection_duration") or None


_RAW_BUFFER_TYPE = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"


def _is_raw_buffer(ts: Any) -> bool:
    tname = ts.typed_config.type_url.rsplit("/", 1)[-1] if ts.HasField("typed_config") else ""
    return tname == _RAW_BUFFER_TYPE or (
        not tname and ts.name in ("envoy.transport_sockets.raw_buffer", "raw_buffer", "")
    )


# circuit breaker -> (live count, limit), as the gauges read them
_BREAKERS: dict[str, tuple[Callable[[Cluster], int], Callable[[Cluster], int]]] = {
    "cx": (lambda c: c.stats.upstream_cx_active.value - c.high.cx_active, lambda c: c.max_connections),
    "rq_pending": (
        lambda c: c.stats.upstream_rq_pending_active.value - c.high.pending_active,
        lambda c: c.max_pending_requests,
    ),
    "rq": (lambda c: c.stats.upstream_rq_active.value - c.high.rq_active, lambda c: c.max_requests),
    "rq_retry": (lambda c: c.active_retries, lambda c: c.retries_limit()),
}
# the same for the HIGH priority (HighPriority)
_HIGH_BREAKERS: dict[str, tuple[Callable[[Cluster], int], Callable[[Cluster], int]]] = {
    "cx": (lambda c: c.high.cx_active, lambda c: c.high.max_connections),
    "rq_pending": (lambda c: c.high.pending_active, lambda c: c.high.max_pending_requests),
    "rq": (lambda c: c.high.rq_active, lambda c: c.high.max_requests),
    "rq_retry": (lambda c: c.high.active_retries, lambda c: c.high.retries_limit()),
}


def compile_cluster(
    proto: Any,
    store: Store,
    resolver: Resolver | None = None,
    rng: random.Random | None = None,
    transport_factory: TransportFactory | None = None,
) -> Cluster:
    """``envoy.config.cluster.v3.Cluster`` -> ``Cluster``. ``ConfigError`` paths are relative to
    the cluster (callers prefix them, e.g. ``static_resources.clusters[3]``). The
    ``transport_socket`` is compiled by ``transport_factory`` (built by net/); without one a
    cluster with a non-raw transport socket fails every connect instead of going plaintext."""
    if not proto.name:
        raise ConfigError("name", "cluster name is required")
    if proto.HasField("cluster_type"):
        raise ConfigError("cluster_type", f"custom cluster type {proto.cluster_type.name!r} is not supported")
    ctype = cluster_pb2.Cluster.DiscoveryType.Name(proto.type)
    c = (OriginalDstCluster if ctype == "ORIGINAL_DST" else Cluster)(
        proto.name,
        store,
        type=ctype,
        stat_name=proto.alt_stat_name or None,
        resolver=resolver,
        rng=rng,
    )
    c.proto = proto

    policy = _lb_policy(proto, c)
    if ctype == "ORIGINAL_DST":
        if policy != "CLUSTER_PROVIDED":
            raise ConfigError("lb_policy", "ORIGINAL_DST clusters need lb_policy CLUSTER_PROVIDED")
    elif policy == "CLUSTER_PROVIDED":
        raise ConfigError("lb_policy", "CLUSTER_PROVIDED is only valid for ORIGINAL_DST clusters")
    elif policy not in lbmod.POLICIES:
        raise ConfigError(
            "lb_policy", f"{policy} is not supported (supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM)"
        )
    c.lb_policy = policy
    if proto.HasField("least_request_lb_config") and policy == "LEAST_REQUEST":
        _least_request(proto.least_request_lb_config, c, "least_request_lb_config")

    ct = opt_duration_s(proto, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    assert ct is not None
    if ct <= 0:
        raise ConfigError("connect_timeout", "must be greater than 0")
    c.connect_timeout = ct
    limit = opt_uint(proto, "per_connection_buffer_limit_bytes", DEFAULT_BUFFER_LIMIT)
    assert limit is not None
    c.per_connection_buffer_limit = limit
    mrpc = opt_uint(proto, "max_requests_per_connection")
    if mrpc is not None:
        c.max_requests_per_connection = mrpc or None
    _protocol_options(proto, c)

    if proto.HasField("upstream_connection_options"):
        uco = proto.upstream_connection_options
        if uco.HasField("tcp_keepalive"):
            ka = uco.tcp_keepalive
            c.tcp_keepalive = (
                opt_uint(ka, "keepalive_probes"),
                opt_uint(ka, "keepalive_time"),
                opt_uint(ka, "keepalive_interval"),
            )

    track_remaining = high_remaining = False
    seen: set[int] = set()
    for i, th in enumerate(proto.circuit_breakers.thresholds):
        if th.priority in seen:
            continue  # Envoy: the first thresholds of a priority count
        seen.add(th.priority)
        tp = f"circuit_breakers.thresholds[{i}]"
        budget: tuple[float, int] | None = None
        if th.HasField("retry_budget"):
            rb = th.retry_budget
            pct = rb.budget_percent.value if rb.HasField("budget_percent") else 20.0
            if not 0.0 <= pct <= 100.0:
                raise ConfigError(f"{tp}.retry_budget.budget_percent", "must be between 0 and 100")
            budget = (pct / 100.0, opt_uint(rb, "min_retry_concurrency", 3) or 0)
        if th.priority != 0:  # HIGH
            hi = c.high
            hi.max_connections = opt_uint(th, "max_connections", 1024) or 0
            hi.max_pending_requests = opt_uint(th, "max_pending_requests", 1024) or 0
            hi.max_requests = opt_uint(th, "max_requests", 1024) or 0
            hi.max_retries = opt_uint(th, "max_retries", 3) or 0
            hi.retry_budget = budget
            high_remaining = th.track_remaining
            continue
        c.max_connections = opt_uint(th, "max_connections", 1024) or 0
        c.max_pending_requests = opt_uint(th, "max_pending_requests", 1024) or 0
        c.max_requests = opt_uint(th, "max_requests", 1024) or 0
        c.max_retries = opt_uint(th, "max_retries", 3) or 0
        c.retry_budget = budget
        track_remaining = th.track_remaining

    clb = proto.common_lb_config
    if clb.HasField("healthy_panic_threshold"):
        v = clb.healthy_panic_threshold.value
        if not 0 <= v <= 100:
            raise ConfigError("common_lb_config.healthy_panic_threshold", "must be between 0 and 100")
        c.panic_threshold = v
    _locality_config(clb, c, "common_lb_config")

    if proto.HasField("transport_socket"):
        ts = c.transport_socket = proto.transport_socket
        if transport_factory is not None:
            # Compiled now: a bad certificate or option is a config error at load time (with
            # its field path), not a failure of the first connection.
            c.transport = transport_factory(ts, c, "transport_socket")
            c.init_targets.extend(getattr(c.transport, "init_targets", ()))  # (SDS secrets)
        elif not _is_raw_buffer(ts):
            c.transport_error = "transport_socket was not compiled (no transport socket factory)"
    if proto.transport_socket_matches:
        c.notice("transport_socket_matches: not implemented, the cluster's transport_socket is used")
    if proto.health_checks:
        c.health_checker = compile_health_checks(proto.health_checks, c, rng)
        if c.health_checker is not None:
            c.init_targets.append(c.health_checker.init)  # (the first round: see health_check)
    for field, what in (
        ("lb_subset_config", "subset load balancing"),
        ("upstream_bind_config", "upstream_bind_config"),
        ("dns_resolvers", "custom DNS resolvers (the system resolver is used)"),
        ("typed_dns_resolver_config", "custom DNS resolvers (the system resolver is used)"),
        ("filters", "upstream network filters"),
    ):
        present = (
            len(getattr(proto, field)) > 0 if field in ("dns_resolvers", "filters") else proto.HasField(field)
        )
        if present:
            c.notice(f"{field}: {what} not implemented yet, ignored")

    if ctype in ("STRICT_DNS", "LOGICAL_DNS"):
        _dns_options(proto, c)
    elif ctype == "ORIGINAL_DST":
        if c.locality_weighted:
            c.notice(
                "common_lb_config.locality_weighted_lb_config: ORIGINAL_DST hosts have no localities; ignored"
            )
        od = proto.original_dst_lb_config
        if od.use_http_header:
            c.original_dst_header = (od.http_header_name or "x-envoy-original-dst-host").lower().encode()
        elif od.http_header_name:
            c.notice("original_dst_lb_config.http_header_name: use_http_header is off; ignored")
        if od.HasField("upstream_port_override"):
            p = od.upstream_port_override.value
            if not 0 < p < 65536:
                raise ConfigError("original_dst_lb_config.upstream_port_override", "must be a port (1-65535)")
            c.original_dst_port_override = p
        if od.HasField("metadata_key"):
            c.notice(
                "original_dst_lb_config.metadata_key: destinations from metadata are not supported; ignored"
            )
        c.cleanup_interval = (
            opt_duration_s(proto, "cleanup_interval", DEFAULT_CLEANUP_INTERVAL) or DEFAULT_CLEANUP_INTERVAL
        )

    if ctype == "EDS":
        c.eds_service_name = proto.eds_cluster_config.service_name or proto.name
        if proto.HasField("load_assignment"):
            c.notice("load_assignment: ignored for EDS clusters (endpoints come from EDS)")
    elif ctype == "ORIGINAL_DST":
        if proto.load_assignment.endpoints:
            raise ConfigError("load_assignment", "ORIGINAL_DST clusters must not have endpoints")
    elif proto.HasField("load_assignment"):
        eps = c._parse_assignment(proto.load_assignment, "load_assignment", need_ip=ctype == "STATIC")
        c.overprovisioning = _overprovisioning(proto.load_assignment)
        if ctype == "STATIC":
            c.update_hosts(
                Host(
                    c,
                    e.address,
                    e.port,
                    e.hostname,
                    e.weight,
                    e.healthy,
                    e.degraded,
                    e.locality,
                    e.priority,
                    e.locality_weight,
                )
                for e in eps
            )
        else:
            if ctype == "LOGICAL_DNS" and (
                len(proto.load_assignment.endpoints) != 1
                or len(proto.load_assignment.endpoints[0].lb_endpoints) != 1
            ):
                raise ConfigError(
                    "load_assignment",
                    "LOGICAL_DNS clusters must have exactly one locality with exactly one endpoint",
                )
            c._endpoints = eps
    elif ctype == "LOGICAL_DNS":
        raise ConfigError("load_assignment", "LOGICAL_DNS clusters must have exactly one endpoint")
    if proto.HasField("outlier_detection"):
        from moorline.upstream.outlier import compile_outlier

        c.outlier = compile_outlier(proto, c, rng)
    c.watches_responses = c.outlier is not None or c.health_checker is not None
    # Initialise gauges and the (empty) balancer even when no host was added.
    c._rebuild()
    # Last: a config refused above leaves the gauges reading the cluster it would replace.
    c.stats.bind_breakers(c)
    if track_remaining:
        c.stats.track_remaining(c)
    if high_remaining:
        c.stats.track_remaining(c, high=True)
    return c


def _overprovisioning(cla: Any) -> int:
    """An assignment's ``policy.overprovisioning_factor`` (percent; Envoy's default 140)."""
    if cla.HasField("policy") and cla.policy.HasField("overprovisioning_factor"):
        return int(cla.policy.overprovisioning_factor.value)
    return lbmod.DEFAULT_OVERPROVISIONING


class _ClusterNotices:
    """The TLS compiler's notice sink: notices go to the cluster, with paths relative to it."""

    def __init__(self, c: Cluster, prefix: str) -> None:
        self.c = c
        self.prefix = prefix

    def notice(self, msg: str) -> None:
        self.c.notice(msg[len(self.prefix) :] if msg.startswith(self.prefix) else msg)


def _dns_options(proto: Any, c: Cluster) -> None:
    rate = opt_duration_s(proto, "dns_refresh_rate", DEFAULT_DNS_REFRESH)
    assert rate is not None
    if rate <= 0.001:
        raise ConfigError("dns_refresh_rate", "must be greater than 1ms")
    c.dns_refresh_rate = rate
    if proto.HasField("dns_failure_refresh_rate"):
        fr = proto.dns_failure_refresh_rate
        base = opt_duration_s(fr, "base_interval", 0.0) or 0.0
        if base <= 0.001:
            raise ConfigError("dns_failure_refresh_rate.base_interval", "must be greater than 1ms")
        cap = opt_duration_s(fr, "max_interval", base * 10) or base * 10
        if cap < base:
            raise ConfigError("dns_failure_refresh_rate.max_interval", "must not be less than base_interval")
        c.dns_failure_refresh_rate = (base, cap)
    c.dns_jitter = opt_duration_s(proto, "dns_jitter", 0.0) or 0.0
    family = cluster_pb2.Cluster.DnsLookupFamily.Name(proto.dns_lookup_family)
    assert family in LOOKUP_FAMILIES
    c.dns_lookup_family = family
    if proto.respect_dns_ttl:
        c.notice("respect_dns_ttl: the system resolver gives no TTLs; dns_refresh_rate is used")
