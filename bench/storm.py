"""The connect-per-request storm against MariaDB: many PyMySQL clients at once, each
invocation connecting, running one short transaction and disconnecting, for --duration.

It is the demo's Lambda-style workload (dbmux.demo.storm), timed, with a point select as the
transaction, from a table of its own (TABLE, made by create_table(); the storm runs
whether sysbench is installed or not). It runs as a child process (`python -m bench.storm`),
as pgbench and sysbench do, so its CPU time is measured apart from the benchmark's and its
hundreds of threads do not slow the benchmark's connection sampler. The child prints its
outcome as JSON; run() starts it and reads that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import client
from bench.client import ClientResult
from bench.sysbench import client_env
from dbmux.demo.storm import PhaseResult, pymysql_invocations, run_clients

TABLE = "storm_accounts"
_PASSWORD = "DBMUX_BENCH_PASSWORD"  # the password reaches the child here, not in its argv
_REPO = Path(__file__).resolve().parent.parent  # on the child's PYTHONPATH, for `-m bench.storm`


@dataclass
class StormResult(ClientResult):
    """tps: successful invocations per second of --duration (each includes its connection);
    transactions: successful invocations; errors: first error message per cause -> count."""

    tool = "storm"

    invocations: int | None = None  # that finished, one way or the other
    failed_by_cause: dict[str, int] = field(default_factory=dict)  # "1040", "timeout", ...
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None

    @property
    def failures(self) -> int:
        return sum(self.failed_by_cause.values())


def create_table_sql(rows: int) -> str:
    """The storm's table: ids 1..rows (MariaDB's SEQUENCE engine makes them)."""
    return (
        f"CREATE TABLE {TABLE} (id int PRIMARY KEY, balance int NOT NULL)"
        f" SELECT seq AS id, 0 AS balance FROM seq_1_to_{rows}"
    )


def run(
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    database: str,
    clients: int,
    rows: int,
    duration: int,
    grace: float = 60.0,
) -> StormResult:
    """Storm host:port for `duration` s; killed if it runs grace s longer (an invocation
    under way at the deadline may take up to dbmux.demo.storm.INVOCATION_TIMEOUT to finish)."""
    cmd = [sys.executable, "-m", "bench.storm", "--host", host, "--port", str(port)]
    cmd += ["--user", user, "--database", database, "--clients", str(clients)]
    cmd += ["--rows", str(rows)]
    cmd += ["--duration", str(duration)]
    env = {**client_env(), _PASSWORD: password, "PYTHONPATH": str(_REPO)}
    done = client.run(cmd, env=env, limit=duration + grace)
    try:
        outcome = json.loads(done.stdout)
    except json.JSONDecodeError:
        last = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return StormResult(
            **done.common(), errors={f"storm exited with {done.returncode}: {last[0]}": 1}
        )
    succeeded = outcome["succeeded"]
    latencies = outcome["latency_ms"]
    return StormResult(
        **done.common(),
        tps=succeeded / duration,
        latency_ms=latencies["avg"],
        latency_p95_ms=latencies["p95"],
        latency_p99_ms=latencies["p99"],
        transactions=succeeded,
        clients=clients,
        invocations=outcome["done"],
        failed_by_cause=outcome["failures"],
        errors={outcome["examples"][c]: n for c, n in outcome["failures"].items()},
    )


# ------------------------------------------------------------------------ the child


def _outcome(phase: PhaseResult) -> dict[str, Any]:
    def ms(quantile: float) -> float | None:
        value = phase.latency(quantile)
        return None if value is None else round(1000 * value, 3)

    average = 1000 * sum(phase.latencies) / len(phase.latencies) if phase.latencies else None
    return {
        "elapsed": round(phase.elapsed, 3),
        "done": phase.done,
        "succeeded": phase.succeeded,
        "committed": phase.committed,
        "failures": dict(phase.failures),
        "examples": phase.examples,
        "latency_ms": {
            "avg": None if average is None else round(average, 3),
            "p50": ms(0.5),
            "p95": ms(0.95),
            "p99": ms(0.99),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--duration", type=int, required=True)
    args = parser.parse_args(argv)
    connect = {"host": args.host, "port": args.port, "user": args.user}
    connect.update(password=os.environ[_PASSWORD], database=args.database)

    def point_select(cursor: Any, phase: str, number: int) -> None:
        sql = f"SELECT balance FROM {TABLE} WHERE id = %s"
        cursor.execute(sql, (random.randint(1, args.rows),))
        cursor.fetchone()

    # No cap on invocations: the deadline ends the run, as -T ends pgbench's.
    phase = PhaseResult("storm", invocations=sys.maxsize, clients=args.clients)

    async def storm() -> None:
        with pymysql_invocations(connect, point_select, args.clients) as invocation:
            phase.started = time.monotonic()
            await run_clients(phase, invocation, deadline=phase.started + args.duration)
            phase.elapsed = time.monotonic() - phase.started

    asyncio.run(storm())
    json.dump(_outcome(phase), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
