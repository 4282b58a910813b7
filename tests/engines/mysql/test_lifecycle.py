"""What happens around a MySQL client's transactions: borrow timeouts, pins and the reset
after them, clients that leave mid-transaction, server connections that die, idle clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pymysql
import pytest

from dbmux.engines.mysql import wire
from dbmux.testing.embedded import EmbeddedDbmux
from dbmux.testing.rechunk import Rechunker
from tests.conftest import wait_until
from tests.engines.mysql.test_backpressure import buffered_for_clients
from tests.engines.mysql.test_bad_input import err_of, logged_in
from tests.myraw import WAIT
from tests.mysql_fixtures import MyProxy, my_proxy_config, server_connections
from tests.waiting import eventually


def one(conn, sql: str, args: tuple = ()):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def kill_server_connection(proxy: MyProxy, mariadb, client) -> None:
    """End, from the server side, the connection `client` holds, and wait for dbmux to see it."""
    (thread,) = one(client, "SELECT CONNECTION_ID()")
    mariadb.sql(f"KILL CONNECTION {thread}")
    wait_until(lambda: proxy.pools.budget.open == 0, "the proxy noticed the loss")


@pytest.fixture
def single(start_my_proxy: Callable[..., MyProxy]) -> MyProxy:
    """One server connection; a borrow waits at most half a second."""
    return start_my_proxy(pool={"max_connections_percent": 2, "connection_borrow_timeout": 0.5})


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        ("SELECT GET_LOCK('dbmux-test', 1)", "user_lock"),
        ("LOCK TABLES items READ", "lock_tables"),
        ("SELECT SQL_CALC_FOUND_ROWS * FROM items LIMIT 1", "found_rows"),
        ("PREPARE s FROM 'SELECT 1'", "prepared_statement"),
        ("HANDLER items OPEN", "handler"),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "set_transaction"),
        ("FLUSH TABLES items WITH READ LOCK", "global_read_lock"),
    ],
)
def test_state_that_cannot_be_carried_pins_and_is_reset_afterwards(
    single: MyProxy, mariadb, statement: str, reason: str
) -> None:
    mariadb.sql("GRANT RELOAD, LOCK TABLES ON *.* TO 'app'@'%'")
    with single.connect() as pinned:
        one(pinned, statement)
        assert one(pinned, "SELECT 1") == (1,)
    assert single.metrics.pins(reason) == 1
    wait_until(lambda: single.pools.lent_count == 0, "the pinned connection came back")
    with single.connect() as after:
        # The same server connection, reset: no lock, no statement (the temporary table:
        # tests/test_session.py).
        assert one(after, "SELECT IS_USED_LOCK('dbmux-test')") == (None,)
        assert one(after, "SELECT COUNT(*) >= 0 FROM items") == (1,)  # no table lock left


def test_a_server_connection_killed_during_a_query_is_an_error_not_a_hang(
    single: MyProxy, mariadb
) -> None:
    import threading

    with single.connect() as client:
        (thread,) = one(client, "SELECT CONNECTION_ID()")
        killer = threading.Timer(0.5, mariadb.sql, args=(f"KILL CONNECTION {thread}",))
        killer.start()
        with pytest.raises(pymysql.err.OperationalError) as caught:
            one(client, "SELECT SLEEP(10)")
        killer.join()
        assert caught.value.args[0] in (1927, 2013)
        assert one(client, "SELECT 5") == (5,)


def test_the_pool_never_exceeds_its_size_in_the_database(my_proxy: MyProxy, mariadb) -> None:
    clients = [my_proxy.connect(autocommit=False) for _ in range(10)]
    try:
        for c in clients:
            one(c, "SELECT COUNT(*) FROM items")  # each holds a transaction open
        assert server_connections(mariadb) == 10
        for c in clients:
            c.commit()
        for _ in range(30):
            with my_proxy.connect() as c:
                one(c, "SELECT COUNT(*) FROM items")
        assert server_connections(mariadb) <= 10
    finally:
        for c in clients:
            c.close()


def test_kill_query_with_the_proxys_connection_id_stops_that_clients_query_only(
    my_proxy: MyProxy,
) -> None:
    """KILL QUERY names the id a client got in its greeting (what drivers use to cancel):
    the proxy stops the query on whichever server connection that client uses now."""
    import threading

    with my_proxy.connect() as victim, my_proxy.connect() as killer:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                one(victim, "SELECT SLEEP(20)")
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        wait_until(lambda: my_proxy.pools.lent_count == 1, "the victim's query runs")
        one(killer, f"KILL QUERY {victim.thread_id()}")
        thread.join(10)
        assert not thread.is_alive(), "the query was not stopped"
        # SLEEP() interrupted returns 1 on MariaDB; other queries fail with 1317.
        assert errors == [] or errors[0].args[0] == 1317
        assert one(victim, "SELECT 'alive'") == ("alive",)
        with pytest.raises(pymysql.err.OperationalError) as caught:
            one(killer, "KILL QUERY 999999")
        assert caught.value.args[0] == 1094


@pytest.mark.parametrize("spelling", ["KILL {id}", "KILL CONNECTION {id}", "/*x*/ KILL HARD {id}"])
def test_a_client_that_kills_its_own_connection_is_told_so(my_proxy: MyProxy, spelling) -> None:
    """Directly, a connection that KILLs itself gets 1927 "Connection was killed" as the
    answer; through dbmux it used to see a bare close (2013, as if the server had died)."""
    with my_proxy.connect() as conn:
        with pytest.raises(pymysql.err.OperationalError) as caught:
            one(conn, spelling.format(id=conn.thread_id()))
        assert caught.value.args[0] == 1927
    with my_proxy.connect() as other:
        assert one(other, "SELECT 'alive'") == ("alive",)


def test_an_idle_server_connection_is_pinged_and_kept_when_it_answers(start_my_proxy) -> None:
    pool = {"max_connections_percent": 2, "max_idle_connections_percent": 2}
    proxy = start_my_proxy(pool={**pool, "idle_check_interval": 0.5})
    with proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        (first,) = cur.fetchone()
        wait_until(lambda: proxy.pools.idle_count == 1, "the connection back in the pool")
        (idle,) = [c for p in proxy.pools.pools.values() for c in p.idle]
        wait_until(lambda: idle.checked_at > idle.idle_since, "a health check (COM_PING)")
        cur.execute("SELECT CONNECTION_ID()")
        assert cur.fetchone() == (first,)  # the same server connection, still good
    assert proxy.metrics.database_connections_setup_succeeded.value == 1


async def test_a_pinned_session_whose_server_connection_dies_gets_error_2013_then_the_close(
    single: MyProxy, mariadb
) -> None:
    """A pinned session's state lived on that server connection only, so the client must go;
    without the ERR first, it sees a bare close and cannot tell a lost server from a
    network fault or a proxy crash."""
    async with await logged_in(single) as raw:
        await raw.query("CREATE TEMPORARY TABLE pinned_here (x INT)")
        _, rows = wire.parse_text_result(
            await raw.query("SELECT CONNECTION_ID()"), deprecate_eof=False
        )
        mariadb.sql(f"KILL CONNECTION {int(rows[0][0])}")
        error = err_of(await raw.read_all())
    assert error.code == wire.CR_SERVER_LOST[0]
    assert "pinned" in error.message


def test_a_driver_whose_pinned_server_connection_dies_sees_error_2013(
    single: MyProxy, mariadb
) -> None:
    with single.connect() as client:
        one(client, "SELECT GET_LOCK('dbmux-lost', 1)")
        kill_server_connection(single, mariadb, client)
        with pytest.raises(pymysql.err.OperationalError) as caught:
            one(client, "SELECT 1")
        assert caught.value.args[0] == 2013


ROWS = 30_000
ROW = b"\xfc\xe8\x03" + b"x" * 1000  # one text-protocol row: REPEAT('x', 1000)


def assert_one_result_then_maybe_an_error(stream: bytes) -> None:
    """The bytes a client read are the result of the query below, whole or cut short, then
    at most one ERR packet at a packet boundary: nothing interleaved mid-packet."""
    buf = bytearray(stream)
    packets = []
    while (item := wire.split_packet(buf)) is not None:
        packets.append(item)
    expected_seq = 1
    for i, (seq, payload) in enumerate(packets):
        if payload[:1] == b"\xff":
            assert i == len(packets) - 1 and not buf, "bytes after the ERR"
            assert seq in (expected_seq & 0xFF, 0), f"ERR with sequence id {seq}"
            return
        assert seq == expected_seq & 0xFF, f"packet {i}: sequence id {seq}"
        expected_seq += 1
        if i >= 3 and payload[:1] != b"\xfe":
            assert payload == ROW, f"packet {i} is no row: {payload[:16]!r}"
    # Closed without an ERR: what came last is a prefix of the next row packet.
    header = len(ROW).to_bytes(3, "little") + bytes((expected_seq & 0xFF,))
    assert bytes(buf) == (header + ROW)[: len(buf)], f"garbage at the end: {bytes(buf[:16])!r}"


@pytest.mark.parametrize("ending", ["kill", "idle_timeout", "shutdown"])
async def test_a_client_ended_mid_result_reads_no_proxy_packet_inside_a_relayed_one(
    start_my_proxy: Callable[..., MyProxy], ending: str
) -> None:
    """KILL from another client, the idle timeout and a shutdown end a client the proxy may
    be relaying a big result to: an ERR written into the middle of a row packet makes the
    driver read garbage lengths (a hang or a nonsense error) instead of a clean end."""
    proxy = start_my_proxy(idle_client_timeout=1 if ending == "idle_timeout" else 1800)
    async with await logged_in(proxy) as victim:
        victim.command(b"\x03SELECT REPEAT('x', 1000) FROM seq_1_to_%d" % ROWS)
        head = await asyncio.wait_for(victim.reader.readexactly(100_001), WAIT)
        # The proxy holds the rest of the result in its buffer for the victim, which is
        # not read: the buffer ends wherever the server's chunks ended, mid-packet.
        await eventually(lambda: max(buffered_for_clients(proxy)) > 0, "the rest held back")
        if ending == "kill":
            with proxy.connect() as killer:
                one(killer, f"KILL CONNECTION {victim.greeting.thread_id}")
            # A killed client that does not read is reset, not left to hold its server
            # connection until it reads the rest.
            wait_until(lambda: proxy.pools.lent_count == 0, "the server connection freed")
        elif ending == "shutdown":
            await asyncio.to_thread(proxy.embedded.stop)  # must not wait for the victim
        # idle_timeout: a client with a reply still held for it is not idle; the proxy
        # ends the session a second after the victim has read everything and gone silent.
        rest = await read_until_closed(victim)
    assert_one_result_then_maybe_an_error(head + rest)


async def read_until_closed(raw) -> bytes:
    """What the proxy sent until it closed or reset the connection (a reset may lose the
    last bytes received: what remains is still a prefix of what was sent)."""
    chunks = []
    try:
        async with asyncio.timeout(WAIT):
            while chunk := await raw.reader.read(65536):
                chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


async def test_a_session_whose_state_read_back_fails_gets_error_2013_then_the_close(
    mariadb, tmp_path
) -> None:
    """After a transaction that changed session variables, dbmux reads them back before the
    connection goes back to the pool; when the server connection dies then, the client's
    state is unknown and it must go, with an ERR saying so rather than a bare close. The
    read-back is caught in flight by cutting every server connection behind a hop that
    delays what it relays; where the cut comes too late (the read-back done), we try again."""
    server_side = Rechunker(mariadb.host, mariadb.port, seed=7, max_delay=0.3)
    config = my_proxy_config(server_side.start(), tmp_path, {}, [])
    try:
        with EmbeddedDbmux(config) as embedded:
            proxy = MyProxy(embedded, *embedded.address())
            for _ in range(10):
                async with await logged_in(proxy) as raw:
                    reply = await raw.query("SET @lost = 1")
                    assert reply[0][:1] == b"\0", reply
                    server_side.cut_all()  # while dbmux reads back @lost, most likely
                    try:
                        sent = await raw.read_all(timeout=3)
                    except AssertionError:
                        continue  # the read-back was done: the client was not touched
                error = err_of(sent)
                assert error.code == wire.CR_SERVER_LOST[0]
                assert "reading back" in error.message
                return
            raise AssertionError("the cut never came during a read-back")
    finally:
        server_side.stop()
