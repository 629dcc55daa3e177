"""bench.micro_h2 drives the real HTTP/2 connection manager path in memory: every request of
its warm-up must come back as a complete 200, on whichever backend runs."""

from __future__ import annotations

from bench import micro_h2


def test_micro_h2_runs_and_every_response_completes() -> None:
    assert micro_h2.run(200) > 0
    assert micro_h2.peer(200) > 0
