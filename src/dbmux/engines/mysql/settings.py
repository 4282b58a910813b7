"""Session state of a MySQL client carried from one server connection to the next: what a
statement does to it, reading back the variables and schema a transaction changed, and
turning their values into SQL the proxy replays on the next server connection.

System variables are read with @@SESSION.name and replayed with SET SESSION name = literal;
user variables keep their type (integer, decimal, double, binary or character string with
its character set and collation), since `SELECT @x + 1` and `@x = 'A'` depend on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dbmux.engines.base import ServerError
from dbmux.engines.mysql import wire
from dbmux.engines.mysql.pinning import UNCLASSIFIED, Verdict
from dbmux.session import ClientSession, Leftover

if TYPE_CHECKING:
    from dbmux.engines.mysql.backend import MyServer
    from dbmux.engines.mysql.engine import MyContext
    from dbmux.engines.mysql.statements import ClientStatement

log = logging.getLogger("dbmux.mysql")

# Variables a session may have the proxy carry to each server connection it borrows; past
# that it is pinned (SESSION_STATE_SIZE) and its server connection holds them, as directly.
MAX_CARRIED_STATE = 1000
SESSION_STATE_SIZE = "session_state_size"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
BINARY_CHARSET = 63

# A session's `touched` and `long_data` while it has none (most of the time): immutable, so
# that idle sessions share one empty set each instead of holding their own.
NOTHING_TOUCHED: frozenset[str] = frozenset()
NO_LONG_DATA: frozenset[bytes] = frozenset()


def quote_string(value: str) -> str:
    """A string literal that reads back the same whatever the sql_mode (NO_BACKSLASH_ESCAPES
    included): hex for anything but plain printable ASCII."""
    if all(32 <= ord(c) < 127 and c not in "'\\" for c in value):
        return "'" + value + "'"
    return "_utf8mb4 X'" + value.encode().hex() + "'"


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def user_var(name: str) -> str:
    """`@name` as SQL, for any user variable name."""
    return "@" + quote_ident(name)


def is_user_var(key: str) -> bool:
    return key[0] == "@"


@dataclass(frozen=True, slots=True)
class Readback:
    """One SELECT that reads what a transaction may have changed."""

    keys: list[str]  # `name` for system variables, `@name` for user variables
    schema: bool

    @property
    def sql(self) -> str:
        columns: list[str] = []
        for key in self.keys:
            if is_user_var(key):
                ref = user_var(key[1:])
                columns += [ref, f"CHARSET({ref})", f"COLLATION({ref})"]
            else:
                columns.append(f"@@SESSION.{key}")
        if self.schema:
            columns.append("DATABASE()")
        return "SELECT " + ", ".join(columns)

    def values(
        self, columns: list[wire.Column], row: list[bytes | None]
    ) -> tuple[dict[str, str | None], str | None]:
        """Each key's literal (None: the variable is unset or NULL, nothing to replay) and,
        when asked, the current schema ("" for none)."""
        values: dict[str, str | None] = {}
        i = 0
        for key in self.keys:
            if is_user_var(key):
                charset, collation = row[i + 1], row[i + 2]
                values[key] = user_literal(columns[i], row[i], charset, collation)
                i += 3
            else:
                values[key] = system_literal(columns[i], row[i])
                i += 1
        schema = None
        if self.schema:
            schema = (row[i] or b"").decode(errors="replace")
        return values, schema


def _numeric(column: wire.Column, text: str) -> str | None:
    """The value as a numeric literal of the column's type, or None if it is not numeric."""
    if column.type in wire.INTEGER_TYPES or column.type in wire.DECIMAL_TYPES:
        body = text[1:] if text[:1] == "-" else text
        if body.replace(".", "", 1).isdigit():
            return text
    elif column.type in wire.FLOAT_TYPES:
        try:
            float(text)
        except ValueError:
            return None
        return text if "e" in text.lower() else text + "e0"
    return None


def system_literal(column: wire.Column, value: bytes | None) -> str:
    """How SET SESSION gives a system variable this value back."""
    if value is None:
        return "NULL"
    text = value.decode(errors="replace")
    return _numeric(column, text) or quote_string(text)


def user_literal(
    column: wire.Column, value: bytes | None, charset: bytes | None, collation: bytes | None
) -> str | None:
    """How SET gives a user variable this value, its type and collation back; None for
    NULL (an unset user variable reads as NULL too)."""
    if value is None:
        return None
    if column.charset == BINARY_CHARSET:
        numeric = _numeric(column, value.decode(errors="replace"))
        if numeric is not None:
            return numeric
    hex_value = "X'" + value.hex() + "'"
    if not charset or charset == b"binary":
        return hex_value
    literal = f"CONVERT({hex_value} USING {charset.decode()})"
    if collation:
        literal += f" COLLATE {collation.decode()}"
    return literal


def apply_order(key: str) -> tuple[int, str]:
    """Character sets before collations, since setting one resets the other."""
    rank = 0 if key.startswith("character_set") else 1 if key.startswith("collation") else 2
    return rank, key


def set_statement(changes: dict[str, str]) -> str:
    """One SET for every change (user variables to NULL when they are gone)."""
    parts = []
    for key in sorted(changes, key=apply_order):
        value = changes[key]
        if is_user_var(key):
            parts.append(f"{user_var(key[1:])} = {value}")
        else:
            parts.append(f"SESSION {key} = {value}")
    return "SET " + ", ".join(parts)


class SettingsMixin(ClientSession):
    """MyClient's part that follows session state (session_state: replay or pin)."""

    if not TYPE_CHECKING:  # the slots are MyClient's (mypy would look for them here)
        __slots__ = ()

    ctx: MyContext
    insert_id: int
    long_data: frozenset[bytes]
    memo_text: bytes | None
    schema: str
    schema_touched: bool
    statement_bytes: int
    statements: dict[int, ClientStatement]
    touched: frozenset[str]
    variant: int
    want_insert_id: bool
    wanted: dict[str, str]

    if TYPE_CHECKING:  # provided by MyClient and the classes it mixes in

        def _end_command(self) -> None: ...
        def _leave(self, seq: int | None, error: tuple[int, str], message: str) -> None: ...

    def _note(self, verdict: Verdict, text: bytes | None) -> None:
        """What a statement about to run does to the session."""
        if verdict.reason is not None:
            if self.pin_reason is None:
                self.pin(verdict.reason)
            return
        if self.pin_reason is not None:
            return  # its own server connection holds the state: nothing to follow
        aliases = self.ctx.aliases
        system_vars = {aliases.get(name, name) for name in verdict.system_vars}
        names = system_vars | {"@" + name for name in verdict.user_vars}
        if any(not set(name) <= _NAME_CHARS for name in system_vars):
            if self.pin_reason is None:
                self.pin(UNCLASSIFIED)  # a name the proxy will not put in SQL
            return
        if names:
            memoizable = (
                text is not None
                and not verdict.user_vars
                and not self.touched
                and b"@" not in text
                and b"(" not in text
                and b";" not in text.rstrip(b"; \t\r\n")
            )
            self.memo_text = text if memoizable else None
            self.touched |= names
        self.schema_touched |= verdict.schema
        self.want_insert_id = verdict.last_insert_id

    def _in_step(self, server: MyServer) -> bool:
        return (
            server.applied == self.wanted
            and server.schema == self.schema
            and (not self.want_insert_id or server.insert_id == self.insert_id)
        )

    async def _bring_in_step(self, server: MyServer) -> None:
        await server.apply_state(self.wanted, self.schema)
        if self.want_insert_id and server.insert_id != self.insert_id:
            await server.query(f"SELECT LAST_INSERT_ID({self.insert_id:d})")
            server.insert_id = self.insert_id

    async def _learn_state(self, server: MyServer) -> None:
        """Read back the variables and schema the transaction may have changed. The reply
        has been relayed already; the client's next command waits until this is done."""
        readback = Readback(sorted(self.touched), self.schema_touched)
        memo_key = (self.variant, self.memo_text) if self.memo_text else None
        try:
            values, schema = await self._read_state(server, readback)
        except Exception as error:
            log.warning("closing client %s: cannot read its session state: %s", self.user, error)
            self.give_back(Leftover.UNKNOWN, server)
            # The reply was relayed whole: the ERR stands between commands, as a goodbye.
            self._leave(
                0,
                wire.CR_SERVER_LOST,
                f"Lost the server connection while reading back this session's state ({error})",
            )
            return
        if schema is not None:
            self.schema = server.schema = schema
        if memo_key is not None:
            self.ctx.set_results.remember(*memo_key, values)
        self._settle(server, values)

    async def _read_state(
        self, server: MyServer, readback: Readback
    ) -> tuple[dict[str, str | None], str | None]:
        try:
            columns, rows = await server.query(readback.sql)
            return readback.values(columns, rows[0])
        except ServerError:
            pass
        # One of them is no session variable (the SET failed too): read them one by one.
        values: dict[str, str | None] = {}
        for key in readback.keys:
            single = Readback([key], False)
            try:
                columns, rows = await server.query(single.sql)
            except ServerError:
                continue
            values.update(single.values(columns, rows[0])[0])
        schema = None
        if readback.schema:
            _, rows = await server.query("SELECT DATABASE()")
            schema = (rows[0][0] or b"").decode(errors="replace")
        return values, schema

    def _settle(self, server: MyServer, values: dict[str, str | None]) -> None:
        """Take the values read back as the session's own; the server now holds them."""
        for key in self.touched:
            value = values.get(key)
            if value is None:
                self.wanted.pop(key, None)
            else:
                self.wanted[key] = value
        self.touched = NOTHING_TOUCHED
        self.schema_touched = False
        self.memo_text = None
        server.applied = dict(self.wanted)
        if len(self.wanted) > MAX_CARRIED_STATE:
            self.pin(SESSION_STATE_SIZE)
        else:
            self.give_back(server=server)
        self._end_command()

    def _reset_session(self) -> None:
        """COM_RESET_CONNECTION: the session starts over (its schema stays, as on a server);
        a connection it held is reset before anyone else uses it."""
        self.give_back(Leftover.SESSION)
        self.wanted = {}
        self.touched = NOTHING_TOUCHED
        self.schema_touched = False
        self.statements.clear()
        self.statement_bytes = 0
        self.insert_id = 0
        self.pin_reason = None
        self.long_data = NO_LONG_DATA
