"""BuildContext notices: the field path travels with each one."""

from __future__ import annotations

from moorline.config.context import BuildContext, Notice
from moorline.observability.stats import Store


def test_notice_text_splits_into_path_and_message() -> None:
    n = Notice.parse('static_resources.clusters[0].typed_extension_protocol_options["a.b"]: not used')
    assert n.path == 'static_resources.clusters[0].typed_extension_protocol_options["a.b"]'
    assert n.message == "not used"
    assert str(n) == f"{n.path}: not used" and "not used" in n  # still a str for old callers
    named = Notice.parse("x.http_filters[1] (istio.stats): accepted as a no-op: telemetry")
    assert named.path == "x.http_filters[1]"
    assert named.message == "istio.stats: accepted as a no-op: telemetry"
    bare = Notice.parse("something without a path")
    assert bare.path == "" and bare.message == "something without a path"


def test_notice_dedupe_and_coverage() -> None:
    ctx = BuildContext(stats=Store())
    ctx.notice("a.b: ignored")
    ctx.notice("a.b: ignored")
    ctx.notice("why", path="a.c[0]")
    assert ctx.notices == ["a.b: ignored", "a.c[0]: why"]
    assert ctx.notices[1].path == "a.c[0]"
    assert ctx.has_notice_at("a.b") and ctx.has_notice_at("a.b.x") and ctx.has_notice_at("a")
    assert ctx.has_notice_at("a.c")  # a.c[0] is inside it
    assert not ctx.has_notice_at("a.bb") and not ctx.has_notice_at("a.d")
