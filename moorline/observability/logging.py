"""Process logging with Envoy's level names and line format.

Every moorline module logs through a child of the ``moorline`` logger
(``logging.getLogger("moorline.upstream")``); the part after ``moorline.`` is the
component Envoy prints in brackets, and the ``moorline`` logger itself is ``main``::

    [2026-11-27 12:00:00.000][4242][info][upstream] cluster foo: 3 hosts

Levels are Envoy's: trace, debug, info, warning (warn), error, critical, off. The
admin ``/logging`` endpoint reads ``levels()`` and calls ``set_level``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

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

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        ms = int(record.msecs)
        line = f"[{t}.{ms:03d}][{self._pid}][{level_name(record.levelno)}][{component(record.name)}] {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_handler: logging.Handler | None = None


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Install Envoy-style output on the ``moorline`` logger (stderr by default).

    Unknown level names raise ``ValueError`` (the CLI reports it as a usage error).
    """
    global _handler
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    root = logging.getLogger(ROOT)
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    _handler.setFormatter(EnvoyFormatter())
    root.addHandler(_handler)
    root.propagate = False  # one line per record, even if the embedding app configured the root
    set_level(level)


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
