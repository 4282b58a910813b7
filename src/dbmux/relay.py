"""Engine-agnostic asyncio Protocol base with two modes.

Handshakes, resets and other rare conversations read whole messages with `await read(...)`;
once a connection relays, every chunk goes straight to `relay(data)` with no buffering or
futures in between. Backpressure is tracked per side so the relay can pause the peer.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar, cast

T = TypeVar("T")


KEEPALIVE_IDLE = 30  # seconds of silence before the kernel probes a server connection
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3

# After a refusal, what a client still sends is read and dropped for this long, or up to
# this much, before the connection is closed (see FramedProtocol.close_lingering).
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024


def enable_keepalive(transport: asyncio.BaseTransport) -> None:
    """Let the kernel find server connections whose peer vanished (a host that died, a
    network partition): pooled connections idle for long are never lent dead, and the
    check costs the proxy nothing."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class ConnectionClosed(Exception):
    """The peer closed the connection while we waited for a message."""


class TlsHandshakeFailed(ConnectionClosed):
    """The TLS handshake failed: the peer's certificate did not verify, or the two sides
    found no protocol version or cipher in common (not a connection merely lost)."""


class FramedProtocol(asyncio.Protocol):
    """Transport plumbing shared by client- and server-side protocols of every engine.

    Slotted, as are the client classes built on it: a proxy holds tens of thousands of idle
    clients, and an instance dict of their sixty-odd attributes costs more than the rest
    of an idle client together."""

    __slots__ = (
        "_read_holds",
        "_reading_paused",
        "_waiter",
        "data_received",
        "inbox",
        "is_closed",
        "relaying",
        "tls",
        "transport",
        "write_blocked",
    )
    # What the transport calls with each chunk: `_take` (into the inbox, for `read`), or
    # `relay` once relaying (see start_relaying).
    data_received: Callable[[bytes], None]  # type: ignore[assignment]

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.tls = False  # the connection runs over TLS
        self.inbox = bytearray()
        self.relaying = False
        self.is_closed = False
        self.write_blocked = False  # our transport's buffer is above its high-water mark
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._read_holds = 0
        self.data_received = self._take

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a stream protocol gets a full Transport
        self.transport = stream
        stream.set_write_buffer_limits(high=256 * 1024)

    def _take(self, data: bytes) -> None:
        if self.relaying:  # (relay mode's chunks go to `relay` directly)
            self.relay(data)
            return
        self.inbox += data
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self._wake()
        self.on_closed(exc)

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.on_write_blocked(True)

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.on_write_blocked(False)

    # -- for subclasses ---------------------------------------------------------------------

    def relay(self, data: bytes) -> None:
        """Handle one chunk in relay mode."""
        raise NotImplementedError

    def on_closed(self, exc: Exception | None) -> None:
        """The transport is gone."""

    def on_write_blocked(self, blocked: bool) -> None:
        """Our outgoing buffer crossed a water mark: pause or resume whoever feeds it."""

    # -- reading whole messages (not the hot path) --------------------------------------------

    async def read(self, split: Callable[[bytearray], T | None]) -> T:
        """Wait until `split` can take one message off the inbox."""
        while True:
            item = split(self.inbox)
            if item is not None:
                return item
            if self.is_closed:
                raise ConnectionClosed("connection closed by peer")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def start_tls(
        self,
        context: ssl.SSLContext,
        timeout: float,
        *,
        server_hostname: str | None = None,
        received: bytes = b"",
    ) -> None:
        """Go on over TLS once the protocol's TLS request is accepted: as the server side
        towards a client, or, given the `server_hostname` to check and send as SNI, as the
        client side towards a database. The caller refuses bytes the peer sent before its
        TLS handshake: they would be read as if they came over TLS. `received` is the start
        of the handshake itself when it was read already (direct TLS: the client's first
        bytes are its ClientHello; MySQL: the ClientHello right behind the SSL request)."""
        plain = self.transport
        assert plain is not None and not self.inbox
        loop = asyncio.get_running_loop()
        # Until start_tls puts its TLS protocol on the transport (its own resume follows),
        # whatever comes is the handshake's and must not land in our inbox.
        plain.pause_reading()
        upgrade = loop.create_task(
            loop.start_tls(
                plain,
                self,
                context,
                server_side=server_hostname is None,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        )
        if received:
            # Runs right after start_tls's first step (scheduled before it), which puts the
            # TLS protocol on the transport with reading paused until later callbacks.
            loop.call_soon(self._feed_tls, plain, received)
        try:
            transport = await upgrade
        except BaseException as error:  # a failed handshake, or the login's deadline
            self._tls_failed(plain)
            if isinstance(error, ssl.SSLCertVerificationError):
                raise TlsHandshakeFailed(
                    f"certificate verify failed: {error.verify_message}"
                ) from None
            if isinstance(error, ssl.SSLError):
                raise TlsHandshakeFailed(f"TLS handshake failed: {error.reason or error}") from None
            if isinstance(error, OSError):
                raise ConnectionClosed(
                    f"connection lost during the TLS handshake: {error}"
                ) from None
            raise
        if transport is None:  # closed during the handshake
            self._tls_failed(plain)
            raise ConnectionClosed("connection closed during the TLS handshake")
        self.transport = transport
        self.tls = True

    def _tls_failed(self, plain: asyncio.Transport) -> None:
        """A handshake that did not finish ends the connection, and the TLS layer, which
        holds the transport until then, does not tell this protocol: it closes itself."""
        plain.abort()
        if not self.is_closed:
            self.connection_lost(None)

    def _feed_tls(self, transport: asyncio.Transport, data: bytes) -> None:
        """Hand bytes already read to the TLS protocol now on `transport`, ahead of all the
        transport reads from now on, through its BufferedProtocol interface (CPython's own
        start_tls hands over a stream's buffered bytes the same way)."""
        tls = transport.get_protocol()
        if tls is self or not hasattr(tls, "get_buffer"):  # start_tls failed before taking over
            transport.abort()
            return
        feed = cast(asyncio.BufferedProtocol, tls)
        view = memoryview(data)
        while view:
            buffer = memoryview(feed.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            feed.buffer_updated(size)
            view = view[size:]

    def start_relaying(self) -> bytes:
        """Switch to relay mode; return bytes that arrived before and were not yet read.

        `relay` becomes data_received itself, saving a call per chunk; uvloop caches the
        bound method, so the transport is told again with set_protocol."""
        self.relaying = True
        self.data_received = self.relay  # one call less per chunk
        if self.transport is not None:
            self.transport.set_protocol(self)
        leftover = bytes(self.inbox)
        self.inbox.clear()
        return leftover

    def stop_relaying(self) -> None:
        self.relaying = False
        self.data_received = self._take
        if self.transport is not None:
            self.transport.set_protocol(self)

    # -- flow control -----------------------------------------------------------------------

    def hold_reading(self) -> None:
        """Stop reading until every hold is released (waits for a server, full peer buffer)."""
        self._read_holds += 1
        if not self._reading_paused and self.transport is not None and not self.is_closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def release_reading(self) -> None:
        self._read_holds -= 1
        if self._read_holds <= 0:
            self._read_holds = 0
            if self._reading_paused and self.transport is not None and not self.is_closed:
                self._reading_paused = False
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.is_closed:
            self.transport.write(data)

    def close_transport(self, *, abort: bool = False) -> None:
        # (Once closed, a lingering transport is no longer ours to close.)
        if self.transport is not None and not self.transport.is_closing() and not self.is_closed:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def close_lingering(self) -> None:
        """Close after a refusal written just before, so that the peer reads it.

        A close with unread bytes in the kernel's receive buffer sends a RST, which can
        overtake the refusal: the peer sees "connection reset" instead of the reason. So the
        write side is shut down (FIN after the refusal) and what the peer still sends is read
        and dropped, within LINGER_SECONDS and LINGER_BYTES, by a protocol of its own: for
        this object the connection ends now (connection_lost runs at once). TLS has no half
        close; its own shutdown (close_notify) does the same job."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.is_closed:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.set_protocol(_Lingering(transport))
        transport.resume_reading()  # whatever held it held it for this object
        self.connection_lost(None)


class _Lingering(asyncio.Protocol):
    """Takes over a transport whose write side is shut down: drops what comes until the
    peer closes too, or a bound is reached, then closes (abort: a close would wait for a
    peer that does not read)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.budget = LINGER_BYTES
        self.timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        self.budget -= len(data)
        if self.budget < 0:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # the peer read the refusal and closed: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


class ServerEnd(FramedProtocol):
    """The server half of a relay pair: `client` is whoever the connection is lent to."""

    client: ClientEnd | None
    # Set by connection_made, before the login: never None where a connection is used.
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        enable_keepalive(transport)

    def resume_relaying(self) -> None:
        """Back to relaying after the proxy's own conversation; what came meanwhile too."""
        leftover = self.start_relaying()
        if leftover:
            self.relay(leftover)

    def on_write_blocked(self, blocked: bool) -> None:
        if self.client is not None:
            self.client.peer_write_blocked(blocked)


class ClientEnd(FramedProtocol):
    """The client half of a relay pair: flow control with the server it is attached to, so a
    slow reader on either side pauses the other instead of filling the proxy's memory."""

    __slots__ = ("_held_by_server", "_holding_self", "_holding_server")
    server: ServerEnd | None

    def __init__(self) -> None:
        super().__init__()
        self._holding_server = False  # we paused the server because our buffer is full
        self._held_by_server = False  # the server paused us because its buffer is full
        self._holding_self = False  # we paused ourselves because our buffer is full

    def on_write_blocked(self, blocked: bool) -> None:
        """Our client reads slowly: stop reading the server until it catches up, and stop
        reading the client too, since replies the proxy writes itself (pings, refusals)
        would fill our buffer without a server involved."""
        if blocked != self._holding_self:
            self._holding_self = blocked
            if blocked:
                self.hold_reading()
            else:
                self.release_reading()
        server = self.server
        if server is None or blocked == self._holding_server:
            return
        self._holding_server = blocked
        if blocked:
            server.hold_reading()
        else:
            server.release_reading()

    def peer_write_blocked(self, blocked: bool) -> None:
        """The server reads slowly (COPY IN, big commands): stop reading the client."""
        if blocked == self._held_by_server:
            return
        self._held_by_server = blocked
        if blocked:
            self.hold_reading()
        else:
            self.release_reading()

    def drop_holds(self, server: ServerEnd) -> None:
        """The pair parts: undo the pauses either side put on the other."""
        if self._holding_server:
            self._holding_server = False
            server.release_reading()
        if self._held_by_server:
            self._held_by_server = False
            self.release_reading()
