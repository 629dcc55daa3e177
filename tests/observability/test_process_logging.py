"""Envoy-style process logging: levels, line format, per-component control."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator

import pytest

from moorline.observability import logging as mlog


@pytest.fixture
def restore() -> Iterator[None]:
    root = logging.getLogger("moorline")
    handlers, propagate = list(root.handlers), root.propagate
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.propagate = propagate
    mlog.set_level("info")


def test_line_format_and_levels(restore: None) -> None:
    buf = io.StringIO()
    mlog.setup_logging("debug", stream=buf)
    logging.getLogger("moorline.upstream").debug("cluster %s: %d hosts", "foo", 3)
    logging.getLogger("moorline").warning("hello")
    logging.getLogger("moorline.upstream").log(mlog.TRACE, "too fine")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    pid = os.getpid()
    assert re.fullmatch(
        rf"\[\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}}\]\[{pid}\]\[debug\]\[upstream\] cluster foo: 3 hosts",
        lines[0],
    )
    assert lines[1].endswith(f"[{pid}][warning][main] hello")


def test_set_level_all_and_one(restore: None) -> None:
    buf = io.StringIO()
    mlog.setup_logging("info", stream=buf)
    up = logging.getLogger("moorline.upstream")
    logging.getLogger("moorline.admin")
    assert mlog.set_level("trace")
    assert mlog.levels()["upstream"] == "trace" and mlog.levels()["main"] == "trace"
    assert mlog.set_level("error", "upstream")
    assert mlog.levels()["upstream"] == "error" and mlog.levels()["admin"] == "trace"
    up.warning("dropped")
    assert "dropped" not in buf.getvalue()
    assert mlog.set_level("warn")  # setting all resets the single override
    assert mlog.levels()["upstream"] == "warning"
    assert mlog.set_level("off")
    logging.getLogger("moorline").critical("silent")
    assert "silent" not in buf.getvalue()
    assert mlog.levels()["main"] == "off"
    assert not mlog.set_level("verbose")
    assert not mlog.set_level("info", "no-such-component")
    with pytest.raises(ValueError):
        mlog.setup_logging("loud")
