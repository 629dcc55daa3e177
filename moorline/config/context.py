"""What compilers of listeners, filters and clusters get to build runtime objects."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from moorline.observability.stats import Store


@dataclass
class BuildContext:
    stats: Store
    cluster_manager: Any = None  # moorline.upstream.manager.ClusterManager
    source: str | None = None  # config file name, for error messages
    notices: list[str] = field(default_factory=list)  # no-op extensions etc., logged by the server
    server: Any = None  # moorline.server.Server when running (None in validate mode)
    secrets: Any = None  # moorline.net.secrets.SecretsManager (made on first use when None)

    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_event_loop()

    def notice(self, msg: str) -> None:
        self.notices.append(msg)
