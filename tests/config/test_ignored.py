"""Fields moorline accepts but does not implement are announced, each with its field path; the
ones that cannot be ignored (CONNECT termination) are errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

from moorline.config import ignored
from moorline.config.loader import load_bootstrap
from moorline.server import Server
from moorline.testing import procs

HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


def _tables() -> list[tuple[str, Any, Mapping[str, Any]]]:
    return [
        ("BOOTSTRAP", bootstrap_pb2.Bootstrap.DESCRIPTOR, ignored.BOOTSTRAP),
        ("ADMIN", bootstrap_pb2.Admin.DESCRIPTOR, ignored.ADMIN),
        ("LISTENER", listener_pb2.Listener.DESCRIPTOR, ignored.LISTENER),
        ("CLUSTER", cluster_pb2.Cluster.DESCRIPTOR, ignored.CLUSTER),
        ("HCM", http_connection_manager_pb2.HttpConnectionManager.DESCRIPTOR, ignored.HCM),
    ]


@pytest.mark.parametrize(("name", "desc", "table"), _tables(), ids=[t[0] for t in _tables()])
def test_every_entry_names_a_real_field(name: str, desc: Any, table: Mapping[str, Any]) -> None:
    def walk(d: Any, t: Mapping[str, Any], where: str) -> None:
        for field, entry in t.items():
            fd = d.fields_by_name.get(field)
            assert fd is not None, f"{where}.{field} is not a field of {d.full_name}"
            if isinstance(entry, Mapping):
                assert fd.message_type is not None, f"{where}.{field} has no sub-fields"
                walk(fd.message_type, entry, f"{where}.{field}")

    walk(desc, table, name)


def _server(doc: dict[str, Any]) -> Server:
    return Server(load_bootstrap(yaml_text=yaml.safe_dump(doc, sort_keys=False)), "test.yaml")


def _base(hcm_extra: dict[str, Any] | None = None, **cluster_extra: Any) -> dict[str, Any]:
    lst = procs.hcm_listener(
        "l", procs.free_port(), [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}], hcm_extra=hcm_extra
    )
    return {"static_resources": {"listeners": [lst], "clusters": [procs.cluster("c", [1], **cluster_extra)]}}


def test_implemented_fields_give_no_notice() -> None:
    """A config using only what moorline implements validates without a single notice: the
    tables must not bury real features."""
    doc = _base(
        {
            "stream_idle_timeout": "30s",
            "use_remote_address": True,
            "common_http_protocol_options": {"idle_timeout": "60s", "max_headers_count": 50},
            "http_protocol_options": {"accept_http_10": True},
            "normalize_path": False,  # what moorline does anyway
            "upgrade_configs": [{"upgrade_type": "websocket"}],
        },
        circuit_breakers={"thresholds": [{"max_connections": 10}]},
        common_lb_config={"healthy_panic_threshold": {"value": 40}},
    )
    doc["admin"] = {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "access_log_path": "/dev/null",
        "access_log": procs.file_access_log("/dev/null"),  # Istio's default: nothing is lost
    }
    doc["node"] = {"id": "n", "cluster": "c"}
    assert _server(doc).ctx.notices == []


IGNORED_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("stats_sinks", {"stats_sinks": [{"name": "envoy.stat_sinks.statsd"}]}, "stats_sinks[0]"),
    (
        "layered_runtime",
        {"layered_runtime": {"layers": [{"name": "s", "static_layer": {}}]}},
        "layered_runtime",
    ),
    (
        "bootstrap_extensions",
        {"bootstrap_extensions": [{"name": "envoy.bootstrap.wasm", "typed_config": {}}]},
        "bootstrap_extensions[0]",
    ),
    (
        "overload loadshed points",
        {"overload_manager": {"loadshed_points": [{"name": "envoy.load_shed_points.tcp_listener_accept"}]}},
        "overload_manager.loadshed_points",
    ),
    ("stats_config", {"stats_config": {"use_all_default_tags": False}}, "stats_config"),
    (
        "cluster_manager",
        {"cluster_manager": {"local_cluster_name": "c"}},
        "cluster_manager.local_cluster_name",
    ),
    ("watchdogs", {"watchdogs": {"worker_watchdog": {"miss_timeout": "1s"}}}, "watchdogs"),
    ("hds_config", {"hds_config": {"api_type": "GRPC"}}, "hds_config"),
    ("tracing (bootstrap)", {"tracing": {"http": {"name": "envoy.tracers.zipkin"}}}, "tracing"),
    ("header_prefix", {"header_prefix": "x-acme-"}, "header_prefix"),
    (
        "admin.access_log",
        {
            "admin": {
                "access_log": procs.file_access_log("/tmp/admin.log"),
                "address": {"pipe": {"path": "/tmp/x"}},
            }
        },
        "admin.access_log[0]",
    ),
    (
        "admin.profile_path",
        {"admin": {"profile_path": "/tmp/prof", "address": {"pipe": {"path": "/tmp/x"}}}},
        "admin.profile_path",
    ),
]


@pytest.mark.parametrize(("case", "top", "path"), IGNORED_CASES, ids=[c[0] for c in IGNORED_CASES])
def test_ignored_bootstrap_field_is_announced(case: str, top: dict[str, Any], path: str) -> None:
    doc = _base()
    doc.update(top)
    notices = _server(doc).ctx.notices
    assert [n.path for n in notices] == [path], notices
    assert "ignored" in notices[0].message


@pytest.mark.parametrize(
    ("hcm_extra", "field"),
    [
        ({"via": "moorline"}, "via"),
        ({"normalize_path": True}, "normalize_path"),
        ({"forward_client_cert_details": "APPEND_FORWARD"}, "forward_client_cert_details"),
        (
            {"http_protocol_options": {"header_key_format": {"proper_case_words": {}}}},
            "http_protocol_options.header_key_format",
        ),
        (
            {"upgrade_configs": [{"upgrade_type": "websocket", "filters": [{"name": "x"}]}]},
            "upgrade_configs[0].filters[0]",
        ),
    ],
)
def test_ignored_hcm_field_is_announced(hcm_extra: dict[str, Any], field: str) -> None:
    notices = _server(_base(hcm_extra)).ctx.notices
    assert [n.path for n in notices] == [f"{HCM_PATH}.{field}"]


def test_ignored_listener_and_cluster_fields_are_announced() -> None:
    doc = _base(track_cluster_stats={"timeout_budgets": True}, preconnect_policy={})
    doc["static_resources"]["listeners"][0]["enable_mptcp"] = True
    paths = [n.path for n in _server(doc).ctx.notices]
    assert paths == [
        "static_resources.listeners[0].enable_mptcp",
        "static_resources.clusters[0].track_cluster_stats",
        "static_resources.clusters[0].preconnect_policy",
    ]


def test_a_compiler_notice_is_not_repeated() -> None:
    """The HCM compiler announces tracing itself; the generic table does not add a second line.
    Cluster notices carry the full path now (they read ``cluster c: ...`` before)."""
    check = {
        "timeout": "1s",
        "interval": "1s",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "event_log_path": "/dev/null",
        "tcp_health_check": {},
    }
    doc = _base({"tracing": {}}, health_checks=[check])
    notices = _server(doc).ctx.notices
    assert [n.path for n in notices] == [
        f"{HCM_PATH}.tracing",
        "static_resources.clusters[0].health_checks[0].event_log_path",
    ]


def test_connect_config_is_compiled_not_announced() -> None:
    """CONNECT termination (connect_config) is implemented: no notice, no error."""
    doc = _base()
    vh = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    vh["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
        {
            "match": {"connect_matcher": {}},
            "route": {"cluster": "c", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
        },
    ]
    notices = _server(doc).ctx.notices
    assert not [n for n in notices if "connect_config" in n.path]


H2_UNIMPLEMENTED = {
    "allow_metadata": True,
    "max_metadata_size": 1024,
    "custom_settings_parameters": [{"identifier": 0x99, "value": 1}],
    "connection_keepalive": {"interval": "10s", "timeout": "5s"},
    "use_oghttp2_codec": True,
}
# What moorline implements: no notice for these.
H2_IMPLEMENTED = {
    "hpack_table_size": 4096,
    "max_concurrent_streams": 50,
    "initial_stream_window_size": 65535,
    "initial_connection_window_size": 1048576,
    "max_outbound_frames": 5000,
    "max_outbound_control_frames": 500,
    "max_consecutive_inbound_frames_with_empty_payload": 2,
    "max_inbound_priority_frames_per_stream": 50,
    "max_inbound_window_update_frames_per_data_frame_sent": 5,
    "override_stream_error_on_invalid_http_message": True,
}
# A list is announced per item.
H2_FIELDS = sorted(f + "[0]" if isinstance(v, list) else f for f, v in H2_UNIMPLEMENTED.items())


def test_unimplemented_http2_options_are_announced_on_the_hcm() -> None:
    notices = _server(_base({"http2_protocol_options": {**H2_UNIMPLEMENTED, **H2_IMPLEMENTED}})).ctx.notices
    assert sorted(n.path for n in notices) == [f"{HCM_PATH}.http2_protocol_options.{f}" for f in H2_FIELDS]


def test_unimplemented_http2_options_are_announced_on_clusters() -> None:
    legacy = _server(_base(http2_protocol_options={**H2_UNIMPLEMENTED, **H2_IMPLEMENTED})).ctx.notices
    assert sorted(n.path for n in legacy) == [
        f"static_resources.clusters[0].http2_protocol_options.{f}" for f in H2_FIELDS
    ]
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    for oneof in ("explicit_http_config", "use_downstream_protocol_config"):
        typed = {
            key: {
                "@type": f"type.googleapis.com/{key}",
                oneof: {"http2_protocol_options": {**H2_UNIMPLEMENTED, **H2_IMPLEMENTED}},
            }
        }
        notices = _server(_base(typed_extension_protocol_options=typed)).ctx.notices
        base = f'static_resources.clusters[0].typed_extension_protocol_options["{key}"].{oneof}'
        assert sorted(n.path for n in notices) == [f"{base}.http2_protocol_options.{f}" for f in H2_FIELDS]


def test_http2_options_at_their_defaults_give_no_notice() -> None:
    off = {"allow_metadata": False, "use_oghttp2_codec": False}
    assert _server(_base({"http2_protocol_options": off}, http2_protocol_options=off)).ctx.notices == []


def test_hcm_stream_error_says_it_applies_to_http2_only() -> None:
    notices = _server(_base({"stream_error_on_invalid_http_message": True})).ctx.notices
    assert [n.path for n in notices] == [f"{HCM_PATH}.stream_error_on_invalid_http_message"]
    assert "HTTP/2" in notices[0].message
