"""The layering rules of DESIGN.md, checked on the source: no import cycles (lazy imports
count), sans-IO codecs, lower layers never importing upper ones."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "moorline"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _walk(node: ast.AST):
    """Every node, except what sits under ``if TYPE_CHECKING:`` (never imported at run time)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for c in child.orelse:
                yield c
                yield from _walk(c)
            continue
        yield child
        yield from _walk(child)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in _walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n.startswith("moorline"):
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    mods = set(files)
    g = {m: imports_of(p, mods) - {m} for m, p in files.items()}
    # A package's __init__ importing its own submodules is not a cycle worth reporting.
    return {m: {d for d in deps if not (m and d.startswith(m + "."))} for m, deps in g.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def _deps(prefix: str) -> dict[str, set[str]]:
    return {m: d for m, d in graph().items() if m == prefix or m.startswith(prefix + ".")}


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("moorline.protocol", ("moorline.stream", "moorline.proxy", "moorline.net", "moorline.upstream")),
        ("moorline.stream", ("moorline.proxy", "moorline.filters", "moorline.server")),
        (
            "moorline.config",
            (
                "moorline.net",
                "moorline.stream",
                "moorline.proxy",
                "moorline.upstream",
                "moorline.filters",
                "moorline.admin",
                "moorline.server",
                "moorline.extensions",
            ),
        ),
        ("moorline.observability", ("moorline.proxy", "moorline.stream", "moorline.server")),
    ],
)
def test_lower_layers_do_not_import_upper_ones(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = {
        m: sorted(d for d in deps if d.startswith(forbidden))
        for m, deps in _deps(layer).items()
        if any(d.startswith(forbidden) for d in deps)
    }
    assert bad == {}


def test_codecs_are_sans_io() -> None:
    """protocol/ takes bytes and time as arguments: no event loop, sockets or clock."""
    for p in (ROOT / "protocol").rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("asyncio", "socket", "time", "uvloop", "selectors"), (p, n)


def test_upstream_does_not_import_net_stream_or_proxy() -> None:
    bad = {
        m: sorted(d for d in deps if d.startswith(("moorline.net", "moorline.stream", "moorline.proxy")))
        for m, deps in _deps("moorline.upstream").items()
    }
    assert {m: d for m, d in bad.items() if d} == {}


_SOCKET_CALLS = {"socket", "connect_ex", "add_writer", "remove_writer", "add_reader", "setsockopt", "accept"}


def test_only_net_touches_sockets() -> None:
    """Outside net/ (and the test helpers in testing/), nothing opens, connects, polls or sets
    options on a socket."""
    offenders = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in ("net", "testing"):
            continue
        calls = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                calls.add(name)
        hit = calls & _SOCKET_CALLS
        if hit:
            offenders[str(rel)] = sorted(hit)
    assert offenders == {}


def test_keepalive_is_set_in_one_place() -> None:
    hits = [f.name for f in (ROOT / "net").glob("*.py") if "TCP_KEEPIDLE" in f.read_text()]
    assert hits == ["sockopts.py"]
