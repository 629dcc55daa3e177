"""Process logging with Envoy's level names and line format.

Every moorline module logs through a child of the ``moorline`` logger
(``logging.getLogger("moorline.upstream")``); the part after ``moorline.`` is the
component Envoy prints in brackets, and the ``moorline`` logger itself is ``main``::

    [2026-11-27 12:00:00.000][4242][info][upstream] cluster foo: 3 hosts

Levels are Envoy's: trace, debug, info, warning (warn), error, critical, off. The
admin ``/logging`` endpoint reads ``levels()`` and calls ``set_level``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

ROOT = "moorline"
TRACE = 5
OFF = logging.CRITICAL + 50  # above every level a record can carry

LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}

logging.addLevelName(TRACE, "TRACE")


def level_name(levelno: int) -> str:
    """Python level number -> Envoy level name."""
    if levelno <= TRACE:
        return "trace"
    if levelno <= logging.DEBUG:
        return "debug"
    if levelno <= logging.INFO:
        return "info"
    if levelno <= logging.WARNING:
        return "warning"
    if levelno <= logging.ERROR:
        return "error"
    if levelno <= logging.CRITICAL:
        return "critical"
    return "off"


def component(logger_name: str) -> str:
    if logger_name == ROOT:
        return "main"
    if logger_name.startswith(ROOT + "."):
        return logger_name[len(ROOT) + 1 :]
    return logger_name


class EnvoyFormatter(logging.Formatter):
    """``[%Y-%m-%d %H:%M:%S.mmm][pid][level][component] message`` (local time, as Envoy)."""

    def __init__(self, escaped: bool = False) -> None:
        super().__init__()
        self._pid = os.getpid()
        self._escaped = escaped

    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        ms = int(record.msecs)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if self._escaped:
            msg = _escape_c(msg)
        return f"[{t}.{ms:03d}][{self._pid}][{level_name(record.levelno)}][{component(record.name)}] {msg}"


class LogSetupError(ValueError):
    """A bad ``-l`` / ``--log-format`` / ``--component-log-level`` / ``--log-path`` value."""


_Piece = Callable[[logging.LogRecord, str], str]

_LEVEL_SHORT = {"trace": "T", "debug": "D", "info": "I", "warning": "W", "error": "E", "critical": "C"}
_FLAG = re.compile(r"%([-=]?)(\d*)(.)", re.S)


def _escape_c(msg: str) -> str:
    # Envoy's --log-format-escaped: C-style escapes, so one record stays one line.
    return msg.encode("unicode_escape").decode("ascii")


def _json_escape(msg: str) -> str:
    return json.dumps(msg)[1:-1]


def _time_piece(spec: str) -> _Piece:
    return lambda r, m: time.strftime(spec, time.localtime(r.created))


def _tz_offset(r: logging.LogRecord, m: str) -> str:
    z = time.strftime("%z", time.localtime(r.created))  # +HHMM
    return f"{z[:3]}:{z[3:]}" if len(z) == 5 else z


def _pieces() -> dict[str, _Piece]:
    """spdlog's pattern flags as Envoy documents them for ``--log-format``; %v / %_ / %j get
    the message (already escaped when ``--log-format-escaped`` is on)."""
    pid = str(os.getpid())
    d: dict[str, _Piece] = {
        "v": lambda r, m: m,
        "_": lambda r, m: m.replace("\n", "\\n"),
        "j": lambda r, m: _json_escape(m),
        # Records are formatted in the thread that logged them (StreamHandler): its OS id.
        "t": lambda r, m: str(threading.get_native_id()),
        "P": lambda r, m: pid,
        "n": lambda r, m: component(r.name),
        "l": lambda r, m: level_name(r.levelno),
        "L": lambda r, m: _LEVEL_SHORT.get(level_name(r.levelno), "O"),
        "e": lambda r, m: f"{int(r.msecs):03d}",
        "f": lambda r, m: f"{int((r.created % 1) * 1_000_000):06d}",
        "F": lambda r, m: f"{int((r.created % 1) * 1_000_000) * 1000:09d}",
        "z": _tz_offset,
        "@": lambda r, m: f"{os.path.basename(r.pathname)}:{r.lineno}",
        "s": lambda r, m: os.path.basename(r.pathname),
        "g": lambda r, m: r.pathname,
        "#": lambda r, m: str(r.lineno),
        "!": lambda r, m: r.funcName,
        "%": lambda r, m: "%",
        "^": lambda r, m: "",  # colour range start/end: no colours
        "$": lambda r, m: "",
    }
    for flag, spec in {
        "a": "%a", "A": "%A", "b": "%b", "h": "%b", "B": "%B", "c": "%a %b %d %H:%M:%S %Y",
        "C": "%y", "Y": "%Y", "D": "%m/%d/%y", "x": "%m/%d/%y", "m": "%m", "d": "%d",
        "H": "%H", "I": "%I", "M": "%M", "S": "%S", "p": "%p", "r": "%I:%M:%S %p",
        "R": "%H:%M", "T": "%H:%M:%S", "X": "%H:%M:%S", "E": "%s",
    }.items():  # fmt: skip
        d[flag] = _time_piece(spec)
    return d


def _aligned(piece: _Piece, how: str, width: int) -> _Piece:
    if how == "-":
        return lambda r, m: piece(r, m).ljust(width)
    if how == "=":
        return lambda r, m: piece(r, m).center(width)
    return lambda r, m: piece(r, m).rjust(width)


def compile_log_format(fmt: str) -> list[str | _Piece]:
    """An Envoy ``--log-format`` pattern as literal strings and per-record pieces. A flag that is
    not one of spdlog's is kept as written (spdlog does the same)."""
    table = _pieces()
    out: list[str | _Piece] = []
    pos = 0
    for mt in _FLAG.finditer(fmt):
        if mt.start() > pos:
            out.append(fmt[pos : mt.start()])
        how, width, flag = mt.group(1), mt.group(2), mt.group(3)
        piece = table.get(flag)
        if piece is None:
            out.append(mt.group(0))
        else:
            out.append(_aligned(piece, how, int(width)) if width else piece)
        pos = mt.end()
    if pos < len(fmt):
        out.append(fmt[pos:])
    return out


class PatternFormatter(logging.Formatter):
    """Lines in an Envoy ``--log-format`` pattern (``%Y-%m-%dT%T.%fZ %l envoy %n %v`` ...)."""

    def __init__(self, fmt: str, escaped: bool = False) -> None:
        super().__init__()
        self._parts = compile_log_format(fmt)
        self._escaped = escaped

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if self._escaped:
            msg = _escape_c(msg)
        return "".join(p if isinstance(p, str) else p(record, msg) for p in self._parts)


class JsonPatternFormatter(logging.Formatter):
    """``application_log_config.log_format.json_format``: one JSON object per line, each string
    value an Envoy log pattern (``{"level": "%l", "msg": "%j"}``); other values kept as given."""

    def __init__(self, template: dict[str, Any]) -> None:
        super().__init__()
        self._tpl = self._compile(template)

    def _compile(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return compile_log_format(obj)
        if isinstance(obj, dict):
            return {k: self._compile(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return ("list", [self._compile(v) for v in obj])
        return ("value", obj)

    def _eval(self, tpl: Any, record: logging.LogRecord, msg: str) -> Any:
        if isinstance(tpl, dict):
            return {k: self._eval(v, record, msg) for k, v in tpl.items()}
        if isinstance(tpl, tuple):
            return [self._eval(v, record, msg) for v in tpl[1]] if tpl[0] == "list" else tpl[1]
        return "".join(p if isinstance(p, str) else p(record, msg) for p in tpl)

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return json.dumps(self._eval(self._tpl, record, msg), separators=(",", ":"))


def app_log_formatter(
    text_format: str | None, json_format: dict[str, Any] | None, cli_format: str | None, escaped: bool = False
) -> logging.Formatter | None:
    """The formatter ``application_log_config.log_format`` asks for (its ``text_format`` or
    ``json_format``; None when neither is set). Together with ``--log-format`` it is a
    ``LogSetupError``, as Envoy refuses both."""
    if text_format is None and json_format is None:
        return None
    if cli_format is not None:
        raise LogSetupError("cannot be set together with the --log-format command-line option")
    if text_format is not None:
        return PatternFormatter(text_format, escaped)
    return JsonPatternFormatter(json_format or {})


def set_formatter(formatter: logging.Formatter) -> None:
    """Replace the line format of the handler ``setup_logging`` installed."""
    if _handler is not None:
        _handler.setFormatter(formatter)


# Envoy's logger ids (``--component-log-level``, ``/logging``) -> the moorline component that
# does that work. Envoy names with no moorline counterpart are accepted and change nothing.
ENVOY_COMPONENTS: dict[str, str | None] = {
    "main": "main", "admin": "admin", "upstream": "upstream", "hc": "upstream",
    "health_checker": "upstream", "dns": "upstream", "pool": "pool", "client": "pool",
    "config": "xds", "xds": "xds", "secret": "secrets", "connection": "listener",
    "conn_handler": "listener", "filter": "tcp_proxy", "file": "access_log",
    # Envoy's own components with no moorline counterpart (``misc`` is not ``main``: Istio
    # passes ``misc:error`` by default, which must not silence moorline's main log).
    "misc": None, "init": None, "runtime": None, "assert": None, "envoy_bug": None,
    "backtrace": None, "http": None, "http2": None, "router": None, "grpc": None,
    "stats": None, "tracing": None, "lua": None, "wasm": None, "rbac": None, "jwt": None,
    "ext_authz": None, "ext_proc": None, "golang": None, "io": None, "quic": None,
    "quic_stream": None, "udp": None, "tap": None, "redis": None, "mongo": None,
    "dubbo": None, "thrift": None, "kafka": None, "hystrix": None, "aws": None,
    "forward_proxy": None, "happy_eyeballs": None, "multi_connection": None,
    "key_value_store": None, "matcher": None, "alternate_protocols_cache": None,
    "cache_filter": None, "decompression": None, "testing": None, "oauth2": None,
    "dynamic_forward_proxy": None, "geolocation": None, "compression": None,
}  # fmt: skip
MOORLINE_COMPONENTS = (
    "main",
    "access_log",
    "admin",
    "listener",
    "pool",
    "secrets",
    "tcp_proxy",
    "tls",
    "upstream",
    "xds",
)


def parse_component_levels(spec: str) -> list[tuple[str, str, str | None]]:
    """``--component-log-level upstream:debug,connection:trace`` -> (given name, level, moorline
    component or None). Raises ``LogSetupError`` for a malformed item, an unknown level or a
    name that is neither Envoy's nor moorline's."""
    out: list[tuple[str, str, str | None]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, level = item.partition(":")
        if not sep or not name or level.lower() not in LEVELS:
            raise LogSetupError(f"--component-log-level: {item!r} is not <component>:<level>")
        if name in MOORLINE_COMPONENTS:
            out.append((name, level.lower(), name))
        elif name in ENVOY_COMPONENTS:
            out.append((name, level.lower(), ENVOY_COMPONENTS[name]))
        else:
            raise LogSetupError(f"--component-log-level: unknown component {name!r}")
    return out


def set_component_level(comp: str, level: str) -> None:
    """Set one moorline component, without moving the others: ``main`` is the parent of every
    component left at NOTSET, so those are pinned at its current level first."""
    levelno = LEVELS[level]
    root = logging.getLogger(ROOT)
    if comp == "main":
        old = root.getEffectiveLevel()
        names = {f"{ROOT}.{c}" for c in MOORLINE_COMPONENTS if c != "main"}
        names |= {n for n in logging.Logger.manager.loggerDict if n.startswith(ROOT + ".")}
        for n in names:
            lg = logging.getLogger(n)
            if lg.level == logging.NOTSET:
                lg.setLevel(old)
        root.setLevel(levelno)
        return
    logging.getLogger(f"{ROOT}.{comp}").setLevel(levelno)


_handler: logging.Handler | None = None


def setup_logging(
    level: str = "info",
    stream: TextIO | None = None,
    *,
    log_format: str | None = None,
    escaped: bool = False,
    component_levels: str | None = None,
    path: str | None = None,
) -> list[str]:
    """Install Envoy-style output on the ``moorline`` logger (stderr, or ``path`` appended to).

    ``log_format``: an Envoy ``--log-format`` pattern (default: Envoy's bracketed line with the
    pid); ``escaped``: ``--log-format-escaped``; ``component_levels``: ``--component-log-level``.
    Returns one line per component name that has no moorline logger (for the start-up log).
    Bad values raise ``LogSetupError`` (a ``ValueError``; the CLI exits 2).
    """
    global _handler
    if level.lower() not in LEVELS:
        raise LogSetupError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    comps = parse_component_levels(component_levels) if component_levels else []
    formatter: logging.Formatter = (
        PatternFormatter(log_format, escaped) if log_format is not None else EnvoyFormatter(escaped)
    )
    if path is not None:
        try:
            new: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as e:
            raise LogSetupError(f"--log-path {path}: {e.strerror}") from None
    else:
        new = logging.StreamHandler(stream if stream is not None else sys.stderr)
    root = logging.getLogger(ROOT)
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = new
    _handler.setFormatter(formatter)
    root.addHandler(_handler)
    root.propagate = False  # one line per record, even if the embedding app configured the root
    set_level(level)
    unmapped = []
    for name, lv, comp in comps:
        if comp is None:
            unmapped.append(f"--component-log-level {name}:{lv}: moorline has no {name!r} component; ignored")
        else:
            set_component_level(comp, lv)
    return unmapped


def _loggers() -> dict[str, logging.Logger]:
    """Component -> logger for the ``moorline`` tree loggers that exist now."""
    out = {"main": logging.getLogger(ROOT)}
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and name.startswith(ROOT + "."):
            # ``moorline.main`` (the CLI and the server) is a child like any other: "main" stays
            # the ``moorline`` logger itself, whose level every child at NOTSET follows. Letting
            # the child take the name left ``moorline`` unset, so WARNING hid every info line.
            out.setdefault(component(name), lg)
    return out


def set_level(level: str, logger: str | None = None) -> bool:
    """Set every moorline logger (or only ``logger``, a component name) to ``level``.

    False when the level or the component is unknown.
    """
    levelno = LEVELS.get(level.lower())
    if levelno is None:
        return False
    loggers = _loggers()
    if logger is not None:
        lg = loggers.get(logger)
        if lg is None:
            return False
        lg.setLevel(levelno)
        return True
    # Children left at NOTSET follow ``main``; ones set individually are reset too, as Envoy's
    # "set all" does.
    loggers["main"].setLevel(levelno)
    for name, child in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(child, logging.Logger) and name.startswith(ROOT + "."):
            child.setLevel(logging.NOTSET)
    return True


def levels() -> dict[str, str]:
    """Component -> effective Envoy level name, sorted by component."""
    return {name: level_name(lg.getEffectiveLevel()) for name, lg in sorted(_loggers().items())}
