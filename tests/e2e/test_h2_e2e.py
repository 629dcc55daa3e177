"""HTTP/2 through moorline: h2c prior knowledge (curl, h2load, a raw h2 client) to an HTTP/1.1
upstream and to an HTTP/2 upstream (nginx h2c), HTTP/1.1 clients to the HTTP/2 upstream, flow
control with a client that stops reading, and each flood protection attacked with raw frames,
after which another client must still be served."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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

from moorline.protocol.http2 import PREFACE
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
