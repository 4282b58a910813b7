"""What the clients talk to: the server directly, PgBouncer, HAProxy or dbmux (each a separate
process).

Every proxy gets a fresh temp dir, a free loopback port and a fresh process per run, so a run
never inherits another run's warm server connections (each run's peak server connection count
is then that target's alone). Processes are killed in stop(), and at interpreter exit if the
benchmark dies first.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from dbmux.testing.certs import CertFiles

HOST = "127.0.0.1"
_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        with contextlib.suppress(OSError):
            proc.kill()
            proc.wait(timeout=5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.splitlines()[0] if out else ""


def pgbouncer_binary() -> str | None:
    return (
        "/usr/sbin/pgbouncer"
        if Path("/usr/sbin/pgbouncer").is_file()
        else shutil.which("pgbouncer")
    )


def haproxy_binary() -> str | None:
    return "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else shutil.which("haproxy")


def dbmux_binary() -> str:
    return str(Path(sys.executable).parent / "dbmux")


def versions() -> dict[str, str]:
    pgbouncer, haproxy = pgbouncer_binary(), haproxy_binary()
    return {
        "pgbouncer": _first_line([pgbouncer, "--version"]) if pgbouncer else "(not installed)",
        # "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
        "haproxy": _first_line([haproxy, "-v"]).split(" - ")[0]
        if haproxy
        else "HAProxy (not installed)",
        "dbmux": _first_line([dbmux_binary(), "--version"]),
    }


class TargetError(RuntimeError):
    """A proxy would not start, died, or would not stop."""


class Target:
    """Direct access: nothing to start."""

    name = "direct"
    pid: int | None = None

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def start(self) -> None:
        pass

    def stop(self) -> str | None:
        """Stop; a note if that went wrong (had to SIGKILL), else None."""
        return None

    def alive(self) -> bool:
        return True

    def log_tail(self) -> str:
        return ""

    def log_problems(self) -> list[str]:
        return []


class ProcessTarget(Target):
    """A proxy run as a child process with its config in a temp dir."""

    log_name = "proxy.log"

    def __init__(self, upstream_port: int, user: str, password: str, dbname: str) -> None:
        super().__init__(HOST, 0)
        self.upstream_port = upstream_port
        self.user = user
        self.password = password
        self.dbname = dbname
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.log: Path | None = None

    @property
    def pid(self) -> int | None:  # type: ignore[override]
        return self.proc.pid if self.proc else None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _write_config(self) -> None:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """The process's environment; None: ours."""
        return None

    def start(self, timeout: float = 20.0) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"dbmux-bench-{self.name}-"))
        self.log = self.workdir / self.log_name
        self.port = free_port()
        self._write_config()
        with (self.workdir / "stdout.log").open("wb") as out:
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env(),
                start_new_session=True,  # Ctrl-C is ours to handle; we stop it in order
            )
        _live.add(self.proc)
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            if self.proc.poll() is not None:
                raise TargetError(
                    f"{self.name} exited with code {self.proc.returncode} before listening\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TargetError(f"{self.name} not listening after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> str | None:
        proc, note = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                note = f"{self.name} ignored SIGTERM for {timeout:g}s; killed it"
                proc.kill()
                proc.wait()
        _live.discard(proc)
        self.proc = None
        return note

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def log_tail(self) -> str:
        if self.workdir is None:
            return ""
        paths = dict.fromkeys(p for p in (self.log, self.workdir / "stdout.log") if p)
        parts = [_tail(p) for p in paths if p.exists()]
        return "\n".join(p for p in parts if p)

    def log_problems(self) -> list[str]:
        """Warning, error and traceback lines the proxy logged (first 20)."""
        if self.workdir is None:
            return []
        found: list[str] = []
        for path in dict.fromkeys((self.log, self.workdir / "stdout.log")):
            if path is None or not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if any(w in line for w in ("WARNING", "ERROR", "CRITICAL", "FATAL", "Traceback")):
                    found.append(line.strip())
        return found[:20]


class PgBouncer(ProcessTarget):
    """Debian's PgBouncer in transaction mode with one pool of pool_size server connections."""

    name = "pgbouncer"
    log_name = "pgbouncer.log"

    def __init__(
        self,
        *args: object,
        pool_size: int,
        auth_file_secret: str | None = None,
        tls: CertFiles | None = None,
        max_client_conn: int = 10000,
        **kwargs: object,
    ) -> None:
        """auth_file_secret: what userlist.txt holds for the user, by default the password.

        With the user's SCRAM secret from pg_authid instead (what auth_query would return),
        PgBouncer verifies client logins without PBKDF2 and logs into the server with the
        client's SCRAM proof; with the plain password it derives a SCRAM key on every login.

        tls: the certificate PgBouncer offers its clients, who must then use TLS
        (client_tls_sslmode = require; towards the server it stays plaintext).

        max_client_conn: how many clients it takes (its file descriptor limit is ours: it
        inherits it).
        """
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pool_size = pool_size
        self.auth_file_secret = auth_file_secret or self.password
        self.tls = tls
        self.max_client_conn = max_client_conn
        binary = pgbouncer_binary()
        if binary is None:
            raise TargetError("pgbouncer not installed (make system-deps)")
        self.binary = binary

    def _write_config(self) -> None:
        assert self.workdir is not None
        quoted = ['"' + s.replace('"', '""') + '"' for s in (self.user, self.auth_file_secret)]
        (self.workdir / "userlist.txt").write_text(" ".join(quoted) + "\n")
        ini = f"""\
[databases]
{self.dbname} = host={HOST} port={self.upstream_port} dbname={self.dbname}

[pgbouncer]
listen_addr = {HOST}
listen_port = {self.port}
; dbmux listens with a backlog of 4096; PgBouncer's default (128) would drop SYNs in a storm
listen_backlog = 4096
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.workdir / "userlist.txt"}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_db_connections = {self.pool_size}
max_client_conn = {self.max_client_conn}
logfile = {self.log}
ignore_startup_parameters = extra_float_digits,options
{self._tls_settings()}"""
        (self.workdir / "pgbouncer.ini").write_text(ini)
        if os.geteuid() == 0:  # PgBouncer refuses to run as root; -u switches to postgres
            account = pwd.getpwnam("postgres")
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)

    def _tls_settings(self) -> str:
        """TLS with the clients, from copies of the files in the workdir (PgBouncer may run
        as postgres, who must be able to read the key)."""
        if self.tls is None:
            return ""
        assert self.workdir is not None
        cert, key = self.workdir / "proxy.pem", self.workdir / "proxy-key.pem"
        shutil.copyfile(self.tls.certificate_file, cert)
        shutil.copyfile(self.tls.key_file, key)
        key.chmod(0o600)
        return (
            "client_tls_sslmode = require\n"
            f"client_tls_cert_file = {cert}\n"
            f"client_tls_key_file = {key}\n"
        )

    def _command(self) -> list[str]:
        assert self.workdir is not None
        user = ["-u", "postgres"] if os.geteuid() == 0 else []
        return [self.binary, *user, str(self.workdir / "pgbouncer.ini")]


class HAProxy(ProcessTarget):
    """Debian's HAProxy as a plain TCP relay: one thread, no pooling, no protocol awareness.

    What one hop through a C event loop costs, for either database: every client connection
    is a server connection, so beyond max_connections clients fail as they do directly. It
    runs in the foreground (-db) without master-worker, so its pid is the relay itself and
    the bench's /proc reader sees all of its CPU (one process, all threads).
    """

    name = "haproxy"
    log_name = "stdout.log"  # -db: alerts and warnings on stderr; no traffic log

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        binary = haproxy_binary()
        if binary is None:
            raise TargetError("haproxy not installed (make system-deps)")
        self.binary = binary

    def _write_config(self) -> None:
        assert self.workdir is not None
        # Timeouts long enough for any run; the backlog as dbmux's, so a storm's SYNs queue;
        # maxconn far above any run's clients, yet low enough for HAProxy's fds (2 per
        # connection) to fit the usual limit.
        cfg = f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

listen db
    bind {HOST}:{self.port}
    backlog 4096
    maxconn 4096
    server db {HOST}:{self.upstream_port}
"""
        (self.workdir / "haproxy.cfg").write_text(cfg)

    def _command(self) -> list[str]:
        assert self.workdir is not None
        return [self.binary, "-f", str(self.workdir / "haproxy.cfg"), "-db"]


class Dbmux(ProcessTarget):
    """`dbmux serve` from this venv, one proxy with a pool of max_connections_percent.

    name: the target's name ("dbmux", or a variant such as "dbmux-pin"); source: another
    checkout's src/ directory to run dbmux from (same venv and python, PYTHONPATH=source, so
    `import dbmux` finds that tree before the venv's editable install); engine_family:
    POSTGRESQL or MYSQL; proxy_settings and pool_settings: extra keys for the proxy and its
    connection_pool_config; targets: the target group's instances as (host, port), by
    default the upstream alone; group_settings: extra keys for the target group
    (probe_interval, say); workers: its worker processes (config: workers; None leaves
    it out, for an older dbmux that has no such setting).
    """

    name = "dbmux"
    log_name = "stdout.log"

    def __init__(
        self,
        *args: object,
        max_connections_percent: int,
        name: str = "dbmux",
        source: Path | None = None,
        engine_family: str = "POSTGRESQL",
        proxy_settings: dict[str, object] | None = None,
        pool_settings: dict[str, object] | None = None,
        targets: list[tuple[str, int]] | None = None,
        group_settings: dict[str, object] | None = None,
        workers: int | None = 1,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.workers = workers
        self.targets = list(targets) if targets else [(HOST, self.upstream_port)]
        self.group_settings = dict(group_settings or {})
        self.name = name
        self.source = source
        self.engine_family = engine_family
        self.percent = max_connections_percent
        self.proxy_settings = dict(proxy_settings or {})
        self.pool_settings = dict(pool_settings or {})
        self.admin_port = 0  # its admin API (/metrics), on a free port at start()
        self.binary = dbmux_binary()
        if not Path(self.binary).is_file():
            raise TargetError(f"{self.binary} not found (make installs dbmux into .venv)")

    def _write_config(self) -> None:
        assert self.workdir is not None
        engine = "postgres" if self.engine_family == "POSTGRESQL" else "mysql"
        secret = {"username": self.user, "password": self.password, "engine": engine}
        (self.workdir / "app.json").write_text(json.dumps(secret))
        (self.workdir / "app.json").chmod(0o600)  # dbmux warns about a secret others can read
        self.admin_port = free_port()  # never the default 9187
        config = {
            # None: not set, for a dbmux from before `workers` (one process, as 1 is)
            **({"workers": self.workers} if self.workers is not None else {}),
            "admin": {"listen": f"{HOST}:{self.admin_port}"},
            "state_dir": "state",  # MySQL's RSA key: the run's own, not the user's
            "proxies": [
                {
                    "name": "bench",
                    "engine_family": self.engine_family,
                    "listen": f"{HOST}:{self.port}",
                    "max_client_connections": 10000,
                    "auth": [{"secret": "file:app.json"}],
                    **self.proxy_settings,
                    "target_group": {
                        **self.group_settings,
                        "connection_pool_config": {
                            "max_connections_percent": self.percent,
                            **self.pool_settings,
                        },
                        "targets": [{"host": h, "port": p} for h, p in self.targets],
                    },
                }
            ],
        }
        (self.workdir / "dbmux.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def metrics(self, timeout: float = 10.0) -> str:
        """Its Prometheus text from the admin API (no token: the bench sets none)."""
        url = f"http://{HOST}:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())

    def _env(self) -> dict[str, str] | None:
        if self.source is None:
            return None
        path = filter(None, [str(self.source), os.environ.get("PYTHONPATH")])
        return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}

    def _command(self) -> list[str]:
        assert self.workdir is not None
        config = str(self.workdir / "dbmux.yaml")
        return [self.binary, "serve", "--config", config, "--log-level", "warning"]
