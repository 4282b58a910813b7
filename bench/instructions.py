"""dbmux's own CPU work per PostgreSQL transaction, counted instead of timed.

`python -m bench.instructions` runs `dbmux serve` under callgrind on a throwaway cluster and
prints, per workload, the instructions the dbmux process executes per transaction (user
space, every thread). Wall-clock CPU times swing on a shared machine; instruction counts
repeat to within a percent or so, which is what an A/B comparison of a hot-path change needs.

Login and pool warm-up are left out by difference: after a warm-up run, pgbench runs twice
with the same clients, `-t SHORT` and `-t LONG`, each between two callgrind dumps; both runs
log in the same clients, so (I_long - I_short) / (clients * (LONG - SHORT)) is the cost of a
transaction alone. The `connect` workload connects anew for each transaction (pgbench -C),
so its figure is the cost of a whole connection: startup, SCRAM, one SELECT, close.

With `--syscalls`, the same workloads run against a plain (not valgrind) dbmux under
`strace -c -f`, and the system calls per transaction are printed by name: kernel time is half
of the proxy's CPU, and each send() on loopback runs the receiver's TCP stack too.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dbmux
from bench import pgbench
from bench.runner import MAX_CONNECTIONS, POOL_PERCENT
from bench.targets import Dbmux
from dbmux.testing import PostgresCluster

USER = DBNAME = "bench"
PASSWORD = "bench-instructions"
SCALE = 10
SOURCE = Path(dbmux.__file__).parent.parent  # this checkout's src/, whichever the venv installed


@dataclass(frozen=True)
class Workload:
    name: str
    args: tuple[str, ...]
    clients: int
    short: int  # -t of the first measured run
    long: int  # -t of the second


WORKLOADS = (
    Workload("select-simple", ("-S",), 50, 10, 40),
    Workload("select-extended", ("-S", "-M", "extended"), 50, 10, 40),
    Workload("tpcb", (), 10, 20, 80),
    # A SCRAM login per transaction (-C): what one connect costs, login to close.
    Workload("connect", ("-S", "-C"), 50, 2, 10),
)


class CallgrindDbmux(Dbmux):
    """dbmux serve under callgrind, instrumentation off until `instrument()` (startup
    under full instrumentation would take minutes and is not what is measured)."""

    def _env(self) -> dict[str, str] | None:
        return {**(super()._env() or os.environ), "PYTHONHASHSEED": "0"}  # same dicts each run

    def _command(self) -> list[str]:
        assert self.workdir is not None
        out = str(self.workdir / "callgrind.out")
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        return [*valgrind, f"--callgrind-out-file={out}", *super()._command()]

    def control(self, *args: str) -> None:
        cmd = ["callgrind_control", *args, str(self.pid)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)

    def dump(self) -> int:
        """Dump the counters (which zeroes them); the instructions since the last dump."""
        before = set(self._dumps())
        self.control("--dump")
        deadline = time.monotonic() + 300
        while not (new := set(self._dumps()) - before):
            if time.monotonic() > deadline:
                raise RuntimeError("callgrind wrote no dump")
            time.sleep(0.1)
        total = 0
        self.last_dumps = sorted(new)
        for path in new:
            text = _read_complete(path)
            match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
            if match is None:
                raise RuntimeError(f"no totals in {path}")
            total += int(match[1])
        return total

    def _dumps(self) -> list[Path]:
        assert self.workdir is not None
        return list(self.workdir.glob("callgrind.out.*"))


def _read_complete(path: Path) -> str:
    """A dump file once callgrind has finished writing it (totals is its last line)."""
    deadline = time.monotonic() + 60
    while True:
        text = path.read_text()
        if re.search(r"^totals: \d+", text, re.MULTILINE) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def run_pgbench(binary: str, target: Dbmux, workload: Workload, transactions: int) -> None:
    cmd = [binary, "-n", "-h", target.host, "-p", str(target.port), "-U", USER]
    cmd += [*workload.args, "-c", str(workload.clients), "-j", "2", "-t", str(transactions)]
    done = subprocess.run(
        [*cmd, DBNAME],
        capture_output=True,
        text=True,
        env=pgbench.client_env(PASSWORD),
        timeout=900,
    )
    if done.returncode != 0 or "number of failed transactions: 0" not in done.stdout:
        raise RuntimeError(f"pgbench failed:\n{done.stdout}\n{done.stderr}")


def instructions(
    binary: str, cluster: PostgresCluster, workloads: list[Workload], annotate: int
) -> None:
    target = CallgrindDbmux(
        upstream_port=cluster.port,
        user=USER,
        password=PASSWORD,
        dbname=DBNAME,
        max_connections_percent=POOL_PERCENT,
        source=SOURCE,
    )
    target.start(timeout=180)
    try:
        target.control("--instr=on")
        print(f"{'workload':<16} {'instructions/tx':>16}  (clients, -t short/long)")
        for workload in workloads:
            run_pgbench(binary, target, workload, 5)  # warm-up: the pool's connections
            target.dump()
            run_pgbench(binary, target, workload, workload.short)
            short = target.dump()
            short_dumps = target.last_dumps
            run_pgbench(binary, target, workload, workload.long)
            long = target.dump()
            transactions = workload.clients * (workload.long - workload.short)
            per_tx = (long - short) / transactions
            print(
                f"{workload.name:<16} {per_tx:>16,.0f}  "
                f"({workload.clients}, {workload.short}/{workload.long})",
                flush=True,
            )
            if annotate:
                top = _top_functions(short_dumps, target.last_dumps, transactions, annotate)
                print(top, flush=True)
    finally:
        target.stop(timeout=120)
        target.cleanup()


def _top_functions(short: list[Path], long: list[Path], transactions: int, count: int) -> str:
    """The `count` C functions costing most per transaction, inclusive (callees too): each
    function's cost in the long run less that in the short one, so logins cancel out."""
    costs = _function_costs(long)
    for name, cost in _function_costs(short).items():
        costs[name] = costs.get(name, 0) - cost
    top = sorted(costs.items(), key=lambda item: -item[1])[:count]
    return "\n".join(f"{cost / transactions:>12,.0f}  {name}" for name, cost in top)


def _function_costs(dumps: list[Path]) -> dict[str, int]:
    cmd = ["callgrind_annotate", "--inclusive=yes", "--threshold=100", *map(str, dumps)]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    costs: dict[str, int] = {}
    for match in re.finditer(r"^\s*([\d,]+) \([\s\d.]+%\)\s+(\S+)", text, re.MULTILINE):
        name = match[2].rsplit("/", 1)[-1]  # file:function, without the build's directories
        costs[name] = costs.get(name, 0) + int(match[1].replace(",", ""))
    return costs


_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?([a-z]\w*)\s*$")


def syscalls(binary: str, cluster: PostgresCluster, workloads: list[Workload]) -> None:
    target = Dbmux(
        upstream_port=cluster.port,
        user=USER,
        password=PASSWORD,
        dbname=DBNAME,
        max_connections_percent=POOL_PERCENT,
        source=SOURCE,
    )
    target.start()
    try:
        for workload in workloads:
            run_pgbench(binary, target, workload, 5)
            with tempfile.NamedTemporaryFile("r", suffix=".strace") as report:
                cmd = ["strace", "-c", "-f", "-o", report.name, "-p", str(target.pid)]
                tracer = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
                time.sleep(1)  # attached
                run_pgbench(binary, target, workload, workload.long)
                tracer.terminate()
                tracer.wait(timeout=60)
                rows = map(_STRACE_ROW.match, report.read().splitlines())
                calls = {m[2]: int(m[1]) for m in rows if m and m[2] != "total"}
            count = workload.clients * workload.long
            total = sum(calls.values()) / count
            top = sorted(calls.items(), key=lambda item: -item[1])[:8]
            shown = ", ".join(f"{name} {n / count:.2f}" for name, n in top)
            print(f"{workload.name:<16} {total:5.2f} syscalls/tx: {shown}", flush=True)
    finally:
        target.stop()
        target.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument(
        "--only", help="workloads, comma-separated: " + ", ".join(w.name for w in WORKLOADS)
    )
    parser.add_argument(
        "--annotate", type=int, default=0, metavar="N", help="print the top N functions (C level)"
    )
    parser.add_argument("--syscalls", action="store_true", help="also count syscalls (strace)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else [w.name for w in WORKLOADS]
    unknown = set(names) - {w.name for w in WORKLOADS}
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    workloads = [w for w in WORKLOADS if w.name in names]
    binary = pgbench.find_pgbench()
    cluster = PostgresCluster(max_connections=MAX_CONNECTIONS, password=PASSWORD)
    try:
        cluster.start()
        cluster.create_user(USER, PASSWORD)
        cluster.create_database(DBNAME, USER)
        init = [binary, "-i", "-q", "-s", str(SCALE), "-h", cluster.host, "-p", str(cluster.port)]
        subprocess.run(
            [*init, "-U", USER, DBNAME],
            check=True,
            capture_output=True,
            env=pgbench.client_env(PASSWORD),
        )
        instructions(binary, cluster, workloads, args.annotate)
        if args.syscalls:
            syscalls(binary, cluster, workloads)
    finally:
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
