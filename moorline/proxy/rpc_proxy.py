"""Network filter ``moorline.filters.network.rpc_proxy``: x-protocol RPC proxying (Bolt, Dubbo...).

Configured with a ``TypedStruct`` (``xds.type.v3`` or ``udpa.type.v1``) whose ``type_url`` is
``type.googleapis.com/moorline.filters.network.rpc_proxy.v1.RpcProxy``; the config loader hands
its ``value`` over as a dict (``OpaqueAny``), compiled here once (``ConfigError`` paths under
``...typed_config.value``)::

    stat_prefix: rpc            # required: stats under rpc_proxy.<stat_prefix>.
    protocol: bolt              # a registered codec name, or auto (sniffed per connection)
    routes:                     # first match wins
    - match: {service: {exact: ...}, method: {prefix: ...}, headers: [{name: n, exact: v}]}
      route:
        cluster: c              # or weighted_clusters: {clusters: [{name: a, weight: 1}, ...]}
        timeout: 3s             # default: the frame's own timeout, else 15s; 0s: none
        retry_policy: {num_retries: 1, retry_on: [connect_failure, retriable_status]}
    access_log: [...]           # Envoy AccessLog configs; %RPC_SERVICE% %RPC_METHOD% ...
    max_pending_per_connection: 1000
    idle_timeout: 3600s   # no request in flight and no byte received: closed (0s: never)

Per request (``ActiveRpc``, a plain object: no Task or Future; one loop timer for its timeout):
route by service / method / headers (the frame's headers are decoded only when a route asks),
pick a cluster (weighted: per request), a host (``cluster.choose_host``, excluding the hosts a
retry already tried; retries within the cluster's ``max_retries``), and hand the request to the host's pool (``moorline.stream.rpc``). The
response goes back with the downstream request id restored. The proxy answers itself, through
``codec.local_reply``, with ``NO_ROUTE`` (no route, unknown cluster), ``NO_HEALTHY_UPSTREAM``,
``OVERFLOW`` (circuit breakers, ``max_pending_per_connection``), ``TIMEOUT`` and
``UPSTREAM_RESET`` (connect failure, connection lost mid-request). Oneways get no reply.

Outlier detection hears what the HTTP router reports: success / failure of each response
(``put_http`` 200, 503 for a retriable status, 500 for other errors), connect failures and
resets (``CONNECT_FAILED``) and timeouts (``TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.net.conn_info import ConnInfo
from moorline.net.tls import serve_accepted
from moorline.observability.stats import Counter, Gauge
from moorline.observability.stream_info import (
    DOWNSTREAM_CONNECTION_TERMINATION,
    DOWNSTREAM_PROTOCOL_ERROR,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    UPSTREAM_CONNECTION_FAILURE,
    UPSTREAM_OVERFLOW,
    UPSTREAM_REMOTE_RESET,
    UPSTREAM_REQUEST_TIMEOUT,
    StreamInfo,
)
from moorline.protocol import xprotocol
from moorline.protocol.xprotocol.api import Frame, FrameKind, Reason, XCodec
from moorline.stream import rpc as rpcs
from moorline.upstream import outlier as _od

log = logging.getLogger("moorline.rpc_proxy")

NAME = "moorline.filters.network.rpc_proxy"
RPC_PROXY_TYPE = "moorline.filters.network.rpc_proxy.v1.RpcProxy"
TYPE_URL = "type.googleapis.com/" + RPC_PROXY_TYPE
DEFAULT_TIMEOUT = 15.0
DEFAULT_MAX_PENDING = 1000
RETRY_ON = frozenset(("connect_failure", "retriable_status"))
_DURATION = re.compile(r"^(\d+(?:\.\d{1,9})?)s$")
_FLAG_OF = {
    Reason.NO_ROUTE: NO_ROUTE,
    Reason.NO_HEALTHY_UPSTREAM: NO_HEALTHY_UPSTREAM,
    Reason.OVERFLOW: UPSTREAM_OVERFLOW,
    Reason.TIMEOUT: UPSTREAM_REQUEST_TIMEOUT,
    Reason.UPSTREAM_RESET: UPSTREAM_REMOTE_RESET,
    Reason.CODEC_ERROR: DOWNSTREAM_PROTOCOL_ERROR,
}


class RpcProxyStats:
    """``rpc_proxy.<stat_prefix>.*``."""

    __slots__ = (
        "codec_error",
        "cx_active",
        "cx_total",
        "heartbeat",
        "idle_timeout",
        "local_reply",
        "oneway",
        "request",
        "request_timeout",
        "response_error",
        "response_success",
        "retry",
    )

    def __init__(self, scope: Any) -> None:
        c = scope.counter
        self.request: Counter = c("request")
        self.oneway: Counter = c("oneway")
        self.response_success: Counter = c("response_success")
        self.response_error: Counter = c("response_error")
        self.codec_error: Counter = c("codec_error")
        self.heartbeat: Counter = c("heartbeat")
        self.request_timeout: Counter = c("request_timeout")
        self.retry: Counter = c("retry")
        self.idle_timeout: Counter = c("idle_timeout")
        self.cx_total: Counter = c("cx_total")
        self.cx_active: Gauge = scope.gauge("cx_active")
        self.local_reply: dict[Reason, Counter] = {r: c(f"local_reply.{r.value}") for r in Reason}


# Per service and method stats: at most this many (service, method) pairs per proxy; later
# ones are counted under service "other" (a client inventing names cannot grow the store).
MAX_SERVICE_STATS = 1000


class ServiceStats:
    """``rpc_proxy.<stat_prefix>.service.<service>.method.<method>.``: ``request``,
    ``response_success``, ``response_error`` and ``local_reply`` (answered by moorline, or given
    up). ``:`` in names becomes ``_``, as Envoy sanitizes stat names."""

    __slots__ = ("local_reply", "request", "response_error", "response_success")

    def __init__(self, scope: Any) -> None:
        c = scope.counter
        self.request: Counter = c("request")
        self.response_success: Counter = c("response_success")
        self.response_error: Counter = c("response_error")
        self.local_reply: Counter = c("local_reply")


def _stat_name(s: str) -> str:
    return s.replace(":", "_") or "none"


# -- config -----------------------------------------------------------------------------------------


def _dict(v: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise ConfigError(path, "expected an object")
    for k in v:
        if k not in allowed:
            raise ConfigError(f"{path}.{k}", "unknown field")
    return dict(v)


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(path, "expected a non-empty string")
    return v


def _uint(v: Any, path: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < minimum:
        raise ConfigError(path, f"expected an integer of at least {minimum}")
    return int(v)


def _duration(v: Any, path: str) -> float:
    m = _DURATION.match(v) if isinstance(v, str) else None
    if m is None:
        raise ConfigError(path, 'expected a duration such as "1.5s"')
    return float(m.group(1))


def _string_matcher(v: Any, path: str) -> Callable[[str], bool]:
    d = _dict(v, path, ("exact", "prefix", "suffix", "regex"))
    if len(d) != 1:
        raise ConfigError(path, "exactly one of exact, prefix, suffix, regex is required")
    (kind, want) = next(iter(d.items()))
    if not isinstance(want, str):
        raise ConfigError(f"{path}.{kind}", "expected a string")
    if kind == "exact":
        return lambda s: s == want
    if kind == "prefix":
        return lambda s: s.startswith(want)
    if kind == "suffix":
        return lambda s: s.endswith(want)
    try:
        rx = re.compile(want)
    except re.error as e:
        raise ConfigError(f"{path}.regex", f"bad regex: {e}") from None
    return lambda s: rx.fullmatch(s) is not None


def _header_matcher(v: Any, path: str) -> Callable[[Mapping[str, str]], bool]:
    d = _dict(v, path, ("name", "exact", "prefix", "suffix", "regex", "present"))
    name = _str(d.pop("name", None), f"{path}.name")
    if "present" in d:
        if len(d) != 1 or not isinstance(d["present"], bool):
            raise ConfigError(f"{path}.present", "present: true|false, alone")
        want = d["present"]
        return lambda h: (name in h) == want
    m = _string_matcher(d, path)

    def match(h: Mapping[str, str]) -> bool:
        got = h.get(name)
        return got is not None and m(got)

    return match


class _Route:
    __slots__ = (
        "cluster",
        "cum",
        "headers",
        "method",
        "names",
        "num_retries",
        "retry_connect",
        "retry_status",
        "service",
        "timeout",
    )

    def __init__(self, v: Any, path: str) -> None:
        d = _dict(v, path, ("match", "route"))
        m = _dict(d.get("match", {}), f"{path}.match", ("service", "method", "headers"))
        self.service = _string_matcher(m["service"], f"{path}.match.service") if "service" in m else None
        self.method = _string_matcher(m["method"], f"{path}.match.method") if "method" in m else None
        hs = m.get("headers", [])
        if not isinstance(hs, list):
            raise ConfigError(f"{path}.match.headers", "expected a list")
        self.headers = [_header_matcher(h, f"{path}.match.headers[{i}]") for i, h in enumerate(hs)]
        if "route" not in d:
            raise ConfigError(f"{path}.route", "route is required")
        rp = f"{path}.route"
        r = _dict(d["route"], rp, ("cluster", "weighted_clusters", "timeout", "retry_policy"))
        self.cluster: str | None = None
        self.names: list[str] = []
        self.cum: list[int] = []
        if "cluster" in r and "weighted_clusters" in r:
            raise ConfigError(rp, "only one of cluster and weighted_clusters")
        if "cluster" in r:
            self.cluster = _str(r["cluster"], f"{rp}.cluster")
        elif "weighted_clusters" in r:
            wp = f"{rp}.weighted_clusters"
            wc = _dict(r["weighted_clusters"], wp, ("clusters",)).get("clusters")
            if not isinstance(wc, list) or not wc:
                raise ConfigError(f"{wp}.clusters", "at least one cluster is required")
            total = 0
            for i, c in enumerate(wc):
                cp = f"{wp}.clusters[{i}]"
                cd = _dict(c, cp, ("name", "weight"))
                self.names.append(_str(cd.get("name"), f"{cp}.name"))
                total += _uint(cd.get("weight", 1), f"{cp}.weight", 1)
                self.cum.append(total)
        else:
            raise ConfigError(rp, "one of cluster or weighted_clusters is required")
        self.timeout: float | None = _duration(r["timeout"], f"{rp}.timeout") if "timeout" in r else None
        self.num_retries = 0
        self.retry_connect = self.retry_status = False
        if "retry_policy" in r:
            pp = f"{rp}.retry_policy"
            p = _dict(r["retry_policy"], pp, ("num_retries", "retry_on"))
            self.num_retries = _uint(p.get("num_retries", 1), f"{pp}.num_retries")
            on = p.get("retry_on", ["connect_failure"])
            if not isinstance(on, list):
                raise ConfigError(f"{pp}.retry_on", "expected a list")
            for i, o in enumerate(on):
                if o not in RETRY_ON:
                    raise ConfigError(f"{pp}.retry_on[{i}]", f"expected one of {sorted(RETRY_ON)}")
            self.retry_connect = "connect_failure" in on
            self.retry_status = "retriable_status" in on

    def matches(self, frame: Frame) -> bool:
        if self.service is not None and not self.service(frame.service):
            return False
        if self.method is not None and not self.method(frame.method):
            return False
        if self.headers:
            h = frame.headers
            for m in self.headers:
                if not m(h):
                    return False
        return True

    def pick_cluster(self, rng: random.Random) -> str:
        if self.cluster is not None:
            return self.cluster
        return self.names[bisect.bisect_right(self.cum, rng.random() * self.cum[-1])]


class RpcProxy:
    """The compiled filter; the terminal filter of its chain."""

    terminal = True

    def __init__(self, value: Any, ctx: Any, path: str, codecs: Mapping[str, XCodec] | None = None) -> None:
        self.ctx = ctx
        d = _dict(
            value,
            path,
            ("stat_prefix", "protocol", "routes", "access_log", "max_pending_per_connection", "idle_timeout"),
        )
        self.stat_prefix = _str(d.get("stat_prefix"), f"{path}.stat_prefix")
        table = dict(codecs) if codecs is not None else xprotocol.builtin_codecs()
        proto = _str(d.get("protocol"), f"{path}.protocol")
        self.codec: XCodec | None = None
        self.sniff: tuple[XCodec, ...] = ()
        if proto == "auto":
            if not table:
                raise ConfigError(f"{path}.protocol", "auto: no protocol codec is registered")
            self.sniff = tuple(table.values())
        elif proto in table:
            self.codec = table[proto]
        else:
            raise ConfigError(
                f"{path}.protocol", f"unknown protocol {proto!r} (known: {sorted(table)}, auto)"
            )
        routes = d.get("routes", [])
        if not isinstance(routes, list):
            raise ConfigError(f"{path}.routes", "expected a list")
        self.routes = [_Route(r, f"{path}.routes[{i}]") for i, r in enumerate(routes)]
        self.max_pending = _uint(
            d.get("max_pending_per_connection", DEFAULT_MAX_PENDING), f"{path}.max_pending_per_connection", 1
        )
        # A client connection with no request in flight and no byte received for this long is
        # closed (0: never), as tcp_proxy's idle_timeout (also 1 h by default); clients that
        # send heartbeats are never idle. One sweep timer per proxy, only while it has
        # connections.
        self.idle_timeout = _duration(d.get("idle_timeout", "3600s"), f"{path}.idle_timeout")
        self._idle_sweep: asyncio.TimerHandle | None = None
        self.access_logs: list[Any] = []
        if "access_log" in d:
            self.access_logs = _access_logs(d["access_log"], ctx, f"{path}.access_log")
        self.stats = RpcProxyStats(ctx.stats.scope(f"rpc_proxy.{self.stat_prefix}."))
        self._scope = ctx.stats.scope(f"rpc_proxy.{self.stat_prefix}.service.")
        self._service_stats: dict[tuple[str, str], ServiceStats] = {}
        self.conns: set[rpcs.RpcServerConnection] = set()
        self.draining = False
        self.rng = random.Random()

    def service_stats(self, frame: Frame) -> ServiceStats:
        key = (frame.service, frame.method)
        ss = self._service_stats.get(key)
        if ss is None:
            if len(self._service_stats) >= MAX_SERVICE_STATS:
                key = ("other", "other")
                ss = self._service_stats.get(key)
            if ss is None:
                ss = ServiceStats(self._scope.scope(f"{_stat_name(key[0])}.method.{_stat_name(key[1])}."))
                self._service_stats[key] = ss
        return ss

    # -- the listener's side

    def on_accept(self, sock: Any, info: ConnInfo) -> None:
        admit = info.admit if info.filters else None
        serve_accepted(asyncio.get_running_loop(), sock, info, lambda: self.protocol(info), admit)

    def protocol(self, info: Any) -> rpcs.RpcServerConnection:
        """The ``asyncio.Protocol`` for one downstream connection."""
        self.stats.cx_total.value += 1
        conn = rpcs.RpcServerConnection(self, info, self.codec, self.sniff)
        self.conns.add(conn)
        if self.idle_timeout > 0 and self._idle_sweep is None:
            loop = asyncio.get_running_loop()
            self._idle_sweep = loop.call_later(self.idle_timeout / 4, self._sweep_idle)
        return conn

    def _sweep_idle(self) -> None:
        self._idle_sweep = None
        if not self.conns:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for c in list(self.conns):
            if not c.active and now - c.last_rx >= self.idle_timeout:
                self.stats.idle_timeout.value += 1
                c.close()
        if self.conns:
            self._idle_sweep = loop.call_later(self.idle_timeout / 4, self._sweep_idle)

    def active_connections(self) -> int:
        return len(self.conns)

    def active_requests(self) -> int:
        """Requests in flight (a draining server waits for these, not for idle connections:
        RPC clients keep their connections open for good)."""
        return sum(len(c.active) for c in self.conns)

    def drain(self, decision: Any = True) -> None:
        """Listener drain or shutdown: idle connections close now; a busy one closes once its
        last request in flight is answered (``_finish``). New requests on a draining connection
        are still served (the client may not have seen the close yet)."""
        self.draining = True
        for c in list(self.conns):
            if not c.active:
                c.close()

    def close_all(self) -> None:
        for c in list(self.conns):
            c.close()

    # -- RpcServerConnection's handler

    def on_rpc_request(self, conn: rpcs.RpcServerConnection, frame: Frame) -> None:
        st = self.stats
        st.request.value += 1
        oneway = frame.kind == FrameKind.ONEWAY
        if oneway:
            st.oneway.value += 1
        rpc = ActiveRpc(self, conn, frame, oneway)
        for r in self.routes:
            if r.matches(frame):
                break
        else:
            rpc.local(Reason.NO_ROUTE, "no route")
            return
        name = r.pick_cluster(self.rng)
        cm = self.ctx.cluster_manager
        cluster = cm.get(name) if cm is not None else None
        if cluster is None:
            rpc.local(Reason.NO_ROUTE, f"unknown cluster {name}")
            return
        rpc.start(r, cluster)

    def on_rpc_overflow(self, conn: rpcs.RpcServerConnection, frame: Frame) -> None:
        self.stats.request.value += 1
        ActiveRpc(self, conn, frame, frame.kind == FrameKind.ONEWAY).local(
            Reason.OVERFLOW, "too many requests in flight on this connection"
        )

    def on_rpc_codec_error(self, conn: rpcs.RpcServerConnection, frame: Frame, detail: str) -> None:
        codec = conn.codec
        assert codec is not None
        self.stats.local_reply[Reason.CODEC_ERROR].value += 1
        conn.send(codec.local_reply(frame, Reason.CODEC_ERROR, detail))

    def on_rpc_closed(self, conn: rpcs.RpcServerConnection, active: set[Any]) -> None:
        self.conns.discard(conn)
        for rpc in active:
            rpc.downstream_gone()


def _access_logs(v: Any, ctx: Any, path: str) -> list[Any]:
    from envoy.config.accesslog.v3 import accesslog_pb2

    from moorline.config.loader import parse_message
    from moorline.observability.access_log import compile_access_logs

    if not isinstance(v, list):
        raise ConfigError(path, "expected a list")
    protos = [parse_message(a, accesslog_pb2.AccessLog, f"{path}[{i}]") for i, a in enumerate(v)]
    return compile_access_logs(protos, ctx, path)


class ActiveRpc:
    """One request from downstream until it is answered (or needs no answer)."""

    __slots__ = (
        "attempts",
        "cluster",
        "codec",
        "conn",
        "done",
        "frame",
        "host",
        "ok",
        "oneway",
        "proxy",
        "retries_left",
        "retry_slot",
        "route",
        "start_mono",
        "timer",
        "tried",
        "up_conn",
        "up_id",
        "up_pool",
        "up_state",
    )

    def __init__(self, proxy: RpcProxy, conn: rpcs.RpcServerConnection, frame: Frame, oneway: bool) -> None:
        self.proxy = proxy
        self.conn = conn
        self.frame = frame
        codec = conn.codec
        assert codec is not None
        self.codec: XCodec = codec
        self.oneway = oneway
        self.route: _Route | None = None
        self.cluster: Any = None
        self.host: Any = None
        self.tried: set[Any] | None = None
        self.retries_left = 0
        self.retry_slot = False  # holds one of the cluster's max_retries (released at the end)
        self.attempts = 0
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.up_conn: Any = None
        self.up_id = 0
        self.up_pool: Any = None
        self.up_state = rpcs.IDLE
        self.start_mono = 0.0
        self.ok: bool | None = None  # the upstream's answer was a success / an error

    def start(self, route: _Route, cluster: Any) -> None:
        self.route = route
        self.cluster = cluster
        self.retries_left = route.num_retries
        loop = asyncio.get_running_loop()
        self.start_mono = loop.time()
        self.conn.active.add(self)
        if not self.oneway:
            t = route.timeout
            if t is None:
                t = self.frame.timeout_ms / 1000.0 if self.frame.timeout_ms > 0 else DEFAULT_TIMEOUT
            if t > 0:
                self.timer = loop.call_later(t, self._on_timeout)
        self._attempt()

    def _attempt(self) -> None:
        cluster = self.cluster
        host = cluster.choose_host(self.tried, None)
        if host is None and self.tried:
            host = cluster.choose_host(None, None)  # every host tried once: any will do
        if host is None:
            cluster.stats.upstream_cx_none_healthy.value += 1
            self.local(Reason.NO_HEALTHY_UPSTREAM, "no healthy upstream")
            return
        self.host = host
        self.attempts += 1
        self.up_state = rpcs.IDLE
        rpcs.pool_for(host, self.codec, asyncio.get_running_loop()).send(self)

    # -- pool callbacks

    def on_oneway_sent(self) -> None:
        self._finish(None, None)

    def on_upstream_response(self, f: Frame) -> None:
        if self.done:
            return
        codec = self.codec
        od = self.cluster.outlier
        ok = codec.is_success(f)
        retriable = not ok and codec.is_retriable(f)
        if od is not None:
            od.put_http(self.host, 200 if ok else 503 if retriable else 500)
        assert self.route is not None
        if retriable and self.route.retry_status and self._retry():
            return
        st = self.proxy.stats
        self.ok = ok
        if ok:
            st.response_success.value += 1
            if self.retry_slot:
                self.cluster.stats.upstream_rq_retry_success.value += 1
        else:
            st.response_error.value += 1
        rid = self.frame.request_id
        raw = f.raw if f.request_id == rid else codec.with_request_id(f, rid)
        self.conn.send(raw)
        self._finish(f.status, None)

    def on_upstream_failure(self, reason: Reason, detail: str, connect_failure: bool) -> None:
        if self.done:
            return
        if reason == Reason.UPSTREAM_RESET:
            od = self.cluster.outlier
            if od is not None:
                od.put_result(self.host, _od.CONNECT_FAILED)
            assert self.route is not None
            if connect_failure and self.route.retry_connect and self._retry():
                return
        self.local(reason, detail, UPSTREAM_CONNECTION_FAILURE if connect_failure else None)

    def _retry(self) -> bool:
        if self.retries_left <= 0:
            return False
        cluster = self.cluster
        if not self.retry_slot:
            if cluster.active_retries >= cluster.retries_limit():
                cluster.stats.upstream_rq_retry_overflow.value += 1
                return False
            cluster.active_retries += 1
            self.retry_slot = True
        self.retries_left -= 1
        self.proxy.stats.retry.value += 1
        self.cluster.stats.upstream_rq_retry.value += 1
        if self.tried is None:
            self.tried = set()
        self.tried.add(self.host)
        self._attempt()
        return True

    # -- ends

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        self.proxy.stats.request_timeout.value += 1
        self.cluster.stats.upstream_rq_timeout.value += 1
        od = self.cluster.outlier
        if od is not None and self.host is not None:
            od.put_result(self.host, _od.TIMEOUT)
        self._cancel_upstream()
        self.local(Reason.TIMEOUT, "request timeout")

    def _cancel_upstream(self) -> None:
        pool = self.up_pool
        if pool is not None and self.up_state in (rpcs.QUEUED, rpcs.IN_FLIGHT):
            pool.cancel(self)

    def downstream_gone(self) -> None:
        if self.done:
            return
        self._cancel_upstream()
        self.cluster.stats.upstream_rq_cancelled.value += 1
        self._finish(None, "downstream connection closed", [DOWNSTREAM_CONNECTION_TERMINATION])

    def local(self, reason: Reason, message: str, flag: str | None = None) -> None:
        """Answer the request here (nothing for a oneway)."""
        if self.done:
            return
        self.proxy.stats.local_reply[reason].value += 1
        if not self.oneway:
            self.conn.send(self.codec.local_reply(self.frame, reason, message))
        self._finish(None, reason.value, [flag or _FLAG_OF[reason]])

    def _finish(self, status: int | None, details: str | None, flags: list[str] | None = None) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.retry_slot:
            self.retry_slot = False
            self.cluster.active_retries -= 1
        conn = self.conn
        conn.active.discard(self)
        if self.proxy.draining and not conn.active:
            conn.close()  # (after this answer: close() lets the transport flush it)
        ss = self.proxy.service_stats(self.frame)
        ss.request.value += 1
        ok = self.ok
        if ok is None:
            if not (self.oneway and details is None):
                ss.local_reply.value += 1
        elif ok:
            ss.response_success.value += 1
        else:
            ss.response_error.value += 1
        logs = self.proxy.access_logs
        if logs:
            self._log(logs, status, details, flags)

    def _log(self, logs: list[Any], status: int | None, details: str | None, flags: list[str] | None) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = self.start_mono or now
        info = StreamInfo(time.time() - (now - start), start)
        info.end_mono = now
        info.downstream = self.conn.info
        info.protocol = self.codec.name
        info.rpc_protocol = self.codec.name
        f = self.frame
        info.rpc_service = f.service
        info.rpc_method = f.method
        info.rpc_status = status
        info.response_code = status or 0
        info.response_code_details = details or ("via_upstream" if status is not None else None)
        info.response_flags = flags or []
        info.bytes_received = len(f.raw)
        info.attempt_count = self.attempts
        if self.cluster is not None:
            info.upstream_cluster = self.cluster.name
        if self.host is not None:
            info.upstream_host = getattr(self.host, "addr_str", None)
        for al in logs:
            al.log(info)


def _factory(cfg: Any, ctx: Any, path: str) -> RpcProxy:
    cpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(cpath, "typed_config is required")
    value = getattr(cfg, "value", None)
    if not isinstance(value, Mapping):
        raise ConfigError(cpath, f"expected a TypedStruct of {RPC_PROXY_TYPE}")
    return RpcProxy(value, ctx, f"{cpath}.value")


def _dubbo_proxy_factory(cfg: Any, ctx: Any, path: str) -> RpcProxy:
    """Envoy's own ``envoy.filters.network.dubbo_proxy``: translated into rpc_proxy's schema
    (``rpc_dubbo_config``), so Envoy users' Dubbo configs run on the same proxy."""
    from moorline.proxy.rpc_dubbo_config import compile_envoy_dubbo_proxy

    cpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(cpath, "typed_config is required")
    notices: list[str] = []
    value = compile_envoy_dubbo_proxy(cfg, cpath, notices)
    for n in notices:
        ctx.notice(n)
    return RpcProxy(value, ctx, f"{cpath}(as rpc_proxy)")


registry.register("network", [NAME], [TYPE_URL], _factory)
registry.register(
    "network",
    ["envoy.filters.network.dubbo_proxy"],
    ["type.googleapis.com/envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy"],
    _dubbo_proxy_factory,
)
