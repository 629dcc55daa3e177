"""bench.micro_h2 drives the real HTTP/2 connection manager path in memory: every request of
its warm-up must come back as a complete 200, on whichever backend runs."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # ``bench`` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import micro_h2  # noqa: E402


def test_micro_h2_runs_and_every_response_completes() -> None:
    assert micro_h2.run(200) > 0
    assert micro_h2.peer(200) > 0


def test_a_finished_http2_exchange_is_freed_by_reference_counting(monkeypatch: object) -> None:
    # The downstream stream and its ActiveStream referred to each other until the cycle
    # collector found them: ~19 objects of cyclic garbage per request, and gc_collect_main a
    # fifth of the CPU of a gRPC call under load. Now none, for plain and gRPC requests.
    import gc

    import pytest

    mp = pytest.MonkeyPatch()
    mp.setattr(gc, "set_threshold", lambda *a: None)  # run() tunes the collector; keep it off
    try:
        for fn in (micro_h2.run, micro_h2.run_grpc):
            gc.disable()
            fn(100)
            gc.collect()
            gc.disable()
            fn(2000)
            assert gc.collect() < 200, fn.__name__  # one-off loop objects, not 15+ per request
    finally:
        mp.undo()
        gc.enable()
