"""KILL in a MySQL/MariaDB query text (`find_kill`), read with the pin rules' lexer.

The ids a client knows are dbmux's. Server thread ids are visible too (CONNECTION_ID(), the
process list), and a KILL that reached the server as typed could end connections lent to other
clients of the same user, so the proxy carries out the plain statement itself and refuses every
other form, including dynamic SQL whose text it cannot read (PREPARE ... FROM @v, EXECUTE
IMMEDIATE CONCAT(...)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dbmux.engines.mysql.lexer import (
    ANSI_QUOTES,
    DEFAULT,
    NO_BACKSLASH_ESCAPES,
    Reading,
    Token,
    Unterminated,
    at_depth_zero,
    punct_at,
    split,
    word_at,
)


@dataclass(frozen=True, slots=True)
class Kill:
    """A KILL in a query text: the connection id it names, when it is one plain statement the
    proxy carries out itself; else why the text is refused."""

    connection_id: int = 0
    query: bool = False  # KILL QUERY: the running statement only
    refusal: str = ""


ER_NOT_SUPPORTED_YET = (1235, "42000")  # a KILL dbmux cannot carry out for the client
# Searched in the lowercased text: a third of the cost of an IGNORECASE search (which
# cannot skip ahead to the letters the words start with), on every query.
_KILL_WORDS = re.compile(rb"kill|prepare|immediate")
_NOT_ALONE = Kill(
    refusal="dbmux runs KILL only as KILL [HARD|SOFT] [CONNECTION|QUERY] <connection id>, "
    "alone in its query, with the id dbmux gave the client: anything else could reach "
    "server connections that dbmux lends to other clients"
)
_USER = Kill(
    refusal="KILL USER is refused by dbmux: it would end server connections lent to "
    "other clients of the same user; KILL each connection id instead"
)
_QUERY_ID = Kill(
    refusal="KILL QUERY ID is refused by dbmux: query ids are the server's, "
    "shared by the clients of a pooled connection; use KILL QUERY <connection id>"
)
_DYNAMIC = Kill(
    refusal="dbmux refuses PREPARE ... FROM and EXECUTE IMMEDIATE with a text it cannot read "
    "(an expression or variable) or that holds a KILL: it could end server connections "
    "lent to other clients; use a string literal"
)


def find_kill(sql: bytes) -> Kill | None:
    """The KILL a query text runs, directly or through dynamic SQL (PREPARE ... FROM,
    EXECUTE IMMEDIATE), in any way the server may read it; None when it runs none."""
    if _KILL_WORDS.search(sql.lower()) is None:
        return None
    text = sql.decode(errors="replace")
    found = _kills(text, DEFAULT, strict=True)
    if "\\" in text:
        found += _kills(text, NO_BACKSLASH_ESCAPES, strict=False)
        found += _kills(text, ANSI_QUOTES, strict=False)
    if not found:
        return None
    return found[0] if len(set(found)) == 1 else _NOT_ALONE


def _kills(text: str, reading: Reading, *, strict: bool) -> list[Kill]:
    """Each KILL or dynamic SQL of the text as `reading` lexes it. A quote or comment that
    does not end is refused in the strict reading (the server may read further) and ends
    the text in the others."""
    statements: list[list[Token]] = []
    try:
        statements.extend(split(text, reading))
    except Unterminated:
        if strict:
            return [_NOT_ALONE]
    found: list[Kill] = []
    for tokens in statements:
        for i, token in enumerate(tokens):
            if token.kind != "word" or punct_at(tokens, i - 1) == ".":  # t.kill is a column
                continue
            if token.text == "KILL":  # reserved: only ever the statement
                alone = i == 0 and len(statements) == 1
                found.append(_plain_kill(tokens[1:]) if alone else _NOT_ALONE)
            elif token.text == "PREPARE" and word_at(tokens, i + 2) == "FROM":
                found += _dynamic(tokens[i + 3 :], reading)
            elif token.text == "EXECUTE" and word_at(tokens, i + 1) == "IMMEDIATE":
                end = next(
                    (j for j, t in at_depth_zero(tokens) if j > i and t.text == "USING"), None
                )
                found += _dynamic(tokens[i + 2 : end], reading)
    return found


def _plain_kill(args: list[Token]) -> Kill:
    """KILL [HARD | SOFT] [CONNECTION | QUERY [ID]] {id | USER name}, after the KILL."""
    words = [t.text if t.kind == "word" else "" for t in args]
    at = 1 if words[:1] in (["HARD"], ["SOFT"]) else 0
    query = words[at : at + 1] == ["QUERY"]
    if query or words[at : at + 1] == ["CONNECTION"]:
        at += 1
    if query and words[at : at + 1] == ["ID"]:
        return _QUERY_ID
    if words[at : at + 1] == ["USER"]:
        return _USER
    if len(args) == at + 1 and words[at].isascii() and words[at].isdigit():
        return Kill(int(words[at]), query)
    return _NOT_ALONE


def _dynamic(expression: list[Token], reading: Reading) -> list[Kill]:
    """The text of dynamic SQL: a string literal is read in turn (with an optional charset
    introducer), anything else cannot be read."""
    introducer = word_at(expression, 0)
    if len(expression) == 2 and (introducer[:1] == "_" or introducer == "N"):
        expression = expression[1:]
    if len(expression) != 1 or expression[0].kind != "string" or expression[0].text[0] not in "'\"":
        return [_DYNAMIC]
    inner = reading.unquote(expression[0].text)
    return [_DYNAMIC] if find_kill(inner.encode()) is not None else []
