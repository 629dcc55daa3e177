"""Filter chains of a listener: compile them once, pick one per accepted connection.

Two ways to pick. With ``Listener.filter_chain_matcher`` (Envoy's unified matcher API, what Istio
sends) the compiled matcher names the chain; see ``FilterChainMatcherSelector`` at the end. Else
selection follows Envoy's ``filter_chain_match`` semantics: the criteria are looked at level by
level in a fixed order, and at each level only the chains with the *most specific* match survive
(an exact destination port beats "any port", the longest destination prefix beats shorter ones and
"any address", an exact server name beats the longest wildcard, ...). There is no backtracking: if
the most specific chains of one level all fail a later level, the connection gets the default
filter chain (or none), exactly as in Envoy. A chain with no criteria matches everything.

Level order (Envoy's): destination_port, prefix_ranges (destination IP), server_names,
transport_protocol, application_protocols, direct_source_prefix_ranges, source_type,
source_prefix_ranges, source_ports.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import socket
from collections.abc import Callable
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.net.api import ConnectionFilter
from moorline.net.conn_info import ConnInfo

SOURCE_ANY = 0
SOURCE_SAME_IP_OR_LOOPBACK = 1
SOURCE_EXTERNAL = 2

RAW_BUFFER_NAMES = ("envoy.transport_sockets.raw_buffer", "raw_buffer")
RAW_BUFFER_TYPE = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"

# (version, network as int, netmask as int, prefix length)
_Cidr = tuple[int, int, int, int]
# (version, address as int)
_Ip = tuple[int, int]

_EXACT_NAME_RANK = 1 << 16  # beats any wildcard suffix length (names are < 256 bytes)
_MAX_DUP_EXPANSION = 100_000  # bound on the work spent looking for duplicate chains


def parse_ip(s: str | None) -> _Ip | None:
    """Text address -> (version, int); IPv4-mapped IPv6 becomes IPv4 (dual-stack listeners)."""
    if not s:
        return None
    try:
        a = ipaddress.ip_address(s.split("%", 1)[0])
    except ValueError:
        return None
    if a.version == 6:
        m = a.ipv4_mapped  # type: ignore[union-attr]
        if m is not None:
            return (4, int(m))
    return (a.version, int(a))


def _compile_cidrs(ranges: Any, path: str) -> tuple[_Cidr, ...]:
    out: list[_Cidr] = []
    for i, r in enumerate(ranges):
        plen = int(r.prefix_len.value) if r.HasField("prefix_len") else 0
        try:
            net = ipaddress.ip_network(f"{r.address_prefix}/{plen}", strict=False)
        except ValueError as e:
            raise ConfigError(f"{path}[{i}]", f"invalid CIDR range {r.address_prefix}/{plen}: {e}") from None
        out.append((net.version, int(net.network_address), int(net.netmask), net.prefixlen))
    return tuple(out)


def _cidr_rank(cidrs: tuple[_Cidr, ...], ip: _Ip | None) -> int:
    """0: chain has no ranges (matches any); 1 + longest matching prefix; -1: no range matches."""
    if not cidrs:
        return 0
    if ip is None:
        return -1
    ver, addr = ip
    best = -1
    for cver, net, mask, plen in cidrs:
        if cver == ver and addr & mask == net and plen + 1 > best:
            best = plen + 1
    return best


class FilterChainMatch:
    """Compiled ``envoy.config.listener.v3.FilterChainMatch``."""

    __slots__ = (
        "application_protocols",
        "destination_port",
        "direct_source_prefix_ranges",
        "prefix_ranges",
        "server_names",
        "source_ports",
        "source_prefix_ranges",
        "source_type",
        "transport_protocol",
    )

    def __init__(self, proto: Any = None, path: str = "") -> None:
        self.destination_port: int | None = None
        self.prefix_ranges: tuple[_Cidr, ...] = ()
        self.server_names: tuple[str, ...] = ()
        self.transport_protocol = ""
        self.application_protocols: frozenset[str] = frozenset()
        self.direct_source_prefix_ranges: tuple[_Cidr, ...] = ()
        self.source_type = SOURCE_ANY
        self.source_prefix_ranges: tuple[_Cidr, ...] = ()
        self.source_ports: frozenset[int] = frozenset()
        if proto is None:
            return
        if proto.HasField("destination_port"):
            port = int(proto.destination_port.value)
            if not 1 <= port <= 65535:
                raise ConfigError(f"{path}.destination_port", f"port {port} out of range")
            self.destination_port = port
        if proto.address_suffix or proto.HasField("suffix_len"):
            raise ConfigError(f"{path}.address_suffix", "address_suffix/suffix_len are not supported")
        self.prefix_ranges = _compile_cidrs(proto.prefix_ranges, f"{path}.prefix_ranges")
        names = []
        for i, n in enumerate(proto.server_names):
            n = n.lower()
            if n.startswith("*."):
                pass
            elif "*" in n:
                raise ConfigError(
                    f"{path}.server_names[{i}]", f"unsupported wildcard {n!r} (only '*.suffix')"
                )
            names.append(n)
        self.server_names = tuple(names)
        self.transport_protocol = proto.transport_protocol
        self.application_protocols = frozenset(proto.application_protocols)
        self.direct_source_prefix_ranges = _compile_cidrs(
            proto.direct_source_prefix_ranges, f"{path}.direct_source_prefix_ranges"
        )
        self.source_type = int(proto.source_type)
        self.source_prefix_ranges = _compile_cidrs(proto.source_prefix_ranges, f"{path}.source_prefix_ranges")
        for i, p in enumerate(proto.source_ports):
            if not 1 <= p <= 65535:
                raise ConfigError(f"{path}.source_ports[{i}]", f"port {p} out of range")
        self.source_ports = frozenset(int(p) for p in proto.source_ports)

    def is_empty(self) -> bool:
        return not (
            self.destination_port is not None
            or self.prefix_ranges
            or self.server_names
            or self.transport_protocol
            or self.application_protocols
            or self.direct_source_prefix_ranges
            or self.source_type
            or self.source_prefix_ranges
            or self.source_ports
        )

    def _leaf_keys(self) -> tuple[int, Any]:
        """Every elementary combination this match covers (for duplicate detection).

        Returns (count, iterator); Envoy rejects two chains sharing any combination."""
        dims: list[tuple[Any, ...]] = [
            (self.destination_port,),
            self.prefix_ranges or (None,),
            self.server_names or (None,),
            (self.transport_protocol,),
            tuple(sorted(self.application_protocols)) or (None,),
            self.direct_source_prefix_ranges or (None,),
            (self.source_type,),
            self.source_prefix_ranges or (None,),
            tuple(sorted(self.source_ports)) or (None,),
        ]
        n = 1
        for d in dims:
            n *= len(d)
        return n, itertools.product(*dims)

    def _normalized(self) -> tuple[Any, ...]:
        return (
            self.destination_port,
            tuple(sorted(self.prefix_ranges)),
            tuple(sorted(self.server_names)),
            self.transport_protocol,
            tuple(sorted(self.application_protocols)),
            tuple(sorted(self.direct_source_prefix_ranges)),
            self.source_type,
            tuple(sorted(self.source_prefix_ranges)),
            tuple(sorted(self.source_ports)),
        )


class FilterChain:
    """A compiled filter chain: the match, the non-terminal filters and the terminal filter.

    ``terminal.on_accept(sock, info)`` takes ownership of the accepted socket. ``tls`` is the
    chain's compiled ``DownstreamTlsContext`` (``moorline.net.tls.DownstreamTls``) or ``None``;
    it travels to the terminal filter as ``info.tls``, and ``filters`` (the non-terminal
    ``moorline.net.api.ConnectionFilter``s, a tuple) as ``info.filters``."""

    __slots__ = ("filters", "index", "match", "name", "terminal", "tls")

    def __init__(
        self,
        name: str,
        match: FilterChainMatch,
        terminal: Any,
        filters: list[Any] | tuple[Any, ...],
        index: int,
        tls: Any = None,
    ) -> None:
        self.name = name
        self.match = match
        self.terminal = terminal
        self.filters = tuple(filters)
        self.index = index  # position in filter_chains; -1 for the default chain
        self.tls = tls

    def on_accept(self, sock: socket.socket, info: ConnInfo) -> None:
        info.tls = self.tls
        info.filters = self.filters
        self.terminal.on_accept(sock, info)

    def __repr__(self) -> str:
        return f"FilterChain({self.name!r})"


class _CloseTerminal:
    """Terminal of a chain without filters: Envoy accepts such a chain and closes its connections."""

    terminal = True

    def on_accept(self, sock: socket.socket, info: ConnInfo) -> None:
        sock.close()
        info.notify_closed()


def _is_local(src: _Ip | None, dst: _Ip | None) -> bool:
    """Envoy's SAME_IP_OR_LOOPBACK: loopback source, the source equal to the destination, or a pipe."""
    if src is None:
        return True
    ver, addr = src
    if ver == 4 and addr >> 24 == 127:
        return True
    if ver == 6 and addr == 1:
        return True
    return src == dst


class FilterChainSelector:
    """Picks the filter chain for a connection; see the module docstring for the rules."""

    __slots__ = ("_levels", "_single", "chains", "default")

    def __init__(self, chains: list[FilterChain], default: FilterChain | None) -> None:
        self.chains = chains
        self.default = default
        # Fast path: one chain that matches everything (the common sidecar/edge case).
        self._single = chains[0] if len(chains) == 1 and chains[0].match.is_empty() else None
        # Only look at levels some chain actually uses; a level nobody uses ranks every chain 0.
        self._levels: list[int] = []
        for lvl, used in enumerate(
            (
                any(c.match.destination_port is not None for c in chains),
                any(c.match.prefix_ranges for c in chains),
                any(c.match.server_names for c in chains),
                any(c.match.transport_protocol for c in chains),
                any(c.match.application_protocols for c in chains),
                any(c.match.direct_source_prefix_ranges for c in chains),
                any(c.match.source_type for c in chains),
                any(c.match.source_prefix_ranges for c in chains),
                any(c.match.source_ports for c in chains),
            )
        ):
            if used:
                self._levels.append(lvl)

    def select(
        self,
        dst_ip: str | None,
        dst_port: int | None,
        src_ip: str | None,
        src_port: int | None,
        server_name: str | None = None,
        transport: str = "raw_buffer",
        alpn: list[str] | None = None,
    ) -> FilterChain | None:
        if self._single is not None:
            return self._single
        candidates = self.chains
        if not candidates:
            return self.default
        dip = parse_ip(dst_ip)
        sip = parse_ip(src_ip)
        sni = server_name.lower() if server_name else None
        for lvl in self._levels:
            rank = _RANKERS[lvl]
            ranks = [rank(c.match, dip, dst_port, sip, src_port, sni, transport, alpn) for c in candidates]
            best = max(ranks)
            if best < 0:
                return self.default
            candidates = [c for c, r in zip(candidates, ranks, strict=True) if r == best]
        return candidates[0]


def _rank_dst_port(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    if m.destination_port is None:
        return 0
    return 1 if m.destination_port == dport else -1


def _rank_dst_ip(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    return _cidr_rank(m.prefix_ranges, dip)


def _rank_sni(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    if not m.server_names:
        return 0
    if sni is None:
        return -1
    best = -1
    for n in m.server_names:
        if n == sni:
            return _EXACT_NAME_RANK
        if n.startswith("*.") and sni.endswith(n[1:]) and len(n) > best:
            best = len(n)  # longer suffix = more specific
    return best


def _rank_transport(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    if not m.transport_protocol:
        return 0
    return 1 if m.transport_protocol == tp else -1


def _rank_alpn(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    if not m.application_protocols:
        return 0
    if alpn and not m.application_protocols.isdisjoint(alpn):
        return 1
    return -1


def _rank_direct_src(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    # Without PROXY protocol the direct source is the source.
    return _cidr_rank(m.direct_source_prefix_ranges, sip)


def _rank_src_type(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    if m.source_type == SOURCE_ANY:
        return 0
    local = _is_local(sip, dip)
    if m.source_type == SOURCE_SAME_IP_OR_LOOPBACK:
        return 1 if local else -1
    return -1 if local else 1


def _rank_src_ip(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    return _cidr_rank(m.source_prefix_ranges, sip)


def _rank_src_port(
    m: FilterChainMatch, dip: Any, dport: Any, sip: Any, sport: Any, sni: Any, tp: Any, alpn: Any
) -> int:
    if not m.source_ports:
        return 0
    return 1 if sport in m.source_ports else -1


_RANKERS: tuple[Callable[..., int], ...] = (
    _rank_dst_port,
    _rank_dst_ip,
    _rank_sni,
    _rank_transport,
    _rank_alpn,
    _rank_direct_src,
    _rank_src_type,
    _rank_src_ip,
    _rank_src_port,
)


# --- compilation -------------------------------------------------------------------------------


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _unpack(any_msg: Any, path: str) -> Any:
    """typed_config Any -> message (or OpaqueAny) via the config loader.

    Until the loader exists, resolve the type through the default descriptor pool and hand over
    the raw ``Any`` when the type is unknown there."""
    try:
        from moorline.config.loader import unpack_any
    except ImportError:
        pass
    else:
        return unpack_any(any_msg, path)
    from google.protobuf import descriptor_pool, message_factory

    type_name = any_msg.type_url.rsplit("/", 1)[-1]
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        return any_msg
    msg = message_factory.GetMessageClass(desc)()
    if not any_msg.Unpack(msg):
        raise ConfigError(path, f"cannot decode {type_name}")
    return msg


def _compile_filters(chain: Any, ctx: Any, path: str) -> tuple[Any, list[Any]]:
    filters: list[Any] = []
    terminal: Any = None
    n = len(chain.filters)
    for j, f in enumerate(chain.filters):
        fpath = f"{path}.filters[{j}]"
        kind = f.WhichOneof("config_type")
        if kind == "config_discovery":
            raise ConfigError(
                f"{fpath}.config_discovery", "extension config discovery (ECDS) is not supported"
            )
        type_url = f.typed_config.type_url if kind == "typed_config" else None
        ext = registry.lookup("network", f.name, type_url)
        if ext is None:
            reason = registry.noop_reason(f.name, type_url)
            if reason is not None and j < n - 1:
                ctx.notice(f"{fpath}: network filter {f.name!r} ignored: {reason}")
                continue
            if reason is not None:
                raise ConfigError(
                    fpath, f"the last filter must be a terminal filter; {f.name!r} is a no-op here ({reason})"
                )
            what = f"type {type_url.rsplit('/', 1)[-1]!r}" if type_url else f"name {f.name!r}"
            raise ConfigError(fpath, f"unknown or unsupported network filter ({what})")
        cfg = _unpack(f.typed_config, f"{fpath}.typed_config") if kind == "typed_config" else None
        obj = ext.factory(cfg, ctx, fpath)
        is_terminal = getattr(obj, "terminal", True)
        if j < n - 1:
            if is_terminal:
                raise ConfigError(fpath, f"terminal filter {f.name!r} must be the last filter in the chain")
            if not isinstance(obj, ConnectionFilter):
                raise ConfigError(fpath, f"network filter {f.name!r} has no on_new_connection hook")
            filters.append(obj)
        else:
            if not is_terminal or not hasattr(obj, "on_accept"):
                raise ConfigError(fpath, f"the last filter must be a terminal filter; {f.name!r} is not")
            terminal = obj
    if terminal is None:
        terminal = _CloseTerminal()
    return terminal, filters


def _compile_chain(chain: Any, ctx: Any, path: str, index: int, use_match: bool = True) -> FilterChain:
    if chain.HasField("use_proxy_proto") and chain.use_proxy_proto.value:
        raise ConfigError(f"{path}.use_proxy_proto", "PROXY protocol is not supported yet")
    tls = None
    if chain.HasField("transport_socket"):
        from moorline.net.tls import DownstreamTls, compile_transport_socket

        tls = compile_transport_socket(chain.transport_socket, ctx, f"{path}.transport_socket", server=True)
        if isinstance(tls, DownstreamTls) and chain.HasField("transport_socket_connect_timeout"):
            t = chain.transport_socket_connect_timeout
            secs = t.seconds + t.nanos / 1e9
            if secs > 0:
                tls.handshake_timeout = secs
    mpath = f"{path}.filter_chain_match"
    has_match = chain.HasField("filter_chain_match")
    if use_match:
        match = FilterChainMatch(chain.filter_chain_match if has_match else None, mpath)
    else:
        # filter_chain_matcher decides; Envoy ignores filter_chain_match then, but still refuses
        # the unimplemented address_suffix in it.
        if has_match and (
            chain.filter_chain_match.address_suffix or chain.filter_chain_match.HasField("suffix_len")
        ):
            raise ConfigError(f"{mpath}.address_suffix", "address_suffix/suffix_len are not supported")
        match = FilterChainMatch()
    terminal, filters = _compile_filters(chain, ctx, path)
    name = chain.name or (f"filter_chains[{index}]" if index >= 0 else "default_filter_chain")
    return FilterChain(name, match, terminal, filters, index, tls)


def compile_filter_chains(listener_proto: Any, ctx: Any, path: str) -> FilterChainSelector:
    """Compile ``filter_chains`` and ``default_filter_chain`` of a Listener proto.

    Raises ``ConfigError`` with the full field path (``path`` is the listener's own path)."""
    with_matcher = listener_proto.HasField("filter_chain_matcher")
    if with_matcher:
        _check_chain_names(listener_proto.filter_chains, path)
    chains: list[FilterChain] = []
    seen: dict[Any, int] = {}
    seen_norm: dict[Any, int] = {}
    for i, c in enumerate(listener_proto.filter_chains):
        cpath = _join(path, f"filter_chains[{i}]")
        fc = _compile_chain(c, ctx, cpath, i, use_match=not with_matcher)
        if with_matcher:
            chains.append(fc)
            continue
        # Envoy: "multiple filter chains with the same matching rules are defined".
        count, leaves = fc.match._leaf_keys()
        dup: int | None = None
        if count <= _MAX_DUP_EXPANSION:
            keys = list(leaves)
            for k in keys:
                if k in seen:
                    dup = seen[k]
                    break
            else:
                for k in keys:
                    seen[k] = i
        norm = fc.match._normalized()
        if dup is None and norm in seen_norm:
            dup = seen_norm[norm]
        seen_norm.setdefault(norm, i)
        if dup is not None:
            raise ConfigError(
                f"{cpath}.filter_chain_match",
                f"multiple filter chains with the same matching rules are defined (same as filter_chains[{dup}])",
            )
        chains.append(fc)
    default = None
    if listener_proto.HasField("default_filter_chain"):
        default = _compile_chain(
            listener_proto.default_filter_chain, ctx, _join(path, "default_filter_chain"), -1
        )
    if not chains and default is None:
        raise ConfigError(_join(path, "filter_chains"), "a listener needs at least one filter chain")
    if with_matcher:
        compiler = _MatcherCompiler(ctx, {fc.name: fc for fc in chains})
        root = compiler.matcher(listener_proto.filter_chain_matcher, _join(path, "filter_chain_matcher"))
        return FilterChainMatcherSelector(chains, default, root)
    return FilterChainSelector(chains, default)


# --- filter_chain_matcher: the unified matcher API ----------------------------------------------
#
# ``Listener.filter_chain_matcher`` (an ``xds.type.matcher.v3.Matcher``) is compiled once into a
# tree of small nodes; each node's ``match(conn)`` returns the chosen ``FilterChain`` or ``None``
# (no match). Exact maps are dicts, prefix maps are dicts probed at each configured prefix length
# (longest first), CIDR matchers are one dict per prefix length keyed by the masked address. A
# connection's facts are read into one ``_Conn``; no proto is touched per connection. Every
# compiled node is reached from one place only, so one selection visits each node at most once.
#
# Fall-through follows current Envoy: when a branch's nested matcher does not match, an exact
# map falls to its ``on_no_match``, a prefix map first tries its shorter matching prefixes, an
# IP matcher tries the less specific non-exclusive ranges, a matcher list tries its next entry.

_NET_INPUT_PKG = "envoy.extensions.matching.common_inputs.network.v3."
_IP_MATCHER_TYPE = "xds.type.matcher.v3.IPMatcher"
_IP_INPUT_MATCHER_TYPE = "envoy.extensions.matching.input_matchers.ip.v3.Ip"
_STRING_VALUE_TYPE = "google.protobuf.StringValue"


class _Conn:
    """The facts of one connection that the matcher's inputs read."""

    __slots__ = ("alpn", "dst_ip", "dst_port", "sni", "src_ip", "src_port", "transport")

    def __init__(
        self,
        dst_ip: str | None,
        dst_port: int | None,
        src_ip: str | None,
        src_port: int | None,
        sni: str | None,
        transport: str,
        alpn: list[str] | None,
    ) -> None:
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.src_ip = src_ip
        self.src_port = src_port
        self.sni = sni
        self.transport = transport
        self.alpn = alpn


def _ip_text(s: str | None) -> str | None:
    if not s:
        return None
    return s.split("%", 1)[0] if "%" in s else s


# Inputs: ``_Conn -> str | None`` (``None``: the input has no value, as Envoy's empty data).
def _in_dst_ip(c: _Conn) -> str | None:
    return _ip_text(c.dst_ip)


def _in_dst_port(c: _Conn) -> str | None:
    return None if c.dst_port is None else str(c.dst_port)


def _in_src_ip(c: _Conn) -> str | None:
    # Without PROXY protocol the direct source is the source (DirectSourceIPInput too).
    return _ip_text(c.src_ip)


def _in_src_port(c: _Conn) -> str | None:
    return None if c.src_port is None else str(c.src_port)


def _in_source_type(c: _Conn) -> str | None:
    return "local" if _is_local(parse_ip(c.src_ip), parse_ip(c.dst_ip)) else None


def _in_server_name(c: _Conn) -> str | None:
    return c.sni or None


def _in_transport(c: _Conn) -> str | None:
    return c.transport or None


def _in_alpn(c: _Conn) -> str | None:
    # Envoy's form: every offered protocol quoted, comma separated: 'h2','http/1.1'
    if not c.alpn:
        return None
    return "'" + "','".join(c.alpn) + "'"


def _in_nothing(c: _Conn) -> str | None:
    return None


_Input = Callable[[_Conn], "str | None"]

_INPUTS: dict[str, _Input] = {
    "DestinationIPInput": _in_dst_ip,
    "DestinationPortInput": _in_dst_port,
    "SourceIPInput": _in_src_ip,
    "SourcePortInput": _in_src_port,
    "DirectSourceIPInput": _in_src_ip,
    "SourceTypeInput": _in_source_type,
    "ServerNameInput": _in_server_name,
    "TransportProtocolInput": _in_transport,
    "ApplicationProtocolInput": _in_alpn,
}
_VALUELESS_INPUTS = {
    "FilterStateInput": "filter state is not kept at filter chain selection",
    "DynamicMetadataInput": "dynamic metadata is not kept at filter chain selection",
    "NetworkNamespaceInput": "network namespaces are not supported",
}


class _Node:
    __slots__ = ()

    def match(self, c: _Conn) -> FilterChain | None:
        raise NotImplementedError


class _Action(_Node):
    """A matched action: its chain, or ``_NO_CHAIN`` when it names a chain the listener lacks."""

    __slots__ = ("chain",)

    def __init__(self, chain: FilterChain | None) -> None:
        self.chain = chain if chain is not None else _NO_CHAIN

    def match(self, c: _Conn) -> FilterChain | None:
        return self.chain


# The result of an action that names no chain of the listener: the connection is closed (not
# given the default chain), as Envoy does.
_NO_CHAIN = FilterChain("<no such filter chain>", FilterChainMatch(), None, [], -2)


class _OnNoMatchOnly(_Node):
    """A matcher with neither list nor tree: its ``on_no_match`` (or nothing)."""

    __slots__ = ("on_no_match",)

    def __init__(self, on_no_match: _Node | None) -> None:
        self.on_no_match = on_no_match

    def match(self, c: _Conn) -> FilterChain | None:
        return None if self.on_no_match is None else self.on_no_match.match(c)


class _ExactMap(_Node):
    __slots__ = ("input", "on_no_match", "table")

    def __init__(self, inp: _Input, table: dict[str, _Node], on_no_match: _Node | None) -> None:
        self.input = inp
        self.table = table
        self.on_no_match = on_no_match

    def match(self, c: _Conn) -> FilterChain | None:
        v = self.input(c)
        if v is not None:
            t = self.table.get(v)
            if t is not None:
                r = t.match(c)
                if r is not None:
                    return r
        return None if self.on_no_match is None else self.on_no_match.match(c)


class _PrefixMap(_Node):
    """Longest prefix first; ``lengths`` are the configured prefix lengths, descending."""

    __slots__ = ("input", "lengths", "on_no_match", "table")

    def __init__(self, inp: _Input, table: dict[str, _Node], on_no_match: _Node | None) -> None:
        self.input = inp
        self.table = table
        self.lengths = tuple(sorted({len(k) for k in table}, reverse=True))
        self.on_no_match = on_no_match

    def match(self, c: _Conn) -> FilterChain | None:
        v = self.input(c)
        if v is not None:
            n = len(v)
            table = self.table
            for ln in self.lengths:
                if ln <= n:
                    t = table.get(v[:ln])
                    if t is not None:
                        r = t.match(c)
                        if r is not None:
                            return r
        return None if self.on_no_match is None else self.on_no_match.match(c)


# One prefix length of an IP matcher: (prefix length, shift, {address >> shift: [(index, exclusive, node)]})
_IpLevel = tuple[int, int, dict[int, list[tuple[int, bool, "_Node | None"]]]]


class _IpTrie(_Node):
    """``xds.type.matcher.v3.IPMatcher``: the ranges containing the address, most specific first.

    A range matcher whose nested match fails lets the less specific ones try, except those marked
    ``exclusive``, which only count when nothing more specific contains the address."""

    __slots__ = ("input", "levels", "on_no_match")

    def __init__(
        self, inp: _Input, levels: dict[int, tuple[_IpLevel, ...]], on_no_match: _Node | None
    ) -> None:
        self.input = inp
        self.levels = levels  # by IP version
        self.on_no_match = on_no_match

    def match(self, c: _Conn) -> FilterChain | None:
        ip = parse_ip(self.input(c))
        if ip is not None:
            ver, addr = ip
            more_specific = False
            tried: set[int] | None = None
            for _plen, shift, table in self.levels.get(ver, ()):
                entries = table.get(addr >> shift)
                if entries is None:
                    continue
                for idx, exclusive, node in entries:
                    if exclusive and more_specific:
                        continue
                    if tried is None:
                        tried = {idx}
                    elif idx in tried:
                        continue  # the same range matcher, reached again through a shorter range
                    else:
                        tried.add(idx)
                    if node is not None:
                        r = node.match(c)
                        if r is not None:
                            return r
                more_specific = True
        return None if self.on_no_match is None else self.on_no_match.match(c)


class _List(_Node):
    """``matcher_list``: the first entry whose predicate holds and whose on_match matches wins."""

    __slots__ = ("items", "on_no_match")

    def __init__(
        self, items: list[tuple[Callable[[_Conn], bool], _Node | None]], on_no_match: _Node | None
    ) -> None:
        self.items = items
        self.on_no_match = on_no_match

    def match(self, c: _Conn) -> FilterChain | None:
        for pred, node in self.items:
            if node is not None and pred(c):
                r = node.match(c)
                if r is not None:
                    return r
        return None if self.on_no_match is None else self.on_no_match.match(c)


class FilterChainMatcherSelector(FilterChainSelector):
    """Selection by ``filter_chain_matcher``: the matched action's chain, else the default chain.

    Each chain's ``filter_chain_match`` is ignored, as in Envoy."""

    __slots__ = ("_root",)

    def __init__(self, chains: list[FilterChain], default: FilterChain | None, root: _Node) -> None:
        self.chains = chains
        self.default = default
        self._single = None
        self._levels = []
        self._root = root

    def select(
        self,
        dst_ip: str | None,
        dst_port: int | None,
        src_ip: str | None,
        src_port: int | None,
        server_name: str | None = None,
        transport: str = "raw_buffer",
        alpn: list[str] | None = None,
    ) -> FilterChain | None:
        fc = self._root.match(_Conn(dst_ip, dst_port, src_ip, src_port, server_name, transport, alpn))
        if fc is None:
            return self.default
        return None if fc is _NO_CHAIN else fc


class _MatcherCompiler:
    """Compiles one listener's ``filter_chain_matcher``; ``names`` maps chain names to chains."""

    def __init__(self, ctx: Any, names: dict[str, FilterChain]) -> None:
        self.ctx = ctx
        self.names = names

    def matcher(self, m: Any, path: str) -> _Node:
        on_no_match = (
            self.on_match(m.on_no_match, _join(path, "on_no_match")) if m.HasField("on_no_match") else None
        )
        kind = m.WhichOneof("matcher_type")
        if kind == "matcher_tree":
            return self.tree(m.matcher_tree, _join(path, "matcher_tree"), on_no_match)
        if kind == "matcher_list":
            return self.list_(m.matcher_list, _join(path, "matcher_list"), on_no_match)
        return _OnNoMatchOnly(on_no_match)

    def on_match(self, om: Any, path: str) -> _Node | None:
        """``None`` when the on_match can never produce a chain (``keep_matching``: Envoy records
        such a match as skipped and goes on, and a listener has no use for skipped actions)."""
        kind = om.WhichOneof("on_match")
        node: _Node
        if kind == "matcher":
            node = self.matcher(om.matcher, _join(path, "matcher"))
        elif kind == "action":
            node = _Action(self.action(om.action, _join(path, "action")))
        else:
            raise ConfigError(path, "on_match needs a matcher or an action")
        return None if om.keep_matching else node

    def action(self, tec: Any, path: str) -> FilterChain | None:
        """The chain an action names; None (with a notice) for a name the listener has no chain
        of: Envoy accepts such a listener and closes the connections that match it (Istio's
        ``main_internal`` names chains of other listeners)."""
        cfg = _typed(tec, path, _STRING_VALUE_TYPE, "a filter chain action (the name of a filter chain)")
        chain = self.names.get(cfg.value)
        if chain is None:
            self.ctx.notice(
                f"{_join(path, 'typed_config.value')}: no filter chain named {cfg.value!r} in filter_chains; "
                "connections matching it are closed"
            )
        return chain

    def input(self, tec: Any, path: str) -> _Input:
        tpath = _join(path, "typed_config")
        if not tec.HasField("typed_config"):
            raise ConfigError(tpath, "a matching input needs a typed_config")
        name = tec.typed_config.type_url.rsplit("/", 1)[-1]
        short = name[len(_NET_INPUT_PKG) :] if name.startswith(_NET_INPUT_PKG) else ""
        fn = _INPUTS.get(short)
        if fn is not None:
            return fn
        why = _VALUELESS_INPUTS.get(short)
        if why is not None:
            self.ctx.notice(f"{path}: {short}: {why}; the input has no value, so it never matches")
            return _in_nothing
        raise ConfigError(tpath, f"unsupported input {name!r} for filter chain matching")

    def tree(self, t: Any, path: str, on_no_match: _Node | None) -> _Node:
        if not t.HasField("input"):
            raise ConfigError(_join(path, "input"), "a matcher_tree needs an input")
        inp = self.input(t.input, _join(path, "input"))
        kind = t.WhichOneof("tree_type")
        if kind in ("exact_match_map", "prefix_match_map"):
            mpath = _join(path, f"{kind}.map")
            mm = getattr(t, kind).map
            if not mm:
                raise ConfigError(mpath, "the map needs at least one entry")
            table: dict[str, _Node] = {}
            for key in sorted(mm):
                node = self.on_match(mm[key], f"{mpath}[{json.dumps(key)}]")
                if node is not None:
                    table[key] = node
            return (
                _ExactMap(inp, table, on_no_match)
                if kind == "exact_match_map"
                else _PrefixMap(inp, table, on_no_match)
            )
        if kind == "custom_match":
            return self.ip_trie(t.custom_match, _join(path, "custom_match"), inp, on_no_match)
        raise ConfigError(path, "a matcher_tree needs exact_match_map, prefix_match_map or custom_match")

    def ip_trie(self, tec: Any, path: str, inp: _Input, on_no_match: _Node | None) -> _Node:
        tpath = _join(path, "typed_config")
        ipm = _typed(tec, path, _IP_MATCHER_TYPE, "a matcher_tree custom_match")
        by_len: dict[tuple[int, int], dict[int, list[tuple[int, bool, _Node | None]]]] = {}
        for i, rm in enumerate(ipm.range_matchers):
            rpath = f"{tpath}.range_matchers[{i}]"
            if not len(rm.ranges):
                raise ConfigError(f"{rpath}.ranges", "at least one CIDR range is required")
            cidrs = _compile_cidrs(rm.ranges, f"{rpath}.ranges")
            if not rm.HasField("on_match"):
                raise ConfigError(f"{rpath}.on_match", "a range matcher needs an on_match")
            node = self.on_match(rm.on_match, f"{rpath}.on_match")
            for ver, net, _mask, plen in cidrs:
                shift = (32 if ver == 4 else 128) - plen
                entries = by_len.setdefault((ver, plen), {}).setdefault(net >> shift, [])
                if all(e[0] != i for e in entries):
                    entries.append((i, bool(rm.exclusive), node))
        levels: dict[int, list[_IpLevel]] = {}
        for (ver, plen), table in sorted(by_len.items(), key=lambda kv: -kv[0][1]):
            levels.setdefault(ver, []).append((plen, (32 if ver == 4 else 128) - plen, table))
        return _IpTrie(inp, {v: tuple(ls) for v, ls in levels.items()}, on_no_match)

    def list_(self, ml: Any, path: str, on_no_match: _Node | None) -> _Node:
        if not len(ml.matchers):
            raise ConfigError(_join(path, "matchers"), "a matcher_list needs at least one matcher")
        items: list[tuple[Callable[[_Conn], bool], _Node | None]] = []
        for i, fm in enumerate(ml.matchers):
            fpath = f"{path}.matchers[{i}]"
            if not fm.HasField("predicate"):
                raise ConfigError(f"{fpath}.predicate", "a field matcher needs a predicate")
            if not fm.HasField("on_match"):
                raise ConfigError(f"{fpath}.on_match", "a field matcher needs an on_match")
            pred = self.predicate(fm.predicate, f"{fpath}.predicate")
            items.append((pred, self.on_match(fm.on_match, f"{fpath}.on_match")))
        return _List(items, on_no_match)

    def predicate(self, p: Any, path: str) -> Callable[[_Conn], bool]:
        kind = p.WhichOneof("match_type")
        if kind == "single_predicate":
            return self.single(p.single_predicate, _join(path, "single_predicate"))
        if kind in ("or_matcher", "and_matcher"):
            ppath = _join(path, f"{kind}.predicate")
            subs = getattr(p, kind).predicate
            if len(subs) < 2:
                raise ConfigError(ppath, f"{kind} needs at least two predicates")
            preds = tuple(self.predicate(s, f"{ppath}[{i}]") for i, s in enumerate(subs))
            if kind == "or_matcher":
                return lambda c: any(q(c) for q in preds)
            return lambda c: all(q(c) for q in preds)
        if kind == "not_matcher":
            inner = self.predicate(p.not_matcher, _join(path, "not_matcher"))
            return lambda c: not inner(c)
        raise ConfigError(path, "a predicate needs single_predicate, or_matcher, and_matcher or not_matcher")

    def single(self, sp: Any, path: str) -> Callable[[_Conn], bool]:
        if not sp.HasField("input"):
            raise ConfigError(_join(path, "input"), "a single_predicate needs an input")
        inp = self.input(sp.input, _join(path, "input"))
        kind = sp.WhichOneof("matcher")
        if kind == "value_match":
            from moorline.config.matchers import StringMatcher

            sm = StringMatcher.compile(sp.value_match, _join(path, "value_match"))

            def value_test(c: _Conn) -> bool:
                v = inp(c)
                return v is not None and sm.match(v.encode("utf-8", "surrogateescape"))

            return value_test
        if kind == "custom_match":
            tpath = _join(path, "custom_match.typed_config")
            cfg = _typed(
                sp.custom_match, _join(path, "custom_match"), _IP_INPUT_MATCHER_TYPE, "an input matcher"
            )
            if not len(cfg.cidr_ranges):
                raise ConfigError(f"{tpath}.cidr_ranges", "at least one CIDR range is required")
            cidrs = _compile_cidrs(cfg.cidr_ranges, f"{tpath}.cidr_ranges")
            return lambda c: _cidr_rank(cidrs, parse_ip(inp(c))) > 0
        raise ConfigError(path, "a single_predicate needs value_match or custom_match")


def _typed(tec: Any, path: str, expected: str, what: str) -> Any:
    """The message in ``TypedExtensionConfig`` ``tec``, which must be of type ``expected``."""
    tpath = _join(path, "typed_config")
    got = tec.typed_config.type_url.rsplit("/", 1)[-1] if tec.HasField("typed_config") else ""
    if got != expected:
        raise ConfigError(tpath, f"{what}: only {expected} is supported, not {got or tec.name!r}")
    cfg = _unpack(tec.typed_config, tpath)
    desc = getattr(cfg, "DESCRIPTOR", None)
    if desc is None or desc.full_name != expected:
        raise ConfigError(tpath, f"cannot decode {expected}")
    return cfg


def _check_chain_names(protos: Any, path: str) -> None:
    """Envoy: with a matcher, every chain needs a name and no two chains share one."""
    seen: set[str] = set()
    for i, proto in enumerate(protos):
        npath = _join(path, f"filter_chains[{i}].name")
        if not proto.name:
            raise ConfigError(npath, "every filter chain needs a name when filter_chain_matcher is used")
        if proto.name in seen:
            raise ConfigError(npath, f"filter chain name {proto.name!r} is used twice")
        seen.add(proto.name)
