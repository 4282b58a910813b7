"""`dbmux serve` with several workers: the supervisor process.

It starts `workers` worker processes (`dbmux serve --worker`), each running every proxy of the
config on the same listening ports (SO_REUSEPORT: the kernel spreads new connections among
them). It holds what they share: the connection budget of every target (Ledger), the way
from one worker to another (a cancel request or KILL for a client another worker owns), one
admin API and /metrics for all of them, reloads, and the workers' lives: one that dies is
started again, and the slots it held are free at once (its server connections died with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbmux.admin.listener import AdminListener
from dbmux.auth.scram import name_secret
from dbmux.config import Config, ConfigError, load_config
from dbmux.engines.base import PeerUnavailable
from dbmux.metrics import Registry
from dbmux.proxy import RELOAD_ERRORS, refused
from dbmux.workers.admin import WorkersApi
from dbmux.workers.channel import Channel
from dbmux.workers.ledger import Grant, Key, Ledger

log = logging.getLogger("dbmux.workers")

START_TIMEOUT = 120.0  # seconds a worker may take to listen (secrets, TLS files, keys)
STOP_GRACE = 10.0  # seconds past shutdown_timeout before a worker that does not exit is killed
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after successive failures to start
STABLE = 60.0  # seconds a worker must run for a later death to count as its first


class WorkerStartError(ConfigError):
    """A worker could not start (its own log says why)."""


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ready: asyncio.Future[None] | None = None
    failures: int = 0  # deaths in a row, each soon after its start
    started_at: float = 0.0
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def restart_delay(self) -> float:
        return RESTART_DELAYS[min(self.failures, len(RESTART_DELAYS) - 1)]

    @property
    def live(self) -> bool:
        return (
            self.ready is not None
            and self.ready.done()
            and self.channel is not None
            and self.channel.is_open
        )


def refuse_port_zero(config: Config) -> None:
    """Port 0 would give every worker a port of its own."""
    for path, address in config.listen_addresses():
        if address.port == 0:
            raise ConfigError(
                f"{path}: port 0 with {config.worker_count} workers would give each "
                "worker a port of its own: name a port, or set workers: 1"
            )


class Supervisor:
    """The worker processes of one config file and what they share."""

    def __init__(self, config: Config, path: Path, *, log_args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.path = path
        self.log_args = log_args  # --log-level/--log-format, passed on to the workers
        self.ledger = Ledger()
        self.workers = [Worker(i) for i in range(config.worker_count)]
        self.stopping = False
        self.admin = AdminListener(self, lambda token: WorkersApi(self, token))
        self._reloading = asyncio.Lock()
        self.registry = Registry()  # the supervisor's own series, beside the workers'
        self.registry.gauge("Workers", "Worker processes running").observe_with(
            lambda: sum(1 for w in self.workers if w.live)
        )
        self._restarts = self.registry.counter(
            "WorkerRestarts", "Worker processes started again after they died"
        ).labels()
        self._sparing: set[Key] = set()  # budgets whose idle slots are being asked for
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return self.admin.address

    def describe(self) -> str:
        return f"{len(self.workers)} workers, {len(self.config.proxies)} proxies"

    async def start(self) -> None:
        refuse_port_zero(self.config)
        try:
            await asyncio.gather(*(self._start(worker) for worker in self.workers))
            await self.admin.start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self, worker: Worker) -> None:
        """Start `worker` and wait until it listens; WorkerStartError if it exits first."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        worker.ready = loop.create_future()
        worker.channel = await Channel.open(ours, lambda body: self._handle(worker, body))
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "dbmux",
                "serve",
                "--config",
                str(self.path),
                *self.log_args,
                "--worker",
                f"{worker.index}:{theirs.fileno()}",
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
            )
        finally:
            theirs.close()
        worker.started_at = loop.time()
        watch = loop.create_task(self._watch(worker, worker.process))
        worker.tasks.add(watch)
        watch.add_done_callback(worker.tasks.discard)
        await asyncio.wait(
            {worker.ready, watch}, timeout=START_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        if not worker.ready.done():
            code = worker.process.returncode
            if code is None:  # hung: a worker that never listens must not linger
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            raise WorkerStartError(
                f"worker {worker.index} "
                + (f"exited with code {code}" if code is not None else "did not listen")
                + " while starting (its log above says why)"
            )
        log.debug("worker %d (pid %d) listening", worker.index, worker.process.pid)

    async def _watch(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        """When a worker exits: free what it held; unless stopping, start it again."""
        code = await process.wait()
        if worker.channel is not None:
            worker.channel.close()
        self._settle(self.ledger.forget(worker.index))
        assert worker.ready is not None
        if self.stopping or not worker.ready.done():
            return
        loop = asyncio.get_running_loop()
        lived = loop.time() - worker.started_at
        worker.failures = 0 if lived > STABLE else worker.failures + 1
        delay = worker.restart_delay
        log.warning(
            "worker %d (pid %d) exited with code %s after %.0f s; starting it again in %g s",
            worker.index,
            process.pid,
            code,
            lived,
            delay,
        )
        await asyncio.sleep(delay)
        while not self.stopping:
            try:
                await self._start(worker)
            except (WorkerStartError, OSError) as error:
                worker.failures += 1
                delay = worker.restart_delay
                log.error("%s; trying again in %g s", error, delay)
                await asyncio.sleep(delay)
                continue
            self._restarts.value += 1
            log.info("worker %d started again (pid %d)", worker.index, worker.process.pid)  # type: ignore[union-attr]
            return

    # -- what the workers send ----------------------------------------------------------------

    async def _handle(self, worker: Worker, body: tuple[Any, ...]) -> Any:
        kind = body[0]
        if kind == "name secret":
            return name_secret()
        if kind == "config":
            return self.config
        if kind == "ready":
            assert worker.ready is not None
            if not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == "ask":
            log.debug("worker %d asks %d slots of %s", worker.index, body[2], body[1])
            self._settle(self.ledger.ask(worker.index, body[1], body[2]), body[1])
        elif kind == "give":
            log.debug("worker %d gives %d slots of %s back", worker.index, body[2], body[1])
            self._settle(self.ledger.give(worker.index, body[1], body[2]), body[1])
        elif kind == "limit":
            self._settle(self.ledger.learn(body[1], body[2]), body[1])
        elif kind == "suspect":
            for other in self.workers:
                if other is not worker and other.live and other.channel is not None:
                    other.channel.tell("suspect", body[1])
        elif kind == "peer":
            _, owner, proxy, request = body
            if not 0 <= owner < len(self.workers) or not self.workers[owner].live:
                raise PeerUnavailable(f"no worker {owner} is running")
            channel = self.workers[owner].channel
            assert channel is not None
            return await channel.ask("peer", proxy, request)
        else:
            raise ValueError(f"unknown message {kind!r}")
        return None

    def _settle(self, outcome: tuple[list[Grant], list[Grant]], key: Key | None = None) -> None:
        """Send the ledger's grants and sheds; then, for the budgets they concern (and `key`,
        the one a worker's message was about), look for idle slots if some still lack."""
        grants, sheds = outcome
        for kind, items in (("grant", grants), ("shed", sheds)):
            for item in items:
                log.debug("%s %d slots of %s to worker %d", kind, item.count, item.key, item.worker)
                channel = self.workers[item.worker].channel
                if channel is not None:
                    channel.tell(kind, item.key, item.count)
        concerned = {item.key for item in (*grants, *sheds)} | ({key} if key is not None else set())
        for budget in concerned:
            if budget not in self._sparing and self.ledger.lacking(budget)[0]:
                self._sparing.add(budget)
                task = asyncio.get_running_loop().create_task(self._spare(budget))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _spare(self, key: Key) -> None:
        """Waiting workers lack slots that fair shares do not bring: ask the other workers,
        the biggest holders first, to close idle connections (their slots come back as
        gives, which the ledger grants to who waits)."""
        try:
            for index in self.ledger.lacking(key)[1]:
                lacking = self.ledger.lacking(key)[0]
                channel = self.workers[index].channel
                if lacking <= 0:
                    return
                if channel is None or not self.workers[index].live:
                    continue
                try:
                    closed = await channel.ask("spare", key, lacking)
                except PeerUnavailable:
                    continue
                log.debug("worker %d closed %d idle connections of %s", index, closed, key)
        finally:
            self._sparing.discard(key)

    # -- asking every worker ------------------------------------------------------------------

    async def fan_out(self, *body: Any, timeout: float = 30.0) -> list[Any]:
        """Every live worker's answer to `body`, in worker order (a worker that fails to
        answer is left out)."""
        live = [w for w in self.workers if w.live and w.channel is not None]
        answers = await asyncio.gather(
            *(w.channel.ask(*body, timeout=timeout) for w in live if w.channel is not None),
            return_exceptions=True,
        )
        for worker, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("worker %d did not answer %r: %s", worker.index, body[0], answer)
        return [a for a in answers if not isinstance(a, BaseException)]

    async def reload(self, path: Path | None = None) -> dict[str, Any]:
        """Read the config file and hand it to every worker (SIGHUP, the admin API), with the
        answer of Process.reload; `workers` itself changes at the next start."""
        async with self._reloading:
            try:
                config = await asyncio.to_thread(load_config, path or self.path)
                if config.worker_count > 1:
                    refuse_port_zero(config)
            except RELOAD_ERRORS as error:
                return refused(str(error))
            if config.worker_count != len(self.workers):
                log.warning(
                    "workers: %d -> %d applies at the next start",
                    len(self.workers),
                    config.worker_count,
                )
            answers = await self.fan_out("reload", config, timeout=120.0)
            if not answers:
                return refused("no worker answered")
            for answer in answers:
                if answer["status"] == "refused":
                    return dict(answer)
            self.config = config
            return dict(answers[0])

    # -- stopping -----------------------------------------------------------------------------

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    async def _wait_all(self, timeout: float) -> None:
        processes = [w.process for w in self.workers if w.process is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in processes]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=timeout)
        if pending:
            log.warning("%d workers did not exit in time: killing them", len(pending))
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(waits, timeout=STOP_GRACE)

    async def drain(self, timeout: float | None = None) -> dict[str, Any]:
        """Every worker drains (as one dbmux process does on SIGTERM), then exits."""
        self.stopping = True
        limit = self.config.shutdown_timeout if timeout is None else timeout
        self._signal_all(signal.SIGTERM)
        await self._wait_all(limit + STOP_GRACE)
        await self.admin.stop()
        return {"workers": [w.process.returncode for w in self.workers if w.process]}

    async def stop(self) -> None:
        """Stop at once: a second SIGTERM makes a draining worker stop at once too."""
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        await self._wait_all(STOP_GRACE)
        await self.admin.stop()
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.close()
