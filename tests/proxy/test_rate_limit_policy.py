"""Route and virtual host ``rate_limits``, compiled with the route table: the descriptor each
action builds, the ones that drop their descriptor, stages, and config errors."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.route.v3 import route_pb2
from google.protobuf.json_format import ParseDict

from moorline.config.errors import ConfigError
from moorline.protocol.headers import RequestHeaders
from moorline.proxy.rate_limit_policy import Facts, descriptors
from moorline.proxy.route_table import RouteTable


def _table(rate_limits: list[dict[str, Any]], vh_limits: list[dict[str, Any]] | None = None) -> RouteTable:
    rc = {
        "virtual_hosts": [
            {
                "name": "vh",
                "domains": ["*"],
                "rate_limits": vh_limits or [],
                "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "svc", "rate_limits": rate_limits}}
                ],
            }
        ]
    }
    return RouteTable.compile(ParseDict(rc, route_pb2.RouteConfiguration()))


def _descs(actions: list[dict[str, Any]], headers: dict[str, str] | None = None, **facts: Any) -> list[Any]:
    t = _table([{"actions": actions}])
    r = t.virtual_hosts[0].routes[0]
    h = RequestHeaders(
        b"GET", b"/p", b"host", pairs=[(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    )
    f = Facts(facts.get("cluster", "svc"), facts.get("remote", "10.0.0.1"), facts.get("local", "me"))
    return descriptors(r.rate_limits, 0, h, f)


def test_request_headers_present_and_absent() -> None:
    a = [{"request_headers": {"header_name": "X-User", "descriptor_key": "user"}}]
    assert _descs(a, {"x-user": "bob"}) == [(("user", "bob"),)]
    assert _descs(a, {}) == []  # absent: no descriptor at all


def test_request_headers_skip_if_absent_keeps_the_rest() -> None:
    a = [
        {"generic_key": {"descriptor_value": "g"}},
        {"request_headers": {"header_name": "x-user", "descriptor_key": "user", "skip_if_absent": True}},
    ]
    assert _descs(a, {}) == [(("generic_key", "g"),)]
    assert _descs(a, {"x-user": "u"}) == [(("generic_key", "g"), ("user", "u"))]


def test_remote_address_destination_source_and_generic_key() -> None:
    a = [
        {"remote_address": {}},
        {"destination_cluster": {}},
        {"source_cluster": {}},
        {"generic_key": {"descriptor_key": "k", "descriptor_value": "v"}},
    ]
    assert _descs(a) == [
        (("remote_address", "10.0.0.1"), ("destination_cluster", "svc"), ("source_cluster", "me"), ("k", "v"))
    ]
    assert _descs(a, remote=None) == []  # a Unix socket peer has no IP


def test_header_value_match_expect_match() -> None:
    hm = {"headers": [{"name": ":method", "string_match": {"exact": "GET"}}], "descriptor_value": "gets"}
    assert _descs([{"header_value_match": hm}]) == [(("header_match", "gets"),)]
    hm_no = {**hm, "expect_match": False}
    assert _descs([{"header_value_match": hm_no}]) == []
    hm_post = {"headers": [{"name": ":method", "string_match": {"exact": "POST"}}], "descriptor_value": "x"}
    assert _descs([{"header_value_match": {**hm_post, "expect_match": False}}]) == [(("header_match", "x"),)]


def test_stage_selects_entries_and_vhost_limits_are_kept_apart() -> None:
    t = _table(
        [{"stage": 1, "actions": [{"generic_key": {"descriptor_value": "one"}}]}],
        vh_limits=[{"actions": [{"generic_key": {"descriptor_value": "vh"}}]}],
    )
    vh = t.virtual_hosts[0]
    r = vh.routes[0]
    h = RequestHeaders()
    f = Facts("svc", None, "")
    assert descriptors(r.rate_limits, 0, h, f) == []
    assert descriptors(r.rate_limits, 1, h, f) == [(("generic_key", "one"),)]
    assert descriptors(vh.rate_limits, 0, h, f) == [(("generic_key", "vh"),)]


def test_disable_key_is_a_notice_and_rate_limits_no_longer_are() -> None:
    t = _table([{"disable_key": "k", "actions": [{"remote_address": {}}]}])
    assert any("disable_key" in n for n in t.notices)
    assert not any(n.endswith("rate_limits: ignored") for n in t.notices)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"actions": []}, "actions"),
        ({"stage": 11, "actions": [{"remote_address": {}}]}, "stage"),
        ({"actions": [{"request_headers": {"header_name": "x"}}]}, "descriptor_key"),
        ({"actions": [{"generic_key": {}}]}, "descriptor_value"),
        (
            {"actions": [{"query_parameters": {"query_parameter_name": "q", "descriptor_key": "k"}}]},
            "query_parameters",
        ),
    ],
)
def test_bad_entries_are_config_errors(entry: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        _table([entry])
    assert field in e.value.path
    assert "rate_limits[0]" in e.value.path
