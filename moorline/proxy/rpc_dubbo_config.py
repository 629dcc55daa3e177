"""Envoy's ``envoy.filters.network.dubbo_proxy`` config, translated for ``rpc_proxy``.

``compile_envoy_dubbo_proxy(proto, path, notices)`` is a pure function: it takes a parsed
``envoy.extensions.filters.network.dubbo_proxy.v3.DubboProxy`` and returns the ``value`` dict
of the rpc_proxy's TypedStruct schema (``stat_prefix``, ``protocol: dubbo``, ``routes``), so an
Envoy user's Dubbo config runs on moorline unchanged. What is accepted but not honoured is
appended to ``notices`` as ``"<field.path>: <why>; ignored"`` (the caller hands them to
``ctx.notice``); what cannot be honoured without routing requests elsewhere than Envoy would
raises ``ConfigError(field_path, message)``.

Envoy's model: route configurations in order, each for an ``interface`` (``*`` or empty: any),
optionally a ``group`` (the request's ``group`` attachment) and a ``version`` (the body's
service version); inside one, routes in order, each matching the method name (a
``StringMatcher``) and headers (``HeaderMatcher`` on the attachments). The first route of the
first matching configuration wins, which is what one flat rpc_proxy route list in the same
order gives: each route carries its configuration's interface as the service matcher and the
group and version as exact header matchers.

String and header matchers become the rpc_proxy's ``exact`` / ``prefix`` / ``regex`` /
``present``; ``suffix``, ``contains`` and ``ignore_case`` become an equivalent regex (rpc_proxy
regexes match the whole value, as Envoy's ``safe_regex`` does). Refused: ``drds`` (route
discovery), ``params_match`` (argument values are never decoded), header ``range_match``,
``invert_match``, ``treat_missing_header_as_empty`` and a weighted cluster's
``cluster_header``: ignoring any of them would send requests to another cluster than Envoy.
Noticed: ``metadata_match`` (subset load balancing), ``dubbo_filters`` other than the router,
weighted clusters' ``total_weight`` / ``runtime_key_prefix`` / ``header_name`` / ``use_hash_policy`` and
per-cluster extras.
"""

from __future__ import annotations

import re
from typing import Any

from moorline.config.errors import ConfigError

ROUTER_FILTER = "envoy.filters.dubbo.router"

_CLUSTER_WEIGHT_EXTRAS = (
    "metadata_match",
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
    "typed_per_filter_config",
    "host_rewrite_literal",
)


def _has(msg: Any, name: str) -> bool:
    """A field set in ``msg`` (messages: present; scalars: not the default; lists: non-empty)."""
    return any(fd.name == name for fd, _ in msg.ListFields())


def _string_matcher(m: Any, path: str) -> dict[str, Any]:
    """An ``envoy.type.matcher.v3.StringMatcher`` as the rpc_proxy's matcher shape."""
    kind = m.WhichOneof("match_pattern")
    if kind is None:
        raise ConfigError(path, "a string matcher needs one of exact, prefix, suffix, safe_regex, contains")
    if kind == "safe_regex":
        rx = m.safe_regex.regex
        return {"regex": f"(?i:{rx})" if m.ignore_case else rx}
    if kind not in ("exact", "prefix", "suffix", "contains"):
        raise ConfigError(f"{path}.{kind}", "not supported by rpc_proxy")
    value = getattr(m, kind)
    if kind in ("exact", "prefix") and not m.ignore_case:
        return {kind: value}
    esc = re.escape(value)
    rx = {"exact": esc, "prefix": f"{esc}.*", "suffix": f".*{esc}", "contains": f".*{esc}.*"}[kind]
    return {"regex": f"(?is:{rx})" if m.ignore_case else f"(?s:{rx})"}


def _header_matcher(h: Any, path: str) -> dict[str, Any]:
    for refused in ("range_match", "invert_match", "treat_missing_header_as_empty"):
        if _has(h, refused):
            raise ConfigError(
                f"{path}.{refused}", "not supported by rpc_proxy (it would change which route matches)"
            )
    out: dict[str, Any] = {"name": h.name}
    kind = h.WhichOneof("header_match_specifier")
    if kind is None:
        out["present"] = True  # Envoy: no value given, the header must be present
    elif kind == "present_match":
        if not h.present_match:
            raise ConfigError(f"{path}.present_match", "false (absence) is not supported by rpc_proxy")
        out["present"] = True
    elif kind == "exact_match":
        out["exact"] = h.exact_match
    elif kind == "prefix_match":
        out["prefix"] = h.prefix_match
    elif kind == "safe_regex_match":
        out["regex"] = h.safe_regex_match.regex
    elif kind == "suffix_match":
        out["regex"] = f"(?s:.*{re.escape(h.suffix_match)})"
    elif kind == "contains_match":
        out["regex"] = f"(?s:.*{re.escape(h.contains_match)}.*)"
    elif kind == "string_match":
        out.update(_string_matcher(h.string_match, f"{path}.string_match"))
    else:
        raise ConfigError(f"{path}.{kind}", "not supported by rpc_proxy")
    return out


def _action(a: Any, path: str, notices: list[str]) -> dict[str, Any]:
    if _has(a, "metadata_match"):
        notices.append(f"{path}.metadata_match: subset load balancing is not supported by rpc_proxy; ignored")
    kind = a.WhichOneof("cluster_specifier")
    if kind == "cluster":
        if not a.cluster:
            raise ConfigError(f"{path}.cluster", "must not be empty")
        return {"cluster": a.cluster}
    if kind == "weighted_clusters":
        wc = a.weighted_clusters
        wpath = f"{path}.weighted_clusters"
        for extra in ("runtime_key_prefix", "header_name", "use_hash_policy", "total_weight"):
            if _has(wc, extra):
                notices.append(f"{wpath}.{extra}: not supported by rpc_proxy; ignored")
        clusters = []
        for i, c in enumerate(wc.clusters):
            cpath = f"{wpath}.clusters[{i}]"
            if _has(c, "cluster_header"):
                raise ConfigError(f"{cpath}.cluster_header", "not supported by rpc_proxy")
            if not c.name:
                raise ConfigError(f"{cpath}.name", "must not be empty")
            for extra in _CLUSTER_WEIGHT_EXTRAS:
                if _has(c, extra):
                    notices.append(f"{cpath}.{extra}: not supported by rpc_proxy; ignored")
            weight = c.weight.value if c.HasField("weight") else 0
            clusters.append({"name": c.name, "weight": weight})
        if not clusters:
            raise ConfigError(f"{wpath}.clusters", "at least one cluster is needed")
        if not any(c["weight"] for c in clusters):
            raise ConfigError(f"{wpath}.clusters", "the weights sum to zero")
        # A 0 weight gets no traffic in Envoy; rpc_proxy's weights are at least 1.
        return {"weighted_clusters": {"clusters": [c for c in clusters if c["weight"]]}}
    raise ConfigError(path, "a route action needs cluster or weighted_clusters")


def _route_configs(proto: Any, path: str) -> list[tuple[Any, str]]:
    spec = proto.WhichOneof("route_specifier")
    if spec == "drds":
        raise ConfigError(f"{path}.drds", "route discovery for dubbo_proxy is not supported")
    out = [(rc, f"{path}.route_config[{i}]") for i, rc in enumerate(proto.route_config)]
    if spec == "multiple_route_config":
        mpath = f"{path}.multiple_route_config.route_config"
        out += [(rc, f"{mpath}[{i}]") for i, rc in enumerate(proto.multiple_route_config.route_config)]
    return out


def compile_envoy_dubbo_proxy(proto: Any, path: str, notices: list[str] | None = None) -> dict[str, Any]:
    """The rpc_proxy ``value`` dict for a ``DubboProxy`` proto found at ``path``."""
    if notices is None:
        notices = []
    if not proto.stat_prefix:
        raise ConfigError(f"{path}.stat_prefix", "must not be empty")
    for i, f in enumerate(proto.dubbo_filters):
        if f.name != ROUTER_FILTER:
            notices.append(
                f"{path}.dubbo_filters[{i}]: dubbo filter {f.name!r} is not supported by rpc_proxy; ignored"
            )
    routes: list[dict[str, Any]] = []
    for rc, rpath in _route_configs(proto, path):
        base: dict[str, Any] = {}
        if rc.interface and rc.interface != "*":
            base["service"] = {"exact": rc.interface}
        pinned = []
        if rc.group:
            pinned.append({"name": "group", "exact": rc.group})
        if rc.version:
            pinned.append({"name": "version", "exact": rc.version})
        for j, r in enumerate(rc.routes):
            p = f"{rpath}.routes[{j}]"
            match: dict[str, Any] = dict(base)
            if r.match.HasField("method"):
                mm = r.match.method
                if len(mm.params_match):
                    raise ConfigError(
                        f"{p}.match.method.params_match", "argument matching is not supported by rpc_proxy"
                    )
                if mm.HasField("name"):
                    match["method"] = _string_matcher(mm.name, f"{p}.match.method.name")
            headers = list(pinned)
            headers += [_header_matcher(h, f"{p}.match.headers[{k}]") for k, h in enumerate(r.match.headers)]
            if headers:
                match["headers"] = headers
            if not r.HasField("route"):
                raise ConfigError(f"{p}.route", "a route needs an action")
            routes.append({"match": match, "route": _action(r.route, f"{p}.route", notices)})
    return {"stat_prefix": proto.stat_prefix, "protocol": "dubbo", "routes": routes}
