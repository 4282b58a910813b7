"""Run pgbench once and parse what it prints (PostgreSQL 15/16 output format).

pgbench prints its summary on stdout and every error on stderr. A run whose clients were
aborted exits with status 2 and still prints a (partial) summary; that is a result, not a
crash of the benchmark.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import client
from bench.client import ClientResult

_TPS = re.compile(r"^tps = ([\d.]+) \((.+)\)$", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.MULTILINE)
_STDDEV = re.compile(r"^latency stddev = ([\d.]+) ms", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_INITIAL_CONN = re.compile(r"^initial connection time = ([\d.]+) ms", re.MULTILINE)
_AVERAGE_CONN = re.compile(r"^average connection time = ([\d.]+) ms", re.MULTILINE)
_CLIENTS = re.compile(r"^number of clients: (\d+)", re.MULTILINE)
# -P 1, on stderr: "progress: 3.0 s, 19655.6 tps, lat 0.044 ms stddev 0.243, 0 failed"
_PROGRESS = re.compile(r"^progress: [\d.]+ s, [\d.]+ tps, lat ([\d.]+) ms", re.MULTILINE)
# "client 7 aborted while establishing connection", "client 3 script 0 aborted in command 1 ..."
_ABORTED = re.compile(r"client (\d+) (?:script \d+ )?aborted")
# "... aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist"
_ABORTED_BY = re.compile(r"aborted in command \d+ query \d+: (.+)$")
# Two pgbench threads may interleave their writes: "pgbench:pgbench: error: ..."
_PREFIX = re.compile(r"^(?:pgbench:\s*)*(?:error|fatal|warning):\s*")
_CLIENT = re.compile(r"\bclient \d+\b")


def find_pgbench() -> str:
    """pgbench on PATH, else in pg_config --bindir, else the newest Debian install."""
    found = shutil.which("pgbench")
    if found:
        return found
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if bindir and (Path(bindir) / "pgbench").is_file():
            return str(Path(bindir) / "pgbench")
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))
    if debian:
        return str(debian[-1])
    raise RuntimeError("pgbench not found (install postgresql-client or postgresql-contrib)")


def pgbench_version(pgbench: str) -> str:
    out = subprocess.run([pgbench, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def client_env(password: str, *, tls: bool = False) -> dict[str, str]:
    """This process's environment minus every PG* variable, plus the password.

    GSS encryption is off, and TLS too unless `tls`, so that no target pays an extra round
    trip per connection for a refused request, and nothing can redirect pgbench to another
    server. With `tls`, sslmode=require: every connection does a full TLS handshake (libpq
    resumes no sessions) and the client spends no CPU checking the certificate chain, which
    is not what is measured.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    sslmode = "require" if tls else "disable"
    env.update(PGPASSWORD=password, PGSSLMODE=sslmode, PGGSSENCMODE="disable")
    return env


@dataclass
class PgbenchResult(ClientResult):
    """clients: -c, as pgbench reports it; errors: distinct stderr errors."""

    tool = "pgbench"

    tps_basis: str = ""  # "without initial connection time" / "including reconnection times"
    latency_stddev_ms: float | None = None
    failed_transactions: int | None = None
    connection_ms: float | None = None  # initial (or, with -C, average) connection time
    # With -P 1: the average latency of the second with the lowest, the one least slowed down
    # by other processes on the machine.
    latency_best_second_ms: float | None = None
    # From the transaction log (--log), where the workload keeps one (read_log):
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    tx_per_client: dict[str, float] | None = None  # min, median, max over all -c clients
    clients_served: int | None = None  # clients that completed at least one transaction

    @property
    def failures(self) -> int:
        """Failed transactions plus clients pgbench aborted (e.g. could not connect)."""
        return (self.failed_transactions or 0) + self.aborted_clients


def _float(pattern: re.Pattern[str], text: str) -> float | None:
    m = pattern.search(text)
    return float(m.group(1)) if m else None


def _int(pattern: re.Pattern[str], text: str) -> int | None:
    m = pattern.search(text)
    return int(m.group(1)) if m else None


def parse(stdout: str, stderr: str) -> dict[str, Any]:
    """The numbers of one run's output; missing ones are None."""
    tps = _TPS.search(stdout)
    connection = _float(_INITIAL_CONN, stdout)
    if connection is None:
        connection = _float(_AVERAGE_CONN, stdout)
    seconds = [float(lat) for lat in _PROGRESS.findall(stderr)]
    errors: Counter[str] = Counter()
    for line in stderr.splitlines():
        line = line.strip()
        if not line or "Run was aborted" in line:
            continue
        if _ABORTED.search(line):  # counted below; the error, if on this line, is kept
            aborted_by = _ABORTED_BY.search(line)
            if aborted_by:
                errors[_CLIENT.sub("client N", aborted_by.group(1).strip())] += 1
            continue
        if _PREFIX.match(line) or "FATAL" in line or "ERROR" in line:
            errors[_CLIENT.sub("client N", _PREFIX.sub("", line))] += 1
    return {
        "tps": float(tps.group(1)) if tps else None,
        "tps_basis": tps.group(2) if tps else "",
        "latency_ms": _float(_LATENCY, stdout),
        "latency_stddev_ms": _float(_STDDEV, stdout),
        "transactions": _int(_PROCESSED, stdout),
        "failed_transactions": _int(_FAILED, stdout),
        "clients": _int(_CLIENTS, stdout),
        "aborted_clients": len(set(_ABORTED.findall(stderr))),
        "connection_ms": connection,
        "latency_best_second_ms": min(seconds) if seconds else None,
        "errors": dict(errors.most_common(8)),
    }


def read_log(lines: Iterable[str], clients: int) -> dict[str, Any]:
    """Fairness and latency percentiles from pgbench --log's per-transaction lines.

    A line is `client_id transaction_no time script_no time_epoch time_us [...]`, time being
    the latency in µs or `failed` / `skipped`. Every one of the `clients` counts, those that
    never completed a transaction with 0, so a starved client shows as min 0.
    """
    done = [0] * clients
    latencies: list[int] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or not fields[2].isdigit():  # failed or skipped
            continue
        client_id = int(fields[0])
        if client_id >= len(done):
            done.extend([0] * (client_id + 1 - len(done)))
        done[client_id] += 1
        latencies.append(int(fields[2]))
    if not done:
        return {}
    result: dict[str, Any] = {
        "tx_per_client": {
            "min": min(done),
            "median": statistics.median(done),
            "max": max(done),
        },
        "clients_served": sum(1 for n in done if n),
    }
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        result["latency_p50_ms"] = round(cuts[49] / 1000, 3)
        result["latency_p99_ms"] = round(cuts[98] / 1000, 3)
    return result


def _read_logs(directory: Path, clients: int) -> dict[str, Any]:
    """read_log over every thread's file (`tx.<pid>`, `tx.<pid>.<thread>`)."""
    paths = sorted(directory.glob("tx.*"))

    def lines() -> Iterable[str]:
        for path in paths:
            with path.open() as f:
                yield from f

    return read_log(lines(), clients)


def run(
    pgbench: str,
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    dbname: str,
    args: list[str],
    duration: int,
    script: str = "",
    tls: bool = False,
    transaction_log: bool = False,
    grace: float = 60.0,
) -> PgbenchResult:
    """pgbench -n ARGS [-f SCRIPT] -T DURATION against host:port; killed if it runs grace s
    too long. script: a custom transaction script's text, written to a temp file for -f.
    tls: connect with TLS (sslmode=require). transaction_log: with --log, for transactions
    per client and latency percentiles (read_log).

    -n: the caller vacuums directly beforehand, so every target starts from the same tables
    and the proxy is not timed relaying VACUUM.
    """
    with tempfile.TemporaryDirectory(prefix="dbmux-bench-pgbench-") as tmp:
        cmd = [pgbench, "-h", host, "-p", str(port), "-U", user, "-n", *args]
        if script:
            script_path = Path(tmp, "script.sql")
            script_path.write_text(script)
            cmd += ["-f", str(script_path)]
        if transaction_log:
            cmd += ["--log", f"--log-prefix={Path(tmp, 'tx')}"]
        cmd += ["-T", str(duration), dbname]
        done = client.run(cmd, env=client_env(password, tls=tls), limit=duration + grace)
        numbers = parse(done.stdout, done.stderr)
        if transaction_log:
            numbers.update(_read_logs(Path(tmp), numbers["clients"] or 0))
    return PgbenchResult(**done.common(), **numbers)
