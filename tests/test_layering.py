"""Layering rules that the managers' rebuild relies on, checked on the source (imports and calls),
so a shortcut across layers fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import moorline

ROOT = Path(moorline.__file__).parent


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_upstream_does_not_import_net_stream_or_proxy() -> None:
    for f in sorted((ROOT / "upstream").glob("*.py")):
        bad = {m for m in _imports(f) if m.startswith(("moorline.net", "moorline.stream", "moorline.proxy"))}
        assert not bad, f"{f.name} imports {bad}"


def test_tcp_proxy_leaves_sockets_to_net() -> None:
    tree = ast.parse((ROOT / "proxy" / "tcp_proxy.py").read_text())
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Attribute):
                calls.add(fn.attr)
            elif isinstance(fn, ast.Name):
                calls.add(fn.id)
    assert not calls & {"socket", "connect_ex", "connect", "add_writer", "remove_writer", "setsockopt"}


def test_keepalive_is_set_in_one_place() -> None:
    hits = [f.name for f in (ROOT / "net").glob("*.py") if "TCP_KEEPIDLE" in f.read_text()]
    assert hits == ["sockopts.py"]
