"""The idle-20k row's clients: many SCRAM logins that then stay idle, held by child processes
the benchmark controls (it measures the proxy while they are idle)."""

from __future__ import annotations

from bench.idleclients import IdleClients, Outcome

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, RunningProxy, wait_until

DEADLINE = 60.0


def clients(proxy: RunningProxy, count: int, per_process: int | None = None) -> IdleClients:
    return IdleClients(
        host=proxy.host,
        port=proxy.port,
        user=APP_USER,
        password=APP_PASSWORD,
        database=APP_DB,
        clients=count,
        concurrency=10,
        per_process=per_process,
    )


def test_every_client_logs_in_and_stays_connected_until_closed(proxy: RunningProxy) -> None:
    idle = clients(proxy, 50)
    try:
        seen: list[Outcome] = []
        ready = idle.wait_ready(DEADLINE, seen.append)
        assert (ready.connected, ready.failed) == (50, 0), ready.errors
        assert proxy.metrics.client_connections.value == 50
        closed = idle.close(DEADLINE)
    finally:
        idle.kill()
    assert (closed.connected, closed.dropped) == (50, 0)
    wait_until(lambda: proxy.metrics.client_connections.value == 0, "the clients closed")


def test_the_clients_are_shared_among_child_processes(proxy: RunningProxy) -> None:
    idle = clients(proxy, 25, per_process=10)
    try:
        assert len(idle.procs) == 3
        ready = idle.wait_ready(DEADLINE)
        assert (ready.connected, ready.failed) == (25, 0), ready.errors
    finally:
        idle.close(DEADLINE)


def test_a_wrong_password_is_a_failed_login_not_a_crash(proxy: RunningProxy) -> None:
    idle = IdleClients(
        host=proxy.host,
        port=proxy.port,
        user=APP_USER,
        password="wrong",
        database=APP_DB,
        clients=3,
    )
    try:
        ready = idle.wait_ready(DEADLINE)
    finally:
        idle.close(DEADLINE)
    assert (ready.connected, ready.failed) == (0, 3)
    assert any("28P01" in error for error in ready.errors)
