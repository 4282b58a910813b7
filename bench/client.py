"""A benchmark client run (pgbench, sysbench, the storm): the child process and its result.

Every client runs as a child process, so that its CPU time is its own (from wait4's rusage)
and it never shares an interpreter with the benchmark's samplers. Output goes to files, not
pipes: a storm of failing clients writes more to stderr than a pipe holds.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class ClientResult:
    """What one client run reports; the numbers a tool does not give stay None."""

    tool: ClassVar[str]

    command: list[str]
    returncode: int | None  # None: killed after the grace period (the target hung)
    wall_seconds: float
    cpu_seconds: float  # the client's own user + system time
    tps: float | None = None
    latency_ms: float | None = None  # average
    transactions: int | None = None
    qps: float | None = None  # queries per second, where the tool counts queries
    reconnects: int | None = None  # where the tool reconnects after a lost connection
    clients: int | None = None
    aborted_clients: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # distinct error -> count
    stderr_tail: str = ""
    timed_out: bool = False

    @property
    def failures(self) -> int:
        raise NotImplementedError

    @property
    def all_aborted(self) -> bool:
        """Every client was aborted: the run ended early, tps covers only what ran before."""
        return bool(self.clients) and self.aborted_clients >= (self.clients or 0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tool"] = self.tool
        data["failures"] = self.failures
        data["all_aborted"] = self.all_aborted
        return data


@dataclass(frozen=True)
class Finished:
    """How a client process ended and what it wrote."""

    command: list[str]
    returncode: int | None  # None: killed after the grace period
    wall_seconds: float
    cpu_seconds: float
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def common(self) -> dict[str, Any]:
        """The ClientResult fields every client shares."""
        return {
            "command": self.command,
            "returncode": self.returncode,
            "wall_seconds": round(self.wall_seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "stderr_tail": "\n".join(self.stderr.splitlines()[-10:]),
            "timed_out": self.timed_out,
        }


def allow_open_files(wanted: int) -> int:
    """Raise this process's open-file limit, which every client and proxy inherits, to
    `wanted` (up to the hard limit, past it if we are root); the soft limit now in force.

    pgbench refuses to start with fewer than -c + 3 open files, and a proxy holds one per
    client besides its server connections: 1,000 clients do not fit the usual 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted and os.geteuid() == 0:
            hard = wanted
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def _wait(pid: int, deadline: float) -> tuple[int | None, float]:
    """Reap pid by deadline: (exit code or None if still running, its CPU seconds)."""
    while True:
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited == pid:
            return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None, 0.0
        time.sleep(0.05)


def run(cmd: list[str], *, env: Mapping[str, str], limit: float) -> Finished:
    """Run cmd to completion; SIGKILL it if it runs `limit` seconds."""
    with tempfile.TemporaryDirectory(prefix="dbmux-bench-client-") as tmp:
        out_path, err_path = Path(tmp, "stdout"), Path(tmp, "stderr")
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.monotonic()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=dict(env)
            )
        # Popen.wait() cannot report rusage, so reap it ourselves and tell Popen.
        try:
            code, cpu = _wait(proc.pid, started + limit)
        except BaseException:  # Ctrl-C, SIGTERM: the client must not outlive us
            proc.kill()
            proc.wait()
            raise
        timed_out = code is None
        if timed_out:
            proc.send_signal(signal.SIGKILL)
            code, cpu = _wait(proc.pid, time.monotonic() + 10)
        proc.returncode = code
        wall = time.monotonic() - started
        return Finished(
            command=cmd,
            returncode=None if timed_out else code,
            wall_seconds=wall,
            cpu_seconds=cpu,
            stdout=out_path.read_text(errors="replace"),
            stderr=err_path.read_text(errors="replace"),
        )
