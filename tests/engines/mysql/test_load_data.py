"""LOAD DATA LOCAL INFILE through dbmux: the server asks the client for a file mid-reply,
the client streams it, the server answers; refused as directly for clients that do not
allow it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import mysql.connector
import pymysql
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbmux.engines.mysql import handshake, scanners, wire
from tests.conftest import wait_until
from tests.engines.mysql.test_bad_input import bystanding, logged_in
from tests.myraw import WAIT
from tests.mysql_fixtures import MyProxy

SMALL = 10
BIG = 120_000  # about 6 MB: many packets, more than the proxy's buffers
NOTE = "n" * 40


def load_sql(path: Path) -> str:
    return f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE loaded FIELDS TERMINATED BY ',' (n, note)"


@pytest.fixture
def files(tmp_path: Path) -> dict[int, Path]:
    made = {}
    for lines in (SMALL, BIG):
        path = tmp_path / f"rows-{lines}.csv"
        path.write_text("".join(f"{i},{NOTE}\n" for i in range(lines)))
        made[lines] = path
    return made


@pytest.fixture
def table(my_proxy: MyProxy) -> Iterator[None]:
    with my_proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS loaded")
        cur.execute("CREATE TABLE loaded (n INT, note TEXT)")
    yield


def count(cur) -> int:
    cur.execute("SELECT COUNT(*), COALESCE(SUM(n), 0) FROM loaded")
    rows, total = cur.fetchone()
    return int(rows), int(total)


def expected(lines: int) -> tuple[int, int]:
    return lines, lines * (lines - 1) // 2


Connect = Callable[[MyProxy, bool], object]


def with_pymysql(proxy: MyProxy, autocommit: bool):
    return proxy.connect(local_infile=True, autocommit=autocommit)


def with_connector(proxy: MyProxy, autocommit: bool):
    conn = proxy.connector(allow_local_infile=True)
    conn.autocommit = autocommit
    return conn


DRIVERS = [pytest.param(with_pymysql, id="pymysql"), pytest.param(with_connector, id="connector")]


@pytest.mark.parametrize("connect", DRIVERS)
@pytest.mark.parametrize("lines", [SMALL, BIG])
def test_a_driver_loads_a_local_file_outside_a_transaction(
    my_proxy: MyProxy, table, files, connect: Connect, lines: int
) -> None:
    """Without support the server refuses LOAD DATA LOCAL on a server connection the proxy
    opened without CLIENT_LOCAL_FILES, or the proxy breaks on the server's file request."""
    with bystanding(my_proxy):
        conn = connect(my_proxy, True)
        try:
            cur = conn.cursor()
            cur.execute(load_sql(files[lines]))
            assert count(cur) == expected(lines)
            cur.execute("SELECT 'after'")
            assert cur.fetchone() == ("after",)
        finally:
            conn.close()
    # (the proxy's thread may still be taking the client's goodbye)
    wait_until(lambda: my_proxy.pools.lent_count == 0, "the server connection given back")


@pytest.mark.parametrize("connect", DRIVERS)
@pytest.mark.parametrize("lines", [SMALL, BIG])
def test_a_local_file_loaded_inside_a_transaction_is_rolled_back_with_it(
    my_proxy: MyProxy, table, files, connect: Connect, lines: int
) -> None:
    """The server connection stays lent through the file exchange and the transaction: the
    rows are visible to the transaction only, and gone after its rollback."""
    conn = connect(my_proxy, False)
    try:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        cur.fetchall()
        cur.execute(load_sql(files[lines]))
        assert count(cur) == expected(lines)
        with my_proxy.connect() as other, other.cursor() as peek:
            assert count(peek) == (0, 0)
        conn.rollback()
        assert count(cur) == (0, 0)
    finally:
        conn.close()


def test_a_client_that_does_not_allow_local_files_is_refused_as_directly(
    my_proxy: MyProxy, table, files
) -> None:
    """A client that did not offer CLIENT_LOCAL_FILES must get the server's refusal even
    after another client loaded files through the same proxy: the server connection that
    allowed it is not shared with clients that did not."""
    with my_proxy.connect(local_infile=True) as loader, loader.cursor() as cur:
        cur.execute(load_sql(files[SMALL]))
    with my_proxy.connect() as plain, plain.cursor() as cur:
        with pytest.raises(pymysql.err.MySQLError) as caught:
            cur.execute(load_sql(files[SMALL]))
        assert caught.value.args[0] in (1148, 3948, 4166)  # "not allowed", as directly
        assert count(cur) == expected(SMALL)
    conn = my_proxy.connector()
    try:
        cur = conn.cursor()
        with pytest.raises(mysql.connector.Error):
            cur.execute(load_sql(files[SMALL]))
        assert count(cur) == expected(SMALL)
    finally:
        conn.close()


async def test_bytes_after_the_file_are_the_clients_next_command(my_proxy: MyProxy, table):
    """A client may send its next command right behind the file's last (empty) packet, in
    the same write: it is a command, not more of the file."""
    async with await logged_in(my_proxy, handshake.CLIENT_LOCAL_FILES) as raw:
        raw.command(b"\x03LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE loaded (n)")
        seq, request = await raw.packet()
        assert request == b"\xfbx.csv"
        content = wire.packet(seq + 1, b"7\n8\n") + wire.packet(seq + 2, b"")
        raw.send(content + wire.packet(0, b"\x03SELECT SUM(n) FROM loaded"))
        (ok,) = await raw.response(wire.RESPONSE_SIMPLE)
        assert ok[:1] == b"\0", ok
        rows = await raw.response()
        assert rows[-2].endswith(b"15")


UPLOAD = (
    wire.packet(2, b"1,a\n")
    + wire.packet(3, b"x" * 1000)
    + wire.packet(4, b"")  # the end
    + wire.packet(0, b"\x03SELECT 1")  # the next command
)
END = len(UPLOAD) - len(wire.packet(0, b"\x03SELECT 1"))


def upload_end(stream: bytes, cuts: list[int]) -> int:
    """Where an UploadScanner fed `stream` in pieces cut at `cuts` finds the end."""
    scanner = scanners.UploadScanner()
    pieces = [0, *sorted(set(cuts)), len(stream)]
    for start, stop in itertools.pairwise(pieces):
        end = scanner.feed(stream[start:stop])
        if end >= 0:
            return start + end
    return -1


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(0, len(UPLOAD)), max_size=12))
def test_the_end_of_an_upload_is_found_however_the_bytes_are_cut(cuts: list[int]) -> None:
    """Without it, a header split between reads (down to one byte) hides the empty packet
    that ends the file, and the client's next command is sent to the server as file data."""
    assert upload_end(UPLOAD, cuts) == END


def test_an_empty_packet_after_a_full_one_continues_it_and_does_not_end_the_upload() -> None:
    full = wire.packet(2, b"y" * wire.MAX_PAYLOAD)  # 16 MiB - 1 bytes and an empty piece
    stream = full + wire.packet(4, b"")
    assert upload_end(stream, [len(full) - 4, len(full) + 1]) == len(stream)


async def test_a_big_upload_is_streamed_to_the_server_not_buffered(my_proxy: MyProxy, table):
    """A client may upload any amount (the server bounds nothing until the end of the file):
    the proxy must pass it on as it comes, pausing the client while the server is behind,
    or one upload holds the whole file in the proxy's memory."""
    peak = [0]
    done = asyncio.Event()

    async def watch() -> None:  # on the proxy's loop: what it holds of any client's upload
        clients = my_proxy.embedded.proxy().runtime.clients
        while not done.is_set():
            for client in list(clients):
                server = client.server
                held = len(client.inbox)
                if server is not None and server.transport is not None:
                    held += server.transport.get_write_buffer_size()
                peak[0] = max(peak[0], held)
            await asyncio.sleep(0.002)

    watcher = asyncio.run_coroutine_threadsafe(watch(), my_proxy.embedded.loop)
    line = b"1," + b"u" * 1000 + b"\n"
    chunk = line * 64  # 64 kB per packet
    packets = 512  # 32 MB
    try:
        async with await logged_in(my_proxy, handshake.CLIENT_LOCAL_FILES) as raw:
            raw.command(b"\x03" + load_sql(Path("big.csv")).encode())
            seq, request = await raw.packet()
            assert request[:1] == b"\xfb"
            for i in range(packets):
                raw.send(wire.packet(seq + 1 + i, chunk))
                await asyncio.wait_for(raw.writer.drain(), WAIT)
            raw.send(wire.packet(seq + 1 + packets, b""))
            (ok,) = await raw.response(wire.RESPONSE_SIMPLE)
            assert wire.parse_ok(ok).affected == packets * 64
    finally:
        my_proxy.embedded.loop.call_soon_threadsafe(done.set)
        watcher.result(WAIT)
    assert peak[0] < 4 << 20
