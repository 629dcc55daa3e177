"""Shared pytest fixtures: test upstreams, moorline and nginx processes, Envoy config builders.

Every process or server a fixture starts is stopped at teardown, also when the test fails.
End-to-end tests carry ``@pytest.mark.e2e`` (``-m "not e2e"`` runs the unit tests alone).

A test that cannot start moorline, or that lacks a peer ``make test`` installs (nginx, HAProxy,
wrk, iperf3, h2load, curl, openssl), FAILS; it never skips. CI installs all of them, so a skip
for one of these reasons would only hide a broken install. :func:`require_binary` and the
``moorline`` fixture fail with the reason (``ProcStartError`` with the child's exit code and
stderr tail for moorline), and :func:`pytest_runtest_makereport` turns any ``pytest.skip`` /
``skipif`` whose reason says such a peer is "not installed" (or that moorline does not start)
into a failure, wherever it is written. Skips for things that genuinely cannot run here (no IPv6 loopback, a fixed port taken
by another process, the shared fixtures checkout absent, moorline-only checks in the
``MOORLINE_E2E_TARGET=nginx`` mode) stay skips.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moorline.testing import procs
from moorline.testing.procs import MoorlineProc, NginxProc
from moorline.testing.upstream import TcpEchoServer, TestUpstream

# tests/testing/test_procs.py runs inner pytest sessions to prove that start failures fail.
pytest_plugins = ("pytester",)

# A skip reason that blames a missing required peer, or moorline itself not starting.
_BROKEN_INSTALL = re.compile(
    r"\b(?:nginx|haproxy|wrk|iperf3|h2load|curl|openssl)\b.*\bnot\s+(?:installed|present|found)\b"
    r"|\bmoorline\b.*\b(?:does|did|could|can)\s*not\s+start",
    re.IGNORECASE | re.DOTALL,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test running real processes and clients")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A skip whose reason is a missing required peer (or moorline not starting) is reported as
    a failure: see the module docstring."""
    rep = yield
    excinfo = call.excinfo
    if (
        rep.skipped
        and not hasattr(rep, "wasxfail")
        and excinfo is not None
        and excinfo.errisinstance(pytest.skip.Exception)
    ):
        reason = str(getattr(excinfo.value, "msg", "") or excinfo.value)
        if _BROKEN_INSTALL.search(reason):
            rep.outcome = "failed"
            rep.longrepr = (
                f"skip turned into a failure: {reason!r}. `make test` installs every peer the tests"
                " drive (scripts/install-deps.sh) and moorline must start, so this is a broken"
                " install or a broken moorline, not a reason to skip (tests/conftest.py)."
            )
    return rep


def require_binary(name: str) -> str:
    """Path of binary ``name``; the test fails (does not skip) when it is missing."""
    try:
        return procs.require_binary(name)
    except procs.PeerMissingError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def upstream() -> Iterator[TestUpstream]:
    """One running :class:`TestUpstream` (id ``upstream``)."""
    up = TestUpstream(upstream_id="upstream").start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def upstreams() -> Iterator[Callable[..., TestUpstream]]:
    """Factory: ``upstreams(upstream_id="b", always_status=503) -> TestUpstream``; each call
    starts one more upstream (ids default to u1, u2, ...)."""
    started: list[TestUpstream] = []

    def make(**kw: Any) -> TestUpstream:
        kw.setdefault("upstream_id", f"u{len(started) + 1}")
        up = TestUpstream(**kw).start()
        started.append(up)
        return up

    try:
        yield make
    finally:
        for up in started:
            up.stop()


@pytest.fixture
def echo_server() -> Iterator[TcpEchoServer]:
    srv = TcpEchoServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def moorline(tmp_path: Path) -> Iterator[Callable[..., MoorlineProc]]:
    """Factory: ``moorline(config_text_or_path, extra_args=(), **start_moorline_kwargs)``.

    Waits for the admin ``/ready``; stops every started process at teardown (SIGTERM, then
    SIGKILL of its process group). A moorline that does not start fails the test with its exit
    code and stderr tail."""
    started: list[MoorlineProc] = []

    def make(
        config: str | Path | None, extra_args: list[str] | tuple[str, ...] = (), **kw: Any
    ) -> MoorlineProc:
        # ProcStartError propagates (a failure, never a skip), carrying the exit code and the
        # stderr tail; tests that expect a failed start can still catch it.
        proc = procs.start_moorline(config, tmp_path / "moorline", extra_args, **kw)
        started.append(proc)
        return proc

    try:
        yield make
    finally:
        for p in started:
            p.stop(signal.SIGTERM, 5)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., NginxProc]]:
    """Factory: ``nginx(conf_snippet, port)`` (fails the test if nginx is not installed)."""
    require_binary(procs.NGINX_BIN)
    started: list[NginxProc] = []

    def make(conf_snippet: str, port: int) -> NginxProc:
        proc = procs.start_nginx(tmp_path, conf_snippet, port)
        started.append(proc)
        return proc

    try:
        yield make
    finally:
        for p in started:
            p.stop(signal.SIGQUIT, 5)


@pytest.fixture
def config_http() -> Callable[..., str]:
    """``config_http(listener_port, clusters=..., routes=..., hcm_extra=..., access_log_path=...)``
    -> Envoy bootstrap YAML with an admin on a free port (see ``procs.config_http``)."""
    return procs.config_http
