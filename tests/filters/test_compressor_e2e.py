"""envoy.filters.http.compressor end to end: a real moorline process between curl / http.client
and a real upstream on loopback; the decoded body must equal what the upstream sent."""

from __future__ import annotations

import gzip
import http.client
import json
import subprocess
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard

from moorline.testing.procs import config_http, free_port, require_binary

pytestmark = pytest.mark.e2e

T = "type.googleapis.com/envoy.extensions."
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": f"{T}filters.http.router.v3.Router"}}
BIG = b"".join(b'{"id": %d, "name": "item %d", "tags": ["a", "b"]}\n' % (i, i) for i in range(20000))
EVENTS = [b"data: event %d\n\n" % i for i in range(5)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *a: Any) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "application/json", **extra: str) -> None:
        self.send_response(200)
        self.send_header("content-type", ctype)
        for k, v in extra.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        p = self.path
        if p == "/big":
            self._send(BIG)
        elif p == "/short":
            self._send(b'{"ok": true}')
        elif p == "/png":
            self._send(BIG, "image/png")
        elif p == "/encoded":
            self._send(gzip.compress(BIG), content_encoding="gzip")
        elif p == "/etag":
            self._send(BIG, etag='"v1"', vary="Origin")
        elif p == "/metrics":
            self._send(BIG, "text/plain; version=0.0.4")
        elif p == "/events":
            # One event per chunk; the next one only after the test saw the previous one
            # decoded at the client (so a proxy that buffered the body would hang here).
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i, ev in enumerate(EVENTS):
                if i:
                    self.server.go.acquire(timeout=20)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(b"not found", "text/plain")


@pytest.fixture
def origin() -> Iterator[Any]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.go = threading.Semaphore(0)  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _comp(kind: str, msg: str, **cfg: Any) -> dict[str, Any]:
    return {
        "name": f"envoy.filters.http.compressor.{kind}",
        "typed_config": {
            "@type": f"{T}filters.http.compressor.v3.Compressor",
            "compressor_library": {
                "name": kind,
                "typed_config": {"@type": f"{T}compression.{kind}.compressor.v3.{msg}"},
            },
            **cfg,
        },
    }


def _start(moorline: Any, origin: Any, filters: list[dict[str, Any]]) -> int:
    port = free_port()
    cfg = config_http(port, {"o": [origin.server_address[1]]}, hcm_extra={"http_filters": [*filters, ROUTER]})
    moorline(cfg)
    return port


def _get(port: int, path: str, accept: str | None) -> http.client.HTTPResponse:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    headers = {"accept-encoding": accept} if accept is not None else {}
    c.request("GET", path, headers=headers)
    return c.getresponse()


def _curl(port: int, path: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [require_binary("curl"), "-sS", "-D", "-", *args, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        timeout=30,
        check=True,
    )


def _split(out: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = out.partition(b"\r\n\r\n")
    hdrs = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        hdrs[k.strip().lower().decode()] = v.strip().decode()
    return hdrs, body


ALL = [_comp("brotli", "Brotli"), _comp("zstd", "Zstd"), _comp("gzip", "Gzip")]


def test_big_body_with_curl_and_every_decoder(moorline: Any, origin: Any) -> None:
    port = _start(moorline, origin, ALL)
    # curl --compressed decodes itself: the body it prints is the upstream's.
    out = _curl(port, "/big", "--compressed")
    hdrs, body = _split(out.stdout)
    assert hdrs["content-encoding"] in ("gzip", "br", "zstd") and "content-length" not in hdrs
    assert body == BIG
    hdrs, body = _split(_curl(port, "/big", "-H", "Accept-Encoding: br").stdout)
    assert hdrs["content-encoding"] == "br" and hdrs["vary"] == "Accept-Encoding"
    assert len(body) < len(BIG) // 4 and brotli.decompress(body) == BIG
    r = _get(port, "/big", "zstd")
    assert r.getheader("content-encoding") == "zstd"
    assert zstandard.ZstdDecompressor().decompressobj().decompress(r.read()) == BIG
    r = _get(port, "/big", "gzip;q=1, br;q=0.5")
    assert r.getheader("content-encoding") == "gzip" and gzip.decompress(r.read()) == BIG
    r = _get(port, "/big", None)
    assert r.getheader("content-encoding") is None and r.getheader("vary") == "Accept-Encoding"
    assert r.read() == BIG


def test_streamed_events_arrive_one_by_one(moorline: Any, origin: Any) -> None:
    sse = {"response_direction_config": {"common_config": {"content_type": ["text/event-stream"]}}}
    port = _start(moorline, origin, [_comp("gzip", "Gzip", **sse)])
    r = _get(port, "/events", "gzip")
    assert r.getheader("content-encoding") == "gzip"
    d = zlib.decompressobj(31)
    got = b""
    for i, ev in enumerate(EVENTS):
        # Read compressed chunks until this event decodes; the upstream sends the next one
        # only after that, so every event was flushed through the compressor on its own.
        while not got.endswith(ev):
            chunk = r.read1(65536)  # type: ignore[attr-defined]
            assert chunk, f"stream ended before event {i}"
            got += d.decompress(chunk)
        origin.go.release()
    rest = r.read()
    got += d.decompress(rest) + d.flush()
    assert got == b"".join(EVENTS) and d.eof


@pytest.mark.parametrize(
    ("path", "want_vary"),
    [("/short", None), ("/png", None), ("/encoded", None)],
)
def test_left_alone(moorline: Any, origin: Any, path: str, want_vary: str | None) -> None:
    port = _start(moorline, origin, [_comp("gzip", "Gzip")])
    r = _get(port, path, "gzip, br")
    body = r.read()
    if path == "/encoded":
        assert r.getheader("content-encoding") == "gzip" and gzip.decompress(body) == BIG
    else:
        assert r.getheader("content-encoding") is None
        assert body == (BIG if path == "/png" else b'{"ok": true}')
    assert r.getheader("content-length") == str(len(body))
    assert r.getheader("vary") == want_vary


def test_etag_and_vary(moorline: Any, origin: Any) -> None:
    port = _start(moorline, origin, [_comp("gzip", "Gzip")])
    r = _get(port, "/etag", "gzip")
    assert r.getheader("etag") == 'W/"v1"' and r.getheader("vary") == "Origin, Accept-Encoding"
    assert gzip.decompress(r.read()) == BIG
    port2 = _start(
        moorline, origin, [_comp("gzip", "Gzip", response_direction_config={"disable_on_etag_header": True})]
    )
    r = _get(port2, "/etag", "gzip")
    assert r.getheader("etag") == '"v1"' and r.getheader("content-encoding") is None
    assert r.read() == BIG


ISTIO = Path("/work/shared/fixtures/istio/bootstrap_default_golden.json")


@pytest.mark.skipif(not ISTIO.is_file(), reason="the shared fixtures checkout is absent")
def test_istio_bootstrap_compressors_as_they_are(moorline: Any, origin: Any) -> None:
    doc = json.loads(ISTIO.read_text())
    fl = next(
        lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        for lst in doc["static_resources"]["listeners"]
        if lst["name"] == "0.0.0.0_15090"
    )
    comps = [f for f in fl if "compressor" in f["name"]]
    assert len(comps) == 3
    port = _start(moorline, origin, comps)
    hdrs, body = _split(_curl(port, "/metrics", "-H", "Accept-Encoding: br").stdout)
    assert hdrs["content-encoding"] == "br" and brotli.decompress(body) == BIG
    hdrs, body = _split(_curl(port, "/metrics", "--compressed").stdout)
    assert hdrs["content-encoding"] in ("gzip", "br", "zstd") and body == BIG
    # application/json is not in Istio's list.
    hdrs, body = _split(_curl(port, "/big", "-H", "Accept-Encoding: br").stdout)
    assert "content-encoding" not in hdrs and body == BIG
