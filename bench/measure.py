"""Load generators and what they report: wrk (HTTP), iperf3 (TCP throughput), and the
idle-connection client (``bench.idleclient`` in a child process).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.children import Child, read_line, run_to_end, spawn
from bench.proxies import H2LOAD, IPERF3, REPO_ROOT, WRK

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def wrk_time_ms(text: str) -> float:
    """wrk's ``format_time`` output (``812.00us``, ``1.20ms``, ``2.00s``) in milliseconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s|m|h)\s*", text)
    if not m:
        raise ValueError(f"not a wrk time: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    socket_errors: int
    non_2xx: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_wrk(out: str) -> WrkResult:
    """Read wrk's ``--latency`` report; raises ValueError if the summary line is missing."""
    m = re.search(r"(\d+) requests in ([0-9.]+)(us|ms|s|m|h)", out)
    if not m:
        raise ValueError("no 'N requests in T' line in wrk output")
    requests = int(m.group(1))
    duration_s = wrk_time_ms(m.group(2) + m.group(3)) / 1000.0
    rps_m = re.search(r"Requests/sec:\s*([0-9.]+)", out)
    rps = float(rps_m.group(1)) if rps_m else (requests / duration_s if duration_s else 0.0)
    pct: dict[str, float] = {}
    dist = out.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pm in re.finditer(r"^\s*(\d+)%\s+([0-9.]+(?:us|ms|s|m|h))\s*$", dist[1], re.M):
            pct[pm.group(1)] = wrk_time_ms(pm.group(2))
    errors = 0
    em = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if em:
        errors = sum(int(g) for g in em.groups())
    nm = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests=requests,
        duration_s=duration_s,
        rps=rps,
        p50_ms=pct.get("50"),
        p99_ms=pct.get("99"),
        socket_errors=errors,
        non_2xx=int(nm.group(1)) if nm else 0,
    )


def run_wrk(
    url: str,
    duration_s: int,
    workdir: Path,
    cpus: list[int] | None,
    connections: int = 64,
    headers: tuple[str, ...] = (),
) -> tuple[WrkResult, str]:
    """``wrk -t1 -c<connections> -d<duration>s --latency [-H ...] url``; (result, raw output)."""
    argv = [WRK, "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "10s"]
    for h in headers:
        argv += ["-H", h]
    argv.append(url)
    code, out, err = run_to_end("wrk", argv, workdir, timeout=duration_s + 30, cpus=cpus)
    if code != 0:
        raise RuntimeError(f"wrk exited with {code}: {err or out}")
    return parse_wrk(out), out


@dataclass
class H2loadResult:
    """h2load's summary plus percentiles from its per-request log. The keys shared with
    :class:`WrkResult` (requests, duration_s, rps, p50_ms, p99_ms, socket_errors, non_2xx) mean
    the same: ``socket_errors`` are requests that ended in a stream or connection error (a
    timeout included), ``non_2xx`` the other failed ones (a status other than 2xx/3xx). For
    gRPC, h2load sees the HTTP status only: a non-zero ``grpc-status`` in the trailers counts as
    success here (the harness's check call verifies the echo before each run)."""

    requests: int  # done (answered or errored) during the measured duration
    duration_s: float
    rps: float
    succeeded: int
    failed: int
    errored: int
    timeout: int
    mean_ms: float | None
    sd_ms: float | None
    max_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    socket_errors: int
    non_2xx: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _h2load_time_ms(text: str) -> float:
    # h2load prints times like wrk: 605us, 29.75ms, 1.20s.
    return wrk_time_ms(text)


def parse_h2load(out: str, latencies_us: list[int] | None = None) -> H2loadResult:
    """Read h2load's report (``finished in``, ``requests:``, ``time for request:``); with the
    per-request latencies of ``--log-file``, p50/p99 (nearest rank) too. Raises ValueError if
    the summary is missing."""
    fm = re.search(r"finished in ([0-9.]+)(us|ms|s|m|h), ([0-9.]+) req/s", out)
    rm = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if not fm or not rm:
        raise ValueError("no 'finished in' / 'requests:' lines in h2load output")
    done, succeeded, failed, errored, timeout = (int(rm.group(i)) for i in (3, 4, 5, 6, 7))
    mean = sd = mx = None
    tm = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if tm:
        mx, mean, sd = (_h2load_time_ms(tm.group(i)) for i in (2, 3, 4))
    p50 = p99 = None
    if latencies_us:
        lat = sorted(latencies_us)
        p50 = percentile(lat, 50) / 1000.0
        p99 = percentile(lat, 99) / 1000.0
    # h2load counts a timed-out request as errored too, and an errored one as failed too.
    bad = errored
    return H2loadResult(
        requests=done,
        duration_s=_h2load_time_ms(fm.group(1) + fm.group(2)) / 1000.0,
        rps=float(fm.group(3)),
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        mean_ms=mean,
        sd_ms=sd,
        max_ms=mx,
        p50_ms=p50,
        p99_ms=p99,
        socket_errors=bad,
        non_2xx=max(0, failed - bad),
    )


def percentile(sorted_values: list[int], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (the smallest value with at least ``pct``
    percent of the values at or below it)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return float(sorted_values[int(rank) - 1])


def read_h2load_log(path: Path) -> list[int]:
    """The third column of h2load's ``--log-file`` (microseconds from request start to the end
    of the response), one request per line; lines that do not parse are skipped."""
    out: list[int] = []
    with open(path, "rb") as f:
        for line in f:
            parts = line.split(b"\t")
            if len(parts) >= 3:
                with contextlib.suppress(ValueError):
                    out.append(int(parts[2]))
    return out


def run_h2load(
    url: str,
    duration_s: int,
    workdir: Path,
    cpus: list[int] | None,
    *,
    clients: int = 16,
    streams: int = 10,
    data: Path | None = None,
    headers: tuple[str, ...] = (),
    log_latencies: bool = True,
) -> tuple[H2loadResult, str]:
    """``h2load -t1 -c<clients> -m<streams> -D<duration> [-d data] [-H ...] [--log-file] url``
    (h2c prior knowledge for ``http://``); (result, raw output). The per-request log is read
    for p50/p99 and then deleted (it holds one line per request)."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [H2LOAD, "-t1", f"-c{clients}", f"-m{streams}", "-D", str(duration_s)]
    if data is not None:
        argv += ["-d", str(data)]
    for h in headers:
        argv += ["-H", h]
    log = workdir / "h2load-requests.tsv"
    if log_latencies:
        argv.append(f"--log-file={log}")
    argv.append(url)
    code, out, err = run_to_end("h2load", argv, workdir, timeout=duration_s + 30, cpus=cpus)
    try:
        if code != 0:
            raise RuntimeError(f"h2load exited with {code}: {(err or out)[-1500:]}")
        lat = read_h2load_log(log) if log_latencies and log.exists() else None
    finally:
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
    return parse_h2load(out, lat), out


@dataclass
class IperfResult:
    bits_per_second: float
    bytes: int
    seconds: float


def parse_iperf_json(text: str) -> IperfResult:
    doc = json.loads(text)
    if "error" in doc:
        raise RuntimeError(f"iperf3: {doc['error']}")
    recv = doc["end"]["sum_received"]
    return IperfResult(float(recv["bits_per_second"]), int(recv["bytes"]), float(recv["seconds"]))


def run_iperf(port: int, duration_s: int, workdir: Path, cpus: list[int] | None) -> IperfResult:
    argv = [IPERF3, "-c", "127.0.0.1", "-p", str(port), "-t", str(duration_s), "-J"]
    code, out, err = run_to_end("iperf3-client", argv, workdir, timeout=duration_s + 30, cpus=cpus)
    if code != 0:
        detail = out.strip()[-500:] or err
        raise RuntimeError(f"iperf3 exited with {code}: {detail}")
    return parse_iperf_json(out)


def start_iperf_server(port: int, workdir: Path, cpus: list[int] | None) -> Child:
    """An iperf3 server for one run (the caller stops it afterwards). Not ``-1``: a stray
    connection (a proxy's late upstream connect from its readiness probe) would count as that
    one test and the server would be gone before the real client came."""
    return spawn("iperf3-server", [IPERF3, "-s", "-B", "127.0.0.1", "-p", str(port)], workdir, cpus=cpus)


@dataclass
class IdleClient:
    """A ``python -m bench.idleclient`` child holding ``ok`` open connections."""

    child: Child
    ok: int
    failed: int
    seconds: float

    def close(self) -> None:
        # Closing stdin tells the client to close its sockets and exit.
        if self.child.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.child.popen.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.wait(15)
        self.child.stop()


def open_idle(
    port: int, count: int, path: str, workdir: Path, cpus: list[int] | None, timeout: float = 120.0
) -> IdleClient:
    argv = [sys.executable, "-m", "bench.idleclient", "127.0.0.1", str(port), str(count), path]
    child = spawn("idleclient", argv, workdir, cpus=cpus, env={"PYTHONPATH": str(REPO_ROOT)}, pipes=True)
    line = read_line(child, timeout)
    if line is None or not line.startswith("READY"):
        tail = child.stderr_tail()
        child.stop()
        raise RuntimeError(f"idle client did not report READY ({line!r}): {tail}")
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    return IdleClient(child, int(fields["ok"]), int(fields["failed"]), float(fields["seconds"]))
