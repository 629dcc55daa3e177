"""Envoy-style process logging: levels, line format, per-component control."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from moorline import __version__
from moorline.observability import logging as mlog
from moorline.protocol import http1, http2_backends
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
    backend = "compiled, llhttp" if http1.NATIVE else "pure Python on httptools"
    h2 = "libnghttp2" if http2_backends.BACKEND == "nghttp2" else "pure Python h2"
    assert any(ln.endswith(f"{backend}; HTTP/2 codec: {h2})") for ln in lines if ready in ln), lines


def _record(msg: str, name: str = "moorline.upstream", level: int = logging.INFO) -> logging.LogRecord:
    r = logging.LogRecord(
        name, level, "/src/moorline/upstream/cluster.py", 42, msg, None, None, func="resolve"
    )
    r.created = 1700000000.123456
    r.msecs = 123.0
    return r


def test_log_format_pattern_flags() -> None:
    """Istio's pattern (``%Y-%m-%dT%T.%fZ\\t%l\\tenvoy %n %g:%#\\t%v\\tthread=%t``) and the other
    spdlog flags Envoy documents; an unknown flag stays as written."""
    f = mlog.PatternFormatter("%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t")
    line = f.format(_record("cluster foo: 3 hosts"))
    t = time.localtime(1700000000)
    assert line == (
        f"{time.strftime('%Y-%m-%dT%H:%M:%S', t)}.123456Z\tinfo\tenvoy upstream "
        f"/src/moorline/upstream/cluster.py:42\tcluster foo: 3 hosts\tthread={threading.get_native_id()}"
    )
    f = mlog.PatternFormatter("[%L][%-8l][%5n][%s:%#][%!][%e|%F][%P] %% %q %v")
    line = f.format(_record("hi", level=logging.WARNING))
    assert line == f"[W][warning ][upstream][cluster.py:42][resolve][123|123456000][{os.getpid()}] % %q hi"
    assert mlog.PatternFormatter("%^%l%$").format(_record("x", "moorline")) == "info"


def test_log_format_escaping() -> None:
    """``--log-format-escaped`` keeps one record on one line; ``%_`` escapes newlines and ``%j``
    escapes for a JSON string even without it."""
    rec = _record('two\nlines "q"\t')
    assert mlog.PatternFormatter("%v").format(rec) == 'two\nlines "q"\t'
    assert mlog.PatternFormatter("%v", escaped=True).format(rec) == 'two\\nlines "q"\\t'
    assert mlog.PatternFormatter("%_").format(rec) == 'two\\nlines "q"\t'
    assert mlog.PatternFormatter('{"msg":"%j"}').format(rec) == '{"msg":"two\\nlines \\"q\\"\\t"}'
    assert mlog.EnvoyFormatter(escaped=True).format(rec).endswith('[upstream] two\\nlines "q"\\t')


def test_json_application_log_format() -> None:
    """``application_log_config.log_format.json_format``: a JSON object per line, each string a
    pattern, other values kept."""
    f = mlog.JsonPatternFormatter({"level": "%l", "scope": "envoy %n", "msg": "%v", "n": 1, "tags": ["%L"]})
    out = json.loads(f.format(_record('a "b"\nc')))
    assert out == {"level": "info", "scope": "envoy upstream", "msg": 'a "b"\nc', "n": 1, "tags": ["I"]}


def test_component_log_levels(restore: None) -> None:
    """``--component-log-level``: Envoy names map onto moorline's components; Envoy names
    moorline has no logger for are reported (not an error); unknown names and bad levels are."""
    buf = io.StringIO()
    unmapped = mlog.setup_logging(
        "info", stream=buf, component_levels="upstream:debug,misc:error,connection:error"
    )
    assert unmapped == ["--component-log-level misc:error: moorline has no 'misc' component; ignored"]
    lv = mlog.levels()
    assert (lv["upstream"], lv["listener"], lv["main"]) == ("debug", "error", "info")
    logging.getLogger("moorline.upstream").debug("shown")
    logging.getLogger("moorline.listener").warning("hidden")
    assert "shown" in buf.getvalue() and "hidden" not in buf.getvalue()
    # main alone: the other components stay where they were
    mlog.setup_logging("info", stream=buf, component_levels="main:error")
    lv = mlog.levels()
    assert (lv["main"], lv["admin"], lv["xds"]) == ("error", "info", "info")
    for bad in ("upstream", "upstream:loud", "nosuch:debug", ":debug"):
        with pytest.raises(mlog.LogSetupError):
            mlog.setup_logging("info", stream=buf, component_levels=bad)


def test_log_path(restore: None, tmp_path: Path) -> None:
    p = tmp_path / "envoy.log"
    mlog.setup_logging("info", log_format="%l %n %v", path=str(p))
    logging.getLogger("moorline.admin").info("to the file")
    assert p.read_text() == "info admin to the file\n"
    with pytest.raises(mlog.LogSetupError):
        mlog.setup_logging("info", path=str(tmp_path / "no" / "such" / "dir.log"))
