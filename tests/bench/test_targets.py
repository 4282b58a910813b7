"""The bench's HAProxy target: a one-thread TCP relay to either database, whose pid is the
relay itself, so the bench's /proc reader measures the hop's CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pymysql
import pytest
from bench.monitor import process_cpu_seconds
from bench.targets import HAProxy, haproxy_binary

pytestmark = pytest.mark.skipif(
    haproxy_binary() is None, reason="haproxy not installed (make system-deps)"
)


@pytest.fixture
def relay(request: pytest.FixtureRequest) -> Iterator[HAProxy]:
    target = HAProxy(upstream_port=request.param, user="u", password="p", dbname="d")
    target.start()
    try:
        yield target
    finally:
        target.stop()
        target.cleanup()


@pytest.mark.parametrize("relay", [5432], indirect=True)
def test_relays_postgresql(relay: HAProxy) -> None:
    with psycopg.connect(
        host=relay.host, port=relay.port, user="postgres", dbname="postgres", connect_timeout=5
    ) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


@pytest.mark.parametrize("relay", [3306], indirect=True)
def test_relays_mariadb(relay: HAProxy) -> None:
    conn = pymysql.connect(host=relay.host, port=relay.port, user="root", connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 41 + 1")
            assert cur.fetchone() == (42,)
    finally:
        conn.close()


@pytest.mark.parametrize("relay", [5432], indirect=True)
def test_the_pid_is_the_one_threaded_relay_itself(relay: HAProxy) -> None:
    assert relay.pid is not None
    assert Path(f"/proc/{relay.pid}/comm").read_text().strip() == "haproxy"
    assert [t.name for t in Path(f"/proc/{relay.pid}/task").iterdir()] == [str(relay.pid)]
    assert process_cpu_seconds(relay.pid) is not None


@pytest.mark.parametrize("relay", [5432], indirect=True)
def test_config_is_a_plain_tcp_relay_in_the_foreground(relay: HAProxy) -> None:
    assert relay.workdir is not None
    lines = [line.strip() for line in (relay.workdir / "haproxy.cfg").read_text().splitlines()]
    assert "nbthread 1" in lines
    assert "mode tcp" in lines
    assert not {"daemon", "master-worker"} & set(lines)
    assert f"server db 127.0.0.1:{relay.upstream_port}" in lines


@pytest.mark.parametrize("relay", [5432], indirect=True)
def test_stops_on_sigterm(relay: HAProxy) -> None:
    assert relay.alive()
    assert relay.stop() is None  # no SIGKILL needed
    assert not relay.alive()
