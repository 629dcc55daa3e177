"""Smoke test of the benchmark harness: one short round of ``h1-small`` with moorline alone,
through the real command line (``python -m bench``), the real backend (nginx) and wrk.

Not a speed test: it asserts that the JSON report is produced and well formed, that requests
were counted, that ratios are null when the peers did not run, that the Markdown table was
printed, and that no child process outlives the harness.
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

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{entry.name}: {cmd}")
    return found


def test_bench_h1_small_moorline_only(tmp_path: Path) -> None:
    """``python -m bench --proxies moorline --quick --duration 1 --scenario h1-small``."""
    for binary in ("/usr/bin/wrk", "/usr/sbin/nginx"):
        if not Path(binary).exists():
            pytest.skip(f"{binary} is not installed")
    out_dir = tmp_path / "results"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--proxies",
        "moorline",
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
        assert _processes_mentioning(workdir) == []
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
    assert doc["proxies"] == ["moorline"]
    assert doc["settings"]["rounds"] == 1 and doc["settings"]["duration_s"] == 1
    for key in ("cpu_model", "cores", "kernel", "python", "nginx"):
        assert key in doc["machine"], key
    assert doc["machine"]["cores"] >= 1

    samples = doc["samples"]["moorline"]
    assert len(samples) == 1
    s = samples[0]
    assert s["ok"] is True, s.get("error")
    assert s["requests"] > 0 and s["rps"] > 0
    assert s["cpu_us_per_req"] > 0 and s["peak_rss_mib"] > 0
    assert s["p50_ms"] > 0 and s["p99_ms"] >= s["p50_ms"]
    assert s["non_2xx"] == 0

    summ = doc["summary"]["moorline"]
    assert summ["ok_runs"] == 1 and summ["failed_runs"] == 0
    assert summ["metrics"]["rps"]["median"] == pytest.approx(s["rps"])
    # Peers were not run: their ratios are present and null.
    assert doc["ratios"] == {"moorline/nginx": None, "moorline/haproxy": None}

    # The Markdown table went to stdout.
    assert "### h1-small" in res.stdout
    assert re.search(r"^\| proxy \| req/s \| p50 ms \| p99 ms \| CPU µs/req \|", res.stdout, re.M), res.stdout
    assert re.search(r"^\| moorline \| [0-9,]+ \|", res.stdout, re.M), res.stdout
    assert "No ratios" in res.stdout
    # Progress went to stderr, not into the tables.
    assert "h1-small: round 1/1, moorline" in res.stderr
    assert "[bench " not in res.stdout
