"""The scenarios and the loop that runs them: for each round, each proxy in turn (A B C A B C),
a fresh proxy process per run, warm-up, then the measured load with the proxy's CPU time and
memory read from ``/proc`` before and after.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import configs, measure, report
from bench.children import CLK_TCK, Child, core_ticks, cpu_seconds, hwm_kib, port_free, rss_kib, spawn
from bench.grpc_backend import STREAM_MESSAGE_SIZE, STREAM_MESSAGES
from bench.proxies import (
    H1_VARIANTS,
    HTTP_VARIANTS,
    L4_VARIANTS,
    REPO_ROOT,
    Backend,
    GrpcBackend,
    Lab,
    StartError,
    start_backend,
    start_grpc_backend,
    start_grpc_stream_backend,
    start_proxy,
    wait_moorline_ready,
)
from moorline.testing.procs import free_port

ERROR_TOLERANCE = 0.01  # a run with more socket errors + non-2xx than this share of requests failed

# h2load's load in h2-small and grpc-unary: 16 connections, 10 streams in flight on each.
H2_CLIENTS = 16
H2_STREAMS = 10
# grpc-stream: 8 connections x 4 calls in flight, each call 1,000 messages of 1 KiB (~1 MiB).
STREAM_CLIENTS = 8
STREAM_STREAMS = 4
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "http", "h2" / "grpc-stream" (h2load), "tls" (wrk over https), "l4", "idle", "startup"
    description: str
    path: str = "/small"
    body: bytes = configs.BODIES["small"]
    wrk_headers: tuple[str, ...] = ()
    route_rules: bool = False
    mode: str = "h1"  # the proxy's protocols, see bench.proxies.MODES
    clients: int = H2_CLIENTS  # h2load -c (h2load kinds)
    streams: int = H2_STREAMS  # h2load -m


def h2load_kind(sc: Scenario) -> bool:
    return sc.kind in ("h2", "grpc-stream")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("h1-small", "http", "HTTP/1.1 keep-alive, 64 connections, 13-byte responses"),
        Scenario(
            "h1-1k",
            "http",
            "HTTP/1.1 keep-alive, 64 connections, 1 KiB responses",
            "/1k",
            configs.BODIES["1k"],
        ),
        Scenario(
            "h1-route-rules",
            "http",
            f"13-byte responses; {configs.N_DECOY_ROUTES} regex routes before the matching one, which adds a request header",
            configs.ROUTE_RULES_PATH,
            route_rules=True,
        ),
        Scenario(
            "h1-100k",
            "http",
            "HTTP/1.1 keep-alive, 64 connections, 100 KiB responses",
            "/100k",
            configs.BODIES["100k"],
        ),
        Scenario(
            "h1-close",
            "http",
            "new connection per request (Connection: close), 64 concurrent, 13-byte responses",
            wrk_headers=("Connection: close",),
        ),
        Scenario(
            "h2-small",
            "h2",
            f"HTTP/2 (h2c prior knowledge), {H2_CLIENTS} connections x {H2_STREAMS} streams, 13-byte responses from an HTTP/1.1 backend",
            mode="h2",
        ),
        Scenario(
            "grpc-unary",
            "h2",
            f"gRPC unary echo of 13 bytes, h2c both ways, {H2_CLIENTS} connections x {H2_STREAMS} streams, grpcio backend",
            path=configs.GRPC_METHOD,
            body=configs.GRPC_PAYLOAD,
            mode="grpc",
        ),
        Scenario(
            "grpc-stream",
            "grpc-stream",
            f"gRPC server streaming, {STREAM_MESSAGES:,} messages of {STREAM_MESSAGE_SIZE} bytes per call, h2c both ways,"
            f" {STREAM_CLIENTS} connections x {STREAM_STREAMS} calls, Node http2 backend; direct = no proxy",
            path=configs.GRPC_STREAM_METHOD,
            body=b"",
            mode="grpc-stream",
            clients=STREAM_CLIENTS,
            streams=STREAM_STREAMS,
        ),
        Scenario(
            "tls-handshake",
            "tls",
            "new TLS 1.3 connection per request (ECDSA P-256, Connection: close), 64 concurrent, 13-byte responses",
            wrk_headers=("Connection: close",),
            mode="tls",
        ),
        Scenario("l4-iperf", "l4", "TCP proxy throughput, one iperf3 stream through the proxy"),
        Scenario("idle-conns", "idle", "memory per idle keep-alive connection (one request each, then idle)"),
        Scenario("startup", "startup", "moorline with the embedded default config: exec to admin /ready 200"),
        *(
            Scenario(
                f"failover-{m}",
                "failover",
                f"3 backends, 32 connections; a third of the way in, backend 3 fails: {what}",
                mode=m,
            )
            for m, what in (
                ("kill", "its nginx is killed"),
                ("5xx", "it answers 503 to everything"),
                ("blackhole", "its port stops accepting (a listening socket that never accepts)"),
            )
        ),
        Scenario(
            "bolt",
            "bolt",
            "SOFARPC Bolt v1 through rpc_proxy: 100 connections, one 1 KiB request in flight each, 1 KiB responses; against the same load straight to the server",
        ),
        Scenario(
            "xds-scale",
            "xds",
            "ADS state of the world: 1,000 EDS clusters (2 endpoints each), 1,000 routes and a listener pushed at once",
        ),
        Scenario(
            "xds-scale-delta",
            "xds",
            "delta ADS: 1,000 EDS clusters (2 endpoints each), 1,000 routes and a listener pushed at once",
            mode="delta",
        ),
    )
}

STARTUP_PORTS = (10000, 10001, 9901)


@dataclass
class Settings:
    rounds: int
    duration_s: int  # whole seconds: wrk takes no fractions
    warmup_s: int
    proxies: list[str]
    out_dir: Path
    idle_conns: int = 8000
    startup_runs: int = 5


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, text: str) -> None:
        el = int(time.monotonic() - self.t0)
        line = f"[bench {el // 60:d}:{el % 60:02d}] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _h2load_line(sc: Scenario) -> str:
    line = f"h2load -t1 -c{sc.clients} -m{sc.streams} -D <duration> --log-file <per-request log>"
    if sc.mode == "grpc":
        line += " -d <5-byte gRPC frame header + 13 bytes>" + "".join(f" -H '{h}'" for h in GRPC_HEADERS)
    elif sc.mode == "grpc-stream":
        line += " -d <5-byte gRPC frame header of an empty message>" + "".join(
            f" -H '{h}'" for h in GRPC_HEADERS
        )
    return line


def base_name(variant: str) -> str:
    return variant.split("-", 1)[0]


def floor_runs(sc: Scenario) -> bool:
    """The calibration floor forwards HTTP/1.1 in the clear: h1-* and idle-conns."""
    return sc.mode == "h1" and sc.kind in ("http", "idle")


def variants_for(sc: Scenario, proxies: list[str]) -> list[str]:
    """The variants one scenario runs; HTTP/2 scenarios run moorline on both codec backends
    (``moorline``: libnghttp2 when built, ``moorline-h2``: the pure-Python h2 reference)."""
    out = _variants(sc, proxies)
    if sc.mode in ("h2", "grpc", "grpc-stream") and "moorline" in out:
        out.insert(out.index("moorline") + 1, "moorline-h2")
    return out


def _variants(sc: Scenario, proxies: list[str]) -> list[str]:
    if sc.kind in ("startup", "xds"):
        return ["moorline"] if "moorline" in proxies else []
    if sc.kind == "bolt":
        return ["moorline", "direct"] if "moorline" in proxies else []
    if sc.kind == "grpc-stream":
        # direct (no proxy) shows what the backend and h2load manage alone: the proxies'
        # throughput is theirs only while it stays well below that.
        return [v for v in (*HTTP_VARIANTS, "direct") if v == "direct" or v in proxies]
    if sc.kind == "l4":
        pool: tuple[str, ...] = L4_VARIANTS
    else:
        pool = H1_VARIANTS if floor_runs(sc) else HTTP_VARIANTS
    return [v for v in pool if base_name(v) in proxies]


def peers_for(sc: Scenario) -> tuple[str, ...]:
    """The peers moorline's ratios are taken against in ``sc``."""
    if sc.kind == "bolt":
        return report.PEERS_BOLT
    if sc.kind == "grpc-stream":
        return report.PEERS_STREAM
    return report.PEERS_H1 if floor_runs(sc) else report.PEERS


def _wait_listening(port: int, child: Child, timeout: float = 10.0) -> None:
    """Wait until something LISTENs on 127.0.0.1:port, by reading /proc/net/tcp: a probe
    connection would count as a test to a one-off iperf3 server."""
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[1] == want and parts[3] == "0A":
                    return
        except OSError:
            pass
        if not child.alive():
            raise StartError(f"iperf3 server exited: {child.stderr_tail()}")
        time.sleep(0.02)
    raise StartError(f"nothing listening on port {port} after {timeout:.0f}s")


class Harness:
    def __init__(self, settings: Settings, lab: Lab, progress: Callable[[str], None]) -> None:
        self.s = settings
        self.lab = lab
        self.progress = progress
        self.backend: Backend | None = None
        self.grpc_backend: GrpcBackend | None = None
        self.stream_backend: GrpcBackend | None = None
        self.tls_files: configs.TlsFiles | None = None

    def close(self) -> None:
        if self.backend is not None:
            self.backend.stop()
            self.backend = None
        if self.grpc_backend is not None:
            self.grpc_backend.stop()
            self.grpc_backend = None
        if self.stream_backend is not None:
            self.stream_backend.stop()
            self.stream_backend = None

    def _backend(self) -> Backend:
        if self.backend is None or not self.backend.alive():
            self.backend = start_backend(self.lab)
        return self.backend

    def _grpc_backend(self) -> GrpcBackend:
        if self.grpc_backend is None or not self.grpc_backend.alive():
            self.grpc_backend = start_grpc_backend(self.lab)
        return self.grpc_backend

    def _stream_backend(self) -> GrpcBackend:
        if self.stream_backend is None or not self.stream_backend.alive():
            self.stream_backend = start_grpc_stream_backend(self.lab)
        return self.stream_backend

    def _tls(self) -> configs.TlsFiles:
        """One certificate for the whole run, made on first use, served by every proxy."""
        if self.tls_files is None:
            try:
                self.tls_files = configs.make_tls_files(self.lab.workdir / "tls")
            except (RuntimeError, OSError) as exc:
                raise StartError(f"certificate: {exc}") from None
        return self.tls_files

    # -- one scenario -------------------------------------------------------------------------

    def run(self, sc: Scenario) -> dict[str, Any]:
        started = dt.datetime.now().astimezone()
        variants = variants_for(sc, self.s.proxies)
        doc: dict[str, Any] = {
            "scenario": sc.name,
            "kind": sc.kind,
            "description": sc.description,
            "date": started.date().isoformat(),
            "started_at": started.isoformat(timespec="seconds"),
            "settings": {
                "rounds": self.s.rounds,
                "duration_s": self.s.duration_s,
                "warmup_s": self.s.warmup_s,
                "wrk": "wrk -t1 -c64 --latency" if sc.kind in ("http", "tls") else None,
                "h2load": _h2load_line(sc) if h2load_kind(sc) else None,
                "mode": sc.mode,
                "path": sc.path if sc.kind in ("http", "h2", "grpc-stream", "tls", "idle") else None,
                "wrk_headers": list(sc.wrk_headers),
                "proxy_cpus": self.lab.proxy_cpus,
                "load_cpus": self.lab.load_cpus,
            },
            "proxies": variants,
            "samples": {v: [] for v in variants},
            "configs": {},
        }
        metrics = report.METRICS_BY_KIND[sc.kind]
        if not variants:
            doc["skipped"] = f"none of the selected proxies ({', '.join(self.s.proxies)}) runs this scenario"
        elif sc.kind == "startup":
            self._startup(sc, doc)
        elif sc.kind == "xds":
            self._xds(sc, doc)
        elif sc.kind == "failover":
            self._failover(sc, doc, variants)
        elif sc.kind == "bolt":
            self._bolt(sc, doc, variants)
        else:
            if sc.kind == "idle":
                doc["settings"]["idle_conns"] = self.s.idle_conns
            if sc.kind == "tls":
                doc["settings"]["certificate"] = "ECDSA P-256, self-signed, TLS 1.3 only on every proxy"
            runner = {
                "http": self._http_run,
                "h2": self._http_run,
                "grpc-stream": self._http_run,
                "tls": self._http_run,
                "l4": self._l4_run,
                "idle": self._idle_run,
            }[sc.kind]
            for rnd in range(1, self.s.rounds + 1):
                for v in variants:
                    self.progress(f"{sc.name}: round {rnd}/{self.s.rounds}, {v}")
                    try:
                        sample = runner(sc, v)
                    except StartError as exc:
                        sample = {"ok": False, "error": f"start failed: {exc}"}
                    except (RuntimeError, ValueError, OSError) as exc:
                        # A broken run (wrk could not connect, iperf3 error, a socket error)
                        # is that run's result; the next run starts clean.
                        sample = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    sample["round"] = rnd
                    config = sample.pop("config", None)
                    if config:
                        doc["configs"][v] = config
                    doc["samples"][v].append(sample)
        doc["summary"] = report.summarize(doc["samples"], metrics)
        doc["ratios"] = report.ratios(doc["summary"], metrics, variants, peers_for(sc))
        doc["finished_at"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        return doc

    # -- noise on the proxy's core ------------------------------------------------------------

    def _core(self) -> tuple[int, int, int, int, int]:
        if not self.lab.proxy_cpus or not self.lab.load_cpus:
            return (0, 0, 0, 0, 0)
        load_task, load_irq, _ = core_ticks(self.lab.load_cpus)
        return (*core_ticks(self.lab.proxy_cpus), load_task, load_irq)

    def _other_load(
        self, before: tuple[int, int, int, int, int], proxy_cpu_s: float, wall_s: float
    ) -> dict[str, float]:
        """How busy the proxy's core was with other work (other people's tests on a shared
        machine), how much of it was interrupt time, how much the hypervisor stole, and how busy
        the load generator's core was: the numbers that say how far to trust this run.

        The kernel charges interrupt ticks both to the interrupted task's stime and to the irq
        columns of ``/proc/stat`` (not to "system"), so the core's busy time is task + irq and
        "other" is that minus the proxy's own CPU time."""
        if not self.lab.proxy_cpus or not self.lab.load_cpus or wall_s <= 0:
            return {}
        task, irq, steal = core_ticks(self.lab.proxy_cpus)
        load_task, load_irq, _ = core_ticks(self.lab.load_cpus)

        def pct(ticks: int) -> float:
            return 100.0 * ticks / CLK_TCK / wall_s

        return {
            "core_other_pct": max(
                0.0, pct(task + irq - before[0] - before[1]) - 100.0 * proxy_cpu_s / wall_s
            ),
            "core_irq_pct": pct(irq - before[1]),
            "core_steal_pct": pct(steal - before[2]),
            # Busy share of the load generator's core: near 100 % with a proxy well below
            # 100 % CPU means the load generator, not the proxy, set the pace.
            "load_core_busy_pct": pct(load_task + load_irq - before[3] - before[4]),
        }

    # -- HTTP: wrk ------------------------------------------------------------------------------

    def _load(
        self, sc: Scenario, port: int, duration_s: int
    ) -> tuple[measure.WrkResult | measure.H2loadResult, str]:
        """One run of the scenario's load generator against the proxy on ``port``."""
        scheme = "https" if sc.mode == "tls" else "http"
        url = f"{scheme}://127.0.0.1:{port}{sc.path}"
        if not h2load_kind(sc):
            work = self.lab.workdir / "wrk"
            return measure.run_wrk(url, duration_s, work, self.lab.load_cpus, headers=sc.wrk_headers)
        work = self.lab.workdir / "h2load"
        data: Path | None = None
        headers: tuple[str, ...] = ()
        if sc.mode in ("grpc", "grpc-stream"):
            data = work / "grpc-request.bin"
            work.mkdir(parents=True, exist_ok=True)
            data.write_bytes(configs.grpc_frame(sc.body))
            headers = GRPC_HEADERS
        return measure.run_h2load(
            url,
            duration_s,
            work,
            self.lab.load_cpus,
            clients=sc.clients,
            streams=sc.streams,
            data=data,
            headers=headers,
        )

    def _http_run(self, sc: Scenario, variant: str) -> dict[str, Any]:
        upstream_child = None
        if sc.mode == "grpc":
            upstream_port = self._grpc_backend().port
        elif sc.mode == "grpc-stream":
            sb = self._stream_backend()
            upstream_port, upstream_child = sb.port, sb.child
        else:
            upstream_port = self._backend().port
        p = start_proxy(
            self.lab,
            variant,
            upstream_port,
            route_rules=sc.route_rules,
            check_path=sc.path,
            check_body=sc.body,
            mode=sc.mode,
            tls=self._tls() if sc.mode == "tls" else None,
            upstream_child=upstream_child,
        )
        try:
            if self.s.warmup_s > 0:
                self._load(sc, p.port, self.s.warmup_s)
            pids = p.pids()
            core0 = self._core()
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            res, raw = self._load(sc, p.port, self.s.duration_s)
            t1 = time.monotonic()
            pids = p.pids()
            cpu = cpu_seconds(pids) - cpu0
            other = self._other_load(core0, cpu, t1 - t0)
            peak = hwm_kib(pids)
            alive = p.alive()
        finally:
            p.stop()
        errors = res.socket_errors + res.non_2xx
        ok = alive and res.requests > 0 and errors <= ERROR_TOLERANCE * res.requests
        sample: dict[str, Any] = {
            "ok": ok,
            **res.as_dict(),
            "cpu_s": cpu,
            "cpu_us_per_req": cpu * 1e6 / res.requests if res.requests else None,
            "cpu_pct": 100.0 * cpu / (t1 - t0),
            "peak_rss_mib": peak / 1024.0,
            **other,
            ("h2load_output" if h2load_kind(sc) else "wrk_output"): raw,
            "config": p.config_text,
        }
        if sc.kind == "grpc-stream":
            # One "request" is one call of STREAM_MESSAGES messages.
            sample["msgs_per_s"] = res.rps * STREAM_MESSAGES
            sample["mib_per_s"] = res.rps * STREAM_MESSAGES * STREAM_MESSAGE_SIZE / 2**20
        if not ok:
            sample["error"] = (
                "proxy died during the run"
                if not alive
                else f"{res.requests} requests, {res.socket_errors} socket errors, {res.non_2xx} non-2xx"
            )
        return sample

    # -- L4: iperf3 -----------------------------------------------------------------------------

    def _l4_run(self, sc: Scenario, variant: str) -> dict[str, Any]:
        work = self.lab.workdir / "iperf3"
        iport = free_port()
        # The proxy first: its readiness probe is a connection that the proxy relays upstream,
        # and iperf3 should not see it.
        p = start_proxy(self.lab, variant, iport, l4=True)
        server: Child | None = None
        try:
            server = measure.start_iperf_server(iport, work, self.lab.load_cpus)
            _wait_listening(iport, server)
            pids = p.pids()
            core0 = self._core()
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            res = measure.run_iperf(p.port, self.s.duration_s, work, self.lab.load_cpus)
            t1 = time.monotonic()
            pids = p.pids()
            cpu = cpu_seconds(pids) - cpu0
            other = self._other_load(core0, cpu, t1 - t0)
            peak = hwm_kib(pids)
            alive = p.alive()
        finally:
            p.stop()
            if server is not None:
                server.stop(signal.SIGTERM, 2)
        gb = res.bytes / 1e9
        return {
            "ok": alive and res.bytes > 0,
            "error": None if alive else "proxy died during the run",
            "gbit_s": res.bits_per_second / 1e9,
            "bytes": res.bytes,
            "seconds": res.seconds,
            "cpu_s": cpu,
            "cpu_pct": 100.0 * cpu / (t1 - t0),
            "cpu_ms_per_gb": cpu * 1000.0 / gb if gb else None,
            "peak_rss_mib": peak / 1024.0,
            **other,
            "config": p.config_text,
        }

    # -- idle connections -------------------------------------------------------------------------

    def _idle_run(self, sc: Scenario, variant: str) -> dict[str, Any]:
        backend = self._backend()
        p = start_proxy(self.lab, variant, backend.port, check_path=sc.path, check_body=sc.body)
        client: measure.IdleClient | None = None
        try:
            time.sleep(0.5)
            before = rss_kib(p.pids())
            client = measure.open_idle(
                p.port, self.s.idle_conns, sc.path, self.lab.workdir / "idle", self.lab.load_cpus
            )
            # Let deferred work (buffers freed after the response, GC) settle before sampling.
            time.sleep(1.0)
            pids = p.pids()
            after = max(rss_kib(pids) for _ in range(3))
            peak = hwm_kib(pids)
            alive = p.alive()
        finally:
            if client is not None:
                client.close()
            p.stop()
        assert client is not None
        ok = alive and client.ok > 0
        return {
            "ok": ok,
            "error": None if ok else f"proxy alive={alive}, {client.ok} connections held",
            "conns": client.ok,
            "conns_failed": client.failed,
            "open_seconds": client.seconds,
            "rss_before_mib": before / 1024.0,
            "rss_after_mib": after / 1024.0,
            "rss_per_conn_kib": (after - before) / client.ok if client.ok else None,
            "peak_rss_mib": peak / 1024.0,
            "config": p.config_text,
        }

    # -- failover ---------------------------------------------------------------------------------

    def _failover(self, sc: Scenario, doc: dict[str, Any], variants: list[str]) -> None:
        from bench.failover import run_once

        for rnd in range(1, self.s.rounds + 1):
            for v in variants:
                self.progress(f"{sc.name}: round {rnd}/{self.s.rounds}, {v}")
                try:
                    sample = run_once(self.lab, base_name(v), sc.mode, max(self.s.duration_s, 6))
                except (StartError, RuntimeError, ValueError, OSError) as exc:
                    sample = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                sample["round"] = rnd
                doc["samples"][v].append(sample)

    # -- bolt -------------------------------------------------------------------------------------

    def _bolt(self, sc: Scenario, doc: dict[str, Any], variants: list[str]) -> None:
        from bench.bolt import CONNECTIONS, CONTENT, run_once

        doc["settings"].update(connections=CONNECTIONS, content_bytes=CONTENT)
        for rnd in range(1, self.s.rounds + 1):
            for v in variants:
                self.progress(f"{sc.name}: round {rnd}/{self.s.rounds}, {v}")
                try:
                    sample = run_once(self.lab, v, self.s.duration_s)
                except (StartError, RuntimeError, ValueError, OSError) as exc:
                    sample = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                sample["round"] = rnd
                doc["samples"][v].append(sample)

    # -- xds-scale --------------------------------------------------------------------------------

    def _xds(self, sc: Scenario, doc: dict[str, Any]) -> None:
        from bench.xds_scale import run_once

        n = 1000
        doc["settings"]["clusters"] = n
        for rnd in range(1, self.s.rounds + 1):
            self.progress(f"{sc.name}: round {rnd}/{self.s.rounds}")
            try:
                sample = run_once(n, sc.mode == "delta", self.lab.workdir / "xds", self.lab.proxy_cpus)
            except (StartError, RuntimeError, OSError, AssertionError) as exc:
                sample = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            sample["round"] = rnd
            doc["samples"]["moorline"].append(sample)

    # -- startup ----------------------------------------------------------------------------------

    def _startup(self, sc: Scenario, doc: dict[str, Any]) -> None:
        deadline = time.monotonic() + 5
        while True:
            busy = [p for p in STARTUP_PORTS if not port_free(p)]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        doc["settings"]["runs"] = self.s.startup_runs
        if busy:
            doc["skipped"] = (
                f"ports {', '.join(map(str, busy))} are in use (the default config binds 10000, 10001, 9901)"
            )
            return
        argv = [sys.executable, "-m", "moorline", "run", "--log-level", "warning"]
        for i in range(1, self.s.startup_runs + 1):
            self.progress(f"{sc.name}: run {i}/{self.s.startup_runs}")
            sample: dict[str, Any]
            t0 = time.perf_counter()
            child = spawn(
                "moorline-default",
                argv,
                self.lab.workdir / "startup",
                cpus=self.lab.proxy_cpus,
                env={"PYTHONPATH": str(REPO_ROOT)},
            )
            try:
                wait_moorline_ready(9901, child, poll=0.005)
                elapsed = time.perf_counter() - t0
                sample = {
                    "ok": True,
                    "startup_ms": elapsed * 1000.0,
                    "rss_mib": rss_kib(child.pids()) / 1024.0,
                }
            except StartError as exc:
                sample = {"ok": False, "error": f"start failed: {exc}"}
            finally:
                child.stop(signal.SIGTERM, 10)
            sample["round"] = i
            doc["samples"]["moorline"].append(sample)
            # The next run needs the same ports: wait until the kernel has let them go.
            deadline = time.monotonic() + 10
            while not all(port_free(p) for p in STARTUP_PORTS) and time.monotonic() < deadline:
                time.sleep(0.05)
