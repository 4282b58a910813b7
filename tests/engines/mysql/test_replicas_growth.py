"""A read-only endpoint drops what clients made it hold for databases nobody uses: its
per-(database, user) entries and the pools of its replicas."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pymysql
import pytest

from dbmux.testing.embedded import EmbeddedDbmux
from tests.conftest import wait_until
from tests.mysql_fixtures import (
    MY_DB,
    MY_PASSWORD,
    MY_USER,
    dbmux_in_front,
    replicated_pair,
)


@pytest.fixture(scope="module")
def dbmux(tmp_path_factory) -> Iterator[EmbeddedDbmux]:
    endpoints = [{"name": "ro", "listen": "127.0.0.1:0", "target_role": "READ_ONLY"}]
    with replicated_pair() as pair:
        secrets_dir = tmp_path_factory.mktemp("my-readers-growth")
        with dbmux_in_front(pair, secrets_dir, endpoints=endpoints) as running:
            targets = running.proxy().targets
            wait_until(lambda: all(i.role for i in targets.instances), "every target probed")
            yield running


def connect(dbmux: EmbeddedDbmux, database: str) -> pymysql.Connection:
    host, port = dbmux.address(endpoint="ro")
    return pymysql.connect(
        host=host, port=port, user=MY_USER, password=MY_PASSWORD, database=database
    )


def test_a_read_only_endpoint_drops_what_databases_nobody_uses_left(dbmux) -> None:
    """Without it every database name tried on a read-only endpoint keeps an entry in the
    endpoint and a pool on each replica for the life of the proxy."""
    route = dbmux.proxy().routes["ro"]
    replicas = list(route.sets.values())
    with connect(dbmux, MY_DB) as stays:
        wait_until(lambda: bool(route.usable), "the replica serves reads")
        for _ in range(30):
            with pytest.raises(pymysql.err.OperationalError) as caught:
                connect(dbmux, "nope_" + secrets.token_hex(4))
            assert caught.value.args[0] in (1044, 1049)
        assert len(route.pools) > 30
        assert sum(len(pools.pools) for pools in replicas) > 30
        wait_until(lambda: len(route.pools) == 1, "unused endpoint entries dropped")
        wait_until(
            lambda: sum(len(pools.pools) for pools in replicas) <= 1, "unused replica pools dropped"
        )
        assert sum(len(pools.budget.pools) for pools in replicas) <= 1
        with stays.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
