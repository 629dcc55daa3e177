"""The bolt bench's own Bolt frames and tools (bench/bolt.py): its request and response frames
decode with moorline's Bolt codec as what they claim to be, and its echo server and load
generator run a short direct load without an error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moorline.protocol.xprotocol.api import FrameKind, FrameReader
from moorline.protocol.xprotocol.bolt import CODECS

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # ``bench`` is not an installed package
    sys.path.insert(0, str(REPO))

from bench import bolt  # noqa: E402

CODEC = CODECS[0]


def test_bench_frames_are_bolt_v1_as_the_codec_reads_them() -> None:
    req = CODEC.decode(bolt.request_frame(7, b"x" * 1024))
    assert req.kind is FrameKind.REQUEST and req.request_id == 7 and req.timeout_ms == 3000
    assert req.service == bolt.SERVICE.decode() and req.method == "echo"
    assert bytes(req.body) == b"x" * 1024
    resp = CODEC.decode(bolt.response_frame(7, b"y" * 10))
    assert resp.kind is FrameKind.RESPONSE and resp.request_id == 7 and CODEC.is_success(resp)
    # The bench's framing and the codec's agree on lengths, whatever the split.
    stream = bolt.request_frame(1, b"a" * 100) + bolt.request_frame(2, b"b" * 3)
    r = FrameReader(CODEC)
    got = [f for i in range(len(stream)) for f in r.feed(stream[i : i + 1])]
    assert [CODEC.decode(f).request_id for f in got] == [1, 2]
    assert bolt._frame_len(stream, 0) == len(bolt.request_frame(1, b"a" * 100))


def test_echo_server_and_load_generator_run_direct() -> None:
    env = {"PYTHONPATH": str(REPO)}
    srv = subprocess.Popen(
        [sys.executable, "-m", "bench.bolt", "serve"], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline().strip()
        assert line.startswith("READY port="), line
        port = line.split("=", 1)[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.bolt",
                "load",
                "--port",
                port,
                "--connections",
                "4",
                "--duration",
                "1",
                "--warmup",
                "0.2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO,
            check=True,
        ).stdout.splitlines()
        assert out[0] == "MEASURING"
        res = json.loads(out[1])
        assert res["requests"] > 0 and res["errors"] == 0
        assert 0 < res["p50_ms"] <= res["p99_ms"]
    finally:
        srv.kill()
        srv.wait(5)
