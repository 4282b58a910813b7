"""A worker process's end of the supervisor link: the shared budgets' slots, requests to and
from the other workers, and what the supervisor asks of it (admin API, metrics, reload)."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any

from dbmux.admin.api import AdminApi
from dbmux.admin.http import HttpError, Request, Response
from dbmux.auth.scram import use_name_secret
from dbmux.config import Config
from dbmux.engines.base import Peers, PeerUnavailable, number_servers_for
from dbmux.pool import BudgetShare, TargetBudget
from dbmux.workers.channel import Channel

if TYPE_CHECKING:
    from dbmux.proxy import Process

log = logging.getLogger("dbmux.workers")

BudgetKey = tuple[str, str]  # (proxy, target)


class _Share(BudgetShare):
    """One budget's slots, asked of and given back to the supervisor's ledger."""

    def __init__(self, link: WorkerLink, key: BudgetKey) -> None:
        self.link = link
        self.key = key

    def ask(self, count: int) -> None:
        self.link.channel.tell("ask", self.key, count)

    def give(self, count: int) -> None:
        self.link.channel.tell("give", self.key, count)

    def learned(self, limit: int) -> None:
        self.link.channel.tell("limit", self.key, limit)


class WorkerLink(Peers):
    """What connects worker `index` to its supervisor and, through it, to the other workers."""

    def __init__(self, index: int) -> None:
        self.index = index
        number_servers_for(index)
        self.channel: Channel
        self.process: Process | None = None
        self.budgets: dict[BudgetKey, TargetBudget] = {}
        self.lost = False  # the supervisor is gone: the worker drains and exits

    async def connect(self, fd: int, on_lost: Any) -> None:
        sock = socket.socket(fileno=fd)

        def lost() -> None:
            self.lost = True
            on_lost()

        self.channel = await Channel.open(sock, self.handle, lost)
        # Salts and login methods derive from the name with the supervisor's secret, so no
        # two workers answer a login as one name differently (that would tell who exists).
        use_name_secret(await self.channel.ask("name secret"))

    async def config(self) -> Config:
        """The configuration the supervisor runs (the file as last read and accepted)."""
        config: Config = await self.channel.ask("config")
        return config

    def share(self, key: BudgetKey, budget: TargetBudget) -> BudgetShare:
        """The ShareFactory of this worker's proxies."""
        self.budgets[key] = budget
        return _Share(self, key)

    def ready(self) -> None:
        self.channel.tell("ready")

    # -- Peers --------------------------------------------------------------------------------

    def tell(self, worker: int, proxy: str, request: tuple[Any, ...]) -> None:
        self.channel.tell("peer", worker, proxy, request)

    async def ask(self, worker: int, proxy: str, request: tuple[Any, ...]) -> Any:
        return await self.channel.ask("peer", worker, proxy, request)

    def writer_changed(self, proxy: str) -> None:
        self.channel.tell("suspect", proxy)

    # -- what the supervisor sends --------------------------------------------------------------

    async def handle(self, body: tuple[Any, ...]) -> Any:
        kind = body[0]
        if kind in ("grant", "shed"):
            _, key, count = body
            budget = self.budgets.get(key)
            if budget is None:  # a budget this worker dropped: the slots go back
                if kind == "grant":
                    self.channel.tell("give", key, count)
            elif kind == "grant":
                budget.grant(count)
            else:
                budget.shed(count)
            return None
        if kind == "spare":  # another worker waits: close idle connections for it
            _, key, count = body
            budget = self.budgets.get(key)
            return budget.spare(count) if budget is not None else 0
        process = self.process
        if process is None:
            raise RuntimeError("the worker is still starting")
        if kind == "suspect":  # another worker saw the writer change
            with contextlib.suppress(KeyError):  # a proxy a reload removed here
                process.proxy(body[1]).targets.suspect()
            return None
        if kind == "peer":
            _, name, request = body
            try:
                proxy = process.proxy(name)
            except KeyError:  # a reload removed it since the client connected
                raise PeerUnavailable(f"no proxy named {name!r} here") from None
            return await proxy.engine.answer_peer(proxy.listeners[0].context, request)
        if kind == "admin":
            _, method, path, payload = body
            return await _admin(process, Request(method, path, "", {}, payload))
        if kind == "metrics":
            return process.registry.snapshot()
        if kind == "reload":
            return await process.reload(config=body[1])
        raise ValueError(f"unknown request {kind!r}")


async def _admin(process: Process, request: Request) -> tuple[int, bytes, str]:
    """The admin API's answer in this worker, the supervisor having checked who asks."""
    try:
        response = await AdminApi(process, None).dispatch(request)
    except HttpError as error:
        response = Response.error(error.status, error.message)
    return response.status, response.body, response.content_type
