"""``envoy.filters.http.cors`` through a real moorline process, with curl as the browser: a
preflight answered by moorline (HTTP/1.1 and HTTP/2), an actual request forwarded to the test
upstream with the allow-origin headers on its response, a disallowed origin, the legacy
virtual-host ``cors`` field, and the ``http.<stat_prefix>.cors.*`` counters."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from moorline.testing.procs import config_http, free_port, require_binary
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

CORS = {
    "name": "envoy.filters.http.cors",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
}
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
POLICY = {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
    "allow_origin_string_match": [{"exact": "https://app.example"}],
    "allow_methods": "GET, PUT, DELETE",
    "allow_headers": "content-type, x-token",
    "expose_headers": "x-upstream-id",
    "max_age": "86400",
    "allow_credentials": True,
}


def _curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """``curl -i``: status, headers (lower-case names, last value) and body."""
    out = subprocess.run(
        [require_binary("curl"), "-sS", "-i", "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def _config(port: int, upstream_port: int, admin_port: int, vh_extra: dict[str, Any]) -> str:
    import yaml

    doc = yaml.safe_load(config_http(port, {"up": [upstream_port]}, admin_port=admin_port))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [CORS, ROUTER]
    hcm["codec_type"] = "AUTO"
    vh = hcm["route_config"]["virtual_hosts"][0]
    vh["routes"] = [
        {"match": {"prefix": "/open"}, "route": {"cluster": "up"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "up"}},
    ]
    vh.update(vh_extra)
    return yaml.safe_dump(doc)


def test_curl_preflight_and_actual_request(moorline: Any, upstream: TestUpstream) -> None:
    port, admin = free_port(), free_port()
    proc = moorline(
        _config(port, upstream.port, admin, {"typed_per_filter_config": {"envoy.filters.http.cors": POLICY}})
    )
    url = f"http://127.0.0.1:{port}/api/items"
    pre = ["-X", "OPTIONS", "-H", "Origin: https://app.example", "-H", "Access-Control-Request-Method: PUT"]
    for proto in (["--http1.1"], ["--http2-prior-knowledge"]):
        status, h, body = _curl(*proto, *pre, "-H", "Access-Control-Request-Headers: x-token", url)
        assert status == 200 and body == b""
        assert h["access-control-allow-origin"] == "https://app.example"
        assert h["access-control-allow-methods"] == "GET, PUT, DELETE"
        assert h["access-control-allow-headers"] == "content-type, x-token"
        assert h["access-control-max-age"] == "86400"
        assert h["access-control-allow-credentials"] == "true"
    assert upstream.requests == []  # both preflights were answered by moorline

    status, h, body = _curl("-X", "PUT", "-H", "Origin: https://app.example", "--data", "x", url)
    assert status == 200 and json.loads(body)["method"] == "PUT"
    assert h["access-control-allow-origin"] == "https://app.example"
    assert h["access-control-expose-headers"] == "x-upstream-id"
    assert "access-control-allow-methods" not in h

    # Another origin: its preflight is forwarded (forward_not_matching_preflights defaults to
    # true) and nothing allows it.
    status, h, body = _curl(
        "-X", "OPTIONS", "-H", "Origin: https://evil.example", "-H", "Access-Control-Request-Method: PUT", url
    )
    assert json.loads(body)["method"] == "OPTIONS"
    assert "access-control-allow-origin" not in h
    assert len(upstream.requests) == 2

    assert proc.stat("http.listener_http.cors.origin_valid") == 3
    assert proc.stat("http.listener_http.cors.origin_invalid") == 1


def test_curl_legacy_virtual_host_cors(moorline: Any, upstream: TestUpstream) -> None:
    """The deprecated virtual-host ``cors`` field is a policy for the CORS filter."""
    port, admin = free_port(), free_port()
    legacy = {
        "cors": {
            "allow_origin_string_match": [{"safe_regex": {"regex": r"https://.*\.example"}}],
            "allow_methods": "GET",
        }
    }
    proc = moorline(_config(port, upstream.port, admin, legacy))
    assert "cors: ignored" not in proc.stderr_text()
    status, h, _ = _curl(
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://b.example",
        "-H",
        "Access-Control-Request-Method: GET",
        f"http://127.0.0.1:{port}/open",
    )
    assert status == 200 and h["access-control-allow-origin"] == "https://b.example"
    assert h["access-control-allow-methods"] == "GET" and "access-control-allow-credentials" not in h
    assert upstream.requests == []
