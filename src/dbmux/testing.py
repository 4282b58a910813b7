"""Throwaway PostgreSQL and MariaDB servers for the demo, the tests and the benchmarks.

This is the single way dbmux gets a real database to talk to, so it favours being boring:
every server lives in its own temp dir on a free 127.0.0.1 port (its Unix socket in that temp
dir too), never touches a system server, and is torn down by ``cleanup()``, by ``with``, or at
interpreter exit. SQL helpers shell out to ``psql`` / ``mariadb`` so this module imports without
any database driver (``dbmux demo`` uses it before drivers matter).

PostgreSQL refuses to run as root, so when we are root its tools run as the ``postgres`` OS user
via ``runuser``; otherwise they run directly as the current user.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

__all__ = ["CommandError", "MariaDBServer", "PostgresCluster", "ServerError"]

HOST = "127.0.0.1"
_LOG_TAIL_LINES = 40
_COMMAND_TIMEOUT = 120.0  # seconds for one psql/mariadb client run
_PORT_IN_USE = re.compile(r"already in use|Bind on TCP/IP port|errno: 98", re.IGNORECASE)


class ServerError(RuntimeError):
    """A throwaway server could not be set up, started or stopped."""


class CommandError(RuntimeError):
    """A command-line client (psql, mariadb) or server tool exited with an error."""

    def __init__(self, what: str, returncode: int, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{what} failed (exit {returncode}): {stderr.strip()}")


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    """A port nobody listens on right now (the caller retries if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _is_root() -> bool:
    return os.geteuid() == 0


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _with_log(message: str, log: Path) -> str:
    return f"{message}\n--- last lines of {log} ---\n{_tail(log)}"


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, pgrp) of a live-or-zombie process, None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.find("(") + 1 : raw.rfind(")")]
    state, ppid, pgrp = raw[raw.rfind(")") + 2 :].split()[:3]
    return comm, state, int(ppid), int(pgrp)


def _alive(pid: int) -> bool:
    """True if pid is a running (not zombie) process; zombies hold no memory or sockets."""
    if not Path("/proc/self/stat").exists():  # not Linux: best effort
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    info = _proc_stat(pid)
    return info is not None and info[1] not in ("Z", "X")


def _process_tree(root: int) -> set[int]:
    """root plus every live descendant and member of its process group."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self").exists() else ():
        if entry.name.isdigit():
            info = _proc_stat(int(entry.name))
            if info is not None and info[1] not in ("Z", "X"):
                table[int(entry.name)] = (info[2], info[3])
    found = {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, pgrp) in table.items():
            if pid not in found and (ppid in found or pgrp == root):
                found.add(pid)
                changed = True
    return found


def _kill_tree(root: int, timeout: float = 15.0, before: Callable[[], None] | None = None) -> None:
    """SIGKILL a process and everything it started, and wait until all of them are gone.

    All are stopped first, so none sees another die and reacts (a PostgreSQL backend would
    flush what it had buffered and say goodbye): a crash of the whole host, where no server
    process sends a last word.

    before: called once the tree is known, right before the first signal (a caller timing
    the crash should not count the scan of /proc).
    """
    pids = _process_tree(root)
    if before is not None:
        before()

    def signal_all(sig: signal.Signals) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    signal_all(signal.SIGSTOP)
    pids |= _process_tree(root)  # children forked before the root stopped
    signal_all(signal.SIGSTOP)
    signal_all(signal.SIGKILL)
    if not _wait_until(lambda: not any(_alive(p) for p in pids), timeout):
        raise ServerError(f"processes {sorted(p for p in pids if _alive(p))} survived SIGKILL")


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def _find_binary(names: Iterable[str], dirs: Iterable[Path | str] = ()) -> str:
    names = list(names)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    for d in dirs:
        for name in names:
            candidate = Path(d) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise ServerError(f"none of {names} found on PATH or in {[str(d) for d in dirs]}")


def _temp_base() -> Path:
    """Where to put temp dirs: short enough for Unix socket paths, reachable by postgres."""
    base = Path(tempfile.gettempdir()).resolve()
    if len(str(base)) > 60:  # sun_path is 108 bytes; leave room for dir and socket names
        return Path("/tmp")
    if _is_root():
        for part in (base, *base.parents):
            if not part.stat().st_mode & stat.S_IXOTH:  # postgres could not traverse it
                return Path("/tmp")
    return base


def _clean_env(drop_prefixes: tuple[str, ...], **extra: str) -> dict[str, str]:
    """os.environ minus variables that would redirect a client or tool to another server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env.update(extra)
    return env


def _run(
    cmd: list[str],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    cwd: Path | None = None,
    timeout: float = _COMMAND_TIMEOUT,
) -> str:
    try:
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(what, -1, f"timed out after {timeout}s") from exc
    if proc.returncode != 0:
        raise CommandError(what, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout


def _strip_final_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


# ------------------------------------------------------------------ exit-time cleanup

_live: set[_Server] = set()
_live_lock = threading.Lock()


@atexit.register
def _cleanup_all() -> None:
    """An interrupted test run (Ctrl-C, failed session) must not leave servers behind."""
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.cleanup()


class _Server:
    """Temp-dir bookkeeping, exit-time cleanup and context management shared by both engines."""

    host: str = HOST
    port: int
    data_dir: Path
    base_dir: Path
    startup_timeout: float = 60.0

    def __init__(self, prefix: str, port: int | None) -> None:
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()  # a forked child must not clean up its parent's servers
        self._cleaned = False
        self._auto_port = port is None
        self.port = port if port is not None else _free_port()
        self.base_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=_temp_base()))
        with _live_lock:
            _live.add(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, base_dir={str(self.base_dir)!r})"

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self) -> Self:
        raise NotImplementedError

    def _check_usable(self) -> None:
        if self._cleaned:
            raise ServerError(f"{self!r} was cleaned up; create a new one")

    def _shutdown_for_cleanup(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Stop the server if it runs and delete its temp dir; safe to call any number of times."""
        with self._lock:
            if self._cleaned or os.getpid() != self._owner_pid:
                return
            try:
                self._shutdown_for_cleanup()
            finally:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self._cleaned = True
                with _live_lock:
                    _live.discard(self)

    def _start_with_port_retry(self, start_once: Callable[[], None], log: Path) -> None:
        """Start; if we picked the port ourselves and lost the race for it, pick another."""
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            offset = _size(log)
            try:
                start_once()
                self._auto_port = False  # restarts keep the port clients were told about
                return
            except ServerError:
                lost_port = _PORT_IN_USE.search(_read_from(log, offset))
                if not (lost_port and attempt + 1 < attempts):
                    raise
                self.port = _free_port()


# ------------------------------------------------------------------------ PostgreSQL


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
    raise ServerError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) not found; "
        "install the postgresql package or set DBMUX_PG_BINDIR"
    )


def _postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError(
            "running as root but there is no 'postgres' OS user to run PostgreSQL as"
        ) from None


def _pg_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PostgresCluster(_Server):
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
    ) -> None:
        if "\n" in password or "\r" in password:
            raise ValueError("password must be a single line (initdb reads it from a file)")
        self._bindir = _pg_bindir()
        if _is_root():
            account = _postgres_account()
            self._runuser: list[str] = [
                _find_binary(["runuser"], ["/usr/sbin", "/sbin"]),
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
        if pid is None or not _alive(pid):
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
                    raise ServerError(_with_log(str(exc), self.log_file)) from exc

    def kill(self, before: Callable[[], None] | None = None) -> None:
        """SIGKILL the postmaster and its backends, like a crash; start() then runs recovery.

        before: called right before the signals are sent (the failover drill times the crash
        from that moment); not called if the cluster is not running.
        """
        with self._lock:
            pid = self._postmaster_pid()
            if pid is not None and self.running:
                _kill_tree(pid, before=before)
            self._clear_stale_lockfiles()

    def replica(self, **kwargs: object) -> PostgresCluster:
        """A streaming replica of this (running) cluster, same accounts: pg_basebackup -R."""
        return PostgresCluster(
            max_connections=self.max_connections,
            auth_method=self.auth_method,
            superuser=self.superuser,
            password=self.password,
            replica_of=self,
            **kwargs,  # type: ignore[arg-type]
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
        env = _clean_env(("PG", "LC_"), LANG="C", LC_ALL="C", PGPASSWORD=primary.password)
        try:
            _run([*self._runuser, *cmd], "pg_basebackup", env=env, cwd=self.base_dir)
        except CommandError as exc:
            raise ServerError(str(exc)) from exc

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
                "sslmode": "disable",
                "connect_timeout": "10",
            }.items()
        )
        env = _clean_env(("PG",), PGCLIENTENCODING="UTF8")
        if password is not None:
            env["PGPASSWORD"] = password
        cmd = [self._tool("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]
        out = _run([*cmd, "-d", conninfo, "-f", "-"], "psql", env=env, input=sql)
        return _strip_final_newline(out)

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

    def _run_tool(self, cmd: list[str], what: str, *, timeout: float = _COMMAND_TIMEOUT) -> str:
        env = _clean_env(("PG", "LC_"), LANG="C", LC_ALL="C")  # English messages, no PGDATA
        return _run([*self._runuser, *cmd], what, env=env, cwd=self.base_dir, timeout=timeout)

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
            raise ServerError(str(exc)) from exc
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
            **self.settings,
        }
        path = self.data_dir / "dbmux.conf"
        path.write_text("".join(f"{k} = {_pg_literal(v)}\n" for k, v in settings.items()))
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
            raise ServerError(_with_log(str(exc), self.log_file)) from exc

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


# --------------------------------------------------------------------------- MariaDB


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


class MariaDBServer(_Server):
    """A throwaway MariaDB server on a free loopback port in a temp dir."""

    def __init__(
        self,
        *,
        max_connections: int = 50,
        root_password: str = "root",
        settings: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        sbin = ["/usr/sbin", "/usr/local/sbin", "/usr/libexec", "/usr/local/mysql/bin"]
        self._mariadbd = _find_binary(["mariadbd", "mysqld"], sbin)
        self._install_db = _find_binary(["mariadb-install-db", "mysql_install_db"], sbin)
        self._client = _find_binary(["mariadb", "mysql"])
        super().__init__("dbmux-my-", port)
        self.max_connections = max_connections
        self.root_password = root_password
        self.settings = dict(settings or {})
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
                    raise ServerError(
                        _with_log("mariadbd ignored SIGTERM; killed it", self.log_file)
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
            **kwargs,  # type: ignore[arg-type]
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
            " MASTER_USE_GTID=slave_pos; START SLAVE"
        )

    def wait_caught_up(self, primary: MariaDBServer, timeout: float = 30) -> None:
        """Wait until this replica has applied everything the primary has written."""
        position = primary.sql("SELECT @@gtid_binlog_pos")
        result = self.sql(f"SELECT MASTER_GTID_WAIT({_my_literal(position)}, {timeout})")
        if result.strip() != "0":
            raise ServerError(f"replica did not reach {position} within {timeout}s")

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
        env = _clean_env(("MYSQL_", "MARIADB_"))
        if password is not None:
            env["MYSQL_PWD"] = password  # keeps it out of argv / ps
        return _strip_final_newline(_run(cmd, "mariadb", env=env, input=sql))

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
        if _is_root():
            cmd.append("--user=root")
        try:
            _run(cmd, "mariadb-install-db", env=_clean_env(("MYSQL_",)), cwd=self.base_dir)
        except CommandError as exc:
            raise ServerError(str(exc)) from exc

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
        ]
        if _is_root():
            cmd.append("--user=root")
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in self.settings.items()]
        return cmd

    def _start_once(self) -> None:
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                self._server_command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.base_dir,
                env=_clean_env(("MYSQL_",)),
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not its
            )
        proc = self._proc
        ready = _wait_until(
            lambda: proc.poll() is not None or _mysql_handshake(self.port), self.startup_timeout
        )
        if proc.poll() is not None:
            self._proc = None
            raise ServerError(
                _with_log(f"mariadbd exited with code {proc.returncode}", self.log_file)
            )
        if not ready:
            self.kill()
            raise ServerError(
                _with_log(
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
            raise ServerError(_with_log(str(exc), self.log_file)) from exc

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
