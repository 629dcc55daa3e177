"""Request mirroring end to end: a real moorline, a primary and a mirror TestUpstream, real
clients (http.client, curl over h2c); policies at the route, virtual host and route
configuration levels; a mirror cluster that speaks HTTP/2 (the scripted h2c server of
tests/e2e/test_h2_e2e.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

from moorline.testing import procs
from moorline.testing.procs import cluster, config_http, free_port, http_request
from moorline.testing.upstream import TestUpstream

# The scripted h2c server of test_h2_e2e.py, loaded by path (tests/ is not a package).
_spec = importlib.util.spec_from_file_location(
    "h2_e2e_helpers", Path(__file__).parent.parent / "e2e" / "test_h2_e2e.py"
)
assert _spec is not None and _spec.loader is not None
_h2 = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _h2  # its dataclasses look their module up
_spec.loader.exec_module(_h2)
H2Upstream = _h2.H2Upstream

HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


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


def _level_config(port: int, clusters: list[dict[str, Any]]) -> str:
    """Virtual host ``svc`` mirrors to ``vh_shadow`` (replacing the route configuration's
    ``rc_shadow``), except its route ``/own``, which mirrors to ``route_shadow``; any other
    host falls to a virtual host without policies, which inherits ``rc_shadow``."""
    vhosts = [
        {
            "name": "svc",
            "domains": ["svc.local"],
            "request_mirror_policies": [{"cluster": "vh_shadow"}],
            "routes": [
                {
                    "match": {"prefix": "/own"},
                    "route": {"cluster": "be", "request_mirror_policies": [{"cluster": "route_shadow"}]},
                },
                {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
            ],
        },
        {
            "name": "other",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "be"}}],
        },
    ]
    lst = procs.hcm_listener("listener_http", port, virtual_hosts=vhosts)
    rc = lst["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    rc["request_mirror_policies"] = [{"cluster": "rc_shadow"}]
    return procs.bootstrap([lst], clusters)


def test_virtual_host_and_route_configuration_policies_with_an_h2c_client(
    moorline: Any, upstreams: Any
) -> None:
    """Downstream HTTP/2 (curl --http2-prior-knowledge): the virtual host's policy replaces the
    route configuration's, which still serves a virtual host without its own; a route's own
    policy replaces the virtual host's. Each request is mirrored exactly once, body intact."""
    primary = upstreams(upstream_id="primary")
    vh_m, rc_m, route_m = (upstreams(upstream_id=n) for n in ("vh", "rc", "route"))
    port = free_port()
    clusters = [
        cluster("be", [primary.port]),
        cluster("vh_shadow", [vh_m.port]),
        cluster("rc_shadow", [rc_m.port]),
        cluster("route_shadow", [route_m.port]),
    ]
    proc = moorline(_level_config(port, clusters))
    body = b"h2 body " * 1000

    def curl(host: str, path: str) -> None:
        r = subprocess.run(
            [
                "curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                "-H", f"host: {host}", "--data-binary", "@-", f"http://127.0.0.1:{port}{path}",
            ],
            input=body,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"200 2"

    curl("svc.local", "/vh")
    curl("elsewhere", "/rc")
    curl("svc.local", "/own")
    for up, path, host in (
        (vh_m, "/vh", "svc.local"),
        (rc_m, "/rc", "elsewhere"),
        (route_m, "/own", "svc.local"),
    ):
        m = up.wait_for_requests(1)[0]
        assert (m.method, m.path, m.body_len) == ("POST", path, len(body))
        assert m.sha256 == hashlib.sha256(body).hexdigest()
        assert m.header("host") == f"{host}-shadow"
    # Shadows are counted when they start, before the primary answers: one per request.
    for name in ("vh_shadow", "rc_shadow", "route_shadow"):
        assert proc.stat(f"cluster.{name}.upstream_rq_total") == 1, name
    assert [r.path for r in primary.requests] == ["/vh", "/rc", "/own"]


def test_mirror_cluster_speaking_http2(moorline: Any, upstream: TestUpstream) -> None:
    """The mirror cluster has explicit HTTP/2 (an h2c upstream): the shadow goes out as an HTTP/2
    stream with its body and the suffixed :authority, from an HTTP/1.1 and from an h2c client."""
    h2up = H2Upstream().start()
    try:
        port = free_port()
        routes = [
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "be", "request_mirror_policies": [{"cluster": "h2shadow"}]},
            }
        ]
        clusters = [
            cluster("be", [upstream.port]),
            cluster("h2shadow", [h2up.port], typed_extension_protocol_options=HTTP2),
        ]
        proc = moorline(config_http(port, clusters, routes=routes))
        body = b"y" * 3000
        r = http_request("127.0.0.1", port, "POST", "/ok/h1", body=body, headers={"host": "svc"})
        assert r.status == 200
        c = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
             "-H", "host: svc", f"http://127.0.0.1:{port}/ok/h2"],
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        assert c.returncode == 0 and c.stdout == b"200", c.stderr
        procs.wait_until(lambda: sum(1 for st in h2up.requests if st.ended) == 2, "two shadow streams")
        got = {st.path: st for st in h2up.requests}
        assert set(got) == {"/ok/h1", "/ok/h2"}
        assert got["/ok/h1"].body == len(body) and got["/ok/h2"].body == 0
        assert all(st.headers[b":authority"] == b"svc-shadow" for st in got.values())
        assert [rec.path for rec in upstream.requests] == ["/ok/h1", "/ok/h2"]
        procs.wait_until(lambda: proc.stat("cluster.h2shadow.upstream_rq_completed") == 2, "shadows done")
        assert proc.stat("cluster.h2shadow.upstream_cx_http2_total") == 1
        assert proc.stat("cluster.be.upstream_rq_5xx") == 0
    finally:
        h2up.stop()
