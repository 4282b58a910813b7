"""dbmux's own login to MySQL/MariaDB servers: over TLS as target_group.tls says (the SSL
request, then the handshake response in the TLS channel), and the password never handed to
whoever could read it: caching_sha2_password full authentication in the TLS channel or
encrypted with the configured key of the server, never with a key the server sends over
plaintext; mysql_clear_password only over TLS unless allowed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from dbmux.auth.mysql import RsaKey
from dbmux.auth.secrets import Credentials
from dbmux.auth.tls import TargetSideTls
from dbmux.config import TargetTls
from dbmux.engines.base import ServerError, TargetSecurity
from dbmux.engines.mysql import handshake, wire
from dbmux.engines.mysql.backend import MyServer, open_server
from dbmux.targets import HealthReason
from dbmux.testing import MariaDBServer
from dbmux.testing.certs import TestCA
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import wait_until
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, my_proxy_config

CERT_USER = "cert_user"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("server-ca"))


@pytest.fixture(scope="module")
def tls_mariadb(ca: TestCA) -> Iterator[MariaDBServer]:
    """MariaDB that takes TCP logins only over TLS (require_secure_transport), with a
    certificate for the loopback names, and a user that needs a client certificate too."""
    with MariaDBServer(tls=ca.issue("my"), tls_required=True, client_ca_file=ca.ca_file) as db:
        for user in (MY_USER, CERT_USER):
            db.create_user(user, MY_PASSWORD)
        db.sql(f"ALTER USER '{CERT_USER}'@'%' REQUIRE SUBJECT '/CN={CERT_USER}'")
        db.create_database(MY_DB, owner=MY_USER)
        db.sql(f"GRANT ALL PRIVILEGES ON {MY_DB}.* TO '{CERT_USER}'@'%'")
        yield db


@pytest.fixture(scope="module")
def elsewhere_mariadb(ca: TestCA) -> Iterator[MariaDBServer]:
    """MariaDB whose certificate names db.example, not the address it is reached at."""
    with MariaDBServer(tls=ca.issue("elsewhere", ("db.example",))) as db:
        db.create_user(MY_USER, MY_PASSWORD)
        db.create_database(MY_DB, owner=MY_USER)
        yield db


@contextlib.contextmanager
def dbmux_to(
    server: MariaDBServer, folder: Path, tls: dict[str, Any], user: str = MY_USER
) -> Iterator[EmbeddedDbmux]:
    """A dbmux in front of `server` with `target_group.tls` set to `tls`."""
    secret = folder / f"{user}.json"
    secret.write_text(json.dumps({"username": user, "password": MY_PASSWORD}))
    # A target refused for its TLS has no writer to wait for: clients hear why at once,
    # well before connection_borrow_timeout.
    pool = {"connection_borrow_timeout": 60}
    config = my_proxy_config(server, folder, pool, [{"secret": f"file:{secret}"}])
    config["proxies"][0]["target_group"]["tls"] = tls
    with EmbeddedDbmux(config) as embedded:
        yield embedded


def query(embedded: EmbeddedDbmux, sql: str, user: str = MY_USER) -> tuple[Any, ...]:
    host, port = embedded.address()
    with (
        pymysql.connect(
            host=host,
            port=port,
            user=user,
            password=MY_PASSWORD,
            database=MY_DB,
            connect_timeout=10,
        ) as conn,
        conn.cursor() as cursor,
    ):
        cursor.execute(sql)
        row = cursor.fetchone()
        assert row is not None
        return tuple(row)


OWN_CIPHER = "SHOW SESSION STATUS LIKE 'Ssl_cipher'"


def test_verify_full_encrypts_the_server_connection(
    tls_mariadb: MariaDBServer, ca: TestCA, tmp_path: Path
) -> None:
    with dbmux_to(tls_mariadb, tmp_path, {"mode": "verify-full", "ca_file": str(ca.ca_file)}) as e:
        assert query(e, OWN_CIPHER)[1] != ""  # the server's side of the proxy's connection


def test_a_certificate_for_another_name_is_refused_under_verify_full(
    elsewhere_mariadb: MariaDBServer, ca: TestCA, tmp_path: Path
) -> None:
    tls = {"mode": "verify-full", "ca_file": str(ca.ca_file)}
    with dbmux_to(elsewhere_mariadb, tmp_path, tls) as embedded:
        with pytest.raises(pymysql.MySQLError, match="IP address mismatch") as refused:
            query(embedded, "SELECT 1")
        assert "target_group.tls (mode verify-full)" in str(refused.value)
        instance = embedded.proxy().targets.instances[0]
        wait_until(lambda: instance.reason is HealthReason.AUTH_FAILURE, "an AUTH_FAILURE")


def test_verify_ca_checks_the_chain_but_not_the_name(
    elsewhere_mariadb: MariaDBServer, ca: TestCA, tmp_path: Path
) -> None:
    with dbmux_to(
        elsewhere_mariadb, tmp_path, {"mode": "verify-ca", "ca_file": str(ca.ca_file)}
    ) as e:
        assert query(e, OWN_CIPHER)[1] != ""


def test_a_certificate_of_an_unknown_ca_is_refused_under_verify_ca(
    tls_mariadb: MariaDBServer, tmp_path: Path
) -> None:
    stranger = TestCA(tmp_path / "stranger", name="stranger CA")
    with dbmux_to(
        tls_mariadb, tmp_path, {"mode": "verify-ca", "ca_file": str(stranger.ca_file)}
    ) as e:
        with pytest.raises(pymysql.MySQLError, match="certificate verify failed"):
            query(e, "SELECT 1")


def test_require_refuses_a_server_without_tls(mariadb: MariaDBServer, tmp_path: Path) -> None:
    with dbmux_to(mariadb, tmp_path, {"mode": "require"}) as embedded:
        with pytest.raises(pymysql.MySQLError, match="does not offer TLS") as refused:
            query(embedded, "SELECT 1")
        assert "target_group.tls (mode require)" in str(refused.value)


def test_a_client_certificate_is_presented_when_configured(
    tls_mariadb: MariaDBServer, ca: TestCA, tmp_path: Path
) -> None:
    client = ca.issue("dbmux-client", (), common_name=CERT_USER, client=True)
    tls = {"mode": "verify-full", "ca_file": str(ca.ca_file), **client.as_tls()}
    with dbmux_to(tls_mariadb, tmp_path, tls, user=CERT_USER) as embedded:
        assert query(embedded, "SELECT CURRENT_USER()", user=CERT_USER) == (f"{CERT_USER}@%",)


# -- the password, as a server's auth plugin asks for it (servers of our own) ----------------

PASSWORD = "secret"


class Impostor:
    """A "server" for one connection that greets with `plugin` and then asks for what
    `script` says: "full" (caching_sha2_password full authentication) or "clear" (a switch
    to mysql_clear_password). What the client answered is in `received`. Blocking sockets on
    a thread: the kernel keeps the client's TLS hello until the handshake reads it."""

    def __init__(self, plugin: str, script: str, tls: ssl.SSLContext | None = None) -> None:
        self.plugin, self.script, self.tls = plugin, script, tls
        self.nonce = b"abcdefghij0123456789"
        self.received: list[bytes] = []
        self.over_tls = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve_one, daemon=True)

    async def __aenter__(self) -> Impostor:
        self.thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.thread.join, 30)  # the loop goes on: the client closes
        self.listener.close()

    def _serve_one(self) -> None:
        self.listener.settimeout(30)
        with contextlib.suppress(OSError), self.listener.accept()[0] as sock:
            sock.settimeout(30)
            self._converse(sock)

    def _converse(self, sock: socket.socket) -> None:
        caps = handshake.SERVER_BASE_CAPABILITIES | (handshake.CLIENT_SSL if self.tls else 0)
        greeting = handshake.Greeting("8.0.36", 7, self.nonce, caps, 45, 2, self.plugin)
        sock.sendall(wire.packet(0, handshake.build_greeting(greeting)))
        seq, payload = read_packet(sock)
        if self.tls is not None and len(payload) == 32:  # the SSL request
            sock = self.tls.wrap_socket(sock, server_side=True)
            self.over_tls = True
            seq, payload = read_packet(sock)
        if self.script == "full":
            sock.sendall(wire.packet(seq + 1, b"\x01\x04"))
        else:
            switch = handshake.auth_switch_request("mysql_clear_password", b"")
            sock.sendall(wire.packet(seq + 1, switch))
        seq, payload = read_packet(sock)
        self.received.append(payload)
        sock.sendall(wire.packet(seq + 1, wire.ok_packet()))
        sock.recv(1)  # until the client leaves


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    header = read_exactly(sock, 4)
    return header[3], read_exactly(sock, int.from_bytes(header[:3], "little"))


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


async def log_in(port: int, security: TargetSecurity) -> MyServer:
    return await asyncio.wait_for(
        open_server(
            "127.0.0.1",
            port,
            Credentials("app", PASSWORD),
            "",
            capabilities=handshake.SERVER_BASE_CAPABILITIES,
            charset=45,
            session_init=(),
            read_limit=False,
            prepared_capacity=1,
            security=security,
        ),
        30,
    )


def server_context(ca: TestCA) -> ssl.SSLContext:
    files = ca.issue("impostor")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.certificate_file, files.key_file)
    return context


def verify_full(ca: TestCA) -> TargetSideTls:
    return TargetSideTls(TargetTls(mode="verify-full", ca_file=ca.ca_file), Path("."))


async def test_sha2_full_authentication_sends_the_password_in_the_tls_channel(
    ca: TestCA,
) -> None:
    impostor = Impostor("caching_sha2_password", "full", server_context(ca))
    async with impostor:
        server = await log_in(impostor.port, TargetSecurity(tls=verify_full(ca)))
        server.close()
    assert impostor.over_tls
    assert impostor.received == [PASSWORD.encode() + b"\0"]


async def test_sha2_full_authentication_without_tls_uses_the_configured_key() -> None:
    key = RsaKey.generate()
    impostor = Impostor("caching_sha2_password", "full")
    async with impostor:
        server = await log_in(impostor.port, TargetSecurity(server_public_key=key.public_pem))
        server.close()
    (encrypted,) = impostor.received
    assert key.decrypt_password(encrypted, impostor.nonce) == PASSWORD


async def test_sha2_full_authentication_without_tls_or_key_is_refused() -> None:
    """Asking the server for its key over plaintext would let a man in the middle hand over
    his own and read the password."""
    impostor = Impostor("caching_sha2_password", "full")
    async with impostor:
        with pytest.raises(ServerError, match="server_public_key_file") as refused:
            await log_in(impostor.port, TargetSecurity())
    assert "target_group.tls" in str(refused.value)
    assert refused.value.code == "2061"
    assert impostor.received == []  # not even the request for the key


async def test_a_cleartext_password_is_not_sent_without_tls() -> None:
    impostor = Impostor("mysql_native_password", "clear")
    async with impostor:
        with pytest.raises(ServerError, match="allow_cleartext_password") as refused:
            await log_in(impostor.port, TargetSecurity())
    assert refused.value.code == "2061"
    assert impostor.received == []


async def test_a_cleartext_password_without_tls_when_allowed() -> None:
    impostor = Impostor("mysql_native_password", "clear")
    async with impostor:
        server = await log_in(impostor.port, TargetSecurity(allow_cleartext_password=True))
        server.close()
    assert impostor.received == [PASSWORD.encode() + b"\0"]


async def test_a_cleartext_password_goes_over_tls(ca: TestCA) -> None:
    impostor = Impostor("mysql_native_password", "clear", server_context(ca))
    async with impostor:
        server = await log_in(impostor.port, TargetSecurity(tls=verify_full(ca)))
        server.close()
    assert impostor.received == [PASSWORD.encode() + b"\0"]
