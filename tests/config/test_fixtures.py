"""Configs written by real operators and control planes load as they are.

Fixtures live in /work/shared/fixtures (never edited; variations are made on copies).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from envoy.admin.v3 import config_dump_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import Message

from moorline.config.loader import OpaqueAny, load_bootstrap, parse_message, unpack_any
from moorline.testing.fixtures import FIXTURES as SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES
ENVOY = FIXTURES / "envoy"
ISTIO = FIXTURES / "istio"

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared fixtures not present")


def walk_anys(msg: Message, path: str = "") -> list[tuple[str, Message | OpaqueAny]]:
    """Unpack every Any inside ``msg`` (recursively into what they hold); (path, content) pairs."""
    out: list[tuple[str, Message | OpaqueAny]] = []
    for fd, value in msg.ListFields():
        fpath = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            items = [(f"{fpath}[{k!r}]", v) for k, v in value.items()] if vfd.message_type else []
        elif fd.is_repeated:
            items = [(f"{fpath}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(fpath, value)]
        for p, v in items:
            if v.DESCRIPTOR.full_name == "google.protobuf.Any":
                inner = unpack_any(v, p)
                out.append((p, inner))
                if isinstance(inner, Message):
                    out.extend(walk_anys(inner, p))
            else:
                out.extend(walk_anys(v, p))
    return out


def type_counts(msg: Message) -> tuple[Counter[str], Counter[str]]:
    known: Counter[str] = Counter()
    opaque: Counter[str] = Counter()
    for _p, inner in walk_anys(msg):
        if isinstance(inner, OpaqueAny):
            opaque[inner.type_name] += 1
        else:
            known[inner.DESCRIPTOR.full_name] += 1
    return known, opaque


# --- Envoy's own configs ------------------------------------------------------------------------


def test_envoy_demo_loads_as_is() -> None:
    b = load_bootstrap(str(ENVOY / "envoy-demo.yaml"))
    sr = b.static_resources
    assert [lst.name for lst in sr.listeners] == ["listener_0", "listener_1"]
    assert [c.name for c in sr.clusters] == ["loopback"]
    hcm = unpack_any(sr.listeners[1].filter_chains[0].filters[0].typed_config, "x")
    mapper = hcm.local_reply_config.mappers[0]
    assert mapper.filter.header_filter.header.string_match.exact == "GET"
    assert "Welcome to Envoy" in mapper.body_format_override.text_format_source.inline_string


def _make_cert(d: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed")
    cert, key = d / "servercert.pem", d / "serverkey.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def test_envoy_edge_loads_with_test_certs(tmp_path: Path) -> None:
    cert, key = _make_cert(tmp_path)
    text = (ENVOY / "envoy-edge.yaml").read_text()
    assert text.count("certs/servercert.pem") == 1 and text.count("port_value: 10000") == 1
    text = text.replace("certs/servercert.pem", str(cert)).replace("certs/serverkey.pem", str(key))
    # Loopback and an ephemeral port, so a test that starts this config may bind it.
    text = text.replace("port_value: 10000", "port_value: 0").replace(
        "address: 0.0.0.0", "address: 127.0.0.1"
    )
    cfg = tmp_path / "envoy-edge.yaml"
    cfg.write_text(text)

    b = load_bootstrap(str(cfg))
    lst = b.static_resources.listeners[0]
    assert lst.address.socket_address.port_value == 0
    assert lst.address.socket_address.address == "127.0.0.1"
    assert lst.per_connection_buffer_limit_bytes.value == 32768
    tls = unpack_any(lst.filter_chains[0].transport_socket.typed_config, "tls")
    c = tls.common_tls_context.tls_certificates[0]
    assert c.certificate_chain.filename == str(cert) and Path(c.certificate_chain.filename).is_file()
    assert c.private_key.filename == str(key) and Path(c.private_key.filename).is_file()
    # ``clusters:`` is written as a single mapping: Envoy takes it as a one-element list.
    assert [c.name for c in b.static_resources.clusters] == ["service_foo"]
    hpo = unpack_any(
        b.static_resources.clusters[0].typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ],
        "p",
    )
    assert hpo.explicit_http_config.http2_protocol_options.initial_stream_window_size.value == 65536
    # xds-protos still ships this v2alpha proto, so it unpacks into the real message.
    mon = unpack_any(b.overload_manager.resource_monitors[0].typed_config, "m")
    assert mon.DESCRIPTOR.full_name == "envoy.config.resource_monitor.fixed_heap.v2alpha.FixedHeapConfig"
    assert mon.max_heap_size_bytes == 1073741824
    assert b.overload_manager.actions[1].triggers[0].threshold.value == pytest.approx(0.95)


# --- Istio bootstraps ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["authsds", "default", "running"])
def test_istio_bootstrap_golden_loads(name: str) -> None:
    b = load_bootstrap(str(ISTIO / f"bootstrap_{name}_golden.json"))
    assert b.node.id == "sidecar~1.2.3.4~foo~bar"
    assert b.admin.address.socket_address.port_value == {"running": 15005}.get(name, 15000)
    assert b.dynamic_resources.ads_config.api_type == b.dynamic_resources.ads_config.DELTA_GRPC
    assert b.stats_config.stats_tags[0].tag_name == "cluster_name"
    assert b.layered_runtime.layers[0].static_layer["re2.max_program_size.error_level"] == "32768"
    assert "xds-grpc" in [c.name for c in b.static_resources.clusters]
    known, opaque = type_counts(b)
    # The TypedStruct's inner type is known: unpacked into the real message.
    ext = unpack_any(b.bootstrap_extensions[0].typed_config, "bootstrap_extensions[0].typed_config")
    assert ext.DESCRIPTOR.full_name == "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
    assert ext.buffer_size_kb.value == 64
    assert not opaque
    assert known["envoy.extensions.filters.http.compressor.v3.Compressor"] == 3
    if name == "running":
        assert known["envoy.config.trace.v3.ZipkinConfig"] == 1
        assert known["envoy.config.metrics.v3.StatsdSink"] == 1


# --- Istio config dumps: every xDS resource parses --------------------------------------------

RESOURCES = {
    "listener": listener_pb2.Listener,
    "cluster": cluster_pb2.Cluster,
    "route_config": route_pb2.RouteConfiguration,
    "endpoint_config": endpoint_pb2.ClusterLoadAssignment,
    "secret": secret_pb2.Secret,
}


def _resources(dump: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(field, path, resource dict) for each xDS resource in a ConfigDump's JSON."""
    out = []
    for ci, cfg in enumerate(dump["configs"]):
        for list_name, entries in cfg.items():
            if not isinstance(entries, list):
                continue
            for ei, entry in enumerate(entries):
                holders = [(f"configs[{ci}].{list_name}[{ei}]", entry)]
                for state in ("active_state", "warming_state", "draining_state"):
                    if state in entry:
                        holders.append((f"configs[{ci}].{list_name}[{ei}].{state}", entry[state]))
                for p, h in holders:
                    for field in RESOURCES:
                        if field in h:
                            out.append((field, f"{p}.{field}", h[field]))
    return out


DUMP_COUNTS = {
    "sidecar_configdump_authz.json": {"listener": 29},
    "sidecar_config_dump_full.json": {
        "listener": 2, "cluster": 3, "route_config": 1, "endpoint_config": 2, "secret": 2,
    },
    "sidecar_configdump_compare.json": {"listener": 3, "cluster": 1, "route_config": 1},
    "endpoints_configdump.json": {"endpoint_config": 37},
}  # fmt: skip


@pytest.mark.parametrize("fname", sorted(DUMP_COUNTS))
def test_config_dump_resources_parse(fname: str) -> None:
    dump = json.loads((ISTIO / fname).read_text())
    counts: Counter[str] = Counter()
    parsed = []
    for field, path, res in _resources(dump):
        msg = parse_message(res, RESOURCES[field], path)
        assert isinstance(msg, RESOURCES[field])
        counts[field] += 1
        parsed.append((field, msg))
    assert dict(counts) == DUMP_COUNTS[fname]

    # The whole dump parses too, and the resources inside it are byte-identical to the ones
    # parsed one by one (Any packing is deterministic).
    whole = parse_message(dump, config_dump_pb2.ConfigDump)
    inner = [m for _p, m in walk_anys(whole)]
    for field, msg in parsed:
        same = [m for m in inner if isinstance(m, RESOURCES[field]) and m == msg]
        assert same, f"{field} {msg.DESCRIPTOR.full_name} not found in the parsed dump"


def test_authz_dump_istio_types_are_opaque() -> None:
    dump = json.loads((ISTIO / "sidecar_configdump_authz.json").read_text())
    whole = parse_message(dump, config_dump_pb2.ConfigDump)
    known, opaque = type_counts(whole)
    assert dict(opaque) == {
        "stats.PluginConfig": 45,
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig": 12,
        "envoy.tcp.metadataexchange.config.MetadataExchange": 24,
        # TypedStruct wrapping Istio-only types: OpaqueAny with the *inner* type URL.
        "io.istio.network.authn.Config": 8,
        "io.istio.http.connect_authority.Config": 2,
        "io.istio.http.connect_baggage.Config": 1,
        "istio.set_internal_dst_address.v1.Config": 2,
    }
    assert known["envoy.config.listener.v3.Listener"] == 29
    assert known["envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"] == 29
    assert known["envoy.extensions.filters.http.rbac.v3.RBAC"] == 10
    assert known["envoy.extensions.filters.http.wasm.v3.Wasm"] == 16

    values = [
        inner
        for _p, inner in walk_anys(whole)
        if isinstance(inner, OpaqueAny) and inner.type_name.endswith("alpn.v2alpha1.FilterConfig")
    ]
    assert (
        values[0].type_url == "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
    )
    assert values[0].value["alpn_override"][0]["alpn_override"] == ["istio-http/1.0", "istio", "http/1.0"]
    mx = [i for _p, i in walk_anys(whole) if isinstance(i, OpaqueAny) and "metadataexchange" in i.type_url]
    # As a network filter it carries a payload; inside a Wasm filter's ``configuration`` none.
    assert sum(m.value == {"protocol": "istio-peer-exchange"} for m in mx) == 8
    assert sum(m.value == {} for m in mx) == 16


def test_full_dump_typed_per_filter_config_and_wrappers() -> None:
    dump = json.loads((ISTIO / "sidecar_config_dump_full.json").read_text())
    whole = parse_message(dump, config_dump_pb2.ConfigDump)
    known, opaque = type_counts(whole)
    assert known["google.protobuf.StringValue"] == 5  # {"@type": ...StringValue, "value": "..."}
    assert known["envoy.config.bootstrap.v3.Bootstrap"] == 0  # BootstrapConfigDump holds it inline
    assert opaque == Counter(
        {
            "stats.PluginConfig": 4,
            "io.istio.http.peer_metadata.Config": 3,
            "envoy.tcp.metadataexchange.config.MetadataExchange": 1,
        }
    )
    # The bootstrap inside the dump is a real Bootstrap.
    bcd = next(unpack_any(c, "c") for c in whole.configs if c.type_url.endswith("BootstrapConfigDump"))
    assert bcd.bootstrap.node.id
