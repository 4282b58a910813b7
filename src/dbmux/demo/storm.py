"""Serverless-style connection storms: many short-lived clients, each invocation connecting,
running one transaction and disconnecting, with every outcome counted by its cause.

``dbmux demo`` runs a fixed number of invocations with progress on screen; the benchmark
(``python -m bench``) keeps them going until a deadline. Both record into a `PhaseResult`
here, so a failure is classified and counted the same way in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

CONNECT_TIMEOUT = 20.0  # seconds a client may take to connect and log in
INVOCATION_TIMEOUT = 30.0  # seconds for a whole invocation (connect + transaction + close)
TIMEOUT = "timeout"  # the cause of an invocation that ran out of time


@dataclass
class PhaseResult:
    """One storm: the same workload either straight at the database or through dbmux."""

    name: str  # "direct" or "dbmux"
    invocations: int  # planned
    clients: int  # invocations in flight at once
    started: float = 0.0  # time.monotonic()
    elapsed: float = 0.0  # seconds, first connect to last disconnect
    done: int = 0  # invocations that finished, one way or the other
    succeeded: int = 0  # committed and disconnected cleanly
    committed: int = 0  # COMMIT acknowledged (a failed disconnect after it still counts here)
    failures: Counter[str] = field(default_factory=Counter)  # cause -> invocations
    examples: dict[str, str] = field(default_factory=dict)  # cause -> first error message
    latencies: list[float] = field(default_factory=list)  # seconds, successful invocations
    peak_server_connections: int = 0  # the app's server connections, sampled
    peak_pool_open: int = 0  # dbmux phase: server connections dbmux had open, sampled
    rows_committed: int = 0  # rows of this phase in the table afterwards
    finished: bool = False  # the storm is over, completed or not
    stopped: str | None = None  # why it ended before all invocations ran

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def throughput(self) -> float:
        """Successful invocations per second."""
        return self.succeeded / self.elapsed if self.elapsed > 0 else 0.0

    def latency(self, quantile: float) -> float | None:
        """Latency quantile (0..1) of successful invocations in seconds, None without any."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(quantile * len(ordered)) - 1)]


# Connects, runs the transaction, counts phase.committed once COMMIT is acknowledged and
# disconnects; raises on any failure. The argument is the invocation's number in the phase.
Invocation = Callable[[PhaseResult, int], Awaitable[None]]


def classify_outcome(error: BaseException) -> str:
    """The failure cause: a MySQL error code (PyMySQL), a SQLSTATE (asyncpg), "timeout", or
    the exception's class.

    MySQL errors go by code: the same refusal (1040) comes with SQLSTATE 08004 after the
    server's greeting and without one in place of it.
    """
    pymysql_err = sys.modules.get("pymysql.err")  # loaded if a PyMySQL client raised it
    mysql_error = pymysql_err is not None and isinstance(error, pymysql_err.MySQLError)
    if mysql_error and error.args and isinstance(error.args[0], int):
        return str(error.args[0])
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate
    if isinstance(error, TimeoutError):
        return TIMEOUT
    return type(error).__name__


async def invoke(phase: PhaseResult, number: int, invocation: Invocation) -> None:
    """Run one invocation and record its outcome; a cancellation is not an outcome."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(INVOCATION_TIMEOUT):
            await invocation(phase, number)
    except Exception as error:  # every failure is counted by its cause
        cause = classify_outcome(error)
        phase.failures[cause] += 1
        message = str(error) or (
            f"no answer within {INVOCATION_TIMEOUT:g} s" if cause == TIMEOUT else "(no message)"
        )
        phase.examples.setdefault(cause, f"{type(error).__name__}: {message}")
    else:
        phase.succeeded += 1
        phase.latencies.append(time.perf_counter() - started)
    phase.done += 1


async def run_clients(
    phase: PhaseResult, invocation: Invocation, deadline: float | None = None
) -> None:
    """Keep `phase.clients` invocations in flight until `phase.invocations` have started or,
    if given, time.monotonic() has passed `deadline` (invocations under way then finish)."""
    numbers = itertools.count()

    async def client() -> None:
        while (number := next(numbers)) < phase.invocations and (
            deadline is None or time.monotonic() < deadline
        ):
            await invoke(phase, number, invocation)

    async with asyncio.TaskGroup() as group:
        for _ in range(phase.clients):
            group.create_task(client())


# Runs the transaction's statements on a PyMySQL cursor: (cursor, phase name, invocation number).
Transaction = Callable[[Any, str, int], None]


@contextlib.contextmanager
def pymysql_invocations(
    connect: dict[str, Any],
    transaction: Transaction,
    threads: int,
    tls: ssl.SSLContext | None = None,
) -> Iterator[Invocation]:
    """An Invocation of PyMySQL with its default settings, as a Lambda function uses it:
    connect, BEGIN, the transaction, COMMIT, close, blocking, on one of `threads` threads.

    connect: pymysql.connect() keywords (host, port, user, password, database). tls: the
    context every connection uses, so TLS is required and the context built once, as a
    function would keep it between invocations. Without it TLS is off: PyMySQL's default
    ("preferred") builds a new SSL context per connection, about 30 ms of CPU loading the
    system's CA certificates, to find out that the server offers no TLS.
    """
    import pymysql

    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pymysql-client")
    security: dict[str, Any] = {"ssl": tls} if tls is not None else {"ssl_disabled": True}

    def blocking(name: str, number: int) -> tuple[bool, Exception | None]:
        """(COMMIT acknowledged, the error if any): errors cross the thread as values."""
        committed = False
        try:
            conn = pymysql.connect(
                **connect,
                **security,
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=INVOCATION_TIMEOUT,
                write_timeout=INVOCATION_TIMEOUT,
            )
        except Exception as error:
            return committed, error
        try:
            conn.begin()
            with conn.cursor() as cursor:
                transaction(cursor, name, number)
            conn.commit()
            committed = True
        except Exception as error:
            with contextlib.suppress(Exception):
                conn.close()
            return committed, error
        try:
            conn.close()  # COM_QUIT
        except Exception as error:
            return committed, error
        return committed, None

    async def invocation(phase: PhaseResult, number: int) -> None:
        loop = asyncio.get_running_loop()
        committed, error = await loop.run_in_executor(executor, blocking, phase.name, number)
        phase.committed += committed
        if error is not None:
            raise error

    try:
        yield invocation
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
