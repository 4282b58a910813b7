"""The pace of the idle-timeout tests' slow reader, the same for both engines."""

from __future__ import annotations

import asyncio

IDLE = 1  # idle_client_timeout of these tests, in seconds; each client is busy 3 times that
BUSY = 3.5  # seconds the slow reader spreads its reading over
ROWS, ROW = 8000, 1000  # an 8 MB result: far more than the socket buffers on its way hold


async def pace(start: float, done: float) -> None:
    """Sleep until `done` (a fraction) of the reading should be over, so it lasts BUSY s."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + BUSY * done - loop.time()))
