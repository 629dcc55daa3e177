"""Bootstrap loading: YAML/JSON -> protos, Any handling, and errors with exact field paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2

from moorline.config.default import DEFAULT_CONFIG_YAML
from moorline.config.errors import ConfigError
from moorline.config.loader import (
    MAX_DEPTH,
    OpaqueAny,
    load_bootstrap,
    load_document,
    pack,
    parse_message,
    unpack_any,
)

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def err(yaml_text: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_bootstrap(yaml_text=yaml_text)
    return ei.value


def listener_with(typed_config: str, indent: int = 10) -> str:
    pad = " " * indent
    body = "\n".join(pad + line for line in typed_config.strip("\n").splitlines())
    return f"""
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}
    filter_chains:
    - filters:
      - name: f
        typed_config:
{body}
"""


# --- the embedded default ------------------------------------------------------------------------


def test_default_config_loads() -> None:
    b = load_bootstrap(yaml_text=DEFAULT_CONFIG_YAML)
    assert b.admin.address.socket_address.address == "127.0.0.1"
    assert b.admin.address.socket_address.port_value == 9901
    l0, l1 = b.static_resources.listeners
    assert (l0.name, l0.address.socket_address.port_value) == ("listener_0", 10000)
    assert (l1.name, l1.address.socket_address.port_value) == ("listener_1", 10001)
    hcm0 = unpack_any(l0.filter_chains[0].filters[0].typed_config, "hcm0")
    assert hcm0.stat_prefix == "ingress_http"
    assert hcm0.route_config.virtual_hosts[0].routes[0].route.cluster == "local_service"
    hcm1 = unpack_any(l1.filter_chains[0].filters[0].typed_config, "hcm1")
    dr = hcm1.route_config.virtual_hosts[0].routes[0].direct_response
    assert dr.status == 200 and dr.body.inline_string == "Hello from moorline\n"
    assert hcm1.access_log[0].typed_config.type_url.endswith("StdoutAccessLog")
    (c,) = b.static_resources.clusters
    assert c.name == "local_service" and c.type == cluster_pb2.Cluster.STATIC
    sa = c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.1", 10001)


# --- conversions ---------------------------------------------------------------------------------


def test_json_names_wrappers_durations_and_64bit_strings() -> None:
    b = load_bootstrap(
        yaml_text="""
static_resources:
  clusters:
  - name: c
    connectTimeout: 0.25s
    perConnectionBufferLimitBytes: 1024
    max_requests_per_connection: 7
    lb_policy: 2
    circuit_breakers: {thresholds: [{max_connections: "100"}]}
stats_flush_interval: 5s
layered_runtime:
  layers: [{name: s, static_layer: {a: 1, b: [true, null], "80": x}}]
"""
    )
    c = b.static_resources.clusters[0]
    assert c.connect_timeout.ToMilliseconds() == 250
    assert c.per_connection_buffer_limit_bytes.value == 1024
    assert c.max_requests_per_connection.value == 7
    assert c.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert c.circuit_breakers.thresholds[0].max_connections.value == 100
    assert b.stats_flush_interval.seconds == 5
    layer = b.layered_runtime.layers[0].static_layer
    assert layer["a"] == 1 and list(layer["b"]) == [True, None] and layer["80"] == "x"


def test_single_object_where_a_list_is_expected() -> None:
    b = load_bootstrap(yaml_text="static_resources: {clusters: {name: only}}")
    assert [c.name for c in b.static_resources.clusters] == ["only"]


def test_json_file_and_merge_with_config_yaml(tmp_path: Path) -> None:
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"static_resources": {"clusters": [{"name": "a"}]}, "node": {"id": "n1"}}))
    b = load_bootstrap(str(p), yaml_text="node: {cluster: c1}\nstatic_resources: {clusters: [{name: b}]}")
    assert b.node.id == "n1" and b.node.cluster == "c1"
    assert [c.name for c in b.static_resources.clusters] == ["a", "b"]
    # Merging can create a duplicate; the error names both sources.
    with pytest.raises(ConfigError) as ei:
        load_bootstrap(str(p), yaml_text="static_resources: {clusters: [{name: a}]}")
    assert ei.value.path == "static_resources.clusters[1].name"
    assert ei.value.source == f"{p} + --config-yaml"


def test_known_any_unpacks_and_packing_is_deterministic() -> None:
    text = listener_with(
        f'{{"@type": {HCM}, stat_prefix: s, http_filters: [{{name: r, typed_config: {{"@type": {ROUTER}, suppress_envoy_headers: true}}}}]}}'
    )
    b1 = load_bootstrap(yaml_text=text)
    b2 = load_bootstrap(yaml_text=text)
    assert b1.SerializeToString(deterministic=True) == b2.SerializeToString(deterministic=True)
    any_msg = b1.static_resources.listeners[0].filter_chains[0].filters[0].typed_config
    assert any_msg.type_url == HCM
    hcm = unpack_any(any_msg, "x")
    assert hcm.stat_prefix == "s"
    router = unpack_any(hcm.http_filters[0].typed_config, "y")
    assert isinstance(router, router_pb2.Router) and router.suppress_envoy_headers


def test_unknown_type_becomes_opaque_any_with_its_url_and_value() -> None:
    url = "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
    b = load_bootstrap(
        yaml_text=listener_with(
            f'{{"@type": "{url}", alpn_override: [{{upstream_protocol: HTTP11, n: 3, f: 1.5}}]}}'
        )
    )
    any_msg = b.static_resources.listeners[0].filter_chains[0].filters[0].typed_config
    assert any_msg.type_url == url  # the bootstrap keeps the original type URL
    op = unpack_any(any_msg, "p")
    assert isinstance(op, OpaqueAny)
    assert op.type_url == url and op.type_name == url.split("/")[1]
    assert op.value == {"alpn_override": [{"upstream_protocol": "HTTP11", "n": 3, "f": 1.5}]}
    assert isinstance(op.value["alpn_override"][0]["n"], int)


def test_unknown_type_inside_known_any() -> None:
    b = load_bootstrap(
        yaml_text=listener_with(
            f'{{"@type": {HCM}, stat_prefix: s, http_filters: [{{name: st, typed_config: {{"@type": type.googleapis.com/stats.PluginConfig}}}}]}}'
        )
    )
    hcm = unpack_any(b.static_resources.listeners[0].filter_chains[0].filters[0].typed_config, "h")
    assert unpack_any(hcm.http_filters[0].typed_config, "s") == OpaqueAny(
        "type.googleapis.com/stats.PluginConfig", {}
    )


def test_typed_struct_known_and_unknown() -> None:
    for ts in ("udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"):
        known = listener_with(
            f'{{"@type": type.googleapis.com/{ts}, type_url: "{ROUTER}", value: {{suppress_envoy_headers: true, upstream_log: [{{name: x}}]}}}}'
        )
        b = load_bootstrap(yaml_text=known)
        r = unpack_any(b.static_resources.listeners[0].filter_chains[0].filters[0].typed_config, "tc")
        assert isinstance(r, router_pb2.Router) and r.suppress_envoy_headers and r.upstream_log[0].name == "x"

        unknown = listener_with(
            f'{{"@type": type.googleapis.com/{ts}, type_url: type.googleapis.com/io.istio.x.Config, value: {{a: {{b: 2}}}}}}'
        )
        b = load_bootstrap(yaml_text=unknown)
        op = unpack_any(b.static_resources.listeners[0].filter_chains[0].filters[0].typed_config, "tc")
        assert op == OpaqueAny("type.googleapis.com/io.istio.x.Config", {"a": {"b": 2}})

    # A bad field inside a TypedStruct of a known type is reported at unpack time, under .value
    bad = listener_with(
        f'{{"@type": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: "{ROUTER}", value: {{nope: 1}}}}'
    )
    b = load_bootstrap(yaml_text=bad)
    with pytest.raises(ConfigError) as ei:
        unpack_any(b.static_resources.listeners[0].filter_chains[0].filters[0].typed_config, "tc")
    assert ei.value.path == "tc.value.nope"


def test_packed_well_known_type() -> None:
    b = load_bootstrap(
        yaml_text="""
static_resources:
  clusters:
  - name: c
    typed_extension_protocol_options:
      k: {"@type": type.googleapis.com/google.protobuf.StringValue, value: hello}
"""
    )
    v = unpack_any(b.static_resources.clusters[0].typed_extension_protocol_options["k"], "k")
    assert isinstance(v, wrappers_pb2.StringValue) and v.value == "hello"


def test_unpack_any_binary_and_corrupt() -> None:
    r = router_pb2.Router(suppress_envoy_headers=True)
    assert unpack_any(pack(r), "p") == r
    bad = any_pb2.Any(type_url=ROUTER, value=b"\xff\xff\xff")
    with pytest.raises(ConfigError) as ei:
        unpack_any(bad, "a.b")
    assert ei.value.path == "a.b"
    # Binary payload of an unknown type (e.g. from a binary xDS stream): opaque, empty value.
    blob = any_pb2.Any(type_url="type.googleapis.com/x.Y", value=b"\x08\x01")
    assert unpack_any(blob, "p") == OpaqueAny("type.googleapis.com/x.Y", {})
    s = struct_pb2.Struct()
    s.update({"k": "v"})
    assert unpack_any(any_pb2.Any(type_url="t/x.Y", value=s.SerializeToString()), "p").value == {"k": "v"}


def test_parse_message_for_xds_resources() -> None:
    c = parse_message(
        {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "x"}, cluster_pb2.Cluster
    )
    assert c.name == "x"
    with pytest.raises(ConfigError) as ei:
        parse_message(
            {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster"},
            listener_pb2.Listener,
            "resources[2]",
        )
    assert ei.value.path == "resources[2].@type"
    with pytest.raises(ConfigError) as ei:
        parse_message(
            {"name": "l", "address": {"socket_address": {"port_value": -1}}},
            listener_pb2.Listener,
            "resources[0]",
        )
    assert ei.value.path == "resources[0].address.socket_address.port_value"
    assert "out of range for uint32" in ei.value.message
    # Listener checks are bootstrap-level (Envoy's); parse_message itself accepts a bare name.
    assert parse_message({"name": "l"}, listener_pb2.Listener).name == "l"


def test_load_document_json_and_yaml() -> None:
    assert load_document('{"a": {"b": [1, 2]}}', "s") == {"a": {"b": [1, 2]}}
    # JSON with a tab (YAML trips over tabs in some places; JSON parser first)
    assert load_document('{\t"a":\t1}', "s") == {"a": 1}
    assert load_document("{a: 1}  # flow-style YAML", "s") == {"a": 1}
    # keys brought in by a ``<<`` merge may be overridden: not a duplicate
    merged = load_document("base: &b {name: x, port: 1}\nc:\n  <<: *b\n  name: y\n", "s")
    assert merged["c"] == {"name": "y", "port": 1}


# --- errors: exact field paths ---------------------------------------------------------------------

CLUSTER_EP = """
static_resources:
  clusters:
  - name: a
    load_assignment:
      cluster_name: a
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: 127.0.0.1, port_value: PORT}
"""

ERROR_CASES: list[tuple[str, str, str, str]] = [
    ("bad enum", "static_resources: {clusters: [{name: a, lb_policy: ROUND_ROBBIN}]}",
     "static_resources.clusters[0].lb_policy", 'invalid enum value "ROUND_ROBBIN"'),
    ("enum number", "static_resources: {clusters: [{name: a, type: STATICK}]}",
     "static_resources.clusters[0].type", 'did you mean "STATIC"'),
    ("unknown field", "static_resources: {listeners: [{name: l, foo: 1}]}",
     "static_resources.listeners[0].foo", "unknown field"),
    ("misspelt field", "static_resources: {clusters: [{name: a, lb_polcy: RANDOM}]}",
     "static_resources.clusters[0].lb_polcy", 'did you mean "lb_policy"'),
    ("port text", CLUSTER_EP.replace("PORT", '"x"'),
     "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
     ".socket_address.port_value", "expected an integer"),
    ("port range", CLUSTER_EP.replace("PORT", "4294967296"),
     "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
     ".socket_address.port_value", "out of range for uint32"),
    ("port float", CLUSTER_EP.replace("PORT", "80.5"),
     "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
     ".socket_address.port_value", "expected an integer"),
    ("duration", "static_resources: {clusters: [{name: a, connect_timeout: 5}]}",
     "static_resources.clusters[0].connect_timeout", "duration"),
    ("duration text", "static_resources: {clusters: [{name: a, connect_timeout: 5m}]}",
     "static_resources.clusters[0].connect_timeout", "invalid value '5m'"),
    ("string wanted", "node: {id: 12}", "node.id", "expected a string"),
    ("bool wanted", "static_resources: {listeners: [{name: l, address: {pipe: {path: /p}}, transparent: 1}]}",
     "static_resources.listeners[0].transparent", "expected true or false"),
    ("mapping wanted", "admin: [1]", "admin", "expected a mapping"),
    ("null in list", "static_resources: {clusters: [null]}", "static_resources.clusters[0]", "null"),
    ("oneof twice", "static_resources: {listeners: [{name: l, address: {pipe: {path: /x}, socket_address: {address: a}}}]}",
     "static_resources.listeners[0].address.socket_address", "oneof"),
    ("field twice", "static_resources: {clusters: [{name: a, connect_timeout: 1s, connectTimeout: 2s}]}",
     "static_resources.clusters[0].connect_timeout", "given twice"),
    ("missing @type", listener_with("{stat_prefix: x}"),
     "static_resources.listeners[0].filter_chains[0].filters[0].typed_config", 'missing "@type"'),
    ("bad type url", listener_with('{"@type": nourl}'),
     "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.@type", "invalid type URL"),
    ("inside any", listener_with(f'{{"@type": {HCM}, stat_prefix: s, codec_type: HTTP9}}'),
     "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.codec_type", "HTTP9"),
    ("any in any", listener_with(f'{{"@type": {HCM}, http_filters: [{{name: r, typed_config: {{"@type": {ROUTER}, bogus: 1}}}}]}}'),
     "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config.bogus",
     "unknown field in envoy.extensions.filters.http.router.v3.Router"),
    ("map key", "static_resources: {clusters: [{name: a, typed_extension_protocol_options: {k: {x: 1}}}]}",
     'static_resources.clusters[0].typed_extension_protocol_options["k"]', 'missing "@type"'),
    ("map value", 'static_resources: {clusters: [{name: a, metadata: {filter_metadata: {m: 5}}}]}',
     'static_resources.clusters[0].metadata.filter_metadata["m"]', "expected a mapping"),
    ("wkt in any extra", listener_with('{"@type": type.googleapis.com/google.protobuf.StringValue, value: a, b: 1}'),
     "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.b", "unknown field"),
    ("bytes", "node: {metadata: {}}\nstatic_resources: {secrets: [{name: s, generic_secret: {secret: {inline_bytes: '%%%'}}}]}",
     "static_resources.secrets[0].generic_secret.secret.inline_bytes", "base64"),
    ("dup listener", "static_resources: {listeners: [{name: a, address: {pipe: {path: /x}}}, {name: a, address: {pipe: {path: /y}}}]}",
     "static_resources.listeners[1].name", "duplicate listener name 'a'"),
    ("dup cluster", "static_resources: {clusters: [{name: a}, {name: b}, {name: a}]}",
     "static_resources.clusters[2].name", "duplicate cluster name 'a'"),
    ("no address", "static_resources: {listeners: [{name: a}]}",
     "static_resources.listeners[0].address", "address is required"),
    ("no cluster name", "static_resources: {clusters: [{connect_timeout: 1s}]}",
     "static_resources.clusters[0].name", "cluster name is required"),
    ("yaml syntax", "static_resources:\n  listeners: [\n", "", "invalid YAML at line 3, column 1"),
    ("yaml dup key", "admin: {}\nnode: {}\nadmin: {}\n", "", "line 3, column 1: duplicate key 'admin'"),
    ("top list", "- a\n", "", "top level must be a mapping"),
    ("top scalar", "hello\n", "", "top level must be a mapping"),
    ("empty", "# nothing here\n", "", "configuration is empty"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "path", "fragment"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_paths(name: str, text: str, path: str, fragment: str) -> None:
    e = err(text)
    assert e.path == path
    assert fragment in e.message
    assert e.source == "--config-yaml"
    assert str(e).startswith(f"--config-yaml: {path + ': ' if path else ''}")


def test_internal_listener_needs_no_address() -> None:
    b = load_bootstrap(yaml_text="static_resources: {listeners: [{name: i, internal_listener: {}}]}")
    assert b.static_resources.listeners[0].HasField("internal_listener")


def test_error_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "envoy.yaml"
    p.write_text("static_resources:\n  clusters:\n  - name: a\n    lb_policy: ROUND_ROBBIN\n")
    with pytest.raises(ConfigError) as ei:
        load_bootstrap(str(p))
    assert str(ei.value) == (
        f'{p}: static_resources.clusters[0].lb_policy: invalid enum value "ROUND_ROBBIN" (did you mean "ROUND_ROBIN"?)'
    )


def _file_err(path: Any) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_bootstrap(str(path))
    assert ei.value.source == str(path)
    assert ei.value.path == ""
    return ei.value


def test_file_errors(tmp_path: Path) -> None:
    assert "not found" in _file_err(tmp_path / "missing.yaml").message
    assert "directory" in _file_err(tmp_path).message
    for ext in (".pb", ".pb_text"):
        f = tmp_path / f"b{ext}"
        f.write_bytes(b"\x0a\x00")
        assert "not supported" in _file_err(f).message
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert _file_err(empty).message == "configuration is empty"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"node: {id: caf\xe9}\n")
    assert "UTF-8" in _file_err(latin).message
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"a": 1,, }')
    assert "line 1" in _file_err(bad_json).message
    dup_json = tmp_path / "dup.json"
    dup_json.write_text('{"node": {}, "node": {}}')
    assert "duplicate key 'node'" in _file_err(dup_json).message


def test_no_input() -> None:
    with pytest.raises(ConfigError):
        load_bootstrap()


def test_nesting_bound() -> None:
    from envoy.config.rbac.v3 import rbac_pb2

    def nest(levels: int) -> dict[str, Any]:
        d: dict[str, Any] = {"any": True}
        for _ in range(levels):
            d = {"and_rules": {"rules": [d]}}  # two messages per level: Permission, Set
        return d

    assert parse_message(nest(MAX_DEPTH // 2 - 1), rbac_pb2.Permission).HasField("and_rules")
    with pytest.raises(ConfigError) as ei:
        parse_message(nest(MAX_DEPTH // 2 + 1), rbac_pb2.Permission, "p")
    assert "nesting deeper" in ei.value.message
    assert ei.value.path.startswith("p.and_rules.rules[0].and_rules")


def test_bootstrap_sections_parse() -> None:
    b = load_bootstrap(
        yaml_text="""
node: {id: n, cluster: c, metadata: {k: [1, "two"]}, locality: {zone: z}}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: 9901}}, access_log_path: /dev/null}
overload_manager:
  refresh_interval: 0.25s
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: 1000
layered_runtime: {layers: [{name: rt, static_layer: {overload.global_downstream_max_connections: 50000}}]}
stats_config: {stats_tags: [{tag_name: t, regex: "^a(b)"}], use_all_default_tags: false}
dynamic_resources:
  ads_config: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: xds}}]}
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
"""
    )
    assert isinstance(b, bootstrap_pb2.Bootstrap)
    assert b.node.metadata["k"][1] == "two"
    assert b.overload_manager.refresh_interval.nanos == 250_000_000
    rm = unpack_any(b.overload_manager.resource_monitors[0].typed_config, "rm")
    assert rm.max_active_downstream_connections == 1000
    assert b.dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name == "xds"
    assert b.dynamic_resources.lds_config.HasField("ads")
    assert b.stats_config.use_all_default_tags.value is False


# --- leniencies and bounds found by running real Envoy configs ----------------------------------


def test_enum_names_are_case_insensitive() -> None:
    """Envoy's loader parses enum names case-insensitively (protobuf's
    case_insensitive_enum_parsing): ``codec_type: auto``, ``type: strict_dns``."""
    b = load_bootstrap(
        yaml_text="""
static_resources:
  clusters:
  - {name: c, type: strict_dns, lb_policy: round_robin, dns_lookup_family: v4_only}
  - {name: d, type: Static, lb_policy: Least_Request}
"""
    )
    c, d = b.static_resources.clusters
    assert c.type == cluster_pb2.Cluster.STRICT_DNS
    assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert c.dns_lookup_family == cluster_pb2.Cluster.V4_ONLY
    assert d.type == cluster_pb2.Cluster.STATIC and d.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    e = err("static_resources:\n  clusters:\n  - {name: c, lb_policy: round_robbin}\n")
    assert e.path == "static_resources.clusters[0].lb_policy"
    assert "ROUND_ROBIN" in e.message  # the hint names the real value


@pytest.mark.parametrize(
    ("field", "number"),
    [("lb_policy", 999), ("type", -1), ("lb_policy", 4), ("type", 2**32), ("type", 2**40)],
)
def test_undefined_enum_number_is_an_error(field: str, number: int) -> None:
    """proto3 JSON allows a number for an enum: a defined one is taken, an undefined one (4 is a
    gap in LbPolicy) is an error naming the field, not a crash when the name is looked up later."""
    e = err(f"static_resources:\n  clusters:\n  - {{name: c, {field}: {number}}}\n")
    assert e.path == f"static_resources.clusters[0].{field}"
    assert f"invalid enum number {number}" in e.message


def test_defined_enum_number_is_accepted() -> None:
    b = load_bootstrap(yaml_text="static_resources:\n  clusters:\n  - {name: c, type: 1, lb_policy: 3}\n")
    c = b.static_resources.clusters[0]
    assert c.type == cluster_pb2.Cluster.STRICT_DNS and c.lb_policy == cluster_pb2.Cluster.RANDOM


def test_multi_document_yaml_loads_the_first_document() -> None:
    """Envoy (yaml-cpp ``Load``) reads the first document of a stream; the rest is not parsed."""
    b = load_bootstrap(
        yaml_text="static_resources:\n  clusters:\n  - {name: first}\n---\nnot: [a bootstrap\n---\nx: 1\n"
    )
    assert [c.name for c in b.static_resources.clusters] == ["first"]
    assert load_document("---\na: 1\n...\n---\nb: 2\n", "s") == {"a": 1}


def test_empty_typed_config_is_an_empty_any() -> None:
    """``typed_config: {}`` is an empty Any (protobuf's JSON form), so the extension is chosen by
    name with its default config, as Envoy does for ``envoy.filters.http.router``."""
    b = load_bootstrap(yaml_text=listener_with("{}"))
    f = b.static_resources.listeners[0].filter_chains[0].filters[0]
    assert f.HasField("typed_config") and f.typed_config.type_url == "" and f.typed_config.value == b""


def test_deep_json_is_an_error_not_a_recursion_error(tmp_path: Path) -> None:
    """JSON nested 3,000 levels deep used to raise RecursionError out of json.loads."""
    deep = "[" * 3000 + "]" * 3000
    f = tmp_path / "deep.json"
    f.write_text(
        '{"static_resources": {"clusters": [{"name": "c", "metadata": {"filter_metadata": '
        '{"x": {"a": ' + deep + "}}}}]}}"
    )
    with pytest.raises(ConfigError) as ei:
        load_bootstrap(path=str(f))
    assert ei.value.source == str(f) and "nesting deeper than 200" in ei.value.message
    with pytest.raises(ConfigError) as ei:
        load_document('{"a": ' + "[" * 250 + "]" * 250 + "}", "s")  # below json's own limit
    assert "nesting deeper than 200" in ei.value.message


def test_deep_yaml_is_an_error() -> None:
    text = "a:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(250)) + "  " * 251 + "v: 1\n"
    with pytest.raises(ConfigError) as ei:
        load_document(text, "s")
    assert "nesting deeper than 200" in ei.value.message and "line" in ei.value.message


BOMB = """\
static_resources:
  clusters:
  - name: c
    metadata:
      filter_metadata:
        x:
          a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
          b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
          c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
          d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
          e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
          f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
          g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
          h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
"""


def test_yaml_alias_bomb_is_an_error() -> None:
    """Eight levels of nine aliases stand for 43 million nodes; the check sees the hundred
    written ones and refuses before anything is built (it took >15 s and 320 MB)."""
    e = err(BOMB)
    assert e.source == "--config-yaml"
    assert "YAML aliases expand the document" in e.message


def test_recursive_yaml_alias_is_an_error() -> None:
    with pytest.raises(ConfigError) as ei:
        load_document("a: &a [1, *a]\n", "s")
    assert "contains it" in ei.value.message


def test_ordinary_yaml_aliases_still_work() -> None:
    """Anchors reused a few times (a shared endpoint block) stay well inside the bound."""
    text = "common: &ep {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}\n" + "".join(
        f"c{i}: *ep\n" for i in range(500)
    )
    doc = load_document(text, "s")
    assert doc["c499"]["address"]["socket_address"]["port_value"] == 1
