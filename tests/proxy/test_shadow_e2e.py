"""Request mirroring end to end: a real moorline, a primary and a mirror TestUpstream, real
clients (http.client)."""

from __future__ import annotations

from typing import Any

from moorline.testing.procs import cluster, config_http, free_port, http_request
from moorline.testing.upstream import TestUpstream


def start(moorline: Any, primary: int, mirror: int, **policy: Any) -> tuple[Any, int]:
    port, admin = free_port(), free_port()
    routes = [
        {
            "match": {"prefix": "/off"},
            "route": {
                "cluster": "be",
                "request_mirror_policies": [
                    {"cluster": "shadow", "runtime_fraction": {"default_value": {"numerator": 0}}}
                ],
            },
        },
        {
            "match": {"prefix": "/"},
            "route": {"cluster": "be", "request_mirror_policies": [{"cluster": "shadow", **policy}]},
        },
    ]
    cfg = config_http(
        port, [cluster("be", [primary]), cluster("shadow", [mirror])], routes=routes, admin_port=admin
    )
    return moorline(cfg), port


def test_mirror_gets_the_same_post_with_host_suffixed(moorline: Any, upstreams: Any) -> None:
    primary, mirror = upstreams(upstream_id="primary"), upstreams(upstream_id="mirror")
    _, port = start(moorline, primary.port, mirror.port)
    body = b"x" * 5000
    r = http_request("127.0.0.1", port, "POST", "/echo/path?q=1", body=body, headers={"host": "svc.local"})
    assert r.status == 200
    m = mirror.wait_for_requests(1)[0]
    p = primary.requests[0]
    assert (m.method, m.path, m.body_len, m.sha256) == (p.method, p.path, p.body_len, p.sha256)
    assert m.body_len == 5000
    assert p.header("host") == "svc.local" and m.header("host") == "svc.local-shadow"


def test_slow_mirror_does_not_delay_the_primary(moorline: Any, upstreams: Any) -> None:
    primary, mirror = upstreams(upstream_id="primary"), upstreams(upstream_id="mirror")
    primary.ignore_delay_header = True
    proc, port = start(moorline, primary.port, mirror.port)
    r = http_request("127.0.0.1", port, "GET", "/", headers={"x-test-delay-ms": "3000"})
    assert r.status == 200
    mirror.wait_for_requests(1)
    # The primary answered while the shadow is still waiting for the mirror's (delayed) answer.
    assert proc.stat("cluster.shadow.upstream_rq_active") == 1
    assert proc.stat("cluster.shadow.upstream_rq_total") == 1


def test_mirror_answering_500_changes_nothing(moorline: Any, upstreams: Any) -> None:
    primary, mirror = upstreams(upstream_id="primary"), upstreams(upstream_id="mirror", always_status=500)
    proc, port = start(moorline, primary.port, mirror.port)
    for _ in range(3):
        assert http_request("127.0.0.1", port, "GET", "/").status == 200
    mirror.wait_for_requests(3)
    assert proc.stat("cluster.be.upstream_rq_5xx") == 0


def test_mirror_down_changes_nothing(moorline: Any, upstreams: Any) -> None:
    primary = upstreams(upstream_id="primary")
    proc, port = start(moorline, primary.port, free_port())  # nothing listens there
    for _ in range(3):
        r = http_request("127.0.0.1", port, "POST", "/", body=b"abc")
        assert r.status == 200
    assert len(primary.requests) == 3
    assert proc.stat("cluster.be.upstream_rq_retry") == 0


def test_zero_fraction_sends_nothing(moorline: Any, upstreams: Any) -> None:
    primary, mirror = upstreams(upstream_id="primary"), upstreams(upstream_id="mirror")
    _, port = start(moorline, primary.port, mirror.port)
    assert http_request("127.0.0.1", port, "GET", "/off").status == 200
    assert http_request("127.0.0.1", port, "GET", "/on").status == 200
    # The /on shadow arrives; a /off shadow would have been sent before it.
    recs = mirror.wait_for_requests(1)
    assert [r.path for r in recs] == ["/on"]
    assert [r.path for r in primary.requests] == ["/off", "/on"]


def test_disable_suffix(moorline: Any, upstream: TestUpstream, upstreams: Any) -> None:
    mirror = upstreams(upstream_id="mirror")
    _, port = start(moorline, upstream.port, mirror.port, disable_shadow_host_suffix_append=True)
    assert http_request("127.0.0.1", port, "GET", "/", headers={"host": "svc"}).status == 200
    assert mirror.wait_for_requests(1)[0].header("host") == "svc"
