"""End-to-end admin API (Envoy paths) against a running moorline."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moorline.testing import procs
from moorline.testing.procs import free_port, http_request
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

H = "127.0.0.1"


def _start(tmp_path: Path, upstream: TestUpstream) -> tuple[procs.MoorlineProc, int]:
    port = free_port()
    cfg = procs.config_http(port, clusters={"svc": [upstream.port]})
    return procs.start_moorline(cfg, tmp_path), port


def test_ready_stats_prometheus_config_dump_clusters(tmp_path: Path, upstream: TestUpstream) -> None:
    """``/ready`` is 200 ``LIVE``; ``/stats/prometheus`` parses as Prometheus text with
    ``envoy_cluster_upstream_rq_total{envoy_cluster_name="svc"}`` counting the request;
    ``/config_dump`` is JSON holding the bootstrap; ``/clusters`` lists ``svc::ip:port::...``."""
    p, port = _start(tmp_path, upstream)
    try:
        r = p.admin_get("/ready")
        assert r.status == 200 and r.body.strip() == b"LIVE"
        assert http_request(H, port, "GET", "/one").status == 200

        text = p.admin_get("/stats/prometheus").body.decode()
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        rq = [
            s
            for s in samples
            if s.name == "envoy_cluster_upstream_rq_total" and s.labels.get("envoy_cluster_name") == "svc"
        ]
        assert rq, 'envoy_cluster_upstream_rq_total{envoy_cluster_name="svc"} missing'
        assert rq[0].value >= 1

        stats = p.stats()
        assert stats["cluster.svc.upstream_rq_total"] >= 1

        r = p.admin_get("/config_dump")
        assert r.status == 200
        dump = json.loads(r.body)
        types = [c.get("@type", "") for c in dump["configs"]]
        assert any(t.endswith("BootstrapConfigDump") for t in types), types
        assert "listener_http" in r.body.decode()

        clusters = p.admin_get("/clusters").body.decode()
        assert f"svc::127.0.0.1:{upstream.port}::" in clusters
    finally:
        p.stop(signal.SIGTERM, 10)


def test_healthcheck_fail_and_ok(tmp_path: Path, upstream: TestUpstream) -> None:
    """``POST /healthcheck/fail`` puts the server in Envoy's DRAINING state: ``/ready`` answers
    503 ``DRAINING`` (Envoy ``serverState``: initialized + health check failed); traffic still
    flows; ``POST /healthcheck/ok`` brings back 200 ``LIVE``."""
    p, port = _start(tmp_path, upstream)
    try:
        assert p.admin_post("/healthcheck/fail").status == 200
        r = p.admin_get("/ready")
        assert r.status == 503 and r.body.strip() == b"DRAINING"
        assert http_request(H, port, "GET", "/still").status == 200
        assert p.admin_post("/healthcheck/ok").status == 200
        r = p.admin_get("/ready")
        assert r.status == 200 and r.body.strip() == b"LIVE"
    finally:
        p.stop(signal.SIGTERM, 10)


def test_quitquitquit_exits_zero(tmp_path: Path, upstream: TestUpstream) -> None:
    """``POST /quitquitquit`` answers 200 and the process exits 0."""
    p, _ = _start(tmp_path, upstream)
    try:
        assert p.admin_post("/quitquitquit").status == 200
        assert p.wait(10) == 0
    finally:
        p.stop(signal.SIGKILL, 5)
