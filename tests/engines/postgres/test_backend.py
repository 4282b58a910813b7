"""dbmux's own login to PostgreSQL servers: over TLS as target_group.tls says, with SCRAM
bound to the TLS connection where the server offers it; it trusts a server only after the
server proved it knows the password, and sends a cleartext password only over TLS unless
allowed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from dbmux.auth.secrets import Credentials
from dbmux.engines.base import ServerError, TargetSecurity
from dbmux.engines.postgres import wire
from dbmux.engines.postgres.backend import PgServer, open_server
from dbmux.targets import HealthReason
from dbmux.testing import PostgresCluster
from dbmux.testing.certs import TestCA
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, proxy_config, wait_until


async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A "server" that runs SCRAM up to its first message and then says AuthenticationOk
    without the final message, whose signature only the real server could compute."""
    length = int.from_bytes(await reader.readexactly(4), "big")
    await reader.readexactly(length - 4)  # the startup packet
    writer.write(wire.authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
    _, payload = await read_message(reader)
    _, first = wire.parse_sasl_initial(payload)
    client_nonce = first.decode().split("r=", 1)[1]
    salt = base64.b64encode(secrets.token_bytes(16)).decode()
    server_first = f"r={client_nonce}{secrets.token_hex(8)},s={salt},i=4096".encode()
    writer.write(wire.authentication(wire.AUTH_SASL_CONTINUE, server_first))
    await read_message(reader)  # the client's proof
    writer.write(wire.authentication(wire.AUTH_OK) + wire.ready_for_query())
    await writer.drain()
    await reader.read()


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind = await reader.readexactly(1)
    length = int.from_bytes(await reader.readexactly(4), "big")
    return kind, await reader.readexactly(length - 4)


async def test_authentication_ok_before_the_servers_scram_proof_is_refused() -> None:
    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ServerError, match="without completing SCRAM") as refused:
            await asyncio.wait_for(
                open_server(
                    "127.0.0.1",
                    port,
                    Credentials("app", "secret"),
                    "app",
                    session_init=(),
                    read_limit=False,
                    prepared_capacity=1,
                    security=TargetSecurity(),
                ),
                30,
            )
        assert refused.value.code == "28000"
    finally:
        server.close()


# -- TLS to the server, and how the password may travel ----------------------------------------

CLEARTEXT_USER, CERT_USER = "clear_user", "cert_user"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("server-ca"))


@pytest.fixture(scope="module")
def tls_pg(ca: TestCA) -> Iterator[PostgresCluster]:
    """PostgreSQL that takes TCP logins only over TLS, with a certificate for the loopback
    names: SCRAM for the app, a cleartext password for one user, a client certificate for
    another."""
    with PostgresCluster(
        tls=ca.issue("pg"),
        tls_required=True,
        client_ca_file=ca.ca_file,
        hba=(
            f"hostssl all {CLEARTEXT_USER} 127.0.0.1/32 password",
            f"hostssl all {CERT_USER} 127.0.0.1/32 cert",
        ),
    ) as cluster:
        for user in (APP_USER, CLEARTEXT_USER, CERT_USER):
            cluster.create_user(user, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        yield cluster


@pytest.fixture(scope="module")
def elsewhere_pg(ca: TestCA) -> Iterator[PostgresCluster]:
    """PostgreSQL whose certificate names db.example, not the address it is reached at."""
    with PostgresCluster(tls=ca.issue("elsewhere", ("db.example",))) as cluster:
        cluster.create_user(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        yield cluster


# A target refused for its TLS has no writer to wait for: clients hear why at once, well
# before connection_borrow_timeout.
REFUSED_WAIT = {"connection_borrow_timeout": 60}


@contextlib.contextmanager
def dbmux_to(
    server: PostgresCluster,
    folder: Path,
    tls: dict[str, Any],
    user: str = APP_USER,
    pool: dict[str, Any] | None = None,
) -> Iterator[EmbeddedDbmux]:
    """A dbmux in front of `server` with `target_group.tls` set to `tls`."""
    secret = folder / f"{user}.json"
    secret.write_text(json.dumps({"username": user, "password": APP_PASSWORD}))
    config = proxy_config(server, folder, pool or {}, [{"secret": f"file:{secret}"}])
    config["proxies"][0]["target_group"]["tls"] = tls
    with EmbeddedDbmux(config) as embedded:
        yield embedded


def query(embedded: EmbeddedDbmux, sql: str, user: str = APP_USER) -> tuple[Any, ...]:
    host, port = embedded.address()
    with psycopg.connect(
        host=host,
        port=port,
        user=user,
        password=APP_PASSWORD,
        dbname=APP_DB,
        sslmode="disable",
        connect_timeout=10,
    ) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return tuple(row)


OWN_TLS = "SELECT ssl, version, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def server_connections_of(embedded: EmbeddedDbmux) -> list[PgServer]:
    pools = embedded.proxy().pools.pools.values()
    return [conn for pool in pools for conn in pool.idle if isinstance(conn, PgServer)]


def test_verify_full_encrypts_the_server_connection(
    tls_pg: PostgresCluster, tmp_path: Path
) -> None:
    tls = {"mode": "verify-full", "ca_file": str(tls_pg.client_ca_file)}
    with dbmux_to(tls_pg, tmp_path, tls) as embedded:
        ssl_on, version, _ = query(embedded, OWN_TLS)
        assert ssl_on is True
        assert version in ("TLSv1.2", "TLSv1.3")
        # Bound to the TLS connection: a man in the middle with a certificate of his own
        # could not relay the exchange.
        assert [c.sasl_mechanism for c in server_connections_of(embedded)] == ["SCRAM-SHA-256-PLUS"]


def test_the_minimum_tls_version_is_kept(tls_pg: PostgresCluster, tmp_path: Path) -> None:
    tls = {"mode": "verify-full", "ca_file": str(tls_pg.client_ca_file), "min_version": "TLSv1.3"}
    with dbmux_to(tls_pg, tmp_path, tls) as embedded:
        assert query(embedded, OWN_TLS)[1] == "TLSv1.3"


def test_a_certificate_for_another_name_is_refused_under_verify_full(
    elsewhere_pg: PostgresCluster, ca: TestCA, tmp_path: Path
) -> None:
    tls = {"mode": "verify-full", "ca_file": str(ca.ca_file)}
    with dbmux_to(elsewhere_pg, tmp_path, tls, pool=REFUSED_WAIT) as e:
        with pytest.raises(
            psycopg.Error, match="certificate verify failed: IP address mismatch"
        ) as refused:
            query(e, "SELECT 1")
        assert "target_group.tls (mode verify-full)" in str(refused.value)
        instance = e.proxy().targets.instances[0]
        wait_until(lambda: instance.reason is HealthReason.AUTH_FAILURE, "an AUTH_FAILURE")


def test_server_name_is_the_name_checked_under_verify_full(
    elsewhere_pg: PostgresCluster, ca: TestCA, tmp_path: Path
) -> None:
    tls = {"mode": "verify-full", "ca_file": str(ca.ca_file), "server_name": "db.example"}
    with dbmux_to(elsewhere_pg, tmp_path, tls) as embedded:
        assert query(embedded, OWN_TLS)[0] is True


def test_verify_ca_checks_the_chain_but_not_the_name(
    elsewhere_pg: PostgresCluster, ca: TestCA, tmp_path: Path
) -> None:
    with dbmux_to(elsewhere_pg, tmp_path, {"mode": "verify-ca", "ca_file": str(ca.ca_file)}) as e:
        assert query(e, OWN_TLS)[0] is True


def test_a_certificate_of_an_unknown_ca_is_refused_under_verify_ca(
    tls_pg: PostgresCluster, tmp_path: Path
) -> None:
    stranger = TestCA(tmp_path / "stranger", name="stranger CA")
    tls = {"mode": "verify-ca", "ca_file": str(stranger.ca_file)}
    with dbmux_to(tls_pg, tmp_path, tls, pool=REFUSED_WAIT) as e:
        with pytest.raises(
            psycopg.Error,
            match="certificate verify failed: self-signed certificate in certificate chain",
        ):
            query(e, "SELECT 1")


def test_require_encrypts_without_checking_the_certificate(
    elsewhere_pg: PostgresCluster, tmp_path: Path
) -> None:
    with dbmux_to(elsewhere_pg, tmp_path, {"mode": "require"}) as embedded:
        assert query(embedded, OWN_TLS)[0] is True


def test_require_refuses_a_server_without_tls(pg: PostgresCluster, tmp_path: Path) -> None:
    with dbmux_to(pg, tmp_path, {"mode": "require"}, pool=REFUSED_WAIT) as embedded:
        with pytest.raises(psycopg.Error, match="does not accept TLS") as refused:
            query(embedded, "SELECT 1")
        assert "target_group.tls (mode require)" in str(refused.value)


def test_a_client_certificate_is_presented_when_configured(
    tls_pg: PostgresCluster, ca: TestCA, tmp_path: Path
) -> None:
    client = ca.issue("dbmux-client", (), common_name=CERT_USER, client=True)
    tls = {"mode": "verify-full", "ca_file": str(ca.ca_file), **client.as_tls()}
    with dbmux_to(tls_pg, tmp_path, tls, user=CERT_USER) as embedded:
        assert query(embedded, OWN_TLS, user=CERT_USER)[2] == f"/CN={CERT_USER}"


def test_a_cleartext_password_goes_over_tls(
    tls_pg: PostgresCluster, ca: TestCA, tmp_path: Path
) -> None:
    tls = {"mode": "verify-full", "ca_file": str(ca.ca_file)}
    with dbmux_to(tls_pg, tmp_path, tls, user=CLEARTEXT_USER) as embedded:
        assert query(embedded, "SELECT current_user", user=CLEARTEXT_USER) == (CLEARTEXT_USER,)


async def test_a_cancel_request_reaches_the_server_over_tls(
    tls_pg: PostgresCluster, ca: TestCA, tmp_path: Path
) -> None:
    with dbmux_to(tls_pg, tmp_path, {"mode": "verify-full", "ca_file": str(ca.ca_file)}) as e:
        host, port = e.address()
        conn = await asyncpg.connect(
            host=host, port=port, user=APP_USER, password=APP_PASSWORD, database=APP_DB, ssl=False
        )
        try:
            with pytest.raises(asyncio.TimeoutError):
                # On timeout asyncpg sends a CancelRequest with the key dbmux gave it.
                await conn.execute("SELECT pg_sleep(30)", timeout=0.5)
            # Served at once, so the sleep was cancelled.
            assert await conn.fetchval("SELECT 7", timeout=10) == 7
        finally:
            await conn.close()


async def cleartext_impostor(received: list[bytes]) -> asyncio.Server:
    """A "server" on plaintext that asks for the password in cleartext (and keeps it)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = int.from_bytes(await reader.readexactly(4), "big")
        await reader.readexactly(length - 4)  # the startup packet
        writer.write(wire.authentication(wire.AUTH_CLEARTEXT))
        try:
            _, password = await read_message(reader)
        except asyncio.IncompleteReadError:
            return  # refused: the client hung up
        received.append(password)
        writer.write(wire.authentication(wire.AUTH_OK) + wire.ready_for_query())
        await writer.drain()
        await reader.read()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def open_to(port: int, security: TargetSecurity) -> PgServer:
    return await asyncio.wait_for(
        open_server(
            "127.0.0.1",
            port,
            Credentials("app", "secret"),
            "app",
            session_init=(),
            read_limit=False,
            prepared_capacity=1,
            security=security,
        ),
        30,
    )


async def test_a_cleartext_password_is_not_sent_without_tls() -> None:
    received: list[bytes] = []
    server = await cleartext_impostor(received)
    try:
        with pytest.raises(ServerError, match="allow_cleartext_password") as refused:
            await open_to(server.sockets[0].getsockname()[1], TargetSecurity())
        assert refused.value.code == "28000"
        assert "secret" not in str(refused.value)
        assert received == []
    finally:
        server.close()


async def test_a_cleartext_password_without_tls_when_allowed() -> None:
    received: list[bytes] = []
    server = await cleartext_impostor(received)
    try:
        port = server.sockets[0].getsockname()[1]
        conn = await open_to(port, TargetSecurity(allow_cleartext_password=True))
        conn.close()
        assert received == [b"secret\0"]
    finally:
        server.close()
