"""Active health checking of a cluster's hosts (Envoy's ``Cluster.health_checks``).

``compile_health_checks(protos, cluster)`` validates each ``envoy.config.core.v3.HealthCheck``
(``compile_health_check``: ``ConfigError`` with the field path, a ``HealthChecker``) and returns
one ``HealthChecks`` for all of them; the cluster keeps it as ``cluster.health_checker`` and runs
it from ``Cluster.start()`` with the connect function the server hands the cluster manager
(``moorline.net.upstream.connect``: ``upstream/`` never opens a socket itself). It stops with the
cluster (``Cluster.stop()`` / ``retire()``), closing every check connection.

Per check and host, one session: a ``loop.call_later`` timer (no task, no thread), a timeout
timer, at most one check in flight. ``reuse_connection`` (Envoy's default: true) keeps the
session's connection open after a passing check and sends the next check on it: HTTP/1.1 keep-alive
(the answer's ``content-length`` body is read and dropped; an answer that says ``connection:
close``, HTTP/1.0, or a body without a length ends the connection), HTTP/2 and gRPC (one
connection, a new stream per check; pings and settings between checks are answered), TCP (the next
``send`` on the same connection; bytes between checks are dropped). A failed check, a timeout, a
peer that closes or sends bytes nobody asked for: the next check reconnects. ``reuse_connection:
false``: one connection per check, closed after the answer (HTTP/1.1 asks ``connection: close``).
The kinds of check:

- TCP: connect, write the ``send`` payload, succeed once every ``receive`` payload has arrived in
  order (empty ``receive``: a connect is enough).
- HTTP/1.1 (``codec_client_type`` HTTP1, the default) and HTTP/2 (``h2`` client): ``method``
  (GET) ``path`` with ``host`` (else the cluster's name) as the authority; the status must fall
  in ``expected_statuses`` (default ``[200, 201)``); ``x-envoy-degraded`` in the answer marks the
  host degraded.
- gRPC: ``grpc.health.v1.Health/Check`` over HTTP/2 with ``service_name``, ``authority``
  (default: the cluster's name) and ``initial_metadata``; ``SERVING`` with ``grpc-status: 0``
  passes.

Several checks: every one runs, each with its own thresholds and intervals, and each session
keeps its own verdict; a host is active-healthy only while every check passes it
(``host.failed_active_hc`` is true while any of its sessions is failed; Envoy's checkers share
that one flag, so one checker's pass can clear what another set: the rule here is what a user
expects of "all checks must pass"). They count in one ``health_check.*`` scope, as Envoy's do.

Warming (as Envoy's initialization docs describe it: a cluster with active health checks is
initialized only after one round of them): ``HealthChecks.init`` is one of the cluster's
``init_targets``. The round begins once the cluster's other targets are done (its first EDS
assignment, its secrets; a DNS cluster's first resolution) with the hosts it has then, and ends
when each of them has had its first check from every checker, pass or fail; a first check that
never answers ends at its ``timeout`` (after ``initial_jitter``), so the round is bounded. A
static cluster holds the server's start-up (``ClusterManager.start()`` awaits it, and no listener
binds before; a static EDS cluster over ADS does not, since xDS starts after the clusters), a
CDS cluster warms aside (the cluster it replaces serves) until the round ends. Until a host's
first checks, it carries ``failed_active_hc`` (all failed: panic mode balances over them).

Outcomes follow Envoy: a network failure (refused, reset, closed, timed out) counts towards
``unhealthy_threshold``; an answer that fails the check (a status outside ``expected_statuses``
and ``retriable_statuses``, a TCP payload that never matched before the peer closed,
``NOT_SERVING``) marks the host unhealthy at once. ``healthy_threshold`` passes in a row bring it
back, except the host's very first check, where one pass is enough. While checks are
configured, a host that joins the cluster starts with ``failed_active_hc`` until its first pass
of every check (a replacing cluster's copies of old hosts keep their last active state).

The next check is scheduled after the outcome: ``no_traffic_interval`` (default 60 s;
``no_traffic_healthy_interval`` for a healthy host) until the cluster has opened a connection,
``unhealthy_edge_interval`` / ``healthy_edge_interval`` right after a flip, ``unhealthy_interval``
while unhealthy, else ``interval``; plus a random ``interval_jitter`` and
``interval_jitter_percent`` of the base. The first check waits a random ``initial_jitter``.

Stats ``cluster.<name>.health_check.``: ``attempt``, ``success``, ``failure``,
``network_failure``, ``passive_failure`` (always 0: outlier detection does not feed it),
``verify_cluster`` (0: ``service_name_matcher`` is not checked), gauges ``healthy`` and
``degraded``.

Bounds: an HTTP/1.1 answer's head is read up to ``MAX_RESPONSE_HEAD`` bytes (more is a failed
check), its body (with reuse) is counted and dropped, never kept; a TCP or gRPC answer up to
``response_buffer_size`` / 64 KiB; one connection per session.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.util import duration_s, opt_duration_s
from moorline.config.warming import InitTarget, pending, when_all_ready

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
    """A check connection: one check at a time (``begin(done)``), ``done(outcome, degraded)``
    called exactly once per check. With ``reuse`` the connection stays open after a pass for the
    session's next check (``reusable``); a failure, a timeout or a peer that asked to close ends
    it. Without ``reuse`` every check closes its connection."""

    def __init__(self, reuse: bool = False) -> None:
        self._done: Callable[[str, bool], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.reuse = reuse
        self.keep = reuse  # False once this connection cannot carry another check

    def begin(self, done: Callable[[str, bool], None]) -> None:
        self._done = done
        if self.transport is not None:
            self.start()

    @property
    def reusable(self) -> bool:
        t = self.transport
        return self.keep and self._done is None and t is not None and not t.is_closing()

    def finish(self, outcome: str, degraded: bool = False) -> None:
        done, self._done = self._done, None
        if not (self.keep and outcome == PASS):
            self.close()
        if done is not None:
            done(outcome, degraded)

    def close(self) -> None:
        self.keep = False
        t, self.transport = self.transport, None
        if t is not None:
            t.close()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self._done is not None:
            self.start()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.keep = False
        if self._done is not None:
            self.closed()

    def data_received(self, data: bytes) -> None:
        if self._done is None:
            self.idle_data(data)
        else:
            self.received(data)

    def start(self) -> None: ...

    def received(self, data: bytes) -> None: ...

    def idle_data(self, data: bytes) -> None:
        """Bytes between checks on a kept connection: nothing is owed, so the peer is out of
        step; the next check reconnects."""
        self.close()

    def closed(self) -> None:
        self.finish(NETWORK)


class _TcpCheck(_Check):
    def __init__(self, send: bytes, receive: list[bytes], reuse: bool = False) -> None:
        # Without a ``receive`` payload the check is a connect test: a fresh connection each
        # time, whatever ``reuse_connection`` says (Envoy closes it too), or a peer that kept
        # the first connection open but stopped serving would pass for ever.
        super().__init__(reuse and bool(receive))
        self.send = send
        self.receive = receive
        self.buf = bytearray()
        self.limit = max(MAX_RESPONSE_BODY, sum(len(r) for r in receive))

    def start(self) -> None:
        assert self.transport is not None
        self.buf.clear()
        if self.send:
            self.transport.write(self.send)
        if not self.receive:
            self.finish(PASS)

    def received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        for r in self.receive:
            i = self.buf.find(r, pos)
            if i < 0:
                break
            pos = i + len(r)
        else:
            self.buf.clear()
            self.finish(PASS)
            return
        if len(self.buf) > self.limit:
            self.finish(FAIL)

    def idle_data(self, data: bytes) -> None:
        pass  # (more of the last answer than ``receive`` asked for: dropped, not kept)

    def closed(self) -> None:
        # Bytes arrived but never matched: the peer answered wrongly (an active failure).
        self.finish(FAIL if self.buf else NETWORK)


class _Http1Check(_Check):
    """An HTTP/1.1 check. Without reuse the request says ``connection: close`` and the head
    decides; with reuse the answer's body (``content-length`` framed) is read and dropped
    before the check is done, so the next request starts on a clean connection. An answer
    that says ``connection: close``, or whose body has no length (chunked, or up to the close),
    is judged on its head and the connection closed."""

    def __init__(
        self, request: bytes, judge: Callable[[int], str], reuse: bool = False, no_body: bool = False
    ) -> None:
        super().__init__(reuse)
        self.request = request
        self.judge = judge
        self.no_body = no_body  # (HEAD checks: an answer never has a body)
        self.buf = bytearray()
        self.skip = 0  # body bytes still to drop before the pending verdict
        self.verdict: tuple[str, bool] | None = None

    def start(self) -> None:
        assert self.transport is not None
        self.buf.clear()
        self.skip = 0
        self.verdict = None
        self.transport.write(self.request)

    def received(self, data: bytes) -> None:
        if self.verdict is not None:
            self._body(data)
            return
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
                self.received(b"")
            return
        fields: dict[bytes, bytes] = {}
        lengths = 0
        for line in head[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            fields[k] = v.strip().lower()
            lengths += k == b"content-length"
        degraded = b"x-envoy-degraded" in fields
        verdict = (self.judge(status), degraded)
        rest = bytes(self.buf[end + 4 :])
        self.buf.clear()
        if self.keep:
            length = fields.get(b"content-length", b"")
            if b"close" in fields.get(b"connection", b"") or parts[0] == b"HTTP/1.0":
                self.keep = False
            elif self.no_body or status in (204, 304):
                pass
            elif length.isdigit() and lengths == 1 and b"transfer-encoding" not in fields:
                self.skip = int(length)
            else:
                self.keep = False
        if not self.keep:
            self.finish(*verdict)
            return
        self.verdict = verdict
        self._body(rest)

    def _body(self, data: bytes) -> None:
        n = min(self.skip, len(data))
        self.skip -= n
        if len(data) > n:
            self.keep = False  # (bytes beyond the answer: out of step)
        if self.skip == 0 and self.verdict is not None:
            verdict, self.verdict = self.verdict, None
            self.finish(*verdict)


class _H2Check(_Check):
    """HTTP checks with HTTP2, and gRPC: a request per check; with reuse one connection carries
    a stream per check (pings and settings between checks are answered)."""

    def __init__(
        self,
        headers: list[tuple[str, str]],
        body: bytes,
        evaluate: Callable[[dict[str, str], bytes, dict[str, str]], tuple[str, bool]],
        reuse: bool = False,
    ) -> None:
        super().__init__(reuse)
        import h2.config
        import h2.connection

        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.headers = headers
        self.body = body
        self.evaluate = evaluate
        self.initiated = False
        self.sid = 0
        self.resp: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.data = bytearray()

    def start(self) -> None:
        assert self.transport is not None
        c = self.conn
        if not self.initiated:
            self.initiated = True
            c.initiate_connection()
        self.resp, self.trailers = {}, {}
        self.data.clear()
        import h2.exceptions

        try:
            sid = self.sid = c.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:  # (used up: a fresh connection next time)
            self.keep = False
            self.finish(NETWORK)
            return
        c.send_headers(sid, self.headers, end_stream=not self.body)
        if self.body:
            c.send_data(sid, self.body, end_stream=True)
        self.transport.write(c.data_to_send())

    def _events(self, data: bytes) -> list[Any] | None:
        import h2.exceptions

        try:
            return self.conn.receive_data(data)  # type: ignore[no-any-return]
        except h2.exceptions.ProtocolError:
            return None

    def idle_data(self, data: bytes) -> None:
        import h2.events

        events = self._events(data)
        if events is None or any(isinstance(ev, h2.events.ConnectionTerminated) for ev in events):
            self.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):  # (late data of an ended stream: the
                # connection's window is given back, the bytes dropped)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self._flush()

    def _flush(self) -> None:
        if self.transport is not None:
            out = self.conn.data_to_send()
            if out:
                self.transport.write(out)

    def received(self, data: bytes) -> None:
        import h2.events

        events = self._events(data)
        if events is None:
            self.finish(FAIL)
            return
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.keep = False
                self.finish(NETWORK)
                return
            if getattr(ev, "stream_id", self.sid) != self.sid:
                if isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                continue
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
                self.data.clear()
                self._flush()
                self.finish(outcome, degraded)
                return
            elif isinstance(ev, h2.events.StreamReset):
                self.finish(NETWORK)
                return
        self._flush()


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
    """One compiled ``HealthCheck`` of a cluster: what to send, how to judge the answer, when
    to check next. Its sessions (one per host) are run by the cluster's ``HealthChecks``."""

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
        self.reuse = True  # (reuse_connection: Envoy's default is true)
        self.kind = "tcp"
        # TCP
        self.send = b""
        self.receive: list[bytes] = []
        # HTTP / gRPC
        self.http2 = False
        self.request: bytes = b""
        self.head_request = False
        self.h2_headers: list[tuple[str, str]] = []
        self.expected: list[tuple[int, int]] = [(200, 201)]
        self.retriable: list[tuple[int, int]] = []
        self.grpc_body = b""

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

    def make_check(self) -> _Check:
        """A new check connection (its first check begun by the session)."""
        if self.kind == "tcp":
            return _TcpCheck(self.send, self.receive, self.reuse)
        if self.kind == "grpc":
            return _H2Check(self.h2_headers, self.grpc_body, self._eval_grpc, self.reuse)
        if self.http2:
            return _H2Check(self.h2_headers, b"", self._eval_http2, self.reuse)
        return _Http1Check(self.request, self.judge, self.reuse, self.head_request)

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


class HealthChecks:
    """Every health check of one cluster (``cluster.health_checker``) and their sessions: one
    per (check, host). A host is active-healthy only while every check passes it: each session
    keeps its own verdict and ``host.failed_active_hc`` is true while any of the host's sessions
    is failed (Envoy's checkers share that one flag). One ``health_check.*`` stats scope for all
    of them, as in Envoy. ``init`` is the cluster's warming target for the first round."""

    def __init__(self, cluster: Any, checkers: list[HealthChecker]) -> None:
        self.cluster = cluster
        self.checkers = checkers
        self.stats = HealthCheckStats(cluster.stats.scope.scope("health_check."))
        self.init = InitTarget(f"health checks of cluster {cluster.name}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect: Connect | None = None
        self._sessions: dict[Any, list[_Session]] = {}
        # The first round: sessions whose first check is still owed (None: not begun), and
        # what start-up awaits.
        self._first: set[_Session] | None = None
        self._round: asyncio.Future[None] | None = None
        self._cancel_wait: Callable[[], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, connect: Connect) -> None:
        if self._loop is not None:
            return
        self._loop = loop
        self._connect = connect
        self._round = loop.create_future()
        self.sync()

    def stop(self) -> None:
        for ss in self._sessions.values():
            for s in ss:
                s.cancel()
        self._sessions.clear()
        self._loop = None
        self._first = None
        if self._cancel_wait is not None:
            self._cancel_wait()
            self._cancel_wait = None
        rnd, self._round = self._round, None
        if rnd is not None and not rnd.done():
            rnd.set_result(None)  # (nothing waits on a stopped cluster)

    @property
    def running(self) -> bool:
        return self._loop is not None

    async def initialize(self, others: list[InitTarget]) -> None:
        """The first round: it begins once the cluster's other init targets are done (its
        first EDS assignment, its secrets), with the hosts it has then, and ends when each of
        them has had its first check from every checker (pass, fail or timeout, so it is
        bounded by ``initial_jitter`` + ``timeout``); ``init`` is done then. Returns when the
        round ends, or at once when it waits on the other targets (a static EDS cluster over
        ADS: start-up does not wait for xDS)."""
        if self._loop is None:
            self.init.done()  # (not run: no connect function)
            return
        if self._cancel_wait is None and self._first is None and not self.init.ready:
            self._cancel_wait = when_all_ready(others, self._begin_round)
        if pending(others):
            return
        rnd = self._round
        if rnd is not None and not rnd.done():
            await rnd

    def _begin_round(self) -> None:
        self._cancel_wait = None
        if self._loop is None or self._first is not None:
            return
        self._first = {s for ss in self._sessions.values() for s in ss if s.first}
        self._first_done(None)

    def _first_done(self, s: _Session | None) -> None:
        first = self._first
        if first is None:
            return
        first.discard(s)  # type: ignore[arg-type]
        if not first:
            self.init.done()
            if self._round is not None and not self._round.done():
                self._round.set_result(None)

    def sync(self) -> None:
        """Membership changed: sessions for new hosts, none for hosts that left."""
        if self._loop is None:
            return
        hosts = set(self.cluster.hosts)
        for h in list(self._sessions):
            if h not in hosts:
                for s in self._sessions.pop(h):
                    s.cancel()
                    if self._first is not None and s in self._first:
                        self._first_done(s)
        for h in self.cluster.hosts:
            if h not in self._sessions:
                ss = self._sessions[h] = [_Session(self, ck, h) for ck in self.checkers]
                for s in ss:
                    j = s.checker.initial_jitter
                    s.schedule(s.checker.rng.uniform(0, j) if j > 0 else 0.0)
        self._gauges()

    def _gauges(self) -> None:
        hosts = self.cluster.hosts
        self.stats.healthy.value = sum(1 for h in hosts if not h.failed_active_hc)
        self.stats.degraded.value = sum(1 for ss in self._sessions.values() if any(s.degraded for s in ss))

    def immediate_fail(self, host: Any) -> None:
        """An answer from ``host`` carried ``x-envoy-immediate-health-check-fail``: every check
        has it failed now (Envoy's immediate health check fail); ``healthy_threshold`` passes
        bring it back."""
        ss = self._sessions.get(host)
        if not ss or self._loop is None:
            return
        for s in ss:
            s.failed = True
            s.n_healthy = s.n_unhealthy = 0
        if not host.failed_active_hc:
            host.failed_active_hc = True
            host.healthy = False
            log.info(
                "cluster %s: host %s is now unhealthy (x-envoy-immediate-health-check-fail)",
                self.cluster.name,
                host.addr_str,
            )
            self.cluster.health_changed()
            self._gauges()

    def verdict(self, host: Any) -> bool:
        """True (failed) while any check of ``host`` has it failed."""
        return any(s.failed for s in self._sessions.get(host, ()))


class _Session:
    """The checks of one checker on one host: a timer, at most one check in flight, and the
    check connection kept between checks when the checker reuses connections."""

    __slots__ = (
        "cancel_connect",
        "checker",
        "conn",
        "degraded",
        "failed",
        "first",
        "group",
        "host",
        "n_healthy",
        "n_unhealthy",
        "timer",
    )

    def __init__(self, group: HealthChecks, checker: HealthChecker, host: Any) -> None:
        self.group = group
        self.checker = checker
        self.host = host
        self.timer: asyncio.TimerHandle | None = None
        self.cancel_connect: Callable[[], None] | None = None
        self.conn: _Check | None = None
        self.first = True
        # This check's own verdict; a new host starts failed, a replacing cluster's copy of a
        # host starts with the host's last verdict.
        self.failed = bool(host.failed_active_hc)
        self.n_healthy = 0
        self.n_unhealthy = 0
        self.degraded = False

    def schedule(self, delay: float) -> None:
        loop = self.group._loop
        if loop is not None:
            self.timer = loop.call_later(delay, self.run)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._abort()

    def _abort(self) -> None:
        """Drop the connection (a check in flight on it gets no outcome)."""
        cc, self.cancel_connect = self.cancel_connect, None
        if cc is not None:
            cc()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn._done = None
            conn.close()

    def run(self) -> None:
        g, ck = self.group, self.checker
        loop, connect = g._loop, g._connect
        self.timer = None
        if loop is None or connect is None:
            return
        g.stats.attempt.value += 1
        self.timer = loop.call_later(ck.timeout, self.timed_out)
        conn = self.conn
        if conn is not None and conn.reusable:
            conn.begin(self.outcome)
            return
        self._abort()
        conn = self.conn = ck.make_check()
        conn.begin(self.outcome)

        def connected(err: BaseException | None, timed_out: bool) -> None:
            self.cancel_connect = None
            if err is not None and self.conn is conn:
                # (a TLS check that failed after the transport was made: close it too)
                self.conn = None
                conn._done = None
                conn.close()
                self.outcome(NETWORK, False)

        self.cancel_connect = connect(loop, self.host, conn, ck.timeout, None, connected)

    def timed_out(self) -> None:
        self.timer = None
        self._abort()
        self.outcome(NETWORK, False)

    def outcome(self, outcome: str, degraded: bool) -> None:
        g, ck = self.group, self.checker
        if g._loop is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.conn is not None and not self.conn.reusable:
            self.conn = None  # (closed by the check, or by the peer)
        host = self.host
        st = g.stats
        if outcome == PASS:
            st.success.value += 1
            self.n_unhealthy = 0
            od = getattr(host.cluster, "outlier", None)
            if od is not None and host.outlier_ejected:
                od.on_health_check_success(host)  # (successful_active_health_check_uneject_host)
            if self.failed:
                self.n_healthy += 1
                if self.first or self.n_healthy >= ck.healthy_threshold:
                    self.failed = False
                    self.n_healthy = 0
            self.degraded = degraded
        else:
            st.failure.value += 1
            if outcome == NETWORK:
                st.network_failure.value += 1
            self.n_healthy = 0
            if not self.failed:
                self.n_unhealthy += 1
                if outcome == FAIL or self.n_unhealthy >= ck.unhealthy_threshold:
                    self.failed = True
                    self.n_unhealthy = 0
            if ck.always_log_failures:
                log.info(
                    "health check of %s in cluster %s failed (%s)", host.addr_str, ck.cluster.name, outcome
                )
        was_failed = bool(host.failed_active_hc)
        now_failed = g.verdict(host)
        flipped = was_failed != now_failed
        if flipped:
            host.failed_active_hc = now_failed
            host.healthy = host.eds_healthy and not now_failed
            log.info(
                "cluster %s: host %s is now %s by active health checks",
                ck.cluster.name,
                host.addr_str,
                "unhealthy" if now_failed else "healthy",
            )
            ck.cluster.health_changed()
        g._gauges()
        if self.first:
            self.first = False
            g._first_done(self)
        self.schedule(ck.next_interval(host, flipped))


def compile_health_checks(protos: Any, cluster: Any, rng: random.Random | None = None) -> HealthChecks | None:
    """``Cluster.health_checks`` -> ``HealthChecks`` (None when no check is run)."""
    checkers = []
    for i, p in enumerate(protos):
        ck = compile_health_check(p, cluster, f"health_checks[{i}]", rng)
        if ck is not None:
            checkers.append(ck)
    return HealthChecks(cluster, checkers) if checkers else None


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
    hc.reuse = proto.reuse_connection.value if proto.HasField("reuse_connection") else True

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
            if not hc.reuse:
                lines.append("connection: close")
            hc.head_request = method == "HEAD"
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
