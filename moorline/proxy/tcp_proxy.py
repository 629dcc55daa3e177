"""Network filter ``envoy.filters.network.tcp_proxy``: L4 proxying to a cluster.

Connection lifecycle (phases of ``_Session``):

1. **accept**: the listener hands over the downstream socket; pick the cluster (``cluster`` or a
   weighted pick from ``weighted_clusters``, per connection) and look it up in the cluster
   manager *now* (clusters may arrive later through xDS; Envoy does not check at config time).
   No such cluster: close, ``downstream_cx_no_route``.
2. **connect**: ``cluster.choose_host(exclude, self)`` (the session is the load balancer's
   context: an ORIGINAL_DST cluster such as Istio's ``PassthroughCluster`` connects to the
   connection's original destination) and a non-blocking connect with the cluster's
   ``connect_timeout`` (``moorline.net.upstream.connect_socket``: only net/ touches sockets). The downstream socket is not read meanwhile, so the kernel's buffers and
   the client's TCP window are the backpressure. A failure or timeout retries with another host
   (the failed ones excluded) up to ``max_connect_attempts``; then the downstream is closed.
   Before each attempt the cluster's ``max_connections`` circuit breaker is checked against
   ``upstream_cx_active`` (HTTP pools and tcp_proxy sessions alike): over it the downstream is
   closed without connecting (``cluster.<name>.upstream_cx_overflow``), and no further
   attempt is made. A failed attempt gives its connection back first, so a retry
   is checked against the count without it.
3. **relay**: ``moorline.net.tcp_relay`` moves the bytes (``os.splice`` by default, userspace copy
   with ``MOORLINE_NO_SPLICE=1`` or ``use_splice=False``), with half-close, idle timeout and
   ``max_downstream_connection_duration``. When the chain terminates TLS (``info.tls``) or the
   cluster originates it, ``moorline.net.tls.StreamRelay`` relays through asyncio SSL transports
   instead (TLS passthrough routed by SNI via tls_inspector keeps splice).
4. **end**: stats, then ``ConnInfo.notify_closed()`` for the listener's bookkeeping.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import socket
from collections.abc import Callable
from typing import Any

from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.config.util import opt_duration_s, opt_uint
from moorline.net.conn_info import ConnInfo
from moorline.net.tcp_relay import CLOSE_IDLE, Relay, relay, splice_supported
from moorline.net.tls import StreamRelay
from moorline.net.upstream import connect_socket
from moorline.observability.stats import Counter
from moorline.upstream import outlier as _od

log = logging.getLogger("moorline.tcp_proxy")

TCP_PROXY_TYPE = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
DEFAULT_IDLE_TIMEOUT = 3600.0  # Envoy: 1 hour; an explicit 0 disables it
DEFAULT_CONNECT_TIMEOUT = 5.0


class TcpProxyStats:
    """``tcp.<stat_prefix>.*`` (Envoy's names)."""

    __slots__ = (
        "downstream_cx_no_route",
        "downstream_cx_rx_bytes_total",
        "downstream_cx_total",
        "downstream_cx_tx_bytes_total",
        "idle_timeout",
        "max_downstream_connection_duration",
        "upstream_cx_connect_attempts_exceeded",
    )

    def __init__(self, scope: Any) -> None:
        c = scope.counter
        self.downstream_cx_total: Counter = c("downstream_cx_total")
        self.downstream_cx_no_route: Counter = c("downstream_cx_no_route")
        self.downstream_cx_rx_bytes_total: Counter = c("downstream_cx_rx_bytes_total")
        self.downstream_cx_tx_bytes_total: Counter = c("downstream_cx_tx_bytes_total")
        self.idle_timeout: Counter = c("idle_timeout")
        self.max_downstream_connection_duration: Counter = c("max_downstream_connection_duration")
        self.upstream_cx_connect_attempts_exceeded: Counter = c("upstream_cx_connect_attempts_exceeded")


class TcpProxy:
    """Compiled ``TcpProxy`` config; the terminal filter of its chain (one per chain)."""

    terminal = True

    def __init__(self, cfg: Any, ctx: Any, path: str, *, use_splice: bool | None = None) -> None:
        self.ctx = ctx
        if not cfg.stat_prefix:
            raise ConfigError(f"{path}.stat_prefix", "stat_prefix is required")
        self.stat_prefix = cfg.stat_prefix
        spec = cfg.WhichOneof("cluster_specifier")
        self.cluster: str | None = None
        self._names: list[str] = []
        self._cum: list[int] = []
        if spec == "cluster":
            if not cfg.cluster:
                raise ConfigError(f"{path}.cluster", "cluster name is required")
            self.cluster = cfg.cluster
        elif spec == "weighted_clusters":
            total = 0
            wc = cfg.weighted_clusters.clusters
            if not len(wc):
                raise ConfigError(f"{path}.weighted_clusters.clusters", "at least one cluster is required")
            for i, c in enumerate(wc):
                if not c.name:
                    raise ConfigError(
                        f"{path}.weighted_clusters.clusters[{i}].name", "cluster name is required"
                    )
                if c.weight < 1:
                    raise ConfigError(
                        f"{path}.weighted_clusters.clusters[{i}].weight", "weight must be at least 1"
                    )
                total += c.weight
                self._names.append(c.name)
                self._cum.append(total)
        else:
            raise ConfigError(path, "one of cluster or weighted_clusters is required")
        self.idle_timeout: float | None = opt_duration_s(cfg, "idle_timeout", DEFAULT_IDLE_TIMEOUT) or None
        self.max_connect_attempts = max(1, opt_uint(cfg, "max_connect_attempts", 1) or 1)
        self.max_duration: float | None = (
            opt_duration_s(cfg, "max_downstream_connection_duration", None) or None
        )
        if cfg.HasField("tunneling_config"):
            if not getattr(ctx, "in_internal_listener", False):
                raise ConfigError(f"{path}.tunneling_config", "tunneling over HTTP is not supported yet")
            ctx.notice(
                f"{path}.tunneling_config: tunneling over HTTP is not supported (internal listener); ignored"
            )
        for field, why in (
            ("on_demand", "on-demand cluster discovery is not supported"),
            ("metadata_match", "subset load balancing is not supported"),
            ("downstream_idle_timeout", "only idle_timeout is supported"),
            ("upstream_idle_timeout", "only idle_timeout is supported"),
            ("backoff_options", "connect attempts are retried at once"),
            ("max_downstream_connection_duration_jitter_percentage", "no jitter is applied"),
        ):
            if cfg.HasField(field):
                ctx.notice(f"{path}.{field}: ignored ({why})")
        if len(cfg.access_log):
            ctx.notice(f"{path}.access_log: tcp_proxy access logs are not supported yet; ignored")
        if len(cfg.hash_policy):
            ctx.notice(f"{path}.hash_policy: ignored (hash load balancers are not used by tcp_proxy yet)")
        self.use_splice = splice_supported() if use_splice is None else use_splice
        self.stats = TcpProxyStats(ctx.stats.scope(f"tcp.{self.stat_prefix}."))
        self.sessions: set[_Session] = set()  # live connections, for close_all() at shutdown
        self._rng = random.Random()

    def pick_cluster(self) -> str:
        if self.cluster is not None:
            return self.cluster
        r = self._rng.random() * self._cum[-1]
        return self._names[bisect.bisect_right(self._cum, r)]

    def on_accept(self, sock: socket.socket, info: ConnInfo) -> None:
        self.stats.downstream_cx_total.value += 1
        if info.filters and info.tls is None and not info.admit():
            # Refused by a connection filter (network RBAC) before any upstream work. With TLS
            # the filters are asked after the handshake instead (StreamRelay ``admit``).
            sock.close()
            info.notify_closed()
            return
        name = self.pick_cluster()
        cm = self.ctx.cluster_manager
        cluster = cm.get(name) if cm is not None else None
        if cluster is None:
            self.stats.downstream_cx_no_route.value += 1
            sock.close()
            info.notify_closed()
            return
        s = _Session(self, asyncio.get_running_loop(), sock, info, cluster)
        self.sessions.add(s)
        s.connect_next()

    def active_connections(self) -> int:
        """Live downstream connections (the server waits for them to end while draining)."""
        return len(self.sessions)

    def close_all(self) -> None:
        """Close every live connection (server stop)."""
        for s in list(self.sessions):
            s.close()


class _Session:
    """One downstream connection and its upstream."""

    __slots__ = (
        "_cancel_connect",
        "_connect_token",
        "_duration_handle",
        "_started",
        "attempts",
        "closed",
        "cluster",
        "down",
        "failed",
        "host",
        "info",
        "loop",
        "proxy",
        "relay",
        "up",
    )

    def __init__(
        self,
        proxy: TcpProxy,
        loop: asyncio.AbstractEventLoop,
        down: socket.socket,
        info: ConnInfo,
        cluster: Any,
    ) -> None:
        self.proxy = proxy
        self.loop = loop
        self.down: socket.socket | None = down
        self.info = info
        self.cluster = cluster
        self.attempts = 0
        self.failed: set[Any] = set()
        self.host: Any = None
        self.up: socket.socket | None = None
        self.relay: Relay | StreamRelay | None = None
        self.closed = False
        self._cancel_connect: Callable[[], None] | None = None
        self._connect_token: object | None = None
        self._duration_handle: asyncio.TimerHandle | None = None
        self._started = 0.0

    # -- LbContext (upstream.api): only ORIGINAL_DST clusters ask --

    def downstream_local_address(self) -> tuple[str, int] | None:
        info = self.info
        return info.local if info.local_restored and isinstance(info.local, tuple) else None

    def downstream_header(self, name: bytes) -> bytes | None:
        return None

    # -- connect phase --

    def connect_next(self) -> None:
        cluster = self.cluster
        cs = cluster.stats
        self.attempts += 1
        if cs.upstream_cx_active.value - cluster.high.cx_active >= cluster.max_connections:
            # Each session is one upstream connection at DEFAULT priority, counted in the same
            # upstream_cx_active the HTTP pools count (less the connections HIGH requests
            # opened): over max_connections the downstream is closed at once, no further attempt.
            cs.upstream_cx_overflow.value += 1
            self._end_downstream()
            return
        host = cluster.choose_host(self.failed or None, self)
        if host is None and self.failed:
            host = cluster.choose_host(None, self)  # every host failed once: any will do
        if host is None:
            c = getattr(cs, "upstream_cx_none_healthy", None)
            if c is not None:
                c.value += 1
            self._end_downstream()
            return
        self.host = host
        cs.upstream_cx_total.value += 1
        cs.upstream_cx_active.value += 1
        if hasattr(host, "active_cx"):
            host.active_cx += 1
            host.stats_cx_total += 1
        self._started = self.loop.time()
        timeout = getattr(cluster, "connect_timeout", None) or DEFAULT_CONNECT_TIMEOUT
        # The connect may finish before connect_socket returns (and start the next attempt):
        # keep its cancel function only while this very attempt is still in progress.
        token = self._connect_token = object()
        cancel = connect_socket(
            self.loop, host, timeout, getattr(cluster, "tcp_keepalive", None), self._on_connect_done
        )
        if self._connect_token is token:
            self._cancel_connect = cancel

    def _on_connect_done(
        self, sock: socket.socket | None, err: BaseException | None, timed_out: bool
    ) -> None:
        self._cancel_connect = None
        self._connect_token = None
        od = getattr(self.cluster, "outlier", None)
        if od is not None:
            od.put_result(
                self.host,
                _od.CONNECT_SUCCESS_FINAL
                if sock is not None
                else _od.TIMEOUT
                if timed_out
                else _od.CONNECT_FAILED,
            )
        if sock is None:
            if timed_out:
                self.cluster.stats.upstream_cx_connect_timeout.value += 1
            self._connect_failed(timed_out)
            return
        self.up = sock
        self._connected()

    def _connect_failed(self, timed_out: bool) -> None:
        cs = self.cluster.stats
        cs.upstream_cx_connect_fail.value += 1
        self._upstream_gone()
        host = self.host
        if hasattr(host, "stats_cx_connect_fail"):
            host.stats_cx_connect_fail += 1
        self.failed.add(host)
        if self.closed:
            return
        if self.attempts < self.proxy.max_connect_attempts:
            self.connect_next()
            return
        self.proxy.stats.upstream_cx_connect_attempts_exceeded.value += 1
        c = getattr(cs, "upstream_cx_connect_attempts_exceeded", None)
        if c is not None:
            c.value += 1
        self._end_downstream()

    def _upstream_gone(self) -> None:
        """Bookkeeping for an upstream connection that ended (failed or after relaying)."""
        cs = self.cluster.stats
        cs.upstream_cx_active.value -= 1
        cs.upstream_cx_destroy.value += 1
        host = self.host
        if hasattr(host, "active_cx"):
            host.active_cx -= 1
        if self.up is not None:
            self.up.close()
            self.up = None

    # -- relay phase --

    def _connected(self) -> None:
        up = self.up
        down = self.down
        assert up is not None and down is not None
        cs = self.cluster.stats
        h = getattr(cs, "upstream_cx_connect_ms", None)
        if h is not None:
            h.record((self.loop.time() - self._started) * 1000.0)
        proxy = self.proxy
        limit = self.info.buffer_limit
        climit = getattr(self.cluster, "per_connection_buffer_limit", None)
        if climit:
            limit = min(limit, climit)
        st = proxy.stats
        self._started = self.loop.time()
        err = getattr(self.cluster, "transport_error", None)
        if err:
            log.warning("tcp_proxy %s: cluster %s: %s", proxy.stat_prefix, self.cluster.name, err)
            self._upstream_gone()
            self._end_downstream()
            return
        up_tls = getattr(self.cluster, "transport", None)
        if self.info.tls is not None or up_tls is not None:
            # TLS on either side: the bytes must pass through userspace (no splice).
            self.relay = StreamRelay(
                self.loop,
                down,
                up,
                down_tls=self.info.tls,
                up_tls=up_tls,
                up_host=self.host,
                info=self.info,
                buffer_limit=limit,
                idle_timeout=proxy.idle_timeout,
                on_close=self._relay_closed,
                counters_a_to_b=(st.downstream_cx_rx_bytes_total, cs.upstream_cx_tx_bytes_total),
                counters_b_to_a=(st.downstream_cx_tx_bytes_total, cs.upstream_cx_rx_bytes_total),
                admit=self.info.admit if self.info.filters else None,
            )
            if proxy.max_duration:
                self._duration_handle = self.loop.call_later(proxy.max_duration, self._on_max_duration)
            return
        self.relay = relay(
            self.loop,
            down,
            up,
            use_splice=proxy.use_splice,
            buffer_limit=limit,
            idle_timeout=proxy.idle_timeout,
            on_close=self._relay_closed,
            counters_a_to_b=(st.downstream_cx_rx_bytes_total, cs.upstream_cx_tx_bytes_total),
            counters_b_to_a=(st.downstream_cx_tx_bytes_total, cs.upstream_cx_rx_bytes_total),
        )
        if proxy.max_duration:
            self._duration_handle = self.loop.call_later(proxy.max_duration, self._on_max_duration)

    def _on_max_duration(self) -> None:
        self._duration_handle = None
        if self.relay is not None and not self.relay.closed:
            self.proxy.stats.max_downstream_connection_duration.value += 1
            self.relay.close()

    def _relay_closed(self, a_to_b: int, b_to_a: int) -> None:
        # The relay closed both sockets already.
        self.up = None
        self.down = None
        if self._duration_handle is not None:
            self._duration_handle.cancel()
            self._duration_handle = None
        r = self.relay
        if r is not None and r.close_reason == CLOSE_IDLE:
            self.proxy.stats.idle_timeout.value += 1
        h = getattr(self.cluster.stats, "upstream_cx_length_ms", None)
        if h is not None:
            h.record((self.loop.time() - self._started) * 1000.0)
        self._upstream_gone()
        self._finish()

    # -- end --

    def _end_downstream(self) -> None:
        if self.down is not None:
            self.down.close()
            self.down = None
        self._finish()

    def _finish(self) -> None:
        self.closed = True
        self.proxy.sessions.discard(self)
        self.info.notify_closed()

    def close(self) -> None:
        if self.closed:
            return
        if self.relay is not None:
            self.relay.close()  # -> _relay_closed -> _finish
            return
        # Still connecting.
        cancel = self._cancel_connect
        if cancel is not None:
            self._cancel_connect = None
            self._connect_token = None
            cancel()
            self._upstream_gone()
        self._end_downstream()


def _factory(cfg: Any, ctx: Any, path: str) -> TcpProxy:
    cpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(cpath, "typed_config is required")
    if type(cfg).__name__ == "Any" and hasattr(cfg, "Unpack"):
        # Raw google.protobuf.Any (config loader not in use): decode it here.
        msg = tcp_proxy_pb2.TcpProxy()
        if not cfg.Unpack(msg):
            raise ConfigError(cpath, f"expected {TCP_PROXY_TYPE}, got {cfg.type_url}")
        cfg = msg
    if getattr(getattr(cfg, "DESCRIPTOR", None), "full_name", None) != TCP_PROXY_TYPE:
        raise ConfigError(cpath, f"expected {TCP_PROXY_TYPE}")
    return TcpProxy(cfg, ctx, cpath)


registry.register(
    "network",
    ["envoy.filters.network.tcp_proxy", "envoy.tcp_proxy"],
    ["type.googleapis.com/" + TCP_PROXY_TYPE],
    _factory,
)
