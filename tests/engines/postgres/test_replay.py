"""Which in-flight PostgreSQL requests transaction_replay may run again: one read that
cannot have written anything, sent whole, naming no statement of an earlier request."""

from __future__ import annotations

import pytest

from dbmux.engines.postgres.replay import is_pure_read, rerunnable, rerunnable_messages
from tests.pgraw import i32, msg


@pytest.mark.parametrize(
    ("sql", "pure"),
    [
        ("SELECT id, note FROM items WHERE id IN (1, 2)", True),
        ("select count(*), max(id) from items", True),
        ("WITH recent AS (SELECT * FROM items) SELECT coalesce(sum(id), 0) FROM recent", True),
        ("SELECT pg_sleep(1), now()", True),
        ("VALUES (1), (2)", True),
        ("SHOW work_mem", True),
        ("SELECT nextval('items_id_seq')", False),  # advances a sequence
        ("SELECT add_item(1)", False),  # a user's function may write
        ('SELECT "Mixed"(1)', False),
        ("WITH gone AS (DELETE FROM items RETURNING id) SELECT count(*) FROM gone", False),
        ("SELECT * INTO copy_of_items FROM items", False),  # creates a table
        ("SELECT * FROM items FOR UPDATE", False),
        ("SELECT 1; SELECT 2", False),  # one statement only
        ("INSERT INTO items (note) VALUES ('x')", False),
        ("SELECT 'unterminated", False),
        ("SELECT $$ DELETE $$", True),  # a string, not a statement
    ],
)
def test_a_pure_read(sql: str, pure: bool) -> None:
    assert is_pure_read(sql.encode()) is pure


def _extended(sql: bytes, statement: bytes = b"", portal: bytes = b"", describe: bool = True):
    parse = msg(b"P", statement + b"\0" + sql + b"\0" + bytes(2))
    bind = msg(b"B", portal + b"\0" + statement + b"\0" + bytes(6))
    return parse + bind + (msg(b"D", b"P\0") if describe else b"") + msg(b"E", b"\0" + i32(0))


def test_whole_requests_of_one_read_may_run_again() -> None:
    assert rerunnable(msg(b"Q", b"SELECT 1\0"))
    assert rerunnable(_extended(b"SELECT 1") + msg(b"S"))
    assert rerunnable(_extended(b"SELECT 1", describe=False) + msg(b"S"))


def test_requests_that_depend_on_earlier_ones_or_write_may_not() -> None:
    assert not rerunnable(msg(b"Q", b"DELETE FROM items\0"))
    assert not rerunnable(_extended(b"SELECT 1", statement=b"s1") + msg(b"S"))
    assert not rerunnable(_extended(b"SELECT 1", portal=b"p1") + msg(b"S"))
    bind_only = msg(b"B", b"\0\0" + bytes(6)) + msg(b"E", b"\0" + i32(0)) + msg(b"S")
    assert not rerunnable(bind_only)  # the unnamed statement was parsed on the dead server
    assert not rerunnable(msg(b"Q", b"SELECT 1\0")[:-3])  # a partial message


def test_named_statements_the_client_prepared_earlier_are_read_by_their_text() -> None:
    bind = msg(b"B", b"\0s1\0" + bytes(6))
    execute = msg(b"E", b"\0" + i32(0))
    messages = [(66, bind[5:]), (69, execute[5:]), (83, b"")]
    assert rerunnable_messages(messages, {b"s1": b"SELECT count(*) FROM items"})
    assert not rerunnable_messages(messages, {b"s1": b"UPDATE items SET note = 'x'"})
    assert not rerunnable_messages(messages, {})  # a statement nobody knows
