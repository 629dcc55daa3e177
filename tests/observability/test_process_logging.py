"""Envoy-style process logging: levels, line format, per-component control."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from moorline import __version__
from moorline.observability import logging as mlog
from moorline.protocol import http1
from moorline.testing import procs
from moorline.testing.procs import free_port


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


@pytest.mark.e2e
def test_startup_log_shows_every_notice_at_info(tmp_path: Path) -> None:
    """At the default ``-l info`` the startup log has the info lines, and every accepted-but-
    ignored field is one line with its field path. (``moorline.main`` used to take the "main"
    name, which left the ``moorline`` logger unset: WARNING hid every info line.)"""
    port = free_port()
    extra = {"tracing": {}}
    doc = yaml.safe_load(procs.config_http(port, clusters={"c": [1]}, hcm_extra=extra))
    doc["stats_sinks"] = [{"name": "envoy.stat_sinks.statsd"}]
    p = procs.start_moorline(yaml.safe_dump(doc), tmp_path)  # --log-level info
    try:
        assert p.stop(signal.SIGTERM, 10) == 0
        lines = p.stderr_text().splitlines()
    finally:
        p.stop(signal.SIGKILL, 5)
    hcm = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
    notices = [ln for ln in lines if "[info][main] notice: " in ln]
    assert [ln.split("] notice: ", 1)[1].split(": ", 1)[0] for ln in notices] == [
        f"{hcm}.tracing",
        "stats_sinks[0]",
    ], lines
    ready = "[info][main] moorline " + __version__ + " ready (HTTP/1.1 parsers: "
    assert any(ready in ln for ln in lines), lines
    backend = "compiled, llhttp)" if http1.NATIVE else "pure Python on httptools)"
    assert any(ln.endswith(backend) for ln in lines if ready in ln), lines
