"""Scrape-time rendering of the stats store: Envoy ``/stats`` text, JSON, and Prometheus.

Nothing here runs on the request path: the hot path only bumps integer slots in
``moorline.observability.stats``; names are parsed and tags extracted when an
admin client asks for them.

Tag extraction mirrors the behaviour of Envoy's default tag extractors
(``source/common/config/well_known_names.cc``): every extractor is matched against
the *full* stat name, the text captured by its first group is removed from the
name and the second group becomes the tag value. The removals are unioned, so
the order of the extractors does not change the result. Examples::

    cluster.foo.upstream_rq_200
        -> envoy_cluster_upstream_rq{envoy_response_code="200",envoy_cluster_name="foo"}
    listener.127.0.0.1_10000.http.ingress_http.downstream_rq_2xx
        -> envoy_listener_http_downstream_rq_xx{envoy_response_code_class="2",
             envoy_http_conn_manager_prefix="ingress_http",envoy_listener_address="127.0.0.1_10000"}

Listener stats must be created under ``listener.<address>.`` where the address is
Envoy's ``ip:port`` with every ``:`` replaced by ``_`` (``listener.127.0.0.1_10000.``,
``listener.[__1]_10000.``); ``moorline.observability.stats.listener_stat_prefix``
builds it. ``listener.admin.`` is not tagged, as in Envoy.

Histograms: the store keeps fixed buckets, not Envoy's circllhist, so the
quantiles printed by ``/stats`` are linear interpolations inside the bucket that
holds each quantile (an approximation), and the "interval" half of Envoy's
``P50(interval,cumulative)`` pair is always ``nan``: moorline keeps no per-flush
interval histograms.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from typing import Any

from moorline.observability.stats import Counter, Gauge, Histogram, Stat, StateGauge, Store

# Envoy's supported quantiles in percent, as printed by /stats (P0 ... P100).
PERCENTILES: tuple[float, ...] = (0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100)
QUANTILES: tuple[float, ...] = tuple(p / 100 for p in PERCENTILES)

# ---------------------------------------------------------------------------
# Tag extraction
# ---------------------------------------------------------------------------

# Pattern pieces, with the meaning Envoy gives them.
_ADDRESS = r"(?:(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+)"
_TAG_VALUE = r"[^.]+"
_CIPHER = r"[\w-]+"
_TLS_VERSION = r"TLSv\d\.\d"
_ROUTE_CONFIG_NAME = r"[\w\-.]+"
_LISTENER_OR_CLUSTER = r"(?:listener|cluster)\..*?"


def _tokens(pattern: str) -> str:
    """Envoy's tokenized pattern (``cluster.*.grpc.$.**``) as a regex.

    ``*`` is exactly one dot-free token, ``$`` the captured token (removed with its
    trailing dot), ``**`` any remainder (we require at least one more token so a
    removal never leaves a name ending in a dot).
    """
    out = ["^"]
    parts = pattern.split(".")
    for i, tok in enumerate(parts):
        last = i == len(parts) - 1
        if tok == "**":
            out.append(r".+")
            continue
        if tok == "$":
            out.append(r"((" + _TAG_VALUE + r")\.)")
            continue
        out.append(_TAG_VALUE if tok == "*" else re.escape(tok))
        if not last:
            out.append(r"\.")
    return "".join(out)


# (tag name, regex, fast-reject substring or "", value never tagged or "")
_EXTRACTOR_SPECS: tuple[tuple[str, str, str, str], ...] = (
    ("envoy.response_code", r"_rq(_(\d{3}))$", "_rq_", ""),
    ("envoy.response_code_class", r"_rq_((\d))xx$", "_rq_", ""),
    ("envoy.grpc_bridge_method", _tokens("cluster.*.grpc.*.$.**"), ".grpc.", ""),
    ("envoy.http_user_agent", _tokens("http.*.user_agent.$.**"), ".user_agent.", ""),
    ("envoy.virtual_cluster", _tokens("vhost.*.vcluster.$.**"), ".vcluster.", ""),
    ("envoy.fault_downstream_cluster", _tokens("http.*.fault.$.**"), ".fault.", ""),
    ("envoy.ssl_cipher", r"^listener\..*?\.ssl\.ciphers(\.(" + _CIPHER + r"))$", ".ssl.ciphers.", ""),
    (
        "envoy.ssl_curve",
        r"^" + _LISTENER_OR_CLUSTER + r"\.ssl\.curves(\.(" + _CIPHER + r"))$",
        ".ssl.curves.",
        "",
    ),
    (
        "envoy.ssl_sigalg",
        r"^" + _LISTENER_OR_CLUSTER + r"\.ssl\.sigalgs(\.(" + _CIPHER + r"))$",
        ".ssl.sigalgs.",
        "",
    ),
    (
        "envoy.ssl_version",
        r"^" + _LISTENER_OR_CLUSTER + r"\.ssl\.versions(\.(" + _TLS_VERSION + r"))$",
        ".ssl.versions.",
        "",
    ),
    (
        "cipher_suite",
        r"^cluster\." + _TAG_VALUE + r"\.ssl\.ciphers(\.(" + _CIPHER + r"))$",
        ".ssl.ciphers.",
        "",
    ),
    ("envoy.grpc_bridge_service", _tokens("cluster.*.grpc.$.**"), ".grpc.", ""),
    ("envoy.tcp_prefix", _tokens("tcp.$.**"), "tcp.", ""),
    ("envoy.udp_prefix", _tokens("udp.$.**"), "udp.", ""),
    ("envoy.clientssl_prefix", _tokens("auth.clientssl.$.**"), "auth.clientssl.", ""),
    ("envoy.ratelimit_prefix", _tokens("ratelimit.$.**"), "ratelimit.", ""),
    ("envoy.cluster_name", _tokens("cluster.$.**"), "cluster.", ""),
    ("envoy.http_conn_manager_prefix", r"^listener\..*?\.http\.((" + _TAG_VALUE + r")\.)", ".http.", ""),
    ("envoy.ext_authz_prefix", _tokens("cluster.*.ext_authz.$.**"), ".ext_authz.", ""),
    ("envoy.ext_authz_prefix", _tokens("http.*.ext_authz.$.**"), ".ext_authz.", ""),
    ("envoy.http_conn_manager_prefix", _tokens("http.$.**"), "http.", ""),
    (
        "envoy.worker_id",
        r"^(?:listener\.(?:"
        + _ADDRESS
        + "|"
        + _TAG_VALUE
        + r")\.|server\.|listener_manager\.)worker_((\d+)\.)",
        "worker_",
        "",
    ),
    (
        "envoy.listener_address",
        r"^listener\.((" + _ADDRESS + "|" + _TAG_VALUE + r")\.)",
        "listener.",
        "admin",
    ),
    ("envoy.virtual_host", _tokens("vhost.$.**"), "vhost.", ""),
    (
        "envoy.rds_route_config",
        r"^http\." + _TAG_VALUE + r"\.rds\.((" + _ROUTE_CONFIG_NAME + r")\.)\w+?$",
        ".rds.",
        "",
    ),
    ("envoy.route", _tokens("vhost.*.route.$.**"), ".route.", ""),
    ("envoy.thrift_prefix", _tokens("thrift.$.**"), "thrift.", ""),
    ("envoy.redis_prefix", _tokens("redis.$.**"), "redis.", ""),
    (
        "envoy.local_http_ratelimit_prefix",
        _tokens("$.http_local_rate_limit.**"),
        ".http_local_rate_limit.",
        "",
    ),
    ("envoy.local_network_ratelimit_prefix", _tokens("local_rate_limit.$.**"), "local_rate_limit.", ""),
    (
        "envoy.local_listener_ratelimit_prefix",
        _tokens("listener_local_ratelimit.$.**"),
        "listener_local_ratelimit.",
        "",
    ),
    ("envoy.dns_filter_prefix", _tokens("dns_filter.$.**"), "dns_filter.", ""),
)

_EXTRACTORS: tuple[tuple[str, re.Pattern[str], str, str], ...] = tuple(
    (name, re.compile(rx), sub, neg) for name, rx, sub, neg in _EXTRACTOR_SPECS
)


@functools.lru_cache(maxsize=65536)  # bounded: one entry per distinct stat name seen at scrape time
def extract_tags(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``name`` -> (tag-extracted name, ((tag name, value), ...)) as Envoy's default extractors do.

    A tag name is extracted at most once (first extractor wins) so the Prometheus
    output never carries a duplicate label.
    """
    removals: list[tuple[int, int]] = []
    tags: list[tuple[str, str]] = []
    seen: set[str] = set()
    for tag_name, rx, sub, neg in _EXTRACTORS:
        if tag_name in seen or (sub and sub not in name):
            continue
        m = rx.search(name)
        if m is None:
            continue
        value = m.group(2)
        if neg and value == neg:
            continue
        seen.add(tag_name)
        tags.append((tag_name, value))
        removals.append(m.span(1))
    if not removals:
        return name, ()
    removals.sort()
    out = []
    pos = 0
    for start, end in removals:
        if start > pos:
            out.append(name[pos:start])
        pos = max(pos, end)
    out.append(name[pos:])
    return "".join(out), tuple(tags)


# ---------------------------------------------------------------------------
# Envoy /stats text and JSON
# ---------------------------------------------------------------------------


def _fmt_double(v: float) -> str:
    """Shortest form, as fmt's ``{}`` prints a double: ``1``, ``1.05``, ``nan``."""
    if math.isnan(v):
        return "nan"
    if v == int(v) and abs(v) < 1e16:
        return str(int(v))
    return repr(v)


def histogram_quantiles(h: Histogram, quantiles: Iterable[float] = QUANTILES) -> list[float | None]:
    """Approximate quantiles from bucket counts (linear inside the holding bucket).

    ``None`` for every quantile when nothing was recorded. Samples above the last
    bound are reported as the last bound: the store keeps no maximum.
    """
    qs = list(quantiles)
    if not h.count:
        return [None] * len(qs)
    bounds = h.buckets
    counts = h.counts
    out: list[float | None] = []
    for q in qs:
        target = q * h.count
        cum = 0
        value = float(bounds[-1])
        for i, c in enumerate(counts):
            if c == 0:
                continue
            if cum + c >= target:
                if i >= len(bounds):  # overflow slot: no upper bound known
                    value = float(bounds[-1])
                else:
                    lower = float(bounds[i - 1]) if i > 0 else 0.0
                    upper = float(bounds[i])
                    value = lower + (upper - lower) * max(0.0, target - cum) / c
                break
            cum += c
        out.append(value)
    return out


def _used(s: Stat) -> bool:
    # Envoy keeps a "used" flag per stat; the store has none, so "non-zero" stands in
    # for it (a gauge that went up and back to 0 reads as unused).
    if isinstance(s, Histogram):
        return s.count > 0
    return s.value != 0 or isinstance(s, StateGauge)


def _select(store: Store, filter: str | None, used_only: bool) -> list[Stat]:
    rx = re.compile(filter) if filter else None
    out = []
    for s in store:
        if rx is not None and rx.search(s.name) is None:
            continue
        if used_only and not _used(s):
            continue
        out.append(s)
    return out


def render_text(store: Store, filter: str | None = None, used_only: bool = False) -> str:
    """Envoy's ``/stats`` text: ``name: value`` sorted by name, histograms after the rest.

    ``filter`` is a regular expression searched in each name (Envoy's ``?filter=``);
    an invalid one raises ``re.error`` for the caller to answer 400.
    """
    lines = []
    hists = []
    for s in _select(store, filter, used_only):
        if isinstance(s, Histogram):
            hists.append(s)
        else:
            lines.append(f"{s.name}: {s.value}")
    for h in hists:
        if not h.count:
            lines.append(f"{h.name}: No recorded values")
            continue
        parts = [
            f"P{_fmt_double(p)}(nan,{_fmt_double(v if v is not None else math.nan)})"
            for p, v in zip(PERCENTILES, histogram_quantiles(h), strict=True)
        ]
        lines.append(f"{h.name}: {' '.join(parts)}")
    return "\n".join(lines) + "\n" if lines else ""


def render_json_obj(store: Store, filter: str | None = None, used_only: bool = False) -> dict[str, Any]:
    """``/stats?format=json`` as a dict, in Envoy's shape."""
    stats: list[dict[str, Any]] = []
    computed = []
    for s in _select(store, filter, used_only):
        if isinstance(s, Histogram):
            values = [{"interval": None, "cumulative": v} for v in histogram_quantiles(s)]
            computed.append({"name": s.name, "values": values})
        else:
            stats.append({"name": s.name, "value": s.value})
    stats.append(
        {
            "histograms": {
                "supported_quantiles": list(PERCENTILES),
                "computed_quantiles": computed,
            }
        }
    )
    return {"stats": stats}


def render_json(store: Store, filter: str | None = None, used_only: bool = False) -> str:
    return json.dumps(render_json_obj(store, filter, used_only), indent=2) + "\n"


# ---------------------------------------------------------------------------
# Prometheus text exposition (format 0.0.4)
# ---------------------------------------------------------------------------

_NOT_PROM = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(name: str) -> str:
    """Envoy's metric naming: ``envoy_`` + name with every other character made ``_``."""
    return "envoy_" + _NOT_PROM.sub("_", name)


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(tags: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{_NOT_PROM.sub("_", k)}="{_escape_label(v)}"' for k, v in tags)
    return "{" + inner + "}" if inner else ""


def _prom_number(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return _fmt_double(v)


def _reserved_names(family: str, kind: str) -> tuple[str, ...]:
    # Names a family occupies in a parser's view: prometheus_client strips ``_total``
    # from counter families, histograms own their _bucket/_sum/_count series.
    if kind == "histogram":
        return (family, family + "_bucket", family + "_sum", family + "_count")
    if kind == "counter" and family.endswith("_total"):
        return (family, family[: -len("_total")])
    return (family,)


def render_prometheus(store: Store, filter: str | None = None, used_only: bool = False) -> str:
    """Prometheus exposition with Envoy's names and default tags.

    Counters, then gauges, then histograms, each family once with its ``# TYPE``
    line and all its samples together. A family whose name collides with one of
    another type already emitted (rare: e.g. a gauge named like a histogram's
    ``_count``) is left out with a comment, since two TYPEs for one name make the
    whole scrape unparsable.
    """
    families: dict[tuple[str, str], list[tuple[tuple[tuple[str, str], ...], Stat]]] = {}
    for s in _select(store, filter, used_only):
        extracted, tags = extract_tags(s.name)
        families.setdefault((s.kind, prometheus_name(extracted)), []).append((tags, s))

    # Decide collisions first, histograms before counters before gauges: a histogram
    # owns three series names, so it keeps them over a stray gauge named like one.
    taken: dict[str, str] = {}
    omitted: dict[tuple[str, str], str] = {}
    for kind in ("histogram", "counter", "gauge"):
        for k, family in sorted(families):
            if k != kind:
                continue
            names = _reserved_names(family, kind)
            clash = next((taken[n] for n in names if n in taken), None)
            if clash is not None:
                omitted[(k, family)] = clash
                continue
            for n in names:
                taken[n] = kind

    out: list[str] = []
    for kind in ("counter", "gauge", "histogram"):
        for (k, family), members in sorted(families.items()):
            if k != kind:
                continue
            if (k, family) in omitted:
                out.append(
                    f"# moorline: {kind} {family} omitted: name collides with a {omitted[(k, family)]}"
                )
                continue
            out.append(f"# TYPE {family} {kind}")
            seen_labels: set[tuple[tuple[str, str], ...]] = set()
            for tags, s in sorted(members, key=lambda m: m[0]):
                if tags in seen_labels:
                    continue
                seen_labels.add(tags)
                if isinstance(s, Histogram):
                    _emit_histogram(out, family, tags, s)
                else:
                    assert isinstance(s, Counter | Gauge)
                    out.append(f"{family}{_labels(tags)} {s.value}")
    return "\n".join(out) + "\n" if out else ""


def _emit_histogram(out: list[str], family: str, tags: tuple[tuple[str, str], ...], h: Histogram) -> None:
    for bound, cum in zip(h.buckets, h.cumulative(), strict=True):
        out.append(f"{family}_bucket{_labels((*tags, ('le', _prom_number(float(bound)))))} {cum}")
    out.append(f"{family}_bucket{_labels((*tags, ('le', '+Inf')))} {h.count}")
    out.append(f"{family}_sum{_labels(tags)} {_prom_number(h.sum)}")
    out.append(f"{family}_count{_labels(tags)} {h.count}")
