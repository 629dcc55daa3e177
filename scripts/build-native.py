"""Build moorline's compiled modules in place (``make`` runs this after installing the venv).

Today that is ``moorline/protocol/_http1c``, the HTTP/1.1 parsers on llhttp, and
``moorline/protocol/_nghttp2``, the HTTP/2 codec on Debian's libnghttp2 (``libnghttp2-dev``
gives its header; ``scripts/install-deps.sh`` installs it). llhttp's C source
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
NG_PYX = ROOT / "moorline" / "protocol" / "_nghttp2.pyx"
NG_HEADER = Path("/usr/include/nghttp2/nghttp2.h")


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


def _up_to_date(target: Path, pyx: Path) -> bool:
    return target.exists() and target.stat().st_mtime >= pyx.stat().st_mtime


def _compile(ext: object, target: Path) -> Path:
    from Cython.Build import cythonize
    from setuptools.dist import Distribution

    dist = Distribution({"ext_modules": cythonize([ext], quiet=True, build_dir=str(BUILD / "cython"))})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = str(BUILD / "temp")
    cmd.ensure_finalized()
    cmd.run()
    os.utime(target)
    return target


def build_nghttp2() -> Path:
    """The HTTP/2 codec on libnghttp2 (linked against the system library)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = NG_PYX.with_name("_nghttp2" + suffix)
    if _up_to_date(target, NG_PYX):
        return target
    if not NG_HEADER.exists():
        raise RuntimeError(f"no {NG_HEADER} (Debian package libnghttp2-dev)")
    _need_cython()
    from setuptools import Extension

    ext = Extension(
        "moorline.protocol._nghttp2",
        [str(NG_PYX.relative_to(ROOT))],
        libraries=["nghttp2"],
        extra_compile_args=["-O2"],
    )
    return _compile(ext, target)


def _need_cython() -> None:
    try:
        import Cython  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cython>=3.0"], check=True)


def build() -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = PYX.with_name("_http1c" + suffix)
    if _up_to_date(target, PYX):
        return target
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        raise RuntimeError(f"no Python.h under {sysconfig.get_paths()['include']} (python3-dev)")
    _need_cython()
    from setuptools import Extension

    llhttp = _llhttp_source()
    ext = Extension(
        "moorline.protocol._http1c",
        [str(PYX.relative_to(ROOT))] + [str(llhttp / "src" / f) for f in ("llhttp.c", "api.c", "http.c")],
        include_dirs=[str(llhttp / "include")],
        extra_compile_args=["-O2"],
    )
    return _compile(ext, target)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strict", action="store_true", help="fail when the build fails")
    args = ap.parse_args()
    os.chdir(ROOT)
    failed = False
    try:
        target = build()
        print(f"build-native: {target.relative_to(ROOT)}", file=sys.stderr)
    except Exception as e:  # any failure means: run pure Python, and say so
        print(
            f"build-native: not built ({e}); moorline runs its pure-Python HTTP/1.1 parsers", file=sys.stderr
        )
        failed = True
    try:
        target = build_nghttp2()
        print(f"build-native: {target.relative_to(ROOT)}", file=sys.stderr)
    except Exception as e:
        print(
            f"build-native: not built ({e}); moorline runs HTTP/2 on the pure-Python h2 backend",
            file=sys.stderr,
        )
        failed = True
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
