"""Many logged-in PostgreSQL clients that then say nothing, for the idle-20k row.

The clients live in child processes (`python -m bench.idleclients`), as pgbench and the storm
do, so that their memory and CPU are not the benchmark's and a process's file descriptor
limit bounds only its own share. Each child runs one asyncio loop with a small Protocol per
connection and speaks the protocol itself: a startup packet and SCRAM-SHA-256, the PBKDF2
done once (dbmux.auth.scram caches the derived key, and every login of the user gets the same
salt). Logins run `--concurrency` at a time.

The child talks to its parent in JSON lines on stdout: progress every PROGRESS_EVERY seconds,
then "ready" once every login succeeded or failed. The clients then stay idle until a line (or
end of input) on stdin; the child sends Terminate on every connection, reports "closed" with
how many connections the proxy had dropped meanwhile, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import selectors
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbmux.auth.scram import ScramClient
from dbmux.eventloop import new_loop

PASSWORD_VARIABLE = "DBMUX_BENCH_PASSWORD"  # the password reaches the child here, not in argv
PROGRESS_EVERY = 1.0
LOGIN_TIMEOUT = 60.0  # seconds for one login, connect included
SPARE_FDS = 64  # a child's descriptors besides its connections
_REPO = Path(__file__).resolve().parent.parent  # on the child's PYTHONPATH
_AUTH_OK, _AUTH_SASL, _AUTH_CONTINUE, _AUTH_FINAL = 0, 10, 11, 12
_TERMINATE = b"X\0\0\0\4"


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards `needed` (up to the hard limit, which only
    CAP_SYS_RESOURCE could raise further); the soft limit it has now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed
    with contextlib.suppress(ValueError, OSError):  # the hard limit first, where allowed
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(needed, hard)))
        return needed
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# ------------------------------------------------------------------------ the child


class LoginFailed(Exception):
    pass


class Connection(asyncio.Protocol):
    """One client: messages while it logs in, then nothing but noticing a close."""

    __slots__ = ("buffer", "idle", "lost", "transport", "waiter")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.idle = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle:
            return  # a ParameterStatus or a notice: an idle client does not care
        self.buffer += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def message(self) -> tuple[int, bytes]:
        """The next message: (type byte, payload)."""
        while True:
            if len(self.buffer) >= 5:
                length = struct.unpack_from("!I", self.buffer, 1)[0]
                if len(self.buffer) >= 1 + length:
                    kind, payload = self.buffer[0], bytes(self.buffer[5 : 1 + length])
                    del self.buffer[: 1 + length]
                    return kind, payload
            if self.lost:
                raise LoginFailed("connection closed during login")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None

    def send(self, kind: bytes, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(kind + struct.pack("!I", len(payload) + 4) + payload)

    async def expect_auth(self, code: int) -> bytes:
        kind, payload = await self.message()
        if kind == ord("E"):
            raise LoginFailed(_error_text(payload))
        if kind != ord("R") or struct.unpack_from("!i", payload)[0] != code:
            raise LoginFailed(f"expected authentication request {code}, got {chr(kind)}")
        return payload[4:]


def _error_text(payload: bytes) -> str:
    fields = {p[:1]: p[1:] for p in payload.split(b"\0") if p}
    return f"{fields.get(b'C', b'').decode()} {fields.get(b'M', b'').decode(errors='replace')}"


def startup_packet(user: str, database: str) -> bytes:
    body = struct.pack("!I", 3 << 16)
    body += b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    return struct.pack("!I", len(body) + 4) + body


async def log_in(address: tuple[str, int], user: str, password: str, startup: bytes) -> Connection:
    """Connect and log in with SCRAM-SHA-256, up to the first ReadyForQuery."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Connection, *address)
    try:
        assert conn.transport is not None
        conn.transport.write(startup)
        mechanisms = (await conn.expect_auth(_AUTH_SASL)).split(b"\0")
        if b"SCRAM-SHA-256" not in mechanisms:
            raise LoginFailed(f"no SCRAM-SHA-256 among {mechanisms}")
        scram = ScramClient(password)
        first = scram.client_first()
        conn.send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
        server_first = await conn.expect_auth(_AUTH_CONTINUE)
        conn.send(b"p", scram.handle_server_first(server_first))
        scram.verify_server_final(await conn.expect_auth(_AUTH_FINAL))
        await conn.expect_auth(_AUTH_OK)
        while True:
            kind, payload = await conn.message()
            if kind == ord("E"):
                raise LoginFailed(_error_text(payload))
            if kind == ord("Z"):
                break
    except BaseException:
        if conn.transport is not None:
            conn.transport.abort()
        raise
    conn.idle = True
    conn.buffer = bytearray()
    return conn


@dataclass
class Logins:
    wanted: int
    connected: list[Connection] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def line(self, event: str, **extra: Any) -> str:
        return json.dumps(
            {
                "event": event,
                "connected": len(self.connected),
                "failed": sum(self.failed.values()),
                "seconds": round(time.monotonic() - self.started, 2),
                **extra,
            }
        )


async def run_child(args: argparse.Namespace, password: str) -> None:
    logins = Logins(args.clients)
    address = (args.host, args.port)
    startup = startup_packet(args.user, args.database)
    left = iter(range(args.clients))

    async def worker() -> None:
        for _ in left:
            try:
                async with asyncio.timeout(LOGIN_TIMEOUT):
                    conn = await log_in(address, args.user, password, startup)
            except Exception as error:  # counted by kind, the run goes on
                logins.failed[f"{type(error).__name__}: {error}"[:200]] += 1
            else:
                logins.connected.append(conn)

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            print(logins.line("progress"), flush=True)

    reporter = asyncio.create_task(progress())
    await asyncio.gather(*(worker() for _ in range(min(args.concurrency, args.clients))))
    reporter.cancel()
    print(logins.line("ready", errors=dict(logins.failed.most_common(5))), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the parent measures meanwhile
    dropped = sum(conn.lost for conn in logins.connected)
    for conn in logins.connected:
        if conn.transport is not None and not conn.lost:
            conn.transport.write(_TERMINATE)
            conn.transport.close()
    await asyncio.sleep(0.5)  # the closes go out
    print(logins.line("closed", dropped=dropped), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idleclients", description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args(argv)
    raise_fd_limit(args.clients + SPARE_FDS)
    loop = new_loop()
    try:
        loop.run_until_complete(run_child(args, os.environ[PASSWORD_VARIABLE]))
    finally:
        loop.close()
    return 0


# ------------------------------------------------------------------------ the parent


@dataclass
class Outcome:
    """What the children reported, summed."""

    connected: int = 0
    failed: int = 0
    dropped: int = 0
    seconds: float = 0.0  # the slowest child's time to log all its clients in
    errors: Counter[str] = field(default_factory=Counter)


class IdleClients:
    """The children holding `clients` connections to host:port, each child as many as its
    file descriptor limit allows."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str,
        clients: int,
        concurrency: int = 200,
        per_process: int | None = None,
    ) -> None:
        if per_process is None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
            per_process = max(1, limit - SPARE_FDS)
        shares = [per_process] * (clients // per_process)
        if clients % per_process:
            shares.append(clients % per_process)
        env = {**os.environ, PASSWORD_VARIABLE: password, "PYTHONPATH": str(_REPO)}
        self.procs: list[subprocess.Popen[str]] = []
        for share in shares:
            cmd = [sys.executable, "-m", "bench.idleclients", "--host", host, "--port", str(port)]
            cmd += ["--user", user, "--database", database, "--clients", str(share)]
            cmd += ["--concurrency", str(max(1, concurrency // len(shares)))]
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    text=True,
                )
            )
        self._last: dict[int, dict[str, Any]] = {}

    def _collect(
        self, event: str, timeout: float, progress: Callable[[Outcome], None] | None
    ) -> Outcome:
        """Read every child's lines until each has said `event` (or ended, or timed out)."""
        pending = {p.stdout.fileno(): b"" for p in self.procs if p.stdout is not None}
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            for fd in pending:
                selector.register(fd, selectors.EVENT_READ)
            while pending and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=1.0):
                    fd = int(key.fd)
                    chunk = os.read(fd, 65536)
                    *lines, pending[fd] = (pending[fd] + chunk).split(b"\n")
                    reports = [json.loads(line) for line in lines]
                    if reports:
                        self._last[fd] = reports[-1]
                    if not chunk or any(r["event"] == event for r in reports):
                        selector.unregister(fd)  # the child ended, or said it
                        del pending[fd]
                    if progress is not None:
                        progress(self._sum())
        if pending:
            raise TimeoutError(f"{len(pending)} client processes did not report {event!r}")
        return self._sum()

    def _sum(self) -> Outcome:
        total = Outcome()
        for report in self._last.values():
            total.connected += report["connected"]
            total.failed += report["failed"]
            total.dropped += report.get("dropped", 0)
            total.seconds = max(total.seconds, report["seconds"])
            total.errors.update(report.get("errors", {}))
        return total

    def wait_ready(
        self, timeout: float, progress: Callable[[Outcome], None] | None = None
    ) -> Outcome:
        """Until every login succeeded or failed: the clients are idle from then on."""
        return self._collect("ready", timeout, progress)

    def close(self, timeout: float = 60.0) -> Outcome:
        """End the clients (Terminate on each connection) and the children."""
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write("close\n")
                    proc.stdin.close()
        try:
            return self._collect("closed", timeout, None)
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def stderr_tail(self) -> str:
        """The last lines the children wrote to stderr (after they ended)."""
        lines: list[str] = []
        for proc in self.procs:
            if proc.stderr is not None and proc.poll() is not None:
                lines += proc.stderr.read().splitlines()[-5:]
        return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
