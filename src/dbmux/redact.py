"""Statement text as debug logging may show it: the literals of a statement that sets a
password (PASSWORD '...', IDENTIFIED BY '...', SET PASSWORD = PASSWORD('...')) replaced.

A statement that names PASSWORD or IDENTIFIED anywhere outside its literals and comments
has every literal replaced, not only the one after the keyword: telling clauses apart would
need a parser per dialect, and a literal too many hidden costs nothing. Quotes are read as
both engines write them ('it''s', 'it\\'s', "double", E'...', $tag$...$tag$); a literal
that never ends is hidden to the end of the text.
"""

from __future__ import annotations

import re

REDACTED = "'***'"
MAX_LOGGED = 2000  # characters of a statement a log line shows

_KEYWORD = re.compile(rb"password|identified", re.IGNORECASE)
# "-- " starts a comment in both dialects (MySQL needs the blank; "#" is an operator in
# PostgreSQL): what is not surely a comment is read as code, so a literal is never missed.
_COMMENT = re.compile(rb"--(\s|$)")
_DOLLAR = re.compile(rb"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def _literals(text: bytes) -> list[tuple[int, int]]:
    """(start, end) of each literal; comments are skipped."""
    spans = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x2D and _COMMENT.match(text, i):
            end = text.find(b"\n", i)
            i = n if end < 0 else end + 1
        elif c == 0x2F and text.startswith(b"/*", i):
            end = text.find(b"*/", i + 2)
            i = n if end < 0 else end + 2
        elif c in (0x27, 0x22):  # ' or "
            end = _quote_end(text, i, c)
            spans.append((i, end))
            i = end
        elif c == 0x24 and (m := _DOLLAR.match(text, i)) and not _in_word(text, i):
            close = text.find(m.group(0), m.end())
            end = n if close < 0 else close + len(m.group(0))
            spans.append((i, end))
            i = end
        else:
            i += 1
    return spans


def _in_word(text: bytes, i: int) -> bool:
    """A $ inside an identifier (PostgreSQL allows them) or after a digit ($1) opens nothing."""
    return i > 0 and (chr(text[i - 1]).isalnum() or text[i - 1] in b"_$")


def _quote_end(text: bytes, start: int, quote: int) -> int:
    """Where the literal opened at `start` ends: a doubled quote or a backslash escapes."""
    i, n = start + 1, len(text)
    while i < n:
        c = text[i]
        if c == 0x5C:  # backslash: MySQL and E'' escape; elsewhere it only hides more
            i += 2
        elif c == quote:
            if i + 1 < n and text[i + 1] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n


def redact(statement: bytes) -> str:
    """`statement` for a log line: password literals hidden, at most MAX_LOGGED characters."""
    spans = _literals(statement)
    if spans:
        outside = bytearray(statement)
        for start, end in spans:
            outside[start:end] = b" " * (end - start)
        if _KEYWORD.search(outside):
            parts, last = [], 0
            for start, end in spans:
                parts += [statement[last:start], REDACTED.encode()]
                last = end
            parts.append(statement[last:])
            statement = b"".join(parts)
    text = statement.decode("utf-8", "replace")
    return text if len(text) <= MAX_LOGGED else text[:MAX_LOGGED] + "..."
