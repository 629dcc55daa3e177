"""A moorline ``Server`` running in this process, on its own uvloop in a daemon thread.

For tests that drive the public configuration API (the managers' ``add_or_update`` / ``remove``)
while real clients send traffic from the test thread. The managers are not thread-safe: every
call into the server goes through ``ServerThread.call`` (run on the server's loop, result or
exception handed back).

    with ServerThread(yaml_text, drain_time=1.0) as srv:
        srv.call(srv.server.listener_manager.add_or_update, listener_proto)
        ...

A server that cannot start raises from ``start()`` (the test fails, it does not skip).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ServerThread:
    def __init__(self, config_yaml: str, drain_time: float = 1.0, source: str = "<test>") -> None:
        from moorline.config.loader import load_bootstrap
        from moorline.server import Server

        self.server = Server(load_bootstrap(yaml_text=config_yaml), source, drain_time=drain_time)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def start(self, timeout: float = 20.0) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="moorline-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("moorline server did not start in time")
        if self._error is not None:
            raise RuntimeError(f"moorline server failed to start: {self._error!r}") from self._error
        return self

    def _run(self) -> None:
        import uvloop

        loop = self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.shutdown()

        try:
            loop.run_until_complete(main())
            # As asyncio.run does: let what is still scheduled see its cancellation.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 10.0, **kw: Any) -> T:
        """Run ``fn(*args, **kw)`` on the server's loop; return its result or raise its error."""
        loop = self.loop
        assert loop is not None, "server not started"
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args, **kw))
            except BaseException as e:
                fut.set_exception(e)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass  # the loop already ended
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
