"""Cheap measurements taken around and during a run: server connections and CPU time.

Server connections are counted from pg_stat_activity (PostgreSQL) or
information_schema.PROCESSLIST (MariaDB) over one persistent superuser connection (opened
before any storm, so it never competes for a slot; superusers also have slots of their own),
sampled by a background thread. CPU comes from /proc: the proxy process's user + system
time, and the whole machine's busy time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_PG_COUNT_SQL = (
    "SELECT count(*), count(*) FILTER (WHERE state = 'active')"
    " FROM pg_stat_activity WHERE usename = %s"
)
_MY_COUNT_SQL = (
    "SELECT COUNT(*), COALESCE(SUM(COMMAND <> 'Sleep'), 0)"
    " FROM information_schema.PROCESSLIST WHERE USER = %s"
)
# Connections counts every attempt, Aborted_connects the refused and failed ones.
_MY_LOGINS_SQL = (
    "SELECT SUM(IF(VARIABLE_NAME = 'CONNECTIONS', 1, -1) * VARIABLE_VALUE)"
    " FROM information_schema.GLOBAL_STATUS"
    " WHERE VARIABLE_NAME IN ('CONNECTIONS', 'ABORTED_CONNECTS')"
)


def process_cpu_seconds(pid: int | None) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a live process, its reaped children and its live
    children (all their threads; a dbmux with workers is a supervisor and its worker
    processes), None if unknown."""
    fields = _stat_fields(pid) if pid is not None else None
    if fields is None:
        return None
    user, system = int(fields[11]) + int(fields[13]), int(fields[12]) + int(fields[14])
    for child in _children(pid):
        stat = _stat_fields(child)
        if stat is not None:
            user += int(stat[11]) + int(stat[13])
            system += int(stat[12]) + int(stat[14])
    return user / _TICK, system / _TICK


def _children(pid: int | None) -> list[int]:
    """`pid`'s live children."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _stat_fields(int(entry.name))
            if child is not None and child[1] == str(pid):  # ppid
                found.append(int(entry.name))
    return found


def process_schedstat(pid: int | None) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of all threads of pid and
    of its live children."""
    if pid is None:
        return None
    on_cpu = waiting = 0
    try:
        for process in [pid, *_children(pid)]:
            for task in Path(f"/proc/{process}/task").iterdir():
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
    seconds = process_cpu_seconds(root)
    return None if seconds is None else sum(seconds)


@dataclass
class TreeMemory:
    """Memory of a process and its descendants, in bytes: RSS summed (library pages the
    processes share counted in each) and PSS summed (shared pages split among the processes
    that map them, so a supervisor and its workers count each page once)."""

    rss: int
    pss: int
    processes: int


def tree_memory(root: int | None) -> TreeMemory | None:
    """The memory of root and all its descendants; None if root is gone."""
    if root is None:
        return None
    memory, todo, seen = TreeMemory(0, 0, 0), [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            if pid == root:
                return None
            continue
        seen.add(pid)
        for line in rollup.splitlines():
            name, _, value = line.partition(":")
            if name in ("Rss", "Pss"):
                kib = int(value.split()[0]) * 1024
                if name == "Rss":
                    memory.rss += kib
                else:
                    memory.pss += kib
        todo += _children(pid)
    memory.processes = len(seen)
    return memory


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
    server: float | None  # the database server's processes
    busy: float
    irq: float
    total: float
    context_switches: int

    @classmethod
    def take(cls, proxy_pid: int | None, server_pid: int | None) -> Snapshot:
        busy, irq, total = machine_cpu()
        return cls(
            time=time.monotonic(),
            proxy=process_cpu_seconds(proxy_pid),
            proxy_sched=process_schedstat(proxy_pid),
            server=tree_cpu_seconds(server_pid),
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


class Admin:
    """The sampler's superuser connection: the queries it makes, one at a time."""

    min_interval = 0.0  # seconds; a slow connection samples less often

    def connections(self, user: str) -> tuple[int, int]:
        """(all, active) server connections of user now."""
        raise NotImplementedError

    def logins(self) -> int | None:
        """Sessions the server has established so far; None if it cannot tell."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PostgresAdmin(Admin):
    """psycopg (it comes with dbmux[demo]), else psql, the slow fallback."""

    def __init__(self, dsn: str, psql: Callable[[str], str]) -> None:
        self._psql = psql
        self._conn = None
        try:
            import psycopg

            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except ImportError:
            self.min_interval = 1.0

    def connections(self, user: str) -> tuple[int, int]:
        if self._conn is None:
            sql = _PG_COUNT_SQL.replace("%s", "'" + user.replace("'", "''") + "'")
            total, active = self._psql(sql).split("|")
            return int(total), int(active)
        row = self._conn.execute(_PG_COUNT_SQL, (user,)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def logins(self) -> int | None:
        """pg_stat_database.sessions (PostgreSQL 14+)."""
        sql = "SELECT sum(sessions)::bigint FROM pg_stat_database"
        if self._conn is None:
            return int(self._psql(sql))
        row = self._conn.execute(sql).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()


class MariaDBAdmin(Admin):
    """PyMySQL as root (TLS off: the throwaway server has none)."""

    def __init__(self, host: str, port: int, password: str) -> None:
        import pymysql

        self._conn = pymysql.connect(
            host=host,
            port=port,
            user="root",
            password=password,
            autocommit=True,
            ssl_disabled=True,
            connect_timeout=10,
        )

    def _row(self, sql: str, *args: str) -> tuple[Any, ...]:
        with self._conn.cursor() as cursor:
            cursor.execute(sql, args or None)
            row = cursor.fetchone()
        assert row is not None
        return tuple(row)

    def connections(self, user: str) -> tuple[int, int]:
        total, active = self._row(_MY_COUNT_SQL, user)
        return int(total), int(active)

    def logins(self) -> int | None:
        (value,) = self._row(_MY_LOGINS_SQL)
        return None if value is None else int(value)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


class ConnectionSampler:
    """Samples the number of server connections of one user every `interval` seconds."""

    def __init__(self, admin: Admin, user: str, interval: float = 0.25) -> None:
        self.admin = admin
        self.user = user
        self.interval = max(interval, admin.min_interval)
        self._lock = threading.Lock()
        self._window = Window()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conn-sampler", daemon=True)

    def current(self) -> tuple[int, int]:
        with self._lock:
            return self.admin.connections(self.user)

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
        """Sessions the server has established so far (see Admin.logins)."""
        try:
            with self._lock:
                return self.admin.logins()
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
        self.admin.close()
