"""Command line: ``moorline run | validate | version | proxy``.

Envoy's flag spellings are accepted (``-c``, ``--config-path``, ``--config-yaml``, ``-l``,
``--log-level``, ``--concurrency``, ``--drain-time-s``, ``--mode validate``) so that tools which
start Envoy can start moorline; ``moorline -c FILE`` without a sub-command means ``run``.
Exit codes: 0 ok, 1 runtime failure (e.g. a port already in use), 2 invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from moorline import __version__
from moorline.config.errors import ConfigError

log = logging.getLogger("moorline.main")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moorline", description="moorline: a service-mesh sidecar proxy")
    sub = p.add_subparsers(dest="cmd")

    run = sub.add_parser("run", help="run the proxy (default: the embedded demo config)")
    _run_args(run)

    v = sub.add_parser(
        "validate",
        help="check a config file, list what it sets that moorline ignores, and exit (0 valid, 2 invalid)",
    )
    v.add_argument("file")
    _reject_arg(v)

    sub.add_parser("version", help="print the version")

    xs = sub.add_parser(
        "xds-serve", help="serve a directory of xDS resource files to sidecars (ADS, SotW and delta)"
    )
    xs.add_argument("directory")
    xs.add_argument(
        "--listen", default="127.0.0.1:18000", help="HOST:PORT for the gRPC server (default 127.0.0.1:18000)"
    )
    xs.add_argument("--unix", default=None, help="serve on this Unix socket instead")
    xs.add_argument("-l", "--log-level", default="info")

    px = sub.add_parser("proxy", help="quick mode: one listener proxying to one address")
    px.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    px.add_argument("--to", required=True, help="HOST:PORT to proxy to")
    px.add_argument("--http", action="store_true", help="HTTP/1.1 proxy (default: TCP)")
    px.add_argument("--admin", default=None, help="HOST:PORT for the admin server (default: none)")
    px.add_argument("-l", "--log-level", default="info")
    return p


def _run_args(run: argparse.ArgumentParser) -> None:
    # Envoy's flags as pilot-agent (istio/istio pkg/envoy/proxy.go) and other launchers pass them.
    # What each does in moorline is in README.md ("Envoy command-line flags"); the ones moorline
    # cannot act on are named in the start-up log by ``ignored_flag_lines``.
    run.add_argument("-c", "--config-path", dest="config", default=None)
    run.add_argument("--config-yaml", default=None)
    run.add_argument("-l", "--log-level", default="info")
    run.add_argument("--component-log-level", default=None)
    run.add_argument("--log-format", default=None)
    run.add_argument("--log-format-escaped", action="store_true")
    run.add_argument("--log-path", default=None)
    run.add_argument("--skip-deprecated-logs", action="store_true")
    run.add_argument("--enable-fine-grain-logging", action="store_true")
    run.add_argument("--concurrency", type=int, default=1)
    run.add_argument("--cpuset-threads", action="store_true")
    run.add_argument("--drain-time-s", type=float, default=600.0)
    run.add_argument("--drain-strategy", choices=("immediate", "gradual"), default="immediate")
    run.add_argument("--parent-shutdown-time-s", type=float, default=None)
    run.add_argument("--local-address-ip-version", choices=("v4", "v6"), default="v4")
    run.add_argument("--file-flush-interval-msec", type=int, default=None)
    run.add_argument("--mode", choices=("serve", "validate", "init_only"), default="serve")
    run.add_argument("--service-cluster", default=None)
    run.add_argument("--service-node", default=None)
    run.add_argument("--service-zone", default=None)
    run.add_argument("--base-id", default=None)
    run.add_argument("--use-dynamic-base-id", action="store_true")
    run.add_argument("--restart-epoch", type=int, default=None)
    run.add_argument("--disable-hot-restart", action="store_true")
    run.add_argument("--allow-unknown-static-fields", action="store_true")
    run.add_argument("--ignore-unknown-dynamic-fields", action="store_true")
    run.add_argument("--enable-core-dump", action="store_true")
    run.add_argument("--enable-mutex-tracing", action="store_true")
    _reject_arg(run)


# Flags accepted so that Envoy's launchers can start moorline, which moorline does not act on:
# flag -> why (printed once at start-up, one line per flag given).
IGNORED_FLAGS: dict[str, str] = {
    "parent_shutdown_time_s": "moorline has no hot restart (there is no parent to shut down)",
    "restart_epoch": "moorline has no hot restart",
    "base_id": "moorline has no hot restart (no shared memory regions)",
    "use_dynamic_base_id": "moorline has no hot restart (no shared memory regions)",
    "disable_hot_restart": "moorline never hot restarts",
    "local_address_ip_version": "moorline takes each connection's local address from its socket",
    "skip_deprecated_logs": "moorline logs no deprecation warnings",
    "enable_fine_grain_logging": "levels are set per component (--component-log-level, /logging)",
    "cpuset_threads": "moorline runs one worker",
    "allow_unknown_static_fields": "an unknown field in the static config is still an error",
    "ignore_unknown_dynamic_fields": "an unknown field in an xDS resource is still a NACK",
    "enable_core_dump": "core dumps follow the process limits (ulimit -c)",
    "enable_mutex_tracing": "moorline has no mutexes to trace",
}


def ignored_flag_lines(opts: dict[str, Any]) -> list[str]:
    """One start-up line per Envoy flag given that moorline accepts and does not act on."""
    out = []
    for key, why in IGNORED_FLAGS.items():
        v = opts.get(key)
        if v is None or v is False:
            continue
        if key == "local_address_ip_version" and v == "v4":
            continue  # Envoy's default; nothing was asked
        out.append(f"--{key.replace('_', '-')}: accepted and ignored ({why})")
    conc = opts.get("concurrency")
    if isinstance(conc, int) and conc > 1:
        out.append(f"--concurrency {conc}: moorline runs one worker (an event loop in this process)")
    return out


def _reject_arg(p: argparse.ArgumentParser) -> None:
    # Envoy's --reject-unknown-dynamic-fields is the nearest spelling Envoy tooling passes.
    p.add_argument(
        "--reject-ignored",
        "--reject-unknown-dynamic-fields",
        dest="reject_ignored",
        action="store_true",
        help="treat every field or extension moorline accepts but ignores as an error (exit 2)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "run")
    if argv == ["--version"]:
        argv = ["version"]
    args = _parser().parse_args(argv)
    if args.cmd is None:
        args = _parser().parse_args(["run"])
    if args.cmd == "version":
        print(f"moorline version: {__version__} (Python {sys.version.split()[0]})")
        return 0
    if args.cmd == "validate":
        return _validate(args.file, None, args.reject_ignored)
    if args.cmd == "xds-serve":
        from moorline.xds.serve import main as xds_serve

        logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s][%(levelname)s] %(message)s")
        return xds_serve(args.directory, args.listen, args.unix)
    if args.cmd == "proxy":
        text = quick_config(args.listen, args.to, args.http, args.admin)
        return _run(None, text, args.log_level, 600.0, {"mode": "proxy"}, source="moorline proxy")
    if args.mode == "validate":
        return _validate(args.config, args.config_yaml, args.reject_ignored)
    opts = {k: v for k, v in vars(args).items() if v is not None}
    return _run(args.config, args.config_yaml, args.log_level, args.drain_time_s, opts)


def _load(path: str | None, yaml_text: str | None) -> tuple[Any, str]:
    from moorline.config.loader import load_bootstrap

    if path is None and yaml_text is None:
        from moorline.config.default import DEFAULT_CONFIG_YAML

        return load_bootstrap(yaml_text=DEFAULT_CONFIG_YAML), "<embedded default>"
    if path is not None and yaml_text is not None:
        # Envoy merges --config-yaml over the file; moorline takes the file and then the overlay.
        return load_bootstrap(path=path, yaml_text=yaml_text), path
    if path is not None:
        return load_bootstrap(path=path), path
    return load_bootstrap(yaml_text=yaml_text), "--config-yaml"


def _validate(path: str | None, yaml_text: str | None, reject_ignored: bool = False) -> int:
    from moorline.server import Server

    try:
        b, source = _load(path, yaml_text)
        server = Server(b, source)
    except ConfigError as e:
        print(f"moorline: {e}", file=sys.stderr)
        return 2
    notices = server.ctx.notices
    if reject_ignored and notices:
        _print_rejected(notices, source)
        return 2
    for n in notices:
        print(f"moorline: {source}: notice: {n}", file=sys.stderr)
    tail = f" ({len(notices)} ignored, listed above)" if notices else ""
    print(f"moorline: configuration '{source}' OK{tail}")
    return 0


def _print_rejected(notices: list[Any], source: str) -> None:
    """Every notice as the error it becomes under --reject-ignored, one line each."""
    for n in notices:
        err = ConfigError(n.path, f"{n.message} (rejected by --reject-ignored)", source)
        print(f"moorline: {err}", file=sys.stderr)


def _run(
    path: str | None, yaml_text: str | None, level: str, drain: float, opts: dict, source: str | None = None
) -> int:
    from moorline.observability.logging import LogSetupError, setup_logging

    try:
        unmapped = setup_logging(
            level,
            log_format=opts.get("log_format"),
            escaped=bool(opts.get("log_format_escaped")),
            component_levels=opts.get("component_log_level"),
            path=opts.get("log_path"),
        )
    except LogSetupError as e:
        print(f"moorline: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass
    from moorline.server import Server

    try:
        b, src = _load(path, yaml_text)
        server = Server(b, source or src, drain_time=drain, options=opts)
    except ConfigError as e:
        print(f"moorline: {e}", file=sys.stderr)
        return 2
    if opts.get("reject_ignored") and server.ctx.notices:
        _print_rejected(server.ctx.notices, source or src)
        return 2
    if server.app_log_formatter is not None:
        from moorline.observability.logging import set_formatter

        set_formatter(server.app_log_formatter)
    for line in [*unmapped, *ignored_flag_lines(opts)]:
        log.info("%s", line)
    try:
        return asyncio.run(server.run())
    except OSError as e:
        print(f"moorline: cannot start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # last resort: one line, not a traceback (set MOORLINE_TRACEBACK=1 to see it)
        if os.environ.get("MOORLINE_TRACEBACK"):
            raise
        print(f"moorline: fatal: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _split_hostport(v: str, what: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"moorline: {what} must be HOST:PORT, got {v!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def quick_config(listen: str, to: str, http: bool, admin: str | None) -> str:
    lh, lp = _split_hostport(listen, "--listen")
    th, tp = _split_hostport(to, "--to")
    import ipaddress

    try:
        ipaddress.ip_address(th)
        ctype = "STATIC"
    except ValueError:
        ctype = "STRICT_DNS"
    if http:
        filt = """
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: quick
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: target}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"""
    else:
        filt = """
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: quick
          cluster: target"""
    admin_block = ""
    if admin:
        ah, ap = _split_hostport(admin, "--admin")
        admin_block = f"""
admin:
  address: {{socket_address: {{address: "{ah}", port_value: {ap}}}}}"""
    return f"""{admin_block}
static_resources:
  listeners:
  - name: quick
    address: {{socket_address: {{address: "{lh}", port_value: {lp}}}}}
    filter_chains:
    - filters:{filt}
  clusters:
  - name: target
    type: {ctype}
    connect_timeout: 5s
    load_assignment:
      cluster_name: target
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: "{th}", port_value: {tp}}}}}
"""


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    raise SystemExit(main())
