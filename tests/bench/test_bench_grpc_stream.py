"""Smoke test of the grpc-stream scenario: one 1-second round of moorline and ``direct`` (the
load straight to the backend), through ``python -m bench`` with the real Node http2 backend and
h2load. Not a speed test: it asserts that both runs succeeded (each is preceded by a real grpcio
streaming call that must receive 1,000 messages of 1 KiB and status OK), that calls and
messages were counted, that moorline's upstream is HTTP/2, and that no child outlives the
harness."""

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


def test_bench_grpc_stream_moorline_and_direct(tmp_path: Path) -> None:
    for binary in ("/usr/bin/h2load", "node"):
        require_binary(binary)  # fails, never skips: `make test` installs them
    out_dir = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "--proxies", "moorline", "--quick", "--duration", "1",
            "--scenario", "grpc-stream", "--out", str(out_dir), "--keep-workdir"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    res = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"work directory kept: (\S+)", res.stderr)
    assert m, res.stderr[-2000:]
    try:
        assert processes_mentioning(m.group(1)) == []  # the Node backend, moorline, h2load
    finally:
        shutil.rmtree(m.group(1), ignore_errors=True)

    (path,) = out_dir.glob("*-grpc-stream.json")
    doc = json.loads(path.read_text())
    assert doc["proxies"] == ["moorline", "moorline-h2", "direct"]
    for v in ("moorline", "moorline-h2", "direct"):
        (s,) = doc["samples"][v]
        assert s["ok"] is True, (v, s.get("error"))
        assert s["requests"] > 0 and s["succeeded"] == s["requests"]
        assert s["msgs_per_s"] == pytest.approx(s["rps"] * 1000)
        assert s["mib_per_s"] > 0 and s["cpu_us_per_req"] > 0
        assert s["socket_errors"] == 0 and s["non_2xx"] == 0
        assert "Application protocol: h2c" in s["h2load_output"]
    assert "http2_protocol_options" in doc["configs"]["moorline"]
    assert doc["settings"]["path"] == "/bench.Echo/Stream"
    assert doc["ratios"]["moorline/nginx"] is None
    assert doc["ratios"]["moorline/direct"]["msgs_per_s"] > 0
    assert "### grpc-stream" in res.stdout
    assert re.search(r"^\| proxy \| messages/s \| MiB/s \|", res.stdout, re.M), res.stdout
