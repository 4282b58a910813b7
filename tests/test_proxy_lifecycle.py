"""A running proxy's life cycle: reload without dropping clients, pause/resume, drain."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from dbmux.config import load_config
from dbmux.engines.mysql import wire
from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, proxy_config, wait_until
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy

DEADLINE = 30.0  # seconds a test waits for a result; only a broken build ever reaches it


class Reloadable:
    """An embedded dbmux started from a config file the test rewrites and reloads."""

    def __init__(self, config: dict[str, Any], path: Path) -> None:
        self.data, self.path = config, path
        path.write_text(yaml.safe_dump(config))
        self.dbmux = EmbeddedDbmux(load_config(path)).start()
        assert self.dbmux.process is not None
        self.process = self.dbmux.process

    @property
    def settings(self) -> dict[str, Any]:
        return self.data["proxies"][0]

    def reload(self) -> dict[str, Any]:
        self.path.write_text(yaml.safe_dump(self.data))
        return self.dbmux.call(self.process.reload(self.path))

    def url(self, port: int | None = None, user: str = APP_USER, password: str = APP_PASSWORD):
        host, own = self.dbmux.address()
        return f"postgresql://{user}:{password}@{host}:{port or own}/{APP_DB}"


@pytest.fixture
def reloadable(pg: PostgresCluster, tmp_path: Path) -> Iterator[Callable[..., Reloadable]]:
    started: list[Reloadable] = []

    def start(**proxy: Any) -> Reloadable:
        running = Reloadable(proxy_config(pg, tmp_path, {}, [], **proxy), tmp_path / "dbmux.yaml")
        started.append(running)
        return running

    yield start
    for running in started:
        running.dbmux.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_reload_changes_limits_and_timeouts_without_dropping_clients(
    reloadable: Callable[..., Reloadable],
) -> None:
    running = reloadable()
    with psycopg.connect(running.url(), autocommit=True) as client:
        assert client.execute("SELECT 1").fetchone() == (1,)
        running.settings.update(max_client_connections=1, idle_client_timeout=900)
        running.settings["target_group"]["connection_pool_config"]["connection_borrow_timeout"] = 7
        result = running.reload()
        assert result["status"] == "applied"
        assert set(result["changed"]["test"]) >= {
            "max_client_connections",
            "idle_client_timeout",
            "target_group",
        }
        assert client.execute("SELECT 2").fetchone() == (2,)  # the same connection goes on
        proxy = running.dbmux.proxy()
        assert proxy.config.idle_client_timeout == 900
        assert proxy.pools.get(APP_DB, APP_USER).timeout == 7
        with pytest.raises(psycopg.OperationalError, match="max_client_connections"):
            psycopg.connect(running.url(), connect_timeout=10)


def test_reload_takes_new_auth_entries(
    reloadable: Callable[..., Reloadable], pg: PostgresCluster, pg_role: str, tmp_path: Path
) -> None:
    pg.psql(f"CREATE ROLE {pg_role} LOGIN PASSWORD 'second-password'")
    running = reloadable()
    new = running.url(user=pg_role, password="second-password")
    with psycopg.connect(running.url(), autocommit=True) as client:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(new, connect_timeout=10)
        secret = tmp_path / "second.json"
        secret.write_text(json.dumps({"username": pg_role, "password": "second-password"}))
        running.settings["auth"].append({"secret": f"file:{secret}"})
        assert running.reload()["status"] == "applied"
        with psycopg.connect(new, connect_timeout=10) as second:
            assert second.execute("SELECT current_user").fetchone() == (pg_role,)
        assert client.execute("SELECT current_user").fetchone() == (APP_USER,)


def test_an_invalid_config_is_refused_and_the_old_one_keeps_serving(
    reloadable: Callable[..., Reloadable], caplog: pytest.LogCaptureFixture
) -> None:
    running = reloadable()
    with psycopg.connect(running.url(), autocommit=True) as client:
        running.settings["max_client_connections"] = 0
        result = running.reload()
        assert result["status"] == "refused"
        assert "max_client_connections" in result["reason"]
        assert any("reload refused" in r.getMessage() for r in caplog.records)
        running.path.write_text("proxies: [")
        assert running.dbmux.call(running.process.reload())["status"] == "refused"
        assert client.execute("SELECT 1").fetchone() == (1,)
        assert running.dbmux.proxy().config.max_client_connections == 10000
        with psycopg.connect(running.url(), connect_timeout=10) as other:
            assert other.execute("SELECT 1").fetchone() == (1,)


def test_a_removed_endpoint_stops_accepting_and_its_idle_clients_are_told(
    reloadable: Callable[..., Reloadable],
) -> None:
    port = _free_port()
    running = reloadable(endpoints=[{"name": "extra", "listen": f"127.0.0.1:{port}"}])
    with (
        psycopg.connect(running.url(port), autocommit=True) as on_endpoint,
        psycopg.connect(running.url(), autocommit=True) as on_listen,
    ):
        assert on_endpoint.execute("SELECT 1").fetchone() == (1,)
        running.settings["endpoints"] = []
        assert running.reload()["status"] == "applied"
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(running.url(port), connect_timeout=10)
        with pytest.raises(psycopg.errors.AdminShutdown):
            on_endpoint.execute("SELECT 1")
        assert on_listen.execute("SELECT 1").fetchone() == (1,)
        assert running.dbmux.proxy().endpoint_addresses == {}


def test_an_added_endpoint_listens(reloadable: Callable[..., Reloadable]) -> None:
    running = reloadable()
    port = _free_port()
    running.settings["endpoints"] = [{"name": "extra", "listen": f"127.0.0.1:{port}"}]
    assert running.reload()["status"] == "applied"
    with psycopg.connect(running.url(port), autocommit=True) as client:
        assert client.execute("SELECT 1").fetchone() == (1,)


def test_pause_holds_new_transactions_until_resume(
    reloadable: Callable[..., Reloadable],
) -> None:
    running = reloadable()
    proxy = running.dbmux.proxy()
    with (
        psycopg.connect(running.url(), autocommit=True) as busy,
        psycopg.connect(running.url(), autocommit=True) as later,
        ThreadPoolExecutor(1) as pool,
    ):
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        pausing = asyncio.run_coroutine_threadsafe(proxy.pause(DEADLINE), running.dbmux.loop)
        wait_until(lambda: proxy.paused, "the proxy pauses")
        busy.execute("COMMIT")  # the transaction under way finishes
        assert pausing.result(DEADLINE)["transactions_in_flight"] == 0
        held: Future[Any] = pool.submit(lambda: later.execute("SELECT 42").fetchone())
        wait_until(lambda: sum(len(b.held) for b in proxy.budgets) == 1, "the request is held")
        assert not held.done()
        resumed = running.dbmux.call(proxy.resume())
        assert resumed["resumed_requests"] == 1
        assert held.result(DEADLINE) == (42,)


def test_drain_lets_a_transaction_commit_and_ends_idle_clients_with_57P01(
    reloadable: Callable[..., Reloadable], pg: PostgresCluster
) -> None:
    running = reloadable()
    proxy = running.dbmux.proxy()
    with (
        psycopg.connect(running.url(), autocommit=True) as working,
        psycopg.connect(running.url(), autocommit=True) as idle,
    ):
        working.execute("BEGIN")
        working.execute("INSERT INTO items (client, note) VALUES (-13, 'drain')")
        draining = asyncio.run_coroutine_threadsafe(proxy.drain(DEADLINE), running.dbmux.loop)
        wait_until(lambda: len(proxy.runtime.clients) == 1, "the idle client is ended")
        with pytest.raises(psycopg.errors.AdminShutdown):
            idle.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(running.url(), connect_timeout=10)
        working.execute("COMMIT")
        assert draining.result(DEADLINE) == {
            "proxy": "test",
            "drained": True,
            "clients_cut_off": 0,
        }
        with pytest.raises(psycopg.OperationalError):
            working.execute("SELECT 1")
    assert pg.psql("SELECT count(*) FROM items WHERE client = -13", dbname=APP_DB) == "1"
    pg.psql("DELETE FROM items WHERE client = -13", dbname=APP_DB)


async def test_drain_tells_idle_mysql_clients_the_server_shuts_down(my_proxy: MyProxy) -> None:
    """An idle MySQL client is told ERR 1053 (server shutdown, sequence id 0), then closed."""
    async with await RawMy.connect(my_proxy.host, my_proxy.port) as raw:
        _, ok = await raw.login(MY_USER, MY_PASSWORD, MY_DB)
        assert ok[0] == 0, ok
        proxy = my_proxy.embedded.proxy()
        drained = asyncio.run_coroutine_threadsafe(proxy.drain(DEADLINE), my_proxy.embedded.loop)
        seq, payload = await raw.packet()
        assert (seq, payload[0]) == (0, 0xFF), payload
        assert int.from_bytes(payload[1:3], "little") == wire.ER_SERVER_SHUTDOWN[0]
        assert b"shutting down" in payload
        assert await raw.read_all() == b""
        assert (await asyncio.wrap_future(drained))["clients_cut_off"] == 0


def test_debug_logging_logs_each_statement_redacted(
    reloadable: Callable[..., Reloadable], caplog: pytest.LogCaptureFixture
) -> None:
    running = reloadable()
    with psycopg.connect(running.url(), autocommit=True) as client:
        client.execute("SELECT 'hunter2' AS password")
        assert not [r for r in caplog.records if r.name == "dbmux.debug"]  # off by default
        running.settings["debug_logging"] = True
        assert running.reload()["status"] == "applied"
        client.execute("SELECT 'hunter2' AS password")
        client.execute("SET search_path TO public")  # replayed, not pinned
        client.execute("LISTEN lifecycle")  # pinned
    debug = [r for r in caplog.records if r.name == "dbmux.debug"]
    statements = [r.__dict__["statement"] for r in debug if "statement" in r.__dict__]
    assert "SELECT '***' AS password" in statements
    assert "hunter2" not in caplog.text
    answered = [r for r in debug if "duration_ms" in r.__dict__]
    assert answered and all(r.__dict__["server"].startswith("pid ") for r in answered)
    assert all(r.__dict__["address"].startswith("127.0.0.1:") for r in debug)
    assert any(r.__dict__.get("pin_reason") for r in debug)


@pytest.fixture(autouse=True)
def _debug_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dbmux")


def test_reload_changes_the_targets_without_dropping_clients(
    reloadable: Callable[..., Reloadable], pg: PostgresCluster
) -> None:
    running = reloadable()
    proxy = running.dbmux.proxy()
    unreachable = {"host": "127.0.0.1", "port": _free_port()}
    targets = running.settings["target_group"]["targets"]
    with psycopg.connect(running.url(), autocommit=True) as client:
        client.execute("BEGIN")
        client.execute("SELECT 1")
        running.settings["target_group"]["targets"] = [unreachable, *targets]
        running.settings["target_group"]["probe_interval"] = 0.5
        result = running.reload()
        assert result["status"] == "applied" and result["rebuilt"] == []
        names = [i.name for i in proxy.targets.instances]
        assert names == [f"127.0.0.1:{unreachable['port']}", f"{pg.host}:{pg.port}"]
        wait_until(
            lambda: proxy.targets.instances[0].health.value == "UNAVAILABLE",
            "the new target is probed",
        )
        client.execute("COMMIT")  # the transaction under way goes on
        assert client.execute("SELECT 1").fetchone() == (1,)
        running.settings["target_group"]["targets"] = targets
        assert running.reload()["status"] == "applied"
        assert [i.name for i in proxy.targets.instances] == [f"{pg.host}:{pg.port}"]
        assert proxy.targets.interval == 0.5
        assert client.execute("SELECT 2").fetchone() == (2,)


def test_mysql_debug_logging_logs_each_query_redacted(
    start_my_proxy: Callable[..., MyProxy], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_my_proxy(debug_logging=True)
    with proxy.connect() as client, client.cursor() as cursor:
        cursor.execute("SELECT 'hunter2' AS password, 1")
        cursor.execute("SELECT GET_LOCK('lifecycle', 0)")  # pins
    debug = [r for r in caplog.records if r.name == "dbmux.debug"]
    statements = [r.__dict__["statement"] for r in debug if "statement" in r.__dict__]
    assert "SELECT '***' AS password, 1" in statements
    assert "hunter2" not in caplog.text
    answered = [r for r in debug if "duration_ms" in r.__dict__]
    assert answered and all(r.__dict__["server"].startswith("thread ") for r in answered)
    assert any(r.__dict__.get("pin_reason") for r in debug)


def test_reload_starts_an_added_proxy_and_drains_a_removed_one(
    reloadable: Callable[..., Reloadable],
) -> None:
    running = reloadable()
    port = _free_port()
    second = {**running.settings, "name": "second", "listen": f"127.0.0.1:{port}"}
    running.data["proxies"].append(second)
    result = running.reload()
    assert (result["status"], result["added"]) == ("applied", ["second"])
    with psycopg.connect(running.url(port), autocommit=True) as client:
        assert client.execute("SELECT 1").fetchone() == (1,)
        running.data["proxies"].pop()
        result = running.reload()
        assert (result["status"], result["removed"]) == ("applied", ["second"])
        with pytest.raises(psycopg.errors.AdminShutdown):
            client.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(running.url(port), connect_timeout=10)
    assert [p.config.name for p in running.process.proxies] == ["test"]
