"""Run sysbench 1.0 (Debian's, MySQL driver) once and parse what it prints.

sysbench writes its statistics and its errors to stdout, several threads' lines sometimes
interleaved. Runs use --mysql-ignore-errors=all, so a failed query is counted (ignored
errors) and a lost connection is reconnected (reconnects) instead of ending the run; errors
it cannot get past (a connection refused at start, say) are FATAL and end it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench import client
from bench.client import ClientResult

_TRANSACTIONS = re.compile(r"^\s*transactions:\s+(\d+)\s+\(([\d.]+) per sec\.\)", re.MULTILINE)
_QUERIES = re.compile(r"^\s*queries:\s+(\d+)\s+\(([\d.]+) per sec\.\)", re.MULTILINE)
_IGNORED = re.compile(r"^\s*ignored errors:\s+(\d+)", re.MULTILINE)
_RECONNECTS = re.compile(r"^\s*reconnects:\s+(\d+)", re.MULTILINE)
_LATENCY_AVG = re.compile(r"^Latency \(ms\):\n(?:.*\n)*?\s*avg:\s+([\d.]+)", re.MULTILINE)
_LATENCY_P95 = re.compile(r"^\s*95th percentile:\s+([\d.]+)", re.MULTILINE)
_THREADS = re.compile(r"^Number of threads: (\d+)", re.MULTILINE)
_ERROR = re.compile(r"(?:FATAL|WARNING|ALERT): (.+)$")
_PORT = re.compile(r"port \d+")


def find_sysbench() -> str | None:
    return shutil.which("sysbench")


def sysbench_version(sysbench: str) -> str:
    out = subprocess.run([sysbench, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def client_env() -> dict[str, str]:
    """This process's environment minus the variables that would point libmariadb elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MYSQL_", "MARIADB_"))}


def connection_args(host: str, port: int, user: str, password: str, db: str) -> list[str]:
    """The MySQL driver's options (over TCP: "localhost" would mean the Unix socket)."""
    return [
        "--db-driver=mysql",
        f"--mysql-host={host}",
        f"--mysql-port={port}",
        f"--mysql-user={user}",
        f"--mysql-password={password}",
        f"--mysql-db={db}",
    ]


@dataclass
class SysbenchResult(ClientResult):
    """tps: events (sysbench's transactions) per second; clients: --threads."""

    tool = "sysbench"

    queries: int | None = None
    ignored_errors: int | None = None
    latency_p95_ms: float | None = None
    fatal_errors: int = 0  # FATAL lines: errors sysbench could not get past

    @property
    def failures(self) -> int:
        """Errors sysbench ignored plus those it stopped at."""
        return (self.ignored_errors or 0) + self.fatal_errors


def _float(pattern: re.Pattern[str], text: str, group: int = 1) -> float | None:
    m = pattern.search(text)
    return float(m.group(group)) if m else None


def _int(pattern: re.Pattern[str], text: str) -> int | None:
    m = pattern.search(text)
    return int(m.group(1)) if m else None


def parse(stdout: str) -> dict[str, Any]:
    """The numbers of one run's output; missing ones are None."""
    errors: Counter[str] = Counter()
    fatal = 0
    for line in stdout.splitlines():
        m = _ERROR.search(line)
        if m:
            fatal += "FATAL: " in line
            errors[_PORT.sub("port N", m.group(1).strip())] += 1
    ignored = _int(_IGNORED, stdout)
    if ignored:  # sysbench names them only at --verbosity=5, which costs 10-15% throughput
        errors[
            "errors ignored without their text (oltp_read_write's are usually InnoDB "
            "deadlocks, 1213, directly too)"
        ] = ignored
    return {
        "tps": _float(_TRANSACTIONS, stdout, 2),
        "transactions": _int(_TRANSACTIONS, stdout),
        "qps": _float(_QUERIES, stdout, 2),
        "queries": _int(_QUERIES, stdout),
        "ignored_errors": ignored,
        "reconnects": _int(_RECONNECTS, stdout),
        "latency_ms": _float(_LATENCY_AVG, stdout),
        "latency_p95_ms": _float(_LATENCY_P95, stdout),
        "clients": _int(_THREADS, stdout),
        "fatal_errors": fatal,
        "errors": dict(errors.most_common(8)),
    }


def prepare(sysbench: str, test: str, options: list[str]) -> None:
    """`sysbench TEST OPTIONS prepare`: create and fill the tables; raises with its output."""
    cmd = [sysbench, test, *options, "prepare"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=client_env(), timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"sysbench prepare failed:\n{done.stdout[-2000:]}{done.stderr}")


def run(
    sysbench: str, test: str, *, options: list[str], duration: int, grace: float = 60.0
) -> SysbenchResult:
    """`sysbench TEST OPTIONS --time=DURATION run`; killed if it runs grace s too long
    (sysbench waits for its threads' last queries to return)."""
    cmd = [sysbench, test, *options, f"--time={duration}", "--mysql-ignore-errors=all", "run"]
    done = client.run(cmd, env=client_env(), limit=duration + grace)
    return SysbenchResult(**done.common(), **parse(done.stdout + done.stderr))
