"""The re-chunking relay itself: whatever it cuts, the bytes and the closes arrive as sent."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from dbmux.testing.rechunk import Cuts, Rechunker

pytestmark = pytest.mark.timeout(60)
DEADLINE = 20.0  # seconds for one exchange through the relay

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Sends back what it reads; passes the client's half-close on by closing."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def digest_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Replies only once the client has half-closed: the size and hash of all it read."""
    data = await reader.read()
    writer.write(f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode())
    await writer.drain()
    writer.close()


async def count_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    reads = 0
    while await reader.read(65536):
        reads += 1
    writer.write(str(reads).encode())
    await writer.drain()
    writer.close()


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()
    writer.close()


@pytest.fixture
async def serving() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, int]]]]:
    """serving(handler) -> the address of a server on the test's loop running it."""
    servers: list[asyncio.Server] = []

    async def serve(handler: Handler) -> tuple[str, int]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[:2]

    yield serve
    for server in servers:
        server.close()
        await server.wait_closed()


async def exchange(relay: Rechunker, payload: bytes, writes: int = 1) -> bytes:
    """Send `payload` in `writes` writes, half-close, and read until the relay's EOF."""
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    step = -(-len(payload) // writes)
    for at in range(0, len(payload), step):
        writer.write(payload[at : at + step])
        await writer.drain()
    writer.write_eof()
    try:
        return await relay.bounded(reader.read(), DEADLINE)
    finally:
        writer.close()


@pytest.mark.parametrize("seed", range(20))
def test_cut_pieces_join_to_the_stream_and_fall_where_the_seed_says(seed: int) -> None:
    """Cuts are placed by stream position: however the stream is read, the pieces join to it
    and start at the same offsets. Without that a failing seed would not reproduce."""
    stream = random.Random(seed).randbytes(300_000)
    starts = []
    for reads in (1, 7, 1000):
        cuts = Cuts(f"{seed}", max_delay=0.001)
        pieces: list[bytes] = []
        offsets = {0}
        step = -(-len(stream) // reads)
        for at in range(0, len(stream), step):
            for delay, piece in cuts.split(stream[at : at + step]):
                if delay or not pieces:
                    offsets.add(sum(map(len, pieces)))
                pieces.append(piece)
                assert 0 <= delay <= 0.001
        assert b"".join(pieces) == stream
        starts.append(offsets)
    assert starts[0] == starts[1] == starts[2]


async def test_bytes_cross_unchanged_both_ways_over_many_connections(serving) -> None:
    """Every byte arrives once and in order, in both directions, whatever the cuts."""
    host, port = await serving(echo)
    sizes = [1, 2, 5, 100, 4096, 70_000, 1_000_000]
    with Rechunker(host, port, seed=7) as relay:
        rng = random.Random(3)
        for n, size in enumerate(sizes * 3):
            payload = rng.randbytes(size)
            assert await exchange(relay, payload, writes=1 + n % 5) == payload
        assert relay.connections == len(sizes) * 3


async def test_concurrent_connections_do_not_mix(serving) -> None:
    host, port = await serving(echo)
    with Rechunker(host, port, seed=11) as relay:
        payloads = [bytes([n]) * (1000 * n + 1) for n in range(1, 30)]
        got = await asyncio.gather(*(exchange(relay, p, writes=3) for p in payloads))
        assert got == payloads


async def test_a_half_close_keeps_the_other_direction_open(serving) -> None:
    """The client's EOF reaches the server, whose reply still reaches the client: a relay that
    closed both ways on the first EOF would lose the reply (and the server would never see EOF
    if it were not passed on)."""
    host, port = await serving(digest_after_eof)
    payload = random.Random(5).randbytes(200_000)
    with Rechunker(host, port, seed=2) as relay:
        reply = await exchange(relay, payload, writes=4)
    assert reply == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()


async def test_one_write_arrives_in_many_pieces(serving) -> None:
    """The relay really cuts: without it each 2 kB written at once arrives in one read."""
    host, port = await serving(count_reads)
    with Rechunker(host, port, seed=1, max_delay=0.005) as relay:
        reads = [int(await exchange(relay, bytes(2000))) for _ in range(10)]
    assert sum(reads) > 2 * len(reads)


async def test_a_target_that_refuses_closes_the_client(serving) -> None:
    host, port = await serving(echo)
    server_port = port
    with Rechunker(host, server_port, seed=1) as relay:
        # Nobody listens on the relay's own former port once the first relay is gone.
        dead_port = relay.port
    with Rechunker(host, dead_port, seed=1) as relay:
        reader, writer = await asyncio.open_connection(relay.host, relay.port)
        try:
            assert await relay.bounded(reader.read(), DEADLINE) == b""
        finally:
            writer.close()


async def test_bounded_cuts_a_stuck_exchange_and_raises(serving) -> None:
    """A driver stuck waiting for a reply is freed by cutting its connection: the wait ends
    with TimeoutError and the client's socket is closed, so the test fails instead of hanging."""
    host, port = await serving(never_answers)
    with Rechunker(host, port, seed=1) as relay:
        reader, writer = await asyncio.open_connection(relay.host, relay.port)
        writer.write(b"hello")
        with pytest.raises(TimeoutError):
            await relay.bounded(reader.read(), 0.2)
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        writer.close()
