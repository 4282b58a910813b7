"""The corpus against a running proxy: hostile clients log in and send the streams the corpus
inputs describe, while a bystander keeps completing transactions through the same proxy.

The bystander's progress is checked by counts: after every few hostile sessions it must
complete more transactions, within a deadline that only guards against a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomysql
import asyncpg
from tests.myraw import RawMy
from tests.pgraw import ProtocolFailure, RawClient

from bench.fuzz import mysql as my_harness
from bench.fuzz import postgres as pg_harness
from dbmux.engines.mysql import wire as my_wire
from dbmux.testing import MariaDBServer, PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux

BATCH = 10  # hostile sessions between two checks of the bystander
PROGRESS = 3  # transactions the bystander must complete after each batch
DEADLINE = 30.0  # seconds: only a hung proxy takes this long
REPLY_WAIT = 5.0  # seconds a hostile session waits for the proxy's answers


@dataclass(frozen=True)
class Login:
    host: str
    port: int
    user: str
    password: str
    database: str


class Count:
    """The bystander's completed transactions, with an event set at each."""

    def __init__(self) -> None:
        self.value = 0
        self.changed = asyncio.Event()

    def add(self) -> None:
        self.value += 1
        self.changed.set()


@dataclass
class Tally:
    sessions: int = 0  # hostile sessions run
    answered: int = 0  # of which the proxy answered to the end
    closed: int = 0  # ... the proxy refused and closed
    hung: list[bytes] = field(default_factory=list)  # ... neither (the inputs)
    transactions: list[int] = field(default_factory=list)  # the bystander's, after each batch


async def _pg_bystander(login: Login, done: Count) -> None:
    conn = await asyncpg.connect(
        host=login.host, port=login.port, user=login.user,
        password=login.password, database=login.database,
    )  # fmt: skip
    try:
        while True:
            async with conn.transaction():
                assert await conn.fetchval("SELECT 1") == 1
            done.add()
    finally:
        await conn.close()


async def _my_bystander(login: Login, done: Count) -> None:
    conn = await aiomysql.connect(
        host=login.host, port=login.port, user=login.user,
        password=login.password, db=login.database, autocommit=True,
    )  # fmt: skip
    try:
        while True:
            await conn.begin()
            async with conn.cursor() as cur:
                await cur.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
            await conn.commit()
            done.add()
    finally:
        conn.close()


ANSWERED, CLOSED, HUNG = "answered", "closed", "hung"


async def _pg_hostile(login: Login, data: bytes) -> str:
    """Send the input's client stream (whole messages) and a Sync: the proxy must answer up
    to ReadyForQuery or refuse and close."""
    client = await RawClient.connect(login.host, login.port)
    try:
        await client.login(login.user, login.password, login.database)
        await client.send(pg_harness.client_stream(data) + b"S\0\0\0\4")
        await client.read_until_ready(REPLY_WAIT)
        return ANSWERED
    except (ProtocolFailure, OSError):
        return CLOSED if client.eof else HUNG
    finally:
        client.abort()


async def _my_hostile(login: Login, data: bytes) -> str:
    """Send the input's commands one by one: the proxy must answer each that expects an
    answer (and a final COM_PING) or refuse and close."""
    client = await RawMy.connect(login.host, login.port)
    try:
        _, reply = await client.login(login.user, login.password, login.database)
        assert reply[:1] == b"\0", reply
        for payload, kind in my_harness.client_commands(data):
            client.command(payload)
            if kind is not None:
                async with asyncio.timeout(REPLY_WAIT):
                    await client.response(kind)
        client.command(bytes((my_wire.COM_PING,)))
        async with asyncio.timeout(REPLY_WAIT):
            await client.response(my_wire.RESPONSE_SIMPLE)
        return ANSWERED
    except (asyncio.IncompleteReadError, my_wire.ProtocolViolation, OSError):
        return CLOSED
    except TimeoutError:
        return HUNG
    finally:
        client.close()


Bystander = Callable[[Login, Count], Awaitable[None]]
ENGINES: dict[str, tuple[Bystander, Callable[[Login, bytes], Awaitable[str]]]] = {
    "postgres": (_pg_bystander, _pg_hostile),
    "mysql": (_my_bystander, _my_hostile),
}


async def storm(engine: str, login: Login, inputs: list[bytes]) -> Tally:
    """Every input as one hostile session, BATCH at a time, the bystander checked between
    batches; raises AssertionError if the bystander stops."""
    run_bystander, hostile = ENGINES[engine]
    done = Count()
    bystander = asyncio.create_task(run_bystander(login, done))
    tally = Tally()
    try:
        for start in range(0, len(inputs), BATCH):
            batch = inputs[start : start + BATCH]
            outcomes = await asyncio.gather(*(hostile(login, data) for data in batch))
            tally.sessions += len(batch)
            tally.answered += outcomes.count(ANSWERED)
            tally.closed += outcomes.count(CLOSED)
            tally.hung += [data for data, end in zip(batch, outcomes, strict=True) if end == HUNG]
            await _progress(bystander, done, done.value + PROGRESS)
            tally.transactions.append(done.value)
    finally:
        bystander.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bystander
    return tally


async def _progress(bystander: asyncio.Task[None], done: Count, target: int) -> None:
    try:
        async with asyncio.timeout(DEADLINE):
            while done.value < target and not bystander.done():
                done.changed.clear()
                await asyncio.wait(
                    [bystander, asyncio.ensure_future(done.changed.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
    except TimeoutError:
        raise AssertionError(f"the bystander stalled at {done.value} transactions") from None
    if bystander.done():
        bystander.result()  # its error
        raise AssertionError("the bystander stopped")


USER, PASSWORD, DATABASE = "fuzz", "fuzz-secret", "fuzz"


def run_on_throwaway_server(engine: str, inputs: list[bytes]) -> Tally:
    """`storm` through a fresh dbmux in front of a throwaway server (make fuzz)."""
    server_kind = PostgresCluster if engine == "postgres" else MariaDBServer
    with server_kind() as server, tempfile.TemporaryDirectory() as tmp:
        server.create_user(USER, PASSWORD)
        server.create_database(DATABASE, owner=USER)
        secret = Path(tmp) / "secret.json"
        secret.write_text(json.dumps({"username": USER, "password": PASSWORD}))
        config = {
            "proxies": [
                {
                    "name": "fuzz",
                    "engine_family": "POSTGRESQL" if engine == "postgres" else "MYSQL",
                    "listen": "127.0.0.1:0",
                    "auth": [{"secret": f"file:{secret}"}],
                    "target_group": {"targets": [{"host": server.host, "port": server.port}]},
                }
            ]
        }
        with EmbeddedDbmux(config) as proxy:
            host, port = proxy.address()
            return asyncio.run(storm(engine, Login(host, port, USER, PASSWORD, DATABASE), inputs))
