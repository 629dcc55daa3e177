"""Bootstrap loading: YAML/JSON text -> ``envoy.config.bootstrap.v3.Bootstrap``, with field paths.

Why not plain ``google.protobuf.json_format.ParseDict``:

* it resolves every ``Any`` through the default descriptor pool, so each ``*_pb2`` module would
  have to be imported up front, and it rejects types no installed module defines -- yet real
  control planes send such types (Istio's ``type.googleapis.com/stats.PluginConfig``,
  ``istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig``, ...);
* its error paths are incomplete (some errors carry no path at all).

So this module walks the JSON tree together with the message descriptors and builds the message
itself (one pass): scalars, enums, repeated and map fields are set directly with the exact Envoy
field path for every error; well-known types with a special JSON form (Duration, Timestamp,
FieldMask, Struct, Value, ListValue) are handed to protobuf's own converters. Each ``Any`` is
built bottom-up: the ``"@type"`` is looked up in the type index (``moorline.config.typeindex``,
which imports only that one module), the remaining keys are converted into that message with the
same walker (so nested errors keep their full path), and the result is serialized into
``Any.value`` with the original type URL. A type the index does not know is packed as a
``google.protobuf.Struct`` holding the remaining keys, under its original type URL;
``unpack_any`` turns it back into ``OpaqueAny(type_url, dict)``. Nothing is pre-registered in the
global pool and no post-pass is needed to patch placeholders.

Leniencies copied from Envoy's JSON conversion: a single object where a list is expected is taken
as a one-element list (``envoy-edge.yaml`` writes ``clusters:`` as a mapping); both proto field
names and JSON (lowerCamel) names are accepted. Strictness copied from Envoy: unknown fields,
duplicate keys, two members of one oneof, bad enum names and out-of-range integers are errors.

Bound: nesting deeper than ``MAX_DEPTH`` messages is rejected (protects the interpreter stack
against hostile xDS input).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import difflib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import yaml
from google.protobuf import any_pb2, json_format, struct_pb2, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from moorline.config import typeindex
from moorline.config.errors import ConfigError

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_DEPTH",
    "MAX_DOCUMENT_DEPTH",
    "OpaqueAny",
    "load_bootstrap",
    "load_document",
    "parse_message",
    "unpack_any",
]

MAX_DEPTH = 100
# Bounds on the document itself, checked before any conversion (hostile files, xDS payloads):
# mappings and lists nested this deep, and the nodes YAML aliases may add to a document (at most
# this many, or as many as the document has, whichever is larger).
MAX_DOCUMENT_DEPTH = 200
MAX_ALIAS_NODES = 200_000

TYPED_STRUCT_TYPES = frozenset({"udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"})
_ANY = "google.protobuf.Any"
_STRUCT = "google.protobuf.Struct"
# Well-known types whose JSON form is not an object of fields: protobuf converts these.
_WKT_JSON = frozenset(
    {
        "google.protobuf.Duration",
        "google.protobuf.Timestamp",
        "google.protobuf.FieldMask",
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
    }
)
_WRAPPERS = frozenset(
    {
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    }
)
_UNSUPPORTED_EXT = (".pb", ".pb_text")


class OpaqueAny:
    """An ``Any`` whose type xds-protos does not know (or a TypedStruct naming such a type).

    ``value`` is the JSON form of the config (a dict). Whole-number floats that a Struct round
    trip produced are turned back into ints, so ``{"port": 80}`` stays ``80``.
    """

    __slots__ = ("type_url", "value")

    def __init__(self, type_url: str, value: dict[str, Any]) -> None:
        self.type_url = type_url
        self.value = value

    @property
    def type_name(self) -> str:
        return typeindex.type_name(self.type_url)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpaqueAny):
            return NotImplemented
        return self.type_url == other.type_url and self.value == other.value

    __hash__ = None  # type: ignore[assignment]  # mutable value

    def __repr__(self) -> str:
        return f"OpaqueAny({self.type_url!r}, {self.value!r})"


# --- public API --------------------------------------------------------------------------------


def load_bootstrap(path: str | None = None, yaml_text: str | None = None) -> Any:
    """Load an Envoy v3 bootstrap from a file and/or ``--config-yaml`` text.

    With both, the YAML is merged over the file as Envoy does (``MergeFrom``: scalars replace,
    repeated fields append). Raises ``ConfigError`` with ``source`` set.
    """
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    if path is None and yaml_text is None:
        raise ConfigError("", "no configuration given (use --config-path or --config-yaml)")
    bootstrap = bootstrap_pb2.Bootstrap()
    source = ""
    if path is not None:
        source = path
        doc = _read_file(path)
        _parse_top(doc, bootstrap, path)
    if yaml_text is not None:
        doc = load_document(yaml_text, "--config-yaml")
        overlay = bootstrap_pb2.Bootstrap()
        _parse_top(doc, overlay, "--config-yaml")
        bootstrap.MergeFrom(overlay)
        source = f"{path} + --config-yaml" if path is not None else "--config-yaml"
    try:
        check_bootstrap(bootstrap)
    except ConfigError as e:
        raise e.with_source(source) from None
    return bootstrap


def parse_message(data: Any, message_cls: Any, path: str = "") -> Message:
    """Convert the JSON form of one message (dict) into ``message_cls``.

    Used for bootstrap pieces and for xDS resources in JSON form. A top-level ``"@type"`` (as in
    config dumps) is accepted when it names ``message_cls`` and rejected otherwise.
    """
    msg = message_cls()
    desc = msg.DESCRIPTOR
    if isinstance(data, Mapping) and "@type" in data and desc.full_name not in _WKT_JSON:
        url = data["@type"]
        if not isinstance(url, str) or typeindex.type_name(url) != desc.full_name:
            raise ConfigError(_join(path, "@type"), f"expected {desc.full_name}, got {url!r}")
        data = {k: v for k, v in data.items() if k != "@type"}
    _convert_message(data, msg, path, 0)
    return msg


def unpack_any(any_msg: Any, path: str) -> Message | OpaqueAny:
    """The message inside an ``Any``; ``OpaqueAny`` for types xds-protos does not know.

    ``udpa.type.v1.TypedStruct`` / ``xds.type.v3.TypedStruct`` are looked through: their inner
    ``type_url`` is parsed from the ``value`` struct when known (errors under ``path.value``),
    else returned as ``OpaqueAny(inner type_url, value dict)``.
    """
    type_url = any_msg.type_url
    name = typeindex.type_name(type_url)
    cls = typeindex.message_class(name) if name else None
    if cls is None:
        return OpaqueAny(type_url, _opaque_value(any_msg.value))
    msg = cls()
    try:
        msg.ParseFromString(any_msg.value)
    except DecodeError as e:
        raise ConfigError(path, f"cannot decode {name}: {e}") from None
    if name in TYPED_STRUCT_TYPES:
        inner_url = msg.type_url
        value = _struct_to_dict(msg.value)
        inner_cls = typeindex.resolve_type_url(inner_url)
        if inner_cls is None:
            return OpaqueAny(inner_url, value)
        if inner_cls.DESCRIPTOR.full_name in TYPED_STRUCT_TYPES:
            raise ConfigError(_join(path, "type_url"), "a TypedStruct cannot wrap another TypedStruct")
        return parse_message(value, inner_cls, _join(path, "value"))
    return msg


def load_document(text: str, source: str) -> dict[str, Any]:
    """YAML (or JSON, which YAML parses too) text -> the top-level mapping.

    Of a multi-document YAML stream only the first document is read, as Envoy (yaml-cpp's
    ``Load``) does. Nesting deeper than ``MAX_DOCUMENT_DEPTH`` and YAML aliases that expand the
    document past ``MAX_ALIAS_NODES`` (a "billion laughs" bomb) are errors, found before
    anything is built from the document.
    """
    stripped = text.lstrip()
    doc: Any = None
    if stripped.startswith("{"):
        # Real JSON goes through the JSON parser first: faster, and immune to YAML's quirks
        # with tabs. Anything it rejects gets a second chance as YAML (flow style, comments).
        try:
            doc = json.loads(text, object_pairs_hook=_json_pairs)
        except RecursionError:
            raise ConfigError("", f"nesting deeper than {MAX_DOCUMENT_DEPTH} levels", source) from None
        except ValueError:
            doc = None
        if doc is not None:
            _check_json_depth(doc, source)
    if doc is None:
        doc = _yaml_load(text, source)
    if doc is None:
        raise ConfigError("", "configuration is empty", source)
    if not isinstance(doc, dict):
        raise ConfigError("", f"top level must be a mapping of bootstrap fields, got {_kind(doc)}", source)
    return doc


def check_bootstrap(bootstrap: Any) -> None:
    """The checks Envoy makes when it loads a bootstrap, before building anything.

    Deeper semantic checks belong to the compilers of each object.
    """
    sr = bootstrap.static_resources
    names: dict[str, int] = {}
    for i, lst in enumerate(sr.listeners):
        p = f"static_resources.listeners[{i}]"
        if not lst.HasField("address") and not lst.HasField("internal_listener"):
            raise ConfigError(f"{p}.address", "listener address is required")
        if lst.name:
            if lst.name in names:
                raise ConfigError(
                    f"{p}.name",
                    f"duplicate listener name {lst.name!r} "
                    f"(first at static_resources.listeners[{names[lst.name]}])",
                )
            names[lst.name] = i
    names = {}
    for i, c in enumerate(sr.clusters):
        p = f"static_resources.clusters[{i}]"
        if not c.name:
            raise ConfigError(f"{p}.name", "cluster name is required")
        if c.name in names:
            raise ConfigError(
                f"{p}.name",
                f"duplicate cluster name {c.name!r} (first at static_resources.clusters[{names[c.name]}])",
            )
        names[c.name] = i
    names = {}
    for i, s in enumerate(sr.secrets):
        p = f"static_resources.secrets[{i}]"
        if s.name and s.name in names:
            raise ConfigError(
                f"{p}.name",
                f"duplicate secret name {s.name!r} (first at static_resources.secrets[{names[s.name]}])",
            )
        names[s.name] = i


# --- reading -----------------------------------------------------------------------------------


def _read_file(path: str) -> dict[str, Any]:
    ext = os.path.splitext(path)[1].lower()
    if ext in _UNSUPPORTED_EXT:
        raise ConfigError(
            "", f"binary/text-format protobuf configs ({ext}) are not supported; use YAML or JSON", path
        )
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError("", "config file not found", path) from None
    except IsADirectoryError:
        raise ConfigError("", "config path is a directory, not a file", path) from None
    except PermissionError:
        raise ConfigError("", "config file is not readable (permission denied)", path) from None
    except OSError as e:
        raise ConfigError("", f"cannot read config file: {e.strerror or e}", path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"config file is not UTF-8 text (byte offset {e.start})", path) from None
    return load_document(text, path)


def _parse_top(doc: dict[str, Any], bootstrap: Any, source: str) -> None:
    try:
        _convert_message(doc, bootstrap, "", 0)
    except ConfigError as e:
        raise e.with_source(source) from None


class _DuplicateKey(ValueError):
    pass


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader (C-accelerated when libyaml is present) that rejects duplicate keys.

    PyYAML keeps the last of two equal keys silently; Envoy rejects them, and a silently ignored
    listener block is the kind of human error config validation is there to stop. Keys brought in
    by a ``<<`` merge may be overridden; that is what merges are for.
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str, source: str) -> Any:
    try:
        loader = _Loader(text)  # derives from SafeLoader: no arbitrary objects
        try:
            # The first document only. check_node() consumes the stream start (libyaml's
            # get_node() assumes it has been) and is False for an empty stream.
            if not loader.check_node():
                return None
            node = loader.get_node()
            _check_yaml_graph(node, source)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError("", f"invalid YAML{where}: {what}", source) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"YAML error: {e}", source) from None
    except RecursionError:
        raise ConfigError("", f"nesting deeper than {MAX_DOCUMENT_DEPTH} levels", source) from None


def _check_json_depth(doc: Any, source: str) -> None:
    """Reject a parsed JSON document nested deeper than ``MAX_DOCUMENT_DEPTH`` (without recursing:
    the converters downstream do recurse)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DOCUMENT_DEPTH:
            raise ConfigError("", f"nesting deeper than {MAX_DOCUMENT_DEPTH} levels", source)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def _check_yaml_graph(root: Any, source: str) -> None:
    """Bound a composed YAML document before it is constructed.

    An alias is the same node object as its anchor, so the graph is small even when the tree it
    stands for is huge: eight levels of nine aliases write a hundred nodes and mean 43 million.
    Each node's expanded size and height are computed once (post-order, no recursion), so the
    check costs the size of the text, not of the expansion. A node that contains itself (a
    recursive alias) is an error too.
    """
    size: dict[int, int] = {}  # id(node) -> nodes in its expansion
    height: dict[int, int] = {}  # id(node) -> levels below it, itself included
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    written = 0
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _yaml_children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 1 + max((height[id(k)] for k in kids), default=0)
            if height[key] > MAX_DOCUMENT_DEPTH:
                raise ConfigError("", _at(node, f"nesting deeper than {MAX_DOCUMENT_DEPTH} levels"), source)
            continue
        if key in size:
            continue  # an alias of a node already measured
        if key in on_path:
            raise ConfigError("", _at(node, "a YAML alias refers to a node that contains it"), source)
        written += 1
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _yaml_children(node) if id(k) not in size)
        if len(on_path) > MAX_DOCUMENT_DEPTH:
            raise ConfigError("", _at(node, f"nesting deeper than {MAX_DOCUMENT_DEPTH} levels"), source)
    expanded = size[id(root)]
    if expanded - written > max(MAX_ALIAS_NODES, written):
        raise ConfigError(
            "",
            f"YAML aliases expand the document from {written} to {expanded} nodes "
            f"(more than {max(MAX_ALIAS_NODES, written)} added by aliases)",
            source,
        )


def _yaml_children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def _at(node: Any, msg: str) -> str:
    mark = getattr(node, "start_mark", None)
    return f"{msg} (at line {mark.line + 1})" if mark is not None else msg


# --- JSON tree -> message ----------------------------------------------------------------------

_fields_cache: dict[Descriptor, dict[str, FieldDescriptor]] = {}


def _fields(desc: Descriptor) -> dict[str, FieldDescriptor]:
    f = _fields_cache.get(desc)
    if f is None:
        f = {}
        for fd in desc.fields:
            f[fd.json_name] = fd
        for fd in desc.fields:
            f[fd.name] = fd  # proto names win over a clashing json name
        _fields_cache[desc] = f
    return f


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def _convert_message(js: Any, msg: Any, path: str, depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise ConfigError(path, f"nesting deeper than {MAX_DEPTH} messages")
    desc = msg.DESCRIPTOR
    full = desc.full_name
    if full == _ANY:
        _convert_any(js, msg, path, depth)
        return
    if full in _WRAPPERS:
        msg.value = _scalar(desc.fields_by_name["value"], js, path)
        return
    if full in _WKT_JSON:
        _convert_wkt(js, msg, path)
        return
    if not isinstance(js, dict):
        raise ConfigError(path, f"expected a mapping for {full}, got {_kind(js)}")
    fields = _fields(desc)
    seen: dict[int, str] = {}
    oneofs: dict[str, str] = {}
    for key, value in js.items():
        fd = fields.get(key) if isinstance(key, str) else None
        if fd is None:
            raise ConfigError(_join(path, str(key)), _unknown_field(desc, key))
        fpath = _join(path, fd.name)
        if fd.number in seen:
            raise ConfigError(fpath, f"field given twice (as {seen[fd.number]!r} and {key!r})")
        seen[fd.number] = key
        if value is None:
            # JSON null means "unset", except where null is a value of its own.
            if fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Value":
                getattr(msg, fd.name).null_value = 0
            continue
        oneof = fd.containing_oneof
        if oneof is not None:
            other = oneofs.get(oneof.name)
            if other is not None:
                raise ConfigError(
                    fpath, f"only one of the oneof {oneof.name!r} may be set, but {other!r} is set too"
                )
            oneofs[oneof.name] = fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            _convert_map(value, msg, fd, fpath, depth)
        elif fd.is_repeated:
            if not isinstance(value, list):
                value = [value]  # Envoy's leniency: a single element for a list
            target = getattr(msg, fd.name)
            if fd.message_type is not None:
                for i, item in enumerate(value):
                    ipath = f"{fpath}[{i}]"
                    if item is None and fd.message_type.full_name != "google.protobuf.Value":
                        raise ConfigError(ipath, "null is not allowed in a list")
                    _convert_message(item, target.add(), ipath, depth + 1)
            else:
                target.extend([_scalar(fd, item, f"{fpath}[{i}]") for i, item in enumerate(value)])
        elif fd.message_type is not None:
            sub = getattr(msg, fd.name)
            sub.SetInParent()
            _convert_message(value, sub, fpath, depth + 1)
        else:
            setattr(msg, fd.name, _scalar(fd, value, fpath))


def _unknown_field(desc: Descriptor, key: Any) -> str:
    msg = f"unknown field in {desc.full_name}"
    if isinstance(key, str):
        close = difflib.get_close_matches(key, [f.name for f in desc.fields], n=1, cutoff=0.75)
        if close:
            msg += f' (did you mean "{close[0]}"?)'
    return msg


def _convert_map(value: Any, msg: Any, fd: FieldDescriptor, fpath: str, depth: int) -> None:
    if not isinstance(value, dict):
        raise ConfigError(fpath, f"expected a mapping, got {_kind(value)}")
    entry = fd.message_type
    assert entry is not None
    kfd = entry.fields_by_name["key"]
    vfd = entry.fields_by_name["value"]
    target = getattr(msg, fd.name)
    for k, v in value.items():
        kpath = f"{fpath}[{json.dumps(str(k))}]"
        key = _map_key(kfd, k, kpath)
        if v is None:
            raise ConfigError(kpath, "null is not allowed as a map value")
        if vfd.message_type is not None:
            _convert_message(v, target[key], kpath, depth + 1)
        else:
            target[key] = _scalar(vfd, v, kpath)


def _map_key(kfd: FieldDescriptor, k: Any, kpath: str) -> Any:
    # JSON object keys are always strings; YAML may hand us ints or bools for unquoted keys.
    if kfd.type == FieldDescriptor.TYPE_STRING:
        if isinstance(k, bool):
            return "true" if k else "false"
        if isinstance(k, int | float | str):
            return str(k)
        raise ConfigError(kpath, f"map key must be a string, got {_kind(k)}")
    if kfd.type == FieldDescriptor.TYPE_BOOL:
        if isinstance(k, bool):
            return k
        if k in ("true", "false"):
            return k == "true"
        raise ConfigError(kpath, f"map key must be true or false, got {k!r}")
    return _scalar(kfd, k, kpath)


def _convert_wkt(js: Any, msg: Any, path: str) -> None:
    full = msg.DESCRIPTOR.full_name
    if full in ("google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask"):
        what = {
            "google.protobuf.Duration": 'a duration string such as "1.5s"',
            "google.protobuf.Timestamp": 'an RFC 3339 timestamp such as "2024-01-01T00:00:00Z"',
            "google.protobuf.FieldMask": 'a field mask string such as "a.b,c"',
        }[full]
        if isinstance(js, datetime.datetime) and full == "google.protobuf.Timestamp":
            js = js.isoformat().replace("+00:00", "Z")
            if not js.endswith("Z") and "+" not in js[10:] and "-" not in js[10:]:
                js += "Z"
        if not isinstance(js, str):
            raise ConfigError(path, f"expected {what}, got {_kind(js)}")
        try:
            msg.FromJsonString(js)
        except (ValueError, TypeError) as e:
            raise ConfigError(path, f"invalid value {js!r}: expected {what} ({e})") from None
        return
    if full == _STRUCT and not isinstance(js, dict):
        raise ConfigError(path, f"expected a mapping, got {_kind(js)}")
    if full == "google.protobuf.ListValue" and not isinstance(js, list):
        raise ConfigError(path, f"expected a list, got {_kind(js)}")
    try:
        json_format.ParseDict(_jsonable(js, path), msg)
    except json_format.ParseError as e:
        raise ConfigError(path, str(e)) from None


def _jsonable(v: Any, path: str) -> Any:
    """Free-form (Struct) data as plain JSON values: YAML may produce dates and non-string keys."""
    if isinstance(v, dict):
        out = {}
        for k, item in v.items():
            if isinstance(k, bool):
                k = "true" if k else "false"
            elif not isinstance(k, str):
                if not isinstance(k, int | float):
                    raise ConfigError(path, f"mapping key {k!r} is not a string")
                k = str(k)
            out[k] = _jsonable(item, _join(path, k))
        return out
    if isinstance(v, list):
        return [_jsonable(item, f"{path}[{i}]") for i, item in enumerate(v)]
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise ConfigError(path, f"value of type {type(v).__name__} cannot be represented in JSON")


def _convert_any(js: Any, msg: Any, path: str, depth: int) -> None:
    if not isinstance(js, dict):
        raise ConfigError(path, f'expected a mapping with "@type", got {_kind(js)}')
    if not js:
        # ``typed_config: {}``: an empty Any, as protobuf's JSON parser reads it. Envoy then picks
        # the extension by name with its default config (common on the router filter).
        return
    url = js.get("@type")
    if url is None:
        raise ConfigError(path, 'missing "@type": the type URL of the config, e.g. "type.googleapis.com/..."')
    if not isinstance(url, str) or "/" not in url or not url.rsplit("/", 1)[1]:
        raise ConfigError(_join(path, "@type"), f"invalid type URL {url!r}")
    cls = typeindex.resolve_type_url(url)
    if cls is None:
        # A type nobody installed a proto for: keep its JSON as a Struct under the original URL;
        # unpack_any() returns it as OpaqueAny.
        rest = {k: v for k, v in js.items() if k != "@type"}
        inner: Any = struct_pb2.Struct()
        _convert_wkt(rest, inner, path)
    else:
        inner = cls()
        full = inner.DESCRIPTOR.full_name
        if full in _WKT_JSON or full in _WRAPPERS or full == _ANY:
            extra = sorted(k for k in js if k not in ("@type", "value"))
            if extra:
                raise ConfigError(_join(path, extra[0]), f'unknown field: a packed {full} only has "value"')
            if "value" not in js:
                raise ConfigError(_join(path, "value"), f"missing value of packed {full}")
            _convert_message(js["value"], inner, _join(path, "value"), depth + 1)
        else:
            rest = {k: v for k, v in js.items() if k != "@type"}
            _convert_message(rest, inner, path, depth + 1)
    msg.type_url = url
    # Deterministic bytes so two loads of the same config compare equal (xDS updates diff them).
    msg.value = inner.SerializeToString(deterministic=True)


# --- scalars -----------------------------------------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1, "int32"),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1, "int32"),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1, "int32"),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1, "uint32"),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1, "uint32"),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1, "int64"),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1, "int64"),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1, "int64"),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1, "uint64"),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1, "uint64"),
}
_FLOAT32_MAX = 3.4028234663852886e38


def _scalar(fd: FieldDescriptor, v: Any, path: str) -> Any:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        if isinstance(v, str):
            return v
        raise ConfigError(path, f"expected a string, got {_kind(v)} {v!r} (quote it in YAML)")
    if t == FieldDescriptor.TYPE_BOOL:
        if isinstance(v, bool):
            return v
        raise ConfigError(path, f"expected true or false, got {_kind(v)} {v!r}")
    rng = _INT_RANGES.get(t)
    if rng is not None:
        return _integer(v, rng, path)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _floating(v, t == FieldDescriptor.TYPE_FLOAT, path)
    if t == FieldDescriptor.TYPE_ENUM:
        return _enum(fd, v, path)
    if t == FieldDescriptor.TYPE_BYTES:
        if not isinstance(v, str):
            raise ConfigError(path, f"expected base64 text, got {_kind(v)}")
        try:
            padded = v + "=" * (-len(v) % 4)
            alt = b"-_" if ("-" in v or "_" in v) else None
            return base64.b64decode(padded.encode("ascii"), altchars=alt, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(path, "invalid base64 data") from None
    raise ConfigError(path, f"unsupported field type {t}")  # groups: not in Envoy's API


def _integer(v: Any, rng: tuple[int, int, str], path: str) -> int:
    lo, hi, name = rng
    n: int
    if isinstance(v, bool):
        raise ConfigError(path, f"expected an integer ({name}), got a boolean")
    if isinstance(v, int):
        n = v
    elif isinstance(v, float):
        if not v.is_integer():
            raise ConfigError(path, f"expected an integer ({name}), got {v!r}")
        n = int(v)
    elif isinstance(v, str):
        # proto3 JSON writes 64-bit integers as strings; accept any integer text.
        try:
            n = int(v.strip())
        except ValueError:
            try:
                f = float(v)
            except ValueError:
                raise ConfigError(path, f"expected an integer ({name}), got {v!r}") from None
            if not f.is_integer():
                raise ConfigError(path, f"expected an integer ({name}), got {v!r}") from None
            n = int(f)
    else:
        raise ConfigError(path, f"expected an integer ({name}), got {_kind(v)}")
    if not lo <= n <= hi:
        raise ConfigError(path, f"value {n} out of range for {name} [{lo}, {hi}]")
    return n


def _floating(v: Any, single: bool, path: str) -> float:
    if isinstance(v, bool):
        raise ConfigError(path, "expected a number, got a boolean")
    if isinstance(v, int | float):
        f = float(v)
    elif isinstance(v, str):
        special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        if v in special:
            return special[v]
        try:
            f = float(v)
        except ValueError:
            raise ConfigError(path, f"expected a number, got {v!r}") from None
    else:
        raise ConfigError(path, f"expected a number, got {_kind(v)}")
    if single and math.isfinite(f) and abs(f) > _FLOAT32_MAX:
        raise ConfigError(path, f"value {v!r} out of range for float")
    return f


def _enum(fd: FieldDescriptor, v: Any, path: str) -> int:
    et = fd.enum_type
    assert et is not None
    if isinstance(v, str):
        ev = et.values_by_name.get(v)
        if ev is None:
            # Envoy parses enum names case-insensitively (``codec_type: auto``,
            # ``type: strict_dns``): protobuf's case_insensitive_enum_parsing option.
            ev = _enum_folded(et).get(v.upper())
        if ev is not None:
            return int(ev.number)
        names = list(et.values_by_name)
        close = difflib.get_close_matches(v.upper(), names, n=1, cutoff=0.6)
        hint = f' (did you mean "{close[0]}"?)' if close else f" (expected one of {', '.join(names)})"
        raise ConfigError(path, f'invalid enum value "{v}"{hint}')
    if isinstance(v, int) and not isinstance(v, bool):
        # proto3 JSON allows the number instead of the name. An open enum would keep an undefined
        # number, but nothing downstream can act on it (Envoy rejects it in validation too).
        # The range test comes first: upb's values_by_number truncates keys to 32 bits.
        if -(2**31) <= v < 2**31 and v in et.values_by_number:
            return v
        defined = ", ".join(f"{n.number} ({n.name})" for n in et.values)
        raise ConfigError(path, f"invalid enum number {v} for {et.full_name} (defined: {defined})")
    raise ConfigError(path, f"expected an enum name of {et.full_name}, got {_kind(v)}")


_enum_folded_cache: dict[Any, dict[str, Any]] = {}


def _enum_folded(et: Any) -> dict[str, Any]:
    folded = _enum_folded_cache.get(et)
    if folded is None:
        folded = {}
        for ev in et.values:
            folded.setdefault(ev.name.upper(), ev)
        _enum_folded_cache[et] = folded
    return folded


# --- Any helpers -------------------------------------------------------------------------------


def _struct_to_dict(s: Any) -> dict[str, Any]:
    d = json_format.MessageToDict(s)
    out = _ints_back(d)
    return out if isinstance(out, dict) else {}


def _opaque_value(data: bytes) -> dict[str, Any]:
    """Decode what ``_convert_any`` packed for an unknown type. Binary payloads of unknown types
    (from a binary xDS stream) are not Structs; they come back as an empty dict."""
    s = struct_pb2.Struct()
    try:
        s.ParseFromString(data)
    except DecodeError:
        return {}
    if len(unknown_fields.UnknownFieldSet(s)):
        return {}
    try:
        return _struct_to_dict(s)
    except Exception:
        return {}


def _ints_back(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if isinstance(v, dict):
        return {k: _ints_back(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_ints_back(x) for x in v]
    return v


def pack(msg: Message) -> Any:
    """``Any`` holding ``msg`` (for tests and for builders of synthetic configs)."""
    a = any_pb2.Any()
    a.type_url = f"type.googleapis.com/{msg.DESCRIPTOR.full_name}"
    a.value = msg.SerializeToString(deterministic=True)
    return a
