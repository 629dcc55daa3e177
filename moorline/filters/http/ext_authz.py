"""``envoy.filters.http.ext_authz``, accepted without an authorization client: moorline makes no
calls to an external authorization service yet, so it behaves as Envoy does when that service
cannot be reached. Every request the filter applies to is refused with ``status_on_error``
(403 by default, details ``ext_authz_error``, flag ``UAEX``), unless ``failure_mode_allow`` is
set, in which case it passes (with ``x-envoy-auth-failure-mode-allowed: true`` when
``failure_mode_allow_header_add``). A notice says so at load, so a configured protection never
silently turns into none.

``filter_enabled_metadata`` (Istio's CUSTOM policies gate the filter on the RBAC filter's shadow
metadata) cannot be evaluated (no dynamic metadata): the filter then applies to every request,
failing closed, and a notice says that too. ``ExtAuthzPerRoute.disabled`` turns it off per route.
Stats ``http.<stat_prefix>.ext_authz.error`` and ``failure_mode_allowed``.
"""

from __future__ import annotations

from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.protocol.headers import RequestHeaders
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, HttpFilter

NAME = "envoy.filters.http.ext_authz"
TYPE = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


class ExtAuthzConfig:
    __slots__ = ("allow", "allowed", "error", "header_add", "name", "status")

    def __init__(self, name: str, status: int, allow: bool, header_add: bool, scope: Any) -> None:
        self.name = name
        self.status = status
        self.allow = allow
        self.header_add = header_add
        self.error = scope.counter("error")
        self.allowed = scope.counter("failure_mode_allowed")

    def __call__(self, stream: Any) -> ExtAuthzFilter:
        return ExtAuthzFilter(self)


class ExtAuthzFilter(HttpFilter):
    __slots__ = ("cfg",)

    def __init__(self, cfg: ExtAuthzConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        cb = self.callbacks
        assert cb is not None
        if cb.route_config(self.cfg.name) is True:  # ExtAuthzPerRoute.disabled
            return CONTINUE
        cfg = self.cfg
        cfg.error.value += 1
        if cfg.allow:
            cfg.allowed.value += 1
            if cfg.header_add:
                headers.set(b"x-envoy-auth-failure-mode-allowed", b"true")
            return CONTINUE
        cb.send_local_reply(cfg.status, b"", "UAEX", "ext_authz_error")
        return STOP_ITERATION


def _per_route(msg: Any, path: str) -> bool | None:
    if msg.disabled:
        return True
    if msg.HasField("check_settings"):
        raise ConfigError(
            f"{path}.check_settings", "check settings need an authorization client, which moorline has not"
        )
    return None


def _factory(cfg: Any, ctx: Any, path: str) -> ExtAuthzConfig:
    tpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(tpath, "typed_config is required")
    allow = bool(cfg.failure_mode_allow)
    what = "passes every request (failure_mode_allow)" if allow else "refuses every request it applies to"
    ctx.notice(
        f"{path} ({NAME}): external authorization calls are not implemented; the filter acts as if the "
        f"authorization service were unreachable and {what}"
    )
    if cfg.HasField("filter_enabled_metadata"):
        ctx.notice(
            f"{tpath}.filter_enabled_metadata: dynamic metadata is not produced, so the filter applies to "
            "every request"
        )
    status = (
        int(cfg.status_on_error.code) if cfg.HasField("status_on_error") and cfg.status_on_error.code else 403
    )
    if not 200 <= status <= 599:
        raise ConfigError(f"{tpath}.status_on_error.code", "must be an HTTP status between 200 and 599")
    prefix = getattr(ctx, "http_stat_prefix", "") or "http."
    scope = ctx.stats.scope(f"{prefix}ext_authz.{cfg.stat_prefix + '.' if cfg.stat_prefix else ''}")
    return ExtAuthzConfig(NAME, status, allow, bool(cfg.failure_mode_allow_header_add), scope)


registry.register(
    "http",
    [NAME, "envoy.ext_authz"],
    ["type.googleapis.com/" + TYPE],
    _factory,
    per_route=_per_route,
    per_route_types=["type.googleapis.com/" + PER_ROUTE_TYPE],
)
