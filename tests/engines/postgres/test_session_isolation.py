"""Session isolation under random interleavings: through a pool of two server connections,
every client sees exactly its own session state (settings, temporary tables) and never
another client's, whatever the clients do and in whatever order.

The property test keeps a model of each client's session as PostgreSQL defines it (SET in
simple and extended queries, SET LOCAL, RESET, SET ... TO DEFAULT, RESET ALL, set_config with
literal and bound values, transactions that commit or roll back, rejected values,
multi-statement queries, temporary tables, DISCARD ALL, reconnecting) and compares it with
what every client reads through the proxy after every step: current_setting() of each
setting, the parameters the driver was told (ParameterStatus), which temporary tables are
visible, and how many sessions the proxy pinned. Values are client-specific, so a leak
shows up as a mismatch that names the client the value came from.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.engines.postgres.test_lifecycle import connect

N_CLIENTS = 5
POOL_OF_TWO = {"max_connections_percent": 4, "connection_borrow_timeout": 5}  # 4% of 50
STEP_TIMEOUT = 20.0  # a hang is a failure, never a test timeout

SETTINGS = (
    "statement_timeout",
    "work_mem",
    "search_path",
    "TimeZone",
    "DateStyle",
    "application_name",
    "myapp.tag",  # a custom setting: unknown to the server until someone sets it
    "standard_conforming_strings",  # off: backslashes in string literals are escapes
)
SHARED = ("standard_conforming_strings",)  # only one value to set: not client-specific
REPORTED = ("TimeZone", "DateStyle", "application_name")  # the server sends ParameterStatus
# Values a client may give at login (variant 2; variants 0 and 1 are set during the session).
STARTUP_SETTINGS = ("statement_timeout", "search_path", "TimeZone", "application_name")
INVALID = {
    "statement_timeout": "soon",
    "work_mem": "lots",
    "TimeZone": "Mars/Olympus",
    "DateStyle": "Sometime",
}
ZONES = (
    "Asia/Tokyo",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Sydney",
    "Africa/Cairo",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Pacific/Auckland",
    "Europe/Lisbon",
    "America/Denver",
    "Asia/Dubai",
    "Europe/Oslo",
    "Asia/Seoul",
    "America/Chicago",
    "Europe/Madrid",
)
DATE_STYLES = (  # all but the default "ISO, MDY": two per client
    "ISO, DMY",
    "ISO, YMD",
    "SQL, MDY",
    "SQL, DMY",
    "Postgres, MDY",
    "Postgres, DMY",
    "German, DMY",
    "Postgres, YMD",
    "SQL, YMD",
    "German, MDY",
)


def value(name: str, client: int, variant: int) -> str:
    """The value `client` gives `name` (as SQL input), different for every (client, variant)."""
    n = 3 * client + variant
    return {
        "statement_timeout": f"{n + 1}s",
        "work_mem": f"{64 * (n + 2)}kB",
        "search_path": (
            f"pg_catalog, c{client}v{variant}, public",
            f"c{client}v{variant}, pg_catalog",
            f"c{client}v{variant}",
        )[variant],
        "TimeZone": ZONES[n],
        "DateStyle": DATE_STYLES[2 * client + variant] if variant < 2 else "",  # not at login
        # Backslashes and quotes: the proxy's own queries must carry them exactly, also on
        # a connection another client left with standard_conforming_strings off.
        "application_name": f"app\\c{client}v{variant}",
        "myapp.tag": f"tag\\c{client}'v{variant}",
        "standard_conforming_strings": "off",
    }[name]


def literal(text: str) -> str:
    """A string constant that reads the same whatever standard_conforming_strings is."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def set_sql(name: str, text: str, local: bool = False, client: int = 0) -> str:
    if name == "TimeZone" and client % 2:  # the keyword spelling, for some clients
        return f"SET {'LOCAL ' if local else ''}TIME ZONE {literal(text)}"
    rhs = text if name == "search_path" else literal(text)  # a list, as written in SQL
    return f"SET {'LOCAL ' if local else ''}{name} = {rhs}"


def set_config_sql(name: str, shown: str, local: bool = False) -> str:
    # The name in plain quotes: the proxy reads it to know what to carry.
    is_local = "true" if local else "false"
    return f"SELECT set_config('{name}', {literal(shown)}, {is_local})"


@dataclass(frozen=True)
class Server:
    """What the server shows by default, and how it shows each value the clients use."""

    defaults: dict[str, str | None]
    shown: dict[tuple[str, str], str]  # (setting, value as input) -> as SHOW prints it
    owner: dict[tuple[str, str], int]  # (setting, value as shown) -> the client it belongs to


_servers: dict[tuple[str, int], Server] = {}


async def learn_server(pg) -> Server:
    """Read defaults and value spellings once, on a direct connection (no proxy)."""
    key = (pg.host, pg.port)
    if key in _servers:
        return _servers[key]
    conn = await asyncpg.connect(
        f"postgresql://{APP_USER}:{APP_PASSWORD}@{pg.host}:{pg.port}/{APP_DB}",
        statement_cache_size=0,
    )
    try:
        defaults: dict[str, str | None] = {
            name: await conn.fetchval("SELECT current_setting($1, true)", name) or None
            for name in SETTINGS
        }
        shown: dict[tuple[str, str], str] = {}
        owner: dict[tuple[str, str], int] = {}
        for name in SETTINGS:
            for client in range(N_CLIENTS):
                for variant in range(3):
                    text = value(name, client, variant)
                    if not text:
                        continue
                    await conn.execute(set_sql(name, text, client=client))
                    printed = await conn.fetchval("SELECT current_setting($1)", name)
                    await conn.execute("RESET ALL")
                    await conn.execute(set_config_sql(name, printed))
                    assert await conn.fetchval("SELECT current_setting($1)", name) == printed
                    await conn.execute("RESET ALL")
                    assert printed != defaults[name], (name, text)
                    shown[name, text] = printed
                    if name in SHARED:
                        continue
                    assert (name, printed) not in owner, (
                        f"{name} {printed!r} is not client-specific"
                    )
                    owner[name, printed] = client
        for name, bad in INVALID.items():
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute(set_sql(name, bad))
    finally:
        await conn.close()
    _servers[key] = server = Server(defaults, shown, owner)
    return server


# -- the model --------------------------------------------------------------------------------


@dataclass
class Client:
    """One client connection through the proxy, and what its session must look like."""

    index: int
    startup: dict[str, str]  # login settings, as input
    reset_to: dict[str, str | None]  # what RESET gives back: login settings, else defaults
    conn: asyncpg.Connection | None = None
    session: dict[str, str | None] = field(default_factory=dict)  # committed values
    pending: dict[str, str | None] | None = None  # session values at COMMIT (in a transaction)
    current: dict[str, str | None] = field(default_factory=dict)  # what SHOW gives now
    aborted: bool = False  # in a failed transaction: only ROLLBACK / COMMIT work
    temps: set[str] = field(default_factory=set)  # committed temporary tables
    tx_temps: dict[str, bool] = field(default_factory=dict)  # created in this transaction
    pinned: bool = False

    @property
    def in_transaction(self) -> bool:
        return self.pending is not None

    def fresh(self, pinned: bool = False) -> None:
        self.session = dict(self.reset_to)
        self.current = dict(self.reset_to)
        self.pending = None
        self.aborted = False
        self.temps = set()
        self.tx_temps = {}
        self.pinned = pinned

    def set(self, name: str, shown: str | None, local: bool = False) -> None:
        if self.in_transaction:
            self.current[name] = shown
            if not local:
                self.pending[name] = shown  # type: ignore[index]
        elif not local:  # SET LOCAL outside a transaction block has no effect
            self.session[name] = self.current[name] = shown

    def end_transaction(self, commit: bool) -> None:
        if commit and not self.aborted and self.pending is not None:
            self.session = self.pending
            self.temps |= {name for name, drop in self.tx_temps.items() if not drop}
        self.current = dict(self.session)
        self.pending = None
        self.aborted = False
        self.tx_temps = {}

    def visible_temps(self) -> set[str]:
        return self.temps | set(self.tx_temps)


# -- operations (drawn by hypothesis) ---------------------------------------------------------

setting_names = st.sampled_from(SETTINGS)
variants = st.integers(0, 1)
SET_FORMS = (
    "set",  # SET in a simple query
    "set_extended",  # SET through Parse/Bind/Execute
    "set_config",
    "set_config_param",  # set_config('name', $1, false)
    "set_local",  # SET LOCAL: gone at the end of the transaction (no effect outside one)
    "set_config_local",  # set_config(..., true): likewise
)
sets = st.tuples(st.just("set"), setting_names, variants, st.sampled_from(SET_FORMS))
operations = st.one_of(
    st.just(("read",)),  # first: failing examples shrink their other steps to reads
    sets,
    sets,  # twice as likely as the others
    st.tuples(st.just("reset"), setting_names, st.sampled_from(("reset", "default"))),
    st.just(("reset_all",)),
    st.just(("begin",)),
    st.just(("commit",)),
    st.just(("rollback",)),
    st.tuples(st.just("temp"), st.booleans()),  # True: ON COMMIT DROP
    st.tuples(st.just("reject"), st.sampled_from(sorted(INVALID)), st.booleans()),  # set_config?
    st.tuples(  # two SETs in one simple query; the second may be rejected
        st.just("pair"),
        setting_names,
        variants,
        st.one_of(
            st.tuples(st.just("ok"), setting_names, variants),
            st.tuples(st.just("bad"), st.sampled_from(sorted(INVALID)), st.just(0)),
        ),
    ),
    st.just(("discard_all",)),
    st.just(("reconnect",)),
)
steps = st.lists(st.tuples(st.integers(0, N_CLIENTS - 1), operations), min_size=20, max_size=50)


def startup_settings(client: int) -> st.SearchStrategy[dict[str, str]]:
    return st.fixed_dictionaries(
        {}, optional={name: st.just(value(name, client, 2)) for name in STARTUP_SETTINGS}
    )


no_startup_settings = st.just(tuple({} for _ in range(N_CLIENTS)))
some_startup_settings = st.tuples(*(startup_settings(n) for n in range(N_CLIENTS)))


class Run:
    """One example: the clients, the model, and the interpreter of the drawn steps."""

    def __init__(self, proxy, server: Server, startups: tuple[dict[str, str], ...]) -> None:
        self.proxy = proxy
        self.server = server
        self.log: list[str] = []
        self.temp_names: list[str] = []
        self.pins = 0  # sessions the proxy must have pinned
        self.clients = []
        for index, startup in enumerate(startups):
            reset_to = dict(server.defaults)
            reset_to.update({k: server.shown[k, v] for k, v in startup.items()})
            self.clients.append(Client(index, startup, reset_to))

    # -- capacity: pinned clients and open transactions each hold one of the two connections

    def holders(self) -> set[int]:
        return {c.index for c in self.clients if c.pinned or c.in_transaction}

    def can_borrow(self, client: Client) -> bool:
        holders = self.holders()
        return client.index in holders or len(holders) < 2

    # -- running

    async def open(self, client: Client) -> None:
        client.conn = await connect(self.proxy, server_settings=client.startup or None)
        client.fresh()

    async def execute(self, client: Client, sql: str, fails: bool = False) -> None:
        self.log.append(f"client {client.index}: {sql}" + ("  -- rejected" if fails else ""))
        assert client.conn is not None
        if fails:
            with pytest.raises(asyncpg.PostgresError):
                await client.conn.execute(sql)
        else:
            await client.conn.execute(sql)

    async def fetch(self, client: Client, sql: str, *args: str) -> None:
        self.log.append(f"client {client.index}: {sql} {list(args) or ''} (extended protocol)")
        assert client.conn is not None
        await client.conn.fetch(sql, *args)

    async def step(self, index: int, op: tuple[Any, ...]) -> None:
        client = self.clients[index]
        kind = op[0]
        if kind == "reconnect":
            self.log.append(f"client {index}: (reconnects)")
            assert client.conn is not None
            await client.conn.close()
            await self.open(client)
            return
        if client.aborted and kind not in ("commit", "rollback"):
            return
        if not self.can_borrow(client):
            return  # would wait for a connection that the holders keep
        server = self.server
        if kind == "set":
            _, name, variant, form = op
            text = value(name, index, variant)
            shown = server.shown[name, text]
            local = form.endswith("local")
            if form == "set_config_param":
                await self.fetch(client, f"SELECT set_config('{name}', $1, false)", shown)
            elif form.startswith("set_config"):
                await self.execute(client, set_config_sql(name, shown, local))
            elif form == "set_extended":
                await self.fetch(client, set_sql(name, text, client=index))
            else:
                await self.execute(client, set_sql(name, text, local, index))
            client.set(name, shown, local)
        elif kind == "reset":
            _, name, form = op
            if name in client.startup:
                return  # a known limit, covered by its own test below
            sql = f"RESET {name}" if form == "reset" else f"SET {name} TO DEFAULT"
            await self.execute(client, sql)
            client.set(name, client.reset_to[name])
        elif kind == "reset_all":
            if client.startup:
                return  # a known limit, covered by its own test below
            await self.execute(client, "RESET ALL")
            for name in SETTINGS:
                client.set(name, client.reset_to[name])
        elif kind == "begin":
            if client.in_transaction:
                return
            await self.execute(client, "BEGIN")
            client.pending = dict(client.session)
        elif kind in ("commit", "rollback"):
            await self.execute(client, kind.upper())
            client.end_transaction(commit=kind == "commit")
        elif kind == "read":
            await self.execute(client, "SELECT count(*) FROM public.items")
        elif kind == "temp":
            if not self.may_pin(client):
                return
            name = f"tmp_{len(self.temp_names)}"
            self.temp_names.append(name)
            drop = op[1]
            await self.execute(
                client, f"CREATE TEMP TABLE {name} (id int)" + (" ON COMMIT DROP" if drop else "")
            )
            self.pinned(client)
            if client.in_transaction:
                client.tx_temps[name] = drop
            elif not drop:
                client.temps.add(name)
        elif kind == "reject":
            _, name, use_set_config = op
            bad = INVALID[name]
            sql = set_config_sql(name, bad) if use_set_config else set_sql(name, bad, client=index)
            await self.execute(client, sql, fails=True)
            if client.in_transaction:
                client.aborted = True
        elif kind == "pair":
            _, name, variant, (second, name2, variant2) = op
            text = value(name, index, variant)
            first = set_sql(name, text, client=index)
            if second == "ok":
                text2 = value(name2, index, variant2)
                await self.execute(client, f"{first}; {set_sql(name2, text2, client=index)}")
                client.set(name, server.shown[name, text])
                client.set(name2, server.shown[name2, text2])
            else:
                bad = set_sql(name2, INVALID[name2], client=index)
                await self.execute(client, f"{first}; {bad}", fails=True)
                # One implicit transaction: the first SET goes too. In a block, it aborts.
                if client.in_transaction:
                    client.aborted = True
        elif kind == "discard_all":
            if client.startup or not self.may_pin(client):
                return
            self.pinned(client)  # even when it fails: the proxy pins on the text
            if client.in_transaction:  # DISCARD ALL cannot run inside a transaction block
                await self.execute(client, "DISCARD ALL", fails=True)
                client.aborted = True
                return
            await self.execute(client, "DISCARD ALL")
            client.fresh(pinned=True)
        else:
            raise AssertionError(op)

    def may_pin(self, client: Client) -> bool:
        """One pinned client at a time leaves a connection for the others."""
        return client.pinned or not any(c.pinned for c in self.clients)

    def pinned(self, client: Client) -> None:
        if not client.pinned:
            client.pinned = True
            self.pins += 1

    # -- the oracle

    async def check_all(self) -> None:
        for client in self.clients:
            if client.conn is not None and not client.aborted and self.can_borrow(client):
                await self.check(client)

    async def check(self, client: Client) -> None:
        assert client.conn is not None
        row = await client.conn.fetchrow(
            "SELECT "
            + ", ".join(f"current_setting({literal(name)}, true)" for name in SETTINGS)
            + ", array(SELECT n FROM unnest($1::text[]) AS n"
            " WHERE to_regclass('pg_temp.' || n) IS NOT NULL), pg_backend_pid()",
            self.temp_names,
        )
        # A custom setting that was RESET reads as '' (PostgreSQL keeps the placeholder).
        seen = {name: row[i] or None for i, name in enumerate(SETTINGS)}
        temps, pid = set(row[len(SETTINGS)]), row[len(SETTINGS) + 1]
        reported = client.conn.get_settings()
        seen_reported = {name: getattr(reported, name, None) or None for name in REPORTED}
        expected = client.current
        problems = [
            self.describe(client, name, expected[name], seen[name])
            for name in SETTINGS
            if seen[name] != expected[name]
        ]
        problems += [
            f"the driver was told {name} = {seen_reported[name]!r}, expected {expected[name]!r}"
            for name in REPORTED
            if seen_reported[name] != expected[name]
        ]
        pins = self.proxy.metrics.pins()
        if pins != self.pins:
            problems.append(f"the proxy pinned {pins:g} sessions, expected {self.pins}")
        if temps != client.visible_temps():
            others = {
                name: c.index for c in self.clients if c is not client for name in c.visible_temps()
            }
            problems.append(
                f"temporary tables seen {sorted(temps)}, expected {sorted(client.visible_temps())}"
                f" (other clients' tables: {others})"
            )
        if problems:
            raise AssertionError(
                f"client {client.index} (backend {pid}) sees the wrong session state:\n  "
                + "\n  ".join(problems)
                + "\nsteps so far:\n  "
                + "\n  ".join(self.log)
            )

    def describe(self, client: Client, name: str, expected: str | None, seen: str | None) -> str:
        owner = self.server.owner.get((name, seen)) if seen is not None else None
        if seen == self.server.defaults[name]:
            whose = "the server default"
        elif owner is None:
            whose = "nobody's value"
        elif owner == client.index:
            whose = "its own value, but not the current one"
        else:
            whose = f"CLIENT {owner}'s value"
        return f"{name} = {seen!r} ({whose}), expected {expected!r}"

    async def final_check(self) -> None:
        """Everyone gone: two new clients, each holding one connection, see a clean session."""
        for client in self.clients:
            if client.conn is not None:
                await client.conn.close()
                client.conn = None
        fresh = [Client(N_CLIENTS + n, {}, dict(self.server.defaults)) for n in range(2)]
        for client in fresh:
            await self.open(client)
        try:
            for client in fresh:
                await self.execute(client, "BEGIN")
                client.pending = dict(client.session)
            for client in fresh:
                await self.check(client)
        finally:
            for client in fresh:
                assert client.conn is not None
                await client.conn.close()

    async def close(self) -> None:
        for client in self.clients:
            if client.conn is not None:
                client.conn.terminate()


async def run_steps(proxy, server: Server, startups, drawn_steps) -> None:
    run = Run(proxy, server, startups)
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            for client in run.clients:
                await run.open(client)
            await run.check_all()
        for index, op in drawn_steps:
            async with asyncio.timeout(STEP_TIMEOUT):
                await run.step(index, op)
                await run.check_all()
        async with asyncio.timeout(STEP_TIMEOUT):
            await run.final_check()
    finally:
        note("\n".join(run.log))
        await run.close()


@pytest.mark.parametrize(
    "startups",
    [
        pytest.param(no_startup_settings, id="server-defaults"),
        pytest.param(some_startup_settings, id="login-settings"),
    ],
)
@settings(
    max_examples=40,
    deadline=None,
    report_multiple_bugs=False,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_every_client_sees_only_its_own_session_state(start_proxy, pg, startups, data):
    server = await learn_server(pg)
    drawn_startups = data.draw(startups, label="login settings")
    drawn_steps = data.draw(steps, label="steps")
    proxy = start_proxy(pool=POOL_OF_TWO)
    try:
        await run_steps(proxy, server, drawn_startups, drawn_steps)
    finally:
        proxy.embedded.stop()


# -- focused regression tests -----------------------------------------------------------------

POOL_OF_ONE = {"max_connections_percent": 2, "connection_borrow_timeout": 5}  # 2% of 50


async def test_settings_read_the_same_whatever_standard_conforming_strings_is_left(start_proxy):
    """The proxy re-applies a client's settings as string literals on whichever connection it
    borrows; the previous borrower may have left standard_conforming_strings off there, and
    that must neither change a value with a backslash nor let a value run as SQL."""
    proxy = start_proxy(pool=POOL_OF_ONE)
    careful = await connect(proxy, server_settings={"application_name": r"svc\one"})
    lax, sly, bystander = await connect(proxy), await connect(proxy), await connect(proxy)
    payload = r"\', false), set_config($$work_mem$$, $$77MB$$, false) --"
    try:
        default_work_mem = await bystander.fetchval("SHOW work_mem")
        await careful.execute(r"SELECT set_config('myapp.path', 'C:\data', false)")
        await sly.fetchval("SELECT set_config('myapp.note', $1, false)", payload)
        await lax.execute("SET standard_conforming_strings = off")  # the connection keeps it
        row = await careful.fetchrow(
            "SELECT current_setting('myapp.path'), current_setting('application_name'),"
            " current_setting('standard_conforming_strings')"
        )
        assert tuple(row) == (r"C:\data", r"svc\one", "on")
        await lax.fetchval("SELECT 1")
        assert await sly.fetchval("SELECT current_setting('myapp.note')") == payload
        assert await bystander.fetchval("SHOW work_mem") == default_work_mem
    finally:
        for conn in (careful, lax, sly, bystander):
            await conn.close()


async def test_a_setting_changed_inside_a_do_block_does_not_outlive_its_client(start_proxy, pg):
    """A function body's SET is invisible to the lexer: the session must not go back to the
    pool with it (another client would run with it, on that connection, from then on)."""
    default = (await learn_server(pg)).defaults["work_mem"]
    proxy = start_proxy(pool=POOL_OF_TWO)
    leaver = await connect(proxy)
    await leaver.execute("DO $$ BEGIN PERFORM set_config('work_mem', '77MB', false); END $$")
    await leaver.close()
    first, second = await connect(proxy), await connect(proxy)
    try:
        for conn in (first, second):  # each holds one of the two server connections
            await conn.execute("BEGIN")
            assert await conn.fetchval("SHOW work_mem") == default
    finally:
        await first.close()
        await second.close()


async def test_reset_goes_back_to_the_value_given_at_login(start_proxy):
    """As on a direct connection: RESET, SET ... TO DEFAULT and RESET ALL restore the session's
    login settings, not the server's defaults."""
    proxy = start_proxy(pool=POOL_OF_ONE)
    login = {"statement_timeout": "7s", "search_path": "pg_catalog, public"}
    conn, other = await connect(proxy, server_settings=login), await connect(proxy)
    try:
        await conn.execute("SET statement_timeout = '1s'; SET search_path = pg_catalog")
        await conn.execute("RESET statement_timeout")
        await other.fetchval("SELECT 1")
        assert await conn.fetchval("SHOW statement_timeout") == "7s"
        await conn.execute("SET search_path TO DEFAULT")
        assert await conn.fetchval("SHOW search_path") == "pg_catalog, public"
        await conn.execute("SET statement_timeout = '1s'; RESET ALL")
        await other.fetchval("SELECT 1")
        assert await conn.fetchval("SHOW statement_timeout") == "7s"
        assert await conn.fetchval("SHOW search_path") == "pg_catalog, public"
    finally:
        await conn.close()
        await other.close()


TEMP_OBJECT_FORMS = [
    "CREATE TABLE pg_temp.items AS SELECT 'secret' AS note",
    "SELECT 'secret' AS note INTO pg_temp.items",
    'CREATE TABLE "pg_temp".items (note text)',
    'CREATE TABLE U&"pg\\005ftemp".items (note text)',
    "CREATE VIEW pg_temp.items AS SELECT 'secret' AS note",
    "EXPLAIN ANALYZE CREATE TEMP TABLE items AS SELECT 'secret' AS note",
    "SET search_path = pg_temp, public; CREATE TABLE items (note text)",
    "BEGIN; SET LOCAL search_path = 'pg_temp'; CREATE TABLE items (note text); COMMIT",
    "BEGIN; SELECT set_config('search_path', 'pg_temp', true); CREATE TABLE items (note text);"
    " COMMIT",
]


async def until_waiting_or_done(proxy, task: asyncio.Task) -> None:
    """Until `task` has finished or waits for a server connection."""
    while not task.done() and not any(p.waiters for p in proxy.pools.pools.values()):
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("form", TEMP_OBJECT_FORMS)
async def test_a_temporary_object_made_in_any_form_is_never_seen_by_another_client(
    start_proxy, form: str
) -> None:
    """A client makes a temporary `items` (shadowing the real table) in a form the old
    classifier did not read as temporary. Without the pin, the server connection went back
    to the pool with it, and the next client's `items` was the first client's object. Now
    the creator keeps its connection until it leaves, and the connection is reset then."""
    proxy = start_proxy(pool=POOL_OF_ONE)
    async with asyncio.timeout(STEP_TIMEOUT):
        creator, other = await connect(proxy), await connect(proxy)
        try:
            await creator.execute(form)
            assert await creator.fetchval("SELECT to_regclass('pg_temp.items')") is not None
            seen = asyncio.create_task(other.fetchval("SELECT to_regclass('pg_temp.items')"))
            await until_waiting_or_done(proxy, seen)
            await creator.close()
            assert await seen is None
            assert await other.fetchval("SELECT count(*) FROM items WHERE note = 'secret'") == 0
        finally:
            await creator.close()
            await other.close()
