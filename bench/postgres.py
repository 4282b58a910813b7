"""The PostgreSQL section: pgbench straight at PostgreSQL, through PgBouncer and through dbmux,
on one throwaway cluster (max_connections 100, SCRAM, pgbench scale 10). See bench/README.md."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from bench import client, pgbench
from bench.client import ClientResult
from bench.monitor import ConnectionSampler, PostgresAdmin
from bench.report import NOISY, PROXY_CPU_LEGEND, RatioTarget, Workload
from bench.runner import (
    MAX_CONNECTIONS,
    POOL_SIZE,
    Bench,
    dbmux_versions,
    out,
    proxy_versions,
)
from bench.targets import PgBouncer, Target
from dbmux.testing import PostgresCluster

SCALE = 10
# dbmux's connection_borrow_timeout where sessions pin (default 120 s), at most half of
# --duration: the clients that find the pool held by pinned sessions then fail within the run
# instead of keeping pgbench waiting for up to 120 s after -T ends.
PINNED_BORROW_TIMEOUT = 5.0
STEADY = RatioTarget("pgbouncer", minimum=0.8, aim=1.0)
# The TLS rows compare the two proxies; PostgreSQL itself offers no TLS here.
TLS_TARGETS = ("pgbouncer", "dbmux", "dbmux-before")
# active-1000: ten times max_connections, so only the pooling proxies can serve them.
ACTIVE_CLIENTS = 1000
# pgbench logs them in one by one per thread, each login a SCRAM exchange whose PBKDF2 is the
# client's: 3.6 s through PgBouncer, 6.9 s through dbmux on a busy 2-core machine.
ACTIVE_LOGIN_ALLOWANCE = 10
POOLING_TARGETS = ("pgbouncer", "dbmux", "dbmux-before")
# Open files for pgbench's 1,000 clients (it wants -c + 3) and a proxy's 1,000 client
# connections besides its pool and its own, with room to spare.
OPEN_FILES = 4 * ACTIVE_CLIENTS

# Every transaction sets session state, then reads with it; application_name differs per
# client, so a server connection always carries the previous client's value. pgbench's
# :scale is 1 in custom scripts, hence the literal scale.
SET_HEAVY_SCRIPT = f"""\\set aid random(1, 100000 * {SCALE})
SET statement_timeout = '5s';
SET application_name = 'client-:client_id';
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
"""

WORKLOADS = (
    Workload(
        "select-simple",
        "select-only simple",
        ("-S", "-c", "50", "-j", "2"),
        ratio_target=STEADY,
        extra_targets=("dbmux-nohist", "dbmux-w2"),
        note="select-only simple: dbmux-nohist is dbmux with latency_histograms: false; the "
        "CPU table puts both side by side, the difference being what the query latency "
        "histograms cost per transaction. dbmux-w2 is dbmux with workers: 2 (two processes "
        "sharing the port and the pool), whose CPU column counts both workers and their "
        "supervisor.",
    ),
    Workload(
        "select-extended",
        "select-only extended",
        ("-S", "-M", "extended", "-c", "50", "-j", "2"),
        ratio_target=STEADY,
    ),
    Workload("tpcb", "tpcb-like", ("-c", "10", "-j", "2"), ratio_target=STEADY),
    Workload("storm-50", "storm -S -C, 50 clients", ("-S", "-C", "-c", "50", "-j", "2")),
    Workload(
        "storm-300",
        "storm -S -C, 300 clients",
        ("-S", "-C", "-c", "300", "-j", "2"),
        storm=True,
    ),
    Workload(
        "select-prepared",
        "select-only prepared",
        ("-S", "-M", "prepared", "-c", "50", "-j", "2"),
        borrow_timeout=PINNED_BORROW_TIMEOUT,
        note="select-only prepared: every pgbench client prepares its statement under the same "
        "name (P_0). PgBouncer 1.18 in transaction mode does not carry protocol-level prepared "
        "statements between server connections: its clients fail with 'prepared statement "
        "... does not exist' or '... already exists' until every server connection has a P_0 "
        "(all clients prepare the same text, so the survivors, if any, then run on whichever "
        "P_0 they find: their tps is not comparable). A proxy that pins such a session (RDS "
        "Proxy; dbmux before it carried named statements) lets 20 clients hold the pool while "
        "the others wait for a server connection, and pgbench prepares with a blocking "
        "PQprepare(), so one waiting client stalls its whole pgbench thread, pinned clients "
        "included. dbmux runs with connection_borrow_timeout {borrow_timeout:g} s (default "
        "120 s) in this workload, so a client that waits fails within the run instead of "
        "holding pgbench up to 120 s past -T.",
    ),
    Workload(
        "set-heavy",
        "set-heavy (SET per tx)",
        ("-c", "50", "-j", "2"),
        script=SET_HEAVY_SCRIPT,
        extra_targets=("dbmux-pin",),
        borrow_timeout=PINNED_BORROW_TIMEOUT,
        note="set-heavy: every transaction runs SET statement_timeout (the same for all "
        "clients), SET application_name (a different value per client), then a select, with "
        "the simple protocol. dbmux (session_state: replay, the default) carries each client's "
        "settings to whichever server connection it borrows; dbmux-pin (session_state: pin, "
        "what RDS Proxy does) pins each session at its first SET, so 20 clients hold the pool "
        "and the other 30 fail after connection_borrow_timeout "
        "({borrow_timeout:g} s here, both dbmux targets). PgBouncer multiplexes but "
        "ignores SET: each client's settings stay on the server connection and leak to the "
        "clients that use it next (not measured here).",
    ),
    Workload(
        "tls-select-simple",
        "select-only simple, TLS",
        ("-S", "-c", "50", "-j", "2"),
        ratio_target=STEADY,
        tls=True,
        plain="select-simple",
        targets=TLS_TARGETS,
    ),
    Workload(
        "tls-storm-50",
        "storm -S -C, 50 clients, TLS",
        ("-S", "-C", "-c", "50", "-j", "2"),
        tls=True,
        plain="storm-50",
        targets=TLS_TARGETS,
    ),
    Workload(
        "select-1",
        "select-only, 1 client",
        ("-S", "-c", "1", "-j", "1", "-P", "1"),
        round_trip=True,
    ),
    Workload(
        "active-1000",
        "select-only, 1,000 clients",
        ("-S", "-c", str(ACTIVE_CLIENTS), "-j", "2"),
        transaction_log=True,
        targets=POOLING_TARGETS,
        login_allowance=ACTIVE_LOGIN_ALLOWANCE,
        note="select-only, 1,000 clients: every client busy, 50 per server connection of the "
        "pool. Direct access and HAProxy would run out of max_connections and do not run. "
        f"pgbench runs {ACTIVE_LOGIN_ALLOWANCE} s longer than --duration (its -T counts the "
        "clients' logins, seconds for 1,000 of them) and logs every transaction (--log) for "
        "the transactions per client and the latency percentiles of the fairness table.",
    ),
)
# --only tls: the TLS rows and the plaintext rows their TLS cost is measured against.
TLS_GROUP = [w.key for w in WORKLOADS if w.tls or any(t.plain == w.key for t in WORKLOADS)]


class PostgresBench(Bench):
    engine = "postgresql"
    workloads = WORKLOADS
    cpu_columns = ("pgbench", "postgres")
    user = dbname = "bench"
    family = "POSTGRESQL"

    def start(self) -> None:
        files = client.allow_open_files(OPEN_FILES)
        if files < OPEN_FILES:
            out(f"open files limited to {files}: active-1000 wants {OPEN_FILES}")
        self.cluster = PostgresCluster(
            max_connections=MAX_CONNECTIONS, auth_method="scram-sha-256", password=self.password
        )
        c = self.cluster.start()
        self.host, self.port = c.host, c.port
        server_version = c.psql("SHOW server_version")
        out(f"PostgreSQL {server_version} on 127.0.0.1:{c.port}, max_connections 100")
        self.pgbench = pgbench.find_pgbench()
        c.create_user(self.user, self.password)
        c.create_database(self.dbname, self.user)
        started = time.monotonic()
        cmd = [self.pgbench, "-i", "-s", str(SCALE), "-q", "-h", c.host, "-p", str(c.port)]
        init = subprocess.run(
            [*cmd, "-U", self.user, self.dbname],
            capture_output=True,
            text=True,
            env=pgbench.client_env(self.password),
            timeout=600,
        )
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed:\n{init.stderr}")
        out(f"pgbench -i -s {SCALE}: {time.monotonic() - started:.1f}s")
        self.sampler = ConnectionSampler(PostgresAdmin(c.dsn(), c.psql), self.user)
        self.sampler.start()
        self.versions = {
            "postgres": server_version,
            "pgbench": pgbench.pgbench_version(self.pgbench),
            **proxy_versions(self.args.baseline),
        }
        v = self.versions
        out(
            f"{v['pgbench']}; {v['pgbouncer']}; {v['haproxy']}; {dbmux_versions(v)}; "
            f"pool {POOL_SIZE} server connections per proxy"
        )
        out()

    def close(self) -> None:
        super().close()
        if hasattr(self, "cluster"):
            self.cluster.cleanup()

    def reset(self) -> None:
        """What pgbench does before a run unless -n, done directly so no proxy relays it."""
        self.cluster.psql(
            "VACUUM pgbench_branches; VACUUM pgbench_tellers; TRUNCATE pgbench_history; "
            "CHECKPOINT;",
            self.dbname,
        )

    def server_pid(self) -> int | None:
        try:
            return int((self.cluster.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def make_target(self, name: str, workload: Workload) -> Target:
        if name != "pgbouncer":
            return super().make_target(name, workload)
        secret = None
        if self.args.pgbouncer_auth == "scram":
            secret = self.cluster.psql(
                f"SELECT rolpassword FROM pg_authid WHERE rolname = '{self.user}'"
            )
        return PgBouncer(
            upstream_port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            pool_size=POOL_SIZE,
            auth_file_secret=secret,
            tls=self.tls_certificate() if workload.tls else None,
        )

    def run_client(self, workload: Workload, target: Target) -> ClientResult:
        return pgbench.run(
            self.pgbench,
            host=target.host,
            port=target.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            args=list(workload.args),
            duration=self.args.duration + workload.login_allowance,
            script=workload.script,
            tls=workload.tls,
            transaction_log=workload.transaction_log,
        )

    def heading(self, machine: dict[str, Any]) -> str:
        return (
            f"## PostgreSQL: dbmux vs PgBouncer vs HAProxy vs direct "
            f"({self.args.duration}s per run, "
            f"pool {POOL_SIZE}, "
            f"max_connections {MAX_CONNECTIONS}, pgbench -s {SCALE}, {machine['cpus']} CPUs)"
        )

    def legend(self) -> str:
        return (
            "tps excludes initial connection time, except for the -C storms, where pgbench "
            "counts reconnection time in (each transaction is a new connection). failures = "
            "failed transactions + clients pgbench aborted. * = noisy run: other processes on "
            f"the machine took {NOISY:.0f}% of the CPU or more. ! = pgbench aborted clients: "
            "tps is that of the clients that kept running (if none did, of the moment before "
            f"the run ended). {PROXY_CPU_LEGEND}"
        )

    def tls_legend(self) -> str:
        return (
            "TLS rows: pgbench with sslmode=require (a full TLS handshake per connection: "
            "TLS 1.3, TLS_AES_256_GCM_SHA384, X25519, ECDSA with the bench's throwaway P-256 "
            "certificate, through both proxies), PgBouncer with "
            "client_tls_sslmode = require and dbmux with tls and require_tls; both talk to "
            "PostgreSQL in plaintext. TLS cost = proxy CPU per transaction less that of the "
            "same run's plaintext workload: per connect in the storm (each transaction is a "
            "new connection, so this is the handshake's cost), per transaction in the steady "
            "state (encryption only)."
        )

    def settings(self) -> dict[str, Any]:
        return {"pgbench_scale": SCALE, "pgbouncer_auth": self.args.pgbouncer_auth}
