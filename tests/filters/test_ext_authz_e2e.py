"""``envoy.filters.http.ext_authz`` without an authorization client: it fails closed (403, flag
UAEX) as Envoy does when the service is unreachable, passes with ``failure_mode_allow`` (and the
header it may add), is off where ``ExtAuthzPerRoute.disabled`` says, and says all this at load."""

from __future__ import annotations

from typing import Any

import pytest

from moorline.testing.procs import config_http, free_port, http_request
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"


def _authz(**extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": TYPE,
            "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}},
            "transport_api_version": "V3",
            **extra,
        },
    }


def test_ext_authz_fails_closed_unless_allowed_and_is_off_per_route(
    moorline: Any, upstream: TestUpstream
) -> None:
    port = free_port()
    routes = [
        {
            "match": {"prefix": "/public"},
            "route": {"cluster": "svc"},
            "typed_per_filter_config": {
                "envoy.filters.http.ext_authz": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                    "disabled": True,
                }
            },
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "svc"}},
    ]
    cfg = config_http(
        port, {"svc": [upstream.port]}, routes=routes, hcm_extra={"http_filters": [_authz(), ROUTER]}
    )
    p = moorline(cfg)
    n = len(upstream.requests)
    assert http_request("127.0.0.1", port, "GET", "/private").status == 403
    assert len(upstream.requests) == n  # nothing reached the upstream
    assert http_request("127.0.0.1", port, "GET", "/public/x").status == 200
    assert p.stat("http.listener_http.ext_authz.error") == 1
    assert "external authorization calls are not implemented" in p.stderr_text()


def test_ext_authz_failure_mode_allow_passes_with_the_header(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    f = _authz(failure_mode_allow=True, failure_mode_allow_header_add=True)
    p = moorline(config_http(port, {"svc": [upstream.port]}, hcm_extra={"http_filters": [f, ROUTER]}))
    assert http_request("127.0.0.1", port, "GET", "/x").status == 200
    assert upstream.requests[-1].header("x-envoy-auth-failure-mode-allowed") == "true"
    assert p.stat("http.listener_http.ext_authz.failure_mode_allowed") == 1
