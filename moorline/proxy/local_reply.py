"""``local_reply_config``: rewrite the status and body of locally generated replies.

Each mapper has a filter (the access-log filter language); the first mapper
whose filter matches applies its ``status_code``, ``body`` and
``body_format_override``. Then the top-level ``body_format`` applies if no
mapper overrode the format. Supported filters: ``status_code_filter``,
``header_filter``, ``response_flag_filter``, ``and_filter``, ``or_filter``,
``not_health_check_filter`` (always true here). Format strings support
``%LOCAL_REPLY_BODY%``, ``%RESPONSE_CODE%``, ``%RESPONSE_CODE_DETAILS%``,
``%RESPONSE_FLAGS%``, ``%REQ(x)%`` and ``%%``; others stay literal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from moorline.config.errors import ConfigError

_CMD = re.compile(r"%([A-Z_0-9]+)(?:\(([^)]*)\))?%|%%")


def _compile_comparison(cmp: Any, path: str) -> Callable[[int], bool]:
    op = cmp.op  # 0 EQ, 1 GE, 2 LE
    v = cmp.value.default_value
    if op == 0:
        return lambda x: x == v
    if op == 1:
        return lambda x: x >= v
    if op == 2:
        return lambda x: x <= v
    raise ConfigError(f"{path}.op", "unknown comparison op")


def compile_filter(f: Any, path: str) -> Callable[[int, Any, Any], bool]:
    """AccessLogFilter -> predicate(status, stream, info)."""
    kind = f.WhichOneof("filter_specifier")
    if kind == "status_code_filter":
        c = _compile_comparison(f.status_code_filter.comparison, f"{path}.status_code_filter.comparison")
        return lambda status, s, info: c(status)
    if kind == "header_filter":
        from moorline.proxy.route_table import HeaderMatcher

        hm = HeaderMatcher.compile(f.header_filter.header, f"{path}.header_filter.header")

        def header_pred(status: int, s: Any, info: Any) -> bool:
            h = getattr(s, "headers", None)
            if h is None:
                return False
            return bool(hm.match(h, h.method, h.authority, h.path))

        return header_pred
    if kind == "response_flag_filter":
        wanted = set(f.response_flag_filter.flags)
        if wanted:
            return lambda status, s, info: bool(wanted.intersection(info.response_flags))
        return lambda status, s, info: bool(info.response_flags)
    if kind in ("and_filter", "or_filter"):
        subs = [
            compile_filter(x, f"{path}.{kind}.filters[{i}]") for i, x in enumerate(getattr(f, kind).filters)
        ]
        if kind == "and_filter":
            return lambda status, s, info: all(p(status, s, info) for p in subs)
        return lambda status, s, info: any(p(status, s, info) for p in subs)
    if kind == "not_health_check_filter":
        return lambda status, s, info: True
    raise ConfigError(f"{path}.{kind}" if kind else path, f"access log filter {kind!r} is not supported")


class BodyFormat:
    __slots__ = ("content_type", "json_fields", "parts")

    def __init__(self, sfs: Any, path: str) -> None:
        self.json_fields: dict | None = None
        self.parts: str | None = None
        kind = sfs.WhichOneof("format")
        if kind == "text_format":
            self.parts = sfs.text_format
        elif kind == "text_format_source":
            src = sfs.text_format_source
            sk = src.WhichOneof("specifier")
            if sk == "inline_string":
                self.parts = src.inline_string
            elif sk == "inline_bytes":
                self.parts = src.inline_bytes.decode("utf-8", "replace")
            elif sk == "filename":
                try:
                    with open(src.filename, encoding="utf-8") as fh:
                        self.parts = fh.read()
                except OSError as e:
                    raise ConfigError(f"{path}.text_format_source.filename", f"cannot read: {e}") from None
            else:
                raise ConfigError(f"{path}.text_format_source", "a data source is required")
        elif kind == "json_format":
            from google.protobuf import json_format

            self.json_fields = json_format.MessageToDict(sfs.json_format)
        else:
            raise ConfigError(path, "one of text_format, text_format_source or json_format is required")
        ct = sfs.content_type
        if ct:
            self.content_type: bytes | None = ct.encode()
        elif self.json_fields is not None:
            self.content_type = b"application/json"
        else:
            self.content_type = b"text/plain"

    def render(self, status: int, body: bytes, s: Any, info: Any) -> bytes:
        def sub(text: str) -> str:
            def one(m: re.Match) -> str:
                if m.group(0) == "%%":
                    return "%"
                cmd, arg = m.group(1), m.group(2)
                if cmd == "LOCAL_REPLY_BODY":
                    return body.decode("utf-8", "replace")
                if cmd == "RESPONSE_CODE":
                    return str(status)
                if cmd == "RESPONSE_CODE_DETAILS":
                    return info.response_code_details or "-"
                if cmd == "RESPONSE_FLAGS":
                    return info.flags_str()
                if cmd == "REQ" and arg:
                    name = arg.split("?")[0].lower().encode()
                    h = getattr(s, "headers", None)
                    v = h.get(name) if h is not None else None
                    return v.decode("latin-1") if v is not None else "-"
                return m.group(0)

            return _CMD.sub(one, text)

        if self.json_fields is not None:

            def walk(v: Any) -> Any:
                if isinstance(v, str):
                    out = sub(v)
                    if v in ("%RESPONSE_CODE%",):
                        return status
                    return out
                if isinstance(v, dict):
                    return {k: walk(x) for k, x in v.items()}
                if isinstance(v, list):
                    return [walk(x) for x in v]
                return v

            return (json.dumps(walk(self.json_fields)) + "\n").encode()
        assert self.parts is not None
        return sub(self.parts).encode()


class _Mapper:
    __slots__ = ("body", "fmt", "pred", "status")

    def __init__(self, m: Any, path: str) -> None:
        if not m.HasField("filter"):
            raise ConfigError(f"{path}.filter", "filter is required")
        self.pred = compile_filter(m.filter, f"{path}.filter")
        self.status = m.status_code.value if m.HasField("status_code") else None
        self.body: bytes | None = None
        if m.HasField("body"):
            b = m.body
            sk = b.WhichOneof("specifier")
            if sk == "inline_string":
                self.body = b.inline_string.encode()
            elif sk == "inline_bytes":
                self.body = b.inline_bytes
            elif sk == "filename":
                try:
                    with open(b.filename, "rb") as fh:
                        self.body = fh.read()
                except OSError as e:
                    raise ConfigError(f"{path}.body.filename", f"cannot read: {e}") from None
        self.fmt = (
            BodyFormat(m.body_format_override, f"{path}.body_format_override")
            if m.HasField("body_format_override")
            else None
        )


class LocalReplyConfig:
    __slots__ = ("body_format", "mappers")

    def __init__(self) -> None:
        self.mappers: list[_Mapper] = []
        self.body_format: BodyFormat | None = None

    @classmethod
    def empty(cls) -> LocalReplyConfig:
        return cls()

    @classmethod
    def compile(cls, proto: Any, path: str) -> LocalReplyConfig:
        c = cls()
        c.mappers = [_Mapper(m, f"{path}.mappers[{i}]") for i, m in enumerate(proto.mappers)]
        if proto.HasField("body_format"):
            c.body_format = BodyFormat(proto.body_format, f"{path}.body_format")
        return c

    def apply(self, status: int, body: bytes, s: Any, info: Any) -> tuple[int, bytes, bytes | None]:
        if not self.mappers and self.body_format is None:
            return status, body, None
        fmt = self.body_format
        orig_status = status
        for m in self.mappers:
            if m.pred(orig_status, s, info):
                if m.status is not None:
                    status = m.status
                if m.body is not None:
                    body = m.body
                if m.fmt is not None:
                    fmt = m.fmt
                break
        if fmt is not None:
            return status, fmt.render(status, body, s, info), fmt.content_type
        return status, body, None
