"""Clients log in to dbmux itself, with mysql_native_password or caching_sha2_password (fast
path, and full authentication over RSA key exchange), against the proxy's own secrets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from dbmux.auth.mysql import encrypt_password
from dbmux.engines.mysql import handshake, wire
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy


@pytest.fixture
def sha2_proxy(start_my_proxy: Callable[..., MyProxy], tmp_path: Path) -> MyProxy:
    secret = tmp_path / "sha2.json"
    secret.write_text(json.dumps({"username": MY_USER, "password": MY_PASSWORD}))
    return start_my_proxy(
        auth=[
            {"secret": f"file:{secret}", "client_password_auth_type": "MYSQL_CACHING_SHA2_PASSWORD"}
        ]
    )


def test_native_password_login_works_and_is_counted(my_proxy: MyProxy) -> None:
    with my_proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert my_proxy.metrics.client_connections_setup_succeeded.value == 1


@pytest.mark.parametrize(
    ("user", "password"), [(MY_USER, "wrong"), (MY_USER, ""), ("nobody", MY_PASSWORD)]
)
def test_a_wrong_password_or_unknown_user_is_refused_with_1045(my_proxy: MyProxy, user, password):
    with pytest.raises(pymysql.err.OperationalError) as caught:
        my_proxy.connect(user=user, password=password)
    assert caught.value.args[0] == 1045
    assert "Access denied" in caught.value.args[1]
    assert my_proxy.metrics.client_connections_setup_failed_auth.value == 1


def test_caching_sha2_fast_path_with_pymysql_and_connector(sha2_proxy: MyProxy) -> None:
    with sha2_proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
    conn = sha2_proxy.connector(auth_plugin="caching_sha2_password")
    conn.close()


def test_caching_sha2_wrong_password_goes_through_full_authentication(sha2_proxy: MyProxy):
    """PyMySQL fetches the proxy's RSA key, sends the password encrypted, and is refused."""
    with pytest.raises(pymysql.err.OperationalError) as caught:
        sha2_proxy.connect(password="wrong")
    assert caught.value.args[0] == 1045


async def test_caching_sha2_full_authentication_accepts_the_right_password(sha2_proxy: MyProxy):
    """As on MySQL: a fast-path scramble that does not match leads to full authentication,
    where the password itself (RSA-encrypted) decides."""
    async with await RawMy.connect(sha2_proxy.host, sha2_proxy.port) as raw:
        _, payload = await raw.packet()
        greeting = handshake.parse_greeting(payload)
        assert greeting.plugin == "caching_sha2_password"
        response = handshake.build_handshake_response(
            capabilities=handshake.SERVER_BASE_CAPABILITIES,
            charset=45,
            user=MY_USER,
            auth_response=b"\x01" * 32,  # not the scramble of any password
            database=MY_DB,
            plugin="caching_sha2_password",
        )
        raw.send(wire.packet(1, response))
        assert (await raw.packet())[1] == b"\x01\x04"  # perform full authentication
        raw.send(wire.packet(3, b"\x02"))  # the public key, please
        seq, key = await raw.packet()
        assert key.startswith(b"\x01-----BEGIN PUBLIC KEY-----")
        raw.send(wire.packet(seq + 1, encrypt_password(MY_PASSWORD, greeting.nonce, key[1:])))
        assert (await raw.packet())[1][:1] == b"\0"


def test_a_client_starting_with_another_plugin_is_switched(sha2_proxy: MyProxy) -> None:
    conn = sha2_proxy.connector(auth_plugin="mysql_native_password")
    conn.close()


def test_an_unknown_database_is_refused_at_login(my_proxy: MyProxy) -> None:
    with pytest.raises(pymysql.err.OperationalError) as caught:
        my_proxy.connect(database="no_such_db")
    assert caught.value.args[0] in (1044, 1049)


def test_change_user_logs_in_again_and_starts_a_new_session(my_proxy: MyProxy) -> None:
    conn = my_proxy.connector()
    try:
        cur = conn.cursor()
        cur.execute("SET @x = 1")
        conn.cmd_change_user(username=MY_USER, password=MY_PASSWORD, database=MY_DB)
        cur = conn.cursor()
        cur.execute("SELECT @x, DATABASE()")
        assert cur.fetchall() == [(None, MY_DB)]
        with pytest.raises(mysql.connector.Error):
            conn.cmd_change_user(username=MY_USER, password="wrong", database=MY_DB)
    finally:
        conn.close()
