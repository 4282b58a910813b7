"""Session state of a MySQL client as SQL the proxy can replay: reading variables back after
a transaction that changed them, and turning their values into literals of the right type.

System variables are read with @@SESSION.name and replayed with SET SESSION name = literal;
user variables keep their type (integer, decimal, double, binary or character string with
its character set and collation), since `SELECT @x + 1` and `@x = 'A'` depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dbmux.engines.mysql import wire

BINARY_CHARSET = 63


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
