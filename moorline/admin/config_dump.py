"""``/config_dump`` helpers: Envoy's redaction, timestamps, and the ``resource`` / ``mask`` views.

Redaction is Envoy's (``MessageUtil::redact``): every field annotated
``[(udpa.annotations.sensitive) = true]`` in the v3 protos (TLS private keys, passwords, PKCS#12,
session ticket keys, generic secrets, ...) is redacted together with everything below it: strings
become ``"[redacted]"``, bytes ``b"[redacted]"`` (base64 ``W3JlZGFjdGVkXQ==`` in JSON, as Envoy
prints it), other scalars are cleared. ``Any`` values are unpacked (types from the type index)
and redacted inside. Inside ``google.protobuf.Struct`` values (``TypedStruct`` configs of types
the index does not know) there are no annotations, so values under the usual secret key names
are redacted instead.

Views (the admin's query parameters):

- ``resource=<field>``: the items of that repeated field of whichever config has it (for example
  ``dynamic_active_clusters``), each as its own message with its ``@type``
  (``type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster``).
- ``mask=<a.b,c>``: a field mask applied to each config (or to each item with ``resource``);
  paths go through nested messages (also into an ``Any``) and apply to every element of a
  repeated field on the way; ``@type`` is kept at every level.
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from moorline.config.typeindex import message_class, resolve_type_url

REDACTED = "[redacted]"
# Struct values (no annotations) under these keys are redacted.
STRUCT_SECRET_KEYS = frozenset(
    ("private_key", "password", "pkcs12", "session_ticket_keys", "secret", "secrets", "hmac_secret")
)
_MAX_DEPTH = 100  # config protos nest far less; bounds the walk on a hostile Struct


def _sensitive(fd: FieldDescriptor) -> bool:
    from udpa.annotations import sensitive_pb2

    opts = fd.GetOptions()
    return bool(opts.HasExtension(sensitive_pb2.sensitive) and opts.Extensions[sensitive_pb2.sensitive])


def redact(msg: Message) -> Message:
    """A copy of ``msg`` with every sensitive field redacted (see the module docstring)."""
    out = type(msg)()
    out.CopyFrom(msg)
    _redact(out, False, 0)
    return out


def _redact(m: Message, under_sensitive: bool, depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    name = m.DESCRIPTOR.full_name
    if name == "google.protobuf.Any":
        _redact_any(m, under_sensitive, depth)
        return
    if name == "google.protobuf.Struct":
        _redact_struct(m, under_sensitive, depth)
        return
    for fd, value in list(m.ListFields()):
        sensitive = under_sensitive or _sensitive(fd)
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                vfd = fd.message_type.fields_by_name["value"]
                for k in list(value):
                    if vfd.type == FieldDescriptor.TYPE_MESSAGE:
                        _redact(value[k], sensitive, depth + 1)
                    elif sensitive:
                        _redact_scalar_map(value, k, vfd)
            elif fd.is_repeated:
                for v in value:
                    _redact(v, sensitive, depth + 1)
            else:
                _redact(value, sensitive, depth + 1)
        elif sensitive:
            _redact_scalar(m, fd)


def _redact_scalar(m: Message, fd: FieldDescriptor) -> None:
    repeated = fd.is_repeated
    if fd.type == FieldDescriptor.TYPE_STRING:
        if repeated:
            field = getattr(m, fd.name)
            field[:] = [REDACTED] * len(field)
        else:
            setattr(m, fd.name, REDACTED)
    elif fd.type == FieldDescriptor.TYPE_BYTES:
        if repeated:
            field = getattr(m, fd.name)
            field[:] = [REDACTED.encode()] * len(field)
        else:
            setattr(m, fd.name, REDACTED.encode())
    else:
        m.ClearField(fd.name)


def _redact_scalar_map(mp: Any, key: Any, vfd: FieldDescriptor) -> None:
    if vfd.type == FieldDescriptor.TYPE_STRING:
        mp[key] = REDACTED
    elif vfd.type == FieldDescriptor.TYPE_BYTES:
        mp[key] = REDACTED.encode()
    else:
        del mp[key]


OPAQUE_KEY = "@moorline.opaque_type"  # marks an Any of an unknown type, see _opaque


def _redact_any(m: Any, under_sensitive: bool, depth: int) -> None:
    cls = resolve_type_url(m.type_url)
    if cls is None:
        _opaque(m, under_sensitive, depth)
        return
    inner = cls()
    if not m.Unpack(inner):
        return
    _redact(inner, under_sensitive, depth + 1)
    prefix, _, _ = m.type_url.rpartition("/")
    m.Pack(inner, type_url_prefix=prefix or "type.googleapis.com")


def _opaque(m: Any, under_sensitive: bool, depth: int) -> None:
    """An Any of a type no installed proto describes (Istio's ``stats.PluginConfig``, say) cannot
    be printed by protobuf's JSON printer. Its payload (the JSON it was configured with, kept as
    a Struct by the loader) is repacked as a Struct carrying the original type URL under
    ``OPAQUE_KEY``; ``restore_opaque`` puts it back in the rendered dump as
    ``{"@type": <original>, ...fields}``. A binary payload of an unknown type shows no fields."""
    from google.protobuf import struct_pb2

    from moorline.config.loader import _opaque_value

    fields = _opaque_value(m.value) if m.value else {}
    s = struct_pb2.Struct()
    s.update(fields)
    _redact_struct(s, under_sensitive, depth + 1)
    s.fields[OPAQUE_KEY].string_value = m.type_url
    m.Pack(s)


def restore_opaque(d: Any) -> Any:
    """Undo ``_opaque`` in a rendered (JSON-shaped) dump, in place; returns ``d``."""
    if isinstance(d, dict):
        v = d.get("value")
        if d.get("@type", "").endswith("/google.protobuf.Struct") and isinstance(v, dict) and OPAQUE_KEY in v:
            url = v.pop(OPAQUE_KEY)
            d.clear()
            d["@type"] = url
            d.update(v)
        for x in d.values():
            restore_opaque(x)
    elif isinstance(d, list):
        for x in d:
            restore_opaque(x)
    return d


def _redact_struct(s: Any, under_sensitive: bool, depth: int) -> None:
    for k in list(s.fields):
        _redact_value(s.fields[k], under_sensitive or k in STRUCT_SECRET_KEYS, depth + 1)


def _redact_value(v: Any, sensitive: bool, depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    kind = v.WhichOneof("kind")
    if kind == "struct_value":
        _redact_struct(v.struct_value, sensitive, depth)
    elif kind == "list_value":
        for x in v.list_value.values:
            _redact_value(x, sensitive, depth + 1)
    elif sensitive and kind in ("string_value", "number_value", "bool_value"):
        v.string_value = REDACTED


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(int(t * 1000))  # Envoy prints milliseconds ("...06.063Z")
    return ts


def now() -> timestamp_pb2.Timestamp:
    return timestamp(time.time())


# -- views -------------------------------------------------------------------------------------


class ViewError(ValueError):
    """A ``resource`` or ``mask`` the dump cannot answer (404 / 400 with the message)."""


def select(dump: dict[str, Any], resource: str | None, mask: str | None) -> dict[str, Any]:
    """Envoy's ``/config_dump?resource=...&mask=...`` over a rendered dump."""
    paths = [p.strip() for p in mask.split(",") if p.strip()] if mask else []
    configs = dump.get("configs", [])
    if not resource:
        return {"configs": [_masked(c, paths) for c in configs]} if paths else dump
    out: list[dict[str, Any]] = []
    found = False
    for c in configs:
        item_type = _item_type(c.get("@type", ""), resource)
        if item_type is None:
            continue
        found = True
        for item in c.get(resource, []):
            one = {"@type": f"type.googleapis.com/{item_type}", **item}
            out.append(_masked(one, paths) if paths else one)
    if not found:
        raise ViewError(f"no resource {resource!r} in the config dump")
    return {"configs": out}


def _item_type(config_type: str, field: str) -> str | None:
    cls = message_class(config_type.rpartition("/")[2]) if config_type else None
    if cls is None:
        return None
    fd = cls.DESCRIPTOR.fields_by_name.get(field)
    if fd is None or not fd.is_repeated or fd.message_type is None:
        return None
    return fd.message_type.full_name  # type: ignore[no-any-return]


def _masked(d: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for p in paths:
        node = tree
        for part in p.split("."):
            node = node.setdefault(part, {})
    out: dict[str, Any] = _apply(d, tree)
    return out


def _apply(value: Any, tree: dict[str, Any]) -> Any:
    if not tree:
        return value
    if isinstance(value, list):
        return [_apply(v, tree) for v in value]
    if not isinstance(value, dict):
        return value
    # "@type" stays at every level: a masked Any still says what it is.
    out = {"@type": value["@type"]} if "@type" in value else {}
    for k, sub in tree.items():
        if k in value:
            out[k] = _apply(value[k], sub)
    return out
