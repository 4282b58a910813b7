"""Instructions (callgrind) and syscalls (strace) per query of the dbmux process, MariaDB side.

Repeatable where wall-clock numbers on a shared machine are not: dbmux runs under
`valgrind --tool=callgrind` in front of a throwaway MariaDB, sysbench drives it, and each
workload runs twice with a fixed --events count, a short run and a long one, the counters
zeroed before each and dumped after. The difference between the two, divided by the
difference in queries, is the cost of a query alone: the logins, the prepares and the
pool's warm-up are in both runs and cancel out. `--tool strace` does the same with
`strace -c -f` attached to a dbmux running at full speed, for syscalls per query, and
`--tool cpu` with its CPU time from /proc (which other processes on the machine sway).

    PYTHONPATH=src:. .venv/bin/python -m bench.instructions_mysql
    PYTHONPATH=src:. .venv/bin/python -m bench.instructions_mysql --only point-select-ps
    PYTHONPATH=src:. .venv/bin/python -m bench.instructions_mysql --tool strace
    PYTHONPATH=src:. .venv/bin/python -m bench.instructions_mysql --tool cpu
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dbmux
from bench import sysbench
from bench.runner import MAX_CONNECTIONS, POOL_PERCENT
from bench.targets import Dbmux
from dbmux.testing import MariaDBServer

USER = DBNAME = "sbtest"
TABLES = ["--tables=4", "--table-size=10000"]
Counts = dict[str, int]
CPU_SCALE = 10  # --tool cpu runs 10 times the events: /proc counts CPU in 10 ms ticks
# The tree this module imported dbmux from: the proxy runs the same code (a relative
# PYTHONPATH would not hold in its working directory).
SOURCE = Path(dbmux.__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    name: str
    args: tuple[str, ...]
    events: tuple[int, int]  # sysbench events of the short and the long run


WORKLOADS = (
    Workload(
        "point-select",
        ("oltp_point_select", "--threads=50", "--db-ps-mode=disable"),
        (2000, 6000),
    ),
    Workload(
        "point-select-ps",
        ("oltp_point_select", "--threads=50", "--db-ps-mode=auto"),
        (2000, 6000),
    ),
    Workload("read-write", ("oltp_read_write", "--threads=10"), (100, 300)),
)


class ProfiledDbmux(Dbmux):
    """dbmux under callgrind (zeroed and dumped on request), or as it is for strace."""

    def __init__(self, *args: object, tool: str, keep: Path | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # as Dbmux takes them
        self.tool = tool
        self.keep = keep
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        assert self.workdir is not None
        serve = [sys.executable, "-m", "dbmux", "serve", "--config", "dbmux.yaml"]
        serve += ["--log-level", "warning"]
        if self.tool != "callgrind":
            return serve
        out = str(self.workdir / "callgrind.out")
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *serve]


def run_sysbench(port: int, password: str, workload: Workload, events: int) -> int:
    """One sysbench run of `events` events; the queries it made."""
    test, *options = workload.args
    cmd = ["sysbench", test, *sysbench.connection_args("127.0.0.1", port, USER, password, DBNAME)]
    cmd += [*TABLES, *options, f"--events={events}", "--time=0", "run"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=sysbench.client_env(), timeout=900, check=False
    )
    result = sysbench.parse(done.stdout + done.stderr)
    if done.returncode != 0 or not result["queries"] or result["errors"]:
        raise RuntimeError(f"sysbench failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return int(result["queries"])


def callgrind(pid: int, *options: str) -> None:
    subprocess.run(["callgrind_control", *options, str(pid)], capture_output=True, check=True)


_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def counted_by_callgrind(target: ProfiledDbmux, run: Callable[[], int]) -> tuple[Counts, int]:
    """({"instructions": N}, queries) of one run between a zero and a dump."""
    assert target.workdir is not None and target.pid is not None
    callgrind(target.pid, "--zero")
    before = set(target.workdir.glob("callgrind.out.*"))
    queries = run()
    callgrind(target.pid, "--dump")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for path in set(target.workdir.glob("callgrind.out.*")) - before:
            m = _TOTALS.search(path.read_bytes())
            if m:
                if target.keep is not None:
                    shutil.copy(path, target.keep / f"callgrind.{queries}")
                return {"instructions": int(m.group(1))}, queries
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def counted_by_strace(target: ProfiledDbmux, run: Callable[[], int]) -> tuple[Counts, int]:
    """(calls by syscall, queries) of one run with strace -c attached."""
    assert target.workdir is not None and target.pid is not None
    out = target.workdir / "strace.txt"
    strace = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(out), "-p", str(target.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # attached
    queries = run()
    strace.send_signal(signal.SIGINT)
    strace.wait(timeout=30)
    calls: Counts = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls, queries


def counted_by_cpu(target: ProfiledDbmux, run: Callable[[], int]) -> tuple[Counts, int]:
    """(user and system CPU in µs, queries) of one run, from /proc."""
    assert target.pid is not None
    before = cpu_us(target.pid)
    queries = run()
    after = cpu_us(target.pid)
    return {k: after[k] - before[k] for k in after}, queries


def cpu_us(pid: int) -> Counts:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = 1_000_000 // os.sysconf("SC_CLK_TCK")
    return {"user µs": int(fields[11]) * tick, "system µs": int(fields[12]) * tick}


COUNTERS = {"callgrind": counted_by_callgrind, "strace": counted_by_strace, "cpu": counted_by_cpu}


def per_query(target: ProfiledDbmux, password: str, workload: Workload) -> dict[str, float]:
    """What one query costs: the long run less the short one, over the queries between."""
    count = COUNTERS[target.tool]
    scale = CPU_SCALE if target.tool == "cpu" else 1
    short, long = (events * scale for events in workload.events)
    run_sysbench(target.port, password, workload, short)  # warm-up: the pool fills
    a, qa = count(target, lambda: run_sysbench(target.port, password, workload, short))
    b, qb = count(target, lambda: run_sysbench(target.port, password, workload, long))
    return {k: (b[k] - a.get(k, 0)) / (qb - qa) for k in b}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", help="comma-separated workloads", default="")
    parser.add_argument("--tool", choices=tuple(COUNTERS), default="callgrind")
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps here")
    args = parser.parse_args()
    chosen = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    password = secrets.token_urlsafe(12)
    with MariaDBServer(max_connections=MAX_CONNECTIONS) as server:
        server.create_user(USER, password)
        server.create_database(DBNAME, owner=USER)
        connection = sysbench.connection_args(server.host, server.port, USER, password, DBNAME)
        sysbench.prepare("sysbench", "oltp_read_write", [*connection, *TABLES])
        for workload in chosen:
            for attempt in (1, 2):  # a run on a shared machine may be cut short by others
                target = ProfiledDbmux(
                    upstream_port=server.port,
                    user=USER,
                    password=password,
                    dbname=DBNAME,
                    max_connections_percent=POOL_PERCENT,
                    engine_family="MYSQL",
                    source=SOURCE,
                    tool=args.tool,
                    keep=args.keep / workload.name if args.keep else None,
                )
                target.start(timeout=300)
                try:
                    cost = per_query(target, password, workload)
                except RuntimeError as error:
                    print(f"{workload.name}, attempt {attempt}: {error}", file=sys.stderr)
                    continue
                finally:
                    target.stop(timeout=60)
                    target.cleanup()
                break
            else:
                print(f"{workload.name}: failed")
                continue
            if args.tool == "callgrind":
                print(
                    f"{workload.name}: {cost['instructions']:,.0f} instructions/query", flush=True
                )
            elif args.tool == "cpu":
                print(f"{workload.name}: " + ", ".join(f"{v:.1f} {k}" for k, v in cost.items()))
            else:
                top = sorted(cost.items(), key=lambda item: -item[1])
                calls = ", ".join(f"{name} {n:.2f}" for name, n in top if n >= 0.01)
                print(f"{workload.name}: {sum(cost.values()):.2f} syscalls/query: {calls}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # dbmux's dicts probe alike in every run
    main()
