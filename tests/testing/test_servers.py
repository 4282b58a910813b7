"""The throwaway servers of dbmux.testing, started for real: one PostgreSQL and one MariaDB
per module."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pymysql
import pytest

from dbmux.testing import CommandError, MariaDBServer, PostgresCluster, ServerStartError
from dbmux.testing.certs import TestCA


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ------------------------------------------------------------------------ PostgreSQL


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresCluster]:
    with PostgresCluster(max_connections=20) as cluster:
        yield cluster


class TestPostgresCluster:
    def test_settings_are_applied(self, pg: PostgresCluster) -> None:
        assert pg.psql("SHOW max_connections") == "20"
        assert pg.psql("SHOW listen_addresses") == "127.0.0.1"
        assert pg.psql("SHOW unix_socket_directories") == str(pg.base_dir)
        assert pg.psql("SHOW fsync") == "off"
        assert pg.port not in (5432, 3306)
        assert pg.host == "127.0.0.1"
        assert pg.data_dir.is_relative_to(pg.base_dir)

    def test_multiple_statements_and_rows(self, pg: PostgresCluster) -> None:
        out = pg.psql(
            "CREATE TEMP TABLE t (a int, b text); INSERT INTO t VALUES (1, 'x'), (2, 'y');"
            " SELECT a, b FROM t ORDER BY a;"
        )
        assert out.splitlines() == ["1|x", "2|y"]

    def test_sql_error_raises_with_stderr(self, pg: PostgresCluster) -> None:
        with pytest.raises(CommandError, match="no_such_table"):
            pg.psql("SELECT * FROM no_such_table")

    def test_scram_is_enforced(self, pg: PostgresCluster) -> None:
        assert pg.psql("SHOW password_encryption") == "scram-sha-256"
        stored = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
        assert stored.startswith("SCRAM-SHA-256$")
        with pytest.raises(CommandError, match="password authentication failed"):
            pg.psql("SELECT 1", password="wrong")
        with pytest.raises(CommandError):
            pg.psql("SELECT 1", password="")

    def test_create_user_and_database(self, pg: PostgresCluster) -> None:
        pg.create_user("app user", "s3cret'pw")
        pg.create_database("app db", owner="app user")
        who = pg.psql(
            "CREATE TABLE items (id int); INSERT INTO items VALUES (7);"
            " SELECT current_user, current_database(), (SELECT id FROM items);",
            dbname="app db",
            user="app user",
            password="s3cret'pw",
        )
        assert who == "app user|app db|7"
        assert pg.psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'app user'") == "f"
        with pytest.raises(CommandError, match="password authentication failed"):
            pg.psql("SELECT 1", dbname="app db", user="app user", password="nope")

    def test_create_superuser(self, pg: PostgresCluster) -> None:
        pg.create_user("admin2", "pw2", superuser=True)
        assert pg.psql("SELECT rolsuper FROM pg_roles WHERE rolname = 'admin2'") == "t"

    def test_dsn_works_with_a_real_client(self, pg: PostgresCluster) -> None:
        pg.create_user("dsn:user", "p@ss/w rd")
        dsn = pg.dsn("dsn:user", "p@ss/w rd", dbname="postgres")
        assert dsn.startswith(f"postgresql://dsn%3Auser:p%40ss%2Fw%20rd@127.0.0.1:{pg.port}/")
        psql = str(Path(pg._tool("psql")))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        for url, user in ((dsn, "dsn:user"), (pg.dsn(), "postgres")):
            out = subprocess.run(
                [psql, "-X", "-At", "-c", "SELECT current_user", url],
                capture_output=True,
                text=True,
                env=env,
                check=True,
                timeout=30,
            ).stdout.strip()
            assert out == user

    def test_stop_and_start_keeps_data(self, pg: PostgresCluster) -> None:
        pg.psql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives restart')")
        port = pg.port
        pg.stop()
        assert not pg.running
        pg.stop()  # idempotent
        with pytest.raises(CommandError):
            pg.psql("SELECT 1")
        pg.start()
        assert pg.running
        assert pg.port == port
        assert pg.psql("SELECT v FROM kept") == "survives restart"

    def test_kill_then_start_recovers(self, pg: PostgresCluster) -> None:
        # synchronous_commit is off cluster-wide for speed; a crash may lose such commits.
        pg.psql(
            "SET synchronous_commit = on; CREATE TABLE crashed (v int); "
            "INSERT INTO crashed VALUES (42)"
        )
        pid = pg._postmaster_pid()
        assert pid is not None
        pg.kill()
        assert not pg.running
        assert not _pid_alive(pid)
        pg.start()
        assert pg.psql("SELECT v FROM crashed") == "42"
        assert "automatic recovery in progress" in pg.log_file.read_text()


def test_postgres_replica_streams_and_takes_over_when_promoted() -> None:
    with PostgresCluster() as primary:
        primary.psql(
            "SET synchronous_commit = on; CREATE TABLE r (v int); INSERT INTO r VALUES (1)"
        )
        with primary.replica() as replica:
            assert replica.psql("SELECT pg_is_in_recovery()") == "t"
            with pytest.raises(CommandError, match="read-only"):
                replica.psql("INSERT INTO r VALUES (2)")
            primary.stop()
            replica.promote()
            replica.psql("INSERT INTO r VALUES (2)")
            assert replica.psql("SELECT pg_is_in_recovery(), count(*) FROM r") == "f|2"


def _occupy(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_postgres_lost_port_race_then_cleanup_leaves_nothing() -> None:
    cluster = PostgresCluster(max_connections=5)
    taken = cluster.port
    with _occupy(taken), cluster:  # someone grabbed the port we picked: we pick another
        assert cluster.port != taken
        assert cluster.psql("SHOW port") == str(cluster.port)
        pid = cluster._postmaster_pid()
        assert pid is not None and _pid_alive(pid)
        base = cluster.base_dir
    assert not base.exists()
    assert not _pid_alive(pid)
    cluster.cleanup()  # idempotent
    with pytest.raises(ServerStartError):
        cluster.start()


def test_postgres_explicit_port_in_use_fails_with_log_tail() -> None:
    with _occupy(0) as s:
        cluster = PostgresCluster(port=s.getsockname()[1])
        try:
            with pytest.raises(ServerStartError, match=r"(?s)last lines of.*already in use"):
                cluster.start()
            assert not cluster.running
        finally:
            cluster.cleanup()


def test_postgres_start_failure_reports_log_tail() -> None:
    cluster = PostgresCluster(settings={"shared_buffers": "lots"})
    try:
        with pytest.raises(ServerStartError) as info:
            cluster.start()
        assert "shared_buffers" in str(info.value)
        assert "last lines of" in str(info.value)
        assert not cluster.running
    finally:
        cluster.cleanup()
    assert not cluster.base_dir.exists()


# --------------------------------------------------------------------------- MariaDB


@pytest.fixture(scope="module")
def my() -> Iterator[MariaDBServer]:
    with MariaDBServer(max_connections=20, root_password="r00t'pw") as server:
        yield server


class TestMariaDBServer:
    def test_settings_are_applied(self, my: MariaDBServer) -> None:
        assert my.sql("SELECT @@max_connections") == "20"
        assert my.sql("SELECT @@bind_address, @@port") == f"127.0.0.1\t{my.port}"
        assert my.sql("SELECT @@socket") == str(my.socket_path)
        assert my.sql("SELECT @@innodb_flush_log_at_trx_commit") == "2"
        assert my.port not in (5432, 3306)

    def test_root_over_tcp_needs_the_password(self, my: MariaDBServer) -> None:
        assert my.sql("SELECT CURRENT_USER()") == "root@127.0.0.1"
        with pytest.raises(CommandError, match="Access denied"):
            my.sql("SELECT 1", password="wrong")
        with pytest.raises(CommandError, match="Access denied"):
            my.sql("SELECT 1", password="")
        assert my.sql("SELECT COUNT(*) FROM mysql.user WHERE User = ''") == "0"

    def test_sql_error_raises_with_stderr(self, my: MariaDBServer) -> None:
        with pytest.raises(CommandError, match="doesn't exist"):
            my.sql("SELECT * FROM mysql.no_such_table")

    def test_create_user_and_database(self, my: MariaDBServer) -> None:
        my.create_user("app", "app'pw")
        my.create_database("appdb", owner="app")
        out = my.sql(
            "CREATE TABLE t (id INT PRIMARY KEY); INSERT INTO t VALUES (5);"
            " SELECT CURRENT_USER(), DATABASE(), (SELECT id FROM t);",
            "appdb",
            user="app",
            password="app'pw",
        )
        assert out == "app@%\tappdb\t5"
        plugin = my.sql("SELECT plugin FROM mysql.user WHERE User = 'app'")
        assert plugin == "mysql_native_password"
        with pytest.raises(CommandError, match="Access denied"):
            my.sql("SELECT 1", user="app", password="bad")

    def test_create_user_ed25519(self, my: MariaDBServer) -> None:
        my.create_user("edu", "ed pw", plugin="ed25519")
        assert my.sql("SELECT CURRENT_USER()", user="edu", password="ed pw") == "edu@%"
        with pytest.raises(CommandError, match="Access denied"):
            my.sql("SELECT 1", user="edu", password="bad")

    def test_stop_and_start_keeps_data(self, my: MariaDBServer) -> None:
        my.sql(
            "CREATE DATABASE kept; CREATE TABLE kept.t (v TEXT); "
            "INSERT INTO kept.t VALUES ('survives restart')"
        )
        my.stop()
        assert not my.running
        my.stop()  # idempotent
        with pytest.raises(CommandError):
            my.sql("SELECT 1")
        my.start()
        assert my.sql("SELECT v FROM kept.t") == "survives restart"

    def test_kill_then_start_recovers(self, my: MariaDBServer) -> None:
        # innodb_flush_log_at_trx_commit=2 writes the log at commit: it survives a kill.
        my.sql(
            "CREATE DATABASE crash; CREATE TABLE crash.t (v INT) ENGINE=InnoDB; "
            "INSERT INTO crash.t VALUES (42)"
        )
        my.kill()
        assert not my.running
        my.start()
        assert my.sql("SELECT v FROM crash.t") == "42"


def test_mariadb_lost_port_race_then_cleanup_leaves_nothing() -> None:
    server = MariaDBServer()
    taken = server.port
    with _occupy(taken), server:  # someone grabbed the port we picked: we pick another
        assert server.port != taken
        assert server.sql("SELECT @@port") == str(server.port)
        proc = server._proc
        assert proc is not None and _pid_alive(proc.pid)
        base = server.base_dir
    assert not base.exists()
    assert proc.poll() is not None
    server.cleanup()  # idempotent
    with pytest.raises(ServerStartError):
        server.start()


def test_mariadb_start_failure_reports_log_tail() -> None:
    server = MariaDBServer(settings={"no_such_option": "1"})
    try:
        with pytest.raises(ServerStartError) as info:
            server.start()
        assert "no-such-option" in str(info.value)
        assert not server.running
    finally:
        server.cleanup()
    assert not server.base_dir.exists()


# ------------------------------------------------------------------------------- TLS


def test_postgres_with_tls_required_refuses_plaintext_tcp_logins(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    with PostgresCluster(tls=ca.issue("pg"), tls_required=True) as cluster:
        common = {"host": cluster.host, "port": cluster.port, "password": cluster.password}
        common |= {"user": cluster.superuser, "dbname": "postgres", "connect_timeout": 10}
        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            psycopg.connect(sslmode="disable", **common)
        with psycopg.connect(sslmode="verify-full", sslrootcert=str(ca.ca_file), **common) as c:
            row = c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
            assert row == (True,)
        assert cluster.psql("SELECT 1") == "1"  # the helper itself goes over TLS


def test_mariadb_with_tls_required_refuses_plaintext_tcp_logins(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    with MariaDBServer(tls=ca.issue("my"), tls_required=True) as server:
        common = {"host": server.host, "port": server.port, "user": "root"}
        common |= {"password": server.root_password, "connect_timeout": 10}
        # MariaDB 10.11 refuses it as a wrong password would be (MySQL says ERR 3159).
        with pytest.raises(pymysql.MySQLError, match="Access denied"):
            pymysql.connect(ssl_disabled=True, **common)
        with pymysql.connect(ssl={"ca": str(ca.ca_file)}, **common) as conn, conn.cursor() as cur:
            cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            row = cur.fetchone()
            assert row is not None and row[1] != ""
        assert server.sql("SELECT 1") == "1"  # the helper itself goes over TLS


def test_tls_options_need_a_certificate() -> None:
    with pytest.raises(ValueError, match="need tls"):
        PostgresCluster(tls_required=True)
    with pytest.raises(ValueError, match="need tls"):
        MariaDBServer(tls_required=True)
