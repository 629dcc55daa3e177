"""HTTP/2 conformance of moorline's downstream h2c listener.

The first part runs every case of ``moorline.testing.h2conformance`` (our h2spec-shaped suite,
raw frames over a real socket) against one moorline in front of a ``TestUpstream``. The codec
backend is whatever the environment selects (``MOORLINE_HTTP2_BACKEND`` is inherited by the
moorline process), so CI runs this file once per backend. After each case moorline must still
be running: a case that kills it fails, whatever the reaction it saw.

The second part uses nghttp2's own client tools as peers: ``nghttp`` (prior knowledge, custom
headers, a large request body, many concurrent streams) and ``h2load`` (every request of a
fixed count must succeed).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moorline.protocol import http2_backends
from moorline.testing import h2conformance as conf
from moorline.testing import procs
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

# Cases that fail today because of a moorline bug, by id -> reason (strict xfail: a fix that
# makes one pass fails the run until its entry is removed). Backend-specific entries are keyed
# (backend, id).
XFAIL: dict[str | tuple[str, str], str] = {
    (
        "nghttp2",
        "http2/5.1.1/2",
    ): "nghttp2 ignores a HEADERS on a lower, already-used stream id unless it knows the stream "
    "was half-closed (session.c: it cannot remember every stream id, and a trailer HEADERS racing "
    "an RST_STREAM is legal); Envoy, on nghttp2, does the same",
}


@dataclass
class Target:
    port: int
    upstream: TestUpstream
    proc: procs.MoorlineProc


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    up = TestUpstream(upstream_id="conformance").start()
    port = procs.free_port()
    tmp = tmp_path_factory.mktemp("h2conf")
    proc = procs.start_moorline(conf.moorline_config(port, up.port), tmp, log_level="warning")
    try:
        yield Target(port, up, proc)
    finally:
        proc.stop()
        up.stop()


def _params() -> list[object]:
    out: list[object] = []
    for c in conf.CASES:
        reason = XFAIL.get(c.id) or XFAIL.get((http2_backends.BACKEND, c.id))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def test_the_suite_is_h2spec_sized() -> None:
    ids = [c.id for c in conf.CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(ids) >= 140


@pytest.mark.parametrize("case", _params())
def test_case(target: Target, case: conf.Case) -> None:
    result = conf.run_case(case, "127.0.0.1", target.port)
    assert target.proc.alive(), f"moorline died during {case.id}: {target.proc.stderr_text()[-2000:]}"
    assert result.passed, f"{case.id} [{case.section}] {case.desc}: {result.detail}"


def test_a_clean_request_still_works_after_the_suite(target: Target) -> None:
    # Runs after the cases in file order: the error paths left the listener serving.
    c = conf.Conn("127.0.0.1", target.port)
    try:
        c.handshake()
        c.headers(1, c.request(b"/status/201"))
        headers = dict(c.expect_response(1))
    finally:
        c.close()
    assert headers[b":status"] == b"201"


# -- nghttp2's tools as peers ------------------------------------------------------------------


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def test_nghttp_prior_knowledge_get_with_headers(target: Target) -> None:
    nghttp = procs.require_binary("nghttp")
    target.upstream.clear()
    r = _run([nghttp, "-nv", "-H", "x-conformance: nghttp", f"http://127.0.0.1:{target.port}/hello"])
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    assert re.search(r"recv \(stream_id=\d+\) :status: 200", r.stdout), r.stdout[-2000:]
    # nghttp's verbose trace shows our SETTINGS and its ACK of them.
    assert "recv SETTINGS frame" in r.stdout
    reqs = [q for q in target.upstream.requests if q.path == "/hello"]
    assert len(reqs) == 1
    assert reqs[0].header("x-conformance") == "nghttp"


def test_nghttp_large_request_body(target: Target, tmp_path: Path) -> None:
    nghttp = procs.require_binary("nghttp")
    body = bytes(range(256)) * (3 * 4096 + 17)  # ~3 MiB: many windows' worth
    f = tmp_path / "body.bin"
    f.write_bytes(body)
    r = _run([nghttp, "-d", str(f), f"http://127.0.0.1:{target.port}/upload"])
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo["method"] == "POST"
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_nghttp_many_concurrent_streams(target: Target) -> None:
    nghttp = procs.require_binary("nghttp")
    target.upstream.clear()
    r = _run([nghttp, "-nv", "-m", "60", f"http://127.0.0.1:{target.port}/many"])
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    statuses = re.findall(r"recv \(stream_id=(\d+)\) :status: 200", r.stdout)
    assert len(set(statuses)) == 60
    assert len([q for q in target.upstream.requests if q.path == "/many"]) == 60


def _h2load_counts(out: str) -> tuple[int, int, int]:
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_h2load_every_request_succeeds(target: Target) -> None:
    h2load = procs.require_binary("h2load")
    r = _run([h2load, "-n", "2000", "-c", "4", "-m", "20", f"http://127.0.0.1:{target.port}/status/200"])
    assert r.returncode == 0, r.stderr + r.stdout
    total, ok, failed = _h2load_counts(r.stdout)
    assert (total, ok, failed) == (2000, 2000, 0), r.stdout
    assert re.search(r"status codes: 2000 2xx", r.stdout), r.stdout


def test_h2load_uploads_with_small_windows(target: Target, tmp_path: Path) -> None:
    h2load = procs.require_binary("h2load")
    f = tmp_path / "up.bin"
    f.write_bytes(b"u" * 100_000)
    # Windows of 2^14 - 1 bytes make moorline's DATA frames smaller than its max frame size and
    # exercise WINDOW_UPDATE in both directions on every stream.
    url = f"http://127.0.0.1:{target.port}/echo"
    r = _run([h2load, "-n", "200", "-c", "2", "-m", "10", "-w", "14", "-W", "16", "-d", str(f), url])
    assert r.returncode == 0, r.stderr + r.stdout
    assert _h2load_counts(r.stdout) == (200, 200, 0), r.stdout
