"""What a MySQL/MariaDB query text leaves on its server connection (RDS Proxy's rules).

A COM_QUERY text may leave session state behind: variables, a current schema, temporary
tables, locks, prepared statements. The proxy carries what it can (it replays system and user
variables and the schema on whichever server connection it borrows next, and answers for the
last insert id) and pins the client to its server connection for the rest, with a reason that
labels the metrics.

Correct before fast:

- A real lexer splits the text into statements and tokens, so keywords in string literals,
  quoted identifiers and comments never count, while the content of executable comments
  (`/*! ... */`, `/*!50110 ... */`, MariaDB's `/*M! ... */`) does: the server runs it.
- Text the lexer cannot follow, and statements it cannot read, pin (UNCLASSIFIED); but text
  with nothing in it that could leave state is cleared by the fast path even when a quote or
  comment does not end, as the server rejects it anyway.
- Strings are lexed with backslash escapes, as in the default sql_mode. NO_BACKSLASH_ESCAPES
  and ANSI_QUOTES end some strings elsewhere (`'a\\'; SET ...; -- '` hides a SET from the
  default reading only), so a text with a backslash is read those ways too and the effects of
  every reading are united.
- Most queries never reach the lexer: `might_matter` clears them with a few C-level scans of
  the lower-cased text, and only text that might leave state is lexed.

Known limits:

- CALL runs a procedure whose effects the text does not show; like RDS Proxy it does not pin.
  A procedure made outside dbmux may also KILL; one made through dbmux with KILL or dynamic
  SQL in its body is refused. A column aliased `prepare` before FROM reads as dynamic SQL.
  User variables passed as whole arguments (OUT parameters) are reported as assigned.
- The body of CREATE PROCEDURE/FUNCTION/TRIGGER/EVENT/PACKAGE does not run now. A body that is
  one statement ends at the first semicolon; a compound body (BEGIN ... END, IF, LOOP...) is
  taken to run to the end of the text, so statements after it in the same text are not read.
- A statement that names a routine's body with a word BEGIN, CASE, IF, LOOP... (BEGIN is not
  reserved, a column may be called that) counts as compound syntax: the rest of the text is
  then taken for the body.
- Charsets whose multi-byte characters may contain the byte of a backslash or a quote (sjis,
  cp932, gbk, big5) are lexed as if every byte of 0x80 and above were part of a name.
- MySQL 8.0 renamed tx_isolation/tx_read_only (reported for SET SESSION TRANSACTION) to
  transaction_isolation/transaction_read_only; names are reported as MariaDB spells them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise

from dbmux.engines.mysql.lexer import (
    ANSI_QUOTES,
    DEFAULT,
    NO_BACKSLASH_ESCAPES,
    SCOPES,
    Reading,
    Token,
    Unterminated,
    at_depth_zero,
    keyword,
    punct_at,
    split,
    word_at,
)

log = logging.getLogger("dbmux.mysql")

# Pin reasons, used as the metric's `reason` label and in debug logs.
SET_VARIABLE = "set_variable"  # pin mode only: a SET the proxy does not replay
TEMPORARY_TABLE = "temporary_table"
LOCK_TABLES = "lock_tables"
GLOBAL_READ_LOCK = "global_read_lock"
USER_LOCK = "user_lock"
FOUND_ROWS = "found_rows"
PREPARED_STATEMENT = "prepared_statement"
HANDLER = "handler"
SET_TRANSACTION = "set_transaction"
XA_TRANSACTION = "xa_transaction"
SET_ROLE = "set_role"
STATEMENT_SIZE = "statement_size"  # pin mode only
UNCLASSIFIED = "unclassified"

MAX_STATEMENT_SIZE = 16384  # bytes; RDS Proxy pins longer texts


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one query text does to its session: the reason to pin (None: no need), and the
    state the proxy carries itself. Names are lower-case; user variables without the @."""

    reason: str | None = None
    system_vars: frozenset[str] = frozenset()
    user_vars: frozenset[str] = frozenset()
    schema: bool = False  # USE changes the current schema
    last_insert_id: bool = False  # the text reads LAST_INSERT_ID() or @@identity


NO_STATE = Verdict()


# ---------------------------------------------------------------------------------------------
# Fast path: scans that over-approximate what the lexer reads (they skip neither strings nor
# comments). Each is gated by a byte test (`int in bytes` is a memchr) so that a plain query
# costs a lower() and a few C-level calls. Functions with session effects all have an
# underscore in their name; @@identity, `@x :=` and `INTO @x` need an @; statement keywords
# count first or after a semicolon, past blanks and comments.

_FUNCTIONS = re.compile(rb"_(?:lock|rows|count|insert_id)")
_WITH_AT = re.compile(rb":=|into|identity")
_EXECUTABLE = re.compile(rb"/\*m?!")
# Blanks and comments exactly as the lexer skips them (`--` is a comment only before a blank
# or control character), as BEGIN's lookahead below must not skip more than the lexer.
_GAP = rb"(?:[ \t\n\r\f\v]++|/\*.*?\*/|\#[^\n]*+|--(?=[\x00-\x20\x7f]|\Z)[^\n]*+)*+"
_VERBS = (
    b"set use lock flush backup prepare execute deallocate drop handler xa call load get create"
    b" if while loop repeat case declare for"
).split()
_STATEMENT_START = (
    rb"(?:(?:" + b"|".join(_VERBS) + rb")\b"
    # BEGIN and BEGIN WORK start a transaction; anything else after BEGIN is compound syntax.
    rb"|begin\b(?!" + _GAP + rb"(?:work\b" + _GAP + rb")?(?:;|\Z))"
    # A label, `name:`, starts a compound statement.
    rb"|(?:[0-9a-z_$\x80-\xff]++|`(?:[^`]|``)*+`)" + _GAP + rb":(?!=))"
)
_FIRST = re.compile(_GAP + _STATEMENT_START, re.DOTALL)
_AFTER_SEMICOLON = re.compile(rb";" + _GAP + _STATEMENT_START, re.DOTALL)
_LEADS = (*_VERBS, b"begin", b"/*", b"#", b"--", b"`")  # what _FIRST may match at
# ...by first byte: startswith with all of them costs as much as the rest of might_matter.
_LEADS_BY_FIRST = {
    first: tuple(lead for lead in _LEADS if lead[:1] == first)
    for first in {lead[:1] for lead in _LEADS}
}
_BLANKS = b" \t\n\r\f\v"


def might_matter(sql: bytes) -> bool:
    """Cheap over-approximation: False means the text's statements leave no session state
    (`Classifier.verdict` returns NO_STATE, but for pin mode's size rule)."""
    low = sql.lower()
    if (
        (95 in low and _FUNCTIONS.search(low) is not None)  # _
        or (64 in low and _WITH_AT.search(low) is not None)  # @
        or (47 in low and _EXECUTABLE.search(low) is not None)  # /
    ):
        return True
    head = low.lstrip(_BLANKS)
    leads = _LEADS_BY_FIRST.get(head[:1], ())
    if (head.startswith(leads) or 58 in head) and _FIRST.match(head) is not None:  # : (label)
        return True
    return 59 in low and _AFTER_SEMICOLON.search(low) is not None  # ;


class _Unsure(Exception):
    """A statement the classifier cannot read with confidence."""


# ---------------------------------------------------------------------------------------------
# Statements


@dataclass(slots=True)
class _Effects:
    """What the statements of one text do, in order: the first pin reason wins."""

    replay: bool
    exclude_variable_sets: bool
    reason: str | None = None
    system_vars: set[str] = field(default_factory=set)
    user_vars: set[str] = field(default_factory=set)
    schema: bool = False
    last_insert_id: bool = False

    def pin(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def system_var(self, name: str) -> None:
        self._variable(self.system_vars, name)

    def user_var(self, name: str) -> None:
        self._variable(self.user_vars, name)

    def _variable(self, names: set[str], name: str) -> None:
        """Carried in replay mode; in pin mode a pin, unless EXCLUDE_VARIABLE_SETS lets it go."""
        if self.replay:
            names.add(name)
        elif not self.exclude_variable_sets:
            self.pin(SET_VARIABLE)

    def verdict(self) -> Verdict:
        state = self.system_vars or self.user_vars or self.schema or self.last_insert_id
        if self.reason is None and not state:
            return NO_STATE
        return Verdict(
            self.reason,
            frozenset(self.system_vars),
            frozenset(self.user_vars),
            self.schema,
            self.last_insert_id,
        )


_USER_LOCKS = frozenset({"GET_LOCK", "SERVICE_GET_READ_LOCKS", "SERVICE_GET_WRITE_LOCKS"})
_ROW_COUNTS = frozenset({"FOUND_ROWS", "ROW_COUNT"})
_LAST_INSERT_ID_VARS = frozenset({"identity", "last_insert_id"})


def _function_name(token: Token) -> str:
    """The built-in a call token may name (quoted names too; "..." under ANSI_QUOTES)."""
    if token.kind in ("word", "quoted"):
        return keyword(token.text)
    if token.kind == "string" and token.text[0] == '"':
        return keyword(token.text[1:-1])
    return ""


def _scan(tokens: list[Token], effects: _Effects) -> None:
    """The rules that hold anywhere in a statement: functions with session effects, user
    variable assignments (@x := ..., INTO @x), reads of the last insert id."""
    for i, token in enumerate(tokens):
        kind = token.kind
        if kind == "uservar":
            if punct_at(tokens, i + 1) == ":=":
                effects.user_var(token.text)
        elif kind == "sysvar":
            if token.text in _LAST_INSERT_ID_VARS:
                effects.last_insert_id = True
        elif kind == "word" and token.text == "SQL_CALC_FOUND_ROWS":
            effects.pin(FOUND_ROWS)
        elif kind == "word" and token.text == "INTO":
            j = i + 1
            while j < len(tokens) and tokens[j].kind == "uservar":
                effects.user_var(tokens[j].text)
                if punct_at(tokens, j + 1) != ",":
                    break
                j += 2
        elif punct_at(tokens, i + 1) == "(" and (i == 0 or punct_at(tokens, i - 1) != "."):
            name = _function_name(token)  # a qualified db.name( is a stored function
            if name in _USER_LOCKS:
                effects.pin(USER_LOCK)
            elif name in _ROW_COUNTS:
                effects.pin(FOUND_ROWS)
            elif name == "LAST_INSERT_ID":
                if punct_at(tokens, i + 2) == ")":
                    effects.last_insert_id = True
                else:
                    effects.pin(FOUND_ROWS)  # LAST_INSERT_ID(expr) sets the value


_CHARSET_VARS = (
    "character_set_client",
    "character_set_connection",
    "character_set_results",
    "collation_connection",
)


def _set(tokens: list[Token], effects: _Effects) -> bool:
    head, second = word_at(tokens, 1), word_at(tokens, 2)
    if head == "STATEMENT":  # MariaDB: the variables hold for the statement after FOR only
        for i, token in at_depth_zero(tokens):
            if token.kind == "word" and token.text == "FOR" and i + 1 < len(tokens):
                _scan(tokens[2:i], effects)
                return _statement(tokens[i + 1 :], effects)
        raise _Unsure("SET STATEMENT without FOR")
    if head == "PASSWORD" or (head == "DEFAULT" and second == "ROLE"):
        return False
    if head == "ROLE":
        effects.pin(SET_ROLE)
    elif head == "RESOURCE" and second == "GROUP":  # ... FOR thread ids: other sessions
        if "FOR" not in (t.text for t in tokens if t.kind == "word"):
            raise _Unsure("SET RESOURCE GROUP of this session")
    elif head == "TRANSACTION":
        effects.pin(SET_TRANSACTION)  # the next transaction only
    elif head in SCOPES and second == "TRANSACTION":
        if SCOPES[head]:
            _transaction_characteristics(tokens[3:], effects)
    else:
        _assignments(tokens[1:], effects)
    return False


def _transaction_characteristics(tokens: list[Token], effects: _Effects) -> None:
    words = [t.text for t in tokens if t.kind == "word"]
    isolation = "ISOLATION" in words
    access = any(a == "READ" and b in ("ONLY", "WRITE") for a, b in pairwise(words))
    if not (isolation or access):
        raise _Unsure("SET SESSION TRANSACTION without a characteristic")
    if isolation:
        effects.system_var("tx_isolation")
    if access:
        effects.system_var("tx_read_only")


# What one assignment of a SET sets: system variables, user variables, and its value.
_Assignment = tuple[tuple[str, ...], tuple[str, ...], list[Token]]


def _assignments(tokens: list[Token], effects: _Effects) -> None:
    """SET's comma-separated assignments. A GLOBAL or SESSION keyword holds for the following
    assignments without one; an @@scope. prefix holds for its own variable only. Nothing
    counts unless the whole statement reads."""
    items: list[list[Token]] = []
    start = 0
    for i, token in at_depth_zero(tokens):
        if token.kind == "other" and token.text == ",":
            items.append(tokens[start:i])
            start = i + 1
    items.append(tokens[start:])
    session = True
    assignments: list[_Assignment] = []
    for item in items:
        scoped = word_at(item, 0) in SCOPES and len(item) > 1
        if scoped:
            session = SCOPES[item[0].text]
        assignments.append(_assignment(item[1:] if scoped else item, session))
    for system_vars, user_vars, value in assignments:
        for name in system_vars:
            effects.system_var(name)
        for name in user_vars:
            effects.user_var(name)
        _scan(value, effects)


def _assignment(item: list[Token], session: bool) -> _Assignment:
    head = word_at(item, 0)
    if head in ("NAMES", "CHARSET") or (head == "CHARACTER" and word_at(item, 1) == "SET"):
        value = item[2:] if head == "CHARACTER" else item[1:]
        if not value or punct_at(value, 0) == "=":
            raise _Unsure("SET NAMES or CHARACTER SET without a character set")
        return _CHARSET_VARS, (), []
    if not item:
        raise _Unsure("empty assignment")
    target = item[0]
    name, at = target.text.lower(), 1
    if target.kind in ("word", "quoted") or (target.kind == "string" and target.text[0] == '"'):
        if target.kind == "string":  # an identifier under ANSI_QUOTES
            name = target.text[1:-1].replace('""', '"').lower()
        if punct_at(item, 1) == "." and len(item) > 2 and item[2].kind in ("word", "quoted"):
            name, at = f"{name}.{item[2].text.lower()}", 3  # a structured variable
        kind = "sysvar" if session else "globalvar"
    elif target.kind in ("uservar", "sysvar", "globalvar"):
        kind = target.kind
    else:
        raise _Unsure("SET of something that is not a variable")
    if punct_at(item, at) not in ("=", ":=") or at + 1 >= len(item):
        raise _Unsure("SET without a value")
    value = item[at + 1 :]
    if kind == "uservar":
        return (), (name,), value
    return ((name,) if kind == "sysvar" else ()), (), value


_ROUTINES = frozenset({"PROCEDURE", "FUNCTION", "TRIGGER", "EVENT", "PACKAGE"})


def _defined_kind(tokens: list[Token]) -> str:
    """What CREATE or ALTER defines (TABLE, VIEW, PROCEDURE, TEMPORARY...), past OR REPLACE,
    ALGORITHM =, DEFINER =, SQL SECURITY and AGGREGATE."""
    i = 1
    while True:
        word = word_at(tokens, i)
        if word == "OR" and word_at(tokens, i + 1) == "REPLACE":
            i += 2
        elif word == "ALGORITHM":
            i += 3
        elif word == "DEFINER":
            i = _after_user(tokens, i + 2)
        elif word == "SQL" and word_at(tokens, i + 1) == "SECURITY":
            i += 3
        elif word == "AGGREGATE":
            i += 1
        else:
            return word


def _after_user(tokens: list[Token], i: int) -> int:
    """The index after a user name: CURRENT_USER[()], name, name@host ('u'@'h' lexes as a
    name and a user variable)."""
    if word_at(tokens, i) in ("CURRENT_USER", "CURRENT_ROLE"):
        return i + 3 if punct_at(tokens, i + 1) == "(" and punct_at(tokens, i + 2) == ")" else i + 1
    i += 1
    if i < len(tokens) and tokens[i].kind == "uservar":
        return i + 1
    return i + 2 if punct_at(tokens, i) == "@" else i


def _compound_body(tokens: list[Token]) -> bool:
    """Whether a routine definition has compound syntax, whose body goes on past semicolons."""
    for i, token in enumerate(tokens):
        if token.kind != "word":
            continue
        word, after = token.text, punct_at(tokens, i + 1) or word_at(tokens, i + 1)
        if word in ("BEGIN", "DECLARE", "LOOP", "WHILE", "CASE"):
            return True
        if (word == "REPEAT" and after != "(") or (
            word == "IF" and after not in ("(", "NOT", "EXISTS")
        ):
            return True
        if word == "FOR" and word_at(tokens, i + 2) == "IN":
            return True
    return False


_COMPOUND = frozenset({"IF", "WHILE", "LOOP", "REPEAT", "CASE", "DECLARE", "FOR"})
_VERB_REASONS = {
    "PREPARE": PREPARED_STATEMENT,
    "EXECUTE": PREPARED_STATEMENT,
    "DEALLOCATE": PREPARED_STATEMENT,
    "HANDLER": HANDLER,
    "XA": XA_TRANSACTION,
}


def _lock(words: list[str], effects: _Effects) -> None:
    if words[1:2] in (["TABLE"], ["TABLES"]):
        effects.pin(LOCK_TABLES)
    elif words[1:2] == ["INSTANCE"]:
        effects.pin(GLOBAL_READ_LOCK)  # LOCK INSTANCE FOR BACKUP
    else:
        raise _Unsure("LOCK of something else")


def _flush(words: list[str], effects: _Effects) -> None:
    spelled = f" {' '.join(words)} "
    if (" TABLE " in spelled or " TABLES " in spelled) and (
        " WITH READ LOCK " in spelled or " FOR EXPORT " in spelled
    ):
        effects.pin(GLOBAL_READ_LOCK)


def _backup(words: list[str], effects: _Effects) -> None:
    """MariaDB: BACKUP LOCK t holds a table lock, BACKUP STAGE an instance-wide one."""
    if words[1:2] == ["LOCK"]:
        effects.pin(LOCK_TABLES)
    elif words[1:2] == ["STAGE"] and words[2:3] != ["END"]:
        effects.pin(GLOBAL_READ_LOCK)


def _drop(words: list[str], effects: _Effects) -> None:
    if words[1:2] == ["PREPARE"]:
        effects.pin(PREPARED_STATEMENT)


_VERB_RULES: dict[str, Callable[[list[str], _Effects], None]] = {
    "LOCK": _lock,
    "FLUSH": _flush,
    "BACKUP": _backup,
    "DROP": _drop,
}


def _assigned_by_verb(verb: str, tokens: list[Token]) -> Iterator[str]:
    """User variables that CALL (OUT arguments), LOAD DATA (its column list) and GET
    DIAGNOSTICS assign."""
    for i, token in enumerate(tokens):
        if token.kind != "uservar":
            continue
        before, after = punct_at(tokens, i - 1), punct_at(tokens, i + 1)
        if (
            verb == "LOAD"
            or (verb == "CALL" and before in ("(", ",") and after in (",", ")"))
            or (verb == "GET" and after == "=")
        ):
            yield token.text


def _statement(tokens: list[Token], effects: _Effects) -> bool:
    """Add one statement's effects; True when the rest of the text is not top-level code."""
    verb = word_at(tokens, 0)
    if tokens[0].kind in ("word", "quoted") and punct_at(tokens, 1) == ":":
        effects.pin(UNCLASSIFIED)  # a labelled compound statement
        return True
    begin_work = len(tokens) == 1 or (len(tokens) == 2 and word_at(tokens, 1) == "WORK")
    if verb in _COMPOUND or (verb == "BEGIN" and not begin_work):
        effects.pin(UNCLASSIFIED)  # compound syntax (BEGIN NOT ATOMIC): code the lexer cannot run
        return True
    if verb == "SET":
        return _set(tokens, effects)
    if verb in ("CREATE", "ALTER"):
        kind = _defined_kind(tokens)
        if kind in _ROUTINES:  # its body does not run now
            return kind == "PACKAGE" or _compound_body(tokens)
        if kind == "VIEW":  # nor does a view's query
            return False
        if kind == "TEMPORARY" and verb == "CREATE":
            effects.pin(TEMPORARY_TABLE)
    elif verb in _VERB_REASONS:
        effects.pin(_VERB_REASONS[verb])
    elif verb == "USE":
        effects.schema = True
    elif verb in _VERB_RULES:
        _VERB_RULES[verb]([t.text for t in tokens if t.kind == "word"], effects)
    elif verb in ("CALL", "LOAD", "GET"):
        for name in _assigned_by_verb(verb, tokens):
            effects.user_var(name)
    _scan(tokens, effects)
    return False


def _read(text: str, reading: Reading, effects: _Effects, *, strict: bool) -> None:
    """Add the effects of every statement as `reading` lexes them. A quote or comment that
    does not end is UNCLASSIFIED in the strict (default) reading; in another reading it ends
    the text, as the server in that mode rejects it."""
    try:
        for statement in split(text, reading):
            try:
                if _statement(statement, effects):
                    return
            except _Unsure:
                effects.pin(UNCLASSIFIED)
    except Unterminated:
        if strict:
            effects.pin(UNCLASSIFIED)


@dataclass(frozen=True, slots=True, kw_only=True)
class Classifier:
    """Decides, per query text, what state it leaves and whether it pins.

    With `replay_settings` (the default), SET and other variable assignments are state the
    proxy carries. Without it (pin mode), they pin with SET_VARIABLE, unless
    `exclude_variable_sets` (RDS Proxy's EXCLUDE_VARIABLE_SETS) lets them through unreported,
    and texts longer than MAX_STATEMENT_SIZE pin with STATEMENT_SIZE."""

    exclude_variable_sets: bool = False
    replay_settings: bool = True

    def verdict(self, sql: bytes) -> Verdict:
        """The union of the effects of every statement of the text; the first pin reason wins."""
        if not self.replay_settings and len(sql) > MAX_STATEMENT_SIZE:
            return Verdict(reason=STATEMENT_SIZE)
        if not might_matter(sql):
            return NO_STATE
        try:
            text = sql.decode(errors="replace")
            effects = _Effects(self.replay_settings, self.exclude_variable_sets)
            _read(text, DEFAULT, effects, strict=True)
            if "\\" in text:
                _read(text, NO_BACKSLASH_ESCAPES, effects, strict=False)
                _read(text, ANSI_QUOTES, effects, strict=False)
            return effects.verdict()
        except Exception:  # a bug must cost this client a pin, not its query
            log.exception("cannot classify a %d-byte query (pinned)", len(sql))
            return Verdict(reason=UNCLASSIFIED)
