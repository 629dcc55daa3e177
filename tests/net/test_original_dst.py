"""Original destination without iptables: ``sockopts.original_dst`` and its sockaddr parsing, the
``original_dst`` listener filter on loopback sockets (no NAT: the address stays), and the
``use_original_dst`` handoff between listeners of a ``ListenerManager`` (the destination the
kernel would report is substituted, everything else is real sockets on loopback). The real
iptables path is in ``test_original_dst_netns.py``."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401 (type URL)
from google.protobuf import json_format
from test_listener import RECORDERS, connect, run, until

import moorline.filters.listener.original_dst as od_filter
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.extensions import register_builtin
from moorline.net import sockopts
from moorline.net.conn_info import ConnInfo
from moorline.net.listener import Listener
from moorline.net.listener_manager import ListenerManager
from moorline.observability.stats import Store
from moorline.testing.fixtures import FIXTURES

REC = [{"name": "test.listener.recorder"}]


def _proto(d: dict[str, Any]) -> Any:
    return json_format.ParseDict(d, listener_pb2.Listener())


def _lst(name: str, addr: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": addr, "port_value": port}},
        "filter_chains": [{"filters": REC}],
        **extra,
    }


# -- sockopts ---------------------------------------------------------------------------------------


def test_parse_sockaddr_v4_and_v6() -> None:
    raw4 = (
        struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("10.1.2.3") + b"\0" * 8
    )
    assert sockopts.parse_sockaddr(raw4) == ("10.1.2.3", 8080)
    raw6 = (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!H", 443)
        + b"\0" * 4
        + socket.inet_pton(socket.AF_INET6, "fd00::7")
        + b"\0" * 4
    )
    assert sockopts.parse_sockaddr(raw6) == ("fd00::7", 443)
    assert sockopts.parse_sockaddr(b"\x01\x00") is None  # short
    assert sockopts.parse_sockaddr(struct.pack("=H", socket.AF_UNIX) + b"\0" * 14) is None


@pytest.fixture
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    srv.close()
    try:
        yield a, c
    finally:
        a.close()
        c.close()


def test_not_redirected_connection_keeps_its_address(
    loopback_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, c = loopback_pair
    local = a.getsockname()
    got = sockopts.original_dst(a)
    # No NAT: the kernel has no record (None), or conntrack reports the address itself.
    assert got is None or got == (local[0], local[1])
    info = ConnInfo((local[0], local[1]), c.getsockname(), "l")
    f = od_filter.OriginalDst()
    assert f.max_read_bytes == 0
    assert f.on_accept(a, info) is True
    assert info.local == (local[0], local[1])
    assert info.local_restored == (got is not None)


def test_pipe_connection_is_left_alone() -> None:
    a, b = socket.socketpair()
    try:
        assert sockopts.original_dst(a) is None
        info = ConnInfo("/tmp/x.sock", "/tmp/x.sock", "l")
        od_filter.OriginalDst().on_accept(a, info)
        assert info.local == "/tmp/x.sock" and not info.local_restored
    finally:
        a.close()
        b.close()


def test_filter_takes_the_kernels_destination(
    monkeypatch: pytest.MonkeyPatch, loopback_pair: tuple[socket.socket, socket.socket]
) -> None:
    a, _ = loopback_pair
    monkeypatch.setattr(sockopts, "original_dst", lambda s: ("10.9.8.7", 9080) if s is a else None)
    info = ConnInfo(a.getsockname(), ("127.0.0.1", 1), "l")
    od_filter.OriginalDst().on_accept(a, info)
    assert info.local == ("10.9.8.7", 9080) and info.local_restored


# -- listener handoff --------------------------------------------------------------------------------


class Pod:
    """A listener manager with virtualOutbound on loopback and never-bound service listeners."""

    def __init__(self, store: Store) -> None:
        self.ctx = BuildContext(stats=store)
        self.lm = ListenerManager(self.ctx, drain_time=0.1)
        RECORDERS.clear()
        self.vo = self.lm.add(
            _proto(_lst("virtualOutbound", "127.0.0.1", 0, use_original_dst=True)), "listeners[0]"
        )
        self.any80 = self.lm.add(
            _proto(_lst("0.0.0.0_44080", "0.0.0.0", 44080, bind_to_port=False)), "listeners[1]"
        )
        self.exact = self.lm.add(
            _proto(_lst("10.1.2.3_44080", "10.1.2.3", 44080, bind_to_port=False)), "listeners[2]"
        )
        self.v6 = self.lm.add(_proto(_lst("[::]_44080", "::", 44080, bind_to_port=False)), "listeners[3]")

    def rec(self, i: int) -> Any:
        return RECORDERS[f"listeners[{i}].filter_chains[0].filters[0]"]


def _through(pod: Pod, dst: tuple[str, int] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sockopts, "original_dst", lambda s: dst)


@pytest.mark.parametrize(
    ("dst", "target"),
    [
        (("10.7.7.7", 44080), 1),  # no exact listener: the 0.0.0.0 wildcard of the port
        (("10.1.2.3", 44080), 2),  # the exact ip:port wins over the wildcard
        (("fd00::5", 44080), 3),  # IPv6: the [::] wildcard, never the IPv4 one
        (("10.7.7.7", 44081), 0),  # no listener for the port: virtualOutbound's own chains
        (None, 0),  # not redirected: stays
    ],
)
def test_use_original_dst_hands_over_to_the_destinations_listener(
    monkeypatch: pytest.MonkeyPatch, dst: tuple[str, int] | None, target: int
) -> None:
    store = Store()

    async def main() -> None:
        pod = Pod(store)
        await pod.lm.start(asyncio.get_running_loop())
        try:
            assert not pod.any80.serving and pod.vo.serving
            _through(pod, dst, monkeypatch)
            port = pod.vo.bound_address[2]
            assert port is not None
            c = connect(("127.0.0.1", port))
            rec = pod.rec(target)
            await until(lambda: len(rec.accepted) == 1)
            _, info = rec.accepted[0]
            names = ["virtualOutbound", "0.0.0.0_44080", "10.1.2.3_44080", "[::]_44080"]
            assert info.listener_name == names[target]
            if dst is not None:
                assert info.local == dst and info.local_restored
            for i in range(4):
                if i != target:
                    assert pod.rec(i).accepted == []
            c.close()
        finally:
            pod.lm.close()

    run(main)
    # The connection counts on the listener that served it, not on virtualOutbound.
    prefixes = [
        "listener.127.0.0.1_",
        "listener.0.0.0.0_44080.",
        "listener.10.1.2.3_44080.",
        "listener.[__]_44080.",
    ]
    totals = {
        p: sum(s.value for s in store if s.name.startswith(p) and s.name.endswith(".downstream_cx_total"))  # type: ignore[attr-defined]
        for p in prefixes
    }
    assert totals[prefixes[target]] == 1
    assert sum(totals.values()) == 1


def test_handoff_target_follows_listener_updates_and_removal(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        pod = Pod(Store())
        lm = pod.lm
        await lm.start(asyncio.get_running_loop())
        try:
            dyn = lm.add_or_update(_proto(_lst("dyn", "10.5.5.5", 44090, bind_to_port=False)), "dyn")
            assert lm.find_by_destination(("10.5.5.5", 44090)) is dyn
            new = lm.add_or_update(
                _proto(
                    _lst("dyn", "10.5.5.5", 44090, bind_to_port=False, per_connection_buffer_limit_bytes=4096)
                ),
                "dyn",
            )
            assert new is not dyn and lm.find_by_destination(("10.5.5.5", 44090)) is new
            # A handed-off connection takes the target's buffer limit.
            monkeypatch.setattr(sockopts, "original_dst", lambda s: ("10.5.5.5", 44090))
            port = pod.vo.bound_address[2]
            assert port is not None
            c = connect(("127.0.0.1", port))
            rec = RECORDERS["dyn.filter_chains[0].filters[0]"]
            await until(lambda: len(rec.accepted) == 1)
            assert rec.accepted[0][1].buffer_limit == 4096
            c.close()
            assert lm.remove("dyn")
            assert lm.find_by_destination(("10.5.5.5", 44090)) is None
            # Without a listener for it, the next one stays on virtualOutbound.
            c2 = connect(("127.0.0.1", port))
            await until(lambda: len(pod.rec(0).accepted) == 1)
            c2.close()
        finally:
            lm.close()

    run(main)


def test_use_original_dst_implies_the_filter_and_needs_tcp() -> None:
    ctx = BuildContext(stats=Store())
    lst = Listener(_proto(_lst("vo", "127.0.0.1", 0, use_original_dst=True)), ctx, "l")
    assert [type(f).__name__ for f in lst.accept_filters] == ["OriginalDst"]
    assert lst.listener_filters == [] and lst.peek_bytes == 0
    # Listed explicitly (as Istio does on virtualInbound): not added twice.
    explicit = _lst(
        "vi",
        "127.0.0.1",
        0,
        use_original_dst=True,
        listener_filters=[
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                },
            }
        ],
    )
    assert len(Listener(_proto(explicit), ctx, "l").accept_filters) == 1
    assert not any("original" in n for n in ctx.notices)
    pipe = {
        "name": "p",
        "address": {"pipe": {"path": "/tmp/moorline-od-test.sock"}},
        "use_original_dst": True,
        "filter_chains": [{"filters": REC}],
    }
    with pytest.raises(ConfigError) as ei:
        Listener(_proto(pipe), ctx, "listeners[0]")
    assert ei.value.path == "listeners[0].use_original_dst"


def test_istio_outbound_listeners_as_istio_writes_them() -> None:
    """virtualOutbound and the TCP service listeners of a real Istio config dump: the service
    listeners are never bound and are what an original destination finds. (The HTTP ones use
    RDS over ADS, which needs the ADS client; they are not compiled here.)"""
    register_builtin()
    dump = json.loads((FIXTURES / "istio" / "sidecar_configdump_authz.json").read_text())
    protos = {
        e["active_state"]["listener"]["name"]: e["active_state"]["listener"]
        for c in dump["configs"]
        for e in c.get("dynamic_listeners", [])
    }
    lm = ListenerManager(BuildContext(stats=Store()))
    for name in ("virtualOutbound", "10.96.0.1_443", "10.108.65.203_443", "10.102.11.148_15021"):
        lm.add_or_update(parse_message(protos[name], listener_pb2.Listener, name), name)
    vo = lm.get("virtualOutbound")
    assert vo is not None and vo.use_original_dst and vo.find_listener is not None
    assert [type(f).__name__ for f in vo.accept_filters] == ["OriginalDst"]
    svc = lm.get("10.96.0.1_443")
    assert svc is not None and not svc.bind_to_port and not svc.use_original_dst
    assert vo.find_listener(("10.96.0.1", 443)) is svc
    assert vo.find_listener(("10.96.0.1", 80)) is None  # -> virtualOutbound's PassthroughCluster chain
    assert vo.find_listener(("0.0.0.0", 15001)) is vo  # a direct connection stays (blackhole chain)
