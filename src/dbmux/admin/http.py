"""A small HTTP/1.1 server on asyncio streams, for the admin listener.

The admin API needs little of HTTP (a few GETs and POSTs, no bodies worth speaking of), and
a dependency for it would be bigger than this module. It faces the network, so every part
of a request is bounded: the head's size and header count, the body's size, the time a
request may take to arrive (slowloris), the time a response may take to be read, and the
number of connections at once. Anything it cannot parse gets a 4xx JSON answer and a
close; only Content-Length bodies are read (Transfer-Encoding is refused with 501).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

log = logging.getLogger("dbmux.admin")

MAX_HEAD = 16 * 1024  # bytes of request line and headers
MAX_HEADERS = 64
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0  # seconds for a whole request to arrive, and for an idle keep-alive
WRITE_TIMEOUT = 10.0  # seconds for a response to be read
MAX_CONNECTIONS = 64
# After an error answer, what the client still sends is read and dropped for this long, or
# up to this much, so that closing with unread data (a reset) does not destroy the answer.
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (/[\x21-\x7e]*) HTTP/1\.([01])")


class HttpError(Exception):
    """A request answered with `status` and a JSON {"message": ...}. Raised while reading a
    request, the connection closes after the answer (the rest cannot be trusted)."""

    def __init__(self, status: int, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-case names; a repeated header's values joined by ", "
    body: bytes = b""
    keep_alive: bool = True


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, data: Any, **headers: str) -> Response:
        return cls(status, json.dumps(data, indent=1).encode() + b"\n", headers=headers)

    @classmethod
    def error(cls, status: int, message: str, **headers: str) -> Response:
        return cls.json(status, {"message": message}, **headers)


Handler = Callable[[Request], Awaitable[Response]]


def parse_head(head: bytes) -> Request:
    """The request line and headers, ending with the blank line; HttpError if malformed."""
    lines = head.removesuffix(b"\r\n\r\n").split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise HttpError(400, "malformed request line")
    method, target, minor = (part.decode("ascii") for part in match.groups())
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:  # obs-fold and junk alike
            raise HttpError(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    path, _, query = target.partition("?")
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and (minor == "1" or "keep-alive" in connection)
    return Request(method, path, query, headers, keep_alive=keep_alive)


def body_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
    value = headers.get("content-length")
    if value is None:
        return 0
    if not value.isdigit() or not value.isascii():  # also a repeated header ("3, 3")
        raise HttpError(400, "malformed Content-Length")
    length = int(value)
    if length > MAX_BODY:
        raise HttpError(413, f"bodies are limited to {MAX_BODY} bytes")
    return length


def encode(response: Response, keep_alive: bool) -> bytes:
    reason = HTTPStatus(response.status).phrase
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Cache-Control": "no-store",
        "Connection": "keep-alive" if keep_alive else "close",
        **response.headers,
    }
    head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return head.encode("latin-1") + b"\r\n" + response.body


class HttpServer:
    """Serves `handler` on one address; `stop()` closes the listener and every connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        # reuse_port: during a restart the new process listens beside the draining one (as
        # the proxies' listeners do), so the same config starts twice.
        self.server = await asyncio.start_server(
            self._accept, host, port, limit=MAX_HEAD, reuse_address=True, reuse_port=True
        )
        self.address = self.server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                response = Response.error(503, "too many admin connections")
                await self._send(writer, response, keep_alive=False)
                return
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the peer went away, or does not read its answers
        except asyncio.CancelledError:
            # stop() ends a kept-alive connection (a browser's): the task ends normally,
            # as asyncio's stream callback reads its exception() and would log a cancel.
            pass
        finally:
            self._connections.discard(task)
            if not task.cancelling():  # (cancelled: the admin listener stops)
                writer.close()  # after what is still buffered
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await writer.wait_closed()
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await self._read(reader)
                if request is None:
                    return
            except TimeoutError:
                error = HttpError(408, f"no whole request within {REQUEST_TIMEOUT:g} s")
            except HttpError as refused:
                error = refused
            else:
                response = await self._handle(request)
                await self._send(writer, response, keep_alive=request.keep_alive)
                if request.keep_alive:
                    continue
                return
            response = Response.error(error.status, error.message, **error.headers)
            await self._send(writer, response, keep_alive=False)
            await self._linger(reader)
            return

    async def _read(self, reader: asyncio.StreamReader) -> Request | None:
        """The next request; None when the peer closed between requests."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HttpError(431, f"request head over {MAX_HEAD} bytes") from None
        except asyncio.IncompleteReadError as error:
            if not error.partial:
                return None
            raise
        request = parse_head(head)
        length = body_length(request.headers)
        if length:
            request.body = await reader.readexactly(length)
        return request

    async def _handle(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except HttpError as error:
            return Response.error(error.status, error.message, **error.headers)
        except Exception:  # a bug costs this request only, and says so
            log.exception("admin request %s %s failed", request.method, request.path)
            return Response.error(500, "internal error in the admin API (see the proxy's log)")

    @staticmethod
    async def _linger(reader: asyncio.StreamReader) -> None:
        budget = LINGER_BYTES
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                while budget > 0 and (data := await reader.read(budget)):
                    budget -= len(data)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: Response, *, keep_alive: bool) -> None:
        writer.write(encode(response, keep_alive))
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
        if not keep_alive:
            with contextlib.suppress(OSError):
                writer.write_eof()
