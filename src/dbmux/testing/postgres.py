"""A throwaway PostgreSQL cluster (initdb, pg_ctl) for the demo, the tests and the benchmarks.

PostgreSQL refuses to run as root, so when we are root its tools run as the ``postgres`` OS user
via ``runuser``; otherwise they run directly as the current user.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Self
from urllib.parse import quote

from dbmux.testing.certs import CertFiles
from dbmux.testing.process import (
    COMMAND_TIMEOUT,
    CommandError,
    Server,
    ServerStartError,
    alive,
    clean_env,
    find_binary,
    is_root,
    kill_tree,
    run,
    strip_final_newline,
    with_log,
)


@functools.cache
def _pg_bindir() -> Path:
    """PostgreSQL server binaries: $DBMUX_PG_BINDIR, pg_config --bindir, newest Debian install."""
    candidates: list[Path] = []
    if os.environ.get("DBMUX_PG_BINDIR"):
        candidates.append(Path(os.environ["DBMUX_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            candidates.append(Path(out))

    def version(p: Path) -> float:
        try:
            return float(p.parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for c in candidates:
        if all((c / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return c
    raise ServerStartError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) not found; "
        "install the postgresql package or set DBMUX_PG_BINDIR"
    )


def _postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServerStartError(
            "running as root but there is no 'postgres' OS user to run PostgreSQL as"
        ) from None


def _pg_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PostgresCluster(Server):
    """A throwaway PostgreSQL cluster on a free loopback port in a temp dir.

    Durability is traded for speed (fsync, synchronous_commit and full_page_writes off). Note
    that with synchronous_commit off even a server crash (kill()) may lose the last commits,
    and synchronous replication does not wait either: crash and failover tests that count
    acknowledged commits pass settings={"synchronous_commit": "on"} (or SET it per session).
    """

    def __init__(
        self,
        *,
        max_connections: int = 50,
        auth_method: str = "scram-sha-256",
        superuser: str = "postgres",
        password: str = "postgres",
        settings: dict[str, str] | None = None,
        port: int | None = None,
        replica_of: PostgresCluster | None = None,
        tls: CertFiles | None = None,
        tls_required: bool = False,
        client_ca_file: Path | None = None,
        hba: tuple[str, ...] = (),
    ) -> None:
        """`tls`: the server's certificate and key (TLS is off without them); with
        `tls_required`, TCP logins without TLS are refused (pg_hba hostssl only). With
        `client_ca_file`, client certificates it signed are verified (pg_hba `cert` lines,
        given in `hba`, come before the others)."""
        if "\n" in password or "\r" in password:
            raise ValueError("password must be a single line (initdb reads it from a file)")
        if (tls_required or client_ca_file is not None) and tls is None:
            raise ValueError("tls_required and client_ca_file need tls (certificate and key)")
            raise ValueError("password must be a single line (initdb reads it from a file)")
        self._bindir = _pg_bindir()
        if is_root():
            account = _postgres_account()
            self._runuser: list[str] = [
                find_binary(["runuser"], ["/usr/sbin", "/sbin"]),
                "-u",
                "postgres",
                "--",
            ]
            self._owner: tuple[int, int] | None = (account.pw_uid, account.pw_gid)
        else:
            self._runuser, self._owner = [], None
        super().__init__("dbmux-pg-", port)
        if self._owner is not None:
            os.chown(self.base_dir, *self._owner)
        self.max_connections = max_connections
        self.auth_method = auth_method
        self.superuser = superuser
        self.password = password
        self.settings = dict(settings or {})
        self.replica_of = replica_of
        self.tls = tls
        self.tls_required = tls_required
        self.client_ca_file = client_ca_file
        self.hba = hba
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self._stale_shm: list[tuple[int, int]] = []  # (key, shmid) of crashed postmasters

    # -- lifecycle

    @property
    def running(self) -> bool:
        """True if the postmaster recorded in postmaster.pid is alive and is ours.

        A postmaster's working directory is its data dir; checking it means a recycled pid
        (say, a backend of the system PostgreSQL) is never mistaken for ours and killed.
        """
        pid = self._postmaster_pid()
        if pid is None or not alive(pid):
            return False
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")) == self.data_dir.resolve()
        except PermissionError:
            return False  # another user's process; ours run as us or as postgres (when root)
        except OSError:
            return not Path("/proc/self").exists()  # not Linux: trust the pid

    def start(self) -> Self:
        """initdb on first start, then pg_ctl start -w; a later start reuses data dir and port."""
        with self._lock:
            self._check_usable()
            if self.running:
                return self
            if not (self.data_dir / "PG_VERSION").exists():
                shutil.rmtree(self.data_dir, ignore_errors=True)  # an interrupted initdb
                if self.replica_of is not None:
                    self._base_backup(self.replica_of)
                else:
                    self._initdb()
            self._clear_stale_lockfiles()
            self._start_with_port_retry(self._start_once, self.log_file)
            return self

    def stop(self, mode: str = "fast") -> None:
        """Shut down cleanly (pg_ctl stop -m MODE); the data dir is kept for the next start()."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        with self._lock:
            if not self.running:
                return
            t = int(self.startup_timeout)
            cmd = [self._tool("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w"]
            try:
                self._run_tool([*cmd, "-t", str(t), "-s"], "pg_ctl stop", timeout=t + 30)
            except CommandError as exc:
                if self.running:
                    raise ServerStartError(with_log(str(exc), self.log_file)) from exc

    def kill(self, before: Callable[[], None] | None = None) -> None:
        """SIGKILL the postmaster and its backends, like a crash; start() then runs recovery.

        before: called right before the signals are sent (the failover drill times the crash
        from that moment); not called if the cluster is not running.
        """
        with self._lock:
            pid = self._postmaster_pid()
            if pid is not None and self.running:
                kill_tree(pid, before=before)
            self._clear_stale_lockfiles()

    def replica(self, **kwargs: object) -> PostgresCluster:
        """A streaming replica of this (running) cluster, same accounts: pg_basebackup -R."""
        return PostgresCluster(
            max_connections=self.max_connections,
            auth_method=self.auth_method,
            superuser=self.superuser,
            password=self.password,
            replica_of=self,
            tls=self.tls,
            tls_required=self.tls_required,
            client_ca_file=self.client_ca_file,
            hba=self.hba,
            **kwargs,  # type: ignore[arg-type]  # the caller's settings, as the constructor takes
        )

    def promote(self) -> None:
        """End recovery: the replica becomes a primary (pg_ctl promote -w)."""
        cmd = [self._tool("pg_ctl"), "promote", "-D", str(self.data_dir), "-w", "-s"]
        self._run_tool(cmd, "pg_ctl promote")

    def _base_backup(self, primary: PostgresCluster) -> None:
        self.data_dir.mkdir(mode=0o700)
        self._give_to_postgres(self.data_dir)
        cmd = [
            self._tool("pg_basebackup"),
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            primary.superuser,
            "-D",
            str(self.data_dir),
            "-R",  # standby.signal and primary_conninfo
            "--checkpoint=fast",  # not a spread checkpoint: minutes on an idle cluster
            "-X",
            "stream",
            "--no-sync",
        ]
        env = clean_env(("PG", "LC_"), LANG="C", LC_ALL="C", PGPASSWORD=primary.password)
        try:
            run([*self._runuser, *cmd], "pg_basebackup", env=env, cwd=self.base_dir)
        except CommandError as exc:
            raise ServerStartError(str(exc)) from exc

    def _shutdown_for_cleanup(self) -> None:
        try:
            self.stop("immediate")  # the data is about to be deleted; skip the checkpoint
        except Exception:
            self.kill()
        self._drop_stale_shared_memory()

    # -- SQL helpers

    def dsn(
        self, user: str | None = None, password: str | None = None, dbname: str = "postgres"
    ) -> str:
        """libpq URL; defaults to the superuser and its password."""
        if user is None:
            user = self.superuser
            password = self.password if password is None else password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def psql(
        self,
        sql: str,
        dbname: str = "postgres",
        *,
        user: str | None = None,
        password: str | None = None,
    ) -> str:
        """Run SQL with psql -At over TCP (superuser by default); stdout minus final newline.

        Statements run one by one (so CREATE DATABASE may follow other statements) and the
        first error stops the script and raises CommandError carrying psql's stderr.
        """
        if user is None:
            user = self.superuser
            password = self.password if password is None else password
        conninfo = " ".join(
            f"{k}={_conninfo_value(v)}"
            for k, v in {
                "host": self.host,
                "port": str(self.port),
                "user": user,
                "dbname": dbname,
                "sslmode": "require" if self.tls is not None else "disable",
                "connect_timeout": "10",
            }.items()
        )
        env = clean_env(("PG",), PGCLIENTENCODING="UTF8")
        if password is not None:
            env["PGPASSWORD"] = password
        cmd = [self._tool("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]
        out = run([*cmd, "-d", conninfo, "-f", "-"], "psql", env=env, input=sql)
        return strip_final_newline(out)

    def create_user(self, name: str, password: str, *, superuser: bool = False) -> None:
        """CREATE ROLE ... LOGIN with a password hashed per the cluster's auth method."""
        extra = " SUPERUSER" if superuser else ""
        self.psql(f"CREATE ROLE {_pg_ident(name)} LOGIN PASSWORD {_pg_literal(password)}{extra}")

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE, optionally owned by a role (which may then create tables in it)."""
        owned = f" OWNER {_pg_ident(owner)}" if owner else ""
        self.psql(f"CREATE DATABASE {_pg_ident(name)}{owned}")

    # -- internals

    def _tool(self, name: str) -> str:
        return str(self._bindir / name)

    def _run_tool(self, cmd: list[str], what: str, *, timeout: float = COMMAND_TIMEOUT) -> str:
        env = clean_env(("PG", "LC_"), LANG="C", LC_ALL="C")  # English messages, no PGDATA
        return run([*self._runuser, *cmd], what, env=env, cwd=self.base_dir, timeout=timeout)

    def _give_to_postgres(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, *self._owner)

    def _initdb(self) -> None:
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._give_to_postgres(pwfile)
        cmd = [
            self._tool("initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.superuser,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            f"--auth-host={self.auth_method}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        try:
            self._run_tool(cmd, "initdb")
        except CommandError as exc:
            raise ServerStartError(str(exc)) from exc
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# dbmux.testing: rewritten before every start\ninclude 'dbmux.conf'\n")

    def _write_conf(self) -> None:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "max_connections": str(self.max_connections),
            "unix_socket_directories": str(self.base_dir),
            # Throwaway data: durability only costs time.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "md5" if self.auth_method == "md5" else "scram-sha-256",
            **self._tls_settings(),
            **self.settings,
        }
        path = self.data_dir / "dbmux.conf"
        path.write_text("".join(f"{k} = {_pg_literal(v)}\n" for k, v in settings.items()))
        self._give_to_postgres(path)
        self._write_hba()

    def _tls_settings(self) -> dict[str, str]:
        """ssl on, with copies of the files PostgreSQL may read (it runs as postgres, and
        refuses a key file others can read)."""
        if self.tls is None:
            return {}
        copies = {"ssl_cert_file": self.tls.certificate_file, "ssl_key_file": self.tls.key_file}
        if self.client_ca_file is not None:
            copies["ssl_ca_file"] = self.client_ca_file
        settings = {"ssl": "on"}
        for name, source in copies.items():
            target = self.base_dir / f"{name}.pem"
            shutil.copyfile(source, target)
            target.chmod(0o600)
            self._give_to_postgres(target)
            settings[name] = str(target)
        return settings

    def _write_hba(self) -> None:
        """initdb's pg_hba.conf (local trust, loopback TCP with the auth method), TCP lines
        hostssl only when TLS is required, and `hba` first."""
        kind = "hostssl" if self.tls_required else "host"
        lines = [*self.hba, "local all all trust", "local replication all trust"]
        for database in ("all", "replication"):
            for network in ("127.0.0.1/32", "::1/128"):
                lines.append(f"{kind} {database} all {network} {self.auth_method}")
        if self.tls_required:
            lines.append("hostnossl all all all reject")
        path = self.data_dir / "pg_hba.conf"
        path.write_text("\n".join(lines) + "\n")
        self._give_to_postgres(path)

    def _start_once(self) -> None:
        self._write_conf()
        t = int(self.startup_timeout)
        cmd = [self._tool("pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(self.log_file)]
        try:
            self._run_tool([*cmd, "-w", "-t", str(t), "-s"], "pg_ctl start", timeout=t + 30)
        except CommandError as exc:
            if self.running:  # pg_ctl gave up but a postmaster is half up: don't leak it
                self.kill()
            raise ServerStartError(with_log(str(exc), self.log_file)) from exc

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _clear_stale_lockfiles(self) -> None:
        """Remove postmaster.pid and socket lock files left by a dead postmaster.

        PostgreSQL removes stale lock files itself, unless the dead postmaster is still a
        zombie (its pid "exists"), which happens when init reaps orphans lazily, as in some
        containers and VMs. The SysV segment it names is remembered for cleanup(); if orphaned
        backends still used it, the next postmaster would refuse to start, as it should.
        """
        pidfile = self.data_dir / "postmaster.pid"
        if self.running or not pidfile.exists():
            return
        with contextlib.suppress(IndexError, ValueError, OSError):
            key, shmid = (int(x) for x in pidfile.read_text().splitlines()[6].split())
            self._stale_shm.append((key, shmid))
        for lock in self.base_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)

    def _drop_stale_shared_memory(self) -> None:
        """After a crash PostgreSQL's small SysV segment outlives it; remove it if unused."""
        self._clear_stale_lockfiles()
        try:
            table = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
        except OSError:
            return
        for row in table:
            cols = row.split()  # key shmid perms size cpid lpid nattch ...
            if (int(cols[0]), int(cols[1])) in self._stale_shm and cols[6] == "0":
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(["ipcrm", "-m", cols[1]], capture_output=True, timeout=10)
        self._stale_shm.clear()
