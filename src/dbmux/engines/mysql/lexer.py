"""The MySQL/MariaDB SQL lexer the pin rules and KILL detection read query texts with: the
text split into statements of tokens, without blanks and comments, with the content of
executable comments (`/*! ... */`) kept as code, and strings read with or without backslash
escapes (the sql_modes NO_BACKSLASH_ESCAPES and ANSI_QUOTES end some strings elsewhere)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass


class Unterminated(Exception):
    """A quote or comment does not end: the lexer cannot follow the text."""


@dataclass(frozen=True, slots=True)
class Token:
    # word, quoted (a backtick identifier), string, uservar, sysvar (session), globalvar
    # (@@GLOBAL., @@PERSIST.), other (punctuation and operators, := included)
    kind: str
    text: str  # words upper-cased, identifiers unquoted, variables lower-cased, strings raw


_NAME = r"[A-Za-z0-9_$\x80-\U0010ffff]+"
_BACKTICK = r"`(?:[^`]|``)*`"
# SET [scope] name = ..., @@scope.name: True for the session, False for the server.
SCOPES = {"SESSION": True, "LOCAL": True, "GLOBAL": False, "PERSIST": False, "PERSIST_ONLY": False}


class Reading:
    """How strings are lexed: with or without backslash escapes in '...' and "..."."""

    __slots__ = ("double_escapes", "pattern", "single_escapes")

    def __init__(self, *, single_escapes: bool, double_escapes: bool) -> None:
        self.single_escapes = single_escapes
        self.double_escapes = double_escapes
        single = r"'(?:[^'\\]|\\.|'')*'" if single_escapes else r"'(?:[^']|'')*'"
        double = r'"(?:[^"\\]|\\.|"")*"' if double_escapes else r'"(?:[^"]|"")*"'
        quoted = f"{_BACKTICK}|{single}|{double}"
        pattern = rf"""
              (?P<space>[ \t\n\r\f\v]+)
            | (?P<comment>\#[^\n]*|--(?=[\x00-\x20\x7f]|\Z)[^\n]*)
            | (?P<executable>/\*[Mm]?!\d*)
            | (?P<block>/\*)
            | (?P<close>\*/)
            | (?P<string>{single}|{double}|[xXbB]'[^']*')
            | (?P<quoted>{_BACKTICK})
            | (?P<sysvar>@@\s*(?:(?P<scope>(?i:global|session|local|persist_only|persist))\s*\.\s*)?
                (?P<name>{_NAME}|{quoted})(?:\s*\.\s*(?P<component>{_NAME}|{_BACKTICK}))?)
            | (?P<uservar>@(?:[A-Za-z0-9_$.\x80-\U0010ffff]+|{quoted}))
            | (?P<word>{_NAME})
            | (?P<assign>:=)
            | (?P<semicolon>;)
            | (?P<other>.)
        """
        self.pattern = re.compile(pattern, re.VERBOSE | re.DOTALL | re.ASCII)

    def unquote(self, text: str) -> str:
        """The name a quoted identifier or variable name spells."""
        quote = text[0]
        body = text[1:-1].replace(quote * 2, quote)
        escapes = self.single_escapes if quote == "'" else quote == '"' and self.double_escapes
        return _ESCAPE.sub(_unescape, body) if escapes else body

    def token(self, kind: str, match: re.Match[str]) -> Token:
        text = match.group()
        if kind == "word":
            return Token(kind, keyword(text))
        if kind == "quoted":
            return Token(kind, self.unquote(text))
        if kind == "uservar":
            name = text[1:]
            return Token(kind, (self.unquote(name) if name[0] in "'\"`" else name).lower())
        if kind == "sysvar":
            name = match["name"]  # quoted without escapes, as might_matter reads it
            name = name[1:-1].replace(name[0] * 2, name[0]) if name[0] in "'\"`" else name
            if match["component"]:
                component = match["component"]
                name += "." + (self.unquote(component) if component[0] == "`" else component)
            session = SCOPES.get((match["scope"] or "SESSION").upper(), True)
            return Token(kind if session else "globalvar", name.lower())
        if kind == "other" and text in "'\"`":
            raise Unterminated(f"unterminated {text}")
        return Token("other" if kind == "assign" else kind, text)


def keyword(word: str) -> str:
    """A word as keywords and built-in names are compared: upper-cased, ASCII only (str.upper
    turns "\\u017fet", with a long s, into SET)."""
    return word.upper() if word.isascii() else word


_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_ESCAPED = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}


def _unescape(match: re.Match[str]) -> str:
    char = match.group(1)
    return _ESCAPED.get(char, char)


DEFAULT = Reading(single_escapes=True, double_escapes=True)
NO_BACKSLASH_ESCAPES = Reading(single_escapes=False, double_escapes=False)
ANSI_QUOTES = Reading(single_escapes=True, double_escapes=False)  # "..." is an identifier


def split(text: str, reading: Reading) -> Iterator[list[Token]]:
    pattern = reading.pattern
    statement: list[Token] = []
    executable = False  # inside /*! ... */, whose content is code
    pos, end = 0, len(text)
    while pos < end:
        match = pattern.match(text, pos)
        assert match is not None  # `other` matches any character
        kind = match.lastgroup or "other"
        pos = match.end()
        if kind in ("space", "comment"):
            continue
        if kind == "block":
            close = text.find("*/", pos)
            if close < 0:
                raise Unterminated("unterminated comment")
            pos = close + 2
        elif kind == "executable":
            executable = True
        elif kind == "close" and executable:
            executable = False
        elif kind == "close":
            statement.append(Token("other", "*"))
            pos -= 1
        elif kind == "semicolon":
            if statement:
                yield statement
            statement = []
        else:
            statement.append(reading.token(kind, match))
    if executable:
        raise Unterminated("unterminated executable comment")
    if statement:
        yield statement


def split_statements(text: str) -> Iterator[list[Token]]:
    """Yield each statement's tokens (no blanks or comments), as the default sql_mode reads
    them; raise Unterminated on a quote or comment that does not end."""
    return split(text, DEFAULT)


def word_at(tokens: list[Token], i: int) -> str:
    """The keyword at tokens[i], or "" (not a word, or past the end)."""
    if i < len(tokens) and tokens[i].kind == "word":
        return tokens[i].text
    return ""


def punct_at(tokens: list[Token], i: int) -> str:
    """The punctuation or operator at tokens[i], or ""."""
    if 0 <= i < len(tokens) and tokens[i].kind == "other":
        return tokens[i].text
    return ""


def at_depth_zero(tokens: list[Token]) -> Iterator[tuple[int, Token]]:
    """The tokens outside any parentheses, with their index."""
    depth = 0
    for i, token in enumerate(tokens):
        if token.kind == "other" and token.text in "()":
            depth += 1 if token.text == "(" else -1
        elif depth == 0:
            yield i, token
