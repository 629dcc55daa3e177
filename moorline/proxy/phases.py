"""The request lifecycle, named (MOSN's proxy phases, ``pkg/types/proxy.go``)."""

from __future__ import annotations

import enum


class Phase(enum.IntEnum):
    """Where a stream is in its lifecycle (MOSN's proxy phases, ``types/proxy.go``): the one
    state value of an ``ActiveStream``. Only the request direction has a second fact of its
    own, ``request_complete`` (a response may start before the request body ended)."""

    INIT = 0  # created by the codec; request headers not yet decoded
    DOWNSTREAM_FILTERS = 1  # request headers in the decoder filters
    MATCH_ROUTE = 2  # picking the route (cached; a filter may clear it)
    CHOOSE_HOST = 3  # the router picks the cluster and host
    UPSTREAM_REQUEST = 4  # the request goes upstream; no response yet
    UPSTREAM_RESPONSE = 5  # a response (upstream or local) started downstream
    END = 6  # finished or reset: stats and access log done
