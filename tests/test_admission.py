"""Who may try to log in, and how fast, for both engines: connections that have not proved a
password are bounded apart from max_client_connections (a flood of silent sockets cannot lock
real clients out), failed logins slow down per user and per source address without slowing
anyone else's good login, and guessing user names leaves the proxy's derived keys alone."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pymysql
import pytest

from dbmux.auth import scram
from dbmux.auth.mysql import native_scramble
from dbmux.engines.base import ProxyRuntime
from dbmux.engines.mysql import handshake
from dbmux.engines.mysql import wire as mywire
from dbmux.metrics import ProxyMetrics
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, WAIT, RunningProxy, wait_until
from tests.myraw import CLIENT_CAPABILITIES, RawMy
from tests.mysql_fixtures import (  # noqa: F401  (fixtures used through getfixturevalue)
    MY_DB,
    MY_PASSWORD,
    MY_USER,
    MyProxy,
    mariadb,
    start_my_proxy,
)
from tests.pgraw import (
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    RawClient,
    msg,
    query,
    sasl_initial_response,
)

ATTACKER = "127.0.0.2"  # loopback, but another source address than the real client's
FLOOD = 2000


async def connect_from(source: str, host: str, port: int) -> socket.socket:
    """A TCP connection to the proxy from `source` (any 127/8 address works on Linux)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), WAIT)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class PgSide:
    """The PostgreSQL half of the contract: asyncpg logs in, a raw client guesses."""

    proxy: RunningProxy
    too_many = "53300"
    wrong_password = "28P01"
    too_slow = "08P01"

    async def log_in(self, **settings: str) -> None:
        """asyncpg logs in (with `settings`: ones the proxy checks on a server connection)."""
        conn = await asyncpg.connect(self.proxy.url(), timeout=WAIT, server_settings=settings)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    async def log_in_needing_a_server(self) -> None:
        await self.log_in(search_path="public")

    async def log_in_until_a_server_is_needed(self) -> socket.socket:
        """A raw login that proves its password and then needs a server connection."""
        sock = await connect_from("127.0.0.1", self.proxy.host, self.proxy.port)
        client = RawClient(sock)
        assert (await client.start(APP_USER, APP_DB, search_path="public")).auth_code == AUTH_SASL
        scram_client = scram.ScramClient(APP_PASSWORD)
        await client.send(sasl_initial_response(scram_client.client_first()))
        cont = await client.read_message()
        await client.send(msg(b"p", scram_client.handle_server_first(cont.payload[4:])))
        assert (await client.read_message()).auth_code == AUTH_SASL_FINAL
        assert (await client.read_message()).auth_code == AUTH_OK
        return sock

    async def occupy(self) -> Callable[[], None]:
        """Keep a server connection busy until the returned function hangs up."""
        client = await RawClient.connect(self.proxy.host, self.proxy.port)
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        await client.send(query("SELECT pg_sleep(60)"))
        return client.abort

    async def fail_login(self, source: str, user: str = APP_USER) -> str:
        sock = await connect_from(source, self.proxy.host, self.proxy.port)
        async with RawClient(sock) as client:
            assert (await client.start(user, APP_DB)).auth_code == AUTH_SASL
            guess = scram.ScramClient("not-the-password")
            await client.send(sasl_initial_response(guess.client_first()))
            cont = await client.read_message()
            assert cont.auth_code == AUTH_SASL_CONTINUE
            await client.send(msg(b"p", guess.handle_server_first(cont.payload[4:])))
            reply = await client.read_message()
            return reply.fields["C"]

    async def name_a_user(self, user: str) -> None:
        """Ask to log in as `user` and hang up once challenged."""
        sock = await connect_from("127.0.0.1", self.proxy.host, self.proxy.port)
        async with RawClient(sock) as client:
            assert (await client.start(user, APP_DB)).auth_code == AUTH_SASL

    async def refusal(self, sock: socket.socket) -> str:
        """What a silent socket was told before the proxy hung up."""
        reply = await RawClient(sock).read_message()
        assert reply.kind == b"E", reply
        return reply.fields["C"]


@dataclass
class MySide:
    """The MySQL half: PyMySQL logs in and guesses (from a chosen source address)."""

    proxy: MyProxy
    too_many = str(mywire.ER_CON_COUNT_ERROR[0])
    wrong_password = str(mywire.ER_ACCESS_DENIED_ERROR[0])
    too_slow = str(mywire.ER_NET_READ_ERROR[0])

    async def log_in(self, **options: Any) -> None:
        def select() -> None:
            with self.proxy.connect(connect_timeout=WAIT, **options) as conn:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    assert cursor.fetchone() == (1,)

        await asyncio.to_thread(select)

    async def log_in_needing_a_server(self) -> None:
        """The first client of a pool (here: of its character set) checks the login on a
        server connection."""
        await self.log_in(charset="latin1")

    async def log_in_until_a_server_is_needed(self) -> socket.socket:
        """A raw login, the first of its character set, so the proxy checks it on a server."""
        sock = await connect_from("127.0.0.1", self.proxy.host, self.proxy.port)
        _, payload = await read_packet(sock)
        nonce = handshake.parse_greeting(payload).nonce
        response = handshake.build_handshake_response(
            capabilities=CLIENT_CAPABILITIES,
            charset=8,  # latin1
            user=MY_USER,
            auth_response=native_scramble(MY_PASSWORD, nonce),
            database=MY_DB,
            plugin="mysql_native_password",
        )
        await asyncio.get_running_loop().sock_sendall(sock, mywire.packet(1, response))
        return sock

    async def occupy(self) -> Callable[[], None]:
        raw = await RawMy.connect(self.proxy.host, self.proxy.port)
        _, reply = await raw.login(MY_USER, MY_PASSWORD, MY_DB)
        assert reply[0] == 0, reply
        raw.command(b"\x03SELECT SLEEP(60)")
        return raw.close

    async def fail_login(self, source: str, user: str = MY_USER) -> str:
        def guess() -> str:
            with pytest.raises(pymysql.err.OperationalError) as caught:
                pymysql.connect(
                    host=self.proxy.host,
                    port=self.proxy.port,
                    user=user,
                    password="not-the-password",
                    database=MY_DB,
                    bind_address=source,
                    connect_timeout=WAIT,
                )
            return str(caught.value.args[0])

        return await asyncio.to_thread(guess)

    async def name_a_user(self, user: str) -> None:
        raw = await RawMy.connect(self.proxy.host, self.proxy.port)
        try:
            _, reply = await raw.login(user, MY_PASSWORD, MY_DB)
            assert reply[0] == 0xFF
        finally:
            raw.close()

    async def refusal(self, sock: socket.socket) -> str:
        while True:  # the greeting, then an ERR packet
            _, payload = await read_packet(sock)
            if payload[0] == 0xFF:
                return str(int.from_bytes(payload[1:3], "little"))


async def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One MySQL packet, read byte-exact so that nothing after it is consumed."""

    async def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(sock, n - len(data)), WAIT
            )
            assert chunk, f"closed after {data!r}"
            data += chunk
        return data

    header = await exactly(4)
    return header[3], await exactly(int.from_bytes(header[:3], "little"))


Side = PgSide | MySide


@pytest.fixture(params=["POSTGRESQL", "MYSQL"])
def start(request: pytest.FixtureRequest) -> Iterator[Callable[..., Side]]:
    """start(**proxy_settings): a fresh dbmux of the engine in front of its test server."""
    if request.param == "POSTGRESQL":
        start_proxy = request.getfixturevalue("start_proxy")
        yield lambda **settings: PgSide(start_proxy(**settings))
    else:
        start_my = request.getfixturevalue("start_my_proxy")
        yield lambda **settings: MySide(start_my(**settings))


def runtime(side: Side) -> ProxyRuntime:
    return side.proxy.embedded.proxy().runtime


def metrics(side: Side) -> ProxyMetrics:
    return side.proxy.metrics


async def test_a_flood_of_silent_sockets_does_not_lock_out_a_real_client(start) -> None:
    """Without a bound of their own, connections that never say a word hold client slots
    until client_login_timeout: 2,000 of them and no real client gets in for a minute, and
    an attacker who keeps reconnecting locks everyone out for good."""
    side = start(max_client_connections=20, max_pending_logins=10)
    host, port = side.proxy.host, side.proxy.port
    flood: list[socket.socket] = []
    try:
        for _ in range(FLOOD // 100):
            flood += await asyncio.gather(
                *(connect_from("127.0.0.1", host, port) for _ in range(100))
            )
        wait_until(
            lambda: metrics(side).client_logins_dropped.value >= FLOOD - 10,
            "the oldest silent sockets are dropped",
        )
        await side.log_in()  # while the flood is open
        # The dropped heard why, in their protocol, and nobody was refused for
        # max_client_connections: the silent ones never took a client slot.
        assert await side.refusal(flood[0]) == side.too_many
        assert metrics(side).client_connections_refused.value == 0
        assert metrics(side).client_connections_setup_succeeded.value == 1
        assert len(runtime(side).admission) <= 10
    finally:
        for sock in flood:
            sock.close()


async def test_a_burst_of_wrong_passwords_slows_down_but_not_a_good_login_elsewhere(
    start,
) -> None:
    """Without a throttle a guesser tries passwords as fast as the proxy answers; with one
    that counted failures per user only, the real user would be slowed by the attacker."""
    side = start(max_login_failure_delay=0.2)
    throttle = runtime(side).throttle
    for _ in range(10):
        assert await side.fail_login(ATTACKER) == side.wrong_password
    m = metrics(side)
    assert m.auth_failures() == 10
    # The first five failures are free; every later one waited before its answer (and,
    # from the same address, before its password was even checked).
    assert m.client_logins_delayed.value == 5
    user = APP_USER if isinstance(side, PgSide) else MY_USER
    assert throttle.penalty(user=user) == pytest.approx(0.2)
    assert throttle.penalty(address=ATTACKER) == pytest.approx(0.2)

    await side.log_in()  # the same user, from another address: not delayed at all
    assert throttle.penalty(address="127.0.0.1") == 0
    assert m.client_logins_delayed.value == 5
    assert m.client_connections_setup_succeeded.value == 1


async def test_guessing_user_names_leaves_the_proxys_derived_keys_alone(start) -> None:
    """Challenging an unknown user with a verifier derived by PBKDF2 from a random password
    spent the event loop's time on it and stored it among the proxy's own derived keys,
    so cycling through names pushed out the key of every real login to the database."""
    side = start(max_login_failure_delay=0)
    await side.log_in()  # the proxy logs in to the database itself, deriving its key
    before = set(scram.derived_keys)
    if isinstance(side, PgSide):
        assert any(password == APP_PASSWORD.encode() for password, _, _ in before)
    for _ in range(scram.derived_keys.capacity + 100):
        await side.name_a_user(f"nobody_{secrets.token_hex(8)}")
    assert set(scram.derived_keys) == before
    await side.log_in()


async def test_a_connection_that_never_proves_a_password_is_told_at_client_login_timeout(
    start,
) -> None:
    """A silent connection must end, and with the engine's error, not a bare close."""
    side = start(client_login_timeout=1)
    sock = await connect_from("127.0.0.1", side.proxy.host, side.proxy.port)
    try:
        assert await side.refusal(sock) == side.too_slow
    finally:
        sock.close()
    assert len(runtime(side).admission) == 0


async def test_a_client_past_its_password_may_wait_for_a_server_beyond_client_login_timeout(
    start,
) -> None:
    """client_login_timeout bounds how long a connection may take to prove its password. A
    client that proved it and waits for a server connection (the first of its pool, or any
    during a failover) waits under connection_borrow_timeout, as its queries will; a short
    login timeout must not fail logins the pool would have served."""
    side = start(client_login_timeout=2, pool={"max_connections_percent": 2})  # one connection
    hang_up = await side.occupy()
    login = asyncio.ensure_future(side.log_in_needing_a_server())
    try:
        await asyncio.sleep(4)  # well past client_login_timeout
        assert not login.done(), login.exception()
        assert len(runtime(side).admission) == 0  # proved: no longer pending
    finally:
        hang_up()  # the busy server connection is closed, the waiting login gets a new one
    await asyncio.wait_for(login, WAIT)


async def test_what_a_client_sends_while_its_login_waits_for_a_server_stays_in_the_kernel(
    start,
) -> None:
    """A client that proved its password but is not logged in yet has nothing to send; read
    while its login waits for a server connection (up to connection_borrow_timeout), it
    could make the proxy buffer whatever it likes."""
    side = start(pool={"max_connections_percent": 2})  # one server connection
    hang_up = await side.occupy()
    sock = await side.log_in_until_a_server_is_needed()
    wait_until(lambda: len(runtime(side).admission) == 0, "the login is past its password")
    [waiting] = [c for c in runtime(side).clients if not c.logged_in]
    sending = asyncio.ensure_future(
        asyncio.get_running_loop().sock_sendall(sock, b"\0" * (16 << 20))
    )
    try:
        for _ in range(100):  # two seconds to show it: sending 16 MiB takes milliseconds
            await asyncio.sleep(0.02)
            assert len(waiting.inbox) < 1 << 20, "the proxy buffers what the client sends"
    finally:
        sending.cancel()
        sock.close()
        hang_up()
