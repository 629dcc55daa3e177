"""Stats rendering: Envoy text/JSON and Prometheus with Envoy's default tag extraction."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moorline.observability.render import (
    extract_tags,
    histogram_quantiles,
    render_json,
    render_prometheus,
    render_text,
)
from moorline.observability.stats import Store, listener_stat_prefix


@pytest.mark.parametrize(
    ("name", "extracted", "tags"),
    [
        (
            "cluster.foo.upstream_rq_200",
            "cluster.upstream_rq",
            {"envoy.response_code": "200", "envoy.cluster_name": "foo"},
        ),
        (
            "cluster.foo.upstream_rq_5xx",
            "cluster.upstream_rq_xx",
            {"envoy.response_code_class": "5", "envoy.cluster_name": "foo"},
        ),
        ("cluster.foo.upstream_rq_total", "cluster.upstream_rq_total", {"envoy.cluster_name": "foo"}),
        (
            "listener.127.0.0.1_10000.http.ingress_http.downstream_rq_2xx",
            "listener.http.downstream_rq_xx",
            {
                "envoy.response_code_class": "2",
                "envoy.http_conn_manager_prefix": "ingress_http",
                "envoy.listener_address": "127.0.0.1_10000",
            },
        ),
        (
            "listener.127.0.0.1_10000.downstream_cx_total",
            "listener.downstream_cx_total",
            {"envoy.listener_address": "127.0.0.1_10000"},
        ),
        (
            "listener.[__1]_8080.downstream_cx_active",
            "listener.downstream_cx_active",
            {"envoy.listener_address": "[__1]_8080"},
        ),
        ("listener.admin.downstream_cx_total", "listener.admin.downstream_cx_total", {}),
        (
            "http.ingress_http.downstream_rq_total",
            "http.downstream_rq_total",
            {"envoy.http_conn_manager_prefix": "ingress_http"},
        ),
        ("listener_manager.total_listeners_active", "listener_manager.total_listeners_active", {}),
        (
            "listener_manager.worker_3.dispatcher.loop_duration_us",
            "listener_manager.worker_dispatcher.loop_duration_us",
            {"envoy.worker_id": "3"},
        ),
        ("server.live", "server.live", {}),
        (
            "tcp.ingress_tcp.downstream_cx_total",
            "tcp.downstream_cx_total",
            {"envoy.tcp_prefix": "ingress_tcp"},
        ),
        (
            "vhost.local.vcluster.other.upstream_rq_503",
            "vhost.vcluster.upstream_rq",
            {"envoy.virtual_host": "local", "envoy.virtual_cluster": "other", "envoy.response_code": "503"},
        ),
        (
            "http.ingress.rds.local.route.config_reload",
            "http.rds.config_reload",
            {"envoy.http_conn_manager_prefix": "ingress", "envoy.rds_route_config": "local.route"},
        ),
    ],
)
def test_extract_tags_like_envoy(name: str, extracted: str, tags: dict[str, str]) -> None:
    got_name, got_tags = extract_tags(name)
    assert got_name == extracted
    assert dict(got_tags) == tags
    assert len(got_tags) == len(dict(got_tags))  # never a duplicate tag name


def test_listener_stat_prefix_matches_the_extractor() -> None:
    assert listener_stat_prefix("127.0.0.1", 10000) == "listener.127.0.0.1_10000."
    assert listener_stat_prefix("::1", 80) == "listener.[__1]_80."
    assert listener_stat_prefix("0.0.0.0", 80, "public") == "listener.public."
    for prefix, addr in [
        (listener_stat_prefix("127.0.0.1", 10000), "127.0.0.1_10000"),
        (listener_stat_prefix("::1", 80), "[__1]_80"),
    ]:
        assert dict(extract_tags(prefix + "downstream_cx_total")[1]) == {"envoy.listener_address": addr}


def _store() -> Store:
    s = Store()
    s.counter("cluster.foo.upstream_rq_200").value = 7
    s.counter("cluster.bar.upstream_rq_200").value = 2
    s.counter("cluster.foo.upstream_rq_503").value = 1
    s.counter("cluster.foo.upstream_rq_total").value = 8
    s.counter("http.ingress_http.downstream_rq_2xx").value = 5
    s.counter("http.ingress_http.downstream_rq_4xx").value = 0
    s.counter("listener.127.0.0.1_10000.downstream_cx_total").value = 3
    s.counter("listener.127.0.0.1_10000.http.ingress_http.downstream_rq_2xx").value = 5
    s.gauge("server.live").value = 1
    s.gauge("listener_manager.total_listeners_active").value = 2
    s.gauge("cluster.foo.upstream_cx_active").value = 0
    h = s.histogram("cluster.foo.upstream_rq_time")
    for v in (1, 3, 3, 7, 20, 90):
        h.record(v)
    s.histogram("http.ingress_http.downstream_rq_time")  # nothing recorded
    return s


def test_render_text_sorted_with_histograms_last() -> None:
    text = render_text(_store())
    lines = text.splitlines()
    plain = [ln for ln in lines if "P0(" not in ln and "No recorded values" not in ln]
    assert plain == sorted(plain)
    assert "cluster.foo.upstream_rq_200: 7" in lines
    assert "server.live: 1" in lines
    assert lines[-2].startswith("cluster.foo.upstream_rq_time: P0(nan,")
    assert lines[-1] == "http.ingress_http.downstream_rq_time: No recorded values"
    hist = lines[-2].split(": ", 1)[1].split(" ")
    assert [p.split("(")[0] for p in hist] == [
        "P0",
        "P25",
        "P50",
        "P75",
        "P90",
        "P95",
        "P99",
        "P99.5",
        "P99.9",
        "P100",
    ]
    assert hist[0] == "P0(nan,0.5)"  # lower bound of the first non-empty bucket (0.5, 1]
    assert hist[-1] == "P100(nan,100)"  # upper bound of the last non-empty bucket (50, 100]


def test_render_text_filter_and_used_only() -> None:
    s = _store()
    text = render_text(s, filter=r"^cluster\.foo\.")
    assert all(ln.startswith("cluster.foo.") for ln in text.splitlines())
    assert "cluster.foo.upstream_cx_active: 0" in text
    used = render_text(s, filter="cluster.foo", used_only=True)
    assert "upstream_cx_active" not in used
    assert "cluster.foo.upstream_rq_total: 8" in used
    assert "downstream_rq_time" not in render_text(s, used_only=True)
    assert render_text(Store()) == ""


def test_histogram_quantiles_interpolate_inside_buckets() -> None:
    s = Store()
    h = s.histogram("h")
    for _ in range(10):
        h.record(7)  # all in bucket (5, 10]
    q = histogram_quantiles(h, (0.0, 0.5, 1.0))
    assert q == [5.0, 7.5, 10.0]
    assert histogram_quantiles(s.histogram("empty"), (0.5,)) == [None]
    big = s.histogram("big")
    big.record(10**9)  # above every bound: reported at the last bound
    assert histogram_quantiles(big, (1.0,)) == [3600000.0]


def test_render_json_shape() -> None:
    obj = json.loads(render_json(_store()))
    stats = obj["stats"]
    by_name = {e["name"]: e["value"] for e in stats if "name" in e}
    assert by_name["cluster.foo.upstream_rq_200"] == 7
    assert by_name["server.live"] == 1
    hist = stats[-1]["histograms"]
    assert hist["supported_quantiles"] == [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]
    cq = {c["name"]: c["values"] for c in hist["computed_quantiles"]}
    assert cq["http.ingress_http.downstream_rq_time"][0] == {"interval": None, "cumulative": None}
    assert cq["cluster.foo.upstream_rq_time"][-1]["cumulative"] == 100


def _families(text: str) -> dict[str, object]:
    fams = list(text_string_to_metric_families(text))
    names = [f.name for f in fams]
    assert len(names) == len(set(names)), f"family emitted twice: {names}"
    return {f.name: f for f in fams}


def test_prometheus_parses_with_tags_and_untagged() -> None:
    text = render_prometheus(_store())
    type_lines = [ln for ln in text.splitlines() if ln.startswith("# TYPE ")]
    assert len(type_lines) == len({ln.split()[2] for ln in type_lines})
    fams = _families(text)

    rq = fams["envoy_cluster_upstream_rq"]
    assert rq.type == "counter"  # type: ignore[attr-defined]
    samples = {(s.labels["envoy_cluster_name"], s.labels["envoy_response_code"]): s.value for s in rq.samples}  # type: ignore[attr-defined]
    assert samples == {("foo", "200"): 7, ("bar", "200"): 2, ("foo", "503"): 1}

    xx = fams["envoy_http_downstream_rq_xx"]
    assert {
        (s.labels["envoy_http_conn_manager_prefix"], s.labels["envoy_response_code_class"]): s.value
        for s in xx.samples
    } == {  # type: ignore[attr-defined]
        ("ingress_http", "2"): 5,
        ("ingress_http", "4"): 0,
    }
    lxx = fams["envoy_listener_http_downstream_rq_xx"]
    (sample,) = lxx.samples  # type: ignore[attr-defined]
    assert sample.labels == {
        "envoy_response_code_class": "2",
        "envoy_http_conn_manager_prefix": "ingress_http",
        "envoy_listener_address": "127.0.0.1_10000",
    }

    live = fams["envoy_server_live"]
    assert live.type == "gauge" and live.samples[0].labels == {} and live.samples[0].value == 1  # type: ignore[attr-defined]
    assert fams["envoy_listener_manager_total_listeners_active"].samples[0].labels == {}  # type: ignore[attr-defined]

    hist = fams["envoy_cluster_upstream_rq_time"]
    assert hist.type == "histogram"  # type: ignore[attr-defined]
    buckets = [(s.labels["le"], s.value) for s in hist.samples if s.name.endswith("_bucket")]  # type: ignore[attr-defined]
    values = [v for _, v in buckets]
    assert values == sorted(values)  # cumulative
    assert buckets[-1] == ("+Inf", 6)
    assert dict(buckets)["5"] == 3 and dict(buckets)["0.5"] == 0
    sums = {s.name: s.value for s in hist.samples if not s.name.endswith("_bucket")}  # type: ignore[attr-defined]
    assert sums == {"envoy_cluster_upstream_rq_time_sum": 124, "envoy_cluster_upstream_rq_time_count": 6}
    # one TYPE line per family even with several tagged members
    assert text.count("# TYPE envoy_cluster_upstream_rq counter") == 1


def test_prometheus_label_values_escaped() -> None:
    s = Store()
    s.counter('cluster.we"ird\\name\n.upstream_rq_total').value = 1
    fams = _families(render_prometheus(s))
    (sample,) = fams["envoy_cluster_upstream_rq"].samples  # the parser drops "_total"  # type: ignore[attr-defined]
    assert sample.labels == {"envoy_cluster_name": 'we"ird\\name\n'}


def test_prometheus_never_emits_a_family_twice_with_different_types() -> None:
    s = Store()
    s.histogram("server.thing").record(1)
    s.gauge("server.thing_count").value = 3  # would collide with the histogram's _count series
    s.counter("server.other").value = 1
    s.gauge("server.other_total").value = 1  # a parser strips _total: "server_other" twice
    text = render_prometheus(s)
    fams = _families(text)
    assert fams["envoy_server_thing"].type == "histogram"  # type: ignore[attr-defined]
    types: dict[str, str] = {}
    for ln in text.splitlines():
        if ln.startswith("# TYPE "):
            _, _, name, kind = ln.split()
            assert name not in types
            types[name] = kind
    assert "envoy_server_thing_count" not in types


def test_prometheus_empty_store_and_filter() -> None:
    assert render_prometheus(Store()) == ""
    text = render_prometheus(_store(), filter="^server")
    assert set(_families(text)) == {"envoy_server_live"}


def test_usedonly_lists_a_state_gauge_at_zero() -> None:
    """``server.state`` is 0 when LIVE: pilot-agent's ``/stats?usedonly&filter=^(server\\.state|
    ...)`` must still see the line, while a plain gauge at 0 reads as unused."""
    s = Store()
    s.state_gauge("server.state")
    s.gauge("server.other")
    s.scope("listener.127.0.0.1_1.").state_gauge("downstream_cx_active")
    assert render_text(s, "^server", used_only=True) == "server.state: 0\n"
    assert (
        render_text(s, "downstream_cx_active$", used_only=True)
        == "listener.127.0.0.1_1.downstream_cx_active: 0\n"
    )
    assert s.state_gauge("server.state") is s.get("server.state")
