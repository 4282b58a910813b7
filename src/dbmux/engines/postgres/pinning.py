"""Which PostgreSQL statements leave state in the session (RDS Proxy's pinning conditions).

A real lexer splits the text into statements and words, so keywords inside comments, string
literals, quoted identifiers and dollar-quoted bodies never count. Text the lexer cannot
follow pins: correct before fast.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

# Pin reasons, used as the metric's `reason` label and in debug logs.
SET_VARIABLE = "set_variable"
PREPARED_STATEMENT = "prepared_statement"
DISCARD = "discard"
TEMPORARY_OBJECT = "temporary_object"
CURSOR_WITH_HOLD = "cursor_with_hold"
LISTEN = "listen"
LOAD = "load"
ADVISORY_LOCK = "advisory_lock"
SEQUENCE_STATE = "sequence_state"
SESSION_AUTHORIZATION = "session_authorization"
UNCLASSIFIED = "unclassified"
DO_BLOCK = "do_block"  # its body may change anything; the lexer does not read code

# Fast path: most queries are cleared by a few C-level scans of the lower-cased text, and
# only text that might create session state goes through the lexer. Function names,
# modifiers and the temporary schema may appear anywhere (a name spelled with Unicode escapes,
# U&"...", may be the temporary schema); statement keywords only first or after a semicolon.
_ANYWHERE = re.compile(rb"\btemp|pg_temp|u&[\"']|\bhold\b|advisory_lock|currval|lastval|set_config")
# Each alternative above holds one of these: a text with none of them (most queries) skips the
# regex, whose alternation costs more than the rest of a transaction's classification. Each
# comes behind a byte it cannot occur without (0: none checked): `byte in text`, an integer, is
# a memchr, several times cheaper than a substring search, and most texts lack the rare ones.
_ANYWHERE_LITERALS = (
    (ord("&"), (b"u&",)),
    (ord("v"), (b"advisory_lock", b"currval", b"lastval")),
    (0, (b"temp", b"hold", b"set_config")),
)
_STATEMENT_WORDS = rb"set|reset|prepare|execute|deallocate|discard|listen|unlisten|load|do"
_FIRST = (*_STATEMENT_WORDS.split(b"|"), b"/*", b"--")
# The first three bytes of every text that starts with one of _FIRST: those of the longer
# words, and each two-byte one alone or followed by any byte. A set lookup rules out most
# texts where startswith() with twelve prefixes costs five times as much.
_FIRST_HEADS = frozenset(
    [word[:3] for word in _FIRST if len(word) > 2]
    + [word for word in _FIRST if len(word) == 2]
    + [word + bytes([byte]) for word in _FIRST if len(word) == 2 for byte in range(256)]
)
# Whitespace only: a comment after a semicolon sends the text to the lexer instead (skipping
# comments here made the regex backtrack exponentially: 30 "-- " held the event loop for hours).
_AFTER_SEMICOLON = re.compile(rb";\s*(?:" + _STATEMENT_WORDS + rb")\b")
_BLANKS = b" \t\r\n\f\v\0;"  # \f is a blank to PostgreSQL, \v from 16 on


def might_pin(sql: bytes) -> bool:
    """Cheap over-approximation of `Classifier.reason(sql) is not None`."""
    low = sql.lower()
    for byte, literals in _ANYWHERE_LITERALS:
        if byte and byte not in low:
            continue
        for literal in literals:
            # partition(), the cheapest substring search bytes have: `in` raises and clears
            # a TypeError (it tries the literal as an integer first), find() parses its
            # arguments as a tuple.
            if low.partition(literal)[1]:
                return _ANYWHERE.search(low) is not None or _leading_or_after_semicolon(low)
    return _leading_or_after_semicolon(low)


def _leading_or_after_semicolon(low: bytes) -> bool:
    """A statement keyword (or a comment) first in `low`, or after a semicolon."""
    low = low.strip(_BLANKS)  # a trailing semicolon starts no statement
    if low[:3] in _FIRST_HEADS and low.startswith(_FIRST):
        return True
    if 59 not in low:  # ";"
        return False
    semicolon = low.find(b";")
    after = low[semicolon:]
    return b"--" in after or b"/*" in after or _AFTER_SEMICOLON.search(after) is not None


_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<line_comment>--[^\n]*)
    | (?P<block_comment>/\*)
    | (?P<dollar>\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$)
    | (?P<estring>[eE]'(?:[^'\\]|\\.|'')*')
    | (?P<unicode>[uU]&(?:"(?:[^"]|"")*"|'(?:[^']|'')*')(?:\s*(?i:UESCAPE)\s*'[^']')?)
    | (?P<string>'(?:[^']|'')*')
    | (?P<quoted>"(?:[^"]|"")*")
    | (?P<word>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)
    | (?P<param>\$\d+)
    | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)
    | (?P<semicolon>;)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_ADVISORY_SESSION_LOCKS = frozenset(
    {
        "PG_ADVISORY_LOCK",
        "PG_ADVISORY_LOCK_SHARED",
        "PG_TRY_ADVISORY_LOCK",
        "PG_TRY_ADVISORY_LOCK_SHARED",
    }
)
_SEQUENCE_SESSION_FUNCTIONS = frozenset({"CURRVAL", "LASTVAL"})


ALL_SETTINGS = "*"  # RESET ALL
Effect = tuple[str | None, frozenset[str] | None]


class Unclassifiable(Exception):
    """The lexer could not follow the text (an unterminated quote or comment)."""


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # word, string, quoted, other, ...
    text: str  # words upper-cased; other tokens as written


def _skip_block_comment(sql: str, start: int) -> int:
    """Block comments nest in PostgreSQL; return the index after the matching */."""
    depth, pos = 1, start + 2
    while depth:
        opening = sql.find("/*", pos)
        closing = sql.find("*/", pos)
        if closing < 0:
            raise Unclassifiable("unterminated block comment")
        if 0 <= opening < closing:
            depth, pos = depth + 1, opening + 2
        else:
            depth, pos = depth - 1, closing + 2
    return pos


def split_statements(sql: str) -> Iterator[list[Token]]:
    """Yield each statement's meaningful tokens (no spaces or comments)."""
    statement: list[Token] = []
    pos, end = 0, len(sql)
    while pos < end:
        match = _TOKEN.match(sql, pos)
        assert match is not None  # `other` matches any character
        kind = match.lastgroup or "other"
        text = match.group()
        pos = match.end()
        if kind in ("space", "line_comment"):
            continue
        if kind == "block_comment":
            pos = _skip_block_comment(sql, match.start())
            continue
        if kind == "dollar":
            close = sql.find(text, pos)
            if close < 0:
                raise Unclassifiable("unterminated dollar-quoted string")
            pos = close + len(text)
            statement.append(Token("string", ""))
            continue
        if kind == "other" and text in "'\"":
            raise Unclassifiable("unterminated quoted string or identifier")
        if kind == "unicode":
            kind, text = _decode_unicode_escapes(match.group())
        if kind == "semicolon":
            if statement:
                yield statement
            statement = []
            continue
        statement.append(Token(kind, text.upper() if kind == "word" else text))
    if statement:
        yield statement


_UESCAPE = re.compile(r"\s*UESCAPE\s*'(.)'\Z", re.IGNORECASE | re.DOTALL)


def _decode_unicode_escapes(literal: str) -> tuple[str, str]:
    """U&"..." or U&'...' [UESCAPE 'c'] as the plain quoted identifier or string it spells
    (kind, text), so a name like U&"pg\\005ftemp" is read as what the server reads."""
    escape_clause = _UESCAPE.search(literal)
    escape = escape_clause[1] if escape_clause else "\\"
    body = literal[: escape_clause.start()] if escape_clause else literal
    quote = body[2]
    inner = body[3:-1].replace(quote * 2, quote)
    decoded, pos = [], 0
    while (at := inner.find(escape, pos)) >= 0:
        decoded.append(inner[pos:at])
        if inner.startswith(escape, at + 1):
            decoded.append(escape)
            pos = at + 2
            continue
        digits = 6 if inner.startswith("+", at + 1) else 4
        start = at + 1 + (digits == 6)
        code = inner[start : start + digits]
        if len(code) != digits or any(c not in "0123456789abcdefABCDEF" for c in code):
            raise Unclassifiable("invalid Unicode escape")
        decoded.append(chr(min(int(code, 16), 0x10FFFF)))
        pos = start + digits
    decoded.append(inner[pos:])
    text = "".join(decoded).replace(quote, quote * 2)
    return ("quoted" if quote == '"' else "string"), quote + text + quote


def _words(tokens: list[Token]) -> list[str]:
    return [t.text for t in tokens if t.kind == "word"]


_TRUE_LITERALS = frozenset({"TRUE", "'T'", "'TRUE'", "'ON'", "'YES'", "'Y'", "'1'", "1"})


def _arguments(tokens: list[Token], at: int) -> list[list[Token]]:
    """The arguments of the call whose opening parenthesis is tokens[at]."""
    depth = 0
    arguments: list[list[Token]] = [[]]
    for token in tokens[at:]:
        text = token.text
        if text == "(":
            depth += 1
            if depth == 1:
                continue
        elif text == ")":
            depth -= 1
            if depth == 0:
                break
        elif text == "," and depth == 1:
            arguments.append([])
            continue
        arguments[-1].append(token)
    return arguments


def _set_config_is_session(arguments: list[list[Token]]) -> bool:
    """set_config(name, value, is_local) is transaction-local only when is_local is a true
    literal (optionally cast to boolean); any expression counts as session-level."""
    third = [t.text.upper() for t in arguments[2]] if len(arguments) > 2 else []
    if third[1:] in ([], [":", ":", "BOOL"], [":", ":", "BOOLEAN"]) and third:
        return third[0] not in _TRUE_LITERALS
    return True


def _literal(argument: list[Token]) -> str | None:
    """The value of an argument that is one string literal, else None."""
    return _string_value(argument[0]) if len(argument) == 1 else None


_E_ESCAPE = re.compile(
    r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL
)
_E_NAMED = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _e_unescape(match: re.Match[str]) -> str:
    code = match[1]
    if code[0] in "xuU" and len(code) > 1:
        return chr(min(int(code[1:], 16), 0x10FFFF))
    if code[0] in "01234567":
        return chr(int(code, 8))
    return _E_NAMED.get(code, code)


def _may_name_pg_temp(value: list[Token]) -> bool:
    """Whether a set_config value may hold pg_temp: a literal that names it, or an
    expression the lexer cannot evaluate. A bound parameter ($1) is not in the text: it is
    taken as not naming it (see the known limit above)."""
    if len(value) == 1 and value[0].kind == "param":
        return False
    literal = _literal(value) if value else None
    return literal is None or _names_pg_temp(literal)


def _string_value(token: Token) -> str | None:
    """The value of a '...' or E'...' literal; None for other tokens (a dollar-quoted
    string is lexed without its text)."""
    if token.kind == "string" and token.text[:1] == "'":
        return token.text[1:-1].replace("''", "'")
    if token.kind == "estring":
        return _E_ESCAPE.sub(_e_unescape, token.text[2:-1].replace("''", "'"))
    return None


def function_name(token: Token) -> str | None:
    """The name a call token refers to, upper-cased; quoted names only if all lower case
    (a quoted "PG_ADVISORY_LOCK" is another function)."""
    if token.kind == "word":
        return token.text
    if token.kind == "quoted":
        name = token.text[1:-1].replace('""', '"')
        return name.upper() if name == name.lower() else None
    return None


def _function_effects(tokens: list[Token]) -> Iterator[Effect]:
    for i, token in enumerate(tokens[:-1]):
        if tokens[i + 1].text != "(":
            continue
        name = function_name(token)
        if name in _ADVISORY_SESSION_LOCKS:
            yield ADVISORY_LOCK, None
        elif name in _SEQUENCE_SESSION_FUNCTIONS:
            yield SEQUENCE_STATE, None
        elif name == "SET_CONFIG":
            arguments = _arguments(tokens, i + 1)
            named = _literal(arguments[0])
            setting = named.lower() if named else None
            value = arguments[1] if len(arguments) > 1 else []
            if setting in (None, "search_path") and _may_name_pg_temp(value):
                yield TEMPORARY_OBJECT, None  # even transaction-local: see _sets_pg_temp
            elif _set_config_is_session(arguments):
                # set_config('name', ...): a literal name can be replayed; nothing else can.
                yield SET_VARIABLE, frozenset({setting}) if setting else None


# SET forms that name their setting with keywords, and what they set.
_SPECIAL_SETS = {
    ("TIME", "ZONE"): ("timezone",),
    ("SCHEMA",): ("search_path",),
    ("NAMES",): ("client_encoding",),
    ("XML", "OPTION"): ("xmloption",),
    ("SESSION", "CHARACTERISTICS"): (
        "default_transaction_isolation",
        "default_transaction_read_only",
        "default_transaction_deferrable",
    ),
}


def _set_settings(tokens: list[Token]) -> frozenset[str] | None:
    """The settings a session-level SET or RESET changes (ALL_SETTINGS for RESET ALL), or
    None when the statement's target cannot be read."""
    words = _words(tokens)
    if words[0] == "RESET":
        if words[1:2] == ["ALL"]:
            return frozenset({ALL_SETTINGS})
        start = 1
    else:
        for keywords, names in _SPECIAL_SETS.items():
            if tuple(words[1 : 1 + len(keywords)]) == keywords:
                return frozenset(names)
        start = 2 if words[1:2] == ["SESSION"] else 1
    name: list[str] = []
    for token in tokens[start:]:
        if token.text in ("=", "TO") and token.kind in ("other", "word") and name:
            break
        if token.kind == "word":
            name.append(token.text.lower())
        elif token.kind == "quoted":
            name.append(token.text[1:-1].replace('""', '"').lower())
        elif token.text == ".":
            name.append(".")
        else:
            return None
    return frozenset({"".join(name)}) if name else None


def _is_reset(tokens: list[Token]) -> bool:
    """RESET x, RESET ALL, SET x TO DEFAULT, SET x = DEFAULT."""
    words = _words(tokens)
    if words[0] == "RESET":
        return True
    for i, token in enumerate(tokens[:-1]):
        if token.text in ("=", "TO") and token.kind in ("other", "word"):
            rest = tokens[i + 1 :]
            return len(rest) == 1 and rest[0].kind == "word" and rest[0].text == "DEFAULT"
    return False


# Temporary objects live in the session's own schema, pg_temp (alias of pg_temp_N): a table,
# view, sequence, function, type... created there is seen by the next borrower of the
# connection, and a temporary table shadows a real one of the same name. Every way to put
# an object there pins:
# - CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY] ..., anywhere in a statement (EXPLAIN
#   ANALYZE CREATE TEMP TABLE ... AS runs it);
# - SELECT ... INTO [GLOBAL | LOCAL] TEMP[ORARY] [TABLE] name;
# - any name of the temporary schema, plain, quoted or in Unicode escapes (CREATE TABLE
#   pg_temp.t, CREATE FUNCTION pg_temp.f, ALTER ... SET SCHEMA pg_temp, SELECT ... INTO
#   "pg_temp".t, reads of pg_temp.t too);
# - a search_path that may hold pg_temp (SET [LOCAL] search_path, SET SCHEMA, set_config):
#   with pg_temp first, an unqualified CREATE TABLE t makes a temporary table, and a
#   transaction-local setting is enough for that (the table outlives the transaction).
# Known limits: functions and DO blocks may create temporary objects unseen (DO pins anyway);
# a search_path given to set_config as a bound parameter is not in the text, and is replayed.
_TEMP = ("TEMP", "TEMPORARY")
_PG_TEMP = re.compile(r"pg_temp(?:_\d+)?", re.IGNORECASE)
# Clauses that may follow SELECT ... INTO temp, where `temp` is then a table's name.
_AFTER_INTO_NAME = frozenset(
    {"FROM", "WHERE", "GROUP", "HAVING", "WINDOW", "UNION", "INTERSECT", "EXCEPT", "ORDER"}
    | {"LIMIT", "OFFSET", "FETCH", "FOR"}
)


def _names_pg_temp(text: str) -> bool:
    """Whether a setting's value may name the temporary schema (with a backslash, it may
    spell it in escapes: standard_conforming_strings may be off)."""
    return "pg_temp" in text.lower() or "\\" in text


def _is_pg_temp(token: Token) -> bool:
    if token.kind == "word":
        return _PG_TEMP.fullmatch(token.text) is not None
    if token.kind == "quoted":
        name = token.text[1:-1].replace('""', '"')
        return _PG_TEMP.fullmatch(name) is not None and name == name.lower()
    return False


def _creates_temporary(tokens: list[Token]) -> bool:
    """Whether a statement may create an object in the session's temporary schema."""
    words = _words(tokens)
    return (
        any(_is_pg_temp(token) for token in tokens)
        or any(_temp_after_create(words, i) for i, w in enumerate(words) if w == "CREATE")
        or any(_temp_after_into(tokens, i) for i, t in enumerate(tokens) if t.text == "INTO")
        or _sets_pg_temp(tokens, words)
    )


def _temp_after_create(words: list[str], at: int) -> bool:
    """CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY] at words[at]."""
    i = at + 1
    if words[i : i + 2] == ["OR", "REPLACE"]:
        i += 2
    if words[i : i + 1] in (["GLOBAL"], ["LOCAL"]):
        i += 1
    return words[i : i + 1] in (["TEMP"], ["TEMPORARY"])


def _temp_after_into(tokens: list[Token], at: int) -> bool:
    """SELECT ... INTO [GLOBAL | LOCAL] TEMP[ORARY] [TABLE] name at tokens[at], not INSERT
    INTO / MERGE INTO a table called temp, nor SELECT ... INTO temp FROM ..."""
    before = next((t.text for t in reversed(tokens[:at]) if t.kind == "word"), "")
    if tokens[at].kind != "word" or before in ("INSERT", "MERGE"):
        return False
    i = at + 1
    if i < len(tokens) and tokens[i].kind == "word" and tokens[i].text in ("GLOBAL", "LOCAL"):
        i += 1
    if not (i + 1 < len(tokens) and tokens[i].kind == "word" and tokens[i].text in _TEMP):
        return False
    name = tokens[i + 1]
    return name.kind == "quoted" or (name.kind == "word" and name.text not in _AFTER_INTO_NAME)


def _sets_pg_temp(tokens: list[Token], words: list[str]) -> bool:
    """SET [SESSION | LOCAL] search_path {= | TO} ... or SET [LOCAL] SCHEMA ... with a value
    that may name pg_temp (names of it are found by _is_pg_temp already)."""
    if words[:1] != ["SET"]:
        return False
    if words[1:2] == ["LOCAL"] and tokens[1].kind == "word":
        tokens = [tokens[0], *tokens[2:]]
    names = _set_settings(tokens)
    if names is not None and "search_path" not in names:
        return False
    for token in tokens:
        if token.kind in ("string", "estring"):
            value = _string_value(token)  # None: dollar-quoted, which may spell anything
            if value is None or _names_pg_temp(value):
                return True
    return False


def _statement_effect(tokens: list[Token]) -> Effect:
    """(pin reason, settings changed) of one statement; settings only for SET_VARIABLE."""
    words = _words(tokens)
    if not words:
        return None, None
    if _creates_temporary(tokens):
        return TEMPORARY_OBJECT, None
    first = words[0]
    second = words[1] if len(words) > 1 else ""
    if first == "SET":
        if second in ("LOCAL", "TRANSACTION", "CONSTRAINTS"):
            return None, None
        if second == "ROLE" or (
            second == "SESSION" and words[2:3] in (["AUTHORIZATION"], ["ROLE"])
        ):
            return SESSION_AUTHORIZATION, None
        return SET_VARIABLE, _set_settings(tokens)
    if first == "RESET":
        if second in ("ROLE", "SESSION"):
            return SESSION_AUTHORIZATION, None
        return SET_VARIABLE, _set_settings(tokens)
    return _statement_reason(first, second, words, tokens), None


def _statement_reason(first: str, second: str, words: list[str], tokens: list[Token]) -> str | None:
    if first == "PREPARE":
        return None if second == "TRANSACTION" else PREPARED_STATEMENT
    if first in ("EXECUTE", "DEALLOCATE"):
        return PREPARED_STATEMENT
    if first == "DISCARD":
        return DISCARD
    if first in ("LISTEN", "UNLISTEN"):
        return LISTEN
    if first == "LOAD":
        return LOAD
    if first == "DO":
        return DO_BLOCK
    if first == "DECLARE" and "HOLD" in words:
        idx = words.index("HOLD")
        if words[idx - 1] == "WITH":
            return CURSOR_WITH_HOLD
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a query text does to its session: the reason it must pin (None: it need not),
    and the settings it changes that replay can carry instead of pinning."""

    reason: str | None
    settings: frozenset[str] = frozenset()
    # The settings come only from SET/RESET of literal values: the same text always leaves
    # the same values when it succeeds (set_config and RESET ALL may not).
    memoizable: bool = False
    # Of `settings`, those put back to their session default (RESET, SET ... TO DEFAULT).
    resets: frozenset[str] = frozenset()


HARMLESS = Verdict(None)
UNREADABLE = Verdict(UNCLASSIFIED)  # a Parse message whose text has no end
# Classifier.parse_verdict and verdict remember up to this many verdicts each, of Parse
# messages up to PARSED_TEXT_LIMIT bytes and of texts up to SHORT_QUERY_LIMIT bytes.
MEMO_ENTRIES = 4096
PARSED_TEXT_LIMIT = 4096
SHORT_QUERY_LIMIT = 32


def _remember(memo: dict[bytes, Verdict], key: bytes, verdict: Verdict) -> Verdict:
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[key] = verdict
    return verdict


@dataclass(frozen=True, slots=True)
class Classifier:
    """Decides, per query text, whether it pins the session and why.

    With `replay_settings`, session SET/RESET/set_config of a setting the text names are not
    pin reasons but settings for the proxy to carry to other server connections."""

    exclude_variable_sets: bool = False
    replay_settings: bool = False
    # Verdicts of Parse messages and of short texts seen lately: two maps, since a text
    # could be spelled like a Parse message whose name is another statement.
    _parsed: dict[bytes, Verdict] = field(default_factory=dict, compare=False, repr=False)
    _short: dict[bytes, Verdict] = field(default_factory=dict, compare=False, repr=False)

    def parse_verdict(self, body: bytes) -> Verdict:
        """The verdict of the statement in a Parse message (body: name, text, parameter
        types), remembered: drivers parse the same few texts, with parameters, over and
        over."""
        if len(body) > PARSED_TEXT_LIMIT:
            return self._parsed_statement(body)
        known = self._parsed.get(body)
        if known is None:
            known = _remember(self._parsed, body, self._parsed_statement(body))
        return known

    def _parsed_statement(self, body: bytes) -> Verdict:
        name_end = body.find(b"\0")
        end = body.find(b"\0", name_end + 1)
        return self.verdict(body[name_end + 1 : end]) if end > 0 else UNREADABLE

    def verdict(self, sql: bytes) -> Verdict:
        """What `sql` (a statement text; a Query's may end with its NUL) does to the
        session. Short texts (BEGIN, COMMIT, SELECT 1) come again and again, and their
        verdicts are remembered; longer ones mostly carry literals, so that their texts
        seldom repeat."""
        short = len(sql) <= SHORT_QUERY_LIMIT
        if short and (known := self._short.get(sql)) is not None:
            return known
        verdict = self._read(sql) if might_pin(sql) else HARMLESS
        return _remember(self._short, sql, verdict) if short else verdict

    def _read(self, sql: bytes) -> Verdict:
        """The lexer's verdict, for text that might_pin lets through."""
        try:
            text = sql.rstrip(b"\0").decode()  # a Query message's text ends with its NUL
        except UnicodeDecodeError:
            return Verdict(UNCLASSIFIED)
        settings: set[str] = set()
        resets: set[str] = set()
        memoizable = True
        try:
            for statement in split_statements(text):
                functions = list(_function_effects(statement))
                if any(reason is not None for reason, _ in functions):
                    memoizable = False
                effects = [_statement_effect(statement), *functions]
                for reason, names in effects:
                    if reason is None:
                        continue
                    if reason == SET_VARIABLE:
                        if self.exclude_variable_sets:
                            continue
                        if self.replay_settings and names is not None:
                            settings |= names
                            if _is_reset(statement):
                                resets |= names
                            continue
                    return Verdict(reason)
        except Unclassifiable:
            return Verdict(UNCLASSIFIED)
        if not settings:
            return HARMLESS
        return Verdict(
            None,
            frozenset(settings),
            memoizable and ALL_SETTINGS not in settings,
            frozenset(resets),
        )

    def reason(self, sql: bytes) -> str | None:
        """The pin reason of a query text, or None when it leaves no session state."""
        return self.verdict(sql).reason
