"""Active health checking of a cluster's hosts (Envoy's ``Cluster.health_checks``).

``compile_health_check(proto, cluster, path)`` validates one ``envoy.config.core.v3.HealthCheck``
(``ConfigError`` with the field path) and returns a ``HealthChecker``; the cluster keeps it as
``cluster.health_checker`` and runs it from ``Cluster.start()`` with the connect function the
server hands the cluster manager (``moorline.net.upstream.connect``: ``upstream/`` never opens a
socket itself). It stops with the cluster (``Cluster.stop()`` / ``retire()``).

Per host, one session: a ``loop.call_later`` timer (no task, no thread), one connection per check
(closed after the answer), a timeout timer. The kinds of check:

- TCP: connect, write the ``send`` payload, succeed once every ``receive`` payload has arrived in
  order (empty ``receive``: a connect is enough).
- HTTP/1.1 (``codec_client_type`` HTTP1, the default) and HTTP/2 (``h2`` client): ``method``
  (GET) ``path`` with ``host`` (else the cluster's name) as the authority; the status must fall
  in ``expected_statuses`` (default ``[200, 201)``); ``x-envoy-degraded`` in the answer marks the
  host degraded.
- gRPC: ``grpc.health.v1.Health/Check`` over HTTP/2 with ``service_name``, ``authority``
  (default: the cluster's name) and ``initial_metadata``; ``SERVING`` with ``grpc-status: 0``
  passes.

Outcomes follow Envoy: a network failure (refused, reset, closed, timed out) counts towards
``unhealthy_threshold``; an answer that fails the check (a status outside ``expected_statuses``
and ``retriable_statuses``, a TCP payload that never matched before the peer closed,
``NOT_SERVING``) marks the host unhealthy at once. ``healthy_threshold`` passes in a row bring it
back, except the host's very first check, where one pass is enough. While the checker is
configured, a host that joins the cluster starts with ``failed_active_hc`` until its first pass
(a replacing cluster's copies of old hosts keep their last active state).

The next check is scheduled after the outcome: ``no_traffic_interval`` (default 60 s;
``no_traffic_healthy_interval`` for a healthy host) until the cluster has opened a connection,
``unhealthy_edge_interval`` / ``healthy_edge_interval`` right after a flip, ``unhealthy_interval``
while unhealthy, else ``interval``; plus a random ``interval_jitter`` and
``interval_jitter_percent`` of the base. The first check waits a random ``initial_jitter``.

Stats ``cluster.<name>.health_check.``: ``attempt``, ``success``, ``failure``,
``network_failure``, ``passive_failure`` (always 0: outlier detection does not feed it),
``verify_cluster`` (0: ``service_name_matcher`` is not checked), gauges ``healthy`` and
``degraded``.

Bounds: an HTTP/1.1 answer is read up to the end of its head, at most ``MAX_RESPONSE_HEAD``
bytes (more is a failed check); a TCP or gRPC answer up to ``response_buffer_size`` / 64 KiB.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.util import duration_s, opt_duration_s

log = logging.getLogger("moorline.health_check")

MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_BODY = 64 * 1024
DEFAULT_NO_TRAFFIC_INTERVAL = 60.0
GRPC_PATH = "/grpc.health.v1.Health/Check"

# Connect function: (loop, host, protocol, timeout, keepalive, on_done(error, timed_out)) -> cancel
Connect = Callable[..., Callable[[], None]]

# Outcomes of one check.
PASS, FAIL, FAIL_RETRIABLE, NETWORK = "pass", "fail", "fail_retriable", "network"

_METHODS = {0: "GET", 1: "GET", 2: "HEAD", 3: "POST", 4: "PUT", 5: "DELETE", 6: "CONNECT", 7: "OPTIONS"}
_METHODS.update({8: "TRACE", 9: "PATCH"})


class HealthCheckStats:
    __slots__ = (
        "attempt",
        "degraded",
        "failure",
        "healthy",
        "network_failure",
        "passive_failure",
        "success",
        "verify_cluster",
    )

    def __init__(self, scope: Any) -> None:
        self.attempt = scope.counter("attempt")
        self.success = scope.counter("success")
        self.failure = scope.counter("failure")
        self.network_failure = scope.counter("network_failure")
        self.passive_failure = scope.counter("passive_failure")
        self.verify_cluster = scope.counter("verify_cluster")
        self.healthy = scope.gauge("healthy")
        self.degraded = scope.gauge("degraded")


# -- the checks themselves (asyncio protocols; net/ connects them) ----------------------------


class _Check(asyncio.Protocol):
    """One check on one connection; ``done(outcome, degraded)`` is called exactly once."""

    def __init__(self, done: Callable[[str, bool], None]) -> None:
        self._done: Callable[[str, bool], None] | None = done
        self.transport: asyncio.Transport | None = None

    def finish(self, outcome: str, degraded: bool = False) -> None:
        done, self._done = self._done, None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if done is not None:
            done(outcome, degraded)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.start()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._done is not None:
            self.closed()

    def start(self) -> None: ...

    def closed(self) -> None:
        self.finish(NETWORK)


class _TcpCheck(_Check):
    def __init__(self, done: Callable[[str, bool], None], send: bytes, receive: list[bytes]) -> None:
        super().__init__(done)
        self.send = send
        self.receive = receive
        self.buf = bytearray()
        self.limit = max(MAX_RESPONSE_BODY, sum(len(r) for r in receive))

    def start(self) -> None:
        assert self.transport is not None
        if self.send:
            self.transport.write(self.send)
        if not self.receive:
            self.finish(PASS)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        for r in self.receive:
            i = self.buf.find(r, pos)
            if i < 0:
                break
            pos = i + len(r)
        else:
            self.finish(PASS)
            return
        if len(self.buf) > self.limit:
            self.finish(FAIL)

    def closed(self) -> None:
        # Bytes arrived but never matched: the peer answered wrongly (an active failure).
        self.finish(FAIL if self.buf else NETWORK)


class _Http1Check(_Check):
    def __init__(
        self, done: Callable[[str, bool], None], request: bytes, judge: Callable[[int], str]
    ) -> None:
        super().__init__(done)
        self.request = request
        self.judge = judge
        self.buf = bytearray()

    def start(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_RESPONSE_HEAD:
                self.finish(FAIL)
            return
        head = bytes(self.buf[:end]).split(b"\r\n")
        parts = head[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self.finish(FAIL)
            return
        status = int(parts[1])
        if 100 <= status < 200:  # (an interim answer: the final one follows)
            del self.buf[: end + 4]
            if self.buf:
                self.data_received(b"")
            return
        degraded = any(line.lower().startswith(b"x-envoy-degraded:") for line in head[1:])
        self.finish(self.judge(status), degraded)


class _H2Check(_Check):
    """One request on a fresh HTTP/2 connection (HTTP checks with HTTP2, and gRPC)."""

    def __init__(
        self,
        done: Callable[[str, bool], None],
        headers: list[tuple[str, str]],
        body: bytes,
        evaluate: Callable[[dict[str, str], bytes, dict[str, str]], tuple[str, bool]],
    ) -> None:
        super().__init__(done)
        import h2.config
        import h2.connection

        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.headers = headers
        self.body = body
        self.evaluate = evaluate
        self.resp: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.data = bytearray()

    def start(self) -> None:
        assert self.transport is not None
        c = self.conn
        c.initiate_connection()
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, self.headers, end_stream=not self.body)
        if self.body:
            c.send_data(sid, self.body, end_stream=True)
        self.transport.write(c.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.finish(FAIL)
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                self.resp = {str(k): str(v) for k, v in ev.headers}
            elif isinstance(ev, h2.events.TrailersReceived):
                self.trailers = {str(k): str(v) for k, v in ev.headers}
            elif isinstance(ev, h2.events.DataReceived):
                self.data += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if len(self.data) > MAX_RESPONSE_BODY:
                    self.finish(FAIL)
                    return
            elif isinstance(ev, h2.events.StreamEnded):
                outcome, degraded = self.evaluate(self.resp, bytes(self.data), self.trailers)
                self.finish(outcome, degraded)
                return
            elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                self.finish(NETWORK)
                return
        if self.transport is not None:
            out = self.conn.data_to_send()
            if out:
                self.transport.write(out)


def _grpc_request(service: str) -> bytes:
    msg = b""
    if service:
        raw = service.encode()
        msg = b"\x0a" + _varint(len(raw)) + raw
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def grpc_serving_status(body: bytes) -> int | None:
    """The ``status`` of a length-prefixed ``HealthCheckResponse`` (1 is SERVING); None when
    the message cannot be read. Status 0 (UNKNOWN) is the proto default, encoded as nothing."""
    if len(body) < 5 or body[0] != 0:
        return None
    n = int.from_bytes(body[1:5], "big")
    msg = body[5 : 5 + n]
    if len(msg) != n:
        return None
    i, status = 0, 0
    while i < len(msg):
        tag = msg[i]
        i += 1
        wire = tag & 7
        val = 0
        shift = 0
        if wire == 0:
            while i < len(msg):
                b = msg[i]
                i += 1
                val |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            if tag >> 3 == 1:
                status = val
        elif wire == 2:
            ln = 0
            while i < len(msg):
                b = msg[i]
                i += 1
                ln |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            i += ln
        else:
            return None
    return status


# -- compiled configuration -----------------------------------------------------------------


def _ranges(rs: Any, path: str) -> list[tuple[int, int]]:
    out = []
    for i, r in enumerate(rs):
        if not 100 <= r.start < r.end <= 600:
            raise ConfigError(f"{path}[{i}]", "must be a range [start, end) of statuses within 100..600")
        out.append((r.start, r.end))
    return out


def _payload(p: Any, path: str) -> bytes:
    if p.WhichOneof("payload") == "text":
        try:
            return bytes.fromhex(p.text)
        except ValueError:
            raise ConfigError(f"{path}.text", "must be hex") from None
    return bytes(p.binary)


class HealthChecker:
    """The compiled ``HealthCheck`` of one cluster, and its per-host sessions once started."""

    def __init__(self, cluster: Any, rng: random.Random | None = None) -> None:
        self.cluster = cluster
        self.rng = rng or random.Random()
        self.timeout = 1.0
        self.interval = 1.0
        self.unhealthy_interval = 1.0
        self.unhealthy_edge_interval = 1.0
        self.healthy_edge_interval = 1.0
        self.no_traffic_interval = DEFAULT_NO_TRAFFIC_INTERVAL
        self.no_traffic_healthy_interval: float | None = None
        self.initial_jitter = 0.0
        self.interval_jitter = 0.0
        self.interval_jitter_percent = 0
        self.unhealthy_threshold = 1
        self.healthy_threshold = 1
        self.always_log_failures = False
        self.kind = "tcp"
        # TCP
        self.send = b""
        self.receive: list[bytes] = []
        # HTTP / gRPC
        self.http2 = False
        self.request: bytes = b""
        self.h2_headers: list[tuple[str, str]] = []
        self.expected: list[tuple[int, int]] = [(200, 201)]
        self.retriable: list[tuple[int, int]] = []
        self.grpc_body = b""
        self.stats = HealthCheckStats(cluster.stats.scope.scope("health_check."))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect: Connect | None = None
        self._sessions: dict[Any, _Session] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, connect: Connect) -> None:
        if self._loop is not None:
            return
        self._loop = loop
        self._connect = connect
        self.sync()

    def stop(self) -> None:
        for s in self._sessions.values():
            s.cancel()
        self._sessions.clear()
        self._loop = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def sync(self) -> None:
        """Membership changed: sessions for new hosts, none for hosts that left."""
        if self._loop is None:
            return
        hosts = set(self.cluster.hosts)
        for h in list(self._sessions):
            if h not in hosts:
                self._sessions.pop(h).cancel()
        for h in self.cluster.hosts:
            if h not in self._sessions:
                s = self._sessions[h] = _Session(self, h)
                s.schedule(self.rng.uniform(0, self.initial_jitter) if self.initial_jitter > 0 else 0.0)
        self._gauges()

    def _gauges(self) -> None:
        hosts = self.cluster.hosts
        self.stats.healthy.value = sum(1 for h in hosts if not h.failed_active_hc)
        self.stats.degraded.value = sum(1 for s in self._sessions.values() if s.degraded)

    # -- one check ---------------------------------------------------------------------------

    def judge(self, status: int) -> str:
        if any(a <= status < b for a, b in self.expected):
            return PASS
        if any(a <= status < b for a, b in self.retriable):
            return FAIL_RETRIABLE
        return FAIL

    def _eval_http2(self, headers: dict[str, str], body: bytes, trailers: dict[str, str]) -> tuple[str, bool]:
        st = headers.get(":status", "")
        if not st.isdigit():
            return FAIL, False
        return self.judge(int(st)), "x-envoy-degraded" in headers

    def _eval_grpc(self, headers: dict[str, str], body: bytes, trailers: dict[str, str]) -> tuple[str, bool]:
        if headers.get(":status") != "200":
            return FAIL, False
        gs = trailers.get("grpc-status", headers.get("grpc-status"))
        if gs != "0":
            return FAIL, False
        return (PASS if grpc_serving_status(body) == 1 else FAIL), False

    def make_check(self, done: Callable[[str, bool], None]) -> _Check:
        if self.kind == "tcp":
            return _TcpCheck(done, self.send, self.receive)
        if self.kind == "grpc":
            return _H2Check(done, self.h2_headers, self.grpc_body, self._eval_grpc)
        if self.http2:
            return _H2Check(done, self.h2_headers, b"", self._eval_http2)
        return _Http1Check(done, self.request, self.judge)

    def next_interval(self, host: Any, flipped: bool) -> float:
        healthy = not host.failed_active_hc
        if self.cluster.stats.upstream_cx_total.value == 0:
            base = self.no_traffic_interval
            if healthy and self.no_traffic_healthy_interval is not None:
                base = self.no_traffic_healthy_interval
        elif flipped:
            base = self.healthy_edge_interval if healthy else self.unhealthy_edge_interval
        elif not healthy:
            base = self.unhealthy_interval
        else:
            base = self.interval
        jitter = 0.0
        if self.interval_jitter_percent:
            jitter += self.rng.uniform(0, base * self.interval_jitter_percent / 100)
        if self.interval_jitter:
            jitter += self.rng.uniform(0, self.interval_jitter)
        return base + jitter


class _Session:
    """The checks of one host: a timer, at most one check in flight."""

    __slots__ = (
        "cancel_connect",
        "check",
        "checker",
        "degraded",
        "first",
        "host",
        "n_healthy",
        "n_unhealthy",
        "timer",
    )

    def __init__(self, checker: HealthChecker, host: Any) -> None:
        self.checker = checker
        self.host = host
        self.timer: asyncio.TimerHandle | None = None
        self.cancel_connect: Callable[[], None] | None = None
        self.check: _Check | None = None
        self.first = True
        self.n_healthy = 0
        self.n_unhealthy = 0
        self.degraded = False

    def schedule(self, delay: float) -> None:
        loop = self.checker._loop
        if loop is not None:
            self.timer = loop.call_later(delay, self.run)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._abort()

    def _abort(self) -> None:
        cc, self.cancel_connect = self.cancel_connect, None
        if cc is not None:
            cc()
        chk, self.check = self.check, None
        if chk is not None:
            chk._done = None
            chk.finish(NETWORK)

    def run(self) -> None:
        ck = self.checker
        loop, connect = ck._loop, ck._connect
        self.timer = None
        if loop is None or connect is None:
            return
        ck.stats.attempt.value += 1
        chk = self.check = ck.make_check(self.outcome)
        self.timer = loop.call_later(ck.timeout, self.timed_out)

        def connected(err: BaseException | None, timed_out: bool) -> None:
            self.cancel_connect = None
            if err is not None and self.check is chk:
                # (a TLS check that failed after the transport was made: close it too)
                self.check = None
                chk._done = None
                chk.finish(NETWORK)
                self.outcome(NETWORK, False)

        self.cancel_connect = connect(loop, self.host, chk, ck.timeout, None, connected)

    def timed_out(self) -> None:
        self.timer = None
        self._abort()
        self.outcome(NETWORK, False)

    def outcome(self, outcome: str, degraded: bool) -> None:
        ck = self.checker
        if ck._loop is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.check = None
        host = self.host
        st = ck.stats
        was_failed = bool(host.failed_active_hc)
        if outcome == PASS:
            st.success.value += 1
            self.n_unhealthy = 0
            od = getattr(host.cluster, "outlier", None)
            if od is not None and host.outlier_ejected:
                od.on_health_check_success(host)  # (successful_active_health_check_uneject_host)
            if was_failed:
                self.n_healthy += 1
                if self.first or self.n_healthy >= ck.healthy_threshold:
                    host.failed_active_hc = False
                    self.n_healthy = 0
            self.degraded = degraded
        else:
            st.failure.value += 1
            if outcome == NETWORK:
                st.network_failure.value += 1
            self.n_healthy = 0
            if not was_failed:
                self.n_unhealthy += 1
                if outcome == FAIL or self.n_unhealthy >= ck.unhealthy_threshold:
                    host.failed_active_hc = True
                    self.n_unhealthy = 0
            if ck.always_log_failures:
                log.info(
                    "health check of %s in cluster %s failed (%s)", host.addr_str, ck.cluster.name, outcome
                )
        self.first = False
        flipped = was_failed != bool(host.failed_active_hc)
        if flipped:
            host.healthy = host.eds_healthy and not host.failed_active_hc
            log.info(
                "cluster %s: host %s is now %s by active health checks",
                ck.cluster.name,
                host.addr_str,
                "unhealthy" if host.failed_active_hc else "healthy",
            )
            ck.cluster.health_changed()
        ck._gauges()
        self.schedule(ck.next_interval(host, flipped))


def compile_health_check(
    proto: Any, cluster: Any, path: str, rng: random.Random | None = None
) -> HealthChecker | None:
    """One ``HealthCheck`` -> ``HealthChecker``; None (with a notice) for a kind not supported."""
    c = cluster
    hc = HealthChecker(cluster, rng)
    timeout = duration_s(proto.timeout) if proto.HasField("timeout") else None
    interval = duration_s(proto.interval) if proto.HasField("interval") else None
    if not timeout or timeout <= 0:
        raise ConfigError(f"{path}.timeout", "is required and must be greater than 0")
    if not interval or interval <= 0:
        raise ConfigError(f"{path}.interval", "is required and must be greater than 0")
    if not proto.HasField("unhealthy_threshold"):
        raise ConfigError(f"{path}.unhealthy_threshold", "is required")
    if not proto.HasField("healthy_threshold"):
        raise ConfigError(f"{path}.healthy_threshold", "is required")
    hc.timeout, hc.interval = timeout, interval
    hc.unhealthy_threshold = max(1, proto.unhealthy_threshold.value)
    hc.healthy_threshold = max(1, proto.healthy_threshold.value)

    def positive(field: str, default: float) -> float:
        v = opt_duration_s(proto, field)
        if v is None:
            return default
        if v <= 0:
            raise ConfigError(f"{path}.{field}", "must be greater than 0")
        return v

    hc.unhealthy_interval = positive("unhealthy_interval", interval)
    hc.unhealthy_edge_interval = positive("unhealthy_edge_interval", hc.unhealthy_interval)
    hc.healthy_edge_interval = positive("healthy_edge_interval", interval)
    hc.no_traffic_interval = positive("no_traffic_interval", DEFAULT_NO_TRAFFIC_INTERVAL)
    if proto.HasField("no_traffic_healthy_interval"):
        hc.no_traffic_healthy_interval = positive("no_traffic_healthy_interval", hc.no_traffic_interval)
    hc.initial_jitter = opt_duration_s(proto, "initial_jitter", 0.0) or 0.0
    hc.interval_jitter = opt_duration_s(proto, "interval_jitter", 0.0) or 0.0
    hc.interval_jitter_percent = proto.interval_jitter_percent
    hc.always_log_failures = proto.always_log_health_check_failures
    for field, why in (
        ("alt_port", "checks go to the host's own port"),
        ("event_log_path", "health check events go to the application log"),
        ("event_service", "health check events go to the application log"),
        ("tls_options", "checks use the cluster's transport socket as it is"),
        ("transport_socket_match_criteria", "checks use the cluster's transport socket"),
    ):
        if proto.HasField(field) if field not in ("event_log_path",) else getattr(proto, field):
            c.notice(f"{path}.{field}: {why}; ignored")
    if proto.event_logger:
        c.notice(f"{path}.event_logger: health check events go to the application log; ignored")
    if proto.always_log_health_check_success:
        c.notice(f"{path}.always_log_health_check_success: only flips and failures are logged; ignored")
    if proto.HasField("reuse_connection") and proto.reuse_connection.value:
        c.notice(f"{path}.reuse_connection: each check opens its own connection; ignored")

    kind = proto.WhichOneof("health_checker")
    if kind is None:
        raise ConfigError(path, "one of http_health_check, tcp_health_check, grpc_health_check is required")
    if kind == "custom_health_check":
        c.notice(
            f"{path}.custom_health_check: custom health checkers are not supported; this check is ignored"
        )
        return None
    authority_default = cluster.name
    if kind == "tcp_health_check":
        t = proto.tcp_health_check
        hc.kind = "tcp"
        hc.send = _payload(t.send, f"{path}.tcp_health_check.send") if t.HasField("send") else b""
        hc.receive = [_payload(r, f"{path}.tcp_health_check.receive[{i}]") for i, r in enumerate(t.receive)]
        hc.receive = [r for r in hc.receive if r]
        if t.HasField("proxy_protocol_config"):
            c.notice(f"{path}.tcp_health_check.proxy_protocol_config: PROXY protocol is not sent; ignored")
    elif kind == "http_health_check":
        h = proto.http_health_check
        p = f"{path}.http_health_check"
        hc.kind = "http"
        if not h.path or not h.path.startswith("/") or any(ch in h.path for ch in "\r\n "):
            raise ConfigError(f"{p}.path", "is required and must be an absolute path")
        if h.codec_client_type == 2:
            raise ConfigError(f"{p}.codec_client_type", "HTTP3 health checks are not supported")
        hc.http2 = h.codec_client_type == 1
        if h.expected_statuses:
            hc.expected = _ranges(h.expected_statuses, f"{p}.expected_statuses")
        hc.retriable = _ranges(h.retriable_statuses, f"{p}.retriable_statuses")
        method = _METHODS.get(h.method, "GET")
        if method == "CONNECT":
            raise ConfigError(f"{p}.method", "CONNECT cannot be a health check method")
        for field in ("send", "receive"):
            if h.HasField(field) if field == "send" else len(getattr(h, field)):
                c.notice(f"{p}.{field}: payload matching of HTTP checks is not implemented; ignored")
        if h.HasField("service_name_matcher"):
            c.notice(f"{p}.service_name_matcher: the checked cluster's name is not verified; ignored")
        if h.HasField("response_buffer_size"):
            c.notice(f"{p}.response_buffer_size: the answer's head is read up to 64 KiB; ignored")
        headers = _extra_headers(h.request_headers_to_add, f"{p}.request_headers_to_add")
        remove = {n.lower() for n in h.request_headers_to_remove}
        authority = h.host or authority_default
        base = [("user-agent", "Envoy/HC")]
        base = [(k, v) for k, v in base if k not in remove]
        extra = [(k, v) for k, v in headers if k not in remove]
        if hc.http2:
            hc.h2_headers = [
                (":method", method),
                (":scheme", "http"),
                (":authority", authority),
                (":path", h.path),
            ]
            hc.h2_headers += base + extra
        else:
            lines = [f"{method} {h.path} HTTP/1.1", f"host: {authority}"]
            lines += [f"{k}: {v}" for k, v in base + extra]
            lines.append("connection: close")
            hc.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    else:
        g = proto.grpc_health_check
        p = f"{path}.grpc_health_check"
        hc.kind = "grpc"
        hc.grpc_body = _grpc_request(g.service_name)
        hc.h2_headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", g.authority or authority_default),
            (":path", GRPC_PATH),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "Envoy/HC"),
        ]
        hc.h2_headers += _extra_headers(g.initial_metadata, f"{p}.initial_metadata")
    return hc


def _extra_headers(opts: Any, path: str) -> list[tuple[str, str]]:
    out = []
    for i, o in enumerate(opts):
        k = o.header.key.lower()
        v = o.header.value or o.header.raw_value.decode("latin-1", "replace")
        if not k or k.startswith(":") or k == "host" or any(ch in k + v for ch in "\r\n\0"):
            raise ConfigError(f"{path}[{i}].header", "must be a valid, non-pseudo header")
        out.append((k, v))
    return out
