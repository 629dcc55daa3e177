"""RPC protocol codecs for the x-protocol framework (see ``api.py`` and this package's README).

``builtin_codecs()`` maps each protocol's configured name to its codec. A new protocol adds its
module to ``_MODULES``; each module exports ``CODECS``, a tuple of ``api.XCodec`` objects."""

from __future__ import annotations

import importlib

from moorline.protocol.xprotocol.api import XCodec

# One line per protocol module (each exports CODECS).
_MODULES: tuple[str, ...] = ("bolt", "dubbo", "example")


def builtin_codecs() -> dict[str, XCodec]:
    out: dict[str, XCodec] = {}
    for name in _MODULES:
        mod = importlib.import_module(f"moorline.protocol.xprotocol.{name}")
        for codec in mod.CODECS:
            out[codec.name] = codec
    return out
