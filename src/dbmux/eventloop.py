"""The event loop dbmux runs on: uvloop where installed (the hot path is measured on it),
the standard library's otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end on a new loop of its own."""
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(coro)
