"""The MariaDB section: sysbench and a connect-per-request storm, straight at MariaDB,
through HAProxy (a TCP relay) and through dbmux, on one throwaway server (max_connections
100). See bench/README.md.

sysbench is Debian's (make system-deps installs it). Without it the sysbench workloads are
reported as not run, and the storm, which needs only PyMySQL, still runs.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from bench import storm, sysbench
from bench.client import ClientResult
from bench.monitor import ConnectionSampler, MariaDBAdmin
from bench.report import NOISY, PROXY_CPU_LEGEND, RatioTarget, Workload
from bench.runner import (
    MAX_CONNECTIONS,
    POOL_SIZE,
    Bench,
    dbmux_versions,
    out,
    proxy_versions,
)
from bench.targets import Target
from dbmux.testing import MariaDBServer

TABLES = 4
TABLE_SIZE = 10_000
TABLE_OPTIONS = [f"--tables={TABLES}", f"--table-size={TABLE_SIZE}"]
STORM_CLIENTS = 300  # three times max_connections
STORM_ROWS = 10_000
# ProxySQL is reported at about 0.97x direct on point selects; 0.85x is the target.
POINT_SELECT = RatioTarget("direct", minimum=0.85, aim=0.97)

WORKLOADS = (
    Workload(
        "my-point-select",
        "point select, 50 thr",
        ("oltp_point_select", "--threads=50", "--db-ps-mode=disable"),
        engine="mysql",
        tool="sysbench",
        ratio_target=POINT_SELECT,
        extra_targets=("dbmux-w2",),
        note="point select: dbmux-w2 is dbmux with workers: 2, its CPU column counting both "
        "workers and their supervisor.",
    ),
    Workload(
        "my-point-select-ps",
        "point select PS, 50 thr",
        ("oltp_point_select", "--threads=50", "--db-ps-mode=auto"),
        engine="mysql",
        tool="sysbench",
        ratio_target=POINT_SELECT,
        note="point select PS: --db-ps-mode=auto, server-side prepared statements: each "
        "sysbench thread prepares its statements once, one per table (COM_STMT_PREPARE), and "
        "executes them (COM_STMT_EXECUTE, binary protocol) for every query. dbmux gives the client "
        "statement ids of its own and prepares the statement's text on whichever server "
        "connection an execute lands on, once per server connection; the point select row "
        "above sends the same query as text (COM_QUERY, --db-ps-mode=disable).",
    ),
    Workload(
        "my-read-write",
        "read/write, 10 threads",
        ("oltp_read_write", "--threads=10"),
        engine="mysql",
        tool="sysbench",
    ),
    Workload(
        "my-storm-300",
        "storm, 300 PyMySQL clients",
        ("--clients", str(STORM_CLIENTS)),
        engine="mysql",
        tool="storm",
        storm=True,
        note=f"storm: {STORM_CLIENTS} PyMySQL clients (threads of one process, python -m "
        "bench.storm) at once, each invocation a new connection, as a Lambda function makes: "
        "connect (mysql_native_password), BEGIN, a point select, COMMIT, COM_QUIT, over and "
        "over for --duration. tps = successful invocations per second of --duration, latency "
        "= connect to disconnect. Straight at MariaDB, and through HAProxy (which relays each "
        "connection), the clients beyond max_connections are refused (1040 Too many "
        "connections), and in some runs a few logins are accepted "
        "but never greeted: those fail after 30 s and keep the direct run going past "
        "--duration.",
    ),
)


class MysqlBench(Bench):
    engine = "mysql"
    workloads = WORKLOADS
    cpu_columns = ("client", "mariadb")
    user = dbname = "sbtest"  # sysbench's defaults
    family = "MYSQL"

    def start(self) -> None:
        self.server = MariaDBServer(
            max_connections=MAX_CONNECTIONS, root_password=secrets.token_urlsafe(12)
        )
        s = self.server.start()
        self.host, self.port = s.host, s.port
        server_version = s.sql("SELECT VERSION()")
        out(f"MariaDB {server_version} on 127.0.0.1:{s.port}, max_connections 100")
        s.create_user(self.user, self.password)
        s.create_database(self.dbname, owner=self.user)
        started = time.monotonic()
        s.sql(storm.create_table_sql(STORM_ROWS), self.dbname)
        self.sysbench = sysbench.find_sysbench()
        if self.sysbench is None:
            self.broken = True  # runs are missing from the results
            out(
                "sysbench is NOT installed (make system-deps installs Debian's: apt-get install "
                "sysbench): the sysbench workloads will not run; the storm will"
            )
            out(f"storm table, {STORM_ROWS} rows: {time.monotonic() - started:.1f}s")
        else:
            sysbench.prepare(self.sysbench, "oltp_read_write", self._options(s.port))
            out(
                f"sysbench prepare {' '.join(TABLE_OPTIONS)} and the storm table: "
                f"{time.monotonic() - started:.1f}s"
            )
        self.sampler = ConnectionSampler(MariaDBAdmin(s.host, s.port, s.root_password), self.user)
        self.sampler.start()
        self.versions = {
            "mariadb": server_version,
            "sysbench": sysbench.sysbench_version(self.sysbench)
            if self.sysbench
            else "sysbench not installed",
            **proxy_versions(self.args.baseline),
        }
        v = self.versions
        out(
            f"{v['sysbench']}; {v['haproxy']}; {dbmux_versions(v)}; "
            f"pool {POOL_SIZE} server connections per dbmux"
        )
        out()

    def _options(self, port: int) -> list[str]:
        connection = sysbench.connection_args(
            self.host, port, self.user, self.password, self.dbname
        )
        return [*connection, *TABLE_OPTIONS]

    def close(self) -> None:
        super().close()
        if hasattr(self, "server"):
            self.server.cleanup()

    def server_pid(self) -> int | None:
        try:
            return int(Path(self.server.base_dir, "mariadb.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cannot_run(self, workload: Workload) -> str | None:
        if workload.tool == "sysbench" and self.sysbench is None:
            return "sysbench not installed (make system-deps)"
        return None

    def run_client(self, workload: Workload, target: Target) -> ClientResult:
        if workload.tool == "storm":
            return storm.run(
                host=target.host,
                port=target.port,
                user=self.user,
                password=self.password,
                database=self.dbname,
                clients=STORM_CLIENTS,
                rows=STORM_ROWS,
                duration=self.args.duration,
            )
        assert self.sysbench is not None
        test, *options = workload.args
        return sysbench.run(
            self.sysbench,
            test,
            options=[*self._options(target.port), *options],
            duration=self.args.duration,
        )

    def heading(self, machine: dict[str, Any]) -> str:
        return (
            f"## MariaDB: dbmux vs HAProxy vs direct ({self.args.duration}s per run, "
            f"pool {POOL_SIZE}, "
            f"max_connections {MAX_CONNECTIONS}, sysbench {' '.join(TABLE_OPTIONS)}, "
            f"{machine['cpus']} CPUs)"
        )

    def legend(self) -> str:
        return (
            "tps: sysbench's transactions per second (oltp_point_select: one point select "
            "each; oltp_read_write: BEGIN, 18 queries, COMMIT), its threads connected before "
            "its clock starts; the storm's: successful invocations, each a new connection. "
            "failures = errors sysbench ignored (--mysql-ignore-errors=all; it does not say "
            "which, and oltp_read_write's are usually InnoDB deadlocks, which direct access "
            "gets too) plus those that stopped it (FATAL); the storm's failed invocations. "
            f"{PROXY_CPU_LEGEND} "
            "reconnects: sysbench's, after "
            "a lost connection. server logins (CPU table): MariaDB's Connections less "
            f"Aborted_connects. * = noisy run: other processes took {NOISY:.0f}% of the CPU or "
            "more."
        )

    def settings(self) -> dict[str, Any]:
        return {
            "sysbench_tables": TABLES,
            "sysbench_table_size": TABLE_SIZE,
            "storm_clients": STORM_CLIENTS,
            "storm_rows": STORM_ROWS,
        }
