"""A throwaway MariaDB server (mariadb-install-db, mariadbd), replication included, for the
demo, the tests and the benchmarks."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Self

from dbmux.testing.certs import CertFiles
from dbmux.testing.process import (
    HOST,
    CommandError,
    Server,
    ServerStartError,
    clean_env,
    find_binary,
    is_root,
    run,
    strip_final_newline,
    wait_until,
    with_log,
)


def _my_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _my_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _mysql_handshake(port: int) -> bool:
    """True once the server greets a TCP client (protocol 10), i.e. it accepts connections."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as s:
            s.settimeout(1.0)
            data = b""
            while len(data) < 5:
                chunk = s.recv(64)
                if not chunk:
                    return False
                data += chunk
            return data[4] == 0x0A
    except OSError:
        return False


class MariaDBServer(Server):
    """A throwaway MariaDB server on a free loopback port in a temp dir."""

    def __init__(
        self,
        *,
        max_connections: int = 50,
        root_password: str = "root",
        settings: dict[str, str] | None = None,
        port: int | None = None,
        tls: CertFiles | None = None,
        tls_required: bool = False,
        client_ca_file: Path | None = None,
    ) -> None:
        """`tls`: the server's certificate and key (TLS is off without them); with
        `tls_required`, TCP logins without TLS are refused (require_secure_transport). With
        `client_ca_file`, client certificates it signed are verified (accounts REQUIRE
        X509)."""
        if (tls_required or client_ca_file is not None) and tls is None:
            raise ValueError("tls_required and client_ca_file need tls (certificate and key)")
        sbin = ["/usr/sbin", "/usr/local/sbin", "/usr/libexec", "/usr/local/mysql/bin"]
        self._mariadbd = find_binary(["mariadbd", "mysqld"], sbin)
        self._install_db = find_binary(["mariadb-install-db", "mysql_install_db"], sbin)
        self._client = find_binary(["mariadb", "mysql"])
        super().__init__("dbmux-my-", port)
        self.max_connections = max_connections
        self.root_password = root_password
        self.settings = dict(settings or {})
        self.tls = tls
        self.tls_required = tls_required
        self.client_ca_file = client_ca_file
        self.data_dir = self.base_dir / "data"
        self.socket_path = self.base_dir / "mysql.sock"
        self.log_file = self.base_dir / "mariadb.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._secured = False  # root has its password and TCP accounts

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Install the data dir on first start, run mariadbd and wait until it serves SQL."""
        with self._lock:
            self._check_usable()
            if self.running:
                return self
            if not (self.data_dir / "mysql").is_dir():
                self._install()
            self._start_with_port_retry(self._start_once, self.log_file)
            return self

    def stop(self) -> None:
        """Normal shutdown (SIGTERM); the data dir is kept for the next start()."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.startup_timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
                    raise ServerStartError(
                        with_log("mariadbd ignored SIGTERM; killed it", self.log_file)
                    ) from None
            self._proc = None

    def kill(self) -> None:
        """SIGKILL mariadbd, like a crash; start() then runs InnoDB recovery."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._proc = None

    # -- replication

    def replica(self, **kwargs: object) -> MariaDBServer:
        """A server to replicate this one (start it, then `replicate_from(self)`). The primary
        must have been created with `primary_settings()` so that it writes a binlog."""
        settings = {**self.primary_settings(2), "read_only": "1"}
        return MariaDBServer(
            max_connections=self.max_connections,
            root_password=self.root_password,
            settings=settings,
            tls=self.tls,
            tls_required=self.tls_required,
            client_ca_file=self.client_ca_file,
            **kwargs,  # type: ignore[arg-type]  # the caller's settings, as the constructor takes
        )

    @staticmethod
    def primary_settings(server_id: int = 1) -> dict[str, str]:
        """Settings of a server that takes part in GTID replication."""
        return {
            "server_id": str(server_id),
            "log_bin": "mariadb-bin",
            "log_slave_updates": "1",
            "binlog_format": "ROW",
        }

    def replicate_from(self, primary: MariaDBServer) -> None:
        """Start GTID replication of what the primary writes from now on (both servers
        start from the same fresh install, so earlier writes are only their own setup)."""
        position = primary.sql("SELECT @@gtid_binlog_pos")
        self.sql(
            f"SET GLOBAL gtid_slave_pos = {_my_literal(position)}; CHANGE MASTER TO"
            f" MASTER_HOST={_my_literal(primary.host)}, MASTER_PORT={primary.port},"
            f" MASTER_USER='root', MASTER_PASSWORD={_my_literal(primary.root_password)},"
            f" MASTER_USE_GTID=slave_pos{', MASTER_SSL=1' if primary.tls else ''}; START SLAVE"
        )

    def wait_caught_up(self, primary: MariaDBServer, timeout: float = 30) -> None:
        """Wait until this replica has applied everything the primary has written."""
        position = primary.sql("SELECT @@gtid_binlog_pos")
        result = self.sql(f"SELECT MASTER_GTID_WAIT({_my_literal(position)}, {timeout})")
        if result.strip() != "0":
            raise ServerStartError(f"replica did not reach {position} within {timeout}s")

    def promote(self) -> None:
        """Make this replica the primary: stop replicating and accept writes."""
        self.sql("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0")

    def _shutdown_for_cleanup(self) -> None:
        self.kill()  # the data is about to be deleted; no need for a clean shutdown

    # -- SQL helpers

    def sql(
        self,
        sql: str,
        database: str | None = None,
        *,
        user: str = "root",
        password: str | None = None,
    ) -> str:
        """Run SQL with the mariadb client over TCP (-N -B, root by default); stdout.

        The first error stops the script and raises CommandError carrying the client's stderr.
        """
        if password is None and user == "root":
            password = self.root_password
        cmd = [
            self._client,
            "--no-defaults",
            "--protocol=TCP",
            f"--host={self.host}",
            f"--port={self.port}",
            f"--user={user}",
            "--connect-timeout=10",
            "-N",
            "-B",
        ]
        if self.tls is not None:
            cmd.append("--ssl")  # encrypted; the certificate is the tests' business
        if database is not None:
            cmd.append(f"--database={database}")
        return self._client_run(cmd, password, sql)

    def create_user(self, name: str, password: str, plugin: str = "mysql_native_password") -> None:
        """CREATE USER name@'%' (any loopback TCP client) authenticated by plugin."""
        if plugin == "ed25519":
            loaded = self.sql(
                "SELECT COUNT(*) FROM information_schema.PLUGINS"
                " WHERE PLUGIN_NAME = 'ed25519' AND PLUGIN_STATUS = 'ACTIVE'"
            )
            if loaded.strip() == "0":
                self.sql("INSTALL SONAME 'auth_ed25519'")
        self.sql(
            f"CREATE USER {_my_literal(name)}@'%'"
            f" IDENTIFIED VIA {plugin} USING PASSWORD({_my_literal(password)})"
        )

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE (utf8mb4), optionally granting ALL on it to owner@'%'."""
        self.sql(f"CREATE DATABASE {_my_ident(name)} CHARACTER SET utf8mb4")
        if owner is not None:
            self.sql(f"GRANT ALL PRIVILEGES ON {_my_ident(name)}.* TO {_my_literal(owner)}@'%'")

    # -- internals

    def _client_run(self, cmd: list[str], password: str | None, sql: str) -> str:
        env = clean_env(("MYSQL_", "MARIADB_"))
        if password is not None:
            env["MYSQL_PWD"] = password  # keeps it out of argv / ps
        return strip_final_newline(run(cmd, "mariadb", env=env, input=sql))

    def _innodb_options(self) -> list[str]:
        return [
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-file-size=16M",
            # io_uring/libaio are often unavailable or exhausted in containers and CI.
            "--innodb-use-native-aio=0",
        ]

    def _install(self) -> None:
        cmd = [
            self._install_db,
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--tmpdir={self.base_dir}",  # its own, not the /tmp other installs share
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
            *self._innodb_options(),
        ]
        if is_root():
            cmd.append("--user=root")
        try:
            run(cmd, "mariadb-install-db", env=clean_env(("MYSQL_",)), cwd=self.base_dir)
        except CommandError as exc:
            raise ServerStartError(str(exc)) from exc

    def _server_command(self) -> list[str]:
        cmd = [
            self._mariadbd,
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--port={self.port}",
            f"--bind-address={self.host}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.base_dir / 'mariadb.pid'}",
            f"--log-error={self.log_file}",
            f"--tmpdir={self.base_dir}",
            f"--max-connections={self.max_connections}",
            # Accounts are matched by IP (no DNS lookups, no 'localhost' aliasing for TCP).
            "--skip-name-resolve",
            # A proxy under test makes many failed connects; never block 127.0.0.1 for it.
            "--max-connect-errors=1000000000",
            "--innodb-flush-log-at-trx-commit=2",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            *self._innodb_options(),
            *self._tls_options(),
        ]
        if is_root():
            cmd.append("--user=root")
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in self.settings.items()]
        return cmd

    def _tls_options(self) -> list[str]:
        if self.tls is None:
            return []
        options = [f"--ssl-cert={self.tls.certificate_file}", f"--ssl-key={self.tls.key_file}"]
        if self.client_ca_file is not None:
            options.append(f"--ssl-ca={self.client_ca_file}")
        if self.tls_required:
            options.append("--require-secure-transport=ON")
        return options

    def _start_once(self) -> None:
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                self._server_command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.base_dir,
                env=clean_env(("MYSQL_",)),
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not its
            )
        proc = self._proc
        ready = wait_until(
            lambda: proc.poll() is not None or _mysql_handshake(self.port), self.startup_timeout
        )
        if proc.poll() is not None:
            self._proc = None
            raise ServerStartError(
                with_log(f"mariadbd exited with code {proc.returncode}", self.log_file)
            )
        if not ready:
            self.kill()
            raise ServerStartError(
                with_log(
                    f"mariadbd not accepting connections after {self.startup_timeout}s",
                    self.log_file,
                )
            )
        try:
            if not self._secured:
                self._secure_root()
            self.sql("SELECT 1")
        except CommandError as exc:
            self.kill()
            raise ServerStartError(with_log(str(exc), self.log_file)) from exc

    def _secure_root(self) -> None:
        """Give every root account the password and add root@'127.0.0.1' and root@'%'.

        mariadb-install-db leaves root@localhost, @127.0.0.1, @::1 and @<hostname> without a
        password; with --skip-name-resolve only root@localhost is reachable over the Unix
        socket, which is how we get in this one time.
        """
        socket_cmd = [
            self._client,
            "--no-defaults",
            f"--socket={self.socket_path}",
            "--user=root",
            "-N",
            "-B",
        ]
        rows = self._client_run(
            socket_cmd, None, "SELECT User, Host FROM mysql.user WHERE User IN ('root', '')"
        )
        pw = _my_literal(self.root_password)
        stmts = []
        for row in rows.splitlines():
            user, host = row.split("\t")
            account = f"{_my_literal(user)}@{_my_literal(host)}"
            if user == "" or host not in ("localhost", "127.0.0.1", "::1"):
                stmts.append(f"DROP USER {account};")  # anonymous / hostname-bound: unusable
            else:
                stmts.append(f"ALTER USER {account} IDENTIFIED BY {pw};")
        for host in ("127.0.0.1", "%"):
            account = f"'root'@{_my_literal(host)}"
            stmts.append(f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {pw};")
            stmts.append(f"GRANT ALL PRIVILEGES ON *.* TO {account} WITH GRANT OPTION;")
        stmts.append("FLUSH PRIVILEGES;")
        self._client_run(socket_cmd, None, "\n".join(stmts))
        self._secured = True
