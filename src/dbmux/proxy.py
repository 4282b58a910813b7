"""A running proxy: its listeners, pools, janitor and shutdown; and the process running them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbmux.auth.secrets import Credentials, read_secret
from dbmux.config import (
    ClientPasswordAuthType,
    Config,
    ConfigError,
    EngineFamily,
    ProxyConfig,
    Target,
    TargetRole,
)
from dbmux.engines.base import ClientSession, Engine, ServerConnection, ServerError
from dbmux.metrics import ProxyMetrics, Registry
from dbmux.pool import PoolKey, PoolSet
from dbmux.targets import GONE_ERRORS, Instance, TargetGroup

log = logging.getLogger("dbmux.proxy")

JANITOR_INTERVAL = 1.0


@dataclass(slots=True)
class Clock:
    """A coarse clock the janitor advances, so the hot path reads an attribute, not the OS."""

    now: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class UserSecret:
    credentials: Credentials
    auth_type: ClientPasswordAuthType | None


@dataclass
class ProxyRuntime:
    """What an engine needs to serve one proxy's clients."""

    config: ProxyConfig
    pools: PoolSet
    users: dict[str, UserSecret]
    metrics: ProxyMetrics
    clock: Clock
    targets: TargetGroup
    clients: set[ClientSession] = field(default_factory=set)


def engine_for(family: EngineFamily) -> Engine:
    if family is EngineFamily.POSTGRESQL:
        from dbmux.engines.postgres.engine import PostgresEngine

        return PostgresEngine()
    from dbmux.engines.mysql.engine import MysqlEngine

    return MysqlEngine()


def load_users(config: ProxyConfig, base_dir: Path) -> dict[str, UserSecret]:
    users: dict[str, UserSecret] = {}
    for entry in config.auth:
        credentials = read_secret(entry.secret, base_dir=base_dir)
        users[credentials.username] = UserSecret(credentials, entry.client_password_auth_type)
    return users


class Proxy:
    """One configured proxy: a listener per endpoint in front of one target group."""

    def __init__(self, config: ProxyConfig, *, registry: Registry, base_dir: Path) -> None:
        self.config = config
        self.engine = engine_for(config.engine_family)
        self.metrics = ProxyMetrics(registry, config.name)
        self.users = load_users(config, base_dir)
        pool_config = config.target_group.connection_pool_config
        self.pools = PoolSet(pool_config, self._open, self.metrics)
        self.targets = TargetGroup(
            list(config.target_group.targets),
            self._probe,
            interval=config.target_group.probe_interval,
            on_writer_change=self._writer_changed,
        )
        self.pools.budget.on_trouble = self.targets.suspect
        self.runtime = ProxyRuntime(
            config, self.pools, self.users, self.metrics, Clock(), self.targets
        )
        self.servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []
        self._janitor: asyncio.Task[None] | None = None
        self._register_gauges()

    def _register_gauges(self) -> None:
        m, proxy = self.metrics, self.config.name
        m.client_connections.observe_with(lambda: len(self.runtime.clients), proxy=proxy)
        m.database_connections.observe_with(lambda: self.pools.budget.open, proxy=proxy)
        m.database_connections_borrowed.observe_with(lambda: self.pools.lent_count, proxy=proxy)
        m.max_database_connections.observe_with(lambda: self.pools.budget.limit or 0, proxy=proxy)

    async def _open(self, key: PoolKey, read_limit: bool) -> ServerConnection:
        """A connection to the writer; during a failover, wait for the next one."""
        pool_config = self.config.target_group.connection_pool_config
        secret = self.users[key.user]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + pool_config.connection_borrow_timeout
        while True:
            writer = await self.targets.wait_for_writer(max(0.0, deadline - loop.time()))
            generation = self.targets.generation
            try:
                conn = await self.engine.connect(
                    writer.target,
                    secret.credentials,
                    key,
                    init_query=pool_config.init_query,
                    read_limit=read_limit,
                )
            except ServerError as error:
                # Nothing was sent for the client yet, so trying the next writer is safe.
                remaining = deadline - loop.time()
                if error.code not in GONE_ERRORS or remaining <= 0:
                    raise
                if await self.targets.still_writer(writer, remaining):
                    raise
                continue
            if generation == self.targets.generation:
                conn.generation = generation
                return conn
            conn.close()  # the writer changed while we logged in: go to the new one

    async def _probe(self, target: Target) -> bool:
        credentials = next(iter(self.users.values())).credentials
        return await self.engine.probe(target, credentials)

    def _writer_changed(self, old: Instance | None, new: Instance | None) -> None:
        if old is not None:
            log.warning(
                "proxy %s: writer %s -> %s; connections to %s are retired",
                self.config.name,
                old.name,
                new.name if new is not None else "(none yet)",
                old.name,
            )
        self.pools.retire(self.targets.generation)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        factory = self.engine.serve(self.runtime)
        listens = [self.config.listen]
        for endpoint in self.config.endpoints:
            if endpoint.target_role is TargetRole.READ_ONLY:
                raise ConfigError(
                    f"proxy {self.config.name}: endpoint {endpoint.name}: READ_ONLY endpoints "
                    "need replica routing, which this version does not have yet"
                )
            listens.append(endpoint.listen)
        for address in listens:
            server = await loop.create_server(
                factory, address.host, address.port, reuse_address=True, backlog=4096
            )
            self.servers.append(server)
            self.addresses.append(server.sockets[0].getsockname()[:2])
        self._janitor = loop.create_task(self._run_janitor())
        self.targets.start()
        log.info(
            "proxy %s (%s) listening on %s, targets %s",
            self.config.name,
            self.config.engine_family.value,
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            ", ".join(i.name for i in self.targets.instances),
        )

    async def _run_janitor(self) -> None:
        """Once a second: advance the clock, reap idle server connections, expire idle clients."""
        clock = self.runtime.clock
        limit = self.config.idle_client_timeout
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            clock.now = time.monotonic()
            try:
                self.pools.sweep()
                for client in [c for c in self.runtime.clients if c.logged_in]:
                    if clock.now - client.last_active > limit:
                        client.expire(f"idle_client_timeout ({limit:g} s)")
            except Exception:
                log.exception("janitor pass failed")

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
        self.targets.stop()
        for server in self.servers:
            server.close()
        for client in list(self.runtime.clients):
            client.expire("the proxy is shutting down")
        self.pools.close_all()
        for server in self.servers:
            await server.wait_closed()


class Process:
    """Every proxy of a config file, plus the shared metrics registry."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = Registry()
        self.proxies = [
            Proxy(p, registry=self.registry, base_dir=config.base_dir) for p in config.proxies
        ]

    async def start(self) -> None:
        for proxy in self.proxies:
            await proxy.start()

    async def stop(self) -> None:
        for proxy in self.proxies:
            await proxy.stop()
