"""Waiting inside a test's event loop for something the code under test does on its own
(never a timing assertion: the bound only keeps a broken build from hanging the run)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

WAIT = 30.0  # seconds, as tests.conftest.wait_until


async def eventually(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll `condition` until it holds, yielding to the loop in between."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {what}")
        await asyncio.sleep(0.01)
