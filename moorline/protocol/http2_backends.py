"""The HTTP/2 codec backend the glues use: ``Codec(client_side, options)``.

Two backends have one contract (the one documented in ``moorline.protocol.http2``):

- ``nghttp2``: ``moorline.protocol._nghttp2.NgCodec``, libnghttp2 driven from Cython. It is
  chosen whenever it is built (``scripts/build-native.py``; ``make`` does it).
- ``h2``: ``moorline.protocol.http2.Http2Codec`` on the pure-Python ``h2`` library, the
  reference. ``MOORLINE_HTTP2_BACKEND=h2`` forces it, and so does ``MOORLINE_PURE_PYTHON=1``
  (the reference run of the test suite) unless ``MOORLINE_HTTP2_BACKEND=nghttp2`` says otherwise.

``MOORLINE_HTTP2_BACKEND=nghttp2`` or ``MOORLINE_REQUIRE_NATIVE=1`` make a missing build an
import error instead of a fallback. ``BACKEND`` names the one that runs (the startup log says it).
"""

from __future__ import annotations

import os
from typing import Any

from moorline.protocol.http2 import Http2Codec

_want = os.environ.get("MOORLINE_HTTP2_BACKEND", "").strip().lower()
if _want not in ("", "h2", "nghttp2"):
    raise ImportError(f"MOORLINE_HTTP2_BACKEND={_want!r}: must be h2 or nghttp2")
if not _want and os.environ.get("MOORLINE_PURE_PYTHON"):
    _want = "h2"

Codec: Any = Http2Codec
BACKEND = "h2"
# Why the h2 backend runs when it was not asked for (the startup log says it), else "".
FALLBACK = ""
if _want != "h2":
    try:
        from moorline.protocol._nghttp2 import NgCodec  # type: ignore[import-not-found,unused-ignore]
    except ImportError as e:
        if _want == "nghttp2" or os.environ.get("MOORLINE_REQUIRE_NATIVE"):
            raise
        FALLBACK = f"the libnghttp2 codec is not built ({e}; scripts/build-native.py builds it)"
    else:
        Codec = NgCodec
        BACKEND = "nghttp2"
