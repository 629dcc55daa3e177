"""Envoy's dubbo_proxy config (parsed from YAML as the loader parses it) translated into the
rpc_proxy route schema: interfaces, groups, versions, method and header matchers, clusters and
weighted clusters, notices for what is ignored, errors for what would misroute."""

from __future__ import annotations

import re

import pytest
import yaml
from envoy.extensions.filters.network.dubbo_proxy.v3 import dubbo_proxy_pb2

from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.proxy.rpc_dubbo_config import compile_envoy_dubbo_proxy

PATH = "filters[0].typed_config"


def compile_yaml(text: str) -> tuple[dict, list[str]]:
    proto = parse_message(yaml.safe_load(text), dubbo_proxy_pb2.DubboProxy, PATH)
    notices: list[str] = []
    return compile_envoy_dubbo_proxy(proto, PATH, notices), notices


def test_envoy_docs_style_config() -> None:
    value, notices = compile_yaml(
        """
stat_prefix: dubbo_incomming_stats
protocol_type: Dubbo
serialization_type: Hessian2
route_config:
- name: local_route
  interface: org.apache.dubbo.demo.DemoService
  routes:
  - match:
      method:
        name:
          exact: sayHello
    route:
      cluster: user_service_dubbo_server
  - match:
      method:
        name:
          prefix: get
      headers:
      - name: tenant
        exact_match: a
    route:
      weighted_clusters:
        clusters:
        - {name: a, weight: 1}
        - {name: b, weight: 3}
- interface: "*"
  group: blue
  version: 1.0.0
  routes:
  - match: {}
    route: {cluster: fallback}
dubbo_filters:
- name: envoy.filters.dubbo.router
"""
    )
    assert notices == []
    assert value == {
        "stat_prefix": "dubbo_incomming_stats",
        "protocol": "dubbo",
        "routes": [
            {
                "match": {
                    "service": {"exact": "org.apache.dubbo.demo.DemoService"},
                    "method": {"exact": "sayHello"},
                },
                "route": {"cluster": "user_service_dubbo_server"},
            },
            {
                "match": {
                    "service": {"exact": "org.apache.dubbo.demo.DemoService"},
                    "method": {"prefix": "get"},
                    "headers": [{"name": "tenant", "exact": "a"}],
                },
                "route": {
                    "weighted_clusters": {
                        "clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]
                    }
                },
            },
            {
                "match": {
                    "headers": [{"name": "group", "exact": "blue"}, {"name": "version", "exact": "1.0.0"}]
                },
                "route": {"cluster": "fallback"},
            },
        ],
    }


def test_multiple_route_config_and_matcher_translations() -> None:
    value, _ = compile_yaml(
        """
stat_prefix: s
multiple_route_config:
  name: all
  route_config:
  - interface: a.B
    routes:
    - match:
        method: {name: {suffix: "Async"}}
        headers:
        - {name: x, present_match: true}
        - {name: y}
        - {name: z, prefix_match: "p-"}
        - {name: w, safe_regex_match: {regex: "v[0-9]+"}}
        - {name: c, contains_match: "mid"}
        - {name: s, suffix_match: ".end"}
        - {name: i, string_match: {exact: "MiXeD", ignore_case: true}}
      route: {cluster: c1}
    - match:
        method: {name: {safe_regex: {regex: "get.*"}, ignore_case: true}}
      route: {cluster: c2}
"""
    )
    r0, r1 = value["routes"]
    assert r0["match"]["service"] == {"exact": "a.B"}
    method_rx = r0["match"]["method"]["regex"]
    assert re.fullmatch(method_rx, "fetchAsync") and not re.fullmatch(method_rx, "fetchAsyncX")
    h = {m["name"]: m for m in r0["match"]["headers"]}
    assert h["x"] == {"name": "x", "present": True}
    assert h["y"] == {"name": "y", "present": True}
    assert h["z"] == {"name": "z", "prefix": "p-"}
    assert h["w"] == {"name": "w", "regex": "v[0-9]+"}
    assert re.fullmatch(h["c"]["regex"], "a mid b") and not re.fullmatch(h["c"]["regex"], "mi d")
    assert re.fullmatch(h["s"]["regex"], "x.end") and not re.fullmatch(h["s"]["regex"], "xxend")
    assert re.fullmatch(h["i"]["regex"], "mixed") and not re.fullmatch(h["i"]["regex"], "mixed!")
    rx = r1["match"]["method"]["regex"]
    assert re.fullmatch(rx, "GETUser") and not re.fullmatch(rx, "setUser")
    assert r1["route"] == {"cluster": "c2"}


def test_notices_for_what_is_ignored() -> None:
    _, notices = compile_yaml(
        """
stat_prefix: s
route_config:
- interface: a.B
  routes:
  - match: {method: {name: {exact: m}}}
    route:
      metadata_match: {filter_metadata: {envoy.lb: {v: "1"}}}
      weighted_clusters:
        runtime_key_prefix: rt
        clusters:
        - {name: a, weight: 1, request_headers_to_add: [{header: {key: k, value: v}}]}
dubbo_filters:
- name: envoy.filters.dubbo.router
- name: envoy.filters.dubbo.testFilter
"""
    )
    p = f"{PATH}.route_config[0].routes[0].route"
    assert notices == [
        f"{PATH}.dubbo_filters[1]: dubbo filter 'envoy.filters.dubbo.testFilter' is not supported by rpc_proxy; ignored",
        f"{p}.metadata_match: subset load balancing is not supported by rpc_proxy; ignored",
        f"{p}.weighted_clusters.runtime_key_prefix: not supported by rpc_proxy; ignored",
        f"{p}.weighted_clusters.clusters[0].request_headers_to_add: not supported by rpc_proxy; ignored",
    ]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("stat_prefix: ''\n", "stat_prefix"),
        ("stat_prefix: s\ndrds: {route_config_name: r}\n", "drds"),
        (
            "stat_prefix: s\nroute_config: [{routes: [{match: {method: {name: {exact: m}, params_match: {0: {exact_match: x}}}}, route: {cluster: c}}]}]\n",
            "route_config[0].routes[0].match.method.params_match",
        ),
        (
            "stat_prefix: s\nroute_config: [{routes: [{match: {headers: [{name: h, exact_match: x, invert_match: true}]}, route: {cluster: c}}]}]\n",
            "route_config[0].routes[0].match.headers[0].invert_match",
        ),
        (
            "stat_prefix: s\nroute_config: [{routes: [{match: {headers: [{name: h, range_match: {start: 1, end: 5}}]}, route: {cluster: c}}]}]\n",
            "route_config[0].routes[0].match.headers[0].range_match",
        ),
        (
            "stat_prefix: s\nroute_config: [{routes: [{match: {headers: [{name: h, present_match: false}]}, route: {cluster: c}}]}]\n",
            "route_config[0].routes[0].match.headers[0].present_match",
        ),
        ("stat_prefix: s\nroute_config: [{routes: [{match: {}}]}]\n", "route_config[0].routes[0].route"),
        (
            "stat_prefix: s\nroute_config: [{routes: [{match: {}, route: {}}]}]\n",
            "route_config[0].routes[0].route",
        ),
        (
            "stat_prefix: s\nroute_config: [{routes: [{match: {}, route: {weighted_clusters: {clusters: [{name: a, weight: 0}]}}}]}]\n",
            "route_config[0].routes[0].route.weighted_clusters.clusters",
        ),
        (
            "stat_prefix: s\nroute_config: [{routes: [{match: {}, route: {weighted_clusters: {clusters: [{cluster_header: x, weight: 1}]}}}]}]\n",
            "route_config[0].routes[0].route.weighted_clusters.clusters[0].cluster_header",
        ),
        (
            "stat_prefix: s\nroute_config: [{routes: [{match: {method: {name: {ignore_case: true}}}, route: {cluster: c}}]}]\n",
            "route_config[0].routes[0].match.method.name",
        ),
    ],
)
def test_refused(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        compile_yaml(text)
    assert e.value.path == f"{PATH}.{field}"


def test_no_routes_gives_an_empty_route_list() -> None:
    value, notices = compile_yaml("stat_prefix: s\n")
    assert value == {"stat_prefix": "s", "protocol": "dubbo", "routes": []} and notices == []


def test_zero_weight_cluster_is_left_out_and_the_proxy_compiles() -> None:
    """Envoy takes a 0 weight (that cluster gets no traffic); rpc_proxy's schema wants >= 1."""
    from moorline.config.context import BuildContext
    from moorline.observability.stats import Store
    from moorline.proxy.rpc_proxy import RpcProxy

    value, _ = compile_yaml(
        "stat_prefix: s\nroute_config: [{routes: [{match: {}, route: {weighted_clusters: "
        "{clusters: [{name: a, weight: 0}, {name: b, weight: 2}]}}}]}]\n"
    )
    assert value["routes"][0]["route"] == {"weighted_clusters": {"clusters": [{"name": "b", "weight": 2}]}}
    proxy = RpcProxy(value, BuildContext(stats=Store()), PATH)
    assert proxy.routes[0].names == ["b"]
