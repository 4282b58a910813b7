"""Clients log in to dbmux itself, with mysql_native_password or caching_sha2_password (fast
path, and full authentication over RSA key exchange), against the proxy's own secrets."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mysql.connector
import pymysql
import pytest

from dbmux.auth.mysql import RsaKey, encrypt_password
from dbmux.config import parse_config
from dbmux.engines.mysql import handshake, wire
from dbmux.testing import MariaDBServer
from dbmux.testing.embedded import EmbeddedDbmux
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy, my_proxy_config


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
    assert my_proxy.metrics.auth_failures() == 1


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


async def full_authentication(proxy: MyProxy, password: str = MY_PASSWORD) -> bytes:
    """A caching_sha2_password login through full authentication over plaintext, asking
    for the proxy's public key: the key (PEM) it sent, once the login succeeded."""
    async with await RawMy.connect(proxy.host, proxy.port) as raw:
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
        raw.send(wire.packet(seq + 1, encrypt_password(password, greeting.nonce, key[1:])))
        assert (await raw.packet())[1][:1] == b"\0"
        return key[1:]


async def test_caching_sha2_full_authentication_accepts_the_right_password(sha2_proxy: MyProxy):
    """As on MySQL: a fast-path scramble that does not match leads to full authentication,
    where the password itself (RSA-encrypted) decides."""
    await full_authentication(sha2_proxy)


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


# -- the RSA key clients can pin ------------------------------------------------------------


def sha2_auth(tmp_path: Path) -> list[dict[str, Any]]:
    secret = tmp_path / "sha2.json"
    secret.write_text(json.dumps({"username": MY_USER, "password": MY_PASSWORD}))
    return [
        {"secret": f"file:{secret}", "client_password_auth_type": "MYSQL_CACHING_SHA2_PASSWORD"}
    ]


async def test_the_rsa_key_generated_at_the_first_start_is_kept_for_the_next(
    mariadb: MariaDBServer, tmp_path: Path
) -> None:
    """Clients pin the key (mysql --server-public-key-path), so a restart must not change it."""
    config = {**my_proxy_config(mariadb, tmp_path, {}, sha2_auth(tmp_path)), "state_dir": "state"}
    keys = []
    for _ in range(2):
        with EmbeddedDbmux(parse_config(config, base_dir=tmp_path)) as embedded:
            keys.append(await full_authentication(MyProxy(embedded, *embedded.address())))
    assert keys[0] == keys[1]
    kept = tmp_path / "state" / "mytest.mysql-rsa-key.pem"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert RsaKey.from_file(kept).public_pem == keys[0]


def test_pymysql_with_the_configured_public_key_pinned_logs_in_by_full_authentication(
    start_my_proxy: Callable[..., MyProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With server_public_key set, PyMySQL encrypts its password with that key without asking
    the proxy for it: only the configured key's public half lets it in."""
    configured = RsaKey.kept_in(tmp_path / "rsa.pem")
    proxy = start_my_proxy(auth=sha2_auth(tmp_path), rsa_private_key_file=str(tmp_path / "rsa.pem"))
    # A scramble that never matches: PyMySQL goes on to full authentication, as it does
    # with a MySQL server whose password cache is empty.
    monkeypatch.setattr(pymysql._auth, "scramble_caching_sha2", lambda password, nonce: b"\1" * 32)
    with proxy.connect(server_public_key=configured.public_pem) as conn, conn.cursor() as cur:
        cur.execute("SELECT 3")
        assert cur.fetchone() == (3,)
    other = RsaKey.generate().public_pem
    with pytest.raises(pymysql.err.OperationalError) as refused:
        proxy.connect(server_public_key=other)
    assert refused.value.args[0] == 1045
