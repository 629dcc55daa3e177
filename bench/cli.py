"""``python -m bench``: command line, process-wide setup (CPU pinning, file limit, signals),
the scenario loop and the output files."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from bench import report
from bench.children import kill_all
from bench.proxies import REPO_ROOT, Lab
from bench.scenarios import SCENARIOS, Harness, Progress, Settings

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
# "floor" is the calibration forwarder (bench/floor.py); it runs in the HTTP/1.1 scenarios only.
PROXY_NAMES = ("moorline", "nginx", "haproxy", "floor")
# Descriptors the idle-conns scenario needs per process beyond its connections (listeners,
# upstream connections, logs, the interpreter's own files).
FD_SLACK = 1000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark moorline against nginx, HAProxy and a calibration floor on loopback"
        " (see bench/README.md).",
    )
    p.add_argument(
        "--scenario",
        action="extend",
        nargs="+",
        metavar="NAME",
        help=f"scenarios to run (default: all): {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--rounds", type=int, help="rounds per scenario, proxies interleaved (default 3; --quick: 1)"
    )
    p.add_argument(
        "--duration",
        type=int,
        help="whole seconds of load per run (wrk takes whole seconds; default 10; --quick: 2)",
    )
    p.add_argument("--quick", action="store_true", help="2 s runs, 1 round")
    p.add_argument(
        "--proxies",
        default=",".join(PROXY_NAMES),
        help="comma-separated subset of moorline,nginx,haproxy,floor (default: all four; the floor"
        " runs in the HTTP/1.1 scenarios only)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument(
        "--idle-conns", type=int, default=8000, help="connections held in idle-conns (default 8000)"
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs of the children")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p


def _raise_nofile() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def _plan_cpus() -> tuple[list[int] | None, list[int] | None]:
    """Proxy on the first usable core, load generator and backend on the second; no pinning on
    a single core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return [cores[0]], [cores[1]]


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # SIGTERM / SIGHUP unwind like Ctrl-C, so every finally block stops its children.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for sc in SCENARIOS.values():
            print(f"{sc.name:16} {sc.description}")
        return 0
    names = args.scenario or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(
            f"bench: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr
        )
        return 2
    proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    bad = [p for p in proxies if p not in PROXY_NAMES]
    if bad or not proxies:
        print(f"bench: --proxies takes a subset of {','.join(PROXY_NAMES)}", file=sys.stderr)
        return 2
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    duration = args.duration if args.duration is not None else (2 if args.quick else 10)
    if rounds < 1 or duration <= 0:
        print("bench: --rounds must be >= 1 and --duration > 0", file=sys.stderr)
        return 2

    nofile = _raise_nofile()
    idle = args.idle_conns
    if idle > nofile - FD_SLACK:
        idle = max(nofile - FD_SLACK, 100)
        print(
            f"bench: file limit {nofile}: idle-conns holds {idle} connections instead of {args.idle_conns}",
            file=sys.stderr,
        )
    proxy_cpus, load_cpus = _plan_cpus()
    if load_cpus:
        # The harness itself (and the idle client it starts) stays off the proxy's core.
        os.sched_setaffinity(0, set(load_cpus))
    else:
        print("bench: fewer than 2 usable cores: nothing is pinned, numbers are less stable", file=sys.stderr)

    settings = Settings(
        rounds=rounds,
        duration_s=duration,
        warmup_s=1,
        proxies=proxies,
        out_dir=args.out,
        idle_conns=idle,
        startup_runs=5,
    )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="moorline-bench-"))
    os.chmod(workdir, 0o755)
    lab = Lab(workdir, proxy_cpus, load_cpus)
    progress = Progress()
    harness = Harness(settings, lab, progress)
    date = dt.date.today().isoformat()
    machine = report.machine_info()
    docs = []
    code = 0
    try:
        for name in names:
            doc = harness.run(SCENARIOS[name])
            doc["machine"] = machine
            path = report.write_json(doc, settings.out_dir, date)
            progress.done()
            print(report.markdown(doc), flush=True)
            print(f"_JSON: {path}_\n", flush=True)
            docs.append(doc)
        table = report.overview(docs)
        if table and len(docs) > 1:
            print(table, flush=True)
        chart = report.draw_chart(docs, settings.out_dir / f"{date}-ratios.png")
        print(chart, file=sys.stderr)
    except KeyboardInterrupt:
        progress.done()
        print("bench: interrupted; stopping every child process", file=sys.stderr)
        code = 130
    finally:
        harness.close()
        kill_all()
        if args.keep_workdir:
            print(f"bench: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code
