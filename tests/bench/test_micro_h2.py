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
