"""Request mirroring (``RouteAction.request_mirror_policies``): shadow requests.

``MirrorPolicy`` is compiled once per policy (route_table calls ``MirrorPolicy.compile``);
``Shadow`` is one mirrored copy of a downstream request, owned by the primary's router.

A shadow is fire and forget. It takes a host and a connection from the mirror cluster's own
pools, as the primary does, and streams the request as the downstream sends it: headers
(authority suffixed ``-shadow`` unless ``disable_shadow_host_suffix_append``), body, trailers.
Its response is read and dropped. It is never retried, nothing it does reaches the primary
(no pause, no error, no access-log entry), and its stats are the mirror cluster's
``upstream_rq_*`` (as Envoy counts them).

Bounds: the body is held only until the shadow's connection is ready and, in total, at most the
downstream connection's buffer limit: a longer body abandons the shadow (never the primary).
When the downstream stream ends, a shadow still sending its request is cancelled; one whose
request was sent runs to its response, bounded by the route timeout (Envoy lets a shadow finish
and gives it the route's timeout).
"""

from __future__ import annotations

import random
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.matchers import _b
from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders
from moorline.stream.api import HttpProtocol, ResetReason
from moorline.stream.http1_client import pool_for

_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}
_SUFFIX = b"-shadow"


def shadow_authority(authority: bytes) -> bytes:
    """``host[:port]`` -> ``host-shadow[:port]`` (an IPv6 literal keeps its brackets)."""
    i = authority.rfind(b":")
    if i > 0 and authority.rfind(b"]") < i and authority[i + 1 :].isdigit():
        return authority[:i] + _SUFFIX + authority[i:]
    return authority + _SUFFIX


class MirrorPolicy:
    """One compiled ``RequestMirrorPolicy``."""

    __slots__ = ("cluster", "cluster_header", "denominator", "numerator", "suffix")

    def __init__(self) -> None:
        self.cluster: str | None = None
        self.cluster_header: bytes | None = None
        self.numerator = 100
        self.denominator = 100
        self.suffix = True

    @classmethod
    def compile(cls, proto: Any, path: str, notes: list[str]) -> MirrorPolicy | None:
        """The compiled policy, or None when it can never sample (0 %): it then costs nothing."""
        p = cls()
        if proto.cluster and proto.cluster_header:
            raise ConfigError(path, "only one of cluster and cluster_header may be set")
        if proto.cluster:
            p.cluster = proto.cluster
        elif proto.cluster_header:
            p.cluster_header = _b(proto.cluster_header).lower()
        else:
            raise ConfigError(f"{path}.cluster", "cluster or cluster_header is required")
        if proto.HasField("runtime_fraction"):
            rf = proto.runtime_fraction
            if rf.runtime_key:
                notes.append(f"{path}.runtime_fraction.runtime_key: no runtime; default_value used")
            dv = rf.default_value
            d = int(dv.denominator)
            if d not in _DENOMINATORS:
                raise ConfigError(
                    f"{path}.runtime_fraction.default_value.denominator", f"unknown denominator {d}"
                )
            p.denominator = _DENOMINATORS[d]
            p.numerator = min(int(dv.numerator), p.denominator)
            if p.numerator == 0:
                return None
        if proto.HasField("trace_sampled"):
            notes.append(f"{path}.trace_sampled: shadows are not traced; ignored")
        p.suffix = not proto.disable_shadow_host_suffix_append
        return p

    def sampled(self, rand: float) -> bool:
        """``rand`` in [0, 1)."""
        n = self.numerator
        return n >= self.denominator or rand * self.denominator < n


class Shadow:
    """One shadow request: the ``ResponseDecoder`` its pool and connection call."""

    __slots__ = (
        "body",
        "body_bytes",
        "cluster",
        "conn",
        "done",
        "headers",
        "host",
        "limit",
        "loop",
        "pending",
        "request_done",
        "start",
        "timeout",
        "timer",
        "trailers",
    )
    # Shadows go out at DEFAULT priority (as Envoy's async client does), whatever the route's.
    high = False

    def __init__(
        self,
        cluster: Any,
        policy: MirrorPolicy,
        headers: RequestHeaders,
        loop: Any,
        limit: int,
        timeout: float,
    ) -> None:
        self.cluster = cluster
        self.loop = loop
        self.limit = limit
        self.timeout = timeout
        h = headers.copy()
        if policy.suffix:
            h.authority = shadow_authority(h.authority)
        self.headers = h
        self.body: list[bytes] = []  # held only until the connection is ready
        self.body_bytes = 0
        self.trailers: HeaderMap | None = None
        self.request_done = False
        self.conn: Any = None
        self.pending: Any = None
        self.host: Any = None
        self.timer: Any = None
        self.done = False
        self.start = 0.0

    # -- LbContext (only ORIGINAL_DST clusters ask) ------------------------------
    def downstream_local_address(self) -> tuple[str, int] | None:
        return None

    def downstream_header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    # -- driven by the primary's router --------------------------------------------
    def begin(self, end_stream: bool, downstream_h2: bool) -> bool:
        """Send it (the headers are complete). False: no host or no capacity; dropped."""
        cluster = self.cluster
        host = cluster.choose_host(None, self)
        st = cluster.stats
        if host is None:
            return False
        if st.upstream_rq_active.value - cluster.high.rq_active >= cluster.max_requests:  # DEFAULT priority
            st.upstream_rq_pending_overflow.value += 1
            return False
        self.request_done = end_stream
        self.host = host
        st.upstream_rq_total.value += 1
        st.upstream_rq_active.value += 1
        host.active_rq += 1
        self.start = self.loop.time()
        if cluster.http2 or (cluster.http2 is None and downstream_h2):
            from moorline.stream.http2_client import pool_for as h2_pool_for

            self.pending = h2_pool_for(host, self.loop).new_stream(self)
        else:
            pool = host.pool
            if pool is None or pool.closed:
                pool = pool_for(host, self.loop)
            self.pending = pool.new_stream(self)
        if end_stream and not self.done:
            self._arm()
        return not self.done

    def data(self, data: bytes, end_stream: bool) -> None:
        if self.done or self.request_done:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self.limit:
            self.cancel()  # too big to mirror: the shadow goes, the primary carries on
            return
        if end_stream:
            self.request_done = True
        conn = self.conn
        if conn is not None:
            conn.send_data(data, end_stream)
        elif data:
            self.body.append(data)
        if end_stream:
            self._arm()

    def end_with_trailers(self, trailers: HeaderMap) -> None:
        if self.done or self.request_done:
            return
        self.request_done = True
        if self.conn is not None:
            self.conn.send_trailers(trailers)
        else:
            self.trailers = trailers
        self._arm()

    def downstream_done(self) -> None:
        """The downstream stream ended: a shadow still sending cannot complete; cancel it."""
        if not self.done and not self.request_done:
            self.cancel()

    def cancel(self) -> None:
        if self.done:
            return
        st = self.cluster.stats
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
            st.upstream_rq_cancelled.value += 1
        conn = self.conn
        self.conn = None
        if conn is not None:
            st.upstream_rq_tx_reset.value += 1
            conn.abort()
        self._finish()

    # -- ResponseDecoder ------------------------------------------------------------
    def on_pool_ready(self, conn: Any) -> None:
        self.pending = None
        if self.done:
            conn.pool.on_connection_idle(conn)
            return
        self.conn = conn
        body = self.body
        trailers = self.trailers
        conn.send_headers(self, self.headers, self.request_done and not body and trailers is None)
        if body:
            conn.send_data(b"".join(body), self.request_done and trailers is None)
            body.clear()
        if trailers is not None:
            self.trailers = None
            conn.send_trailers(trailers)

    def on_pool_failure(self, reason: ResetReason, detail: str | None) -> None:
        self.pending = None
        self._finish()

    def on_upstream_1xx(self, headers: ResponseHeaders) -> None:
        return

    def on_upstream_headers(self, headers: ResponseHeaders, end_stream: bool) -> None:
        if self.done:
            return
        self.cluster.stats.rq_status(headers.status)
        if end_stream:
            self._complete()

    def on_upstream_upgrade(self, leftover: bytes) -> None:
        self.on_upstream_reset(ResetReason.PROTOCOL_ERROR)  # a shadow never upgrades

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream and not self.done:
            self._complete()

    def on_upstream_trailers(self, trailers: HeaderMap) -> None:
        if not self.done:
            self._complete()

    def on_upstream_reset(self, reason: ResetReason, detail: str = "") -> None:
        if self.done:
            return
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
        self.cluster.stats.upstream_rq_rx_reset.value += 1
        self._finish()

    def on_upstream_batch_end(self) -> None:
        return

    def on_upstream_write_paused(self) -> None:
        return  # never slow the primary down for its shadow

    def on_upstream_write_resumed(self) -> None:
        return

    # -- completion -------------------------------------------------------------------
    def _arm(self) -> None:
        if self.timeout and self.timer is None and not self.done:
            self.timer = self.loop.call_later(self.timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        if not self.done:
            self.cluster.stats.upstream_rq_timeout.value += 1
            self.cancel()

    def _complete(self) -> None:
        self.cluster.stats.upstream_rq_time.record((self.loop.time() - self.start) * 1000)
        conn = self.conn
        self.conn = None
        self._finish()
        if conn is not None:
            conn.release()  # closes it when the request was not fully sent

    def _finish(self) -> None:
        self.done = True
        self.body.clear()
        self.trailers = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        host = self.host
        if host is not None:
            self.host = None
            host.active_rq -= 1
            st = self.cluster.stats
            st.upstream_rq_active.value -= 1
            st.upstream_rq_completed.value += 1


def start_shadows(router: Any, policies: tuple[MirrorPolicy, ...], headers: RequestHeaders, end: bool) -> Any:
    """Start the sampled shadows of one request; the list of those running, or None."""
    stream = router.stream
    cm = stream.cfg.cluster_manager
    if cm is None:
        return None
    out: list[Shadow] | None = None
    h2 = stream.conn.protocol == HttpProtocol.HTTP2
    for p in policies:
        if not p.sampled(random.random()):
            continue
        name = p.cluster
        if name is None:
            v = headers.get(p.cluster_header) if p.cluster_header else None
            name = v.decode("latin-1") if v else None
        cluster = cm.get(name) if name else None
        if cluster is None:
            continue
        s = Shadow(cluster, p, headers, router.loop, stream.conn.info.buffer_limit, router.timeout)
        if s.begin(end, h2):
            if out is None:
                out = []
            out.append(s)
    return out
