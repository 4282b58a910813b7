"""Run dbmux on a background thread with its own event loop, for the demo and the tests.

The proxy keeps its own loop so that blocking client drivers in the caller's thread cannot
stall it, as with a separate process, while metrics and pools stay inspectable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, ClassVar, TypeVar

from dbmux.config import Address, AdminConfig, Config, parse_config
from dbmux.eventloop import new_loop
from dbmux.proxy import Process, Proxy

T = TypeVar("T")

# Unless a config says otherwise, an embedded dbmux's admin API takes a free port: many run
# side by side (tests, the demo), and none may take the default 9187 from a real one.
FREE_PORT_ADMIN = AdminConfig(listen=Address(host="127.0.0.1", port=0))
DASHBOARD_PORT = 9187  # admin.listen's default: the demo's dashboard, if no real dbmux has it


async def _cancel_leftover_tasks() -> None:
    """Connection attempts, resets and cancel deliveries still under way end with the loop."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class EmbeddedDbmux:
    """A started dbmux process on a thread; use as a context manager or call stop()."""

    default_admin: ClassVar[AdminConfig] = FREE_PORT_ADMIN  # unless a config names one

    def __init__(self, config: Config | dict[str, Any]) -> None:
        config = config if isinstance(config, Config) else parse_config(config)
        if "admin" not in config.model_fields_set:
            config = config.model_copy(update={"admin": self.default_admin})
        self.config = config
        self.loop = new_loop()
        self.process: Process | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="dbmux", daemon=True)

    def start(self) -> EmbeddedDbmux:
        self._thread.start()
        self.process = self.call(self._start())
        return self

    async def _start(self) -> Process:
        process = Process(self.config)
        await process.start()
        return process

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the proxy's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def proxy(self, name: str | None = None) -> Proxy:
        assert self.process is not None
        if name is None:
            return self.process.proxies[0]
        return next(p for p in self.process.proxies if p.config.name == name)

    @property
    def admin_url(self) -> str:
        """The admin API's base URL, e.g. http://127.0.0.1:40123."""
        assert self.process is not None and self.process.admin_address is not None
        host, port = self.process.admin_address
        return f"http://{host}:{port}"

    def address(self, name: str | None = None, endpoint: str | None = None) -> tuple[str, int]:
        """Where a proxy (the first by default) listens, or one of its `endpoints`."""
        proxy = self.proxy(name)
        return proxy.endpoint_addresses[endpoint] if endpoint else proxy.addresses[0]

    def stop(self) -> None:
        if self.process is not None:
            self.call(self.process.stop())
            self.call(_cancel_leftover_tasks())
            self.process = None
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> EmbeddedDbmux:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dashboard_admin() -> AdminConfig:
    """A loopback admin listener for the demo's dashboard: port 9187 if it is free, else any
    free port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will
        try:
            sock.bind(("127.0.0.1", DASHBOARD_PORT))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return AdminConfig(listen=Address(host="127.0.0.1", port=port))


@contextlib.contextmanager
def admin_for_every_dbmux(admin: AdminConfig) -> Iterator[None]:
    """Inside, an EmbeddedDbmux whose config names no admin listener takes `admin`: the
    demo starts one dbmux after another, and its dashboard stays at one address."""
    saved = EmbeddedDbmux.default_admin
    EmbeddedDbmux.default_admin = admin
    try:
        yield
    finally:
        EmbeddedDbmux.default_admin = saved
