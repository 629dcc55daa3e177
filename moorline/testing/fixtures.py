"""Where the shared fixtures (configs written by Istio and Envoy) are.

The repository sits beside ``shared/`` (``<repo>/../shared/fixtures``) on developer machines and
in CI; ``MOORLINE_FIXTURES`` overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path


def fixtures_dir() -> Path:
    env = os.environ.get("MOORLINE_FIXTURES")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for cand in (repo.parent / "shared" / "fixtures", Path("/work/shared/fixtures")):
        if cand.is_dir():
            return cand
    return repo.parent / "shared" / "fixtures"


FIXTURES = fixtures_dir()
