"""Cheap measurements taken around and during a run: server connections and CPU time.

Server connections are counted from pg_stat_activity over one persistent superuser
connection (opened before any storm, so it never competes for a slot; superusers also have
reserved slots), sampled by a background thread. CPU comes from /proc: the proxy process's
user + system time, and the whole machine's busy time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_COUNT_SQL = (
    "SELECT count(*), count(*) FILTER (WHERE state = 'active')"
    " FROM pg_stat_activity WHERE usename = %s"
)


def process_cpu_seconds(pid: int | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a live process (all its threads), None if unknown."""
    fields = _stat_fields(pid) if pid is not None else None
    if fields is None:
        return None
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK  # utime, stime


def process_schedstat(pid: int | None) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of all threads of pid."""
    if pid is None:
        return None
    on_cpu = waiting = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            run_ns, wait_ns, _ = (task / "schedstat").read_text().split()
            on_cpu += int(run_ns)
            waiting += int(wait_ns)
    except (OSError, ValueError):
        return None
    return on_cpu / 1e9, waiting / 1e9


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()  # fields from 3 (state) on, 0-based here


def tree_cpu_seconds(root: int | None) -> float | None:
    """CPU seconds of root, its reaped children and its live children (e.g. the postmaster:
    backends that exited are in its cutime/cstime, running ones are read one by one)."""
    if root is None:
        return None
    fields = _stat_fields(root)
    if fields is None:
        return None
    ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _stat_fields(int(entry.name))
            if child is not None and child[1] == str(root):  # ppid
                ticks += sum(int(v) for v in child[11:15])
    return ticks / _TICK


def machine_cpu() -> tuple[float, float, float]:
    """(busy, irq, total) CPU seconds of the whole machine since boot, summed over all cores;
    irq (hard + soft interrupts, e.g. loopback packet delivery) is part of busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    busy = total - values[3] - values[4]
    return busy / _TICK, (values[5] + values[6]) / _TICK, total / _TICK


def context_switches() -> int:
    """Context switches on the whole machine since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class Snapshot:
    """Counters read at the start and the end of a run; their difference is what it cost."""

    time: float
    proxy: tuple[float, float] | None  # user, system
    proxy_sched: tuple[float, float] | None  # on a CPU, waiting for one
    postgres: float | None
    busy: float
    irq: float
    total: float
    context_switches: int

    @classmethod
    def take(cls, proxy_pid: int | None, postmaster_pid: int | None) -> Snapshot:
        busy, irq, total = machine_cpu()
        return cls(
            time=time.monotonic(),
            proxy=process_cpu_seconds(proxy_pid),
            proxy_sched=process_schedstat(proxy_pid),
            postgres=tree_cpu_seconds(postmaster_pid),
            busy=busy,
            irq=irq,
            total=total,
            context_switches=context_switches(),
        )


@dataclass
class Window:
    peak_connections: int = 0
    peak_active: int = 0
    samples: int = 0


class ConnectionSampler:
    """Samples the number of server connections of one user every `interval` seconds."""

    def __init__(
        self, dsn: str, user: str, psql: Callable[[str], str], interval: float = 0.25
    ) -> None:
        self.user = user
        self._psql = psql
        self.interval = interval
        self._lock = threading.Lock()
        self._window = Window()
        self._stop = threading.Event()
        self._query: Callable[[], tuple[int, int]]
        self._conn = None
        try:
            import psycopg

            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
            self._query = self._query_psycopg
        except ImportError:  # psycopg comes with dbmux[demo]; psql is the slow fallback
            self._query = self._query_psql
            self.interval = max(interval, 1.0)
        self._thread = threading.Thread(target=self._run, name="conn-sampler", daemon=True)

    def _query_psycopg(self) -> tuple[int, int]:
        assert self._conn is not None
        row = self._conn.execute(_COUNT_SQL, (self.user,)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def _query_psql(self) -> tuple[int, int]:
        sql = _COUNT_SQL.replace("%s", "'" + self.user.replace("'", "''") + "'")
        total, active = self._psql(sql).split("|")
        return int(total), int(active)

    def current(self) -> tuple[int, int]:
        with self._lock:
            return self._query()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                total, active = self.current()
            except Exception:  # a missed sample is not worth a crash
                continue
            with self._lock:
                w = self._window
                w.peak_connections = max(w.peak_connections, total)
                w.peak_active = max(w.peak_active, active)
                w.samples += 1

    def start(self) -> None:
        self._thread.start()

    def begin(self) -> None:
        with self._lock:
            self._window = Window()

    def end(self) -> Window:
        with self._lock:
            window, self._window = self._window, Window()
        return window

    def logins(self) -> int | None:
        """Sessions ever established on the cluster (pg_stat_database.sessions, PG 14+)."""
        sql = "SELECT sum(sessions)::bigint FROM pg_stat_database"
        try:
            with self._lock:
                if self._conn is not None:
                    row = self._conn.execute(sql).fetchone()
                    return int(row[0]) if row and row[0] is not None else None
                return int(self._psql(sql))
        except Exception:
            return None

    def wait_quiet(self, timeout: float = 15.0) -> int:
        """Wait until the user has no server connections left; how many remain."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                total, _ = self.current()
            except Exception:
                total = -1
            if total == 0 or time.monotonic() > deadline:
                return total
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
