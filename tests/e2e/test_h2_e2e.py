"""HTTP/2 through moorline: h2c prior knowledge (curl, h2load, a raw h2 client) to an HTTP/1.1
upstream and to an HTTP/2 upstream (nginx h2c), HTTP/1.1 clients to the HTTP/2 upstream, flow
control with a client that stops reading, and each flood protection attacked with raw frames,
after which another client must still be served.

The second part pins the codec, the downstream HTTP/2 connection, the upstream HTTP/2 pool and
the router/HCM use of them against scripted ``h2`` upstreams (:class:`H2Upstream`, one per test
cluster, so each test's cluster gauges are its own), on a second moorline (module fixture
``scripted``). Flow-control states are reached without timing: a side that wants to know
whether its peer stopped granting window sends PING and reads up to the PING ACK (the peer
answers PING in the same read it processed our DATA in, so a WINDOW_UPDATE it would send comes
no later than the ACK). A test marked ``xfail(strict=True, reason="finding N: ...")`` shows a
bug that is still there; remove the marker together with the fix."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from moorline.protocol.http2 import PREFACE, _KeepOpenStateMachine
from moorline.testing import procs
from moorline.testing.upstream import TestUpstream, pattern_sha256

sys.path.insert(0, str(Path(__file__).parent / "grpc_svc"))
import h2_raw

pytestmark = pytest.mark.e2e
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/")]


@dataclass
class Env:
    port: int
    up: TestUpstream
    proc: procs.MoorlineProc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not Path(procs.NGINX_BIN).exists():
        pytest.skip("nginx is not installed")
    tmp = tmp_path_factory.mktemp("h2")
    up = TestUpstream(upstream_id="h1").start()
    ngx_port = procs.free_port()
    ngx = procs.start_nginx(
        tmp,
        f"""
    server {{
        listen 127.0.0.1:{ngx_port} http2;
        location / {{
            default_type text/plain;
            return 200 "hello from nginx h2 $server_protocol\\n";
        }}
    }}
""",
        ngx_port,
    )
    port = procs.free_port()
    h2c = procs.cluster(
        "ngx",
        [ngx_port],
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    )
    routes = [
        {"match": {"prefix": "/ngx/"}, "route": {"cluster": "ngx"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "up"}},
    ]
    cfg = procs.config_http(port, [procs.cluster("up", [up.port]), h2c], routes=routes)
    proc = procs.start_moorline(cfg, tmp / "moorline")
    try:
        yield Env(port, up, proc)
    finally:
        proc.stop()
        ngx.stop()
        up.stop()


def curl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], input=data, capture_output=True, timeout=30)


def served(env: Env) -> None:
    """Another client still gets an answer over HTTP/2."""
    r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{env.port}/ok")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == "/ok"
    assert env.proc.alive()


def test_h2c_to_http1_upstream(env: Env) -> None:
    r = curl("--http2-prior-knowledge", "-D", "-", f"http://127.0.0.1:{env.port}/hello?x=1")
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    doc = json.loads(body)
    assert doc["path"] == "/hello?x=1" and doc["http_version"] == "1.1"
    assert ["host", f"127.0.0.1:{env.port}"] in doc["headers"]


def test_h2c_post_body_to_http1_upstream(env: Env) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, several windows
    r = curl("--http2-prior-knowledge", "--data-binary", "@-", f"http://127.0.0.1:{env.port}/post", data=body)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["body_len"] == len(body) and doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_large_response_and_trailers_from_http1_upstream(env: Env) -> None:
    r = h2_raw.request(env.port, b"/bytes/3000000")
    assert r.status == 200 and len(r.data) == 3_000_000
    assert hashlib.sha256(r.data).hexdigest() == pattern_sha256(3_000_000)
    t = h2_raw.request(env.port, b"/trailers", headers=[(b"te", b"trailers")])
    assert t.status == 200
    assert (b"x-trailer-a", b"1") in t.trailers


def test_h2c_to_h2_upstream(env: Env) -> None:
    r = curl("--http2-prior-knowledge", f"http://127.0.0.1:{env.port}/ngx/a")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello from nginx h2 HTTP/2.0\n"


def test_http1_client_to_h2_upstream(env: Env) -> None:
    r = curl("--http1.1", "-D", "-", f"http://127.0.0.1:{env.port}/ngx/b")
    assert r.stdout.startswith(b"HTTP/1.1 200")
    assert r.stdout.endswith(b"hello from nginx h2 HTTP/2.0\n")
    # chunked request body: translated to DATA frames
    r = curl(
        "--http1.1",
        "-H",
        "transfer-encoding: chunked",
        "--data-binary",
        "@-",
        f"http://127.0.0.1:{env.port}/ngx/c",
        data=b"x" * 100_000,
    )
    assert r.returncode == 0 and r.stdout == b"hello from nginx h2 HTTP/2.0\n", r.stderr
    assert env.proc.stat("cluster.ngx.upstream_cx_http2_total") >= 1


def test_h2load_smoke(env: Env) -> None:
    h2load = shutil.which("h2load")
    if h2load is None:
        pytest.skip("h2load is not installed")
    r = subprocess.run(
        [h2load, "-n", "1000", "-c", "4", "-m", "10", f"http://127.0.0.1:{env.port}/"],
        capture_output=True,
        timeout=120,
    )
    out = r.stdout.decode()
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    assert m, out
    assert m.group(4) == "1000" and m.group(5) == "0", out
    assert env.proc.stat("http.listener_http.downstream_rq_http2_total") >= 1000
    assert env.proc.stat("http.listener_http.downstream_cx_http2_total") >= 4


def test_slow_reader_is_flow_controlled(env: Env) -> None:
    # The client opens a 64 KiB window and never acknowledges: moorline must stop reading the
    # upstream instead of buffering the 40 MB response.
    c = h2_raw.H2Client(env.port, window=65535)
    base = env.proc.rss_kb()
    sid = c.send([*GET[:3], (b":path", b"/bytes/40000000")])
    deadline = time.monotonic() + 1.5
    c.sock.settimeout(0.2)
    while time.monotonic() < deadline:
        c.read_once()
    assert len(c.results[sid].data) <= 65535
    assert env.proc.rss_kb() - base < 20_000
    c.close()
    served(env)


# -- attacks -------------------------------------------------------------------------------


def attack_conn(env: Env) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    s.sendall(PREFACE + SettingsFrame(0).serialize())
    return s


def hdrs(enc: Encoder, sid: int, headers: list[tuple[bytes, bytes]], end_headers: bool = True) -> bytes:
    f = HeadersFrame(sid)
    f.data = enc.encode(headers)
    f.flags.add("END_STREAM")
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


def closed_by_peer(s: socket.socket, limit: int = 200_000_000) -> bytes:
    """Read until EOF/reset (at most ``limit`` bytes); returns what was read."""
    got = bytearray()
    try:
        while len(got) < limit:
            d = s.recv(1 << 20)
            if not d:
                break
            got += d
    except (ConnectionResetError, TimeoutError):
        pass
    s.close()
    return bytes(got)


def test_rapid_reset_attack(env: Env) -> None:
    before_up = len(env.up.requests)
    s = attack_conn(env)
    enc = Encoder()
    out = []
    for i in range(1000):
        sid = 1 + 2 * i
        out.append(hdrs(enc, sid, [*GET[:3], (b":path", b"/rr")]))
        r = RstStreamFrame(sid)
        r.error_code = 8
        out.append(r.serialize())
    try:
        s.sendall(b"".join(out))
    except OSError:
        pass
    closed_by_peer(s)
    assert env.proc.stat("http.listener_http.downstream_rq_too_many_premature_resets") >= 1
    assert env.proc.stat("http2.goaway_sent") >= 1
    assert len(env.up.requests) - before_up < 100  # the attack cost few upstream requests
    served(env)


def test_continuation_flood(env: Env) -> None:
    s = attack_conn(env)
    enc = Encoder()
    cont = ContinuationFrame(1)
    cont.data = b""
    try:
        s.sendall(hdrs(enc, 1, GET, end_headers=False) + cont.serialize() * 10_000)
    except OSError:
        pass
    closed_by_peer(s)
    assert env.proc.stat("http2.too_many_header_frames") >= 1
    served(env)


def test_oversized_headers(env: Env) -> None:
    s = attack_conn(env)
    enc = Encoder()
    big = [*GET, *[(b"x-h%d" % i, b"v" * 10_000) for i in range(8)]]  # 80 KB > 60 KiB default
    block = enc.encode(big)
    frames = []
    for i in range(0, len(block), 16384):
        last = i + 16384 >= len(block)
        f = HeadersFrame(1) if i == 0 else ContinuationFrame(1)
        f.data = block[i : i + 16384]
        if i == 0:
            f.flags.add("END_STREAM")
        if last:
            f.flags.add("END_HEADERS")
        frames.append(f.serialize())
    s.sendall(b"".join(frames))
    closed_by_peer(s)
    assert env.proc.stat("http2.header_overflow") >= 1
    served(env)


def test_ping_flood(env: Env) -> None:
    s = attack_conn(env)
    s.settimeout(5)
    ping = PingFrame(0)
    ping.opaque_data = b"flooding"
    chunk = ping.serialize() * 10_000
    try:
        for _ in range(100):  # up to 1M PINGs, never reading the answers
            s.sendall(chunk)
    except OSError:
        pass
    s.close()
    for _ in range(100):
        if env.proc.stat("http2.outbound_control_flood") >= 1:
            break
        time.sleep(0.05)
    assert env.proc.stat("http2.outbound_control_flood") >= 1
    served(env)


def test_empty_data_frames_flood(env: Env) -> None:
    s = attack_conn(env)
    enc = Encoder()
    f = HeadersFrame(1)
    f.data = enc.encode([(b":method", b"POST"), *GET[1:]])
    f.flags.add("END_HEADERS")
    s.sendall(f.serialize() + DataFrame(1).serialize() * 100)
    closed_by_peer(s)
    assert env.proc.stat("http2.inbound_empty_frames_flood") >= 1
    served(env)


def test_huge_hpack_table_setting_is_capped(env: Env) -> None:
    c = h2_raw.H2Client(env.port)
    c.conn.update_settings({0x1: 2**30})
    c.flush()
    for i in range(3):
        sid = c.send([*GET[:3], (b":path", b"/t%d" % i), (b"x-big", b"v" * 3000)])
        r = c.wait(sid)
        assert r.status == 200
    c.close()
    served(env)


def test_drain_sends_goaway_and_finishes_streams_in_flight(
    moorline: object, upstream: TestUpstream, tmp_path: Path
) -> None:
    port = procs.free_port()
    proc = moorline(procs.config_http(port, {"up": [upstream.port]}))  # type: ignore[operator]
    idle = h2_raw.H2Client(port)
    assert idle.wait(idle.send([*GET[:3], (b":path", b"/first")])).status == 200
    busy = h2_raw.H2Client(port)
    sid = busy.send([*GET[:3], (b":path", b"/delay/1500")])
    time.sleep(0.3)  # let the request reach the upstream (not a timing assertion)
    assert proc.admin_post("/drain_listeners").status == 200
    r = busy.wait(sid)
    assert r.status == 200 and json.loads(r.data)["path"] == "/delay/1500"
    while not busy.closed:
        busy.read_once()
    assert r.goaway == 0  # GOAWAY NO_ERROR, after which the connection closed
    while not idle.closed:
        idle.read_once()
    assert idle.results[1].goaway == 0
    assert proc.stat("http2.goaway_sent") >= 2


# =============================================================================================
# Scripted HTTP/2 upstreams: windows, queues, concurrency limits, gRPC deadlines
# =============================================================================================

H = "127.0.0.1"
WAIT = 10.0  # upper bound for any single wait (never a timing assertion)


# ---------------------------------------------------------------------------------------------
# A scripted HTTP/2 upstream
# ---------------------------------------------------------------------------------------------


@dataclass
class UpStream:
    sid: int
    path: str
    headers: dict[bytes, bytes]
    body: int = 0
    ended: bool = False
    reset: bool = False
    out: int = 0  # bytes still to send
    out_end: bool = False
    responded: bool = False
    stalled_check: bool = False


class H2Upstream:
    """A threaded h2c server. Behaviour by path prefix:

    - ``/ok``: 200 with a 5000-byte body once the request ended.
    - ``/hold``: 200 once ``release`` is set (request body read and acknowledged).
    - ``/early``: never acknowledges request DATA; answers 200 END_STREAM (no RST_STREAM) once
      ``respond_early`` is set.
    - ``/stall``: 200 and then DATA as long as the window allows; when the window stays shut
      (checked with a PING barrier) it ends the stream with an empty DATA END_STREAM and sets
      ``stalled``.
    - ``/sink``: never acknowledges request DATA, never answers.
    - ``/badstatus``: answers ``:status: abc`` (malformed, RFC 9113 8.3.2) with END_STREAM.
    """

    def __init__(self, max_concurrent_streams: int | None = None) -> None:
        self.mcs = max_concurrent_streams
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((H, 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.release = threading.Event()
        self.respond_early = threading.Event()
        self.stalled = threading.Event()
        self.requests: list[UpStream] = []
        self.conns = 0
        self.resets: list[int] = []
        self.stop_ev = threading.Event()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def start(self) -> H2Upstream:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def stop(self) -> None:
        self.stop_ev.set()
        self.release.set()
        self.respond_early.set()
        with contextlib.suppress(OSError):
            self.lsock.close()

    def _accept(self) -> None:
        while not self.stop_ev.is_set():
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.conns += 1
            t = threading.Thread(target=self._serve, args=(s,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, sock: socket.socket) -> None:
        # Outbound validation off: /badstatus sends a malformed :status on purpose.
        cfg = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False
        )
        c = h2.connection.H2Connection(cfg)
        c.state_machine = _KeepOpenStateMachine()
        c.initiate_connection()
        if self.mcs is not None:
            c.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.mcs})
        sock.sendall(c.data_to_send())
        sock.settimeout(0.05)
        streams: dict[int, UpStream] = {}
        try:
            while not self.stop_ev.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    data = None
                if data == b"":
                    return
                if data:
                    for ev in c.receive_data(data):
                        self._event(c, streams, ev)
                self._tick(c, streams)
                out = c.data_to_send()
                if out:
                    sock.sendall(out)
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            sock.close()

    def _event(self, c: h2.connection.H2Connection, streams: dict[int, UpStream], ev: Any) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            hd = dict(ev.headers)
            st = UpStream(ev.stream_id, hd.get(b":path", b"").decode(), hd)
            st.ended = ev.stream_ended is not None
            streams[ev.stream_id] = st
            with self.lock:
                self.requests.append(st)
        elif isinstance(ev, h2.events.DataReceived):
            st = streams.get(ev.stream_id)
            if st is None:
                return
            st.body += len(ev.data)
            if not (st.path.startswith("/early") or st.path.startswith("/sink")):
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if ev.stream_ended is not None:
                st.ended = True
        elif isinstance(ev, h2.events.StreamReset):
            st = streams.pop(ev.stream_id, None)
            if st is not None:
                st.reset = True
            with self.lock:
                self.resets.append(ev.stream_id)
        elif isinstance(ev, h2.events.PingAckReceived):
            for st in streams.values():
                if st.stalled_check:
                    st.stalled_check = False
                    if st.out and self._window(c, st.sid) == 0:
                        # The window stayed shut across a round trip: the peer stopped reading.
                        st.out = 0
                        c.send_data(st.sid, b"", end_stream=True)
                        self.stalled.set()

    @staticmethod
    def _window(c: h2.connection.H2Connection, sid: int) -> int:
        try:
            return int(c.local_flow_control_window(sid))
        except h2.exceptions.StreamClosedError:
            return 0

    def _tick(self, c: h2.connection.H2Connection, streams: dict[int, UpStream]) -> None:
        for st in list(streams.values()):
            if st.reset:
                continue
            if not st.responded:
                p = st.path
                go = (
                    (p.startswith("/ok") and st.ended)
                    or (p.startswith("/hold") and self.release.is_set())
                    or (p.startswith("/early") and self.respond_early.is_set())
                    or p.startswith("/stall")
                    or p.startswith("/badstatus")
                )
                if not go:
                    continue
                st.responded = True
                if p.startswith("/early"):
                    c.send_headers(st.sid, [(b":status", b"200")], end_stream=True)
                    continue
                if p.startswith("/badstatus"):
                    c.send_headers(st.sid, [(b":status", b"abc")], end_stream=True)
                    continue
                c.send_headers(st.sid, [(b":status", b"200")])
                st.out = 5000 if not p.startswith("/stall") else 4 << 20
                st.out_end = not p.startswith("/stall")
            if st.out:
                w = min(self._window(c, st.sid), c.max_outbound_frame_size)
                while st.out and w > 0:
                    n = min(w, st.out)
                    st.out -= n
                    c.send_data(st.sid, b"x" * n, end_stream=(st.out == 0 and st.out_end))
                    w = min(self._window(c, st.sid), c.max_outbound_frame_size)
                if st.out and w <= 0 and st.path.startswith("/stall") and not st.stalled_check:
                    st.stalled_check = True
                    c.ping(b"stallchk")
            if st.responded and not st.out and st.sid in streams:
                if st.out_end or st.path.startswith(("/stall", "/early", "/badstatus")):
                    streams.pop(st.sid, None)


# ---------------------------------------------------------------------------------------------
# A raw h2 client
# ---------------------------------------------------------------------------------------------


@dataclass
class Res:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False

    @property
    def status(self) -> int:
        for k, v in self.headers:
            if k == b":status":
                return int(v)
        return 0


class Client:
    def __init__(self, port: int, ack: bool = True, timeout: float = WAIT) -> None:
        self.sock = socket.create_connection((H, port), timeout=timeout)
        self.c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.c.state_machine = _KeepOpenStateMachine()
        self.c.initiate_connection()
        self.ack = ack
        self.res: dict[int, Res] = {}
        self.goaway: int | None = None
        self.closed = False
        self.pings = 0
        self.flush()

    def flush(self) -> None:
        d = self.c.data_to_send()
        if d:
            self.sock.sendall(d)

    def open(
        self,
        path: bytes,
        method: bytes = b"GET",
        extra: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> int:
        sid = self.c.get_next_available_stream_id()
        hs = [(b":method", method), (b":scheme", b"http"), (b":authority", b"t"), (b":path", path)]
        self.c.send_headers(sid, hs + (extra or []), end_stream=end)
        self.res[sid] = Res()
        self.flush()
        return sid

    def read_once(self) -> bool:
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            self.closed = True
            return False
        for ev in self.c.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            r = self.res.get(sid) if sid else None
            if isinstance(ev, h2.events.ResponseReceived) and r is not None:
                r.headers = list(ev.headers)
            elif isinstance(ev, h2.events.InformationalResponseReceived) and r is not None:
                r.informational.append(list(ev.headers))
            elif isinstance(ev, h2.events.DataReceived):
                if r is not None:
                    r.data += ev.data
                if self.ack:
                    self.c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived) and r is not None:
                r.trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded) and r is not None:
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset) and r is not None:
                r.reset = int(ev.error_code)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = int(ev.error_code)
            elif isinstance(ev, h2.events.PingAckReceived):
                self.pings += 1
        self.flush()
        return True

    def wait(self, sid: int) -> Res:
        r = self.res[sid]
        while not (r.ended or r.reset is not None) and not self.closed:
            self.read_once()
        return r

    def barrier(self) -> None:
        """Round trip: everything sent before was processed by the peer."""
        n = self.pings
        self.c.ping(b"barrier!")
        self.flush()
        while self.pings == n and not self.closed:
            self.read_once()

    def send_body(self, sid: int, body: bytes) -> None:
        """Send ``body`` and END_STREAM, within the peer's windows (fails if they stay shut)."""
        while body:
            w = min(self.c.local_flow_control_window(sid), self.c.max_outbound_frame_size, len(body))
            if w <= 0:
                self.barrier()  # read the peer's SETTINGS / WINDOW_UPDATEs
                assert self.c.local_flow_control_window(sid) > 0, "peer stopped granting window"
                continue
            self.c.send_data(sid, body[:w], end_stream=len(body) == w)
            body = body[w:]
            self.flush()

    def send_until_stalled(self, sid: int, limit: int = 8 << 20) -> int:
        """Send DATA on ``sid`` while the peer grants window; stop once the window stays shut
        across a PING round trip. Returns the bytes sent."""
        sent = 0
        while sent < limit and not self.closed:
            w = min(self.c.local_flow_control_window(sid), self.c.max_outbound_frame_size)
            if w > 0:
                self.c.send_data(sid, b"u" * w)
                sent += w
                self.flush()
                continue
            self.barrier()
            if self.c.local_flow_control_window(sid) == 0:
                return sent
        return sent

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# One moorline for the module
# ---------------------------------------------------------------------------------------------


def h2_cluster(name: str, port: int, h2opts: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return procs.cluster(
        name,
        [port],
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": h2opts or {}},
            }
        },
        **extra,
    )


SMALL_WINDOWS = {"initial_stream_window_size": 65535, "initial_connection_window_size": 65535}


@dataclass
class ScriptedEnv:
    port: int
    small_port: int
    proc: procs.MoorlineProc
    ups: dict[str, H2Upstream]
    h1: TestUpstream

    def stat(self, name: str) -> int:
        return self.proc.stat(name)

    def wait_stat(self, name: str, want: int) -> int:
        deadline = time.monotonic() + WAIT
        v = self.stat(name)
        while v != want and time.monotonic() < deadline:
            time.sleep(0.05)
            v = self.stat(name)
        return v


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScriptedEnv]:
    ups = {
        "win": H2Upstream().start(),
        "early": H2Upstream(max_concurrent_streams=1).start(),
        "pend": H2Upstream(max_concurrent_streams=1).start(),
        "sink": H2Upstream().start(),
        "bad": H2Upstream().start(),
    }
    h1 = TestUpstream(upstream_id="h1").start()
    clusters = [
        h2_cluster("win", ups["win"].port, SMALL_WINDOWS),
        h2_cluster("early", ups["early"].port),
        h2_cluster(
            "pend",
            ups["pend"].port,
            circuit_breakers={"thresholds": [{"max_connections": 1, "max_pending_requests": 1}]},
        ),
        h2_cluster("sink", ups["sink"].port),
        h2_cluster("bad", ups["bad"].port),
        procs.cluster("h1", [h1.port]),
    ]
    routes = [
        {"match": {"prefix": "/win/"}, "route": {"cluster": "win", "timeout": "2s"}},
        {"match": {"prefix": "/early/"}, "route": {"cluster": "early", "timeout": "2s"}},
        {"match": {"prefix": "/pend/"}, "route": {"cluster": "pend", "timeout": "20s"}},
        {"match": {"prefix": "/sink/"}, "route": {"cluster": "sink", "timeout": "20s"}},
        {"match": {"prefix": "/bad/"}, "route": {"cluster": "bad", "timeout": "20s"}},
        {"match": {"prefix": "/direct"}, "direct_response": {"status": 200, "body": {"inline_string": "d"}}},
        {
            # Legacy max_grpc_timeout 0s: Envoy uses the grpc-timeout header, and no timeout at all
            # for a gRPC request without one (router.cc FilterUtility::finalTimeout).
            "match": {"prefix": "/gt/"},
            "route": {"cluster": "h1", "timeout": "1s", "max_grpc_timeout": "0s", "prefix_rewrite": "/"},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "h1"}},
    ]
    # Strip the /win/, /early/, /pend/, /sink/, /bad/ prefixes: the scripted upstream dispatches on its
    # own paths.
    for r in routes[:5]:
        r["route"]["prefix_rewrite"] = "/"
    port = procs.free_port()
    small_port = procs.free_port()
    main = procs.hcm_listener("listener_http", port, routes)
    small = procs.hcm_listener(
        "listener_small",
        small_port,
        routes,
        hcm_extra={"http2_protocol_options": dict(SMALL_WINDOWS)},
    )
    cfg = procs.bootstrap([main, small], clusters)
    proc = procs.start_moorline(cfg, tmp_path_factory.mktemp("h2review") / "moorline")
    try:
        yield ScriptedEnv(port, small_port, proc, ups, h1)
    finally:
        proc.stop()
        for u in ups.values():
            u.stop()
        h1.stop()


def no_tracebacks(scripted: ScriptedEnv) -> None:
    assert "Traceback" not in scripted.proc.stderr_text(), scripted.proc.stderr_text()[-4000:]


# ---------------------------------------------------------------------------------------------
# Finding 1: the window of bytes held for a read-paused stream is never handed back
# ---------------------------------------------------------------------------------------------


def test_upstream_connection_window_survives_a_slow_reader(scripted: ScriptedEnv) -> None:
    up = scripted.ups["win"]
    # A client that never acknowledges: moorline queues the response for it, pauses the upstream
    # stream (stops window updates) and the upstream fills moorline's windows.
    slow = Client(scripted.port, ack=False)
    sid = slow.open(b"/win/stall")
    assert up.stalled.wait(WAIT), "the upstream never saw its window shut"
    # The upstream ended the response while moorline held the window: moorline released the
    # upstream stream. Its held bytes must go back to the upstream connection's window.
    slow.barrier()
    assert slow.res[sid].status == 200
    slow.close()
    scripted.wait_stat("cluster.win.upstream_rq_active", 0)
    # Another client, same upstream connection: its response must flow.
    c = Client(scripted.port)
    r = c.wait(c.open(b"/win/ok"))
    c.close()
    assert up.conns == 1  # the same upstream connection carried both
    assert r.reset is None and r.status == 200 and len(r.data) == 5000
    no_tracebacks(scripted)


def test_downstream_connection_window_survives_a_cancelled_upload(scripted: ScriptedEnv) -> None:
    # Upload to an upstream that never grants window: moorline pauses reading the client's
    # stream (no WINDOW_UPDATE) once its own queue is full; the client fills the windows.
    c = Client(scripted.small_port)
    sid = c.open(b"/sink/sink", method=b"POST", end=False)
    sent = c.send_until_stalled(sid)
    assert sent >= 65535
    held_window = c.c.outbound_flow_control_window  # what moorline's paused stream left us
    # The client gives up on this upload: moorline must hand the bytes it held back to the
    # connection window (they were never acknowledged; the stream is gone).
    c.c.reset_stream(sid, 8)
    c.flush()
    c.barrier()
    assert c.c.outbound_flow_control_window > held_window, "connection window never reopened"
    c.close()
    no_tracebacks(scripted)


# ---------------------------------------------------------------------------------------------
# Finding 2: an early response with the request body still queued leaks the h2 stream
# ---------------------------------------------------------------------------------------------


def test_early_response_with_queued_request_body_frees_the_stream_slot(scripted: ScriptedEnv) -> None:
    up = scripted.ups["early"]
    c = Client(scripted.port)
    sid = c.open(b"/early/early", method=b"POST", end=False)
    # Beyond the upstream's 64 KiB window (moorline queues the rest), within moorline's own.
    c.send_body(sid, b"p" * 200_000)
    c.barrier()  # moorline has the whole body (END_STREAM queued behind the upstream window)
    up.respond_early.set()  # 200 END_STREAM, no RST_STREAM, body never read
    r = c.wait(sid)
    assert r.status == 200
    # The upstream allows one stream at a time: the next request needs that slot back.
    r2 = c.wait(c.open(b"/early/ok"))
    c.close()
    assert r2.reset is None and r2.status == 200 and len(r2.data) == 5000
    no_tracebacks(scripted)


# ---------------------------------------------------------------------------------------------
# Finding 3: a cancelled pending request stays counted as pending
# ---------------------------------------------------------------------------------------------


def test_cancelled_pending_request_leaves_the_queue(scripted: ScriptedEnv) -> None:
    up = scripted.ups["pend"]
    c = Client(scripted.port)
    held = c.open(b"/pend/hold")  # takes the only stream slot of the only connection
    deadline = time.monotonic() + WAIT
    while not up.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    queued = c.open(b"/pend/ok")  # waits in the pool (max_connections 1, 1 stream)
    assert scripted.wait_stat("cluster.pend.upstream_rq_pending_active", 1) == 1
    c.c.reset_stream(queued, 8)  # the client gives up on it
    c.flush()
    c.barrier()
    # moorline handled the RST_STREAM before it answered the PING: the gauge is final now.
    pending = scripted.stat("cluster.pend.upstream_rq_pending_active")
    # With max_pending_requests 1 a stale entry makes the next request overflow at once.
    nxt = c.open(b"/pend/ok")
    c.barrier()
    up.release.set()
    r_held = c.wait(held)
    r_next = c.wait(nxt)
    c.close()
    assert r_held.status == 200
    assert pending == 0
    assert r_next.status == 200 and len(r_next.data) == 5000, r_next
    no_tracebacks(scripted)


# ---------------------------------------------------------------------------------------------
# Finding 4: one stream over SETTINGS_MAX_CONCURRENT_STREAMS kills the whole connection
# ---------------------------------------------------------------------------------------------


def test_stream_over_the_concurrency_limit_is_refused_not_the_connection(scripted: ScriptedEnv) -> None:
    # A client may open streams before it has our SETTINGS (RFC 9113 6.5): the 101st stream
    # over moorline's default limit of 100 must be refused (RST_STREAM REFUSED_STREAM or
    # PROTOCOL_ERROR, RFC 9113 5.1.2), the other 100 served.
    c = Client(scripted.port)
    sids = []
    for i in range(101):
        sid = c.c.get_next_available_stream_id()
        hs = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"t"),
            (b":path", b"/direct%d" % i),
        ]
        c.c.send_headers(sid, hs, end_stream=True)
        c.res[sid] = Res()
        sids.append(sid)
    c.flush()
    for sid in sids[:100]:
        c.wait(sid)
    c.close()
    assert c.goaway in (None, 0), f"GOAWAY error {c.goaway}"
    assert all(c.res[s].status == 200 for s in sids[:100])
    no_tracebacks(scripted)


# ---------------------------------------------------------------------------------------------
# Finding 5: gRPC without grpc-timeout still gets the route timeout under max_grpc_timeout
# ---------------------------------------------------------------------------------------------

GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def test_grpc_timeout_header_caps_the_call(scripted: ScriptedEnv) -> None:
    # Control: with a grpc-timeout header the header wins over the route timeout (1s).
    c = Client(scripted.port)
    r = c.wait(c.open(b"/gt/delay/1500", extra=[*GRPC, (b"grpc-timeout", b"5S")]))
    c.close()
    assert r.status == 200 and r.reset is None


def test_grpc_call_without_deadline_is_not_cut_by_route_timeout(scripted: ScriptedEnv) -> None:
    c = Client(scripted.port)
    r = c.wait(c.open(b"/gt/delay/1500", extra=GRPC))
    c.close()
    grpc_status = dict(r.headers + r.trailers).get(b"grpc-status")
    assert r.status == 200 and grpc_status is None, (r.status, grpc_status)


# ---------------------------------------------------------------------------------------------
# Finding 6: Expect: 100-continue over HTTP/2 is never answered
# ---------------------------------------------------------------------------------------------


def test_h2_expect_100_continue_is_answered(scripted: ScriptedEnv) -> None:
    c = Client(scripted.port)
    sid = c.open(
        b"/echo", method=b"POST", extra=[(b"expect", b"100-continue"), (b"content-length", b"5")], end=False
    )
    c.barrier()  # moorline processed the HEADERS; a 100 would be out before the PING ACK
    got_100 = any(dict(h).get(b":status") == b"100" for h in c.res[sid].informational)
    c.c.send_data(sid, b"hello", end_stream=True)
    c.flush()
    r = c.wait(sid)
    c.close()
    assert r.status == 200
    assert got_100


# ---------------------------------------------------------------------------------------------
# Finding 7: a malformed :status from an HTTP/2 upstream raises out of data_received
# ---------------------------------------------------------------------------------------------


def test_malformed_upstream_status_is_a_stream_error(scripted: ScriptedEnv) -> None:
    up = scripted.ups["bad"]
    c = Client(scripted.port)
    held = c.open(b"/bad/hold")  # in flight on the same upstream connection
    deadline = time.monotonic() + WAIT
    while not up.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    bad = c.wait(c.open(b"/bad/badstatus"))
    up.release.set()
    r_held = c.wait(held)
    c.close()
    # Envoy (nghttp2 checks :status) resets only that stream: 502 for it, the other one goes on.
    assert bad.status == 502
    assert r_held.status == 200 and len(r_held.data) == 5000
    assert up.conns == 1
    no_tracebacks(scripted)
