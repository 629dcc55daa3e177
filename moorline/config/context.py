"""What compilers of listeners, filters and clusters get to build runtime objects."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

from moorline.observability.stats import Store

# A notice starts with the field path it is about: ``a.b[0].c["key"]: message``, sometimes with
# the extension name in parentheses after the path (``http_filters[1] (istio.stats): ...``).
_PATH_HEAD = re.compile(
    r"(?P<path>[A-Za-z_@][\w@]*(?:\[[^\]]*\])*(?:\.[A-Za-z_@][\w@]*(?:\[[^\]]*\])*)*)"
    r"(?P<name> \([^)]*\))?: (?P<rest>.*)",
    re.DOTALL,
)


class Notice(str):
    """A configuration value moorline accepted but does not act on (or acts on differently).

    It is the text ``"<field.path>: <message>"`` (so ``"tracing" in notice`` works) and carries
    the two parts as ``path`` and ``message``; ``--reject-ignored`` turns each one into a
    ``ConfigError(path, message)``.
    """

    path: str
    message: str

    def __new__(cls, path: str, message: str) -> Notice:
        self = super().__new__(cls, f"{path}: {message}" if path else message)
        self.path = path
        self.message = message
        return self

    @classmethod
    def parse(cls, text: str) -> Notice:
        """``"a.b: why"`` -> ``Notice("a.b", "why")``; text with no leading path keeps path ``""``."""
        m = _PATH_HEAD.fullmatch(text)
        if m is None:
            return cls("", text)
        rest = m.group("rest")
        name = m.group("name")
        return cls(m.group("path"), f"{name.strip()[1:-1]}: {rest}" if name else rest)


@dataclass
class BuildContext:
    stats: Store
    cluster_manager: Any = None  # moorline.upstream.manager.ClusterManager
    source: str | None = None  # config file name, for error messages
    notices: list[Notice] = field(default_factory=list)  # logged at start, listed by `validate`
    server: Any = None  # moorline.server.Server when running (None in validate mode)
    access_logs: Any = None  # observability.access_log.AccessLogSinks, made on first use
    codecs: Any = None  # stream.api.CodecRegistry (the server's; built-ins when None)
    secrets: Any = None  # moorline.net.secrets.SecretsManager (made on first use when None)
    # moorline.overload.OverloadState when an overload manager (or the global connection limit)
    # is configured: listeners and connection managers keep it; None costs them nothing.
    overload: Any = None
    # Set by the HTTP connection manager while it compiles one ``http_filters`` list (and reset
    # after it): the ``http.<stat_prefix>.`` its filters root their stats at, the ``name`` of
    # the filter being compiled (its key in ``typed_per_filter_config``), and a scratch dict the
    # filters of that one list share (compressor filters find each other through it).
    http_stat_prefix: str = ""
    # True while an internal listener's chains compile (they never take connections).
    in_internal_listener: bool = False
    http_filter_name: str = ""
    http_chain_state: dict[str, Any] | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_event_loop()

    def notice(self, msg: str, path: str | None = None) -> None:
        """Announce something accepted but not acted on. ``msg`` is ``"<field.path>: <why>"``
        (or pass ``path`` and the bare reason). The same notice twice is kept once."""
        n = Notice(path, msg) if path is not None else Notice.parse(msg)
        if n not in self.notices:
            self.notices.append(n)

    def has_notice_at(self, path: str) -> bool:
        """Whether a notice already covers ``path``: the same field, one inside it, or one of
        its parents (so a generic "field ignored" line does not repeat a compiler's own)."""
        for n in self.notices:
            p = n.path
            if p == path or _inside(p, path) or _inside(path, p):
                return True
        return False


def _inside(child: str, parent: str) -> bool:
    return len(child) > len(parent) and child.startswith(parent) and child[len(parent)] in ".["
