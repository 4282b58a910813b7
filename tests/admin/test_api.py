"""The admin API as an operator uses it: a dbmux with real psycopg clients connected, and what
/api/... and /metrics say about them; the bearer token; closing one client."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from dbmux.auth.secrets import SecretError
from dbmux.config import ConfigError
from dbmux.engines.mysql.wire import ER_CLIENT_INTERACTION_TIMEOUT
from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from tests.admin.answers import call, get_json
from tests.conftest import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    WAIT,
    RunningProxy,
    proxy_config,
    wait_until,
)
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER

TOKEN = "admin-token-0123456789"


@pytest.fixture
def admin(proxy: RunningProxy) -> str:
    return proxy.embedded.admin_url


@pytest.fixture
def connections(proxy: RunningProxy) -> Iterator[list[psycopg.Connection]]:
    """Three psycopg clients through the proxy, in autocommit (idle between statements)."""
    with ExitStack() as stack:
        conns = [
            stack.enter_context(psycopg.connect(proxy.url(), autocommit=True)) for _ in range(3)
        ]
        for conn in conns:
            conn.execute("SELECT 1")
        yield conns


def clients(admin: str) -> list[dict]:
    return get_json(f"{admin}/api/proxies/test/clients")["Clients"]


def local_port(conn: psycopg.Connection) -> int:
    """The client's own port: what the proxy sees as the client's address."""
    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        return sock.getsockname()[1]
    finally:
        sock.detach()


def test_every_connected_client_is_listed_with_who_and_where(admin, proxy, connections):
    rows = clients(admin)
    assert sorted(row["Port"] for row in rows) == sorted(map(local_port, connections))
    for row in rows:
        assert row["Address"] == "127.0.0.1"
        assert (row["User"], row["Database"], row["Endpoint"]) == (APP_USER, APP_DB, "test")
        assert (row["State"], row["PinReason"], row["TLS"]) == ("idle", None, False)
        assert row["TransactionAge"] is None and row["ServerId"] is None
    assert len({row["Id"] for row in rows}) == 3


def test_a_client_gone_is_no_longer_listed(admin, connections):
    connections[0].close()
    wait_until(lambda: len(clients(admin)) == 2, "the closed client leaves the list")


def test_a_client_in_a_transaction_is_active_on_the_server_it_holds(admin, proxy):
    with psycopg.connect(proxy.url()) as conn:  # not autocommit: the SELECT opens a transaction
        conn.execute("SELECT 1")
        (row,) = clients(admin)
        assert row["State"] == "active"
        assert row["TransactionAge"] >= 0
        servers = get_json(f"{admin}/api/proxies/test/servers")["Servers"]
        (held,) = [s for s in servers if s["Id"] == row["ServerId"]]
        assert held["State"] == "lent" and held["ClientId"] == row["Id"]
        assert (held["User"], held["Database"]) == (APP_USER, APP_DB)
        assert held["Target"] == f"{proxy.embedded.proxy().targets.instances[0].name}"
        conn.rollback()
        servers = get_json(f"{admin}/api/proxies/test/servers")["Servers"]
        assert all(s["State"] == "idle" and s["ClientId"] is None for s in servers)
        assert clients(admin)[0]["State"] == "idle"


def test_a_pinned_client_shows_why(admin, proxy, connections):
    connections[1].execute("LISTEN news")
    rows = {row["Port"]: row for row in clients(admin)}
    pinned = [row for row in rows.values() if row["State"] == "pinned"]
    assert [row["PinReason"] for row in pinned] == ["listen"]
    assert pinned[0]["ServerId"] is not None
    assert sum(row["State"] == "idle" for row in rows.values()) == 2


def test_the_proxy_is_described_with_rds_proxy_field_names_and_no_password(admin, proxy):
    described = get_json(f"{admin}/api/proxies")["DBProxies"]
    assert [p["DBProxyName"] for p in described] == ["test"]
    one = get_json(f"{admin}/api/proxies/test")["DBProxy"]
    assert one == described[0]
    assert one["EngineFamily"] == "POSTGRESQL"
    assert one["Status"] == "available"
    assert one["Endpoint"] == f"{proxy.host}:{proxy.port}"
    assert (one["RequireTLS"], one["DebugLogging"]) == (False, False)
    assert one["IdleClientTimeout"] == 1800
    (auth,) = one["Auth"]
    assert auth["AuthScheme"] == "SECRETS" and auth["SecretArn"].startswith("file:")
    assert (auth["IAMAuth"], auth["ClientPasswordAuthType"]) == (
        "DISABLED",
        "POSTGRES_SCRAM_SHA_256",
    )
    assert APP_PASSWORD not in call(f"{admin}/api/proxies").body.decode()


def test_the_target_group_reports_its_pool_settings(admin):
    (group,) = get_json(f"{admin}/api/proxies/test/target-groups")["TargetGroups"]
    assert (group["TargetGroupName"], group["IsDefault"], group["Status"]) == (
        "default",
        True,
        "available",
    )
    pool = group["ConnectionPoolConfig"]
    assert (pool["MaxConnectionsPercent"], pool["MaxIdleConnectionsPercent"]) == (20, 10)
    assert (pool["SessionPinningFilters"], pool["InitQuery"]) == ([], "")


def test_a_target_reports_its_role_and_health(admin, pg: PostgresCluster, connections):
    (target,) = get_json(f"{admin}/api/proxies/test/targets")["Targets"]
    assert (target["Endpoint"], target["Port"]) == (pg.host, pg.port)
    assert (target["Role"], target["IsWriter"]) == ("READ_WRITE", True)
    assert target["TargetHealth"] == {"State": "AVAILABLE"}


def test_an_unreachable_target_says_why(tmp_path):
    nowhere = SimpleNamespace(host="127.0.0.1", port=1)  # nothing listens on port 1
    with EmbeddedDbmux(proxy_config(nowhere, tmp_path, {}, [])) as dbmux:
        url = f"{dbmux.admin_url}/api/proxies/test/targets"
        wait_until(
            lambda: get_json(url)["Targets"][0]["TargetHealth"]["State"] == "UNAVAILABLE",
            "the probe fails",
        )
        (target,) = get_json(url)["Targets"]
        assert (target["Role"], target["IsWriter"]) == ("UNKNOWN", False)
        assert target["TargetHealth"]["Reason"] == "CONNECTION_FAILED"
        assert "refused" in target["TargetHealth"]["Description"]


def test_metrics_are_prometheus_text_with_the_client_count(admin, connections):
    answer = call(f"{admin}/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = answer.body.decode()
    assert re.search(r'^dbmux_client_connections\{endpoint="default",proxy="test"\} 3$', text, re.M)
    connections[0].close()
    two = 'dbmux_client_connections{endpoint="default",proxy="test"} 2'
    wait_until(lambda: two in call(f"{admin}/metrics").body.decode(), "the metric follows")


def test_closing_a_client_gives_its_driver_the_terminated_error(admin, connections):
    victim = connections[0]
    target = next(row for row in clients(admin) if row["Port"] == local_port(victim))
    answer = call(f"{admin}/api/proxies/test/clients/{target['Id']}/close", "POST")
    assert (answer.status, answer.json) == (200, {"Id": target["Id"], "Closed": True})
    with pytest.raises(psycopg.OperationalError) as caught:
        victim.execute("SELECT 1")
    assert caught.value.sqlstate == "57P01"
    assert "admin API" in str(caught.value)
    for other in connections[1:]:
        assert other.execute("SELECT 2").fetchone() == (2,)
    wait_until(lambda: len(clients(admin)) == 2, "the closed client leaves the list")


def test_closing_an_unknown_client_or_proxy_is_404(admin, connections):
    for path in ("test/clients/999999/close", "test/clients/x/close", "nope/clients/1/close"):
        answer = call(f"{admin}/api/proxies/{path}", "POST")
        assert answer.status == 404 and "message" in answer.json
    assert len(clients(admin)) == 3


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nothing", 404),
        ("GET", "/api/nothing", 404),
        ("GET", "/api/proxies/nope", 404),
        ("GET", "/api/proxies/nope/clients", 404),
        ("POST", "/api/proxies", 405),
        ("DELETE", "/api/proxies/test", 405),
        ("GET", "/api/proxies/test/clients/1/close", 405),
        ("POST", "/api/reload", 422),  # an embedded proxy has no config file to read
        ("POST", "/api/proxies/nope/drain", 404),
    ],
)
def test_what_is_not_there_is_a_json_error(admin, method, path, status):
    answer = call(f"{admin}{path}", method)
    assert answer.status == status
    assert answer.headers["Content-Type"] == "application/json"
    if status == 405:
        assert answer.headers["Allow"]
    if status != 422:
        assert answer.json["message"]
    if status == 422:
        assert "not started from a config file" in answer.json["reason"]


def test_pause_holds_a_new_transaction_until_resume(admin, connections):
    paused = call(f"{admin}/api/proxies/test/pause", "POST")
    assert paused.status == 200 and paused.json["paused"] is True
    finished = threading.Event()

    def transaction() -> None:
        connections[0].execute("SELECT 1")
        finished.set()

    worker = threading.Thread(target=transaction)
    worker.start()
    assert not finished.wait(1.0)  # held, not failed
    resumed = call(f"{admin}/api/proxies/test/resume", "POST")
    assert resumed.status == 200 and resumed.json["paused"] is False
    assert finished.wait(WAIT)
    worker.join(WAIT)


def test_requests_a_web_page_could_forge_are_refused(admin):
    host = admin.removeprefix("http://")
    assert call(f"{admin}/api/proxies", Origin="http://evil.example").status == 403
    assert call(f"{admin}/api/proxies", Origin=f"http://{host}").status == 200
    # DNS rebinding: a name that resolved to 127.0.0.1 for a page of that name.
    assert call(f"{admin}/api/proxies", Host="evil.example:9187").status == 403
    assert call(f"{admin}/api/proxies", Host=f"localhost:{host.split(':')[1]}").status == 200


@pytest.fixture
def guarded(pg: PostgresCluster, tmp_path: Path, monkeypatch) -> Iterator[str]:
    """A dbmux whose admin API wants a bearer token, read from the environment."""
    monkeypatch.setenv("DBMUX_TEST_ADMIN_TOKEN", TOKEN)
    config = proxy_config(pg, tmp_path, {}, [])
    config["admin"] = {"listen": "127.0.0.1:0", "token": "env:DBMUX_TEST_ADMIN_TOKEN"}
    with EmbeddedDbmux(config) as dbmux:
        yield dbmux.admin_url


@pytest.mark.parametrize("path", ["/metrics", "/api/proxies", "/api/proxies/test/clients"])
def test_with_a_token_configured_every_request_must_carry_it(guarded, path):
    missing = call(f"{guarded}{path}")
    assert missing.status == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert call(f"{guarded}{path}", token="wrong").status == 401
    assert call(f"{guarded}{path}", token=TOKEN[:-1]).status == 401
    assert call(f"{guarded}{path}", Authorization=f"Basic {TOKEN}").status == 401
    assert call(f"{guarded}{path}", token=TOKEN).status == 200
    assert TOKEN not in missing.body.decode()


def test_a_token_from_a_file_works_and_a_host_name_is_then_fine(pg, tmp_path):
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    config = proxy_config(pg, tmp_path, {}, [])
    config["admin"] = {"listen": "127.0.0.1:0", "token": f"file:{tmp_path / 'admin-token'}"}
    with EmbeddedDbmux(config) as dbmux:
        url = f"{dbmux.admin_url}/api/proxies"
        assert call(url, token=TOKEN, Host="admin.internal").status == 200
        assert call(url, token="x", Host="admin.internal").status == 401


def test_a_token_reference_that_holds_nothing_stops_the_start(pg, tmp_path, monkeypatch):
    monkeypatch.delenv("DBMUX_TEST_ADMIN_TOKEN", raising=False)
    config = proxy_config(pg, tmp_path, {}, [])
    config["admin"] = {"listen": "127.0.0.1:0", "token": "env:DBMUX_TEST_ADMIN_TOKEN"}
    dbmux = EmbeddedDbmux(config)
    try:
        with pytest.raises(SecretError, match="DBMUX_TEST_ADMIN_TOKEN is not set"):
            dbmux.start()
    finally:
        dbmux.stop()
    monkeypatch.setenv("DBMUX_TEST_ADMIN_TOKEN", "  \n")
    dbmux = EmbeddedDbmux(config)
    try:
        with pytest.raises(SecretError, match="env:DBMUX_TEST_ADMIN_TOKEN holds nothing"):
            dbmux.start()
    finally:
        dbmux.stop()


def test_an_admin_port_in_use_stops_the_start_naming_the_setting(pg, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = proxy_config(pg, tmp_path, {}, [])
        port = taken.getsockname()[1]
        config["admin"] = {"listen": f"127.0.0.1:{port}"}
        dbmux = EmbeddedDbmux(config)
        try:
            with pytest.raises(ConfigError, match=f"admin.listen 127.0.0.1:{port}: cannot listen"):
                dbmux.start()
        finally:
            dbmux.stop()


def test_the_openapi_document_is_served(admin):
    document = get_json(f"{admin}/api/openapi.json")
    assert document["openapi"].startswith("3.")
    assert "/api/proxies/{name}/clients/{id}/close" in document["paths"]
    json.dumps(document)  # plain JSON throughout


async def test_a_mysql_client_is_listed_and_closing_it_sends_the_goodbye_error(start_my_proxy):
    proxy = start_my_proxy()
    admin = proxy.embedded.admin_url
    async with await RawMy.connect(proxy.host, proxy.port) as raw:
        _, ok = await raw.login(MY_USER, MY_PASSWORD, MY_DB)
        assert ok[0] == 0, ok
        (row,) = get_json(f"{admin}/api/proxies/mytest/clients")["Clients"]
        assert (row["User"], row["Database"], row["State"]) == (MY_USER, MY_DB, "idle")
        (described,) = get_json(f"{admin}/api/proxies")["DBProxies"]
        assert described["EngineFamily"] == "MYSQL"
        assert described["Auth"][0]["ClientPasswordAuthType"].startswith("MYSQL_")
        answer = call(f"{admin}/api/proxies/mytest/clients/{row['Id']}/close", "POST")
        assert answer.status == 200
        seq, payload = await raw.packet()  # MySQL's goodbye: an ERR with sequence id 0
        assert (seq, payload[0]) == (0, 0xFF), payload
        assert int.from_bytes(payload[1:3], "little") == ER_CLIENT_INTERACTION_TIMEOUT[0]
        assert b"admin API" in payload
        assert await raw.read_all() == b""
