"""Accepted but not implemented: one notice per set field, each with its field path.

The compilers of listeners, clusters, TLS and connection managers announce what they skip inside
what they compile (an unknown listener filter, a TLS option Python's ``ssl`` cannot set). This
module covers the rest: fields of the bootstrap, the admin, listeners, clusters and HTTP
connection managers that no compiler reads. ``check_bootstrap_fields(bootstrap, ctx)`` runs after
everything compiled; it adds a notice for each such field that is set (a message present, a list
not empty, a scalar not at its default) unless a compiler already said something about that field
or one around it. ``--reject-ignored`` turns every notice into an error.

Left out on purpose: ``metadata`` (inert data; it does something only through a filter that reads
it), ``traffic_direction`` and ``inline_headers`` (hints with no behaviour of their own).
``ignore_global_conn_limit`` is read by ``net/listener.py``. When a field below gets implemented,
delete its line here
(``tests/config/test_ignored.py`` checks every line names a real field).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

from moorline.config.context import BuildContext

HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


class When:
    """A reason that applies only when ``applies(value)`` is true (e.g. not the default engine)."""

    __slots__ = ("applies", "reason")

    def __init__(self, reason: str, applies: Callable[[Any], bool]) -> None:
        self.reason = reason
        self.applies = applies


Entry = Union[str, When, "Table"]
Table = Mapping[str, Entry]

_NO_XDS = "xDS-TP (xdstp://) naming and its config sources are not supported; ignored"
_NO_STATS_SINKS = "moorline has no stats sinks (stats are read from the admin /stats endpoints); ignored"
_DNS = "custom DNS resolver options are not supported (the system resolver is used); ignored"
_CLOSES = "an invalid HTTP/1.1 message always closes the connection; ignored"

BOOTSTRAP: Table = {
    "node_context_params": "xDS-TP node context parameters are not supported; ignored",
    "cluster_manager": {
        "local_cluster_name": "zone-aware routing is not implemented; ignored",
        "outlier_detection": {
            "event_service": "outlier events are only written to event_log_path; ignored",
        },
        "upstream_bind_config": "binding upstream connections to a source address is not supported; ignored",
        "load_stats_config": "load reporting (LRS) is not supported; ignored",
        "enable_deferred_cluster_creation": "clusters are always created at load; ignored",
    },
    "hds_config": "the health discovery service (HDS) is not supported; ignored",
    "flags_path": "flag files are not read; ignored",
    "stats_sinks": _NO_STATS_SINKS,
    "deferred_stat_options": "stats are created at load; ignored",
    "stats_config": "stats tags, matchers and histogram buckets are not configurable "
    "(Envoy's default tag extraction is used); ignored",
    "stats_flush_interval": _NO_STATS_SINKS,
    "stats_flush_on_admin": _NO_STATS_SINKS,
    "stats_eviction_interval": "stats are never evicted; ignored",
    "watchdog": "watchdogs are not implemented; ignored",
    "watchdogs": "watchdogs are not implemented; ignored",
    "tracing": "tracing is not supported yet; ignored",
    "layered_runtime": "runtime layers are not supported (only the static key "
    "overload.global_downstream_max_connections is read; every other key keeps its default); ignored",
    "enable_dispatcher_stats": "dispatcher stats are not recorded; ignored",
    "header_prefix": "headers keep the x-envoy- prefix; ignored",
    "stats_server_version_override": "server.version reports moorline's own version; ignored",
    "use_tcp_for_dns_lookups": _DNS,
    "dns_resolution_config": _DNS,
    "typed_dns_resolver_config": _DNS,
    "bootstrap_extensions": "bootstrap extensions are not supported; ignored",
    "fatal_actions": "fatal actions are not supported; ignored",
    "config_sources": _NO_XDS,
    "default_config_source": _NO_XDS,
    "default_socket_interface": "only the default socket interface exists; ignored",
    "certificate_provider_instances": "certificate providers are not supported; ignored",
    "perf_tracing_file_path": "performance tracing is not supported; ignored",
    "default_regex_engine": When(
        "only RE2 syntax is supported (translated for Python's re); ignored",
        lambda v: not v.typed_config.type_url.endswith(".GoogleRE2"),
    ),
    "xds_delegate_extension": "xDS delegate extensions are not supported; ignored",
    "xds_config_tracker_extension": "xDS config trackers are not supported; ignored",
    "listener_manager": "only the built-in listener manager exists; ignored",
    "grpc_async_client_manager_config": "gRPC client settings are not configurable (xDS streams use grpcio defaults); ignored",
    "memory_allocator_manager": "the memory allocator is not configurable; ignored",
}


def _writes_somewhere(logs: Any) -> bool:
    """False when every admin access log is a file logger writing to /dev/null (Istio's default)."""
    from moorline.config.loader import unpack_any

    for i, al in enumerate(logs):
        cfg = (
            unpack_any(al.typed_config, f"admin.access_log[{i}].typed_config")
            if al.HasField("typed_config")
            else None
        )
        if getattr(cfg, "path", None) != "/dev/null":
            return True
    return False


ADMIN: Table = {
    "access_log": When("admin access logs are not written; ignored", _writes_somewhere),
    # Envoy's own examples write the admin log to /dev/null: nothing to announce then.
    "access_log_path": When("admin access logs are not written; ignored", lambda v: v != "/dev/null"),
    "profile_path": "the CPU profiler is not available; ignored",
    "socket_options": "socket options on the admin listener are not applied; ignored",
}

LISTENER: Table = {
    "bypass_overload_manager": "a listener is never exempted from the overload manager; ignored",
    "fcds_config": "filter chain discovery (FCDS) is not supported; ignored",
    "drain_type": "listeners always drain on shutdown and on /drain_listeners; ignored",
    "tcp_fast_open_queue_length": "TCP Fast Open is not enabled; ignored",
    "enable_mptcp": "MPTCP is not supported; ignored",
}

_HTTP1_OPTIONS: Table = {
    "allow_absolute_url": When(
        "absolute-form request targets are always accepted; ignored", lambda v: not v.value
    ),
    "header_key_format": "header names are sent lower-case; ignored",
    "allow_chunked_length": "a request with both Content-Length and chunked is always rejected; ignored",
    "override_stream_error_on_invalid_http_message": When(_CLOSES, lambda v: v.value),
    "send_fully_qualified_url": "requests are sent in origin form; ignored",
    "use_balsa_parser": "moorline's HTTP/1.1 parser is llhttp; ignored",
    "allow_custom_methods": "ignored",
    "ignore_http_11_upgrade": "ignored",
}

# Http2ProtocolOptions fields the HTTP/2 codecs do not implement (allow_connect is left to the
# connection manager's CONNECT support).
_HTTP2_OPTIONS: Table = {
    "allow_metadata": When("METADATA frames are not supported (they are dropped); ignored", lambda v: v),
    "max_metadata_size": "METADATA frames are not supported; ignored",
    "custom_settings_parameters": "custom SETTINGS parameters are not sent; ignored",
    "connection_keepalive": "HTTP/2 PING keepalive is not implemented (idle timeouts still apply); ignored",
    "use_oghttp2_codec": When(
        "the oghttp2 codec is not available (moorline uses libnghttp2 or h2); ignored", lambda v: v.value
    ),
}

CLUSTER: Table = {
    "transport_socket_matcher": "transport socket matchers are not supported; the cluster's transport_socket is used",
    "upstream_http_protocol_options": "auto_sni / auto_san_validation are not supported; ignored",
    "http_protocol_options": _HTTP1_OPTIONS,
    "http2_protocol_options": _HTTP2_OPTIONS,
    "use_tcp_for_dns_lookups": _DNS,
    "dns_resolution_config": _DNS,
    "ring_hash_lb_config": "ring hash load balancing is not supported; ignored",
    "maglev_lb_config": "Maglev load balancing is not supported; ignored",
    "round_robin_lb_config": "slow start and locality options of round robin are not supported; ignored",
    "common_lb_config": {
        "update_merge_window": "host updates are applied at once; ignored",
        "ignore_new_hosts_until_first_hc": "new hosts always wait for their first health check; ignored",
        "close_connections_on_host_set_change": "ignored",
        "consistent_hashing_lb_config": "consistent hashing is not supported; ignored",
        "override_host_status": "host override is not supported; ignored",
    },
    "close_connections_on_host_health_failure": "connections to a host that fails its health "
    "checks are kept until they close; ignored",
    "ignore_health_on_host_removal": "a host that leaves the cluster leaves at once; ignored",
    "lrs_server": "load reporting (LRS) is not supported; ignored",
    "lrs_report_endpoint_metrics": "load reporting (LRS) is not supported; ignored",
    "track_timeout_budgets": "timeout budget stats are not recorded; ignored",
    "track_cluster_stats": "timeout budget and request/response size stats are not recorded; ignored",
    "upstream_config": "custom upstream implementations are not supported; ignored",
    "preconnect_policy": "connections are not opened ahead of requests; ignored",
    "connection_pool_per_downstream_connection": "upstream pools are shared by all downstream connections; ignored",
}

HCM: Table = {
    "add_user_agent": When(
        "x-envoy-downstream-service-cluster/-node are not added; ignored", lambda v: v.value
    ),
    "http1_safe_max_connection_duration": "ignored",
    "http3_protocol_options": "HTTP/3 is not supported; ignored",
    "scheme_header_transformation": "the :scheme header is not transformed; ignored",
    "stream_flush_timeout": "ignored (stream_idle_timeout bounds a stalled flush)",
    "drain_timeout": "the HTTP/2 GOAWAY drain sequence has no separate timeout; ignored",
    "access_log_flush_interval": "access logs are written in batches as requests end; ignored",
    "flush_access_log_on_new_request": "access logs are written when a request ends; ignored",
    "access_log_options": "access logs are written when a request ends; ignored",
    "original_ip_detection_extensions": "only x-forwarded-for is used to find the client address; ignored",
    "early_header_mutation_extensions": "early header mutations are not supported; ignored",
    "internal_address_config": "x-envoy-internal is not set; ignored",
    "via": "no via header is added; ignored",
    "always_set_request_id_in_response": "x-request-id is not added to responses; ignored",
    # SANITIZE (0, the default) strips the header, FORWARD_ONLY / ALWAYS_FORWARD_ONLY pass it on;
    # the two that add this connection's certificate details are not implemented.
    "forward_client_cert_details": When(
        "adding the client certificate to x-forwarded-client-cert is not supported; APPEND_FORWARD "
        "forwards the header as received, SANITIZE_SET strips it",
        lambda v: v in (2, 3),
    ),
    "set_current_client_cert_details": "x-forwarded-client-cert is not handled; ignored",
    "forward_client_cert_matcher": "x-forwarded-client-cert is not handled; ignored",
    "proxy_100_continue": "100-continue is answered by moorline, not proxied; ignored",
    "represent_ipv4_remote_address_as_ipv4_mapped_ipv6": "ignored",
    "normalize_path": When("paths are not normalized; ignored", lambda v: v.value),
    "merge_slashes": "slashes in paths are not merged; ignored",
    # KEEP_UNCHANGED (1) is what moorline does anyway.
    "path_with_escaped_slashes_action": When(
        "escaped slashes in paths are left as they are; ignored", lambda v: v != 1
    ),
    "path_normalization_options": "paths are not normalized; ignored",
    "request_id_extension": "request ids are random UUIDs; ignored",
    "stream_error_on_invalid_http_message": When(
        "applied to HTTP/2 only (one stream is reset); an invalid HTTP/1.1 message still closes "
        "the connection",
        lambda v: v.value,
    ),
    "http2_protocol_options": _HTTP2_OPTIONS,
    "strip_trailing_host_dot": "the trailing dot of the host is kept; ignored",
    "proxy_status_config": "no proxy-status header is added; ignored",
    "typed_header_validation_config": "header validation extensions are not supported; ignored",
    "append_x_forwarded_port": "x-forwarded-port is not added; ignored",
    "append_local_overload": "the x-envoy-local-overloaded header is not added; ignored",
    "add_proxy_protocol_connection_state": "the PROXY protocol is not supported; ignored",
    "http_protocol_options": _HTTP1_OPTIONS,
    "common_http_protocol_options": {
        "max_requests_per_connection": "downstream connections are not closed after a number of requests; ignored",
        "max_response_headers_kb": "ignored",
    },
    "upgrade_configs": {
        "filters": "upgrade-specific filter chains are not supported (the HCM's filters run); ignored",
    },
}


def check_bootstrap_fields(bootstrap: Any, ctx: BuildContext) -> None:
    """Notices for the set fields of ``bootstrap`` that nothing implements, and ``ConfigError`` for
    the ones that cannot be ignored. Run after the listeners and clusters compiled."""
    _announce(bootstrap, BOOTSTRAP, "", ctx)
    if bootstrap.HasField("admin"):
        _announce(bootstrap.admin, ADMIN, "admin", ctx)
    sr = bootstrap.static_resources
    for i, lst in enumerate(sr.listeners):
        lpath = f"static_resources.listeners[{i}]"
        _announce(lst, LISTENER, lpath, ctx)
        chains = [(f"{lpath}.filter_chains[{j}]", fc) for j, fc in enumerate(lst.filter_chains)]
        if lst.HasField("default_filter_chain"):
            chains.append((f"{lpath}.default_filter_chain", lst.default_filter_chain))
        for cpath, fc in chains:
            for k, f in enumerate(fc.filters):
                if f.HasField("typed_config") and f.typed_config.type_url.rsplit("/", 1)[-1] == HCM_TYPE:
                    _check_hcm(f.typed_config, f"{cpath}.filters[{k}].typed_config", ctx)
    for i, c in enumerate(sr.clusters):
        _announce(c, CLUSTER, f"static_resources.clusters[{i}]", ctx)
        _check_upstream_http(c, f"static_resources.clusters[{i}]", ctx)


UPSTREAM_HTTP_TYPE = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _check_upstream_http(cluster: Any, path: str, ctx: BuildContext) -> None:
    """The HTTP/2 options inside the cluster's ``typed_extension_protocol_options`` (an Any the
    tables cannot walk into)."""
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

    anyv = cluster.typed_extension_protocol_options.get(UPSTREAM_HTTP_TYPE)
    if anyv is None:
        return
    opts = http_protocol_options_pb2.HttpProtocolOptions()
    if not anyv.Is(opts.DESCRIPTOR) or not anyv.Unpack(opts):
        return  # the cluster compiler rejected it already
    base = f'{path}.typed_extension_protocol_options["{UPSTREAM_HTTP_TYPE}"]'
    for oneof in ("explicit_http_config", "use_downstream_protocol_config"):
        if opts.HasField(oneof):
            sub = getattr(opts, oneof)
            if sub.HasField("http2_protocol_options"):
                _announce(
                    sub.http2_protocol_options, _HTTP2_OPTIONS, f"{base}.{oneof}.http2_protocol_options", ctx
                )


def _check_hcm(any_msg: Any, path: str, ctx: BuildContext) -> None:
    from moorline.config.loader import unpack_any

    hcm: Any = unpack_any(any_msg, path)
    if getattr(getattr(hcm, "DESCRIPTOR", None), "full_name", None) != HCM_TYPE:
        return
    _announce(hcm, HCM, path, ctx)


def _announce(msg: Any, table: Table, path: str, ctx: BuildContext) -> None:
    for fd, value in msg.ListFields():
        entry = table.get(fd.name)
        if entry is None:
            continue
        fpath = f"{path}.{fd.name}" if path else fd.name
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        is_list = fd.is_repeated and not is_map
        if isinstance(entry, Mapping):
            if is_list:
                for i, item in enumerate(value):
                    _announce(item, entry, f"{fpath}[{i}]", ctx)
            else:
                _announce(value, entry, fpath, ctx)
            continue
        if isinstance(entry, When):
            if not entry.applies(value):
                continue
            reason = entry.reason
        else:
            reason = entry
        if is_list and fd.message_type is not None:
            for i, item in enumerate(value):
                name = getattr(item, "name", "") if "name" in item.DESCRIPTOR.fields_by_name else ""
                _emit(ctx, f"{fpath}[{i}]", f"{name}: {reason}" if name else reason)
        else:
            _emit(ctx, fpath, reason)


def _emit(ctx: BuildContext, path: str, reason: str) -> None:
    if not ctx.has_notice_at(path):
        ctx.notice(reason, path=path)
