"""Tests of the process and client helpers (moorline.testing.procs)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from moorline.testing import procs
from moorline.testing.procs import RawConn, free_port, parse_stats_text, wait_for_log, wait_port
from moorline.testing.upstream import TestUpstream, chunked_payload, pattern_sha256

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_bootstrap(text: str):
    """Parse builder output with the real Envoy v3 protos: proves the YAML is valid Envoy."""
    import envoy.extensions.access_loggers.file.v3.file_pb2
    import envoy.extensions.filters.http.router.v3.router_pb2
    import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2
    import envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2  # noqa: F401
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    msg = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(yaml.safe_load(text), msg)
    return msg


def test_free_port_and_wait_port() -> None:
    p = free_port()
    assert procs.port_is_free(p)
    with pytest.raises(TimeoutError):
        wait_port("127.0.0.1", p, timeout=0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))
        s.listen()
        assert not procs.port_is_free(p)
        wait_port("127.0.0.1", p, timeout=2)


def test_config_builders_are_valid_envoy(tmp_path) -> None:
    text = procs.config_http(
        12345,
        clusters={"a": [1111, ("127.0.0.2", 2222)], "empty": []},
        routes=[{"match": {"prefix": "/"}, "route": {"cluster": "a", "timeout": "0.5s"}}],
        hcm_extra={"server_name": "x", "use_remote_address": True},
        access_log_path=tmp_path / "a.log",
        admin_port=9999,
    )
    b = _load_bootstrap(text)
    assert b.admin.address.socket_address.port_value == 9999
    assert b.static_resources.listeners[0].address.socket_address.port_value == 12345
    assert [c.name for c in b.static_resources.clusters] == ["a", "empty"]
    assert procs.admin_port_of(text) == ("127.0.0.1", 9999)
    tcp = procs.bootstrap([procs.tcp_listener("t", 1, "a")], [procs.cluster("a", [2])])
    assert _load_bootstrap(tcp).static_resources.listeners[0].name == "t"


def test_parse_stats_text() -> None:
    d = parse_stats_text(
        "cluster.a.upstream_rq_total: 20\ncluster.a.upstream_rq_time: P0(nan,1)\nnot a stat\n"
    )
    assert d == {"cluster.a.upstream_rq_total": 20, "cluster.a.upstream_rq_time": "P0(nan,1)"}


def test_wait_for_log_polls(tmp_path) -> None:
    log = tmp_path / "x.log"
    threading.Timer(0.2, lambda: log.write_text("code=404 flags=NR path=/nope\n")).start()
    assert "flags=NR" in wait_for_log(log, "path=/nope", timeout=5)
    with pytest.raises(TimeoutError):
        wait_for_log(log, "never", timeout=0.2)


def test_rss_kb_counts_children() -> None:
    assert procs.rss_kb(os.getpid()) > 1000
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(30 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while procs.rss_kb(child.pid) < 30_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs.rss_kb(os.getpid()) - procs.rss_kb(os.getpid(), with_children=False) >= 30_000
    finally:
        child.kill()
        child.wait()


def test_start_moorline_failure_shows_stderr(tmp_path) -> None:
    """A process that exits before /ready fails fast with its exit code and stderr, and leaves
    nothing running."""
    cfg = procs.config_http(free_port(), clusters={"a": [1]})
    bad = tmp_path / "bad-flag"
    with pytest.raises(procs.ProcStartError) as ei:
        procs.start_moorline(cfg, bad, ["--definitely-not-a-flag"], ready_timeout=20)
    msg = str(ei.value)
    assert "moorline exited with 2 before /ready" in msg
    assert "--definitely-not-a-flag" in msg  # argparse's complaint, from the child's stderr
    assert not [p for p in procs._live if p.alive()]


# Run inside an inner pytest session (pytester) with the real tests/conftest.py: each of these
# must be reported as a failure, except the genuine skip and the expected failure.
_INNER_TESTS = """
import socket

import pytest

from moorline.testing import procs


def test_port_already_taken(moorline, config_http):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        moorline(config_http(s.getsockname()[1], clusters={"a": [1]}))


def test_bad_config(moorline, config_http):
    moorline(config_http(procs.free_port(), clusters={"a": [1]}).replace("STATIC", "STATIK"))


def test_skip_for_a_missing_peer():
    pytest.skip("nginx is not installed")


@pytest.mark.skipif(True, reason="curl not installed")
def test_skipif_for_a_missing_peer():
    pass


def test_skip_because_moorline_does_not_start():
    pytest.skip("moorline does not start yet: boom")


def test_missing_binary():
    procs.require_binary("no-such-peer-program")


def test_genuine_skip():
    pytest.skip("no IPv6 loopback")


@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    assert False
"""


def test_moorline_start_failures_fail_and_never_skip(pytester: pytest.Pytester) -> None:
    """A moorline that cannot start (port already taken; bad config) fails its test, with the
    child's exit code and stderr tail in the report; so does any skip that blames a missing
    peer or moorline itself. A genuine skip stays a skip."""
    pytester.makeconftest((REPO_ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_inner=_INNER_TESTS)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=120)
    out = res.stdout.str()
    res.assert_outcomes(failed=5, errors=1, skipped=1, xfailed=1)
    for name in (
        "test_port_already_taken",
        "test_bad_config",
        "test_skip_for_a_missing_peer",
        "test_skip_because_moorline_does_not_start",
        "test_missing_binary",
    ):
        assert re.search(rf"^FAILED test_inner.py::{name}\b", out, re.M), out
    assert re.search(r"^ERROR test_inner.py::test_skipif_for_a_missing_peer\b", out, re.M), out
    assert re.search(r"^SKIPPED .*no IPv6 loopback", out, re.M), out
    # The child's own words reach the report: moorline's exit code and last stderr line.
    assert "moorline exited with 1 before /ready" in out
    assert "moorline: cannot start: [Errno 98] Address already in use" in out
    assert "moorline exited with 2 before /ready" in out
    assert 'clusters[0].type: invalid enum value "STATIK"' in out
    assert "skip turned into a failure: 'nginx is not installed'" in out
    assert "no-such-peer-program is missing" in out


def test_require_binary(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert procs.require_binary("sh").endswith("/sh")
    assert procs.require_binary(sys.executable) == sys.executable
    # A required peer that is missing: the error names its package and how to install it.
    monkeypatch.setitem(procs.REQUIRED_PEERS, "nginx", (str(tmp_path / "nginx"), "nginx"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(procs.PeerMissingError, match=r"Debian package nginx .*install-deps\.sh"):
        procs.require_binary("nginx")
    with pytest.raises(procs.PeerMissingError, match="definitely-not-a-program is missing: install it"):
        procs.require_binary("definitely-not-a-program")


def test_nginx_fixed_body_and_reverse_proxy(tmp_path, upstream: TestUpstream) -> None:
    procs.require_binary(procs.NGINX_BIN)
    p1, p2 = free_port(), free_port()
    fixed = procs.start_nginx(tmp_path, procs.nginx_fixed_body(p1, "fixed!\n"), p1)
    rev = procs.start_nginx(tmp_path, procs.nginx_reverse_proxy(p2, upstream.port), p2)
    try:
        assert procs.http_request("127.0.0.1", p1, "GET", "/").body == b"fixed!\n"
        with RawConn("127.0.0.1", p2) as c:
            for _ in range(3):
                c.send(b"GET /chunked/5 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert c.read_response().body == b"".join(chunked_payload(5))
            c.send(b"GET /bytes/300000 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert hashlib.sha256(c.read_response().body).hexdigest() == pattern_sha256(300000)
            c.send(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert json.loads(c.read_response().body)["body_len"] == 3
        # nginx keeps its upstream connection alive: one connection for all requests.
        assert len(upstream.connection_ids()) == 1
        assert fixed.rss_kb() > 0
    finally:
        assert fixed.stop(signal.SIGQUIT, 5) == 0
        rev.stop(signal.SIGQUIT, 5)
    assert not fixed.alive() and not rev.alive()


def test_fixtures_moorline_nginx_config_http(moorline, nginx, config_http) -> None:
    """The conftest factory fixtures start working processes (moorline in front of nginx)."""
    nport, port = free_port(), free_port()
    nginx(procs.nginx_fixed_body(nport, "via fixture\n"), nport)
    m = moorline(config_http(port, clusters={"ng": [nport]}))  # a failed start fails here
    assert procs.http_request("127.0.0.1", port, "GET", "/").body == b"via fixture\n"
    assert m.stat("cluster.ng.upstream_rq_total") == 1
