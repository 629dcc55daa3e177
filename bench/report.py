"""Summaries of raw samples (median, min, max), ratios against the peers, the JSON report, the
Markdown tables and the ratio chart.

Every ratio is ``moorline ÷ peer`` of the medians. Whether higher or lower is better depends on
the metric and is written next to every ratio (throughput: higher is better; CPU per unit of
work, latency, memory: lower is better).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEERS = ("nginx", "haproxy")
# The HTTP/1.1 scenarios (and idle-conns) also run the calibration floor (bench/floor.py).
PEERS_H1 = (*PEERS, "floor")
PEER_LABELS = {"nginx": "nginx", "haproxy": "HAProxy", "floor": "floor", "direct": "direct"}
# The bolt scenario compares moorline with the same load sent straight to the server.
PEERS_BOLT = ("direct",)
# grpc-stream also runs "direct" (the load straight to the backend: the ceiling of the setup).
PEERS_STREAM = (*PEERS, "direct")
FLOOR_NOTE = (
    "floor: bench/floor.py, a bare uvloop + httptools HTTP/1.1 forwarder (no routing, no stats, one"
    " upstream connection per downstream connection): moorline ÷ floor is what moorline costs above"
    " the least a Python proxy on the same stack must do."
)
NOISY_PCT = 5.0  # other load on the proxy's core above this gets a note under the table
UNSATURATED_PCT = 80.0  # a proxy below this CPU share was not the bottleneck of its run


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str
    better: str | None  # "higher", "lower", or None (context only, no ratio)


HTTP_METRICS = (
    Metric("rps", "req/s", "{:,.0f}", "higher"),
    Metric("p50_ms", "p50 ms", "{:.2f}", "lower"),
    Metric("p99_ms", "p99 ms", "{:.2f}", "lower"),
    Metric("cpu_us_per_req", "CPU µs/req", "{:.1f}", "lower"),
    Metric("cpu_pct", "proxy CPU %", "{:.0f}", None),
    Metric("peak_rss_mib", "peak RSS MiB", "{:.1f}", "lower"),
    Metric("core_other_pct", "others on proxy core %", "{:.0f}", None),
    Metric("load_core_busy_pct", "load core busy %", "{:.0f}", None),
)
H2_METRICS = (
    Metric("rps", "req/s", "{:,.0f}", "higher"),
    Metric("p50_ms", "p50 ms", "{:.2f}", "lower"),
    Metric("p99_ms", "p99 ms", "{:.2f}", "lower"),
    Metric("max_ms", "max ms", "{:.1f}", None),
    Metric("cpu_us_per_req", "CPU µs/req", "{:.1f}", "lower"),
    Metric("cpu_pct", "proxy CPU %", "{:.0f}", None),
    Metric("peak_rss_mib", "peak RSS MiB", "{:.1f}", "lower"),
    Metric("core_other_pct", "others on proxy core %", "{:.0f}", None),
    Metric("load_core_busy_pct", "load core busy %", "{:.0f}", None),
)
TLS_METRICS = (
    Metric("rps", "handshakes/s", "{:,.0f}", "higher"),
    Metric("p50_ms", "p50 ms", "{:.2f}", "lower"),
    Metric("p99_ms", "p99 ms", "{:.2f}", "lower"),
    Metric("cpu_us_per_req", "CPU µs/(handshake+req)", "{:.1f}", "lower"),
    Metric("cpu_pct", "proxy CPU %", "{:.0f}", None),
    Metric("peak_rss_mib", "peak RSS MiB", "{:.1f}", "lower"),
    Metric("core_other_pct", "others on proxy core %", "{:.0f}", None),
    Metric("load_core_busy_pct", "load core busy %", "{:.0f}", None),
)
L4_METRICS = (
    Metric("gbit_s", "Gbit/s", "{:.2f}", "higher"),
    Metric("cpu_pct", "proxy CPU %", "{:.0f}", None),
    Metric("cpu_ms_per_gb", "CPU ms/GB", "{:.0f}", "lower"),
    Metric("peak_rss_mib", "peak RSS MiB", "{:.1f}", "lower"),
    Metric("core_other_pct", "others on proxy core %", "{:.0f}", None),
    Metric("load_core_busy_pct", "load core busy %", "{:.0f}", None),
)
IDLE_METRICS = (
    Metric("rss_per_conn_kib", "RSS KiB/conn", "{:.2f}", "lower"),
    Metric("rss_before_mib", "RSS before MiB", "{:.1f}", None),
    Metric("rss_after_mib", "RSS with conns MiB", "{:.1f}", None),
    Metric("conns", "conns held", "{:,.0f}", None),
)
STARTUP_METRICS = (
    Metric("startup_ms", "exec → /ready 200 ms", "{:.0f}", "lower"),
    Metric("rss_mib", "RSS at ready MiB", "{:.1f}", None),
)
FAILOVER_METRICS = (
    Metric("success_pct", "success %", "{:.3f}", "higher"),
    Metric("failed", "failed requests", "{:,.0f}", "lower"),
    Metric("rps", "req/s", "{:,.0f}", "higher"),
    Metric("p99_ms", "p99 ms", "{:.1f}", "lower"),
)
XDS_METRICS = (
    Metric("cds_ack_ms", "CDS push → ACK ms", "{:.0f}", "lower"),
    Metric("applied_ms", "push → all applied ms", "{:.0f}", "lower"),
    Metric("resend_ms", "resend (1 changed) → ACK ms", "{:.0f}", "lower"),
    Metric("rss_per_cluster_kib", "RSS KiB/cluster", "{:.1f}", "lower"),
    Metric("rss_mib", "RSS after MiB", "{:.1f}", None),
)
BOLT_METRICS = (
    Metric("rps", "req/s", "{:,.0f}", "higher"),
    Metric("p50_ms", "p50 ms", "{:.2f}", "lower"),
    Metric("p99_ms", "p99 ms", "{:.2f}", "lower"),
    Metric("cpu_us_per_req", "CPU µs/req (moorline; direct: the server)", "{:.1f}", None),
    Metric("errors", "errors", "{:,.0f}", None),
)
GRPC_STREAM_METRICS = (
    Metric("msgs_per_s", "messages/s", "{:,.0f}", "higher"),
    Metric("mib_per_s", "MiB/s", "{:,.1f}", "higher"),
    Metric("rps", "calls/s", "{:,.1f}", "higher"),
    Metric("p50_ms", "p50 ms/call", "{:.1f}", "lower"),
    Metric("p99_ms", "p99 ms/call", "{:.1f}", "lower"),
    Metric("cpu_us_per_req", "CPU µs/call (direct: the backend's)", "{:,.0f}", "lower"),
    Metric("cpu_pct", "proxy CPU %", "{:.0f}", None),
    Metric("peak_rss_mib", "peak RSS MiB", "{:.1f}", "lower"),
    Metric("core_other_pct", "others on proxy core %", "{:.0f}", None),
    Metric("load_core_busy_pct", "load core busy %", "{:.0f}", None),
)
METRICS_BY_KIND = {
    "http": HTTP_METRICS,
    "h2": H2_METRICS,
    "grpc-stream": GRPC_STREAM_METRICS,
    "tls": TLS_METRICS,
    "l4": L4_METRICS,
    "idle": IDLE_METRICS,
    "startup": STARTUP_METRICS,
    "xds": XDS_METRICS,
    "failover": FAILOVER_METRICS,
    "bolt": BOLT_METRICS,
}
# Kinds whose table has an "errors" column (socket errors + failed requests over all runs).
_ERROR_KINDS = ("http", "h2", "grpc-stream", "tls", "l4", "idle")

# For the chart: one "throughput" metric (higher is better) and one "cost" metric (lower is
# better) per kind of scenario.
CHART_METRICS = {
    "http": ("rps", "cpu_us_per_req"),
    "h2": ("rps", "cpu_us_per_req"),
    "grpc-stream": ("msgs_per_s", "cpu_us_per_req"),
    "tls": ("rps", "cpu_us_per_req"),
    "l4": ("gbit_s", "cpu_ms_per_gb"),
    "idle": (None, "rss_per_conn_kib"),
}


def spread(values: Sequence[float]) -> dict[str, float | int]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(samples: dict[str, list[dict[str, Any]]], metrics: Sequence[Metric]) -> dict[str, Any]:
    """Per proxy: runs ok / failed, the first error, and median/min/max of each metric over the
    successful runs."""
    out: dict[str, Any] = {}
    for proxy, runs in samples.items():
        good = [r for r in runs if r.get("ok")]
        errors = [str(r["error"]) for r in runs if not r.get("ok") and r.get("error")]
        stats: dict[str, Any] = {}
        for m in metrics:
            vals = [float(r[m.key]) for r in good if isinstance(r.get(m.key), int | float)]
            if vals:
                stats[m.key] = spread(vals)
        out[proxy] = {
            "ok_runs": len(good),
            "failed_runs": len(runs) - len(good),
            "error": errors[0] if errors else None,
            "errors_total": sum(int(r.get("socket_errors", 0)) + int(r.get("non_2xx", 0)) for r in runs),
            "metrics": stats,
        }
    return out


def ratios(
    summary: dict[str, Any],
    metrics: Sequence[Metric],
    proxies: Sequence[str],
    peers: Sequence[str] = PEERS,
) -> dict[str, Any]:
    """``{"moorline/nginx": {metric: ratio}, ...}`` for every moorline variant and every one of
    ``peers`` (:data:`PEERS_H1` adds the floor); the value is None when the peer (or moorline)
    was not run or has no successful run."""
    out: dict[str, Any] = {}
    ours = [p for p in proxies if p.startswith("moorline")] or ["moorline"]
    for m_name in ours:
        for peer in peers:
            key = f"{m_name}/{peer}"
            a = summary.get(m_name, {}).get("metrics", {})
            b = summary.get(peer, {}).get("metrics", {})
            if not a or not b:
                out[key] = None
                continue
            r: dict[str, float | None] = {}
            for met in metrics:
                if met.better is None or met.key not in a or met.key not in b:
                    continue
                den = b[met.key]["median"]
                r[met.key] = a[met.key]["median"] / den if den else None
            out[key] = r
    return out


# ---------------------------------------------------------------------------------------------
# Machine information
# ---------------------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str | None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (res.stdout + res.stderr).strip()
    return text.splitlines()[0] if text else None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    try:
        import moorline

        moorline_version = getattr(moorline, "__version__", None)
    except ImportError:
        moorline_version = None
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "moorline": moorline_version,
        "nginx": _first_line(["/usr/sbin/nginx", "-v"]),
        "haproxy": _first_line(["/usr/sbin/haproxy", "-v"]),
        "wrk": _first_line(["/usr/bin/wrk", "-v"]),
        "iperf3": _first_line(["/usr/bin/iperf3", "-v"]),
        # The floor's stack (and moorline's): its cost moves with these versions.
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "loadavg_at_start": list(load),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def write_json(doc: dict[str, Any], out_dir: Path, date: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{date}-{doc['scenario']}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def _cell(stats: dict[str, Any] | None, fmt: str) -> str:
    if not stats:
        return "—"
    med = fmt.format(stats["median"])
    if stats["n"] < 2:
        return med
    return f"{med} [{fmt.format(stats['min'])}–{fmt.format(stats['max'])}]"


def _md_escape(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.replace("|", "\\|")[:160]


def markdown(doc: dict[str, Any]) -> str:
    """The scenario's tables: one row per proxy (median [min–max]), then the ratios."""
    metrics = METRICS_BY_KIND[doc["kind"]]
    lines = [f"### {doc['scenario']}: {doc['description']}", ""]
    if doc.get("skipped"):
        lines += [f"Skipped: {doc['skipped']}", ""]
        return "\n".join(lines)
    s = doc["settings"]
    if doc["kind"] == "startup":
        lines.append(f"{s['runs']} runs; median [min–max].")
    elif doc["kind"] == "xds":
        lines.append(
            f"{s['rounds']} round(s), {s.get('clusters', 0):,} clusters each, a fresh moorline per round; "
            "median [min–max]. moorline only (nginx and HAProxy take no xDS)."
        )
    elif doc["kind"] == "idle":
        lines.append(
            f"{s['rounds']} round(s) per proxy, proxies interleaved, {s.get('idle_conns', 0):,} connections each;"
            " median [min–max] of the rounds."
        )
    else:
        lines.append(
            f"{s['rounds']} round(s) × {s['duration_s']:g} s per proxy, proxies interleaved; median [min–max] of the rounds."
        )
    lines.append("")
    header = ["proxy", *(m.label for m in metrics)]
    if doc["kind"] in _ERROR_KINDS:
        header.append("errors")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for proxy in doc["proxies"]:
        summ = doc["summary"].get(proxy, {})
        if not summ.get("ok_runs"):
            err = summ.get("error") or "no successful run"
            lines.append(f"| {proxy} | failed: {_md_escape(err)} |" + " |" * (len(header) - 2))
            continue
        cells = [proxy, *(_cell(summ["metrics"].get(m.key), m.fmt) for m in metrics)]
        if doc["kind"] in _ERROR_KINDS:
            note = str(summ.get("errors_total", 0))
            if summ.get("failed_runs"):
                note += f"; {summ['failed_runs']} failed run(s): {_md_escape(summ.get('error') or '')}"
            cells.append(note)
        lines.append("| " + " | ".join(cells) + " |")
    noise = [
        summ["metrics"]["core_other_pct"]["max"]
        for summ in doc["summary"].values()
        if "core_other_pct" in summ.get("metrics", {})
    ]
    if noise and max(noise) > NOISY_PCT:
        lines += [
            "",
            f"Noise: other work used up to {max(noise):.0f}% of the proxy's core during these runs"
            " (shared machine); req/s and latency suffer most, CPU µs/req least.",
        ]
    paced = [
        proxy
        for proxy, summ in doc["summary"].items()
        if "cpu_pct" in summ.get("metrics", {}) and summ["metrics"]["cpu_pct"]["median"] < UNSATURATED_PCT
    ]
    if paced:
        lines += [
            "",
            f"Not CPU-bound: {', '.join(paced)} (median proxy CPU under {UNSATURATED_PCT:.0f}%): throughput there"
            " was set by the load generator and backend on the other core (and their round trips), not by"
            " the proxy's limit, so throughput ratios against it understate its capacity; CPU per request"
            " and per GB compare fairly.",
        ]
    rated = [m for m in metrics if m.better is not None]
    ratio_rows = [(k, v) for k, v in doc.get("ratios", {}).items() if v]
    lines.append("")
    if ratio_rows:
        header = ["ratio (moorline ÷ peer, medians)", *(f"{m.label} ({m.better} is better)" for m in rated)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for key, vals in ratio_rows:
            cells = [key.replace("/", " ÷ ")]
            for m in rated:
                v = vals.get(m.key)
                cells.append("—" if v is None else f"{v:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        if any(k.endswith("/floor") for k, _ in ratio_rows):
            lines += ["", FLOOR_NOTE]
    elif doc["kind"] not in ("startup", "xds"):
        lines.append("No ratios: no peer (nginx, HAProxy, floor) was measured with moorline in this run.")
    if lines[-1] != "":
        lines.append("")
    return "\n".join(lines)


def overview(docs: Sequence[dict[str, Any]]) -> str:
    """One table for the whole run: per scenario, the throughput and cost ratios of moorline
    against every peer side by side (``÷ nginx``, ``÷ HAProxy``, ``÷ floor``); "—" where a
    peer was not run (or, for the floor, does not run: it forwards HTTP/1.1 only)."""
    rows: list[list[str]] = []
    for doc in docs:
        keys = CHART_METRICS.get(doc.get("kind", ""))
        if not keys or doc.get("skipped"):
            continue
        metrics = {m.key: m for m in METRICS_BY_KIND[doc["kind"]]}
        rat = doc.get("ratios") or {}
        ours = sorted({k.split("/")[0] for k in rat}) or ["moorline"]
        for m_name in ours:
            for mkey in keys:
                if mkey is None:
                    continue
                m = metrics[mkey]
                cells = [doc["scenario"] if m_name == "moorline" else f"{doc['scenario']} ({m_name})"]
                cells.append(f"{m.label} ({m.better} is better)")
                for peer in PEERS_H1:
                    v = (rat.get(f"{m_name}/{peer}") or {}).get(mkey)
                    cells.append("—" if v is None else f"{v:.2f}")
                rows.append(cells)
    if not rows:
        return ""
    header = ["scenario", "metric", *(f"moorline ÷ {PEER_LABELS[p]}" for p in PEERS_H1)]
    lines = ["### All scenarios: moorline ÷ peer (medians)", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", FLOOR_NOTE, ""]
    return "\n".join(lines)


def draw_chart(docs: Sequence[dict[str, Any]], path: Path) -> str:
    """Bar chart of moorline ÷ peer ratios; returns a one-line notice of what happened. A
    missing matplotlib or an empty set of ratios skips the chart, it never fails the run."""
    rows: list[tuple[str, str, str, float]] = []  # (panel, x label, peer, value)
    for doc in docs:
        keys = CHART_METRICS.get(doc.get("kind", ""))
        if not keys or doc.get("skipped"):
            continue
        for rkey, vals in (doc.get("ratios") or {}).items():
            if not vals:
                continue
            ours, peer = rkey.split("/")
            xlabel = doc["scenario"] if ours == "moorline" else f"{doc['scenario']}\n{ours}"
            for panel, mkey in zip(("throughput", "cost"), keys, strict=True):
                if mkey and vals.get(mkey) is not None:
                    rows.append((panel, xlabel, peer, float(vals[mkey])))
    if not rows:
        return "chart skipped: no ratios (no peer measured alongside moorline)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install matplotlib)"
    panels = [
        ("throughput", "Throughput: moorline ÷ peer (higher is better)\nreq/s (HTTP), Gbit/s (L4)"),
        ("cost", "Cost: moorline ÷ peer (lower is better)\nCPU µs/req, CPU ms/GB, RSS KiB/conn"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for ax, (panel, title) in zip(axes, panels, strict=True):
        prow = [r for r in rows if r[0] == panel]
        labels = list(dict.fromkeys(r[1] for r in prow))
        peers = [p for p in PEERS_H1 if any(r[2] == p for r in prow)]
        width = 0.8 / max(len(peers), 1)
        for i, peer in enumerate(peers):
            xs, ys = [], []
            for j, lab in enumerate(labels):
                for r in prow:
                    if r[1] == lab and r[2] == peer:
                        xs.append(j + (i - (len(peers) - 1) / 2) * width)
                        ys.append(r[3])
            bars = ax.bar(xs, ys, width, label=f"÷ {PEER_LABELS[peer]}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        # Plain numbers (0.5, 2) instead of 5 x 10^-1 on the log axis.
        plain = FuncFormatter(
            lambda v, _pos: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in ("1", "2", "5") else ""
        )
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("moorline vs nginx, HAProxy and the floor (HTTP/1.1), same machine, same run (medians)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written: {path}"
