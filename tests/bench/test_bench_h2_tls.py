"""Unit tests of the h2-small, grpc-unary and tls-handshake parts of the benchmark harness:
h2load report and log parsing, percentiles, the gRPC frame, the generated configurations, the
certificate, the tables' labels. No proxy is started."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # ``bench`` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import configs, report  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.measure import parse_h2load, percentile, read_h2load_log  # noqa: E402
from bench.scenarios import SCENARIOS  # noqa: E402
from moorline.testing.procs import require_binary  # noqa: E402

H2LOAD_OUT = """starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 0s of warm-up time and 5s of main duration for measurements.
Application protocol: h2c

finished in 5.00s, 2337.40 req/s, 175.57KB/s
requests: 11687 total, 11847 started, 11687 done, 11680 succeeded, 7 failed, 5 errored, 2 timeout
status codes: 11680 2xx, 0 3xx, 2 4xx, 0 5xx
traffic: 351.13KB (359560) total, 13.99KB (14322) headers (space savings 96.22%), 82.16KB (84132) data
                     min         max         mean         sd        +/- sd
time for request:      605us     1.20s     17.04ms      3.46ms    77.39%
time for connect:      117us       215us       173us        42us    75.00%
time to 1st byte:     2.43ms     18.88ms     10.16ms      7.02ms    50.00%
req/s           :     580.39      586.88      584.14        2.90    75.00%
"""


def test_parse_h2load_summary() -> None:
    r = parse_h2load(H2LOAD_OUT)
    assert r.requests == 11687 and r.succeeded == 11680
    assert r.duration_s == pytest.approx(5.0)
    assert r.rps == pytest.approx(2337.40)
    assert (r.failed, r.errored, r.timeout) == (7, 5, 2)
    # Timeouts are part of "errored", errored part of "failed": no double count.
    assert r.socket_errors == 5 and r.non_2xx == 2
    assert r.mean_ms == pytest.approx(17.04)
    assert r.sd_ms == pytest.approx(3.46)
    assert r.max_ms == pytest.approx(1200.0)
    assert r.p50_ms is None and r.p99_ms is None  # no per-request log given


def test_parse_h2load_percentiles_from_log(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    lines = [f"1795784117041249\t200\t{us}" for us in range(1000, 101000, 1000)]  # 1..100 ms
    log.write_text("\n".join([*lines, "garbage line", "1\t200\tnot-a-number"]) + "\n")
    lat = read_h2load_log(log)
    assert len(lat) == 100
    r = parse_h2load(H2LOAD_OUT, lat)
    assert r.p50_ms == pytest.approx(50.0)
    assert r.p99_ms == pytest.approx(99.0)


def test_parse_h2load_without_summary_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_h2load("connect: Connection refused\n")


def test_percentile_nearest_rank() -> None:
    assert percentile([5], 99) == 5
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile([1, 2, 3, 4], 51) == 3
    assert percentile(list(range(1, 201)), 99) == 198
    with pytest.raises(ValueError):
        percentile([], 50)


def test_grpc_frame() -> None:
    assert configs.grpc_frame(b"hello, world\n") == b"\x00\x00\x00\x00\x0dhello, world\n"
    assert configs.grpc_frame(b"") == b"\x00\x00\x00\x00\x00"


def test_scenarios_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    for name, kind in (("h2-small", "h2"), ("grpc-unary", "h2"), ("tls-handshake", "tls")):
        assert SCENARIOS[name].kind == kind
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("h2-small", "grpc-unary", "tls-handshake"):
        assert name in out


def test_nginx_configs(tmp_path: Path) -> None:
    h2 = configs.nginx_http_proxy(tmp_path, 8080, 9000, h2=True)
    assert "listen 127.0.0.1:8080 http2 backlog=4096;" in h2
    assert "proxy_pass http://backend;" in h2 and "ssl" not in h2
    tls = configs.TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ck.pem")
    t = configs.nginx_http_proxy(tmp_path, 8080, 9000, tls=tls)
    assert "listen 127.0.0.1:8080 ssl backlog=4096;" in t
    assert f"ssl_certificate {tls.cert};" in t and "ssl_protocols TLSv1.3;" in t
    g = configs.nginx_grpc_proxy(tmp_path, 8080, 9000)
    assert "listen 127.0.0.1:8080 http2 backlog=4096;" in g
    assert "grpc_pass grpc://grpcbe;" in g
    assert f"keepalive {configs.GRPC_UPSTREAM_KEEPALIVE};" in g
    # Plain h1 is unchanged.
    assert "listen 127.0.0.1:8080 backlog=4096;" in configs.nginx_http_proxy(tmp_path, 8080, 9000)


def test_haproxy_configs(tmp_path: Path) -> None:
    h2 = configs.haproxy_http(8080, 9000, bind_opts="proto h2")
    assert "bind 127.0.0.1:8080 proto h2\n" in h2
    assert "server s1 127.0.0.1:9000\n" in h2
    g = configs.haproxy_http(8080, 9000, bind_opts="proto h2", server_opts="proto h2")
    assert "server s1 127.0.0.1:9000 proto h2\n" in g
    tls = configs.TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ck.pem")
    assert configs.haproxy_tls_bind(tls) == f"ssl crt {tls.combined} ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3"


def test_moorline_configs_parse_as_envoy(tmp_path: Path) -> None:
    import yaml

    from moorline.config import loader

    tls = configs.TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ck.pem")
    g = yaml.safe_load(configs.moorline_http(8080, 9000, 9901, upstream_h2=True))
    opts = g["static_resources"]["clusters"][0]["typed_extension_protocol_options"]
    (hpo,) = opts.values()
    assert hpo["explicit_http_config"] == {"http2_protocol_options": {}}
    t = yaml.safe_load(configs.moorline_http(8080, 9000, 9901, tls=tls))
    ts = t["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    common = ts["typed_config"]["common_tls_context"]
    assert common["tls_certificates"][0]["certificate_chain"]["filename"] == str(tls.cert)
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    # Valid Envoy v3 bootstraps: the typed configs resolve to their proto messages.
    for text in (
        configs.moorline_http(8080, 9000, 9901, upstream_h2=True),
        configs.moorline_http(8080, 9000, 9901, tls=tls),
    ):
        boot = loader.load_bootstrap(yaml_text=text)
        assert boot.static_resources.clusters[0].name == "backend"


def test_make_tls_files_is_an_ecdsa_p256_certificate(tmp_path: Path) -> None:
    files = configs.make_tls_files(tmp_path / "tls", openssl=require_binary("openssl"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(files.cert), str(files.key))  # key matches the certificate
    ctx2 = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx2.load_cert_chain(str(files.combined))  # HAProxy's one-file form holds both
    assert "BEGIN CERTIFICATE" in files.combined.read_text()
    assert "PRIVATE KEY" in files.key.read_text()
    import subprocess

    text = subprocess.run(
        ["openssl", "x509", "-in", str(files.cert), "-noout", "-text"], capture_output=True, text=True
    ).stdout
    assert "prime256v1" in text or "P-256" in text


def test_make_tls_files_failure_is_a_runtime_error(tmp_path: Path) -> None:
    with pytest.raises((RuntimeError, OSError)):
        configs.make_tls_files(tmp_path / "tls", openssl=str(tmp_path / "no-such-openssl"))


def _doc(kind: str, scenario: str) -> dict[str, Any]:
    metrics = report.METRICS_BY_KIND[kind]
    samples: dict[str, list[dict[str, Any]]] = {
        "moorline": [{"ok": True, "rps": 100.0, "p50_ms": 2.0, "p99_ms": 9.0, "max_ms": 20.0,
                      "cpu_us_per_req": 300.0, "cpu_pct": 99.0, "peak_rss_mib": 40.0}],
        "nginx": [{"ok": True, "rps": 400.0, "p50_ms": 1.0, "p99_ms": 3.0, "max_ms": 5.0,
                   "cpu_us_per_req": 100.0, "cpu_pct": 99.0, "peak_rss_mib": 10.0}],
        "haproxy": [{"ok": False, "error": "start failed: boom"}],
    }  # fmt: skip
    summary = report.summarize(samples, metrics)
    return {
        "scenario": scenario,
        "kind": kind,
        "description": "d",
        "settings": {"rounds": 1, "duration_s": 5},
        "proxies": ["moorline", "nginx", "haproxy"],
        "summary": summary,
        "ratios": report.ratios(summary, metrics, ["moorline", "nginx", "haproxy"]),
    }


def test_markdown_labels_for_h2_and_tls() -> None:
    h2 = report.markdown(_doc("h2", "h2-small"))
    assert "| proxy | req/s | p50 ms | p99 ms | max ms | CPU µs/req |" in h2
    assert "| moorline ÷ nginx | 0.25 |" in h2
    assert "| haproxy | failed: start failed: boom |" in h2
    tls = report.markdown(_doc("tls", "tls-handshake"))
    assert "| proxy | handshakes/s | p50 ms | p99 ms | CPU µs/(handshake+req) |" in tls
    assert "handshakes/s (higher is better)" in tls
    # CPU per handshake ratio: 300 / 100.
    row = next(line for line in tls.splitlines() if line.startswith("| moorline ÷ nginx"))
    assert row.split(" | ")[4] == "3.00"
