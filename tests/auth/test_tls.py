"""TLS between clients and dbmux, for both engines: PostgreSQL's SSLRequest and MySQL's
CLIENT_SSL upgrade on the proxy's own port, and `require_tls`, which refuses plaintext
clients before any password is exchanged."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dbmux.config import ConfigError, parse_config
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER


@pytest.fixture
def certificate(tmp_path: Path) -> dict[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost, as dbmux's `tls` setting."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dbmux test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "proxy.pem", tmp_path / "proxy-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"certificate_file": str(cert_file), "key_file": str(key_file)}


def pg_connect(proxy: Any, sslmode: str, **extra: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=proxy.host,
        port=proxy.port,
        user=APP_USER,
        password=APP_PASSWORD,
        dbname=APP_DB,
        sslmode=sslmode,
        connect_timeout=10,
        **extra,
    )


def sessions_over_tls(proxy: Any) -> list[bool]:
    return [client.tls for client in proxy.embedded.proxy().runtime.clients]


def test_a_postgresql_client_asking_for_tls_gets_it_and_is_served(
    start_proxy: Any, certificate: dict[str, str]
) -> None:
    proxy = start_proxy(tls=certificate)
    with pg_connect(proxy, "verify-full", sslrootcert=certificate["certificate_file"]) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        assert sessions_over_tls(proxy) == [True]


def test_without_tls_configured_a_postgresql_client_is_told_no_and_goes_on_in_plaintext(
    start_proxy: Any,
) -> None:
    proxy = start_proxy()
    with pg_connect(proxy, "prefer") as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        pg_connect(proxy, "require")


def test_require_tls_refuses_a_plaintext_postgresql_client_before_its_password(
    start_proxy: Any, certificate: dict[str, str]
) -> None:
    proxy = start_proxy(tls=certificate, require_tls=True)
    with pytest.raises(psycopg.OperationalError) as refused:
        pg_connect(proxy, "disable")
    assert "accepts TLS connections only" in str(refused.value)
    assert proxy.metrics.client_connections_setup_failed_auth.value == 0  # no password asked
    with pg_connect(proxy, "require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_bytes_sent_after_sslrequest_before_the_handshake_are_refused(
    start_proxy: Any, certificate: dict[str, str]
) -> None:
    """Bytes queued behind an SSLRequest would be read as if they came over TLS (buffer
    stuffing: a man in the middle injects a plaintext startup the TLS session then vouches
    for), so the proxy refuses them instead of starting TLS."""
    proxy = start_proxy(tls=certificate)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    ssl_request = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    startup = b"\0\0\0\x0b\0\x03\0\0\0\0\0"
    writer.write(ssl_request + startup)
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert reply[:1] == b"E" and b"08P01" in reply and b"before the TLS handshake" in reply


def my_connect(proxy: Any, **extra: Any) -> pymysql.connections.Connection[Any]:
    return pymysql.connect(
        host=proxy.host,
        port=proxy.port,
        user=MY_USER,
        password=MY_PASSWORD,
        database=MY_DB,
        connect_timeout=10,
        **extra,
    )


def test_a_mysql_client_asking_for_tls_gets_it_and_is_served(
    start_my_proxy: Any, certificate: dict[str, str]
) -> None:
    proxy = start_my_proxy(tls=certificate)
    context = ssl.create_default_context(cafile=certificate["certificate_file"])
    with my_connect(proxy, ssl=context) as conn, conn.cursor() as cur:
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone() == (42,)
        assert sessions_over_tls(proxy) == [True]


def test_require_tls_refuses_a_plaintext_mysql_client_with_3159(
    start_my_proxy: Any, certificate: dict[str, str]
) -> None:
    proxy = start_my_proxy(tls=certificate, require_tls=True)
    with pytest.raises(pymysql.err.OperationalError) as refused:
        my_connect(proxy, ssl_disabled=True)  # (PyMySQL prefers TLS when offered)
    assert refused.value.args[0] == 3159
    context = ssl.create_default_context(cafile=certificate["certificate_file"])
    with my_connect(proxy, ssl=context) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


def test_require_tls_without_a_certificate_is_a_config_error_naming_the_field() -> None:
    config = {
        "proxies": [
            {
                "name": "p",
                "engine_family": "POSTGRESQL",
                "listen": "127.0.0.1:0",
                "require_tls": True,
                "auth": [{"secret": "env:X"}],
                "target_group": {"targets": [{"host": "127.0.0.1", "port": 5432}]},
            }
        ]
    }
    with pytest.raises(ConfigError) as refused:
        parse_config(config)
    assert "proxies.0.require_tls" in str(refused.value)


def test_a_tls_handshake_that_never_comes_does_not_hold_the_login_forever(
    start_proxy: Any, certificate: dict[str, str]
) -> None:
    """The TLS handshake counts against client_login_timeout like the rest of the login."""
    proxy = start_proxy(tls=certificate, client_login_timeout=1)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
        assert sock.recv(1) == b"S"
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed by the proxy, not left waiting
