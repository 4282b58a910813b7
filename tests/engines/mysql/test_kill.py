"""KILL in a query text: carried out by the proxy on its own connection ids, or refused;
never sent to the server as typed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbmux.engines.mysql import kill

KILL_RULES: list[tuple[str, kill.Kill | None]] = [
    ("KILL 5", kill.Kill(5)),
    ("kill 5;", kill.Kill(5)),
    ("KILL/**/5", kill.Kill(5)),
    ("/*x*/KILL 5", kill.Kill(5)),
    ("kill\n5", kill.Kill(5)),
    ("# note\nKILL 5 -- why", kill.Kill(5)),
    ("KILL HARD 5", kill.Kill(5)),
    ("KILL SOFT CONNECTION 5", kill.Kill(5)),
    ("KILL CONNECTION 5", kill.Kill(5)),
    ("KILL QUERY 5", kill.Kill(5, query=True)),
    ("KILL SOFT QUERY 5", kill.Kill(5, query=True)),
    ("/*!KILL 5*/", kill.Kill(5)),
    ("/*!50000 KILL QUERY 5 */", kill.Kill(5, query=True)),
    ("/*M!100000 KILL 5*/", kill.Kill(5)),
    ("KILL QUERY ID 5", kill._QUERY_ID),
    ("KILL USER 'app'", kill._USER),
    ("KILL HARD QUERY USER app", kill._USER),
    ("KILL ?", kill._NOT_ALONE),
    ("KILL @id", kill._NOT_ALONE),
    ("KILL (5)", kill._NOT_ALONE),
    ("KILL 5 + 0", kill._NOT_ALONE),
    ("KILL 0x5", kill._NOT_ALONE),
    ("KILL CONNECTION_ID()", kill._NOT_ALONE),
    ("SELECT 1; KILL 5", kill._NOT_ALONE),
    ("KILL 5; SELECT 1", kill._NOT_ALONE),
    ("KILL 5; KILL 6", kill._NOT_ALONE),
    ("SET STATEMENT max_statement_time = 1 FOR KILL 5", kill._NOT_ALONE),
    ("BEGIN NOT ATOMIC KILL 5; END", kill._NOT_ALONE),
    ("CREATE PROCEDURE p() KILL 5", kill._NOT_ALONE),
    ("CREATE EVENT e ON SCHEDULE EVERY 1 SECOND DO KILL 5", kill._NOT_ALONE),
    # Unterminated: the server may read further than the lexer can.
    ("SELECT 'x; KILL 5", kill._NOT_ALONE),
    ("KILL 5 /* x", kill._NOT_ALONE),
    # The backslash readings: `'a\'` ends elsewhere under NO_BACKSLASH_ESCAPES.
    ("KILL 'a\\' ; KILL 5 -- '", kill._NOT_ALONE),
    ("SELECT 'a\\' ; KILL 5 -- '", kill._NOT_ALONE),
    # Dynamic SQL: a literal is read in turn; anything else cannot be.
    ("PREPARE s FROM 'KILL 5'", kill._DYNAMIC),
    ("PREPARE s FROM _latin1'KILL 5'", kill._DYNAMIC),
    ("PREPARE s FROM 'KI' 'LL 5'", kill._DYNAMIC),
    ("PREPARE s FROM @sql", kill._DYNAMIC),
    ("PREPARE s FROM 0x4b494c4c2035", kill._DYNAMIC),
    ("PREPARE s FROM X'4b494c4c2035'", kill._DYNAMIC),
    ("EXECUTE IMMEDIATE 'KILL 5'", kill._DYNAMIC),
    ("EXECUTE IMMEDIATE CONCAT('KI', 'LL 5')", kill._DYNAMIC),
    ("EXECUTE IMMEDIATE 'EXECUTE IMMEDIATE ''KILL 5'''", kill._DYNAMIC),
    ("BEGIN NOT ATOMIC DECLARE v TEXT; PREPARE s FROM v; EXECUTE s; END", kill._DYNAMIC),
    ("PREPARE s FROM 'SELECT ?'", None),
    ("PREPARE s FROM N'SELECT 1'", None),
    ("EXECUTE IMMEDIATE 'SELECT ?' USING 1", None),
    ("EXECUTE s USING @a", None),
    ("DEALLOCATE PREPARE s", None),
    # KILL in strings, comments, quoted names and after a dot is no statement.
    ("SELECT 'KILL 5'", None),
    ("SELECT 1 -- KILL 5", None),
    ("SELECT 1 /* KILL 5 */", None),
    ("SELECT `kill` FROM t", None),
    ("SELECT t.kill FROM t", None),
    ("SELECT killed, skill FROM t", None),
    ("SELECT 1", None),
]


@pytest.mark.parametrize(("sql", "expected"), KILL_RULES)
def test_kill_in_every_spelling_is_found(sql: str, expected: kill.Kill | None) -> None:
    assert kill.find_kill(sql.encode()) == expected


def test_every_refusal_says_why() -> None:
    for refusal in (kill._NOT_ALONE, kill._USER, kill._QUERY_ID, kill._DYNAMIC):
        assert refusal.refusal and "dbmux" in refusal.refusal and refusal.connection_id == 0


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet="KILkil 5;'\"\\/*!-#\n`.()?@PREPAREFROMexecuteIMMEDIATE"))
def test_find_kill_reads_any_text_without_raising(text: str) -> None:
    """Hostile text never crashes the reader: it finds a KILL, a refusal, or nothing."""
    found = kill.find_kill(text.encode())
    assert found is None or isinstance(found, kill.Kill)
