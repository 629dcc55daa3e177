"""HTTP/2 options with real peers, both directions: the SETTINGS and connection window moorline
announces to clients (``nghttp -nv`` shows them) and to upstreams (a recording ``h2`` server),
the per-connection stream limit on upstream connections, and an upstream that sends GOAWAY every
few requests (nginx ``keepalive_requests``): its streams drain, the connection is replaced, and
no request fails."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from moorline.protocol import http2_backends
from moorline.protocol.http2 import _KeepOpenStateMachine
from moorline.testing import procs

pytestmark = pytest.mark.e2e
KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
H2OPTS = {
    "max_concurrent_streams": 7,
    "initial_stream_window_size": 131072,
    "initial_connection_window_size": 2097152,
}
UP_OPTS = {
    "max_concurrent_streams": 3,
    "initial_stream_window_size": 98304,
    "initial_connection_window_size": 1572864,
}


def h2_cluster(name: str, port: int, h2opts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return procs.cluster(
        name,
        [port],
        typed_extension_protocol_options={
            KEY: {
                "@type": f"type.googleapis.com/{KEY}",
                "explicit_http_config": {"http2_protocol_options": h2opts},
            }
        },
        **extra,
    )


@dataclass
class Recorder:
    """A threaded h2c server that records what each connection's peer announced (SETTINGS, the
    connection WINDOW_UPDATE) and the most streams it had open at once. It holds every request
    until ``release`` is set, then answers 200: a test sees how many streams moorline put on one
    connection once all its requests arrived (``received``)."""

    peer_mcs: int = 100
    port: int = 0
    received: int = 0
    settings: list[dict[int, int]] = field(default_factory=list)
    conn_windows: list[int] = field(default_factory=list)
    max_open: list[int] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    stop_ev: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Recorder:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stop_ev.set()
        self.release.set()
        with contextlib.suppress(OSError):
            self.lsock.close()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                i = len(self.settings)
                self.settings.append({})
                self.conn_windows.append(0)
                self.max_open.append(0)
            threading.Thread(target=self._serve, args=(s, i), daemon=True).start()

    def _serve(self, sock: socket.socket, i: int) -> None:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        c.state_machine = _KeepOpenStateMachine()
        c.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.peer_mcs}
        )
        c.initiate_connection()
        sock.sendall(c.data_to_send())
        sock.settimeout(0.05)
        open_: set[int] = set()
        try:
            while not self.stop_ev.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    data = None
                if data == b"":
                    return
                for ev in c.receive_data(data) if data else ():
                    if isinstance(ev, h2.events.RemoteSettingsChanged):
                        for k, v in ev.changed_settings.items():
                            self.settings[i][int(k)] = int(v.new_value)
                    elif isinstance(ev, h2.events.WindowUpdated) and ev.stream_id == 0:
                        self.conn_windows[i] += ev.delta
                    elif isinstance(ev, h2.events.RequestReceived):
                        open_.add(ev.stream_id)
                        with self.lock:
                            self.received += 1
                            self.max_open[i] = max(self.max_open[i], len(open_))
                if open_ and self.release.is_set():
                    for sid in sorted(open_):
                        c.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
                        c.send_data(sid, b"ok", end_stream=True)
                    open_.clear()
                out = c.data_to_send()
                if out:
                    sock.sendall(out)
        except OSError:
            return
        finally:
            sock.close()


@dataclass
class Env:
    port: int
    default_port: int
    proc: procs.MoorlineProc
    rec: Recorder
    rec_default: Recorder


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("h2opts")
    rec = Recorder(peer_mcs=100).start()
    rec_default = Recorder(peer_mcs=150).start()
    ngx_port = procs.free_port()
    ngx = procs.start_nginx(
        tmp,
        f"""
    server {{
        listen 127.0.0.1:{ngx_port} http2;
        keepalive_requests 5;
        location / {{
            default_type text/plain;
            return 200 "from nginx\\n";
        }}
    }}
""",
        ngx_port,
    )
    routes = [
        {"match": {"prefix": "/rec/"}, "route": {"cluster": "rec", "timeout": "20s"}},
        {"match": {"prefix": "/recd/"}, "route": {"cluster": "recd", "timeout": "20s"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "ngx"}},
    ]
    clusters = [
        h2_cluster("rec", rec.port, UP_OPTS),
        h2_cluster("recd", rec_default.port, {}),
        h2_cluster("ngx", ngx_port, {}),
    ]
    port = procs.free_port()
    default_port = procs.free_port()
    lst = procs.hcm_listener("opts", port, routes, hcm_extra={"http2_protocol_options": H2OPTS})
    plain = procs.hcm_listener("plain", default_port, routes)
    proc = procs.start_moorline(procs.bootstrap([lst, plain], clusters), tmp / "moorline")
    try:
        yield Env(port, default_port, proc, rec, rec_default)
    finally:
        proc.stop()
        ngx.stop()
        rec.stop()
        rec_default.stop()


def nghttp_settings(port: int) -> tuple[dict[str, int], int]:
    """The SETTINGS moorline sent (name -> value) and its WINDOW_UPDATE on stream 0."""
    nghttp = procs.require_binary("nghttp")
    r = subprocess.run([nghttp, "-nv", f"http://127.0.0.1:{port}/x"], capture_output=True, timeout=30)
    out = r.stdout.decode()
    m = re.search(
        r"recv SETTINGS frame <length=\d+, flags=0x00, stream_id=0>\n((?:\s+\(niv=\d+\)\n)?(?:\s+\[.*\]\n)*)",
        out,
    )
    assert m, out
    settings = {k: int(v) for k, v in re.findall(r"\[(SETTINGS_\w+)\(0x[0-9a-f]+\):(\d+)\]", m.group(1))}
    w = re.search(
        r"recv WINDOW_UPDATE frame <length=4, flags=0x00, stream_id=0>\n\s+\(window_size_increment=(\d+)\)",
        out,
    )
    return settings, int(w.group(1)) if w else 0


def test_downstream_settings_from_the_hcm_options(env: Env) -> None:
    s, inc = nghttp_settings(env.port)
    assert s["SETTINGS_MAX_CONCURRENT_STREAMS"] == 7
    assert s["SETTINGS_INITIAL_WINDOW_SIZE"] == 131072
    assert inc == 2097152 - 65535  # the connection window opened to initial_connection_window_size


def test_downstream_settings_defaults(env: Env) -> None:
    s, inc = nghttp_settings(env.default_port)
    assert s["SETTINGS_MAX_CONCURRENT_STREAMS"] == 100
    assert s["SETTINGS_INITIAL_WINDOW_SIZE"] == 256 * 1024
    assert inc == 1024 * 1024 - 65535


def held_load(port: int, path: str, n: int, conns: int, rec: Recorder) -> str:
    """Run h2load with ``n`` requests at once; once ``rec`` holds all of them, release them."""
    h2load = procs.require_binary("h2load")
    p = subprocess.Popen(
        [h2load, "-n", str(n), "-c", str(conns), "-m", str(n // conns), f"http://127.0.0.1:{port}{path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        procs.wait_until(lambda: rec.received >= n, f"{n} requests held upstream")
    finally:
        rec.release.set()
        out, _ = p.communicate(timeout=60)
    return out.decode()


def test_upstream_settings_and_stream_limit_from_the_cluster_options(env: Env) -> None:
    # Nine requests at once over one downstream connection: the cluster allows 3 streams per
    # upstream connection although the upstream allows 100, so they spread over three connections.
    out = held_load(env.default_port, "/rec/a", 9, 1, env.rec)
    assert re.search(r"9 succeeded, 0 failed", out), out
    rec = env.rec
    assert rec.max_open == [3, 3, 3], rec.max_open
    assert all(s.get(0x4) == 98304 for s in rec.settings), rec.settings  # SETTINGS_INITIAL_WINDOW_SIZE
    assert all(s.get(0x3) == 3 for s in rec.settings), rec.settings  # SETTINGS_MAX_CONCURRENT_STREAMS
    assert rec.conn_windows == [1572864 - 65535] * 3, rec.conn_windows


def test_upstream_without_a_limit_uses_the_peers(env: Env) -> None:
    # Envoy's default max_concurrent_streams is 2147483647: the upstream's own SETTINGS (150 here)
    # is the limit. 120 requests at once (two client connections of 60) share one connection.
    out = held_load(env.default_port, "/recd/a", 120, 2, env.rec_default)
    assert re.search(r"120 succeeded, 0 failed", out), out
    assert env.rec_default.max_open == [120], env.rec_default.max_open


def test_upstream_goaway_drains_and_is_replaced_without_failures(env: Env) -> None:
    # nginx sends GOAWAY after 5 requests on a connection (keepalive_requests 5); streams sent
    # after it (above its last stream id) are refused and retried on a new connection.
    before = env.proc.stat("cluster.ngx.upstream_cx_total")
    h2load = procs.require_binary("h2load")
    r = subprocess.run(
        [h2load, "-n", "200", "-c", "4", "-m", "10", f"http://127.0.0.1:{env.default_port}/n"],
        capture_output=True,
        timeout=120,
    )
    out = r.stdout.decode()
    m = re.search(
        r"requests: 200 total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    assert m, out
    assert (m.group(1), m.group(2), m.group(3)) == ("200", "0", "0"), out
    assert "status codes: 200 2xx" in out, out
    cx = env.proc.stat("cluster.ngx.upstream_cx_total") - before
    assert cx >= 200 // 5 // 2, cx  # many connections, each replaced after its GOAWAY
    assert env.proc.stat("cluster.ngx.http2.goaway_received") >= cx - 4
    assert env.proc.stat("cluster.ngx.upstream_rq_5xx") == 0
    assert "Traceback" not in env.proc.stderr_text()


def test_rst_answers_to_a_client_that_does_not_read(env: Env) -> None:
    # Issue 11's probe: empty DATA frames on a stream the client reset, each answered with
    # RST_STREAM, and a client that never reads (3 million frames were accepted, RSS +33 MB).
    # Envoy's max_outbound_control_frames (1000) must end the connection.
    from hpack import Encoder
    from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame, SettingsFrame

    from moorline.protocol.http2 import PREFACE

    before = env.proc.stat("http2.outbound_control_flood")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answers fill it at once
    s.settimeout(10)
    s.connect(("127.0.0.1", env.default_port))
    h = HeadersFrame(1)
    h.data = Encoder().encode(
        [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/rec/x")]
    )
    h.flags.add("END_HEADERS")
    rst = RstStreamFrame(1)
    rst.error_code = 8
    s.sendall(PREFACE + SettingsFrame(0).serialize() + h.serialize() + rst.serialize())
    chunk = DataFrame(1).serialize() * 5000
    sent = 0
    with contextlib.suppress(OSError):
        while sent < 3_000_000:  # the probe's count, never reading
            s.sendall(chunk)
            sent += 5000
    s.close()
    if http2_backends.BACKEND == "nghttp2":
        # nghttp2 answers the first DATA on the closed stream with GOAWAY STREAM_CLOSED: no
        # answers to pile up at all.
        assert env.proc.stat("http2.outbound_control_flood") == before
    else:
        procs.wait_until(
            lambda: env.proc.stat("http2.outbound_control_flood") > before, "outbound_control_flood"
        )
    assert sent < 3_000_000, "moorline accepted every frame"
    assert env.proc.alive()
