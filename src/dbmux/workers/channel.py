"""Messages between the supervisor and one worker process, over the socketpair the worker
inherits: pickled tuples, each after its 4-byte length.

Pickle is safe here because nobody else can write to the socket: it is a socketpair made by
the supervisor and passed only to the worker it started. Either side may `tell` (no answer)
or `ask` (awaiting the other side's answer); the other side's handler serves both.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

from dbmux.engines.base import PeerUnavailable

log = logging.getLogger("dbmux.workers")

_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 << 20  # a metrics snapshot or client list of a large worker fits easily
ASK_TIMEOUT = 30.0  # seconds an answer may take (a drain through the admin API waits longer)

Handler = Callable[[tuple[Any, ...]], Any]  # its result may be awaitable


class Channel(asyncio.Protocol):
    """One end of a supervisor-worker socketpair."""

    def __init__(self, handler: Handler, on_lost: Callable[[], None] = lambda: None) -> None:
        self.handler = handler
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls, sock: socket.socket, handler: Handler, on_lost: Callable[[], None] = lambda: None
    ) -> Channel:
        loop = asyncio.get_running_loop()
        _, channel = await loop.connect_accepted_socket(lambda: cls(handler, on_lost), sock=sock)
        return channel

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def tell(self, *body: Any) -> None:
        self._send(("tell", body))

    async def ask(self, *body: Any, timeout: float = ASK_TIMEOUT) -> Any:
        """The other side's answer to `body`; PeerUnavailable if it fails, is gone or takes
        longer than `timeout` seconds."""
        if not self.is_open:
            raise PeerUnavailable("the other process is gone")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._send(("ask", request_id, body))
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise PeerUnavailable(f"no answer within {timeout:g} s") from None
        finally:
            self._pending.pop(request_id, None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _send(self, message: tuple[Any, ...]) -> None:
        if not self.is_open:
            return
        assert self.transport is not None
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_LENGTH.pack(len(data)) + data)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer)
            if size > MAX_MESSAGE:
                log.error("a %d-byte message on a worker channel: closing it", size)
                self.close()
                return
            end = _LENGTH.size + size
            if len(buffer) < end:
                return
            message = pickle.loads(buffer[_LENGTH.size : end])
            del buffer[:end]
            self._dispatch(message)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PeerUnavailable("the other process is gone"))
        self._pending.clear()
        self.on_lost()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "answer":
            _, request_id, ok, value = message
            future = self._pending.get(request_id)
            if future is not None and not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(PeerUnavailable(value))
        elif kind == "ask":
            self._spawn(self._answer(message[1], message[2]))
        else:
            self._spawn(self._serve(message[1]))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, body: tuple[Any, ...]) -> Any:
        result = self.handler(body)
        return await result if inspect.isawaitable(result) else result

    async def _serve(self, body: tuple[Any, ...]) -> None:
        try:
            await self._call(body)
        except PeerUnavailable as error:  # a cancel for a worker being restarted, say
            log.info("a %r message was dropped: %s", body[0], error)
        except Exception:
            log.exception("a %r message from the other process failed", body[0])

    async def _answer(self, request_id: int, body: tuple[Any, ...]) -> None:
        try:
            value, ok = await self._call(body), True
        except PeerUnavailable as error:
            value, ok = str(error), False
        except Exception as error:
            log.exception("a %r request from the other process failed", body[0])
            value, ok = f"{type(error).__name__}: {error}", False
        self._send(("answer", request_id, ok, value))
