"""Logging in to dbmux with a signed auth token instead of the database password (iam_auth),
for both engines, through real drivers: the client holds a 15-minute token, dbmux checks it
and logs in to the database with the secret's password, which the client never sees.

A token travels as a cleartext password (PostgreSQL AuthenticationCleartextPassword, MySQL
mysql_clear_password), so only over TLS: a user who must use one is refused on plaintext
before it sends anything. Refusals are counted by reason and never explained to the client.
"""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pymysql
import pytest

from dbmux.auth.tokens import generate_auth_token, write_key_pair
from tests.auth.test_tls import asyncpg_answer, ca_of, write_certificate
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "tokens.pem", tmp_path / "tokens.pub"
    write_key_pair(private, public)
    return private, public


def token_settings(tmp_path: Path, public: Path, user: str, password: str, iam: str) -> Any:
    secret = tmp_path / f"{user}-token-secret.json"
    secret.write_text(json.dumps({"username": user, "password": password}))
    secret.chmod(0o600)
    return {
        "tls": write_certificate(tmp_path),
        "auth_tokens": {"public_key_files": [str(public)]},
        "auth": [{"secret": f"file:{secret}", "iam_auth": iam}],
    }


def pg_token_proxy(start_proxy: Any, tmp_path: Path, public: Path, iam: str = "REQUIRED") -> Any:
    settings = token_settings(tmp_path, public, APP_USER, APP_PASSWORD, iam)
    proxy = start_proxy(**settings)
    proxy.ca = ca_of(settings["tls"])
    return proxy


def pg_login(proxy: Any, password: str, sslmode: str = "verify-full") -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=proxy.host,
        port=proxy.port,
        user=APP_USER,
        password=password,
        dbname=APP_DB,
        sslmode=sslmode,
        sslrootcert=proxy.ca,
        connect_timeout=10,
    )


def refusals(proxy: Any, reason: str) -> float:
    return float(proxy.metrics.token_refusals(reason))


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def test_psycopg_logs_in_with_a_token_and_never_holds_the_password(
    start_proxy: Any, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    proxy = pg_token_proxy(start_proxy, tmp_path, public)
    token = generate_auth_token(proxy.host, proxy.port, APP_USER, private_key=private)
    with pg_login(proxy, token) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)


def test_asyncpg_logs_in_with_a_token(
    start_proxy: Any, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    proxy = pg_token_proxy(start_proxy, tmp_path, public)
    token = generate_auth_token("localhost", proxy.port, APP_USER, private_key=private)
    context = ssl.create_default_context(cafile=proxy.ca)

    assert asyncpg_answer(proxy.port, token, context) == 42


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(
            lambda p, k: generate_auth_token(p.host, p.port, APP_USER, private_key=k, now=0),
            "EXPIRED",
            id="expired",
        ),
        pytest.param(
            lambda p, k: generate_auth_token(
                p.host, p.port, APP_USER, private_key=k, now=time.time() + 3600
            ),
            "NOT_YET_VALID",
            id="not-yet-valid",
        ),
        pytest.param(
            lambda p, k: generate_auth_token(p.host, p.port, "someone_else", private_key=k),
            "WRONG_USER",
            id="wrong-user",
        ),
        pytest.param(
            lambda p, k: generate_auth_token(p.host, p.port + 1, APP_USER, private_key=k),
            "WRONG_PORT",
            id="wrong-port",
        ),
        pytest.param(
            lambda p, k: generate_auth_token(
                "db.elsewhere.example", p.port, APP_USER, private_key=k
            ),
            "WRONG_HOST",
            id="wrong-host",
        ),
        pytest.param(
            lambda p, k: generate_auth_token(p.host, p.port, APP_USER, private_key=k)[:-3] + "AAA",
            "TAMPERED",
            id="tampered",
        ),
        pytest.param(lambda p, k: APP_PASSWORD, "MALFORMED", id="the-password-itself"),
    ],
)
def test_a_refused_token_gets_28p01_and_is_counted_by_reason(
    start_proxy: Any, tmp_path: Path, keys: tuple[Path, Path], make: Any, reason: str
) -> None:
    private, public = keys
    proxy = pg_token_proxy(start_proxy, tmp_path, public)
    with pytest.raises(psycopg.OperationalError) as refused:
        pg_login(proxy, make(proxy, private))
    assert "password authentication failed" in str(refused.value)
    assert reason not in str(refused.value)  # the reason is the operator's, not the client's
    assert refusals(proxy, reason) == 1
    assert proxy.metrics.auth_failures("token_refused") == proxy.metrics.auth_failures() == 1


def test_a_token_signed_by_an_unknown_key_is_refused(
    start_proxy: Any, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    _, public = keys
    proxy = pg_token_proxy(start_proxy, tmp_path, public)
    other = tmp_path / "other.pem"
    write_key_pair(other, tmp_path / "other.pub")
    with pytest.raises(psycopg.OperationalError):
        pg_login(proxy, generate_auth_token(proxy.host, proxy.port, APP_USER, private_key=other))
    assert refusals(proxy, "UNKNOWN_KEY") == 1


def test_a_token_user_on_plaintext_is_refused_before_sending_anything(
    start_proxy: Any, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    proxy = pg_token_proxy(start_proxy, tmp_path, public)
    token = generate_auth_token(proxy.host, proxy.port, APP_USER, private_key=private)
    with pytest.raises(psycopg.OperationalError) as refused:
        pg_login(proxy, token, sslmode="disable")
    assert "accepted over TLS only" in str(refused.value)
    assert refusals(proxy, "NO_TLS") == 1
    assert proxy.metrics.auth_failures("tls_required") == proxy.metrics.auth_failures() == 1


def test_with_iam_auth_enabled_a_token_and_the_password_both_work(
    start_proxy: Any, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    proxy = pg_token_proxy(start_proxy, tmp_path, public, iam="ENABLED")
    token = generate_auth_token(proxy.host, proxy.port, APP_USER, private_key=private)
    for password, sslmode in ((token, "verify-full"), (APP_PASSWORD, "verify-full")):
        with pg_login(proxy, password, sslmode) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    with pg_login(proxy, APP_PASSWORD, "disable") as conn:  # SCRAM on plaintext
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        pg_login(proxy, "not-the-password")


# ---------------------------------------------------------------------------------------------
# MySQL


def test_pymysql_logs_in_with_a_token_over_tls_and_not_on_plaintext(
    start_my_proxy: Any, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    settings = token_settings(tmp_path, public, MY_USER, MY_PASSWORD, "REQUIRED")
    proxy = start_my_proxy(**settings)
    token = generate_auth_token(proxy.host, proxy.port, MY_USER, private_key=private)
    context = ssl.create_default_context(cafile=ca_of(settings["tls"]))
    with proxy.connect(password=token, ssl=context, database=MY_DB) as conn, conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        row = cur.fetchone()
        assert row is not None and row[0].startswith(f"{MY_USER}@")
    with pytest.raises(pymysql.err.OperationalError) as refused:
        proxy.connect(password=token, ssl_disabled=True)
    assert refused.value.args[0] == 1045 and "over TLS only" in refused.value.args[1]
    assert proxy.metrics.token_refusals("NO_TLS") == 1
    with pytest.raises(pymysql.err.OperationalError) as refused:
        proxy.connect(password=MY_PASSWORD, ssl=context)  # REQUIRED: no password
    assert refused.value.args[0] == 1045


def test_mysql_connector_logs_in_with_a_token(
    start_my_proxy: Any, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    settings = token_settings(tmp_path, public, MY_USER, MY_PASSWORD, "REQUIRED")
    proxy = start_my_proxy(**settings)
    token = generate_auth_token(proxy.host, proxy.port, MY_USER, private_key=private)
    conn = mysql.connector.connect(
        host=proxy.host,
        port=proxy.port,
        user=MY_USER,
        password=token,
        database=MY_DB,
        use_pure=True,
        ssl_ca=ca_of(settings["tls"]),
        ssl_verify_cert=True,
        auth_plugin="mysql_clear_password",
        connection_timeout=10,
    )
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT 6 * 7")
        assert cursor.fetchone() == (42,)
    finally:
        conn.close()
