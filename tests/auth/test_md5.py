"""Tests for dbmux.auth.md5 against known values and a real PostgreSQL."""

from __future__ import annotations

import hashlib

import pytest

from dbmux.auth.md5 import (
    md5_password_hash,
    md5_response,
    md5_response_from_hash,
    verify_md5_response,
)

SALT = b"\x01\x02\x03\x04"


def test_password_hash_is_md5_of_password_then_user() -> None:
    # Independent of argument order mistakes: md5("secret" + "alice").
    expected = "md5" + hashlib.md5(b"secretalice").hexdigest()
    assert md5_password_hash("alice", "secret") == expected
    assert md5_password_hash("alice", "secret") != md5_password_hash("secret", "alice")


def test_password_hash_known_value() -> None:
    # md5("postgrespostgres"), widely published as the hash of user/password postgres/postgres.
    assert md5_password_hash("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"


def test_response_layout() -> None:
    inner = hashlib.md5(b"secretalice").hexdigest()
    expected = b"md5" + hashlib.md5(inner.encode() + SALT).hexdigest().encode()
    response = md5_response("alice", "secret", SALT)
    assert response == expected
    assert len(response) == 35
    assert not response.endswith(b"\0")


def test_response_depends_on_salt() -> None:
    assert md5_response("alice", "secret", SALT) != md5_response("alice", "secret", b"\0\0\0\0")


def test_response_from_hash_matches_password() -> None:
    stored = md5_password_hash("alice", "secret")
    assert md5_response_from_hash(stored, SALT) == md5_response("alice", "secret", SALT)


def test_verify_accepts_right_password() -> None:
    stored = md5_password_hash("alice", "secret")
    assert verify_md5_response(stored, SALT, md5_response("alice", "secret", SALT))
    # PasswordMessage carries a trailing NUL; tolerate it.
    assert verify_md5_response(stored, SALT, md5_response("alice", "secret", SALT) + b"\0")


@pytest.mark.parametrize(
    "response",
    [
        md5_response("alice", "wrong", SALT),
        md5_response("bob", "secret", SALT),
        md5_response("alice", "secret", b"\x04\x03\x02\x01"),
        b"",
        b"md5",
        b"secret",
        md5_response("alice", "secret", SALT).upper(),
    ],
)
def test_verify_rejects_wrong_response(response: bytes) -> None:
    assert not verify_md5_response(md5_password_hash("alice", "secret"), SALT, response)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "secret",
        "md5",
        "md5" + "0" * 31,
        "md5" + "g" * 32,
        "MD5" + "0" * 32,
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
    ],
)
def test_verify_rejects_non_md5_stored_value(stored: str) -> None:
    with pytest.raises(ValueError):
        verify_md5_response(stored, SALT, b"md5" + b"0" * 32)


@pytest.mark.parametrize("salt", [b"", b"abc", b"abcde"])
def test_salt_must_be_four_bytes(salt: bytes) -> None:
    with pytest.raises(ValueError):
        md5_response("alice", "secret", salt)


def test_non_ascii_is_utf8() -> None:
    assert (
        md5_password_hash("j\u00f6rg", "p\u00e4ss")
        == "md5" + hashlib.md5("p\u00e4ssj\u00f6rg".encode()).hexdigest()
    )


# --- against a real PostgreSQL ---------------------------------------------------------------


def test_postgresql_md5_hash(pg, pg_role: str) -> None:
    pg.psql(f"SET password_encryption = 'md5'; CREATE ROLE \"{pg_role}\" LOGIN PASSWORD 'secret'")
    stored = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{pg_role}'")
    assert stored == md5_password_hash(pg_role, "secret")
    assert verify_md5_response(stored, SALT, md5_response(pg_role, "secret", SALT))
    assert not verify_md5_response(stored, SALT, md5_response(pg_role, "wrong", SALT))
