"""``envoy.filters.http.health_check``: answer health checks, following the server's health.

A request whose headers match every configured ``headers`` matcher is a health check. In
non-pass-through mode the filter answers it itself: 200 while the server is healthy, 503 once
``POST /healthcheck/fail`` was called on the admin API (and while draining). In pass-through
mode the request goes to the upstream, except that a failed server still answers 503 itself.
Responses carry ``x-envoy-upstream-healthchecked-cluster`` as Envoy's do (the node's cluster),
and while the server fails its health checks every response carries
``x-envoy-immediate-health-check-fail: true`` (a proxy with active health checks in front
then fails this host at once).
``cluster_min_healthy_percentages`` and ``cache_time`` are accepted and noted, not applied.
"""

from __future__ import annotations

from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.protocol.headers import HeaderMap, RequestHeaders
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, HttpFilter
from moorline.proxy.route_table import HeaderMatcher

NAME = "envoy.filters.http.health_check"
TYPE = "envoy.extensions.filters.http.health_check.v3.HealthCheck"


class _Config:
    __slots__ = ("cluster", "matchers", "pass_through", "server")

    def __init__(
        self, matchers: list[HeaderMatcher], pass_through: bool, server: Any, cluster: bytes
    ) -> None:
        self.matchers = matchers
        self.pass_through = pass_through
        self.server = server
        self.cluster = cluster

    def failed(self) -> bool:
        s = self.server
        if s is None:
            return False
        return bool(getattr(s, "health_check_failed", False)) or getattr(s, "state", "LIVE") == "DRAINING"


class HealthCheckFilter(HttpFilter):
    __slots__ = ("cfg", "is_hc")

    def __init__(self, cfg: _Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.is_hc = False

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        method, authority, path = headers.method, headers.authority, headers.path
        if not all(m.match(headers, method, authority, path) for m in self.cfg.matchers):
            return CONTINUE
        self.is_hc = True
        cb = self.callbacks
        assert cb is not None
        failed = self.cfg.failed()
        if self.cfg.pass_through and not failed:
            return CONTINUE
        cb.send_local_reply(
            503 if failed else 200, b"", None, "health_check_failed" if failed else "health_check_ok"
        )
        return STOP_ITERATION

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> int:
        if self.is_hc:
            headers.set(b"x-envoy-upstream-healthchecked-cluster", self.cfg.cluster)
        if self.cfg.failed():
            # Every answer, not only health checks': a proxy in front of this one with active
            # health checks takes this host out at once (Envoy's behaviour).
            headers.set(b"x-envoy-immediate-health-check-fail", b"true")
        return CONTINUE


def _factory(cfg: Any, ctx: Any, path: str) -> Any:
    if cfg is None:
        raise ConfigError(f"{path}.typed_config", "typed_config is required")
    if not cfg.HasField("pass_through_mode"):
        raise ConfigError(f"{path}.typed_config.pass_through_mode", "pass_through_mode is required")
    matchers = [
        HeaderMatcher.compile(h, f"{path}.typed_config.headers[{i}]") for i, h in enumerate(cfg.headers)
    ]
    if cfg.HasField("cache_time") or len(cfg.cluster_min_healthy_percentages):
        ctx.notice(f"{path}: cache_time / cluster_min_healthy_percentages are accepted but not applied")
    server = ctx.server
    cluster = b""
    if server is not None and server.bootstrap.HasField("node"):
        cluster = server.bootstrap.node.cluster.encode()
    c = _Config(matchers, bool(cfg.pass_through_mode.value), server, cluster)
    return lambda stream: HealthCheckFilter(c)


registry.register("http", [NAME, "envoy.health_check"], ["type.googleapis.com/" + TYPE], _factory)
