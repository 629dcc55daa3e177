"""The router: the terminal HTTP filter (``envoy.filters.http.router``).

One ``Router`` per routed stream. It picks the cluster and host, takes an
upstream connection from the host's pool, streams the request out and the
response back, and applies the route's timeout and retry policy.

Request body and retries: a retry must resend the body, so while a retry
policy is active the body is kept, up to the connection's buffer limit
(Envoy's rule). A body that outgrows the limit is released and the request
is no longer retried. Retries happen only once the downstream request is
complete and before any response byte went downstream.

Timeouts: the route timeout (default 15 s) starts when the downstream request
is complete, as in Envoy; the per-try timeout starts with each attempt's
request being complete.
"""

from __future__ import annotations

import random
import time
from typing import Any

from moorline.observability import stream_info as flags
from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders
from moorline.proxy.phases import Phase
from moorline.proxy.route_table import (
    RETRY_5XX,
    RETRY_CONNECT_FAILURE,
    RETRY_GATEWAY_ERROR,
    RETRY_RESET,
)
from moorline.proxy.shadow import start_shadows
from moorline.stream.api import GOAWAY_REFUSED, HttpProtocol, ResetReason
from moorline.stream.http1_client import pool_for
from moorline.stream.tcp_upstream import connect as tcp_connect
from moorline.upstream.outlier import CONNECT_FAILED as _OD_CONNECT_FAILED
from moorline.upstream.outlier import CONNECT_SUCCESS as _OD_CONNECT_SUCCESS
from moorline.upstream.outlier import TIMEOUT as _OD_TIMEOUT
from moorline.upstream.outlier import http_status_for_grpc as _od_grpc_http

# Tries of one request that each met a GOAWAY before the upstream saw them (see on_upstream_reset).
_MAX_GOAWAY_RETRIES = 32
_UPSTREAM_ERR = b"upstream connect error or disconnect/reset before headers. reset reason: "
# Envoy names a pool overflow (a circuit breaker) as it names any reset before the response.
_OVERFLOW_DETAILS = "upstream_reset_before_response_started{overflow}"

# The phases the router moves its stream through.
_CHOOSE_HOST = Phase.CHOOSE_HOST
_UPSTREAM_REQUEST = Phase.UPSTREAM_REQUEST
_HTTP2 = HttpProtocol.HTTP2


def _grpc_timeout_s(v: bytes) -> float | None:
    """Parse a grpc-timeout header value ("100m", "5S"): 1 to 8 ASCII digits and a unit; anything
    else (a sign, spaces, more digits) is not a valid deadline and is ignored."""
    digits = v[:-1]
    if not digits.isdigit() or len(digits) > 8:
        return None
    unit = v[-1:]
    n = int(digits)
    mult = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}.get(unit)
    if mult is None:
        return None
    return n * mult


class Router:
    __slots__ = (
        "attempt_start",
        "attempts",
        "backoff_handle",
        "body",
        "body_bytes",
        "cluster",
        "conn",
        "deadline",
        "done",
        "downstream_end",
        "downstream_paused",
        "goaway_retries",
        "headers",
        "high",
        "host",
        "is_retry",
        "loop",
        "pending",
        "per_try_handle",
        "policy",
        "refused_retried",
        "response_started",
        "retain",
        "retries_left",
        "route",
        "sent_idx",
        "shadows",
        "stream",
        "timeout",
        "timeout_handle",
        "trailers",
        "tried",
        "tunnel",
        "tunnel_ends",
        "tunnel_eof",
        "upgraded",
    )

    def __init__(self, stream: Any, route: Any) -> None:
        self.stream = stream
        self.route = route
        self.cluster: Any = None
        self.loop = stream.conn.loop
        self.headers: RequestHeaders = stream.headers
        self.conn: Any = None
        self.pending: Any = None
        self.host: Any = None
        # RouteAction.priority HIGH: the cluster's HIGH thresholds (requests, retries, and in the
        # pools pending requests and the connections this request opens)
        self.high = route.high
        self.policy = route.retry
        self.retries_left = self.policy.num_retries if self.policy is not None else 0
        self.tried: set[Any] | None = None
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.sent_idx = 0
        self.retain = self.retries_left > 0
        self.trailers: HeaderMap | None = None
        self.downstream_end = False
        self.timeout = route.timeout
        self.timeout_handle: Any = None
        self.deadline = 0.0  # route timeout checked by the connection's periodic timer
        self.per_try_handle: Any = None
        self.backoff_handle: Any = None
        self.attempt_start = 0.0
        self.response_started = False
        self.done = False
        self.downstream_paused = False
        self.tunnel = False
        self.tunnel_ends = 0  # directions of an upgraded exchange that have ended (2: done)
        # Until the upstream accepts the upgrade (101, or 2xx to CONNECT) the client's tunnel
        # bytes and its FIN are held (within the buffer limit): an upstream that refuses would
        # otherwise parse them as a new request.
        self.upgraded = False
        self.tunnel_eof = False
        self.is_retry = False
        self.refused_retried = False
        self.goaway_retries = 0
        self.attempts = 0
        self.shadows: list[Any] | None = None  # request mirroring (shadow.py)

    # -- LbContext (upstream.api): only ORIGINAL_DST clusters ask ---------------
    def downstream_local_address(self) -> tuple[str, int] | None:
        info = self.stream.conn.info
        return info.local if info.local_restored else None

    def downstream_header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    # -- downstream events -------------------------------------------------
    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> None:
        stream = self.stream
        stream.phase = _CHOOSE_HOST
        route = self.route
        plain = route.plain
        if plain is None:
            plain = route.is_plain()
        name = route.cluster if plain else route.pick_cluster(headers)
        cm = stream.cfg.cluster_manager
        cluster = cm.get(name) if (name and cm is not None) else None
        if cluster is None:
            stream.cfg.stats.no_cluster.value += 1
            self.done = True
            stream.send_local_reply(
                route.cluster_not_found_response_code, b"", flags.NO_CLUSTER_FOUND, "cluster_not_found"
            )
            return
        self.cluster = cluster
        stream.info.upstream_cluster = cluster.name
        if not plain:  # a plain route (one cluster, no edits) skips the edit steps
            new_path = route.rewrite_path(headers.path)
            if new_path is not None:
                headers.add(b"x-envoy-original-path", headers.path)
                headers.path = new_path
            host_rewrite = route.host_rewrite_for(name)
            if host_rewrite is not None:
                headers.authority = host_rewrite
            elif route.host_rewrite_header is not None:
                v = headers.get(route.host_rewrite_header)
                if v:
                    headers.authority = v
            route.apply_request_headers(headers, name)
            if route.mirrors is not None and not (self.tunnel or stream.upgrade):
                self.shadows = start_shadows(self, route.mirrors, headers, end_stream)
        if stream.upstream_grpc and route.max_grpc_timeout is not None:
            gt = headers.get(b"grpc-timeout")
            t = _grpc_timeout_s(gt) if gt else None
            if t is None or t <= 0:
                t = 0.0  # no (valid) grpc-timeout: no deadline, unless the maximum caps it
            mx = route.max_grpc_timeout
            if mx and (not t or t > mx):
                t = mx
            self.timeout = t
        if self.tunnel or stream.upgrade:
            self.tunnel = True
            self.retain = False
            self.retries_left = 0
        self.downstream_end = end_stream
        if end_stream and self.timeout:
            self._start_global_timer()
        self._start_attempt()

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        if self.shadows is not None:
            for s in self.shadows:
                s.data(data, end_stream)
        if self.done:
            return
        if data:
            self.body.append(data)
            self.body_bytes += len(data)
        if end_stream:
            self.downstream_end = True
            self._start_global_timer()
        conn = self.conn
        limit = self.stream.conn.info.buffer_limit
        if self.retain and self.body_bytes > limit:
            # Too big to keep for a retry: stream it and stop retrying.
            self.retain = False
        if conn is not None:
            if data or end_stream:
                if self.sent_idx < len(self.body) - (1 if data else 0):
                    self._flush_body(end_stream and self.trailers is None)
                else:
                    conn.send_data(data, end_stream)
                    self.sent_idx = len(self.body)
            if not self.retain:
                self.body.clear()
                self.sent_idx = 0
            if end_stream:
                self._start_per_try_timer()
        elif self.body_bytes > limit and not self.downstream_paused:
            # Waiting for a connection: hold at most the buffer limit, then push back.
            self.downstream_paused = True
            self.stream.pause_downstream()

    def decode_trailers(self, trailers: HeaderMap) -> None:
        if self.shadows is not None:
            for s in self.shadows:
                s.end_with_trailers(trailers)
        if self.done:
            return
        self.trailers = trailers
        self.downstream_end = True
        self._start_global_timer()
        if self.conn is not None:
            self._flush_body(False)
            self.conn.send_trailers(trailers)
            self._start_per_try_timer()

    def decode_tunnel(self, data: bytes, end_stream: bool) -> None:
        if self.conn is not None and self.upgraded:
            self.conn.send_data(data, end_stream)
        else:
            if data:
                self.body.append(data)
                self.body_bytes += len(data)
                if self.body_bytes > self.stream.conn.info.buffer_limit and not self.downstream_paused:
                    self.downstream_paused = True
                    self.stream.pause_downstream()
            if end_stream:
                self.tunnel_eof = True
        if end_stream:
            self._tunnel_end()

    def _tunnel_end(self) -> None:
        """One direction of an upgraded exchange ended. When both have, the exchange is over:
        without this a finished WebSocket session would hold its request, upstream request
        and connection slots for ever."""
        self.tunnel_ends += 1
        if self.tunnel_ends >= 2 and not self.done:
            self.stream.tunnel_closed()

    def _flush_body(self, end_stream: bool) -> None:
        conn = self.conn
        body = self.body
        n = len(body)
        i = self.sent_idx
        if i < n:
            conn.send_data(b"".join(body[i:]) if n - i > 1 else body[i], end_stream)
        elif end_stream:
            conn.send_data(b"", True)
        self.sent_idx = n

    # -- attempts --------------------------------------------------------------
    def _start_attempt(self) -> None:
        self.backoff_handle = None
        if self.done:
            return
        stream = self.stream
        cluster = self.cluster
        policy = self.policy
        exclude = self.tried if (policy is not None and policy.retry_host_predicate_previous_hosts) else None
        if policy is not None and policy.retry_priority_update_frequency and self.tried:
            host = self._choose_other_priority(policy.retry_priority_update_frequency, exclude)
        else:
            host = cluster.choose_host(exclude, self)
        if host is None:
            self._local_failure(503, b"no healthy upstream", flags.NO_HEALTHY_UPSTREAM, "no_healthy_upstream")
            return
        st = cluster.stats
        if self.high:  # RouteAction.priority HIGH: the cluster's HIGH thresholds
            hi = cluster.high
            if hi.rq_active >= hi.max_requests:
                st.upstream_rq_pending_overflow.value += 1
                self._local_failure(
                    503, _UPSTREAM_ERR + b"overflow", flags.UPSTREAM_OVERFLOW, _OVERFLOW_DETAILS
                )
                return
            hi.rq_active += 1
        elif st.upstream_rq_active.value - cluster.high.rq_active >= cluster.max_requests:
            st.upstream_rq_pending_overflow.value += 1
            self._local_failure(503, _UPSTREAM_ERR + b"overflow", flags.UPSTREAM_OVERFLOW, _OVERFLOW_DETAILS)
            return
        self.host = host
        if self.route.auto_host_rewrite:
            self.headers.authority = host.hostname.encode()
        n = self.attempts = self.attempts + 1
        info = stream.info
        info.attempt_count = n
        info.upstream_host = host.addr_str
        if policy is not None:
            if self.tried is None:
                self.tried = set()
            self.tried.add(host)
        st.upstream_rq_total.value += 1
        st.upstream_rq_active.value += 1
        host.active_rq += 1
        stream.phase = _UPSTREAM_REQUEST
        self.attempt_start = self.loop.time()
        if self.route.connect_terminate and stream.method == b"CONNECT":
            # CONNECT termination: the payload goes to the host over TCP (a 200 is synthesized).
            self.pending = tcp_connect(host, self.loop, self)
        elif cluster.http2 or (cluster.http2 is None and stream.conn.protocol == _HTTP2):
            from moorline.stream.http2_client import pool_for as h2_pool_for

            self.pending = h2_pool_for(host, self.loop).new_stream(self)
        else:
            pool = host.pool
            if pool is None or pool.closed:
                pool = pool_for(host, self.loop)
            self.pending = pool.new_stream(self)

    def on_pool_ready(self, conn: Any) -> None:
        self.pending = None
        if self.done:
            conn.pool.on_connection_idle(conn)
            return
        od = self.cluster.outlier
        if od is not None and self.host is not None:
            od.put_result(self.host, _OD_CONNECT_SUCCESS)
        self.conn = conn
        if self.stream.conn.write_paused:
            # The client is already above its write high-water mark (pipelined or unread
            # responses): pause_writing will not be called again, so start paused.
            conn.pause_reading()
        body = self.body
        end = self.downstream_end and not body and self.trailers is None
        conn.send_headers(self, self.headers, end)
        self.sent_idx = 0
        if self.tunnel:
            return  # tunnel bytes wait for the 101 (on_upstream_upgrade)
        if body:
            self._flush_body(self.downstream_end and self.trailers is None)
            if not self.retain:
                body.clear()
                self.sent_idx = 0
        if self.trailers is not None:
            conn.send_trailers(self.trailers)
        if self.downstream_paused:
            self.downstream_paused = False
            self.stream.resume_downstream()
        if self.downstream_end and self.policy is not None:
            self._start_per_try_timer()

    def on_pool_failure(self, reason: ResetReason, detail: str | None) -> None:
        self.pending = None
        if self.done:
            return
        od = self.cluster.outlier
        if od is not None and self.host is not None and reason is not ResetReason.OVERFLOW:
            od.put_result(self.host, _OD_CONNECT_FAILED)
        self._end_attempt()
        if reason is ResetReason.OVERFLOW:
            self._local_failure(503, _UPSTREAM_ERR + b"overflow", flags.UPSTREAM_OVERFLOW, _OVERFLOW_DETAILS)
            return
        self.stream.info.upstream_transport_failure_reason = detail
        if self._maybe_retry_reset(connect_failure=True):
            return
        body = _UPSTREAM_ERR + b"connection failure"
        if detail:
            body += b", transport failure reason: " + detail.encode()
        self._local_failure(
            503,
            body,
            flags.UPSTREAM_CONNECTION_FAILURE,
            "upstream_reset_before_response_started{connection_failure}",
        )

    # -- upstream events ---------------------------------------------------------
    def on_upstream_1xx(self, headers: ResponseHeaders) -> None:
        # Envoy answers 100-continue itself and does not forward upstream 1xx by default.
        return

    def _report_response(self, headers: Any, status: int) -> None:
        """The answer's head to the cluster's outlier detector and health checks (only called
        when the cluster has one of them)."""
        cluster, host = self.cluster, self.host
        od = cluster.outlier
        if od is not None:
            gs = headers.get(b"grpc-status") if self.stream.upstream_grpc else None
            # A trailers-only gRPC answer is judged by its grpc-status, as Envoy does (a status
            # in trailers is not: the headers decided already).
            od.put_http(host, _od_grpc_http(int(gs)) if gs is not None and gs.isdigit() else status)
        hc = cluster.health_checker
        if hc is not None and headers.get(b"x-envoy-immediate-health-check-fail") is not None:
            # The upstream (an Envoy or moorline told /healthcheck/fail) is draining itself:
            # fail its active health at once instead of after unhealthy_threshold checks.
            hc.immediate_fail(host)

    def on_upstream_headers(self, headers: ResponseHeaders, end_stream: bool) -> None:
        if self.done:
            return
        status = headers.status
        if status == 101 and not self.tunnel:
            # Only an upgrade request may switch protocols (Envoy: upgradeAllowed); anything
            # else would turn the client's connection into an unrouted tunnel.
            self.on_upstream_reset(ResetReason.PROTOCOL_ERROR, "unexpected 101")
            return
        if self.cluster.watches_responses and self.host is not None:
            self._report_response(headers, status)
        if self.tunnel and status != 101 and not (200 <= status < 300 and self.stream.method == b"CONNECT"):
            # The upstream refused the upgrade: an ordinary response, after which neither
            # connection is reused; the held tunnel bytes are dropped.
            self.tunnel = False
            self.stream.upgrade = False
            self.body.clear()
            self.body_bytes = 0
            self.stream.conn.resp_keep_alive = False
            conn = self.conn
            if conn is not None and hasattr(conn, "keep_alive"):
                conn.keep_alive = False
        policy = self.policy
        if policy is not None and self.downstream_end and (self.retain or (not self.body_bytes)):
            gs = headers.get(b"grpc-status")
            grpc = int(gs) if gs is not None and gs.isdigit() else None
            if policy.should_retry_status(status, grpc) or (
                policy.retriable_headers and policy.should_retry_headers(headers)
            ):
                if self.retries_left > 0:
                    reset = policy.reset_delay(headers, time.time()) if policy.reset_headers else None
                    if self._retry(reset):
                        return
                elif policy.num_retries:
                    # Retriable, but the retries are used up (Envoy: URX and the counter).
                    self.cluster.stats.upstream_rq_retry_limit_exceeded.value += 1
                    self.stream.info.response_flags.append(flags.UPSTREAM_RETRY_LIMIT_EXCEEDED)
                # A retried request whose answer would be retried again did not succeed (Envoy
                # counts upstream_rq_retry_success only for an answer it would not retry).
                self.is_retry = False
        now = self.loop.time()
        cluster = self.cluster
        cluster.stats.rq_status(status)
        self.response_started = True
        if self.per_try_handle is not None:
            self.per_try_handle.cancel()
            self.per_try_handle = None
        stream = self.stream
        info = stream.info
        if info.first_upstream_rx_mono is None:
            info.first_upstream_rx_mono = now
        headers._h.append((b"x-envoy-upstream-service-time", b"%d" % ((now - self.attempt_start) * 1000)))
        route = self.route
        if not route.plain:
            route.apply_response_headers(headers, self.cluster.name)
        if self.is_retry:
            cluster.stats.upstream_rq_retry_success.value += 1
            self.is_retry = False
        if end_stream:
            # Release the upstream side first: finishing the downstream stream ends this router.
            self._upstream_complete()
        stream.encode_headers(headers, end_stream)

    def on_upstream_upgrade(self, leftover: bytes) -> None:
        if self.done:
            return
        self.upgraded = True
        if leftover:
            self.stream.encode_tunnel(leftover, False)
        conn = self.conn
        if conn is not None:
            if self.body:
                conn.send_data(b"".join(self.body), False)
                self.body.clear()
                self.body_bytes = 0
            if self.tunnel_eof:
                conn.send_data(b"", True)
        if self.downstream_paused:
            self.downstream_paused = False
            self.stream.resume_downstream()

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        if self.done:
            return
        if self.tunnel:
            self.stream.encode_tunnel(data, end_stream)
            if end_stream:
                self._tunnel_end()
            return
        if end_stream:
            self._upstream_complete()
        self.stream.encode_data(data, end_stream)

    def on_upstream_trailers(self, trailers: HeaderMap) -> None:
        if self.done:
            return
        self._upstream_complete()
        self.stream.encode_trailers(trailers)

    def on_upstream_reset(self, reason: ResetReason, detail: str = "") -> None:
        if self.done:
            return
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
        od = self.cluster.outlier
        if od is not None and self.host is not None and detail != GOAWAY_REFUSED:
            # Envoy counts a reset as one. Not a stream above a GOAWAY's last stream id: that is
            # the upstream draining a connection (nginx every keepalive_requests), not failing.
            od.put_result(self.host, _OD_CONNECT_FAILED)
        self._end_attempt()
        stream = self.stream
        if self.response_started:
            stream.info.response_flags.append(flags.UPSTREAM_REMOTE_RESET)
            self.done = True
            self._cancel_timers()
            stream.reset_stream()
            return
        if reason is ResetReason.PROTOCOL_ERROR:
            self.cluster.stats.upstream_rq_rx_reset.value += 1
            self._local_failure(
                502,
                _UPSTREAM_ERR + b"protocol error",
                flags.UPSTREAM_PROTOCOL_ERROR,
                "upstream_reset_before_response_started{protocol_error}",
            )
            return
        self.cluster.stats.upstream_rq_rx_reset.value += 1
        if (
            reason is ResetReason.REMOTE_REFUSED_STREAM
            and (
                not self.refused_retried
                if detail != GOAWAY_REFUSED
                else self.goaway_retries < _MAX_GOAWAY_RETRIES
            )
            and self.downstream_end
            and (self.retain or not self.body_bytes)
        ):
            # REFUSED_STREAM / beyond a GOAWAY's last stream id: the upstream never processed the
            # request (RFC 9113 8.7), so it is safe to send it again, policy or not: once for
            # REFUSED_STREAM; for a GOAWAY (an upstream that closes connections every few
            # requests, nginx's keepalive_requests) as long as each try met a new GOAWAY, up to
            # _MAX_GOAWAY_RETRIES (an upstream that refuses everything is not retried forever).
            if detail == GOAWAY_REFUSED:
                self.goaway_retries += 1
            else:
                self.refused_retried = True
            self.cluster.stats.upstream_rq_retry.value += 1
            self.is_retry = True
            self._start_attempt()
            return
        if self._maybe_retry_reset(connect_failure=False):
            return
        self._local_failure(
            503,
            _UPSTREAM_ERR + b"connection termination",
            flags.UPSTREAM_CONNECTION_TERMINATION,
            "upstream_reset_before_response_started{connection_termination}",
        )

    def on_upstream_batch_end(self) -> None:
        """One upstream read was processed: send a response head still held for its body."""
        if self.response_started and not self.done:
            self.stream.conn.flush_pending()

    def on_upstream_write_paused(self) -> None:
        self.stream.pause_downstream()

    def on_upstream_write_resumed(self) -> None:
        self.stream.resume_downstream()

    def pause_upstream(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_upstream(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    # -- completion ----------------------------------------------------------------
    def _end_attempt(self) -> None:
        """Release the per-attempt counters (the attempt failed or finished)."""
        host = self.host
        if host is not None:
            self.host = None
            host.active_rq -= 1
            cluster = self.cluster
            st = cluster.stats
            st.upstream_rq_active.value -= 1
            st.upstream_rq_completed.value += 1
            if self.high:
                cluster.high.rq_active -= 1

    def _upstream_complete(self) -> None:
        now = self.loop.time()
        self.cluster.stats.upstream_rq_time.record((now - self.attempt_start) * 1000)
        self.deadline = 0.0
        if self.timeout_handle is not None or self.per_try_handle is not None:
            self._cancel_timers()
        self._end_attempt()
        conn = self.conn
        self.conn = None
        self.done = True
        if conn is not None:
            conn.release()
        if self.shadows is not None:
            self._end_shadows()  # the downstream stream ends with this response

    def on_stream_done(self) -> None:
        """The downstream stream finished (normally or by reset)."""
        if not self.done:
            self.reset()

    def reset(self) -> None:
        """Abandon the upstream side (downstream went away or the stream was reset)."""
        if self.shadows is not None:
            self._end_shadows()
        if self.done and self.conn is None and self.pending is None:
            return
        self.done = True
        self._cancel_timers()
        if self.backoff_handle is not None:
            self.backoff_handle.cancel()
            self.backoff_handle = None
            self._retry_level().active_retries -= 1  # the retry slot taken in _retry()
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
            st = self.cluster.stats
            st.upstream_rq_cancelled.value += 1
        conn = self.conn
        self.conn = None
        if conn is not None:
            self.cluster.stats.upstream_rq_tx_reset.value += 1
            conn.abort()
        self._end_attempt()

    def _end_shadows(self) -> None:
        """Shadows still sending are cancelled; the others finish on their own."""
        shadows = self.shadows
        self.shadows = None
        for s in shadows or ():
            s.downstream_done()

    def _local_failure(self, status: int, body: bytes, flag: str, details: str) -> None:
        self.done = True
        self._cancel_timers()
        stream = self.stream
        if self.response_started:
            stream.info.response_flags.append(flag)
            stream.reset_stream()
            return
        stream.send_local_reply(status, body, flag, details)

    # -- retries -------------------------------------------------------------------
    def _choose_other_priority(self, every: int, exclude: Any) -> Any:
        """``previous_priorities``: after every ``every`` attempts the priorities tried so far
        are avoided for this pick (Envoy keeps the set between updates; here it is rebuilt)."""
        tried = self.tried
        if tried is None or self.attempts % every:
            return self.cluster.choose_host(exclude, self)
        return self.cluster.choose_host_excluding({h.priority for h in tried}, exclude)

    def _retry_allowed(self) -> bool:
        if self.retries_left <= 0 or not self.downstream_end or self.response_started:
            return False
        if self.body_bytes and not self.retain:
            return False
        st = self.cluster.stats
        level = self._retry_level()
        if level.active_retries >= level.retries_limit():
            st.upstream_rq_retry_overflow.value += 1
            return False
        return True

    def _maybe_retry_reset(self, connect_failure: bool) -> bool:
        policy = self.policy
        if policy is None:
            return False
        on = policy.retry_on
        want = RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RESET
        if connect_failure:
            want |= RETRY_CONNECT_FAILURE
        if not on & want:
            return False
        return self._retry()

    def _retry_level(self) -> Any:
        """Where this request's concurrent retries count: the cluster (DEFAULT priority) or its
        ``HighPriority`` (a priority HIGH route); both have ``active_retries`` and
        ``retries_limit()``."""
        cluster = self.cluster
        return cluster.high if self.high else cluster

    def _retry(self, reset: float | None = None) -> bool:
        """Start the back-off to the next attempt; ``reset``: the rate-limited back-off's delay
        from the response's reset header, jittered up by half as Envoy does."""
        if not self._retry_allowed():
            if self.retries_left <= 0 and self.policy is not None:
                self.cluster.stats.upstream_rq_retry_limit_exceeded.value += 1
            return False
        self.retries_left -= 1
        self.cluster.stats.upstream_rq_retry.value += 1
        self.is_retry = True
        self._cancel_per_try()
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
        self._end_attempt()
        cluster = self.cluster
        level = self._retry_level()
        level.active_retries += 1
        if reset is not None:
            delay = reset * (1.0 + random.random() / 2)
            cluster.stats.upstream_rq_retry_backoff_ratelimited.value += 1
        else:
            delay = self.policy.backoff(self.attempts - 1, random.random()) if self.policy else 0.0

        def go() -> None:
            level.active_retries -= 1
            self._start_attempt()

        self.backoff_handle = self.loop.call_later(delay, go)
        return True

    # -- timers --------------------------------------------------------------------
    def _start_global_timer(self) -> None:
        t = self.timeout
        if t and not self.tunnel and self.timeout_handle is None and not self.deadline:
            if t >= self.stream.cfg.lazy_timeout_min:
                # Long enough for the connection's periodic check (which fires at most a tenth
                # of the shortest configured timeout late): no timer object per request.
                self.deadline = self.loop.time() + t
            else:
                self.timeout_handle = self.loop.call_later(t, self._on_global_timeout)

    def _start_per_try_timer(self) -> None:
        p = self.policy
        if p is not None and p.per_try_timeout and self.per_try_handle is None and not self.response_started:
            self.per_try_handle = self.loop.call_later(p.per_try_timeout, self._on_per_try_timeout)

    def _cancel_per_try(self) -> None:
        if self.per_try_handle is not None:
            self.per_try_handle.cancel()
            self.per_try_handle = None

    def _cancel_timers(self) -> None:
        self.deadline = 0.0
        if self.timeout_handle is not None:
            self.timeout_handle.cancel()
            self.timeout_handle = None
        self._cancel_per_try()

    def _on_global_timeout(self) -> None:
        self.timeout_handle = None
        self.deadline = 0.0
        if self.done:
            return
        self.cluster.stats.upstream_rq_timeout.value += 1
        if self.backoff_handle is not None:
            self.backoff_handle.cancel()
            self.backoff_handle = None
            self._retry_level().active_retries -= 1
        self._abandon_attempt()
        self._local_failure(
            504, b"upstream request timeout", flags.UPSTREAM_REQUEST_TIMEOUT, "upstream_response_timeout"
        )

    def _on_per_try_timeout(self) -> None:
        self.per_try_handle = None
        if self.done or self.response_started:
            return
        self.cluster.stats.upstream_rq_per_try_timeout.value += 1
        self._abandon_attempt()
        p = self.policy
        if p is not None and p.retry_on & (RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RESET) and self._retry():
            return
        self._local_failure(
            504, b"upstream request timeout", flags.UPSTREAM_REQUEST_TIMEOUT, "upstream_per_try_timeout"
        )

    def _abandon_attempt(self) -> None:
        od = self.cluster.outlier
        if od is not None and self.host is not None and not self.response_started:
            od.put_result(self.host, _OD_TIMEOUT)  # (only the timeouts abandon an attempt)
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.abort()
        self._end_attempt()
