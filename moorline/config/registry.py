"""Extension registry: Envoy extension name / type URL -> factory.

Extensions register themselves at import time; ``moorline.extensions`` (beside
the entry point, at the top of the layers) imports every built-in module. This
module never imports upward and the core never imports a filter by name.

Categories: ``network`` (network filters), ``http`` (HTTP filters),
``listener`` (listener filters), ``access_logger``, ``compressor_library`` (the
compressor filter's compression libraries).

A factory is called as ``factory(config, ctx, path)`` where ``config`` is the
unpacked proto message (or ``OpaqueAny`` for types xds-protos does not know,
or ``None`` when the filter has no typed_config), ``ctx`` a
``moorline.config.context.BuildContext`` and ``path`` the field path used
in errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moorline.config.errors import ConfigError

Factory = Callable[[Any, Any, str], Any]


@dataclass(frozen=True, slots=True)
class Extension:
    category: str
    names: tuple[str, ...]
    type_urls: tuple[str, ...]
    factory: Factory
    # HTTP filters: ``per_route(msg, path)`` compiles a ``typed_per_filter_config`` entry of one
    # of ``per_route_types`` once, when the route table is compiled.
    per_route: Callable[[Any, str], Any] | None = None
    per_route_types: tuple[str, ...] = ()
    # ``per_route_merge(less_specific, more_specific)``: when set, the compiled configs of every
    # level (route configuration, virtual host, route) are folded with it, so a field the route
    # leaves unset comes from its virtual host (Envoy's CORS policy); otherwise the most specific
    # level's config is used whole.
    per_route_merge: Callable[[Any, Any], Any] | None = None
    # HTTP filters: the connection manager calls ``factory(config, ctx, path, stat_prefix=...)``
    # with its stats namespace (``"http.<stat_prefix>."``), as Envoy hands filters theirs.
    wants_stat_prefix: bool = False


_by_name: dict[tuple[str, str], Extension] = {}
_by_type: dict[tuple[str, str], Extension] = {}

# Extension types that only matter to Envoy or Istio's telemetry: accepted as
# no-ops with a notice, never silently dropped. Keyed by type URL suffix or name.
NOOP_EXTENSIONS: dict[str, str] = {
    "istio.alpn": "Istio ALPN override filter (moorline negotiates ALPN itself)",
    "istio.metadata_exchange": "Istio metadata exchange (telemetry only)",
    "istio.stats": "Istio stats plugin (moorline keeps Envoy-named stats)",
    "envoy.filters.http.wasm": "WebAssembly filter (not supported yet; skipped)",
    "envoy.filters.network.wasm": "WebAssembly filter (not supported yet; skipped)",
    "stats.PluginConfig": "Istio stats plugin config",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig": "Istio ALPN filter config",
    "envoy.tcp.metadataexchange.config.MetadataExchange": "Istio TCP metadata exchange",
    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig": "gRPC stats filter (stats only)",
    # Istio's own filters (in a TypedStruct, so known by name as well as by inner type):
    # peer metadata and identity for Istio's telemetry and waypoint (ambient) modes.
    "istio_authn": "Istio peer authentication metadata (ambient/waypoint; telemetry and filter state only)",
    "io.istio.network.authn.Config": "Istio peer authentication metadata (ambient/waypoint)",
    "set_dst_address": "Istio internal destination address (internal listeners, not served)",
    "istio.set_internal_dst_address.v1.Config": "Istio internal destination address",
    "connect_authority": "Istio CONNECT authority for HBONE tunnels (not supported)",
    "io.istio.http.connect_authority.Config": "Istio CONNECT authority for HBONE tunnels",
    "connect_baggage": "Istio baggage on HBONE tunnels (telemetry only)",
    "io.istio.http.connect_baggage.Config": "Istio baggage on HBONE tunnels (telemetry only)",
    "waypoint_upstream_peer_metadata": "Istio peer metadata (telemetry only)",
    "waypoint_downstream_peer_metadata": "Istio peer metadata (telemetry only)",
    "io.istio.http.peer_metadata.Config": "Istio peer metadata (telemetry only)",
    "envoy.extensions.filters.network.set_filter_state.v3.Config": (
        "set_filter_state: filter state is not kept (nothing in moorline reads these keys)"
    ),
    "envoy.extensions.filters.http.set_filter_state.v3.Config": (
        "set_filter_state: filter state is not kept (nothing in moorline reads these keys)"
    ),
}


def register(
    category: str,
    names: list[str] | tuple[str, ...],
    type_urls: list[str] | tuple[str, ...],
    factory: Factory,
    per_route: Callable[[Any, str], Any] | None = None,
    per_route_types: list[str] | tuple[str, ...] = (),
    per_route_merge: Callable[[Any, Any], Any] | None = None,
    wants_stat_prefix: bool = False,
) -> None:
    ext = Extension(
        category,
        tuple(names),
        tuple(_type_name(t) for t in type_urls),
        factory,
        per_route,
        tuple(_type_name(t) for t in per_route_types),
        per_route_merge,
        wants_stat_prefix,
    )
    for n in ext.names:
        _by_name[(category, n)] = ext
    for t in ext.type_urls:
        _by_type[(category, t)] = ext
    for t in ext.per_route_types:
        _by_type[("http_per_route", t)] = ext


def lookup_per_route(type_url: str) -> Extension | None:
    """The HTTP filter whose per-route config has this type."""
    return _by_type.get(("http_per_route", _type_name(type_url)))


def _type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def lookup(category: str, name: str, type_url: str | None) -> Extension | None:
    """Find an extension: the type URL wins (as in Envoy), then the name."""
    if type_url:
        ext = _by_type.get((category, _type_name(type_url)))
        if ext is not None:
            return ext
    return _by_name.get((category, name))


def noop_reason(name: str, type_url: str | None) -> str | None:
    if type_url:
        r = NOOP_EXTENSIONS.get(_type_name(type_url))
        if r is not None:
            return r
    return NOOP_EXTENSIONS.get(name)


def require(category: str, name: str, type_url: str | None, path: str) -> Extension:
    ext = lookup(category, name, type_url)
    if ext is None:
        what = f"type {_type_name(type_url)!r}" if type_url else f"name {name!r}"
        raise ConfigError(path, f"unknown or unsupported {category} extension ({what})")
    return ext
