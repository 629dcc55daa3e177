"""Smoke test of the benchmark harness: one short round of ``h1-small`` with moorline and the
calibration floor (no nginx or HAProxy proxy), through the real command line (``python -m
bench``), the real backend (nginx) and wrk.

Not a speed test: it asserts that the JSON report is produced and well formed, that requests
were counted for both, that the floor ratio is there and the nginx/HAProxy ratios are null (not
run), that the Markdown tables were printed, and that no child process outlives the harness.
"""

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


def test_bench_h1_small_moorline_and_floor(tmp_path: Path) -> None:
    """``python -m bench --proxies moorline,floor --quick --duration 1 --scenario h1-small``."""
    for binary in ("/usr/bin/wrk", "/usr/sbin/nginx"):
        require_binary(binary)
    out_dir = tmp_path / "results"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--proxies",
        "moorline,floor",
        "--quick",
        "--duration",
        "1",
        "--scenario",
        "h1-small",
        "--out",
        str(out_dir),
        "--keep-workdir",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    res = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]

    # Every child (moorline, the nginx backend, wrk) is gone once the harness has exited.
    m = re.search(r"work directory kept: (\S+)", res.stderr)
    assert m, res.stderr[-2000:]
    workdir = m.group(1)
    try:
        assert processes_mentioning(workdir) == []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    files = list(out_dir.glob("*-h1-small.json"))
    assert len(files) == 1, list(out_dir.iterdir())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-h1-small\.json", files[0].name)
    doc = json.loads(files[0].read_text())
    for key in (
        "scenario",
        "kind",
        "description",
        "settings",
        "machine",
        "proxies",
        "samples",
        "summary",
        "ratios",
    ):
        assert key in doc, key
    assert doc["scenario"] == "h1-small" and doc["kind"] == "http"
    assert doc["proxies"] == ["moorline", "floor"]
    assert doc["settings"]["rounds"] == 1 and doc["settings"]["duration_s"] == 1
    for key in ("cpu_model", "cores", "kernel", "python", "nginx"):
        assert key in doc["machine"], key
    assert doc["machine"]["cores"] >= 1

    for proxy in ("moorline", "floor"):
        samples = doc["samples"][proxy]
        assert len(samples) == 1
        s = samples[0]
        assert s["ok"] is True, (proxy, s.get("error"))
        assert s["requests"] > 0 and s["rps"] > 0
        assert s["cpu_us_per_req"] > 0 and s["peak_rss_mib"] > 0
        assert s["p50_ms"] > 0 and s["p99_ms"] >= s["p50_ms"]
        assert s["non_2xx"] == 0 and s["socket_errors"] == 0

        summ = doc["summary"][proxy]
        assert summ["ok_runs"] == 1 and summ["failed_runs"] == 0
        assert summ["metrics"]["rps"]["median"] == pytest.approx(s["rps"])
    assert "bench.floor" in doc["configs"]["floor"]
    # nginx and HAProxy were not run: their ratios are present and null; the floor's is there.
    assert list(doc["ratios"]) == ["moorline/nginx", "moorline/haproxy", "moorline/floor"]
    assert doc["ratios"]["moorline/nginx"] is None and doc["ratios"]["moorline/haproxy"] is None
    floor = doc["ratios"]["moorline/floor"]
    cpu = doc["summary"]["moorline"]["metrics"]["cpu_us_per_req"]["median"]
    cpu_floor = doc["summary"]["floor"]["metrics"]["cpu_us_per_req"]["median"]
    assert floor["cpu_us_per_req"] == pytest.approx(cpu / cpu_floor)
    assert floor["rps"] > 0

    # The Markdown tables went to stdout, with the floor's row and its ratio row.
    assert "### h1-small" in res.stdout
    assert re.search(r"^\| proxy \| req/s \| p50 ms \| p99 ms \| CPU µs/req \|", res.stdout, re.M), res.stdout
    assert re.search(r"^\| moorline \| [0-9,]+ \|", res.stdout, re.M), res.stdout
    assert re.search(r"^\| floor \| [0-9,]+ \|", res.stdout, re.M), res.stdout
    assert re.search(r"^\| moorline ÷ floor \| [0-9.]+ \|", res.stdout, re.M), res.stdout
    assert "No ratios" not in res.stdout
    # Progress went to stderr, not into the tables.
    assert "h1-small: round 1/1, moorline" in res.stderr
    assert "h1-small: round 1/1, floor" in res.stderr
    assert "[bench " not in res.stdout
