"""The server's Envoy-facing surface that pilot-agent reads: ``/server_info``'s
CommandLineOptions, the CLI's node override, the ``server.state`` numbers and the drain
policies of ``/drain_listeners`` (graceful, inbound-only) and ``--drain-strategy``."""

from __future__ import annotations

import socket
from typing import Any

from envoy.admin.v3 import server_info_pb2
from google.protobuf import json_format

from moorline.cli import ignored_flag_lines
from moorline.config.loader import load_bootstrap
from moorline.server import STATE_NUMBERS, Server, command_line_options
from moorline.stream.connections import GradualDrain
from moorline.testing.inproc import ServerThread
from moorline.testing.procs import bootstrap, config_http, free_port, hcm_listener


def test_command_line_options_decode_as_envoys() -> None:
    """What pilot-agent passes, rendered as ``envoy.admin.v3.CommandLineOptions`` JSON that
    decodes strictly (no unknown field, enum names as Envoy's)."""
    opts = {
        "config": "/etc/istio/proxy/envoy-rev.json",
        "drain_time_s": 45.0,
        "drain_strategy": "immediate",
        "local_address_ip_version": "v6",
        "file_flush_interval_msec": 1000,
        "disable_hot_restart": True,
        "allow_unknown_static_fields": True,
        "log_level": "warning",
        "component_log_level": "misc:error",
        "concurrency": 2,
        "parent_shutdown_time_s": 60.0,
        "mode": "serve",
        "reject_ignored": False,
        "base_id": "7",
    }
    m = json_format.ParseDict(command_line_options(opts), server_info_pb2.CommandLineOptions())
    assert m.config_path == "/etc/istio/proxy/envoy-rev.json"
    assert m.drain_time.ToSeconds() == 45 and m.parent_shutdown_time.ToSeconds() == 60
    assert m.file_flush_interval.ToMilliseconds() == 1000
    assert (m.drain_strategy, m.local_address_ip_version, m.mode) == (m.Immediate, m.v6, m.Serve)
    assert m.disable_hot_restart and m.allow_unknown_static_fields and not m.reject_unknown_dynamic_fields
    assert (m.log_level, m.component_log_level, m.concurrency, m.base_id) == ("warning", "misc:error", 2, 7)
    assert (
        json_format.ParseDict(
            command_line_options({"drain_strategy": "gradual"}), server_info_pb2.CommandLineOptions()
        ).drain_strategy
        == m.Gradual
    )


def test_ignored_flags_are_named_once_each() -> None:
    lines = ignored_flag_lines(
        {
            "disable_hot_restart": True,
            "parent_shutdown_time_s": 60.0,
            "local_address_ip_version": "v4",
            "concurrency": 4,
            "base_id": None,
        }
    )
    assert lines == [
        "--parent-shutdown-time-s: accepted and ignored (moorline has no hot restart (there is no parent to shut down))",
        "--disable-hot-restart: accepted and ignored (moorline never hot restarts)",
        "--concurrency 4: moorline runs one worker (an event loop in this process)",
    ]
    assert any(
        ln.startswith("--local-address-ip-version:")
        for ln in ignored_flag_lines({"local_address_ip_version": "v6"})
    )
    assert ignored_flag_lines({"concurrency": 1}) == []


def test_service_flags_override_the_bootstrap_node() -> None:
    text = "node: {id: from-file, cluster: file-cluster, locality: {region: r}}\n"
    s = Server(
        load_bootstrap(yaml_text=text),
        "<t>",
        options={"service_cluster": "c1", "service_node": "n1", "service_zone": "z1"},
    )
    node = s.server_info()["node"]
    assert (node["id"], node["cluster"], node["locality"]) == ("n1", "c1", {"region": "r", "zone": "z1"})
    s = Server(load_bootstrap(yaml_text=text), "<t>", options={})
    assert s.server_info()["node"]["id"] == "from-file"


def test_server_state_numbers_follow_the_lifecycle() -> None:
    s = Server(load_bootstrap(yaml_text=config_http(free_port(), {})), "<t>")
    st = s.stats.get("server.state")
    assert st is not None and st.value == STATE_NUMBERS["PRE_INITIALIZING"] == 2
    with ServerThread(config_http(free_port(), {})) as srv:
        st = srv.server.stats.get("server.state")
        assert st is not None and st.value == 0
        assert srv.server.stats.gauge("listener_manager.workers_started").value == 1
        srv.call(srv.server.set_health_check_failed, True)
        assert st.value == 1 and srv.server.server_info()["state"] == "DRAINING"
        srv.call(srv.server.set_health_check_failed, False)
        assert st.value == 0


def test_gradual_drain_probability_grows_over_the_drain_time() -> None:
    now = [100.0]
    draws = iter([0.3, 0.3, 0.3, 0.99])
    d = GradualDrain(10.0, lambda: now[0], lambda: next(draws))
    now[0] = 102.0  # 20% of the way: a draw of 0.3 keeps the connection
    assert not d
    now[0] = 104.0  # 40%: the same draw closes it
    assert d
    now[0] = 103.5
    assert d  # 35% > 0.3
    now[0] = 110.0  # the drain time is over: always close, without drawing
    assert d and d
    assert GradualDrain(0.0, lambda: 0.0, lambda: 1.0)


def _inbound_and_outbound(port_in: int, port_out: int) -> str:
    lin = hcm_listener(
        "inbound", port_in, routes=[{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]
    )
    lin["traffic_direction"] = "INBOUND"
    lout = hcm_listener(
        "outbound", port_out, routes=[{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]
    )
    lout["traffic_direction"] = "OUTBOUND"
    return bootstrap([lin, lout], [])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def test_drain_listeners_inbound_only_and_graceful() -> None:
    """Not graceful: the chosen listeners stop accepting at once. ``inboundonly``: only those with
    traffic_direction INBOUND. Graceful: they keep accepting until the drain time is over
    (with ``skip_exit``, for good)."""
    pi, po = free_port(), free_port()
    with ServerThread(_inbound_and_outbound(pi, po), drain_time=0.5) as srv:
        srv.call(srv.server.drain_listeners, True)
        assert not _accepts(pi) and _accepts(po)
    pi, po = free_port(), free_port()
    with ServerThread(_inbound_and_outbound(pi, po), drain_time=0.3) as srv:

        def graceful() -> Any:
            srv.server.drain_listeners(inbound_only=False, graceful=True)
            return srv.server._graceful_stop

        handle = srv.call(graceful)
        assert handle is not None and _accepts(pi) and _accepts(po)
        import time

        deadline = time.monotonic() + 20
        while (_accepts(pi) or _accepts(po)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _accepts(pi) and not _accepts(po)
    pi, po = free_port(), free_port()
    with ServerThread(_inbound_and_outbound(pi, po), drain_time=0.1) as srv:

        def skip() -> Any:
            srv.server.drain_listeners(inbound_only=True, graceful=True, skip_exit=True)
            return srv.server._graceful_stop

        assert srv.call(skip) is None and _accepts(pi)
