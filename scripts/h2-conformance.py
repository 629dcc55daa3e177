"""Run the HTTP/2 conformance cases (``moorline.testing.h2conformance``) against moorline.

Starts a test upstream and a moorline with an h2c prior-knowledge listener in front of it, runs
every case (or those whose id starts with one of ``--only``), prints each failure with its RFC
section and ``<n> passed, <m> failed``; exits 1 when a case failed, 2 when moorline did not
start. ``--backend h2|nghttp2`` sets ``MOORLINE_HTTP2_BACKEND`` for the moorline process.

    PYTHONPATH=$PWD .venv/bin/python scripts/h2-conformance.py [--backend nghttp2] [-v]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moorline.testing import h2conformance as conf
from moorline.testing import procs
from moorline.testing.upstream import TestUpstream


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("h2", "nghttp2"), default=None, help="MOORLINE_HTTP2_BACKEND")
    ap.add_argument("--only", action="append", default=[], help="run the cases whose id starts with this")
    ap.add_argument(
        "--timeout", type=float, default=conf.DEFAULT_TIMEOUT, help="seconds to wait per reaction"
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case, not only failures")
    args = ap.parse_args(argv)
    cases = [c for c in conf.CASES if not args.only or any(c.id.startswith(p) for p in args.only)]
    env = {"MOORLINE_HTTP2_BACKEND": args.backend} if args.backend else None
    with tempfile.TemporaryDirectory(prefix="h2conf-") as tmp, TestUpstream() as up:
        port = procs.free_port()
        try:
            proc = procs.start_moorline(
                conf.moorline_config(port, up.port), Path(tmp), env=env, log_level="warning"
            )
        except procs.ProcStartError as exc:
            print(f"h2-conformance: moorline did not start: {exc}", file=sys.stderr)
            return 2
        try:
            results = [conf.run_case(c, "127.0.0.1", port, args.timeout) for c in cases]
            alive = proc.alive()
        finally:
            proc.stop()
    failed = [r for r in results if not r.passed]
    for r in results:
        if args.verbose or not r.passed:
            mark = "ok  " if r.passed else "FAIL"
            print(f"{mark} {r.case.id:<18} [{r.case.section}] {r.case.desc}")
            if args.verbose and r.reaction:
                print(f"     reaction: {r.reaction}")
            if not r.passed:
                print(f"     {r.detail}")
    backend = args.backend or "default"
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed (backend {backend})")
    if not alive:
        print("h2-conformance: moorline died during the run", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
