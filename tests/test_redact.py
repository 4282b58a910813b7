"""Debug logging shows statements, never the passwords some of them set."""

from __future__ import annotations

import pytest

from dbmux.redact import MAX_LOGGED, REDACTED, redact


@pytest.mark.parametrize(
    "statement",
    [
        b"ALTER ROLE x PASSWORD 'secret'",
        b"alter role x with encrypted password 'secret' valid until 'infinity'",
        b"CREATE USER u IDENTIFIED BY 'secret'",
        b'create user u identified with caching_sha2_password by "secret"',
        b"SET PASSWORD = PASSWORD('secret')",
        b"SET PASSWORD FOR u@'%' = 'secret'",
        b"ALTER USER u IDENTIFIED BY 'sec''ret'",
        b"ALTER USER u IDENTIFIED BY 'sec\\'ret'",
        b"ALTER ROLE x PASSWORD $$secret$$",
        b"ALTER ROLE x PASSWORD $pw$sec'ret$pw$",
        b"ALTER ROLE x PASSWORD E'sec\\'ret'",
        b"ALTER ROLE x /* the new one */ PASSWORD 'secret'",
        b"-- rotate\nALTER ROLE x PASSWORD 'secret'",
        b"ALTER ROLE x PASSWORD 'secret",  # never ends: hidden to the end
        b"SELECT 5--3, PASSWORD('secret')",  # MySQL: no comment without a blank after --
    ],
)
def test_password_literals_are_hidden(statement: bytes) -> None:
    text = redact(statement)
    assert "secret" not in text and "sec" not in text.replace("SELECT", "")
    assert REDACTED in text


def test_statements_without_password_clauses_are_shown_as_sent() -> None:
    assert redact(b"SELECT 'hello', $1 FROM t WHERE a$b = 'x'") == (
        "SELECT 'hello', $1 FROM t WHERE a$b = 'x'"
    )


def test_a_keyword_inside_a_literal_or_comment_hides_nothing() -> None:
    assert redact(b"SELECT 'password', 'x'") == "SELECT 'password', 'x'"


def test_long_statements_are_cut() -> None:
    text = redact(b"SELECT " + b"1," * MAX_LOGGED)
    assert len(text) == MAX_LOGGED + 3 and text.endswith("...")
