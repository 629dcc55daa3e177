"""Type URL -> protobuf message class, importing only the module that defines the type.

xds-protos installs ~770 ``*_pb2`` modules (Envoy, xDS, UDPA, validate, CEL, OpenTelemetry,
google.api ...). Importing all of them costs ~0.4 s and ~100 MB of descriptors, and a sidecar
only needs the few dozen types its configuration names. So we keep an index
``full message name -> module name`` built by reading each generated file's serialized
``FileDescriptorProto`` (the bytes literal handed to ``AddSerializedFile``) without executing
it, and import a module only when a type it defines is looked up.

The index is cached as JSON in ``$MOORLINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/moorline``, else
``~/.cache/moorline``. The file name carries the xds-protos and protobuf versions plus a hash of
the full key (site directory, RECORD mtime and size), and the key is stored inside and checked on
load, so an upgrade or reinstall never reads a stale index. A corrupt or mismatching file is
rebuilt; an unwritable cache directory silently leaves the index in memory only. If a cached
entry turns out wrong at import time (module gone or type missing) the index is rebuilt once.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import importlib
import importlib.util
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

__all__ = [
    "cache_file",
    "descriptor_pool_resolver",
    "index",
    "message_class",
    "rebuild",
    "resolve_type_url",
    "type_name",
]

_FORMAT = 1
# Top-level packages to fall back to when no dist-info RECORD can be found (vendored installs).
_FALLBACK_PACKAGES = ("envoy", "xds", "udpa", "validate", "google.protobuf")
# The generated code's one call that carries the serialized FileDescriptorProto.
_SERIALIZED_RE = re.compile(rb"AddSerializedFile\(b'((?:[^'\\\n]|\\.)*)'\)")

_lock = threading.RLock()
_index: dict[str, str] | None = None
_rebuilt_this_process = False


def type_name(type_url: str) -> str:
    """``type.googleapis.com/a.b.C`` -> ``a.b.C`` (any prefix, as protobuf's Any does)."""
    return type_url.rsplit("/", 1)[-1]


def message_class(full_name: str) -> type[Message] | None:
    """The generated class for a full message name, or None when no installed module defines it."""
    cls = _from_pool(full_name)
    if cls is not None:
        return cls
    with _lock:
        for attempt in range(2):
            module = index().get(full_name)
            if module is None:
                return None
            try:
                importlib.import_module(module)
            except ImportError:
                module = None
            cls = _from_pool(full_name) if module else None
            if cls is not None:
                return cls
            # The index pointed somewhere wrong: it is stale. Rebuild once per process.
            if attempt == 0 and not _rebuilt_this_process:
                rebuild()
            else:
                break
    return None


def resolve_type_url(type_url: str) -> type[Message] | None:
    """Message class for an ``Any`` type URL, or None for a type xds-protos does not know."""
    if not type_url:
        return None
    return message_class(type_name(type_url))


class _LazyPool:
    """Duck-typed descriptor pool for ``google.protobuf.json_format``.

    json_format resolves ``Any`` contents with ``pool.FindMessageTypeByName``; this one imports
    the defining module through the index first, then answers from the default pool. Pass it as
    ``json_format.MessageToDict(msg, descriptor_pool=descriptor_pool_resolver())``.
    """

    def FindMessageTypeByName(self, full_name: str) -> Any:
        cls = message_class(full_name)
        if cls is None:
            raise KeyError(full_name)
        return cls.DESCRIPTOR

    def __getattr__(self, name: str) -> Any:
        return getattr(descriptor_pool.Default(), name)


_lazy_pool = _LazyPool()


def descriptor_pool_resolver() -> Any:
    """A descriptor pool for json_format's ``descriptor_pool=`` argument that loads types lazily."""
    return _lazy_pool


def index() -> dict[str, str]:
    """The full-name -> module index (loaded from the cache or built on first use)."""
    global _index
    with _lock:
        if _index is None:
            _index = _load_or_build()
        return _index


def rebuild() -> dict[str, str]:
    """Rebuild the index from the installed files and rewrite the cache."""
    global _index, _rebuilt_this_process
    with _lock:
        _rebuilt_this_process = True
        key, label = _cache_key()
        _index = _build()
        _write_cache(key, label, _index)
        return _index


def _reset_for_tests() -> None:
    global _index, _rebuilt_this_process
    with _lock:
        _index = None
        _rebuilt_this_process = False


def _from_pool(full_name: str) -> type[Message] | None:
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None
    return message_factory.GetMessageClass(desc)


# --- cache -------------------------------------------------------------------------------------


def cache_dir() -> Path:
    env = os.environ.get("MOORLINE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "moorline"


def cache_file() -> Path:
    _key, label = _cache_key()
    return cache_dir() / f"typeindex-{label}.json"


def _load_or_build() -> dict[str, str]:
    key, label = _cache_key()
    path = cache_dir() / f"typeindex-{label}.json"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        idx = _decode(doc, key)
        if idx is not None:
            return idx
    except (OSError, ValueError):
        pass
    idx = _build()
    _write_cache(key, label, idx)
    return idx


def _decode(doc: Any, key: str) -> dict[str, str] | None:
    """Validate a cache document; None means stale or corrupt."""
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("key") != key:
        return None
    modules = doc.get("modules")
    if not isinstance(modules, dict) or not modules:
        return None
    idx: dict[str, str] = {}
    for module, names in modules.items():
        if not isinstance(module, str) or not isinstance(names, list):
            return None
        for n in names:
            if not isinstance(n, str):
                return None
            idx[n] = module
    return idx


def _write_cache(key: str, label: str, idx: dict[str, str]) -> None:
    by_module: dict[str, list[str]] = {}
    for name, module in idx.items():
        by_module.setdefault(module, []).append(name)
    doc = {"format": _FORMAT, "key": key, "modules": by_module}
    d = cache_dir()
    tmp = None
    try:
        d.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(prefix=".typeindex-", suffix=".tmp", dir=d)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, d / f"typeindex-{label}.json")
        tmp = None
    except OSError:
        pass  # not writable: keep the index in memory only
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _dist_info(site: Path, prefix: str) -> Path | None:
    try:
        for entry in os.scandir(site):
            if entry.name.startswith(prefix) and entry.name.endswith(".dist-info"):
                return Path(entry.path)
    except OSError:
        pass
    return None


def _package_root(name: str) -> Path | None:
    """The directory a top-level package is installed in, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(next(iter(spec.submodule_search_locations)))
    return pkg.parents[name.count(".")]


def _sources() -> list[tuple[Path, Path | None]]:
    """(site dir, dist-info dir or None) for xds-protos and protobuf."""
    out: list[tuple[Path, Path | None]] = []
    for pkg, dist in (("envoy", "xds_protos-"), ("google.protobuf", "protobuf-")):
        site = _package_root(pkg)
        if site is not None:
            out.append((site, _dist_info(site, dist)))
    return out


def _cache_key() -> tuple[str, str]:
    """(full key, short file-name label)."""
    import google.protobuf

    parts = [f"format={_FORMAT}", f"protobuf={google.protobuf.__version__}"]
    xds_version = "unknown"
    for site, dist in _sources():
        if dist is None:
            parts.append(f"{site}:no-dist-info")
            continue
        if dist.name.startswith("xds_protos-"):
            xds_version = dist.name[len("xds_protos-") : -len(".dist-info")]
        try:
            st = os.stat(dist / "RECORD")
            parts.append(f"{dist}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append(f"{dist}:no-record")
    key = "|".join(parts)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    label = f"xds-protos-{xds_version}-protobuf-{google.protobuf.__version__}-{digest}"
    return key, label


# --- building ----------------------------------------------------------------------------------


def _pb2_files() -> Iterator[tuple[str, Path]]:
    """(module name, file path) of every generated module we index."""
    seen: set[str] = set()
    for site, dist in _sources():
        rels: list[str] = []
        if dist is not None:
            try:
                with open(dist / "RECORD", encoding="utf-8", newline="") as f:
                    rels = [row[0] for row in csv.reader(f) if row]
            except OSError:
                rels = []
        if not rels:
            rels = _walk_fallback(site)
        for rel in rels:
            if not rel.endswith("_pb2.py") or rel.startswith(".."):
                continue
            module = rel[:-3].replace("/", ".").replace("\\", ".")
            if module not in seen:
                seen.add(module)
                yield module, site / rel


def _walk_fallback(site: Path) -> list[str]:
    rels: list[str] = []
    for pkg in _FALLBACK_PACKAGES:
        root = site / pkg.replace(".", "/")
        for dirpath, _dirs, files in os.walk(root):
            for fn in files:
                if fn.endswith("_pb2.py"):
                    rels.append(os.path.relpath(os.path.join(dirpath, fn), site).replace(os.sep, "/"))
    return rels


def _build() -> dict[str, str]:
    from google.protobuf import descriptor_pb2

    idx: dict[str, str] = {}
    for module, path in _pb2_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        m = _SERIALIZED_RE.search(data)
        names: list[str] = []
        parsed = False
        if m is not None:
            try:
                raw = codecs.escape_decode(m.group(1))[0]
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                _collect(fd.package, fd.message_type, names)
                parsed = True
            except Exception:  # malformed literal: fall back to importing the module
                names = []
        if not parsed:
            names = _names_by_import(module)
        for n in names:
            idx.setdefault(n, module)
    return idx


def _collect(prefix: str, messages: Any, out: list[str]) -> None:
    for msg in messages:
        name = f"{prefix}.{msg.name}" if prefix else msg.name
        out.append(name)
        _collect(name, msg.nested_type, out)


def _names_by_import(module: str) -> list[str]:
    """Generated code in a format we cannot read statically: import it (rare; correctness first)."""
    try:
        mod = importlib.import_module(module)
    except Exception:
        return []
    fd = getattr(mod, "DESCRIPTOR", None)
    out: list[str] = []

    def walk(descs: Any) -> None:
        for d in descs:
            out.append(d.full_name)
            walk(d.nested_types)

    if fd is not None:
        walk(fd.message_types_by_name.values())
    return out
