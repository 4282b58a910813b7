"""What one MySQL client can make the proxy hold stays bounded: the prepared statements it
keeps, the SET outcomes the proxy memoizes. (Pools for the databases it names:
tests/test_session.py, for both engines.)"""

from __future__ import annotations

import pytest

from dbmux.engines.mysql import settings, statements, wire
from dbmux.engines.mysql.engine import MyContext
from tests.myraw import RawMy
from tests.mysql_fixtures import MY_DB, MY_PASSWORD, MY_USER, MyProxy


def context(proxy: MyProxy) -> MyContext:
    ctx = proxy.embedded.proxy().engine._context  # type: ignore[attr-defined]
    assert ctx is not None
    return ctx


async def test_a_client_cannot_prepare_more_statements_than_the_limit(
    my_proxy: MyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the cap a client's COM_STMT_PREPAREs grow its statement map in the proxy
    without bound. Past it, the server's own error 1461; closing one makes room."""
    monkeypatch.setattr(statements, "MAX_CLIENT_STATEMENTS", 50)  # 10,000 in production
    async with await RawMy.connect(my_proxy.host, my_proxy.port) as raw:
        _, ok = await raw.login(MY_USER, MY_PASSWORD, MY_DB)
        assert ok[0] == 0, ok
        for n in range(60):
            raw.command(b"\x16SELECT ? + %d" % (n % 7))
        replies = [(await raw.response(wire.RESPONSE_PREPARE))[0] for _ in range(60)]
        assert [r[0] for r in replies] == [0] * 50 + [0xFF] * 10
        assert int.from_bytes(replies[-1][1:3], "little") == 1461
        (client,) = my_proxy.embedded.proxy().runtime.clients
        assert len(client.statements) == 50  # type: ignore[attr-defined]
        raw.command(b"\x19" + replies[0][1:5])  # COM_STMT_CLOSE of the first: no reply
        raw.command(b"\x16SELECT ?")
        assert (await raw.response(wire.RESPONSE_PREPARE))[0][0] == 0


def test_memoized_set_outcomes_stay_within_their_capacity(my_proxy: MyProxy) -> None:
    """Without the bound every SET text a client invents stays in the memo; texts longer
    than a real SET are not memoized at all."""
    memo = context(my_proxy).set_results
    memo.capacity = 20  # 10,000 in production
    with my_proxy.connect() as client, client.cursor() as cur:
        for n in range(60):
            cur.execute(f"SET SESSION sort_buffer_size = {65536 + n}")
            assert len(memo) <= 20
        cur.execute("SET SESSION sql_mode = '" + "ANSI," * 1000 + "ANSI'")
        assert all(len(text) < 4096 for _, text in memo)
        cur.execute("SELECT @@SESSION.sort_buffer_size")
        assert cur.fetchone() == (65536 + 59,)
    assert len(memo) == 20


def test_a_session_carrying_too_many_variables_is_pinned_and_keeps_them(
    my_proxy: MyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the cap each variable a client sets is carried (and replayed on every
    borrow) for good; past it the session keeps its server connection, which holds them."""
    monkeypatch.setattr(settings, "MAX_CARRIED_STATE", 20)  # 1,000 in production
    with my_proxy.connect() as conn, conn.cursor() as cur:
        for n in range(60):
            cur.execute(f"SET @v{n} = {n}")
        (client,) = my_proxy.embedded.proxy().runtime.clients
        assert client.pin_reason == settings.SESSION_STATE_SIZE  # type: ignore[attr-defined]
        assert len(client.wanted) <= 21  # type: ignore[attr-defined]
        assert len(client.touched) == 0  # type: ignore[attr-defined]
        cur.execute("SELECT @v0, @v59")
        assert cur.fetchone() == (0, 59)


def test_a_pinned_session_does_not_track_the_variables_it_sets(my_proxy: MyProxy) -> None:
    """Without it a pinned session (whose server connection holds its state anyway) adds
    the name of every variable it sets to a set the proxy never clears."""
    with my_proxy.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMPORARY TABLE pinned (a INT)")
        for n in range(100):
            cur.execute(f"SET @w{n} = {n}")
        (client,) = my_proxy.embedded.proxy().runtime.clients
        assert client.pin_reason is not None  # type: ignore[attr-defined]
        assert len(client.touched) == 0  # type: ignore[attr-defined]
        cur.execute("SELECT @w99")
        assert cur.fetchone() == (99,)


async def test_the_texts_a_client_keeps_prepared_are_bounded_in_bytes_too(
    my_proxy: MyProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without it a client under the statement count still makes the proxy hold up to
    10,000 texts of a whole command each (gigabytes); past the byte cap, 1461 as well."""
    monkeypatch.setattr(statements, "MAX_CLIENT_STATEMENT_BYTES", 10_000)  # 64 MiB in production
    async with await RawMy.connect(my_proxy.host, my_proxy.port) as raw:
        _, ok = await raw.login(MY_USER, MY_PASSWORD, MY_DB)
        assert ok[0] == 0, ok
        texts = [b"SELECT ? /* %d %s */" % (n, b"x" * 3000) for n in range(4)]
        replies = []
        for text in texts:
            raw.command(b"\x16" + text)
            replies.append((await raw.response(wire.RESPONSE_PREPARE))[0])
        assert [r[0] for r in replies] == [0, 0, 0, 0xFF]
        assert int.from_bytes(replies[-1][1:3], "little") == 1461
        raw.command(b"\x19" + replies[0][1:5])  # COM_STMT_CLOSE of the first: no reply
        raw.command(b"\x16" + texts[3])
        assert (await raw.response(wire.RESPONSE_PREPARE))[0][0] == 0
