"""Smoke test of the h2-small, grpc-unary and tls-handshake scenarios: one 1-second round each,
moorline alone, through ``python -m bench`` with the real backends (nginx, the grpcio echo
server), h2load and wrk. Not a speed test: it asserts that each run succeeded over the intended
protocol (the harness's check request verifies HTTP/2, the gRPC echo and TLS 1.3 before the
load), that requests were counted, and that no child outlives the harness."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moorline.testing.procs import processes_mentioning, require_binary

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("h2-small", "grpc-unary", "tls-handshake")


def test_bench_h2_grpc_tls_moorline_only(tmp_path: Path) -> None:
    for binary in ("/usr/bin/h2load", "/usr/bin/wrk", "/usr/sbin/nginx", "/usr/bin/curl", "/usr/bin/openssl"):
        require_binary(binary)  # fails, never skips: `make test` installs them
    out_dir = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "--proxies", "moorline", "--quick", "--duration", "1",
            "--scenario", *SCENARIOS, "--out", str(out_dir), "--keep-workdir"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    res = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"work directory kept: (\S+)", res.stderr)
    assert m, res.stderr[-2000:]
    try:
        assert processes_mentioning(m.group(1)) == []  # nginx, the gRPC backend, moorline, h2load, wrk
    finally:
        shutil.rmtree(m.group(1), ignore_errors=True)

    for name in SCENARIOS:
        (path,) = out_dir.glob(f"*-{name}.json")
        doc = json.loads(path.read_text())
        # The HTTP/2 scenarios run moorline on both codec backends (moorline-h2: the h2 one).
        ours = ["moorline"] if name == "tls-handshake" else ["moorline", "moorline-h2"]
        assert [p for p in doc["proxies"] if p.startswith("moorline")] == ours
        for v in ours:
            (s,) = doc["samples"][v]
            assert s["ok"] is True, (name, v, s.get("error"))
            assert s["requests"] > 0 and s["rps"] > 0 and s["cpu_us_per_req"] > 0
            assert s["socket_errors"] == 0 and s["non_2xx"] == 0
        assert doc["ratios"] == {f"{v}/{p}": None for v in ours for p in ("nginx", "haproxy")}
        assert f"### {name}" in res.stdout
    h2 = json.loads(next(out_dir.glob("*-h2-small.json")).read_text())
    s = h2["samples"]["moorline"][0]
    assert s["succeeded"] == s["requests"]
    assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"] + 0.001  # percentiles from the log
    assert "Application protocol: h2c" in s["h2load_output"]
    grpc = json.loads(next(out_dir.glob("*-grpc-unary.json")).read_text())
    assert "grpc_pass" not in json.dumps(grpc["configs"])  # moorline only
    assert "http2_protocol_options" in grpc["configs"]["moorline"]
    tls = json.loads(next(out_dir.glob("*-tls-handshake.json")).read_text())
    assert "TLSv1_3" in tls["configs"]["moorline"]
    assert re.search(r"^\| proxy \| handshakes/s \|", res.stdout, re.M), res.stdout
