"""Route-config providers: the HCM's current route table as a swappable snapshot, and the HCM's
timer period following the routes' timeouts."""

from __future__ import annotations

import gc
from typing import Any

from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf.json_format import ParseDict

from moorline.config.context import BuildContext
from moorline.extensions import register_builtin
from moorline.observability.stats import Store
from moorline.protocol.headers import HeaderMap
from moorline.proxy.hcm import HcmConfig
from moorline.proxy.route_provider import RouteConfigProvider
from moorline.proxy.route_table import RouteTable


def rc(answer: str, timeout: str = "15s", name: str = "r") -> Any:
    return ParseDict(
        {
            "name": name,
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/up"}, "route": {"cluster": "c", "timeout": timeout}},
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": answer}},
                        },
                    ],
                }
            ],
        },
        route_pb2.RouteConfiguration(),
    )


def table(answer: str, timeout: str = "15s") -> RouteTable:
    return RouteTable.compile(rc(answer, timeout), "route_config")


def match(t: RouteTable, path: bytes) -> Any:
    return t.match(b"x", path, b"GET", HeaderMap.wrap([]))


class Sub:
    def __init__(self) -> None:
        self.calls = 0

    def on_update(self) -> None:
        self.calls += 1


def test_update_swaps_the_snapshot_and_tells_subscribers() -> None:
    t1 = table("one")
    p = RouteConfigProvider(t1, rc("one"))
    assert p.current is t1 and p.name == "r" and p.static and p.last_updated > 0
    held = p.current  # what a stream pinned when its headers arrived
    s, gone = Sub(), Sub()
    p.subscribe(s.on_update)
    p.subscribe(gone.on_update)
    del gone
    gc.collect()
    t2 = table("two")
    p.update(t2, rc("two", name="r2"), "v2")
    assert p.current is t2 and p.name == "r2" and p.version_info == "v2" and s.calls == 1
    assert held is t1 and match(held, b"/").direct_body == b"one"  # the pinned snapshot is unchanged
    assert len(p._subs) == 1  # subscribers that went away are dropped


def _hcm(route_config: Any) -> HcmConfig:
    register_builtin()
    proto = ParseDict(
        {
            "stat_prefix": "t",
            "http_filters": [{"name": "envoy.filters.http.router"}],
            "common_http_protocol_options": {"idle_timeout": "3600s"},
            "stream_idle_timeout": "300s",
        },
        hcm_pb2.HttpConnectionManager(),
    )
    proto.route_config.CopyFrom(route_config)
    return HcmConfig(proto, BuildContext(stats=Store()), "hcm")


def test_hcm_reads_routes_from_its_provider_and_follows_route_timeouts() -> None:
    cfg = _hcm(rc("one", timeout="15s"))
    assert isinstance(cfg.route_provider, RouteConfigProvider)
    assert cfg.route_table is cfg.route_provider.current
    assert match(cfg.route_table, b"/").direct_body == b"one"
    assert cfg.timer_period == 1.0  # a tenth of the shortest timeout, at most 1 s
    cfg.route_provider.update(table("two", timeout="0.5s"))
    assert match(cfg.route_table, b"/").direct_body == b"two"
    assert cfg.timer_period == 0.05 and cfg.lazy_timeout_min == 0.5
    cfg.route_provider.update(table("three", timeout="20s"))
    assert cfg.timer_period == 1.0
