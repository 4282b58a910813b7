"""TLS between clients and dbmux, for both engines: PostgreSQL's SSLRequest and MySQL's
CLIENT_SSL upgrade on the proxy's own port, and `require_tls`, which refuses plaintext
clients before any password is exchanged."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import asyncpg
import mysql.connector
import psycopg
import pymysql
import pytest
from cryptography import x509

from dbmux.auth.mysql import native_scramble
from dbmux.auth.tls import TargetSideTls, TlsError
from dbmux.config import ConfigError, TargetTls, parse_config
from dbmux.engines.mysql import handshake, wire
from dbmux.testing.certs import TestCA
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, wait_until
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER
from tests.pgraw import startup_packet


def write_certificate(folder: Path, common_name: str = "dbmux test") -> dict[str, str]:
    """A certificate for 127.0.0.1 and localhost from a new CA in `folder`, as dbmux's `tls`
    setting."""
    return TestCA(folder).issue("proxy", common_name=common_name).as_tls()


def ca_of(certificate: dict[str, str]) -> str:
    """The CA file that verifies a certificate from `write_certificate`."""
    return str(Path(certificate["certificate_file"]).with_name("ca.pem"))


@pytest.fixture
def certificate(tmp_path: Path) -> dict[str, str]:
    return write_certificate(tmp_path)


def pg_tls_handshake(proxy: Any, client: ssl.SSLContext) -> bytes:
    """SSLRequest and a TLS handshake with `client`: the certificate the proxy showed (DER)."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))
        assert sock.recv(1) == b"S"
        with client.wrap_socket(
            sock, server_hostname="127.0.0.1", do_handshake_on_connect=False
        ) as tls:  # (handshake inside the with: a failed one still closes the socket)
            tls.do_handshake()
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def unverified(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    return context


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
    with pg_connect(proxy, "verify-full", sslrootcert=ca_of(certificate)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        assert sessions_over_tls(proxy) == [True]
    assert proxy.metrics.client_connections_tls.value == 1
    with pg_connect(proxy, "disable") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.metrics.client_connections_no_tls.value == 1


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
    assert proxy.metrics.auth_failures() == 0  # no password asked
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
    context = ssl.create_default_context(cafile=ca_of(certificate))
    with my_connect(proxy, ssl=context) as conn, conn.cursor() as cur:
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone() == (42,)
        assert sessions_over_tls(proxy) == [True]


def test_mysql_connector_verifying_the_proxy_s_name_is_served_over_tls(
    start_my_proxy: Any, certificate: dict[str, str]
) -> None:
    proxy = start_my_proxy(tls=certificate, require_tls=True)
    conn = mysql.connector.connect(
        host="localhost",
        port=proxy.port,
        user=MY_USER,
        password=MY_PASSWORD,
        database=MY_DB,
        use_pure=True,
        ssl_ca=ca_of(certificate),
        ssl_verify_cert=True,
        ssl_verify_identity=True,
        connection_timeout=10,
    )
    try:
        cursor = conn.cursor()
        cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")  # the server side is plaintext
        cursor.fetchall()
        assert sessions_over_tls(proxy) == [True]
    finally:
        conn.close()


def asyncpg_answer(port: int, password: str, context: ssl.SSLContext) -> Any:
    """What `SELECT 6 * 7` gives asyncpg logged in to the proxy on `port` as the app user over
    TLS with `context`, by the name localhost (which the proxy's certificate holds)."""

    async def login() -> Any:
        conn = await asyncpg.connect(
            host="localhost",
            port=port,
            user=APP_USER,
            password=password,
            database=APP_DB,
            ssl=context,
            timeout=10,
        )
        try:
            return await conn.fetchval("SELECT 6 * 7")
        finally:
            await conn.close()

    return asyncio.run(login())


def test_asyncpg_verifying_the_proxy_logs_in_with_scram_over_tls(
    start_proxy: Any, certificate: dict[str, str]
) -> None:
    proxy = start_proxy(tls=certificate, require_tls=True)
    context = ssl.create_default_context(cafile=ca_of(certificate))  # verify-full

    assert asyncpg_answer(proxy.port, APP_PASSWORD, context) == 42
    assert proxy.metrics.client_connections_tls.value == 1


def test_require_tls_refuses_a_plaintext_mysql_client_with_3159(
    start_my_proxy: Any, certificate: dict[str, str]
) -> None:
    proxy = start_my_proxy(tls=certificate, require_tls=True)
    with pytest.raises(pymysql.err.OperationalError) as refused:
        my_connect(proxy, ssl_disabled=True)  # (PyMySQL prefers TLS when offered)
    assert refused.value.args[0] == 3159
    context = ssl.create_default_context(cafile=ca_of(certificate))
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
    runtime = proxy.embedded.proxy().runtime  # and forgotten: it counts no more
    wait_until(lambda: not runtime.clients, "the session forgotten")


def test_a_new_certificate_is_used_for_new_connections_without_a_restart(
    start_proxy: Any, tmp_path: Path
) -> None:
    """Certificates are rotated on disk (certbot, a secrets agent): new connections get the
    new one within a janitor pass, and a client connected with the old one keeps its session."""
    first = write_certificate(tmp_path, "first")
    proxy = start_proxy(tls=first)
    shown = pg_tls_handshake(proxy, unverified())
    assert x509.load_der_x509_certificate(shown).subject.rfc4514_string() == "CN=first"
    with pg_connect(proxy, "require") as kept:
        write_certificate(tmp_path, "second")  # the same paths
        deadline = time.monotonic() + 10
        while True:
            shown = pg_tls_handshake(proxy, unverified())
            subject = x509.load_der_x509_certificate(shown).subject.rfc4514_string()
            if subject == "CN=second":
                break
            assert time.monotonic() < deadline, "the new certificate was never used"
            time.sleep(0.2)
        assert kept.execute("SELECT 7").fetchone() == (7,)


def test_min_version_refuses_older_tls(start_proxy: Any, certificate: dict[str, str]) -> None:
    proxy = start_proxy(tls={**certificate, "min_version": "TLSv1.3"})
    with pytest.raises(ssl.SSLError):
        pg_tls_handshake(proxy, unverified(maximum=ssl.TLSVersion.TLSv1_2))
    assert pg_tls_handshake(proxy, unverified())  # TLS 1.3 is welcome


def read_packet(sock: ssl.SSLSocket | socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 4:
        header += sock.recv(4 - len(header))
    length, seq = int.from_bytes(header[:3], "little"), header[3]
    payload = b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    return seq, payload


def test_caching_sha2_full_authentication_over_tls_takes_the_password_in_the_channel(
    start_my_proxy: Any, certificate: dict[str, str], tmp_path: Path
) -> None:
    """Over TLS a MySQL client answers "perform full authentication" with its password in
    the clear, inside the TLS channel, instead of asking for the RSA key (as MySQL does)."""
    secret = tmp_path / "sha2.json"
    secret.write_text(f'{{"username": "{MY_USER}", "password": "{MY_PASSWORD}"}}')
    proxy = start_my_proxy(
        tls=certificate,
        auth=[
            {"secret": f"file:{secret}", "client_password_auth_type": "MYSQL_CACHING_SHA2_PASSWORD"}
        ],
    )
    for password, accepted in ((MY_PASSWORD, True), ("wrong", False)):
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as plain:
            _, payload = read_packet(plain)
            assert handshake.parse_greeting(payload).capabilities & handshake.CLIENT_SSL
            capabilities = handshake.SERVER_BASE_CAPABILITIES | handshake.CLIENT_SSL
            response = handshake.build_handshake_response(
                capabilities=capabilities,
                charset=45,
                user=MY_USER,
                auth_response=b"\x01" * 32,  # no password's scramble: full authentication
                database=MY_DB,
                plugin="caching_sha2_password",
            )
            plain.sendall(wire.packet(1, response[:32]))  # the SSL request
            with unverified().wrap_socket(plain, server_hostname="127.0.0.1") as sock:
                sock.sendall(wire.packet(2, response))
                seq, reply = read_packet(sock)
                assert reply == b"\x01\x04"  # perform full authentication
                sock.sendall(wire.packet(seq + 1, password.encode() + b"\0"))
                _, outcome = read_packet(sock)
        assert (outcome[:1] == b"\0") is accepted, outcome


def test_libpq_channel_binding_require_logs_in_with_scram_plus(
    start_proxy: Any, certificate: dict[str, str]
) -> None:
    """SCRAM-SHA-256-PLUS binds the login to the certificate the client saw, so a man in the
    middle with another certificate cannot relay it; PgBouncer and PgCat do not offer it."""
    proxy = start_proxy(tls=certificate)
    with pg_connect(proxy, "require", channel_binding="require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):  # libpq will not bind without TLS
        pg_connect(proxy, "disable", channel_binding="require")


# -- the proxy's context towards its databases (target_group.tls) ------------------------------


def target_side(mode: str, folder: Path, **files: str) -> TargetSideTls:
    return TargetSideTls(TargetTls(mode=mode, **files), folder)


def test_target_side_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    TestCA(tmp_path / "certs")
    context = target_side("verify-full", tmp_path, ca_file="certs/ca.pem").current
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize(
    ("mode", "verify", "hostname"),
    [
        ("require", ssl.CERT_NONE, False),
        ("verify-ca", ssl.CERT_REQUIRED, False),
        ("verify-full", ssl.CERT_REQUIRED, True),
    ],
)
def test_target_side_modes_mean_what_libpq_means(
    tmp_path: Path, mode: str, verify: ssl.VerifyMode, hostname: bool
) -> None:
    ca = TestCA(tmp_path)
    files = {} if mode == "require" else {"ca_file": str(ca.ca_file)}
    context = target_side(mode, tmp_path, **files).current
    assert (context.verify_mode, context.check_hostname) == (verify, hostname)


def test_target_side_files_that_do_not_load_are_named(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(TlsError, match=r"target_group\.tls: cannot load .*ca\.pem"):
        target_side("verify-ca", tmp_path, ca_file="ca.pem")


def test_target_side_is_reloaded_when_its_ca_changes(tmp_path: Path) -> None:
    TestCA(tmp_path)
    tls = target_side("verify-ca", tmp_path, ca_file="ca.pem")
    before = tls.current
    assert not tls.reload_if_changed()
    TestCA(tmp_path, name="the next CA")  # writes ca.pem again
    os.utime(tmp_path / "ca.pem", (time.time() + 5, time.time() + 5))
    assert tls.reload_if_changed()
    assert tls.current is not before


# -- PostgreSQL 17's direct TLS (sslnegotiation=direct) ------------------------------------------


class MemoryTls:
    """A raw TLS client over memory BIOs, so that a test chooses how its first bytes reach
    the proxy: at once (PostgreSQL 17's direct TLS), in pieces, or behind other bytes."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    def handshake(self, first_piece: int = 0, prefix: bytes = b"") -> None:
        """The TLS handshake; with `first_piece`, the ClientHello's first that many bytes go
        alone, the rest only once the proxy had time to read them; `prefix` goes in the same
        write as the ClientHello."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                data, prefix = prefix + self.outgoing.read(), b""
                if first_piece:
                    self.sock.sendall(data[:first_piece])
                    time.sleep(0.2)
                    data, first_piece = data[first_piece:], 0
                self.sock.sendall(data)
                self._receive()
        self.sock.sendall(self.outgoing.read())

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the proxy")
        self.incoming.write(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def message(self) -> tuple[bytes, bytes]:
        """One backend message (type, payload) read over TLS."""
        data = b""
        while len(data) < 5 or len(data) < 1 + int.from_bytes(data[1:5], "big"):
            try:
                data += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._receive()
        return data[:1], data[5 : 1 + int.from_bytes(data[1:5], "big")]

    def close(self) -> None:
        self.sock.close()


def alpn(*protocols: str, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = unverified(maximum)
    if protocols:
        context.set_alpn_protocols(list(protocols))
    return context


STARTUP = startup_packet({"user": APP_USER, "database": APP_DB})
AUTH_SASL = (10).to_bytes(4, "big")


def test_a_postgresql_17_client_starting_tls_directly_is_served_on_the_same_port(
    start_proxy: Any, certificate: dict[str, str]
) -> None:
    """libpq 17's sslnegotiation=direct skips the SSLRequest round trip: its first bytes
    are a TLS ClientHello, read by the proxy before it knows it is one."""
    proxy = start_proxy(tls=certificate)
    direct = {"sslrootcert": ca_of(certificate), "sslnegotiation": "direct"}
    with pg_connect(proxy, "verify-full", channel_binding="require", **direct) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        assert sessions_over_tls(proxy) == [True]
    with pg_connect(proxy, "require") as conn, pg_connect(proxy, "disable") as plain:
        assert conn.execute("SELECT 1").fetchone() == plain.execute("SELECT 1").fetchone()
    assert proxy.metrics.client_connections_tls.value == 2


def test_require_tls_counts_direct_tls_as_tls(
    start_proxy: Any, certificate: dict[str, str]
) -> None:
    proxy = start_proxy(tls=certificate, require_tls=True)
    with pg_connect(proxy, "require", sslnegotiation="direct") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("first_piece", [0, 1, 7])
def test_a_direct_tls_client_asking_for_alpn_postgresql_logs_in_however_its_hello_arrives(
    start_proxy: Any, certificate: dict[str, str], first_piece: int
) -> None:
    """The ClientHello may come whole or in pieces (the record header alone, one byte):
    what the proxy read before it knew it was TLS goes to the handshake first."""
    proxy = start_proxy(tls=certificate)
    client = MemoryTls((proxy.host, proxy.port), alpn("postgresql"))
    try:
        client.handshake(first_piece)
        assert client.tls.selected_alpn_protocol() == "postgresql"
        client.send(STARTUP)
        kind, payload = client.message()
        assert (kind, payload[:4]) == (b"R", AUTH_SASL)
        assert b"SCRAM-SHA-256-PLUS" in payload  # bound to this TLS connection
    finally:
        client.close()


@pytest.mark.parametrize("protocols", [(), ("http/1.1",)])
def test_a_direct_tls_client_without_alpn_postgresql_is_refused_before_its_startup(
    start_proxy: Any, certificate: dict[str, str], protocols: tuple[str, ...]
) -> None:
    """As PostgreSQL 17 does: a TLS client of another protocol (an HTTPS client pointed at
    the wrong port) is not taken for a PostgreSQL client."""
    proxy = start_proxy(tls=certificate)
    client = MemoryTls((proxy.host, proxy.port), alpn(*protocols))
    try:
        client.handshake()
        assert client.tls.selected_alpn_protocol() is None
        client.send(STARTUP)
        kind, payload = client.message()
        assert kind == b"E" and b"08P01" in payload and b'ALPN protocol "postgresql"' in payload
    finally:
        client.close()
    assert proxy.metrics.client_protocol_errors.value == 1


def test_min_version_applies_to_direct_tls(start_proxy: Any, certificate: dict[str, str]) -> None:
    proxy = start_proxy(tls={**certificate, "min_version": "TLSv1.3"})
    client = MemoryTls((proxy.host, proxy.port), alpn("postgresql", maximum=ssl.TLSVersion.TLSv1_2))
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            client.handshake()
    finally:
        client.close()
    wait_until(
        lambda: not proxy.embedded.proxy().runtime.clients,
        "the session of a failed TLS handshake is gone",
    )


@pytest.mark.parametrize(
    ("tls", "first"),
    [(True, b"\x17\x03\x01\x00\x10"), (False, b"\x16\x03\x01\x00\x10")],
    ids=["garbage-with-tls", "tls-record-without-tls-configured"],
)
def test_a_first_byte_that_starts_no_startup_packet_is_a_protocol_error(
    start_proxy: Any, certificate: dict[str, str], tls: bool, first: bytes
) -> None:
    proxy = start_proxy(tls=certificate) if tls else start_proxy()
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(first + b"\0" * 20)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply[:1] == b"E" and b"08P01" in reply and b"invalid startup packet length" in reply


def test_a_mysql_client_whose_hello_comes_with_its_ssl_request_gets_tls(
    start_my_proxy: Any, certificate: dict[str, str]
) -> None:
    """A MySQL client starts its handshake right behind the SSL request, without waiting for
    an answer: both may arrive in one read, and the ClientHello is the handshake's."""
    proxy = start_my_proxy(tls=certificate)
    client = MemoryTls((proxy.host, proxy.port), unverified())
    try:
        _, payload = read_packet(client.sock)
        nonce = handshake.parse_greeting(payload).nonce
        response = handshake.build_handshake_response(
            capabilities=handshake.SERVER_BASE_CAPABILITIES | handshake.CLIENT_SSL,
            charset=45,
            user=MY_USER,
            auth_response=native_scramble(MY_PASSWORD, nonce),
            database=MY_DB,
            plugin="mysql_native_password",
        )
        client.handshake(prefix=wire.packet(1, response[:32]))  # the SSL request, then TLS
        client.send(wire.packet(2, response))
        ok = b""
        while len(ok) < 5:
            try:
                ok += client.tls.read(65536)
            except ssl.SSLWantReadError:
                client.incoming.write(client.sock.recv(65536))
        assert ok[4:5] == b"\0", ok  # OK: logged in over TLS
    finally:
        client.close()
