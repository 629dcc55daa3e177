"""Type URL -> message class through the on-disk index; lazy imports; cache robustness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2, duration_pb2, json_format

from moorline.config import typeindex

HCM_NAME = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# Modules nothing in a typical sidecar config needs: must stay unimported.
FAR_AWAY = "envoy.extensions.filters.network.dubbo_proxy.v3.dubbo_proxy_pb2"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "cache"
    monkeypatch.setenv("MOORLINE_CACHE_DIR", str(d))
    typeindex._reset_for_tests()
    yield d
    typeindex._reset_for_tests()


def test_known_types() -> None:
    assert typeindex.message_class("envoy.config.cluster.v3.Cluster") is cluster_pb2.Cluster
    assert (
        typeindex.resolve_type_url("type.googleapis.com/envoy.config.cluster.v3.Cluster")
        is cluster_pb2.Cluster
    )
    nested = typeindex.message_class("envoy.config.cluster.v3.Cluster.TransportSocketMatch")
    assert nested is cluster_pb2.Cluster.TransportSocketMatch
    assert typeindex.message_class("google.protobuf.Duration") is duration_pb2.Duration
    hcm = typeindex.resolve_type_url(f"type.googleapis.com/{HCM_NAME}")
    assert hcm is not None and hcm.DESCRIPTOR.full_name == HCM_NAME
    # other xds-protos packages
    for name in ("xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct", "validate.FieldRules"):
        cls = typeindex.message_class(name)
        assert cls is not None and cls.DESCRIPTOR.full_name == name


def test_unknown_types() -> None:
    assert typeindex.message_class("stats.PluginConfig") is None
    assert typeindex.resolve_type_url("type.googleapis.com/stats.PluginConfig") is None
    assert (
        typeindex.resolve_type_url(
            "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
        )
        is None
    )
    assert typeindex.resolve_type_url("") is None
    assert typeindex.message_class("envoy.config.cluster.v3") is None  # a package, not a message


def test_index_written_and_reused(cache_dir: Path) -> None:
    idx = typeindex.index()
    assert idx["envoy.config.cluster.v3.Cluster"] == "envoy.config.cluster.v3.cluster_pb2"
    assert idx["google.protobuf.Duration"] == "google.protobuf.duration_pb2"
    f = typeindex.cache_file()
    assert f.parent == cache_dir and f.is_file()
    assert "xds-protos-" in f.name and "protobuf-" in f.name
    doc = json.loads(f.read_text())
    assert "envoy.config.cluster.v3.Cluster" in doc["modules"]["envoy.config.cluster.v3.cluster_pb2"]

    # A second process-lifetime load reads the file instead of scanning (prove it by marking it).
    doc["modules"]["envoy.config.cluster.v3.cluster_pb2"].append("marker.FromCache")
    f.write_text(json.dumps(doc))
    typeindex._reset_for_tests()
    assert typeindex.index()["marker.FromCache"] == "envoy.config.cluster.v3.cluster_pb2"


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"[]", b'{"format": 1, "key": "other", "modules": {"a": ["b"]}}', b"\xff\xfe"],
    ids=["empty", "garbage", "list", "stale-key", "binary"],
)
def test_corrupt_or_stale_cache_is_rebuilt(cache_dir: Path, content: bytes) -> None:
    typeindex.index()
    f = typeindex.cache_file()
    f.write_bytes(content)
    typeindex._reset_for_tests()
    idx = typeindex.index()
    assert idx["envoy.config.cluster.v3.Cluster"] == "envoy.config.cluster.v3.cluster_pb2"
    assert len(idx) > 2000
    doc = json.loads(f.read_text())  # rewritten, valid
    assert "envoy.config.cluster.v3.Cluster" in doc["modules"]["envoy.config.cluster.v3.cluster_pb2"]


def test_unwritable_cache_dir_falls_back_to_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")  # mkdir under a regular file fails even for root
    monkeypatch.setenv("MOORLINE_CACHE_DIR", str(blocker / "moorline"))
    typeindex._reset_for_tests()
    try:
        assert typeindex.index()["envoy.config.cluster.v3.Cluster"] == "envoy.config.cluster.v3.cluster_pb2"
    finally:
        typeindex._reset_for_tests()


def test_descriptor_pool_resolver_for_json_format() -> None:
    pool = typeindex.descriptor_pool_resolver()
    assert pool.FindMessageTypeByName(HCM_NAME).full_name == HCM_NAME
    with pytest.raises(KeyError):
        pool.FindMessageTypeByName("stats.PluginConfig")
    a = any_pb2.Any()
    a.Pack(cluster_pb2.Cluster(name="c"))
    assert json_format.MessageToDict(a, descriptor_pool=pool) == {
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "c",
    }


def _run(code: str, cache: Path) -> dict[str, object]:
    env = dict(os.environ, MOORLINE_CACHE_DIR=str(cache))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


LAZY = f"""
import json, sys
from moorline.config import typeindex
cls = typeindex.resolve_type_url("type.googleapis.com/{HCM_NAME}")
print(json.dumps({{
    "name": cls.DESCRIPTOR.full_name,
    "far": "{FAR_AWAY}" in sys.modules,
    "pb2": sum(1 for m in sys.modules if m.endswith("_pb2")),
}}))
"""


def test_resolving_one_type_imports_only_its_modules(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    for run in ("cold", "warm"):  # building the index must not import either
        r = _run(LAZY, cache)
        assert r["name"] == HCM_NAME, run
        assert r["far"] is False, run
        # HCM pulls in its imports (route, core, ...) but nowhere near the ~780 modules.
        assert isinstance(r["pb2"], int) and r["pb2"] < 150, run
    assert any(cache.glob("typeindex-*.json"))


def test_wrong_entry_with_valid_key_is_repaired(tmp_path: Path) -> None:
    """A cache that parses but points a type at a module that does not exist: rebuilt on use."""
    cache = tmp_path / "c"
    _run(LAZY, cache)
    (f,) = cache.glob("typeindex-*.json")
    doc = json.loads(f.read_text())
    for names in doc["modules"].values():
        if "envoy.config.cluster.v3.Cluster" in names:
            names.remove("envoy.config.cluster.v3.Cluster")
    doc["modules"]["moorline_no_such_module_pb2"] = ["envoy.config.cluster.v3.Cluster"]
    f.write_text(json.dumps(doc))
    code = """
import json
from moorline.config import typeindex
cls = typeindex.message_class("envoy.config.cluster.v3.Cluster")
print(json.dumps({"name": cls.DESCRIPTOR.full_name if cls else None}))
"""
    assert _run(code, cache) == {"name": "envoy.config.cluster.v3.Cluster"}
    fixed = json.loads(f.read_text())
    assert "moorline_no_such_module_pb2" not in fixed["modules"]
