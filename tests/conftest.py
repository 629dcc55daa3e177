"""Shared pytest fixtures: test upstreams, moorline and nginx processes, Envoy config builders.

Every process or server a fixture starts is stopped at teardown, also when the test fails.
End-to-end tests carry ``@pytest.mark.e2e`` (``-m "not e2e"`` runs the unit tests alone).
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moorline.testing import procs
from moorline.testing.procs import MoorlineProc, NginxProc
from moorline.testing.upstream import TcpEchoServer, TestUpstream


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test running real processes and clients")


def require_binary(name: str) -> str:
    """Path of binary ``name``, or skip the test saying it is missing."""
    path = shutil.which(name) or (name if Path(name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


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
    SIGKILL of its process group)."""
    started: list[MoorlineProc] = []

    def make(
        config: str | Path | None, extra_args: list[str] | tuple[str, ...] = (), **kw: Any
    ) -> MoorlineProc:
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
    """Factory: ``nginx(conf_snippet, port)`` (skips if nginx is not installed)."""
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
