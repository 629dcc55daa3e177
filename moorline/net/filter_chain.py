"""Filter chains of a listener: compile them once, pick one per accepted connection.

Selection follows Envoy's ``filter_chain_match`` semantics: the criteria are looked at level by
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


def _compile_chain(chain: Any, ctx: Any, path: str, index: int) -> FilterChain:
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
    match = FilterChainMatch(
        chain.filter_chain_match if chain.HasField("filter_chain_match") else None,
        f"{path}.filter_chain_match",
    )
    terminal, filters = _compile_filters(chain, ctx, path)
    name = chain.name or (f"filter_chains[{index}]" if index >= 0 else "default_filter_chain")
    return FilterChain(name, match, terminal, filters, index, tls)


def compile_filter_chains(listener_proto: Any, ctx: Any, path: str) -> FilterChainSelector:
    """Compile ``filter_chains`` and ``default_filter_chain`` of a Listener proto.

    Raises ``ConfigError`` with the full field path (``path`` is the listener's own path)."""
    if listener_proto.HasField("filter_chain_matcher"):
        raise ConfigError(_join(path, "filter_chain_matcher"), "filter_chain_matcher is not supported yet")
    chains: list[FilterChain] = []
    seen: dict[Any, int] = {}
    seen_norm: dict[Any, int] = {}
    for i, c in enumerate(listener_proto.filter_chains):
        cpath = _join(path, f"filter_chains[{i}]")
        fc = _compile_chain(c, ctx, cpath, i)
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
    return FilterChainSelector(chains, default)
