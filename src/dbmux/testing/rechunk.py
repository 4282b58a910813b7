"""A TCP hop that cuts every write at random points and delays the pieces, for tests and bench.

Between a driver and dbmux, or dbmux and a server, it makes every message boundary land in
every possible place (a header split after one byte, two messages in one read, a reply
trickling in while the next request is already sent), which is what exposes code that
assumes one read is one message or that a peer waits. The cuts and delays of one direction
of one connection come from a random.Random seeded by (seed, relay name, connection number,
direction) and are placed by stream position, not by how reads happened to arrive, so a
failing seed cuts the same bytes the same way again.

The hop runs on its own thread and event loop (as dbmux.testing.embedded does) so that blocking
drivers in the caller's thread work through it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import threading
from collections.abc import Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

READ_SIZE = 64 * 1024
MAX_DELAY = 0.002  # seconds; pieces wait between 0 and this
# Each new piece is tiny, small or large with these odds: tiny cuts land inside headers, large
# ones keep a result of a few MB down to a few hundred pieces (and sleeps).
TINY, SMALL = 0.4, 0.3


class Cuts:
    """Where one direction of one connection is cut, and how long each piece waits."""

    def __init__(self, seed: str, max_delay: float) -> None:
        self._random = random.Random(seed)
        self._max_delay = max_delay
        self._left = self._next_length()

    def _next_length(self) -> int:
        odds = self._random.random()
        if odds < TINY:
            return self._random.randint(1, 8)
        if odds < TINY + SMALL:
            return self._random.randint(9, 512)
        return self._random.randint(513, READ_SIZE)

    def _next_delay(self) -> float:
        # Half the pieces go at once: back-to-back pieces may still meet in the peer's buffer.
        return self._random.uniform(0, self._max_delay) if self._random.random() < 0.5 else 0.0

    def split(self, data: bytes) -> Iterator[tuple[float, bytes]]:
        """(delay, piece) for each piece of `data`; a piece cut short by the end of a read is
        finished by the start of the next one, with no delay of its own."""
        view = memoryview(data)
        delay = 0.0
        while view:
            n = min(self._left, len(view))
            yield delay, bytes(view[:n])
            view = view[n:]
            self._left -= n
            delay = 0.0
            if self._left == 0:
                self._left = self._next_length()
                delay = self._next_delay()


def _new_loop() -> asyncio.AbstractEventLoop:
    """The stdlib loop on purpose: dbmux itself runs on uvloop, and two loop implementations
    meeting over a socket is one more way for timing to vary."""
    return asyncio.new_event_loop()


class Rechunker:
    """A started relay from (self.host, self.port) to `target`; a context manager, or call
    start() and stop()."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        seed: int = 1,
        name: str = "rechunk",
        max_delay: float = MAX_DELAY,
    ) -> None:
        self.target = (target_host, target_port)
        self.seed = seed
        self.name = name
        self.max_delay = max_delay
        self.host, self.port = "127.0.0.1", 0
        self.connections = 0  # accepted so far
        self._numbers = itertools.count()
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: dict[asyncio.Task[None], list[asyncio.WriteTransport]] = {}

    def __repr__(self) -> str:
        return f"Rechunker({self.name} {self.host}:{self.port} -> {self.target}, seed={self.seed})"

    def start(self) -> Rechunker:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, self.host, 0))
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._close())
            self._server = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> Rechunker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cut_all(self) -> None:
        """Abort every connection through the hop, both sides, from any thread."""
        self._loop.call_soon_threadsafe(self._abort_all)

    async def bounded(self, awaitable: Awaitable[T], seconds: float) -> T:
        """Await `awaitable` for at most `seconds`, else raise TimeoutError. A driver waiting for
        a reply that never comes may not end on cancellation alone (psycopg answers a cancelled
        pipeline by waiting for its results again), so past the deadline every connection
        through the hop is cut first: the driver sees its socket close and gives up."""
        task = asyncio.ensure_future(awaitable)
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.shield(task)
        except TimeoutError:
            if task.done():  # the awaitable's own TimeoutError
                raise
            self.cut_all()
            task.cancel()
            await asyncio.wait([task], timeout=10)
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: it is the hang's aftermath, not news
            raise

    # -- on the hop's own loop

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _cuts(self, number: int, direction: str) -> Cuts:
        return Cuts(f"{self.seed}/{self.name}/{number}/{direction}", self.max_delay)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        number = next(self._numbers)
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._links[task] = [client_w.transport]
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                client_w.transport.abort()
                return
            self._links[task].append(server_w.transport)
            for writer in (client_w, server_w):
                # Without it the kernel would join our small pieces again (Nagle), and a piece
                # waiting for the peer's delayed ACK would stall 40 ms.
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(
                self._pump(client_r, server_w, self._cuts(number, "up"), task),
                self._pump(server_r, client_w, self._cuts(number, "down"), task),
            )
            for writer in (client_w, server_w):
                writer.close()
        except asyncio.CancelledError:
            # Stopping the hop. Ending normally: asyncio's start_server callback logs an error
            # for a connection task that ends cancelled.
            pass
        finally:
            del self._links[task]

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cuts: Cuts,
        link: asyncio.Task[None],
    ) -> None:
        """One direction until EOF, which is passed on as a half-close (the other direction
        goes on); an error on either socket aborts both."""
        try:
            while data := await reader.read(READ_SIZE):
                for delay, piece in cuts.split(data):
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(piece)
                    await writer.drain()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except OSError:
            self._abort(link)

    def _abort(self, link: asyncio.Task[None]) -> None:
        for transport in self._links.get(link, ()):
            transport.abort()

    def _abort_all(self) -> None:
        for link in list(self._links):
            self._abort(link)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        self._abort_all()
        tasks = list(self._links)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
