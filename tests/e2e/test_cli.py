"""End-to-end command line and process lifecycle: ``validate``, ``run --mode validate``,
``version``, ``--config-yaml``, ``proxy --listen --to [--http]``, the embedded default config,
and the SIGTERM drain contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moorline.testing import procs
from moorline.testing.procs import free_port, http_request, port_is_free, wait_port
from moorline.testing.upstream import TcpEchoServer, TestUpstream

pytestmark = pytest.mark.e2e

H = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]


def _moorline(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "moorline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
    )


def _good_config(upstream_port: int = 1) -> tuple[str, int]:
    port = free_port()
    return procs.config_http(port, clusters={"c": [upstream_port]}), port


BAD_CONFIGS = {
    "bad_enum": (
        "static_resources:\n  clusters:\n  - name: c\n    connect_timeout: 1s\n    lb_policy: NOT_A_POLICY\n",
        ["clusters[0]", "lb_policy"],
    ),
    "unknown_field": (
        "static_resources:\n  listeners:\n  - name: l\n    bogus_field: 1\n"
        "    address: {socket_address: {address: 127.0.0.1, port_value: 1}}\n",
        ["listeners[0]", "bogus_field"],
    ),
}


def test_validate_good_config(tmp_path: Path) -> None:
    """``moorline validate FILE`` exits 0 for a valid Envoy bootstrap."""
    cfg, _ = _good_config()
    f = tmp_path / "good.yaml"
    f.write_text(cfg)
    r = _moorline("validate", str(f))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_validate_bad_config(tmp_path: Path, case: str) -> None:
    """An invalid config: exit 2 and one stderr line ``moorline: <file>: <field.path>:
    <message>`` naming the file and the field, never a traceback."""
    text, needles = BAD_CONFIGS[case]
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    r = _moorline("validate", str(f))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"moorline: {f}: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_run_mode_validate(tmp_path: Path) -> None:
    """``run -c FILE --mode validate`` (Envoy's flag) checks the config and exits without
    binding anything: 0 for a good file, 2 for a bad one."""
    cfg, port = _good_config()
    good = tmp_path / "good.yaml"
    good.write_text(cfg)
    r = _moorline("run", "-c", str(good), "--mode", "validate")
    assert r.returncode == 0, r.stderr
    assert port_is_free(port)
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIGS["bad_enum"][0])
    r = _moorline("run", "-c", str(bad), "--mode", "validate")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_version() -> None:
    """``moorline version`` prints the package version and exits 0."""
    from moorline import __version__

    r = _moorline("version")
    assert r.returncode == 0
    assert "moorline" in r.stdout and __version__ in r.stdout


def test_config_yaml_flag(tmp_path: Path, upstream: TestUpstream) -> None:
    """``run --config-yaml '<yaml>'`` runs a config given inline."""
    port, admin = free_port(), free_port()
    cfg = procs.config_http(port, clusters={"c": [upstream.port]}, admin_port=admin)
    p = procs.start_moorline(None, tmp_path, ["--config-yaml", cfg], admin=(H, admin))
    try:
        r = http_request(H, port, "GET", "/inline")
        assert r.status == 200 and json.loads(r.body)["path"] == "/inline"
    finally:
        assert p.stop(signal.SIGTERM, 10) == 0


def test_proxy_tcp_mode(tmp_path: Path) -> None:
    """``proxy --listen A --to B`` is a plain TCP proxy: bytes and half-close pass through."""
    port = free_port()
    with TcpEchoServer() as echo:
        p = procs.start_moorline(
            None,
            tmp_path,
            subcommand=["proxy", "--listen", f"{H}:{port}", "--to", f"{H}:{echo.port}"],
            wait="port",
            wait_for=(H, port),
        )
        try:
            data = os.urandom(1_000_000)
            with socket.create_connection((H, port), timeout=10) as s:
                t = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
                t.start()
                got = bytearray()
                while chunk := s.recv(65536):
                    got += chunk
                t.join()
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        finally:
            assert p.stop(signal.SIGTERM, 10) == 0


def test_proxy_http_mode_with_curl(tmp_path: Path, upstream: TestUpstream) -> None:
    """``proxy --listen A --to B --http`` is an HTTP/1.1 proxy: curl gets the upstream's answer."""
    curl = _curl()
    port = free_port()
    p = procs.start_moorline(
        None,
        tmp_path,
        subcommand=["proxy", "--listen", f"{H}:{port}", "--to", f"{H}:{upstream.port}", "--http"],
        wait="port",
        wait_for=(H, port),
    )
    try:
        out = subprocess.run(
            [curl, "-sS", "-i", f"http://{H}:{port}/via-curl"], capture_output=True, text=True, timeout=20
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("HTTP/1.1 200")
        assert '"path": "/via-curl"' in out.stdout
        assert upstream.requests[-1].path == "/via-curl"
    finally:
        assert p.stop(signal.SIGTERM, 10) == 0


def test_embedded_default_config(tmp_path: Path) -> None:
    """``run`` without ``-c`` starts the embedded default (listener 127.0.0.1:10000 -> cluster ->
    listener 127.0.0.1:10001 direct response; admin 127.0.0.1:9901): curl gets 200."""
    for port in (10000, 10001, 9901):
        if not port_is_free(port):
            pytest.skip(f"port {port} is taken; the default config needs it")
    curl = _curl()
    p = procs.start_moorline(None, tmp_path)
    try:
        out = subprocess.run(
            [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{H}:10000/"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.stdout == "200", (out.stdout, out.stderr)
    finally:
        assert p.stop(signal.SIGTERM, 10) == 0


def test_sigterm_drains_in_flight_requests(tmp_path: Path, upstream: TestUpstream) -> None:
    """SIGTERM: stop accepting (new connections are refused), let the 5 in-flight requests to a
    1.5 s upstream finish with 200, then exit 0 within the drain time. (moorline's contract;
    Envoy itself drains via ``/drain_listeners`` and exits on SIGTERM at once.)"""
    port = free_port()
    cfg = procs.config_http(port, clusters={"c": [upstream.port]})
    p = procs.start_moorline(cfg, tmp_path, ["--drain-time-s", "5"])
    results: list[int | str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            r = http_request(H, port, "GET", f"/delay/1500?i={i}", timeout=15)
            out: int | str = r.status
        except Exception as exc:
            out = repr(exc)
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    try:
        upstream.wait_for_requests(5, timeout=10)  # all 5 are at the upstream, in flight
        p.send_signal(signal.SIGTERM)
        refused = False
        deadline = time.monotonic() + 1.2  # well inside the 1.5 s the requests still need
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((H, port), timeout=0.5):
                    pass
            except ConnectionRefusedError:
                refused = True
                break
            time.sleep(0.02)
        for t in threads:
            t.join(15)
        assert results == [200] * 5, results
        assert refused, "new connections were still accepted after SIGTERM"
        assert p.wait(8) == 0
    finally:
        p.stop(signal.SIGKILL, 5)


def test_sigint_exits_zero(tmp_path: Path, upstream: TestUpstream) -> None:
    """SIGINT on an idle proxy: clean exit 0."""
    cfg, _ = _good_config(upstream.port)
    p = procs.start_moorline(cfg, tmp_path)
    assert p.stop(signal.SIGINT, 10) == 0


def _curl() -> str:
    import shutil

    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


def test_wait_port_helper_sees_listener(upstream: TestUpstream) -> None:
    """(harness sanity) the upstream fixture is reachable, so failures above are moorline's."""
    wait_port(H, upstream.port, 2)


# --- notices, --reject-ignored, and configs from Envoy's repository and examples -----------------

HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


def _doc(upstream_port: int = 1, hcm_extra: dict | None = None) -> tuple[dict, int]:
    import yaml

    port = free_port()
    return yaml.safe_load(procs.config_http(port, clusters={"c": [upstream_port]}, hcm_extra=hcm_extra)), port


def _write(tmp_path: Path, name: str, doc: dict | str) -> Path:
    import yaml

    f = tmp_path / name
    f.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return f


def _ignored_config(tmp_path: Path) -> tuple[Path, int]:
    doc, port = _doc(hcm_extra={"tracing": {}})
    doc["stats_sinks"] = [{"name": "envoy.stat_sinks.statsd"}]
    doc["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {}}]}
    return _write(tmp_path, "ignored.yaml", doc), port


def test_validate_lists_every_ignored_field(tmp_path: Path) -> None:
    """``validate`` exits 0 and prints one line per accepted-but-ignored field, with its path."""
    f, _ = _ignored_config(tmp_path)
    r = _moorline("validate", str(f))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert [ln.split(": ", 4)[3] for ln in lines] == [
        f"{HCM_PATH}.tracing",
        "stats_sinks[0]",
        "layered_runtime",
    ]
    assert all(ln.startswith(f"moorline: {f}: notice: ") and "ignored" in ln for ln in lines)
    assert "OK (3 ignored" in r.stdout


@pytest.mark.parametrize("flag", ["--reject-ignored", "--reject-unknown-dynamic-fields"])
def test_reject_ignored_turns_notices_into_errors(tmp_path: Path, flag: str) -> None:
    """``--reject-ignored`` (or Envoy's spelling): exit 2, one error line per ignored field in the
    usual ``moorline: <file>: <field.path>: <message>`` form; ``run`` binds nothing."""
    f, port = _ignored_config(tmp_path)
    for argv in (["validate", flag, str(f)], ["run", "-c", str(f), flag], ["-c", str(f), flag]):
        r = _moorline(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr
        lines = r.stderr.splitlines()
        assert [ln.split(": ", 3)[2] for ln in lines] == [
            f"{HCM_PATH}.tracing",
            "stats_sinks[0]",
            "layered_runtime",
        ]
        assert all(ln.startswith(f"moorline: {f}: ") and "--reject-ignored" in ln for ln in lines)
        assert port_is_free(port)
    clean, _ = _good_config()
    g = _write(tmp_path, "clean.yaml", clean)
    assert _moorline("validate", "--reject-ignored", str(g)).returncode == 0


def _tap_socket() -> dict:
    return {
        "name": "envoy.transport_sockets.tap",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tap.v3.Tap",
            "common_config": {
                "static_config": {"output_config": {"sinks": [{"file_per_tap": {"path_prefix": "/tmp/t"}}]}}
            },
            "transport_socket": {"name": "envoy.transport_sockets.raw_buffer"},
        },
    }


def _bad_real_configs() -> dict[str, tuple[object, list[str]]]:
    out: dict[str, tuple[object, list[str]]] = {}
    doc, _ = _doc()
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["@type"] = (
        "type.googleapis.com/envoy.config.filter.network.http_connection_manager.v2.HttpConnectionManager"
    )
    out["hcm v2 type"] = (doc, [HCM_PATH, "v2 API is not supported"])
    doc, _ = _doc()
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["@type"] = "type.googleapis.com/acme.UnknownManager"
    out["hcm unknown type"] = (doc, [HCM_PATH, "acme.UnknownManager"])
    doc, _ = _doc()
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = _tap_socket()
    out["tap on a listener"] = (doc, ["listeners[0].filter_chains[0].transport_socket", "tap"])
    doc, _ = _doc()
    doc["static_resources"]["clusters"][0]["transport_socket"] = _tap_socket()
    out["tap on a cluster"] = (doc, ["static_resources.clusters[0].transport_socket", "tap"])
    doc, _ = _doc()
    doc["static_resources"]["clusters"][0]["lb_policy"] = 999
    out["lb_policy 999"] = (doc, ["static_resources.clusters[0].lb_policy", "999"])
    doc, _ = _doc()
    doc["static_resources"]["clusters"][0]["type"] = -1
    out["type -1"] = (doc, ["static_resources.clusters[0].type", "-1"])
    doc, _ = _doc()
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ][0]["routes"].insert(
        0,
        {
            "match": {"prefix": "/ws"},
            "route": {
                "cluster": "c",
                "upgrade_configs": [{"upgrade_type": "websocket", "connect_config": {}}],
            },
        },
    )
    out["connect_config on websocket"] = (
        doc,
        [f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0].route.upgrade_configs[0].connect_config"],
    )
    doc, _ = _doc()
    doc["admin"]["allow_paths"] = [{"safe_regex": {"regex": "(unclosed"}}]
    out["allow_paths bad regex"] = (doc, ["admin.allow_paths[0].safe_regex"])
    deep = "[" * 3000 + "]" * 3000
    out["json nested 3000 deep"] = (
        '{"static_resources": {"clusters": [{"name": "c", "metadata": {"filter_metadata": {"x": {"a": '
        + deep
        + "}}}}]}}",
        ["nesting deeper than 200"],
    )
    bomb = [
        "static_resources:",
        "  clusters:",
        "  - name: c",
        "    metadata:",
        "      filter_metadata:",
        "        x:",
    ]
    bomb.append('          a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
    for i in range(1, 9):
        bomb.append(f"          a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    out["yaml alias bomb"] = ("\n".join(bomb) + "\n", ["YAML aliases expand"])
    return out


BAD_REAL = _bad_real_configs()


@pytest.mark.parametrize("case", sorted(BAD_REAL))
def test_validate_bad_real_configs(tmp_path: Path, case: str) -> None:
    """Configs that crashed, hung or validated wrongly: exit 2, one line naming file and field."""
    doc, needles = BAD_REAL[case]
    f = _write(tmp_path, "bad.json" if isinstance(doc, str) and doc.startswith("{") else "bad.yaml", doc)
    r = _moorline("validate", str(f), timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"moorline: {f}: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def _good_real_configs() -> dict[str, object]:
    out: dict[str, object] = {}
    doc, _ = _doc()
    doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "codec_type"
    ] = "auto"
    doc["static_resources"]["clusters"][0].update({"type": "static", "lb_policy": "round_robin"})
    out["lower-case enums"] = doc
    doc, _ = _doc()
    doc["static_resources"]["clusters"][0].update({"type": 0, "lb_policy": 3})
    out["numeric enums"] = doc
    doc, _ = _doc()
    import yaml

    out["multi-document"] = yaml.safe_dump(doc) + "---\nanother: document\n"
    doc, _ = _doc(hcm_extra={"http_filters": []})
    out["no http_filters"] = doc
    doc, _ = _doc(hcm_extra={"http_filters": [{"name": "envoy.filters.http.router", "typed_config": {}}]})
    out["router typed_config {}"] = doc
    return out


GOOD_REAL = _good_real_configs()


@pytest.mark.parametrize("case", sorted(GOOD_REAL))
def test_validate_good_real_configs(tmp_path: Path, case: str) -> None:
    f = _write(tmp_path, "good.yaml", GOOD_REAL[case])  # type: ignore[arg-type]
    r = _moorline("validate", str(f))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "OK" in r.stdout


@pytest.mark.parametrize(
    "http_filters",
    [[], [{"name": "envoy.filters.http.router", "typed_config": {}}]],
    ids=["no http_filters", "router typed_config {}"],
)
def test_router_only_hcm_serves(tmp_path: Path, upstream: TestUpstream, http_filters: list) -> None:
    """An HCM with no http_filters (valid in Envoy) or with ``typed_config: {}`` on the router
    proxies like one configured with the router."""
    doc, port = _doc(upstream.port, hcm_extra={"http_filters": http_filters})
    p = procs.start_moorline(_write(tmp_path, "cfg.yaml", doc), tmp_path)
    try:
        r = http_request(H, port, "GET", "/only-router")
        assert r.status == 200 and json.loads(r.body)["path"] == "/only-router"
    finally:
        assert p.stop(signal.SIGTERM, 10) == 0


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--drain-strategy", "sometimes"], "--drain-strategy"),
        (["--local-address-ip-version", "v5"], "--local-address-ip-version"),
        (["--component-log-level", "nosuch:debug"], "unknown component 'nosuch'"),
        (["--component-log-level", "upstream"], "is not <component>:<level>"),
    ],
)
def test_envoy_flags_with_bad_values_exit_2(tmp_path: Path, flags: list[str], needle: str) -> None:
    """Envoy's flags are checked as Envoy checks them: a bad value is a usage error (exit 2),
    with or without the ``run`` sub-command."""
    cfg, _ = _good_config()
    f = tmp_path / "good.yaml"
    f.write_text(cfg)
    for argv in (["-c", str(f), *flags], ["run", "-c", str(f), *flags]):
        r = _moorline(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr
