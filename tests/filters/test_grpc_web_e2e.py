"""``envoy.filters.http.grpc_web`` through a real moorline process in front of a real grpcio
server (h2c upstream, tests/e2e/grpc_svc): browser-side clients speak gRPC-Web over HTTP/1.1 —
http.client with frames built and read here from PROTOCOL-WEB.md, curl over h2c, and the npm
``grpc-web`` runtime itself (run in Node over ``xhr2``, tests/filters/grpc_web_node) — in binary
and text mode: unary calls, a call the server fails, a server-streaming call, an HTTP-level
failure (no upstream), and the per-method stats."""

from __future__ import annotations

import base64
import http.client
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from moorline.testing import procs
from moorline.testing.procs import PeerMissingError, require_binary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e" / "grpc_svc"))
from grpc_test_service import SERVICE, TestGrpcServer

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).resolve().parent / "grpc_web_node"
WEB = {
    "name": "envoy.filters.http.grpc_web",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"},
}


@dataclass
class Env:
    port: int
    proc: procs.MoorlineProc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    srv = TestGrpcServer().start()
    port, admin, dead = procs.free_port(), procs.free_port(), procs.free_port()
    h2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    clusters = [
        procs.cluster("grpc", [srv.port], typed_extension_protocol_options=h2),
        procs.cluster("nobody", [dead], typed_extension_protocol_options=h2),  # nothing listens
    ]
    routes = [
        {"match": {"prefix": "/dead.Svc/"}, "route": {"cluster": "nobody"}},
        {"match": {"prefix": f"/{SERVICE}/"}, "route": {"cluster": "grpc", "timeout": "10s"}},
    ]
    doc = yaml.safe_load(procs.config_http(port, clusters, routes=routes, admin_port=admin))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, WEB)
    proc = procs.start_moorline(yaml.safe_dump(doc), tmp_path_factory.mktemp("grpc_web") / "moorline")
    try:
        yield Env(port, proc)
    finally:
        proc.stop()
        srv.stop()


# -- gRPC-Web on the wire, written from the spec ----------------------------------------------------


def frame(msg: bytes, flag: int = 0) -> bytes:
    return bytes((flag,)) + len(msg).to_bytes(4, "big") + msg


def read_frames(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    while body:
        assert len(body) >= 5, body
        n = int.from_bytes(body[1:5], "big")
        assert len(body) >= 5 + n, body
        out.append((body[0], body[5 : 5 + n]))
        body = body[5 + n :]
    return out


def b64_segments(text: bytes) -> bytes:
    """Text mode: padded base64 segments back to back (one per frame), decoded one by one."""
    segs = re.findall(rb"[A-Za-z0-9+/]*(?:==|=)?", text)
    assert b"".join(segs) == text, text
    return b"".join(base64.b64decode(s) for s in segs if s)


def trailer_block(block: bytes) -> dict[str, str]:
    lines = block.decode().split("\r\n")
    assert lines[-1] == "", block  # every line ends in CRLF
    return dict(ln.split(":", 1) for ln in lines[:-1])


@dataclass
class WebResult:
    status: int
    headers: dict[str, str]
    messages: list[bytes]
    trailers: dict[str, str] | None  # from the 0x80 frame; None: there was none
    frames: list[tuple[int, bytes]]


def call(env: Env, method: str, request: bytes, text: bool = False, path: str | None = None) -> WebResult:
    body = frame(request)
    headers = {
        "content-type": "application/grpc-web-text" if text else "application/grpc-web+proto",
        "accept": "application/grpc-web-text" if text else "application/grpc-web+proto",
        "x-grpc-web": "1",
        "x-user-agent": "grpc-web-javascript/0.1",
    }
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=20)
    try:
        c.request("POST", path or f"/{SERVICE}/{method}", base64.b64encode(body) if text else body, headers)
        r = c.getresponse()
        raw = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()
    data = b64_segments(raw) if text and raw else raw
    frames = read_frames(data)
    msgs = [m for f, m in frames if f == 0]
    tr = [m for f, m in frames if f == 0x80]
    assert len(tr) <= 1 and (not tr or frames[-1][0] == 0x80)  # the trailers frame comes last
    return WebResult(r.status, hdrs, msgs, trailer_block(tr[0]) if tr else None, frames)


# -- http.client as the browser -----------------------------------------------------------------------


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
def test_unary(env: Env, text: bool) -> None:
    r = call(env, "Unary", b"hello grpc-web", text=text)
    assert r.status == 200
    assert r.headers["content-type"] == (
        "application/grpc-web-text+proto" if text else "application/grpc-web+proto"
    )
    assert "content-length" not in r.headers and r.headers.get("transfer-encoding") == "chunked"
    assert r.messages == [b"hello grpc-web"]
    assert r.trailers is not None and r.trailers["grpc-status"] == "0"


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
def test_server_fails_the_call(env: Env, text: bool) -> None:
    r = call(env, "Unary", b"status:7", text=text)
    # grpcio answers an abort before any message trailers-only: the status stays in the headers.
    assert r.status == 200 and r.frames == []
    assert r.headers["grpc-status"] == "7" and r.headers["grpc-message"] == "requested status"


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
def test_server_streaming(env: Env, text: bool) -> None:
    r = call(env, "ServerStream", b"25:3000", text=text)
    assert r.messages == [bytes([i]) * 3000 for i in range(25)]
    assert r.trailers is not None and r.trailers["grpc-status"] == "0"


def test_no_upstream_is_unavailable(env: Env) -> None:
    r = call(env, "", b"x", path="/dead.Svc/Call")
    assert r.status == 503  # the HTTP status stays, as in Envoy
    assert r.headers["grpc-status"] == "14"
    assert r.headers["grpc-message"].startswith("upstream connect error")
    assert r.frames == []


def test_bad_base64_is_internal(env: Env) -> None:
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=20)
    c.request("POST", f"/{SERVICE}/Unary", b"AAAAAA!!", {"content-type": "application/grpc-web-text"})
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 400 and r.getheader("grpc-status") == "13"


def test_curl_over_h2c_gets_no_http_trailers(env: Env) -> None:
    # Over HTTP/2 the trailers moved into the body, so the stream ends with DATA, not HEADERS.
    out = subprocess.run(
        [
            require_binary("curl"),
            "-sS",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "-H",
            "content-type: application/grpc-web+proto",
            "-H",
            "x-grpc-web: 1",
            "--data-binary",
            "@-",
            f"http://127.0.0.1:{env.port}/{SERVICE}/Unary",
        ],
        input=frame(b"via curl"),
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    assert b"content-type: application/grpc-web+proto" in head
    frames = read_frames(body)
    assert frames[0] == (0, b"via curl")
    assert frames[-1][0] == 0x80 and trailer_block(frames[-1][1])["grpc-status"] == "0"


def test_stats_per_method(env: Env) -> None:
    before = env.proc.stat(f"cluster.grpc.grpc-web.{SERVICE}.Unary.total")
    call(env, "Unary", b"counted")
    call(env, "Unary", b"status:5")
    p = f"cluster.grpc.grpc-web.{SERVICE}.Unary."
    assert env.proc.stat(p + "total") == before + 2
    assert env.proc.stat(p + "5") >= 1 and env.proc.stat(p + "failure") >= 1
    assert env.proc.stat(p + "0") >= 1 and env.proc.stat(p + "success") >= 1


# -- the npm grpc-web runtime as the browser -----------------------------------------------------------


def node_calls(env: Env, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = require_binary("node")
    if not (NODE_DIR / "node_modules" / "grpc-web" / "package.json").is_file():
        raise PeerMissingError(
            f"{NODE_DIR}/node_modules has no grpc-web: `make test` installs it (scripts/install-deps.sh "
            f"runs `npm ci` in {NODE_DIR}). This test fails instead of skipping."
        )
    out = subprocess.run(
        [node, str(NODE_DIR / "client.js"), f"http://127.0.0.1:{env.port}", json.dumps(calls)],
        capture_output=True,
        timeout=60,
        cwd=NODE_DIR,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    res: list[dict[str, Any]] = json.loads(out.stdout)
    return res


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_npm_grpc_web_client(env: Env, fmt: str) -> None:
    got = node_calls(
        env,
        [
            {"format": fmt, "kind": "unary", "method": "Unary", "request": "from the browser"},
            {"format": fmt, "kind": "unary", "method": "Unary", "request": "status:9"},
            {"format": fmt, "kind": "stream", "method": "ServerStream", "request": "6:700"},
        ],
    )
    unary, failed, stream = got
    assert unary == {"messages": ["from the browser"], "status": None, "error": None}
    assert failed["messages"] == [] and failed["error"] == {"code": 9, "message": "requested status"}
    assert stream["messages"] == [chr(i) * 700 for i in range(6)]
    assert stream["status"] == 0 and stream["error"] is None
