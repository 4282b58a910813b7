"""Which query texts pin a client to its server connection, and why.

The table is the specification: one statement per row with the reason it must report (a
module constant) or None when it leaves no state in the session. Keywords inside comments,
string literals, quoted identifiers and dollar-quoted bodies never count; text the lexer cannot
follow is UNCLASSIFIED (it pins: correct before fast).
"""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbmux.engines.postgres import pinning
from dbmux.engines.postgres.pinning import (
    ADVISORY_LOCK,
    ALL_SETTINGS,
    CURSOR_WITH_HOLD,
    DISCARD,
    DO_BLOCK,
    LISTEN,
    LOAD,
    PREPARED_STATEMENT,
    SEQUENCE_STATE,
    SESSION_AUTHORIZATION,
    SET_VARIABLE,
    TEMPORARY_OBJECT,
    UNCLASSIFIED,
    Classifier,
    might_pin,
)

SPEC: list[tuple[str, str | None]] = [
    # --- session-level SET / RESET
    ("SET search_path TO app, public", SET_VARIABLE),
    ("SET search_path = app", SET_VARIABLE),
    ("set statement_timeout = 5000", SET_VARIABLE),
    ("SET SESSION statement_timeout TO '5s'", SET_VARIABLE),
    ("SET TIME ZONE 'UTC'", SET_VARIABLE),
    ("SET SESSION TIME ZONE LOCAL", SET_VARIABLE),
    ("SET TimeZone = 'Europe/Berlin'", SET_VARIABLE),
    ("SET application_name = 'worker-7'", SET_VARIABLE),
    ("SET SCHEMA 'app'", SET_VARIABLE),
    ("SET NAMES 'UTF8'", SET_VARIABLE),
    ("SET datestyle TO DEFAULT", SET_VARIABLE),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", SET_VARIABLE),
    ("RESET ALL", SET_VARIABLE),
    ("RESET search_path", SET_VARIABLE),
    ("reset statement_timeout", SET_VARIABLE),
    ("SET ROLE reporting", SESSION_AUTHORIZATION),
    ("SET ROLE NONE", SESSION_AUTHORIZATION),
    ("SET SESSION ROLE reporting", SESSION_AUTHORIZATION),
    ("RESET ROLE", SESSION_AUTHORIZATION),
    ("SET SESSION AUTHORIZATION 'alice'", SESSION_AUTHORIZATION),
    ("SET SESSION AUTHORIZATION DEFAULT", SESSION_AUTHORIZATION),
    ("RESET SESSION AUTHORIZATION", SESSION_AUTHORIZATION),
    # --- transaction-scoped settings end with the transaction: no pin
    ("SET LOCAL search_path TO app", None),
    ("SET LOCAL statement_timeout = 1000", None),
    ("set local role reporting", None),
    ("SET LOCAL SESSION AUTHORIZATION 'alice'", None),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", None),
    ("SET TRANSACTION READ ONLY", None),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", None),
    ("SET CONSTRAINTS ALL DEFERRED", None),
    ("SET CONSTRAINTS fk_orders IMMEDIATE", None),
    ("BEGIN; SET LOCAL work_mem = '64MB'; SELECT 1; COMMIT", None),
    # --- set_config(name, value, is_local)
    ("SELECT set_config('search_path', 'app', false)", SET_VARIABLE),
    ("SELECT set_config('search_path', 'app', true)", None),
    ("SELECT SET_CONFIG('a.b', 'c', FALSE)", SET_VARIABLE),
    ("select set_config('a.b', 'c', TRUE)", None),
    ("SELECT set_config('a.b', 'c', 'false')", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', 'on')", None),
    ("SELECT set_config('a.b', 'c', true::boolean)", None),
    ("SELECT set_config('a.b', lower('C'), true)", None),
    ("SELECT set_config('a.b', concat('x', ',', 'y'), false)", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', $1)", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', is_local) FROM flags", SET_VARIABLE),
    ("SELECT 1 WHERE set_config('a.b', 'c', false) IS NOT NULL", SET_VARIABLE),
    ("SELECT set_config('a', 'b', true), set_config('c', 'd', false)", SET_VARIABLE),
    # An expression is not literally true, even when its first word is.
    ("SELECT set_config('a.b', 'c', true AND false)", SET_VARIABLE),
    ("SELECT set_config('a.b', 'c', 1 = 0)", SET_VARIABLE),
    ("SELECT set_config FROM t", None),
    # --- prepared statements (but not two-phase commit)
    ("PREPARE q(int) AS SELECT $1", PREPARED_STATEMENT),
    ("prepare q as select 1", PREPARED_STATEMENT),
    ("EXECUTE q(42)", PREPARED_STATEMENT),
    ("DEALLOCATE q", PREPARED_STATEMENT),
    ("DEALLOCATE PREPARE ALL", PREPARED_STATEMENT),
    ("PREPARE TRANSACTION 'tx-1'", None),
    ("COMMIT PREPARED 'tx-1'", None),
    ("ROLLBACK PREPARED 'tx-1'", None),
    # --- DISCARD
    ("DISCARD ALL", DISCARD),
    ("DISCARD PLANS", DISCARD),
    ("DISCARD TEMP", DISCARD),
    ("DISCARD SEQUENCES", DISCARD),
    # --- temporary objects
    ("CREATE TEMP TABLE t (id int)", TEMPORARY_OBJECT),
    ("CREATE TEMPORARY TABLE t (id int)", TEMPORARY_OBJECT),
    ("CREATE LOCAL TEMP TABLE t (id int)", TEMPORARY_OBJECT),
    ("CREATE LOCAL TEMPORARY TABLE t (id int)", TEMPORARY_OBJECT),
    ("CREATE GLOBAL TEMPORARY TABLE t (id int)", TEMPORARY_OBJECT),
    ("CREATE GLOBAL TEMP TABLE t AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE TEMP TABLE IF NOT EXISTS t (id int) ON COMMIT DELETE ROWS", TEMPORARY_OBJECT),
    ("CREATE TEMP SEQUENCE s", TEMPORARY_OBJECT),
    ("CREATE TEMPORARY SEQUENCE IF NOT EXISTS s START 10", TEMPORARY_OBJECT),
    ("CREATE TEMP VIEW v AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE OR REPLACE TEMPORARY VIEW v AS SELECT 1", TEMPORARY_OBJECT),
    ("SELECT * INTO TEMP t FROM orders", TEMPORARY_OBJECT),
    ("SELECT id, total INTO TEMPORARY TABLE t FROM orders", TEMPORARY_OBJECT),
    ("SELECT 1 AS x INTO LOCAL TEMP t", TEMPORARY_OBJECT),
    ("SELECT 1 AS x INTO GLOBAL TEMPORARY t", TEMPORARY_OBJECT),
    ('SELECT 1 AS x INTO TEMP "T"', TEMPORARY_OBJECT),
    (
        "WITH w AS (INSERT INTO a VALUES (1) RETURNING 1) SELECT * INTO TEMP t FROM w",
        TEMPORARY_OBJECT,
    ),
    ("(SELECT 1 AS x INTO TEMP t)", TEMPORARY_OBJECT),
    ("CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE OR REPLACE TEMPORARY RECURSIVE VIEW v (n) AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE TEMP TABLE t AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE TEMP TABLE t (LIKE orders INCLUDING ALL)", TEMPORARY_OBJECT),
    ("CREATE TEMPORARY UNLOGGED TABLE t (id int)", TEMPORARY_OBJECT),
    ("EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", TEMPORARY_OBJECT),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT 1 INTO TEMP t", TEMPORARY_OBJECT),
    # ... objects put in the temporary schema by name, in every spelling
    ("CREATE TABLE pg_temp.t AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE TABLE pg_temp.t (id int)", TEMPORARY_OBJECT),
    ("CREATE TABLE IF NOT EXISTS pg_temp.t (id int)", TEMPORARY_OBJECT),
    ("CREATE UNLOGGED TABLE pg_temp.t (id int)", TEMPORARY_OBJECT),
    ("SELECT 1 AS x INTO pg_temp.t", TEMPORARY_OBJECT),
    ("SELECT 1 AS x INTO TABLE pg_temp.t", TEMPORARY_OBJECT),
    ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", TEMPORARY_OBJECT),
    (
        "CREATE OR REPLACE FUNCTION pg_temp.f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql",
        TEMPORARY_OBJECT,
    ),
    ("CREATE PROCEDURE pg_temp.p() LANGUAGE sql AS 'SELECT 1'", TEMPORARY_OBJECT),
    ("CREATE AGGREGATE pg_temp.a (int) (SFUNC = int4pl, STYPE = int)", TEMPORARY_OBJECT),
    (
        "CREATE OPERATOR pg_temp.=== (FUNCTION = int4eq, LEFTARG = int, RIGHTARG = int)",
        TEMPORARY_OBJECT,
    ),
    ("CREATE VIEW pg_temp.v AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE OR REPLACE VIEW pg_temp.v AS SELECT 1", TEMPORARY_OBJECT),
    ("CREATE SEQUENCE pg_temp.s", TEMPORARY_OBJECT),
    ("CREATE TYPE pg_temp.x AS (a int)", TEMPORARY_OBJECT),
    ("CREATE TYPE pg_temp.mood AS ENUM ('ok')", TEMPORARY_OBJECT),
    ("CREATE DOMAIN pg_temp.d AS int", TEMPORARY_OBJECT),
    ('CREATE COLLATION pg_temp.c FROM "C"', TEMPORARY_OBJECT),
    ("CREATE STATISTICS pg_temp.st ON a, b FROM orders", TEMPORARY_OBJECT),
    ("CREATE TEXT SEARCH CONFIGURATION pg_temp.ts (COPY = simple)", TEMPORARY_OBJECT),
    ("CREATE INDEX i ON pg_temp.t (id)", TEMPORARY_OBJECT),
    ("CREATE TABLE pg_temp.p PARTITION OF pg_temp.parent DEFAULT", TEMPORARY_OBJECT),
    ("ALTER TABLE t SET SCHEMA pg_temp", TEMPORARY_OBJECT),
    ("ALTER FUNCTION f() SET SCHEMA pg_temp", TEMPORARY_OBJECT),
    ("IMPORT FOREIGN SCHEMA s FROM SERVER srv INTO pg_temp", TEMPORARY_OBJECT),
    ('CREATE TABLE "pg_temp".t (id int)', TEMPORARY_OBJECT),
    ("CREATE TABLE PG_TEMP.t (id int)", TEMPORARY_OBJECT),
    ("CREATE TABLE pg_temp_3.t (id int)", TEMPORARY_OBJECT),
    ('CREATE TABLE "pg_temp_12".t (id int)', TEMPORARY_OBJECT),
    ("CREATE TABLE /* c */ pg_temp /* c */ . /* c */ t (id int)", TEMPORARY_OBJECT),
    ('CREATE TABLE U&"pg\\005ftemp".t (id int)', TEMPORARY_OBJECT),
    ('CREATE TABLE u&"pg_\\+000074emp".t (id int)', TEMPORARY_OBJECT),
    ("CREATE TABLE U&\"pg!005ftemp\" uescape '!'.t (id int)", TEMPORARY_OBJECT),
    ("SELECT * FROM pg_temp.t", TEMPORARY_OBJECT),  # only a pinned session has one
    ('CREATE TABLE "PG_TEMP".t (id int)', None),  # a quoted name is another schema
    ("CREATE TABLE my_pg_temp_copy (id int)", None),
    ("SELECT 'pg_temp.t'::regclass", None),
    # ... or by a search_path that puts pg_temp first: CREATE TABLE t is then temporary,
    # even when the setting was transaction-local
    ("SET search_path = pg_temp", TEMPORARY_OBJECT),
    ("SET search_path TO pg_temp, public", TEMPORARY_OBJECT),
    ("SET SESSION search_path = 'pg_temp'", TEMPORARY_OBJECT),
    ("SET LOCAL search_path = pg_temp", TEMPORARY_OBJECT),
    ("SET LOCAL search_path TO 'pg_temp'", TEMPORARY_OBJECT),
    ('SET search_path = "pg_temp"', TEMPORARY_OBJECT),
    ("SET search_path = E'pg\\x5ftemp'", TEMPORARY_OBJECT),
    ("SET search_path = U&'pg\\005ftemp'", TEMPORARY_OBJECT),
    ("SET search_path = $$pg_temp$$", TEMPORARY_OBJECT),
    ("SET search_path = 'pg\\137temp'", TEMPORARY_OBJECT),  # standard_conforming_strings off
    ("SET SCHEMA 'pg_temp'", TEMPORARY_OBJECT),
    ("SET \"search_path\" = 'pg_temp'", TEMPORARY_OBJECT),
    ("SET LOCAL \"Search_Path\" TO 'pg_temp'", TEMPORARY_OBJECT),
    ("SET LOCAL search_path = 'public'", None),
    ("SET LOCAL statement_timeout = 'pg_temp'", None),
    ("SET LOCAL SCHEMA 'pg_temp'", TEMPORARY_OBJECT),
    ("SELECT set_config('search_path', 'pg_temp', false)", TEMPORARY_OBJECT),
    ("SELECT set_config('search_path', 'public, pg_temp', true)", TEMPORARY_OBJECT),
    ("SELECT set_config('SEARCH_PATH', current_setting('x.y'), true)", TEMPORARY_OBJECT),
    ("SELECT set_config(name, value, true) FROM settings", TEMPORARY_OBJECT),
    ("SELECT set_config('search_path', 'public', true)", None),
    ("SELECT set_config('search_path', $1, false)", SET_VARIABLE),  # the value is not here
    ("SELECT set_config('search_path', E'app, public', false)", SET_VARIABLE),
    ("SELECT set_config('search_path', E'pg\\x5Ftemp', false)", TEMPORARY_OBJECT),
    ("SET search_path = E'pg\\u005ftemp'", TEMPORARY_OBJECT),
    ("SET search_path = E'app'", SET_VARIABLE),
    ("SELECT set_config('work_mem', 'pg_temp', true)", None),
    ("CREATE UNLOGGED TABLE t (id int)", None),
    ("CREATE TABLE t (id int)", None),
    ("CREATE TABLE t (temp_c numeric)", None),
    ("SELECT * INTO UNLOGGED t FROM orders", None),
    ("SELECT * INTO t FROM temp_orders", None),
    ("CREATE DATABASE d TEMPLATE template0", None),
    ("SELECT temperature FROM readings", None),
    # `temp` is an unreserved keyword: a table may be called that.
    ("CREATE TABLE temp (id int)", None),
    ("INSERT INTO temp VALUES (1)", None),
    # --- cursors that outlive their transaction
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", CURSOR_WITH_HOLD),
    ("declare c scroll cursor with hold for select * from t", CURSOR_WITH_HOLD),
    ("DECLARE c BINARY INSENSITIVE NO SCROLL CURSOR WITH HOLD FOR SELECT 1", CURSOR_WITH_HOLD),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", None),
    ("DECLARE c CURSOR FOR SELECT 1", None),
    ("DECLARE c CURSOR FOR SELECT hold FROM t", None),
    ("SELECT hold FROM t", None),
    # --- LISTEN / UNLISTEN, LOAD
    ("LISTEN jobs", LISTEN),
    ("UNLISTEN *", LISTEN),
    ("unlisten jobs", LISTEN),
    ("NOTIFY jobs, 'payload'", None),
    ("SELECT pg_notify('jobs', 'listen')", None),
    ("LOAD 'auto_explain'", LOAD),
    ("load '$libdir/plugins/auto_explain'", LOAD),
    # --- advisory locks: session-level pin, transaction-level do not
    ("SELECT pg_advisory_lock(42)", ADVISORY_LOCK),
    ("SELECT pg_advisory_lock(1, 2)", ADVISORY_LOCK),
    ("SELECT pg_advisory_lock_shared(42)", ADVISORY_LOCK),
    ("SELECT pg_try_advisory_lock(42)", ADVISORY_LOCK),
    ("SELECT pg_try_advisory_lock_shared(42)", ADVISORY_LOCK),
    ("SELECT PG_ADVISORY_LOCK (42)", ADVISORY_LOCK),
    ("SELECT pg_catalog.pg_advisory_lock(42)", ADVISORY_LOCK),
    ("SELECT id FROM jobs WHERE pg_try_advisory_lock(id) LIMIT 1", ADVISORY_LOCK),
    # A quoted lower-case function name is the same function.
    ('SELECT "pg_advisory_lock"(42)', ADVISORY_LOCK),
    ("SELECT pg_advisory_xact_lock(42)", None),
    ("SELECT pg_advisory_xact_lock_shared(42)", None),
    ("SELECT pg_try_advisory_xact_lock(42)", None),
    ("SELECT pg_try_advisory_xact_lock_shared(42)", None),
    ("SELECT pg_advisory_unlock(42)", None),
    # --- sequence state of the session
    ("SELECT currval('orders_id_seq')", SEQUENCE_STATE),
    ("SELECT lastval()", SEQUENCE_STATE),
    ("INSERT INTO t DEFAULT VALUES RETURNING LASTVAL()", SEQUENCE_STATE),
    ("SELECT nextval('orders_id_seq')", None),
    ("SELECT setval('orders_id_seq', 10)", None),
    # --- keywords inside comments
    ("-- SET search_path TO app\nSELECT 1", None),
    ("/* SET search_path TO app */ SELECT 1", None),
    ("/* outer /* SET x = 1 */ still a comment; RESET ALL */ SELECT 1", None),
    ("SELECT 1 -- ; SET x = 1", None),
    ("SELECT 1 /* ; LISTEN jobs */", None),
    ("SELECT 1 /* pg_advisory_lock(1) */", None),
    ("/* note */ SET search_path TO app", SET_VARIABLE),
    ("-- note\nSET search_path TO app", SET_VARIABLE),
    ("/* a /* nested */ comment */ LISTEN jobs", LISTEN),
    # --- keywords inside string literals
    ("SELECT '; SET search_path TO app'", None),
    ("SELECT 'it''s; SET x = 1'", None),
    ("SELECT 'pg_advisory_lock(1)'", None),
    ("SELECT 'create temp table t'", None),
    ("SELECT E'it\\'s; SET x = 1'", None),
    ("SELECT e'\\\\'; SET x = 1", SET_VARIABLE),  # E'\\' is one backslash; SET follows
    ("SELECT 'a\\'; SET x = 1", SET_VARIABLE),  # no escapes in a standard string
    # --- keywords as quoted identifiers
    ('SELECT "set", "temp", "hold" FROM t', None),
    ('SELECT 1 AS "; SET x = 1"', None),
    ('SELECT "currval" FROM t', None),
    ('CREATE TABLE "temp" (id int)', None),
    # --- keywords inside dollar-quoted bodies
    (
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET search_path TO app;"
        " PERFORM pg_advisory_lock(1); END $$",
        None,
    ),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SET x = 1; "
        "SELECT currval('s') $body$",
        None,
    ),
    ("SELECT $tag$ it's $$ nested $$; RESET ALL $tag$", None),
    ("SELECT $a$;$a$; SET x = 1", SET_VARIABLE),
    # --- several statements in one Query
    ("SELECT 1; SET search_path TO app", SET_VARIABLE),
    ("BEGIN; INSERT INTO t VALUES (1); COMMIT; LISTEN jobs", LISTEN),
    ("SELECT 1;SET x=1", SET_VARIABLE),
    ("SELECT 1;\n\t  /* c */ -- c\n  RESET ALL", SET_VARIABLE),
    ("SELECT 1; /* a /* b */ c */ SET x = 1", SET_VARIABLE),
    ("SET LOCAL x = 1; SET x = 2", SET_VARIABLE),
    (";;SET x = 1", SET_VARIABLE),
    ("SELECT 1; SELECT 2;", None),
    ("UPDATE t SET x = 1; UPDATE t SET y = 2", None),
    ("SELECT 1; DECLARE c CURSOR WITH HOLD FOR SELECT 2", CURSOR_WITH_HOLD),
    # --- case and whitespace
    ("  \n\tset\n search_path\tto app", SET_VARIABLE),
    ("SeT sEaRcH_pAtH tO app", SET_VARIABLE),
    ("\r\nLiStEn jobs", LISTEN),
    ("Create Temp Table t (id int)", TEMPORARY_OBJECT),
    ("select PG_Try_Advisory_Lock(7)", ADVISORY_LOCK),
    # --- words that merely contain keywords
    ("SELECT * FROM t OFFSET 10", None),
    ("SELECT name, setting FROM pg_settings", None),
    ("SELECT current_timestamp", None),
    ("SELECT threshold FROM alerts", None),
    ("SELECT upload FROM files", None),
    ("SELECT preset FROM presets", None),
    ("SELECT reset_at, executed, loaded, listened FROM jobs", None),
    ("SELECT holdings FROM portfolio", None),
    ("SELECT * FROM settings_history", None),
    ("UPDATE accounts SET balance = balance - 1 WHERE id = 1", None),
    ("ALTER ROLE app SET search_path = app", None),
    ("ALTER DATABASE app RESET ALL", None),
    ("ALTER TABLE t SET (fillfactor = 70)", None),
    ("GRANT EXECUTE ON FUNCTION f() TO app", None),
    ("SELECT 1; ALTER ROLE app SET work_mem = '1MB'", None),
    ("SHOW search_path", None),
    # --- text the lexer cannot follow
    ("SET search_path TO 'app", UNCLASSIFIED),
    ("/* never closed SELECT 1", UNCLASSIFIED),
    ("/* a /* b */ still open", UNCLASSIFIED),
    ("SELECT currval('s') || 'open", UNCLASSIFIED),
    ('SELECT pg_advisory_lock(1) AS "open', UNCLASSIFIED),
    ("CREATE TEMP TABLE t AS SELECT $$ open", UNCLASSIFIED),
    ("SELECT 1; SET x = $tag$ open $$", UNCLASSIFIED),
    # ... unless nothing in it could pin: the server rejects it whole.
    ("SELECT 'open", None),
]


@pytest.mark.parametrize(("sql", "expected"), SPEC, ids=[sql for sql, _ in SPEC])
def test_statement_verdict(sql: str, expected: str | None) -> None:
    assert Classifier().reason(sql.encode()) == expected


def test_the_table_covers_every_reason_and_is_large() -> None:
    reasons = {reason for _, reason in SPEC}
    assert len(SPEC) >= 120
    assert len({sql for sql, _ in SPEC}) == len(SPEC), "duplicate rows"
    assert reasons == {
        None,
        SET_VARIABLE,
        PREPARED_STATEMENT,
        DISCARD,
        TEMPORARY_OBJECT,
        CURSOR_WITH_HOLD,
        LISTEN,
        LOAD,
        ADVISORY_LOCK,
        SEQUENCE_STATE,
        SESSION_AUTHORIZATION,
        UNCLASSIFIED,
    }


BYTES_SPEC: list[tuple[bytes, str | None]] = [
    (b"SET application_name = '\xff'", UNCLASSIFIED),
    (b"LISTEN \xc3(", UNCLASSIFIED),
    (b"SELECT pg_advisory_lock(1), '\x80'", UNCLASSIFIED),
    (b"SELECT '\xff\xfe'", None),
    (b"SELECT 1 /* \x80 */", None),
    ("SET application_name = 'café'".encode(), SET_VARIABLE),
    ("SELECT 'SET ünïcode; RESET ALL'".encode(), None),
]


@pytest.mark.parametrize(("sql", "expected"), BYTES_SPEC)
def test_non_utf8_text_is_unclassified_only_when_it_might_pin(
    sql: bytes, expected: str | None
) -> None:
    assert Classifier().reason(sql) == expected


EXCLUDE_VARIABLE_SETS_SPEC: list[tuple[str, str | None]] = [
    ("SET search_path TO app", None),
    ("SET SESSION statement_timeout = 0", None),
    ("RESET ALL", None),
    ("SELECT set_config('a.b', 'c', false)", None),
    ("SET x = 1; SET y = 2", None),
    ("SET x = 1; CREATE TEMP TABLE t (id int)", TEMPORARY_OBJECT),
    ("SET x = 1; LISTEN jobs", LISTEN),
    ("CREATE TEMPORARY TABLE t (id int)", TEMPORARY_OBJECT),
    ("PREPARE q AS SELECT 1", PREPARED_STATEMENT),
    ("SELECT pg_advisory_lock(1)", ADVISORY_LOCK),
    ("SET ROLE reporting", SESSION_AUTHORIZATION),
    ("SET SESSION ROLE reporting", SESSION_AUTHORIZATION),
    ("SET SESSION AUTHORIZATION 'alice'", SESSION_AUTHORIZATION),
    ("RESET ROLE", SESSION_AUTHORIZATION),
    ("SET x = 'unterminated", UNCLASSIFIED),
]


@pytest.mark.parametrize(("sql", "expected"), EXCLUDE_VARIABLE_SETS_SPEC)
def test_exclude_variable_sets_lets_variables_through_but_nothing_else(
    sql: str, expected: str | None
) -> None:
    assert Classifier(exclude_variable_sets=True).reason(sql.encode()) == expected


# ---------------------------------------------------------------------------------------------
# The prefilter never hides a pin


def lexer_reason(sql: bytes) -> str | None:
    """What the classifier decides when the prefilter lets everything through."""
    with mock.patch.object(pinning, "might_pin", lambda _sql: True):
        return Classifier().reason(sql)


def test_might_pin_lets_every_pinning_row_of_the_table_through() -> None:
    for sql, _ in SPEC:
        if lexer_reason(sql.encode()) not in (None, UNCLASSIFIED):
            assert might_pin(sql.encode()), sql


@pytest.mark.parametrize("word", [b"set", b"reset", b"prepare", b"do", b"/*", b"--"])
@pytest.mark.parametrize("rest", [b"", b" x", b"$$", b"\n", b";"])
def test_might_pin_lets_every_leading_statement_word_through(word: bytes, rest: bytes) -> None:
    assert might_pin(b" ;" + word.upper() + rest)


# Pinning statements as token lists; a word token starting with a letter gets random case.
PINNING: list[tuple[list[str], str]] = [
    (["SET", "search_path", "TO", "app"], SET_VARIABLE),
    (["SET", "SESSION", "statement_timeout", "=", "0"], SET_VARIABLE),
    (["SET", "TIME", "ZONE", "'UTC'"], SET_VARIABLE),
    (["RESET", "ALL"], SET_VARIABLE),
    (["SET", "ROLE", "reporting"], SESSION_AUTHORIZATION),
    (["SET", "SESSION", "AUTHORIZATION", "DEFAULT"], SESSION_AUTHORIZATION),
    (["SELECT", "set_config", "(", "'a.b'", ",", "'c'", ",", "false", ")"], SET_VARIABLE),
    (["PREPARE", "q", "AS", "SELECT", "1"], PREPARED_STATEMENT),
    (["EXECUTE", "q"], PREPARED_STATEMENT),
    (["DEALLOCATE", "ALL"], PREPARED_STATEMENT),
    (["DISCARD", "ALL"], DISCARD),
    (["CREATE", "TEMP", "TABLE", "t", "(", "id", "int", ")"], TEMPORARY_OBJECT),
    (["CREATE", "LOCAL", "TEMPORARY", "VIEW", "v", "AS", "SELECT", "1"], TEMPORARY_OBJECT),
    (["SELECT", "1", "AS", "x", "INTO", "TEMP", "t"], TEMPORARY_OBJECT),
    (["DECLARE", "c", "CURSOR", "WITH", "HOLD", "FOR", "SELECT", "1"], CURSOR_WITH_HOLD),
    (["LISTEN", "jobs"], LISTEN),
    (["UNLISTEN", "*"], LISTEN),
    (["LOAD", "'auto_explain'"], LOAD),
    (["SELECT", "pg_advisory_lock", "(", "1", ")"], ADVISORY_LOCK),
    (["SELECT", "pg_try_advisory_lock_shared", "(", "1", ",", "2", ")"], ADVISORY_LOCK),
    (["SELECT", "currval", "(", "'s'", ")"], SEQUENCE_STATE),
    (["SELECT", "x", ",", "lastval", "(", ")", "FROM", "t"], SEQUENCE_STATE),
]

HARMLESS = [
    "SELECT 1",
    "SELECT * FROM orders WHERE note = 'a;b' OFFSET 3",
    "UPDATE t SET settings = 'SET x = 1'",
    "SELECT $$; RESET ALL $$",
    'SELECT "temp" FROM "listen"',
    "INSERT INTO t VALUES (E'it\\'s')",
    "SELECT nextval('s'), pg_advisory_xact_lock(1)",
    "BEGIN",
    "COMMIT",
]

# Only what PostgreSQL itself skips between tokens: its whitespace and both comment forms.
GAP = st.lists(
    st.sampled_from(
        [" ", "  ", "\t", "\n", "\r\n", "\f", "/* c */", "/**/", "/* a /* b */ c */", "-- c\n"]
    ),
    min_size=1,
    max_size=3,
).map("".join)
LEADING = st.lists(st.sampled_from(["", " ", "\n", "/* lead */", "-- lead\n"]), max_size=3).map(
    "".join
)


@st.composite
def random_case(draw: st.DrawFn, word: str) -> str:
    if not word[0].isalpha():
        return word
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(word, flips, strict=True))


@st.composite
def statement_with_pin(draw: st.DrawFn) -> tuple[str, str]:
    tokens, reason = draw(st.sampled_from(PINNING))
    words = [draw(random_case(token)) for token in tokens]
    pin = words[0] + "".join(draw(GAP) + word for word in words[1:])
    before = draw(st.lists(st.sampled_from(HARMLESS), max_size=3))
    after = draw(st.lists(st.sampled_from(HARMLESS), max_size=2))
    parts = [*before, pin, *after]
    text = draw(LEADING) + parts[0]
    for part in parts[1:]:
        text += draw(st.sampled_from(["", " "])) + ";" + draw(LEADING) + draw(GAP) + part
    if draw(st.booleans()):
        text += ";" + draw(LEADING)
    return text, reason


@settings(max_examples=300, deadline=None)
@given(statement_with_pin())
def test_might_pin_never_hides_a_pin(case: tuple[str, str]) -> None:
    sql, reason = case
    raw = sql.encode()
    assert lexer_reason(raw) == reason  # the generator builds what it claims
    assert might_pin(raw)
    assert Classifier().reason(raw) == reason


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(HARMLESS), min_size=1, max_size=4), LEADING)
def test_harmless_statements_never_pin(statements: list[str], leading: str) -> None:
    assert Classifier().reason((leading + "; ".join(statements)).encode()) is None


@pytest.mark.parametrize(("sql", "expected"), SPEC, ids=[sql for sql, _ in SPEC])
def test_a_query_messages_terminating_nul_changes_nothing(sql: str, expected: str | None) -> None:
    assert Classifier().reason(sql.encode() + b"\0") == expected


REPLAYABLE = [
    ("SET statement_timeout = '5s'", {"statement_timeout"}),
    ("set session Work_Mem to '8MB'", {"work_mem"}),
    ("SET myapp.user_id = 42", {"myapp.user_id"}),
    ('SET "MyApp".x TO 1', {"myapp.x"}),
    ("SET TIME ZONE 'UTC'", {"timezone"}),
    ("SET SCHEMA 'app'", {"search_path"}),
    ("SET NAMES 'UTF8'", {"client_encoding"}),
    ("RESET work_mem", {"work_mem"}),
    ("RESET ALL", {ALL_SETTINGS}),
    ("SELECT set_config('App.Tenant', '7', false)", {"app.tenant"}),
    ("SET a = 1; SET b = 2", {"a", "b"}),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        {
            "default_transaction_isolation",
            "default_transaction_read_only",
            "default_transaction_deferrable",
        },
    ),
]


@pytest.mark.parametrize(("sql", "settings"), REPLAYABLE)
def test_replay_carries_named_settings_instead_of_pinning(sql: str, settings: set[str]) -> None:
    verdict = Classifier(replay_settings=True).verdict(sql.encode() + b"\0")
    assert verdict.reason is None
    assert verdict.settings == settings


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT set_config(name, '1', false) FROM t", SET_VARIABLE),  # name not known
        ("SET ROLE admin", SESSION_AUTHORIZATION),
        ("SET a = 1; CREATE TEMP TABLE t (x int)", TEMPORARY_OBJECT),
    ],
)
def test_replay_still_pins_what_it_cannot_carry(sql: str, expected: str) -> None:
    assert Classifier(replay_settings=True).verdict(sql.encode()).reason == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("DO $$ BEGIN PERFORM set_config('work_mem', '77MB', false); END $$", DO_BLOCK),
        ("do language plpgsql $x$ begin null; end $x$", DO_BLOCK),
        ("SELECT 1; DO $$ BEGIN END $$", DO_BLOCK),
        ("SELECT 'do it'", None),
        ("SELECT done FROM t", None),
    ],
)
def test_a_do_block_pins_because_its_body_is_not_read(sql: str, expected: str | None) -> None:
    assert Classifier().reason(sql.encode()) == expected


@pytest.mark.parametrize(
    ("sql", "resets"),
    [
        ("RESET statement_timeout", {"statement_timeout"}),
        ("SET search_path TO DEFAULT", {"search_path"}),
        ("SET work_mem = DEFAULT", {"work_mem"}),
        ("RESET ALL", {ALL_SETTINGS}),
        ("SET work_mem = '8MB'", set()),
        ("SET a TO DEFAULT; SET b = 2", {"a"}),
    ],
)
def test_replay_knows_which_settings_go_back_to_their_default(sql: str, resets: set[str]) -> None:
    assert Classifier(replay_settings=True).verdict(sql.encode()).resets == resets


_PIECES = st.sampled_from(
    [b"SELECT ", b"TEMP", b"pg_temp.t", b"U&'x'", b' u&"y"', b"hold ", b"WITH HOLD", b"x", b";",
     b"advisory_lock(1)", b"currVal('s')", b"LASTVAL()", b"set_config('a','b',false)", b"tem",
     b"hol", b" ", b"\n", b"--", b"/*", b"'", b'"', b"_"]
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(st.lists(_PIECES, max_size=12).map(b"".join))
def test_the_literal_prefilter_never_hides_what_the_regex_finds(sql: bytes) -> None:
    """might_pin skips its regex when none of the literals is there; that must never turn a
    text the regex matches into a miss."""
    if pinning._ANYWHERE.search(sql.lower()) is not None:
        assert might_pin(sql)


def parse_body(sql: bytes, name: bytes = b"") -> bytes:
    """A Parse message's body: statement name, text, no parameter types."""
    return name + b"\0" + sql + b"\0\0\0"


@pytest.mark.parametrize(("sql", "expected"), SPEC)
def test_a_parsed_statement_gets_the_same_verdict_the_first_time_and_after(
    sql: str, expected: str | None
) -> None:
    classifier = Classifier(replay_settings=True)
    first = classifier.parse_verdict(parse_body(sql.encode(), b"s1"))
    assert first == classifier.verdict(sql.encode())
    assert classifier.parse_verdict(parse_body(sql.encode(), b"s1")) == first


def test_a_parse_message_whose_text_has_no_end_is_unclassified() -> None:
    assert Classifier().parse_verdict(b"\0SELECT 1").reason == UNCLASSIFIED


@pytest.mark.parametrize(("sql", "expected"), SPEC)
def test_a_text_gets_the_same_verdict_the_first_time_and_after(
    sql: str, expected: str | None
) -> None:
    classifier = Classifier()
    text = sql.encode() + b"\0"
    assert classifier.verdict(text).reason == expected
    assert classifier.verdict(text).reason == expected  # remembered, if short


def test_a_query_spelled_like_a_parse_message_is_not_taken_for_it() -> None:
    classifier = Classifier()
    body = parse_body(b"SELECT 1", b"SET a.b = 1")  # named like a statement that pins
    assert classifier.parse_verdict(body).reason is None
    assert classifier.verdict(body).reason == SET_VARIABLE  # the server runs the name


def test_remembered_verdicts_stay_within_bounds() -> None:
    classifier = Classifier()
    for i in range(pinning.MEMO_ENTRIES + 10):
        classifier.parse_verdict(parse_body(f"SELECT {i}".encode()))
        classifier.verdict(f"SELECT {i}".encode())
    huge = parse_body(b"SELECT '" + b"x" * pinning.PARSED_TEXT_LIMIT + b"'")
    assert classifier.parse_verdict(huge).reason is None
    long_query = b"SELECT '" + b"x" * pinning.SHORT_QUERY_LIMIT + b"'"
    assert classifier.verdict(long_query).reason is None
    assert len(classifier._parsed) <= pinning.MEMO_ENTRIES
    assert len(classifier._short) <= pinning.MEMO_ENTRIES
    assert huge not in classifier._parsed
    assert long_query not in classifier._short
