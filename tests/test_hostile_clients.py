"""Hostile clients of one database user, in random interleavings, through a pool of two
server connections, on both engines: no client ever observes another's session.

Three well-behaved clients prepare statements (their own texts, and one text they all
share), set a session value, make a temporary `shadow` table (which hides the real one),
send MySQL long data, and reconnect, in an order hypothesis draws. An attacker of the same
user meanwhile does what a careful reader of the proxy would try: KILL in every spelling
with server thread ids read from the process list (MySQL), long data left on a shared
statement (MySQL), temporary objects made through the schema or search_path, SET of the
values the others use, and Close/Parse/Describe/Bind of statement names it never prepared
(the proxy's own names, `dbmux_N`, and those in pg_prepared_statements).

After every step the acting client, and after every hostile move all clients, check against
a model of their own session: each prepared statement returns its own text's result, the
value read back is the last one it set (or its login value), `shadow` is its own temporary
table or the real one, and its connection is alive. Values name the client they belong to,
so a leak shows up as another client's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from dbmux.engines.mysql import handshake, wire
from tests import pgraw
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.myraw import CLIENT_CAPABILITIES, RawMy
from tests.mysql_fixtures import (  # noqa: F401 (fixtures, used by name)
    MY_DB,
    MY_PASSWORD,
    MY_USER,
    mariadb,
    start_my_proxy,
)

N_CLIENTS = 3
N_STATEMENTS = 3  # statements of its own a client may prepare
POOL_OF_TWO = {"max_connections_percent": 4, "connection_borrow_timeout": 5}  # 4% of 50
STEP_TIMEOUT = 20.0  # a hang fails the step instead of stalling CI
EXAMPLES = 30

# -- the model -------------------------------------------------------------------------------


@dataclass
class Model:
    """A client's session as the server would keep it on a direct connection."""

    statements: set[int] = field(default_factory=set)
    value: int | None = None  # what it last set (None: its login value)
    temp: bool = False  # its temporary `shadow` exists
    long_data: bytes = b""  # sent for the shared statement, not yet executed

    def holds(self) -> bool:
        """Whether the session keeps its server connection between commands."""
        return self.temp or bool(self.long_data)


class ClientError(Exception):
    """The server or proxy answered a client's command with an error."""


# -- PostgreSQL ------------------------------------------------------------------------------


class PgSession:
    """A well-behaved asyncpg client."""

    def __init__(self, conn: asyncpg.Connection, i: int) -> None:
        self.conn, self.i = conn, i
        self.statements: dict[int, Any] = {}
        self.shared: Any = None
        self.login_value = ""

    @classmethod
    async def open(cls, proxy: Any, i: int) -> PgSession:
        conn = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        session = cls(conn, i)
        # Named statements (asyncpg's are unnamed without a cache): the proxy maps names.
        session.shared = await conn.prepare("SELECT $1::text", name="shared")
        session.login_value = await conn.fetchval("SELECT current_setting('application_name')")
        return session

    async def prepare(self, k: int) -> None:
        sql = f"SELECT 'c{self.i}-k{k}-' || $1::text"
        self.statements[k] = await self.conn.prepare(sql, name=f"own{k}")

    async def run(self, k: int, param: str) -> str:
        return await self.statements[k].fetchval(param)

    async def run_shared(self, param: str) -> str:
        return await self.shared.fetchval(param)

    async def set_value(self, v: int) -> None:
        await self.conn.execute(f"SET application_name = '{self.expected_value(v)}'")

    def expected_value(self, v: int | None) -> str:
        return self.login_value if v is None else f"c{self.i}-v{v}"

    async def read_value(self) -> str:
        return await self.conn.fetchval("SELECT current_setting('application_name')")

    async def make_temp(self) -> None:
        await self.conn.execute(f"CREATE TABLE pg_temp.shadow AS SELECT 'c{self.i}'::text AS tag")

    async def read_shadow(self) -> str:
        return await self.conn.fetchval("SELECT string_agg(tag, ',') FROM shadow")

    async def close(self) -> None:
        await self.conn.close()


def pg_message(kind: bytes, *parts: bytes) -> bytes:
    return pgraw.msg(kind, b"".join(parts))


class PgAttacker:
    """A raw PostgreSQL client that sends what no driver would."""

    TEMP_FORMS = (
        "CREATE TABLE pg_temp.shadow AS SELECT 'attacker'::text AS tag",
        "SELECT 'attacker'::text AS tag INTO pg_temp.shadow",
        "CREATE TABLE U&\"pg\\005ftemp\".shadow AS SELECT 'attacker'::text AS tag",
        "BEGIN; SET LOCAL search_path = pg_temp; CREATE TABLE shadow AS SELECT 'attacker'::text"
        " AS tag; COMMIT",
    )

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.raw: pgraw.RawClient | None = None

    async def connect(self) -> None:
        self.raw = await pgraw.RawClient.connect(self.proxy.host, self.proxy.port)
        await self.raw.login(APP_USER, APP_PASSWORD, APP_DB)

    async def close(self) -> None:
        if self.raw is not None:
            with contextlib.suppress(OSError, AssertionError):
                await self.raw.send(pgraw.msg(b"X"))
            self.raw.abort()

    async def reconnect(self) -> None:
        await self.close()
        await self.connect()

    async def move(self, move: tuple[Any, ...]) -> None:
        assert self.raw is not None
        kind = move[0]
        if kind == "set":
            await self.raw.simple_query("SET application_name = 'attacker'")
        elif kind == "temp":
            await self.raw.simple_query(self.TEMP_FORMS[move[1] % len(self.TEMP_FORMS)])
            await self.reconnect()
        elif kind == "names":
            # A few operations in one session (close a name, then parse SQL under it...);
            # then the attacker leaves, in case the proxy pinned it for what it did.
            for op, from_catalog, index in move[1]:
                await self.foreign_name(op, from_catalog, index)
            await self.reconnect()

    async def foreign_name(self, op: str, from_catalog: bool, index: int) -> None:
        """Close, Parse, Describe or Bind a statement name the attacker never prepared."""
        assert self.raw is not None
        name = f"dbmux_{index % 10}"
        if from_catalog:
            rows = pgraw.data_rows(
                await self.raw.simple_query("SELECT name FROM pg_prepared_statements ORDER BY 1")
            )
            if rows:
                name = str(rows[index % len(rows)][0])
        encoded = name.encode() + b"\0"
        if op == "close":
            out = pg_message(b"C", b"S", encoded)
        elif op == "describe":
            out = pg_message(b"D", b"S", encoded)
        elif op == "parse":  # the victims' own parameter, the attacker's SQL
            sql = b"SELECT 'pwned-' || $1::text\0"
            out = pg_message(b"P", encoded, sql, struct.pack("!h", 0))
        else:
            # No parameter formats, one NULL parameter, no result formats.
            bind = struct.pack("!hhih", 0, 1, -1, 0)
            out = pg_message(b"B", b"\0", encoded, bind) + pg_message(b"E", b"\0", pgraw.i32(0))
        await self.raw.send(out + pgraw.msg(b"S"))
        await self.raw.read_until_ready()  # an ErrorResponse (26000...) is fine


# -- MySQL -----------------------------------------------------------------------------------

MY_CAPABILITIES = CLIENT_CAPABILITIES | handshake.CLIENT_MULTI_STATEMENTS


def text_rows(payloads: list[bytes]) -> list[list[bytes | None]]:
    """The rows of a text result (an OK: none); an ERR raises ClientError."""
    first = payloads[0]
    if first[:1] == b"\xff":
        raise ClientError(wire.parse_err(first))
    if first[:1] == b"\0":
        return []
    columns, _ = wire.read_lenenc(first, 0)
    assert columns is not None
    rows = []
    for row in payloads[columns + 2 : -1]:
        pos, values = 0, []
        for _ in range(columns):
            value, pos = wire.read_lenenc_str(row, pos)
            values.append(value)
        rows.append(values)
    return rows


def binary_value(payloads: list[bytes]) -> bytes | None:
    """The one value of a one-column, one-row binary result."""
    first = payloads[0]
    if first[:1] == b"\xff":
        raise ClientError(wire.parse_err(first))
    (row,) = payloads[3:-1]
    if row[1] & 4:  # the NULL bitmap starts at bit 2
        return None
    return wire.read_lenenc_str(row, 2)[0]


def execute_string(statement: int, value: bytes) -> bytes:
    head = b"\x17" + statement.to_bytes(4, "little") + b"\0" + (1).to_bytes(4, "little")
    return head + b"\0\x01\xfd\x00" + wire.lenenc_str(value)


async def login_my(proxy: Any) -> RawMy:
    raw = await RawMy.connect(proxy.host, proxy.port)
    reply = await raw.login(MY_USER, MY_PASSWORD, MY_DB, MY_CAPABILITIES)
    assert reply[1][:1] == b"\0", reply
    return raw


class MySession:
    """A well-behaved client speaking the binary protocol for its statements."""

    def __init__(self, raw: RawMy, i: int) -> None:
        self.raw, self.i = raw, i
        self.statements: dict[int, int] = {}
        self.shared = 0
        self.login_zone = b""

    @classmethod
    async def open(cls, proxy: Any, i: int) -> MySession:
        session = cls(await login_my(proxy), i)
        session.shared = await session.prepare_text(b"SELECT ?")
        ((zone,),) = await session.query("SELECT @@time_zone")
        session.login_zone = zone or b""
        return session

    @property
    def thread_id(self) -> int:
        assert self.raw.greeting is not None
        return self.raw.greeting.thread_id

    async def query(self, sql: str) -> list[list[bytes | None]]:
        return text_rows(await self.raw.query(sql))

    async def prepare_text(self, text: bytes) -> int:
        self.raw.command(b"\x16" + text)
        reply = await self.raw.response(wire.RESPONSE_PREPARE)
        if reply[0][:1] == b"\xff":
            raise ClientError(wire.parse_err(reply[0]))
        return wire.parse_prepare_ok(reply[0]).statement_id

    async def execute(self, statement: int, param: str) -> str | None:
        self.raw.command(execute_string(statement, param.encode()))
        value = binary_value(await self.raw.response())
        return None if value is None else value.decode()

    async def prepare(self, k: int) -> None:
        text = f"SELECT CONCAT('c{self.i}-k{k}-', ?)".encode()
        self.statements[k] = await self.prepare_text(text)

    async def run(self, k: int, param: str) -> str | None:
        return await self.execute(self.statements[k], param)

    async def run_shared(self, param: str) -> str | None:
        return await self.execute(self.shared, param)

    def send_long_data(self, chunk: bytes) -> None:
        self.raw.command(b"\x18" + self.shared.to_bytes(4, "little") + b"\0\0" + chunk)

    def expected_value(self, v: int | None) -> tuple[bytes | None, bytes]:
        if v is None:
            return None, self.login_zone
        return f"c{self.i}-v{v}".encode(), f"+0{self.i}:{v % 4 * 15:02d}".encode()

    async def set_value(self, v: int) -> None:
        zone = self.expected_value(v)[1].decode()
        await self.query(f"SET @tag = 'c{self.i}-v{v}', time_zone = '{zone}'")

    async def read_value(self) -> tuple[bytes | None, bytes]:
        ((tag, zone),) = await self.query("SELECT @tag, @@time_zone")
        return tag, zone or b""

    async def make_temp(self) -> None:
        await self.query(f"CREATE /*!TEMPORARY*/ TABLE shadow SELECT 'c{self.i}' AS tag")

    async def read_shadow(self) -> str:
        rows = await self.query("SELECT GROUP_CONCAT(tag) FROM shadow")
        return (rows[0][0] or b"").decode()

    async def close(self) -> None:
        self.raw.command(b"\x01")  # COM_QUIT
        self.raw.close()


KILL_SPELLINGS = (
    "KILL {id}",
    "KILL/**/{id}",
    "/*x*/KILL CONNECTION {id}",
    "kill\nHARD {id}",
    "KILL SOFT QUERY {id}",
    "KILL QUERY ID {id}",
    "KILL USER 'app'",
    "/*!KILL {id}*/",
    "SELECT 1; KILL {id}",
    "EXECUTE IMMEDIATE 'KILL {id}'",
    "SET @k = 'KILL {id}'; PREPARE s FROM @k; EXECUTE s",
)


class MyAttacker:
    """A raw MySQL client of the same user that goes after the others' connections."""

    TEMP_FORMS = (
        "CREATE TEMPORARY TABLE shadow SELECT 'attacker' AS tag",
        "/*!CREATE*/ /*M!TEMPORARY*/ TABLE shadow SELECT 'attacker' AS tag",
        "SET STATEMENT max_statement_time = 5 FOR CREATE TEMPORARY TABLE shadow"
        " SELECT 'attacker' AS tag",
    )

    def __init__(self, proxy: Any, sessions: list[MySession]) -> None:
        self.proxy, self.sessions = proxy, sessions
        self.session: MySession | None = None

    async def connect(self) -> None:
        self.session = MySession(await login_my(self.proxy), -1)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def reconnect(self) -> None:
        await self.close()
        await self.connect()

    async def move(self, move: tuple[Any, ...]) -> None:
        session = self.session
        assert session is not None
        kind = move[0]
        if kind == "set":
            await session.query("SET @tag = 'attacker', time_zone = '+09:59'")
        elif kind == "temp":
            await session.query(self.TEMP_FORMS[move[1] % len(self.TEMP_FORMS)])
            await self.reconnect()
        elif kind == "long_data":
            # Long data for the text everyone shares, then an execute of another statement:
            # the data must not stay on the server statement once the connection goes back.
            shared = await session.prepare_text(b"SELECT ?")
            other = await session.prepare_text(b"SELECT CONCAT('attacker', ?)")
            session.raw.command(b"\x18" + shared.to_bytes(4, "little") + b"\0\0attacker-ld")
            assert await session.execute(other, "x") == "attackerx"
            await self.reconnect()
        elif kind == "kill":
            await self.kill(KILL_SPELLINGS[move[1] % len(KILL_SPELLINGS)], move[2])
        elif kind == "kill_own":
            spelling = ("KILL/**/QUERY {id}", "/*x*/KILL SOFT QUERY {id}")[move[1] % 2]
            await session.query(spelling.format(id=session.thread_id))

    async def kill(self, spelling: str, index: int) -> None:
        """KILL a server connection of the user, spelled to get past a simple reading."""
        session = self.session
        assert session is not None
        rows = await session.query(
            f"SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '{MY_USER}' ORDER BY ID"
        )
        ours = {s.thread_id for s in (*self.sessions, session)}
        ids = [int(row[0] or 0) for row in rows if int(row[0] or 0) not in ours]
        if not ids:
            return  # every server id is also a client's id: a KILL of it would be legitimate
        target = ids[index % len(ids)]
        note(f"attacker: {spelling.format(id=target)!r}")
        try:
            await session.query(spelling.format(id=target))
        except ClientError as error:
            assert error.args[0].code in (1094, 1235), error


# -- the plan --------------------------------------------------------------------------------

client_moves = st.one_of(
    st.tuples(st.just("prepare"), st.integers(0, N_STATEMENTS - 1)),
    st.tuples(st.just("set"), st.integers(0, 99)),
    st.tuples(st.just("temp")),
    st.tuples(st.just("reconnect")),
    st.tuples(st.just("shared"), st.integers(0, 99)),
    st.tuples(st.just("long_data"), st.integers(0, 99)),
)
HOSTILE = {
    "postgres": st.one_of(
        st.tuples(st.just("set")),
        st.tuples(st.just("temp"), st.integers(0, 9)),
    ),
    "postgres-names": st.tuples(
        st.just("names"),
        st.lists(
            st.tuples(
                st.sampled_from(["close", "parse", "describe", "bind"]),
                st.booleans(),
                st.integers(0, 99),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    "mysql": st.one_of(
        st.tuples(st.just("set")),
        st.tuples(st.just("temp"), st.integers(0, 9)),
        st.tuples(st.just("long_data")),
        st.tuples(st.just("kill"), st.integers(0, 99), st.integers(0, 99)),
        st.tuples(st.just("kill_own"), st.integers(0, 1)),
    ),
}


def plans(moves: str) -> st.SearchStrategy[list[tuple[int, tuple[Any, ...]]]]:
    """Steps: (client, move), client -1 being the attacker."""
    step = st.one_of(
        st.tuples(st.integers(0, N_CLIENTS - 1), client_moves),
        st.tuples(st.just(-1), HOSTILE[moves]),
    )
    return st.lists(step, min_size=4, max_size=14)


async def act(session: Any, model: Model, move: tuple[Any, ...], models: list[Model]) -> bool:
    """Carry out a client's move on its session and its model; False if it was skipped (a
    second session holding a connection would leave the third none)."""
    kind = move[0]
    others_hold = any(m.holds() for m in models if m is not model)
    if kind == "prepare":
        if move[1] in model.statements:
            return False
        await session.prepare(move[1])
        model.statements.add(move[1])
    elif kind == "set":
        await session.set_value(move[1])
        model.value = move[1]
    elif kind == "temp":
        if others_hold or model.temp:
            return False
        await session.make_temp()
        model.temp = True
    elif kind == "shared":
        expected = model.long_data.decode() or f"p{move[1]}"
        assert await session.run_shared(f"p{move[1]}") == expected
        model.long_data = b""
    elif kind == "long_data":
        if others_hold or not isinstance(session, MySession):
            return False
        chunk = f"ld{session.i}-{move[1]};".encode()
        session.send_long_data(chunk)
        model.long_data += chunk
    return True


async def check(i: int, session: Any, model: Model) -> None:
    """The client sees its own session, and only that."""
    assert await session.read_value() == session.expected_value(model.value), f"client {i}"
    shadow = f"c{i}" if model.temp else "real"
    assert await session.read_shadow() == shadow, f"client {i}: shadow"
    for k in sorted(model.statements):
        assert await session.run(k, "x") == f"c{i}-k{k}-x", f"client {i}: statement {k}"
    if not model.long_data:  # an execute of the shared statement would use it up
        assert await session.run_shared(f"own{i}") == f"own{i}", f"client {i}: shared"


async def run_plan(engine: str, proxy: Any, plan: list[Any]) -> None:
    session_class = PgSession if engine == "postgres" else MySession
    sessions = [await session_class.open(proxy, i) for i in range(N_CLIENTS)]
    models = [Model() for _ in range(N_CLIENTS)]
    attacker: Any = PgAttacker(proxy) if engine == "postgres" else MyAttacker(proxy, sessions)
    await attacker.connect()
    try:
        for i, move in plan:
            async with asyncio.timeout(STEP_TIMEOUT):
                if i < 0:
                    note(f"attacker: {move}")
                    await attacker.move(move)
                    for j, session in enumerate(sessions):
                        await check(j, session, models[j])
                    continue
                if move[0] == "reconnect":
                    await sessions[i].close()
                    sessions[i] = await session_class.open(proxy, i)
                    models[i] = Model()
                elif not await act(sessions[i], models[i], move, models):
                    continue
                note(f"client {i}: {move}")
                await check(i, sessions[i], models[i])
        async with asyncio.timeout(STEP_TIMEOUT):
            for j, session in enumerate(sessions):
                await check(j, session, models[j])
    finally:
        for session in sessions:
            with contextlib.suppress(Exception):
                await session.close()
        await attacker.close()


@pytest.fixture
def hostile_proxy(request: pytest.FixtureRequest) -> Any:
    """dbmux with a pool of two server connections, and a real table `shadow` ('real')."""
    if request.param == "postgres":
        request.getfixturevalue("pg").psql(
            "CREATE TABLE IF NOT EXISTS shadow (tag text); ALTER TABLE shadow OWNER TO app;"
            " DELETE FROM shadow; INSERT INTO shadow VALUES ('real')",
            dbname=APP_DB,
        )
        return request.getfixturevalue("start_proxy")(pool=POOL_OF_TWO)
    request.getfixturevalue("mariadb").sql(
        "CREATE TABLE IF NOT EXISTS shadow (tag VARCHAR(20)); DELETE FROM shadow;"
        " INSERT INTO shadow VALUES ('real')",
        MY_DB,
    )
    return request.getfixturevalue("start_my_proxy")(pool=POOL_OF_TWO)


@pytest.mark.parametrize(
    ("hostile_proxy", "moves"),
    [
        ("postgres", "postgres"),
        ("postgres", "postgres-names"),
        ("mysql", "mysql"),
    ],
    indirect=["hostile_proxy"],
)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
async def test_no_client_observes_another_whatever_the_attacker_does(
    hostile_proxy: Any, moves: str, data: st.DataObject
) -> None:
    """Without the fixes of issue 10.2, a hostile client of the same user could kill the
    connections lent to others, leave long data or temporary objects for the next borrower,
    and replace the shared statements others run."""
    engine = "postgres" if moves.startswith("postgres") else "mysql"
    plan = data.draw(plans(moves), label="plan")
    await run_plan(engine, hostile_proxy, plan)
