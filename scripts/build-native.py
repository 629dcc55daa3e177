"""Build moorline's compiled modules in place (``make`` runs this after installing the venv).

Today that is ``moorline/protocol/_http1c``: the HTTP/1.1 parsers on llhttp. llhttp's C source
is the copy inside the httptools source distribution, of the same version as the installed
httptools (so both parser backends run the same llhttp); it is fetched from PyPI once into
``build/``. Cython comes from PyPI too.

When something is missing (no C compiler, no Python headers, no network) it says so and exits 0:
moorline then runs its pure-Python parsers, which are the reference and are tested either way.
``--strict`` makes that an error (CI uses it, so a broken build cannot pass unnoticed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
PYX = ROOT / "moorline" / "protocol" / "_http1c.pyx"


def _llhttp_source() -> Path:
    version = importlib.metadata.version("httptools")
    dest = BUILD / f"httptools-{version}"
    if not (dest / "vendor" / "llhttp" / "include" / "llhttp.h").exists():
        BUILD.mkdir(exist_ok=True)
        sdist = BUILD / "sdist"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"httptools=={version}",
                "-d",
                str(sdist),
            ],
            check=True,
        )
        tarball = next(sdist.glob(f"httptools-{version}.tar.gz"))
        with tarfile.open(tarball) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llhttp/" in m.name]
            tf.extractall(BUILD, members=members, filter="data")
    return dest / "vendor" / "llhttp"


def _up_to_date(target: Path) -> bool:
    return target.exists() and target.stat().st_mtime >= PYX.stat().st_mtime


def build() -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = PYX.with_name("_http1c" + suffix)
    if _up_to_date(target):
        return target
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        raise RuntimeError(f"no Python.h under {sysconfig.get_paths()['include']} (python3-dev)")
    try:
        import Cython  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cython>=3.0"], check=True)
    from Cython.Build import cythonize
    from setuptools import Extension
    from setuptools.dist import Distribution

    llhttp = _llhttp_source()
    ext = Extension(
        "moorline.protocol._http1c",
        [str(PYX.relative_to(ROOT))] + [str(llhttp / "src" / f) for f in ("llhttp.c", "api.c", "http.c")],
        include_dirs=[str(llhttp / "include")],
        extra_compile_args=["-O2"],
    )
    dist = Distribution({"ext_modules": cythonize([ext], quiet=True, build_dir=str(BUILD / "cython"))})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = str(BUILD / "temp")
    cmd.ensure_finalized()
    cmd.run()
    os.utime(target)
    return target


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strict", action="store_true", help="fail when the build fails")
    args = ap.parse_args()
    os.chdir(ROOT)
    try:
        target = build()
    except Exception as e:  # any failure means: run pure Python, and say so
        print(
            f"build-native: not built ({e}); moorline runs its pure-Python HTTP/1.1 parsers", file=sys.stderr
        )
        return 1 if args.strict else 0
    print(f"build-native: {target.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
