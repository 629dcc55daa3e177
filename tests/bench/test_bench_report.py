"""Unit tests of the benchmark harness's pure parts: wrk and iperf3 report parsing, medians and
ratios, the Markdown table, configuration text, the command line's argument checks.
No processes are started."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # ``bench`` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import configs, report  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.measure import parse_iperf_json, parse_wrk, wrk_time_ms  # noqa: E402

WRK_OUT = """Running 2s test @ http://127.0.0.1:41000/small
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    18.43ms    5.01ms  60.12ms   80.00%
    Req/Sec     3.32k   200.00     3.60k    70.00%
  Latency Distribution
     50%  812.00us
     75%   20.11ms
     90%   25.00ms
     99%    1.20s
  6640 requests in 2.00s, 1.01MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   3320.00
Transfer/sec:    505.00KB
"""


def test_wrk_time_units() -> None:
    assert wrk_time_ms("812.00us") == pytest.approx(0.812)
    assert wrk_time_ms("1.50ms") == pytest.approx(1.5)
    assert wrk_time_ms("2.00s") == pytest.approx(2000.0)
    assert wrk_time_ms("1.00m") == pytest.approx(60000.0)
    with pytest.raises(ValueError):
        wrk_time_ms("12 parsecs")


def test_parse_wrk_latency_report() -> None:
    r = parse_wrk(WRK_OUT)
    assert r.requests == 6640
    assert r.duration_s == pytest.approx(2.0)
    assert r.rps == pytest.approx(3320.0)
    assert r.p50_ms == pytest.approx(0.812)
    assert r.p99_ms == pytest.approx(1200.0)
    assert r.socket_errors == 6
    assert r.non_2xx == 4


def test_parse_wrk_without_summary_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_parse_iperf_json() -> None:
    doc = {"end": {"sum_received": {"bits_per_second": 8.5e9, "bytes": 5_312_500_000, "seconds": 5.0}}}
    r = parse_iperf_json(json.dumps(doc))
    assert r.bits_per_second == 8.5e9 and r.bytes == 5_312_500_000 and r.seconds == 5.0
    with pytest.raises(RuntimeError, match="control socket"):
        parse_iperf_json(json.dumps({"error": "control socket has closed unexpectedly"}))


def _samples() -> dict[str, list[dict[str, object]]]:
    return {
        "moorline": [
            {"ok": True, "rps": 1000.0, "cpu_us_per_req": 200.0, "p99_ms": 10.0},
            {"ok": True, "rps": 3000.0, "cpu_us_per_req": 100.0, "p99_ms": 30.0},
            {"ok": True, "rps": 2000.0, "cpu_us_per_req": 150.0, "p99_ms": 20.0},
        ],
        "nginx": [{"ok": True, "rps": 8000.0, "cpu_us_per_req": 50.0, "p99_ms": 5.0}],
        "haproxy": [{"ok": False, "error": "start failed: boom"}],
    }


def test_summary_medians_and_failures() -> None:
    summ = report.summarize(_samples(), report.HTTP_METRICS)
    assert summ["moorline"]["metrics"]["rps"] == {"median": 2000.0, "min": 1000.0, "max": 3000.0, "n": 3}
    assert summ["moorline"]["ok_runs"] == 3
    assert summ["haproxy"]["ok_runs"] == 0 and summ["haproxy"]["failed_runs"] == 1
    assert summ["haproxy"]["error"] == "start failed: boom"
    assert summ["haproxy"]["metrics"] == {}


def test_ratios_are_moorline_over_peer_and_null_without_peer() -> None:
    summ = report.summarize(_samples(), report.HTTP_METRICS)
    r = report.ratios(summ, report.HTTP_METRICS, ["moorline", "nginx", "haproxy"])
    assert r["moorline/nginx"]["rps"] == pytest.approx(0.25)  # higher is better
    assert r["moorline/nginx"]["cpu_us_per_req"] == pytest.approx(3.0)  # lower is better
    assert "cpu_pct" not in r["moorline/nginx"]  # context-only metric: no ratio
    assert r["moorline/haproxy"] is None  # peer failed every run


def test_ratios_for_l4_variants() -> None:
    samples = {
        "moorline-splice": [{"ok": True, "gbit_s": 8.0, "cpu_ms_per_gb": 100.0}],
        "moorline-copy": [{"ok": True, "gbit_s": 4.0, "cpu_ms_per_gb": 400.0}],
        "nginx": [{"ok": True, "gbit_s": 8.0, "cpu_ms_per_gb": 200.0}],
    }
    summ = report.summarize(samples, report.L4_METRICS)
    r = report.ratios(summ, report.L4_METRICS, list(samples))
    assert r["moorline-splice/nginx"] == {"gbit_s": 1.0, "cpu_ms_per_gb": 0.5}
    assert r["moorline-copy/nginx"]["gbit_s"] == 0.5
    assert r["moorline-splice/haproxy"] is None


def test_markdown_table_labels_and_failure_row() -> None:
    samples = _samples()
    summ = report.summarize(samples, report.HTTP_METRICS)
    doc = {
        "scenario": "h1-small",
        "kind": "http",
        "description": "d",
        "settings": {"rounds": 3, "duration_s": 5},
        "proxies": ["moorline", "nginx", "haproxy"],
        "summary": summ,
        "ratios": report.ratios(summ, report.HTTP_METRICS, ["moorline", "nginx", "haproxy"]),
    }
    md = report.markdown(doc)
    assert "| moorline | 2,000 [1,000–3,000] |" in md
    assert "| haproxy | failed: start failed: boom |" in md
    assert "req/s (higher is better)" in md and "CPU µs/req (lower is better)" in md
    assert "| moorline ÷ nginx | 0.25 |" in md
    assert "moorline ÷ haproxy" not in md


def test_chart_skipped_without_ratios(tmp_path: Path) -> None:
    doc = {"scenario": "h1-small", "kind": "http", "ratios": {"moorline/nginx": None}}
    notice = report.draw_chart([doc], tmp_path / "x.png")
    assert notice.startswith("chart skipped")
    assert not (tmp_path / "x.png").exists()


def test_chart_drawn_with_ratios(tmp_path: Path) -> None:
    # matplotlib is in the test extras: a missing one is a broken install, not a skip.
    docs = [
        {
            "scenario": "h1-small",
            "kind": "http",
            "ratios": {
                "moorline/nginx": {"rps": 0.3, "cpu_us_per_req": 3.0},
                "moorline/haproxy": None,
                "moorline/floor": {"rps": 0.5, "cpu_us_per_req": 2.0},
            },
        },
        {"scenario": "h2-small", "kind": "h2", "ratios": {"moorline/nginx": {"rps": 0.2}}},
    ]
    out = tmp_path / "ratios.png"
    assert report.draw_chart(docs, out).startswith("chart written")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _floor_doc() -> dict[str, object]:
    samples = {
        "moorline": [{"ok": True, "rps": 2000.0, "cpu_us_per_req": 90.0, "p99_ms": 9.0}],
        "nginx": [{"ok": True, "rps": 8000.0, "cpu_us_per_req": 30.0, "p99_ms": 3.0}],
        "haproxy": [{"ok": True, "rps": 10000.0, "cpu_us_per_req": 45.0, "p99_ms": 2.0}],
        "floor": [{"ok": True, "rps": 5000.0, "cpu_us_per_req": 36.0, "p99_ms": 6.0}],
    }
    summ = report.summarize(samples, report.HTTP_METRICS)
    return {
        "scenario": "h1-small",
        "kind": "http",
        "description": "d",
        "settings": {"rounds": 1, "duration_s": 5},
        "proxies": list(samples),
        "summary": summ,
        "ratios": report.ratios(summ, report.HTTP_METRICS, list(samples), report.PEERS_H1),
    }


def test_ratios_against_the_floor() -> None:
    r = _floor_doc()["ratios"]
    assert isinstance(r, dict)
    assert list(r) == ["moorline/nginx", "moorline/haproxy", "moorline/floor"]
    assert r["moorline/floor"]["cpu_us_per_req"] == pytest.approx(2.5)
    assert r["moorline/floor"]["rps"] == pytest.approx(0.4)
    assert r["moorline/nginx"]["cpu_us_per_req"] == pytest.approx(3.0)
    # Without the floor among the peers (h2, TLS, L4 scenarios) there is no floor key at all.
    summ = report.summarize({"moorline": [{"ok": True, "rps": 1.0}]}, report.HTTP_METRICS)
    assert "moorline/floor" not in report.ratios(summ, report.HTTP_METRICS, ["moorline"])
    assert report.ratios(summ, report.HTTP_METRICS, ["moorline"], report.PEERS_H1)["moorline/floor"] is None


def test_markdown_has_the_floor_ratio_beside_nginx_and_haproxy() -> None:
    md = report.markdown(_floor_doc())
    assert "| floor | 5,000 |" in md  # the floor's own row in the main table
    rows = [line for line in md.splitlines() if line.startswith("| moorline ÷ ")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| moorline ÷ nginx",
        "| moorline ÷ haproxy",
        "| moorline ÷ floor",
    ]
    assert rows[2] == "| moorline ÷ floor | 0.40 | — | 1.50 | 2.50 | — |"  # req/s, p50, p99, CPU, RSS
    assert report.FLOOR_NOTE in md


def test_overview_puts_every_peer_side_by_side() -> None:
    h2 = {
        "scenario": "h2-small",
        "kind": "h2",
        "ratios": {"moorline/nginx": {"rps": 0.2, "cpu_us_per_req": 4.0}, "moorline/haproxy": None},
    }
    text = report.overview([_floor_doc(), h2])
    assert "| scenario | metric | moorline ÷ nginx | moorline ÷ HAProxy | moorline ÷ floor |" in text
    assert "| h1-small | CPU µs/req (lower is better) | 3.00 | 2.00 | 2.50 |" in text
    assert "| h1-small | req/s (higher is better) | 0.25 | 0.20 | 0.40 |" in text
    assert "| h2-small | CPU µs/req (lower is better) | 4.00 | — | — |" in text
    assert report.overview([]) == ""


def test_floor_runs_in_the_http1_scenarios_only() -> None:
    from bench.scenarios import SCENARIOS, peers_for, variants_for

    everyone = ["moorline", "nginx", "haproxy", "floor"]
    h1 = {"h1-small", "h1-1k", "h1-route-rules", "h1-100k", "h1-close", "idle-conns"}
    for name, sc in SCENARIOS.items():
        variants = variants_for(sc, everyone)
        assert ("floor" in variants) == (name in h1), name
        assert ("floor" in peers_for(sc)) == (name in h1), name
    # Interleaved like any peer: moorline, nginx, HAProxy, floor in every round.
    assert variants_for(SCENARIOS["h1-small"], everyone) == everyone
    assert variants_for(SCENARIOS["h1-small"], ["floor", "moorline"]) == ["moorline", "floor"]


def test_http2_scenarios_run_moorline_on_both_codec_backends() -> None:
    from bench.scenarios import SCENARIOS, variants_for

    everyone = ["moorline", "nginx", "haproxy", "floor"]
    for name in ("h2-small", "grpc-unary"):
        assert variants_for(SCENARIOS[name], everyone) == ["moorline", "moorline-h2", "nginx", "haproxy"]
    assert "moorline-h2" in variants_for(SCENARIOS["grpc-stream"], everyone)
    assert "moorline-h2" not in variants_for(SCENARIOS["h1-small"], everyone)
    assert variants_for(SCENARIOS["h2-small"], ["nginx"]) == ["nginx"]


def test_floor_command_line_and_config_text() -> None:
    argv = configs.floor_argv("/py", 1000, 2000)
    assert argv == ["/py", "-m", "bench.floor", "--listen", "127.0.0.1:1000", "--to", "127.0.0.1:2000"]
    text = configs.floor_config_text(argv)
    assert text.startswith("-m bench.floor --listen 127.0.0.1:1000 --to 127.0.0.1:2000\n")
    assert "no routing" in text


def test_floor_rejects_bad_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import floor

    with pytest.raises(SystemExit) as ei:
        floor.main(["--listen", "nope", "--to", "127.0.0.1:1"])
    assert ei.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_route_rules_configs_are_equivalent(tmp_path: Path) -> None:
    """All three proxies get the same 50 decoy regexes, then the target with the header."""
    ng = configs.nginx_http_proxy(tmp_path, 1000, 2000, route_rules=True)
    ha = configs.haproxy_http(1000, 2000, route_rules=True)
    ml = configs.moorline_http(1000, 2000, 3000, route_rules=True)
    for i in range(configs.N_DECOY_ROUTES):
        rx = configs.decoy_regex(i)
        assert f"location ~ {rx} " in ng
        assert f"path_reg {rx}" in ha
        assert rx in ml
    assert ng.count("location ~") == configs.N_DECOY_ROUTES + 1
    assert ng.count('proxy_set_header Connection "";') == configs.N_DECOY_ROUTES + 1
    assert 'proxy_set_header x-bench-route "target";' in ng
    assert "http-request set-header x-bench-route target if target" in ha
    assert "x-bench-route" in ml and "generate_request_id: false" in ml
    # The target route is last everywhere.
    assert ha.rindex("use_backend be if target") > ha.rindex("use_backend be if r49")
    assert ng.rindex(configs.TARGET_REGEX) > ng.rindex(configs.decoy_regex(49))


def test_cli_rejects_unknown_scenario_and_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scenario", "nope"]) == 2
    assert "unknown scenario" in capsys.readouterr().err
    assert main(["--proxies", "moorline,envoy"]) == 2
    err = capsys.readouterr().err
    assert "--proxies" in err and "floor" in err


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "h1-small",
        "h1-1k",
        "h1-route-rules",
        "h1-100k",
        "h1-close",
        "l4-iperf",
        "idle-conns",
        "startup",
    ):
        assert name in out


def test_markdown_notes_noise_and_load_bound_peer() -> None:
    samples = {
        "moorline": [
            {"ok": True, "rps": 5000.0, "cpu_pct": 97.0, "load_core_busy_pct": 60.0, "core_other_pct": 2.0}
        ],
        "nginx": [
            {"ok": True, "rps": 9000.0, "cpu_pct": 50.0, "load_core_busy_pct": 99.0, "core_other_pct": 30.0}
        ],
    }
    summ = report.summarize(samples, report.HTTP_METRICS)
    doc = {
        "scenario": "h1-small",
        "kind": "http",
        "description": "d",
        "settings": {"rounds": 1, "duration_s": 5},
        "proxies": ["moorline", "nginx"],
        "summary": summ,
        "ratios": report.ratios(summ, report.HTTP_METRICS, ["moorline", "nginx"]),
    }
    md = report.markdown(doc)
    assert "other work used up to 30%" in md
    assert "Not CPU-bound: nginx (median proxy CPU under 80%)" in md
    assert "bound: moorline" not in md
