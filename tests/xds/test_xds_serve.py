"""``moorline xds-serve`` with the example mesh (examples/xds-mesh, ports rewritten on a copy):
two sidecars, one on delta and one on state of the world, configured only by the directory;
an edit is pushed, a bad file is refused and the last good resources keep serving."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moorline.testing.procs import free_port, http_request, wait_port, wait_until

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "xds-mesh"


_wait = functools.partial(wait_until, timeout=30.0, interval=0.1, ignore=(OSError,))


def _copy(tmp_path: Path) -> tuple[Path, dict[int, int]]:
    dst = tmp_path / "xds-mesh"
    shutil.copytree(EXAMPLE, dst)
    ports = {p: free_port() for p in (10000, 10100, 9911, 9912, 18000)}
    for f in dst.rglob("*.yaml"):
        f.write_text(
            re.sub(
                r"port_value: (\d+)",
                lambda m: f"port_value: {ports.get(int(m.group(1)), int(m.group(1)))}",
                f.read_text(),
            )
        )
    return dst, ports


def test_the_example_mesh_runs_from_files_and_follows_edits(tmp_path: Path, moorline: Any) -> None:
    mesh, ports = _copy(tmp_path)
    log = (tmp_path / "xds-serve.log").open("w")
    cp = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moorline",
            "xds-serve",
            str(mesh / "xds"),
            "--listen",
            f"127.0.0.1:{ports[18000]}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port("127.0.0.1", ports[18000], 20)
        b = moorline(mesh / "sidecar-b.yaml")
        a = moorline(mesh / "sidecar-a.yaml")
        front = ports[10000]
        _wait(lambda: http_request("127.0.0.1", front, "GET", "/").status == 200, "sidecar-a's listener")
        assert http_request("127.0.0.1", front, "GET", "/").body == b"hello from sidecar-a\n"
        _wait(lambda: http_request("127.0.0.1", front, "GET", "/b").status == 200, "the route to sidecar-b")
        assert (
            http_request("127.0.0.1", front, "GET", "/b").body == b"hello from service-b, through sidecar-b\n"
        )
        assert (
            a.stat("listener_manager.lds.update_success") >= 1
            and b.stat("listener_manager.lds.update_success") >= 1
        )
        # An edit is pushed (RDS to sidecar-a only).
        f = mesh / "xds" / "nodes" / "sidecar-a" / "front.yaml"
        f.write_text(f.read_text().replace("hello from sidecar-a", "hello again"))
        _wait(lambda: http_request("127.0.0.1", front, "GET", "/").body == b"hello again\n", "the edit")
        # A bad file is refused whole; the last good resources stay.
        bad = mesh / "xds" / "nodes" / "sidecar-a" / "broken.yaml"
        bad.write_text(
            "resources:\n- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: x\n  type: NOPE\n"
        )
        _wait(lambda: "broken.yaml" in (tmp_path / "xds-serve.log").read_text(), "the refusal")
        text = (tmp_path / "xds-serve.log").read_text()
        assert "refused" in text and "resources[0].type" in text, text
        assert http_request("127.0.0.1", front, "GET", "/b").status == 200
        assert "Traceback" not in text
    finally:
        cp.terminate()
        cp.wait(10)
        log.close()
    assert cp.returncode == 0


def test_xds_serve_refuses_a_bad_directory_at_start(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("resources:\n- '@type': type.googleapis.com/nope.Thing\n")
    r = subprocess.run(
        [sys.executable, "-m", "moorline", "xds-serve", str(tmp_path), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "x.yaml" in r.stdout and "resources[0].@type" in r.stdout, r.stdout
