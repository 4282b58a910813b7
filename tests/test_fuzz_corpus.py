"""The fuzzers' corpus (bench/fuzz/corpus, kept small and minimized by `make fuzz`) replayed
through both engines' parsers, and the findings of the fuzzers kept as tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bench.fuzz import live
from bench.fuzz import mysql as my_harness
from bench.fuzz import postgres as pg_harness

from dbmux.auth.scram import ScramClient, ScramError
from dbmux.engines.postgres.pinning import Classifier
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, RunningProxy
from tests.mysql_fixtures import (  # noqa: F401 (the MySQL engine's fixtures)
    MY_DB,
    MY_PASSWORD,
    MY_USER,
    MyProxy,
    mariadb,
    my_proxy,
    start_my_proxy,
)

CORPUS = Path(__file__).parent.parent / "bench" / "fuzz" / "corpus"
HARNESSES = {"postgres": pg_harness.one_input, "mysql": my_harness.one_input}


def corpus(engine: str) -> list[Path]:
    return sorted((CORPUS / engine).iterdir())


@pytest.mark.parametrize("engine", sorted(HARNESSES))
def test_every_corpus_input_is_parsed_or_refused_cleanly(engine: str) -> None:
    """Each input drives a parser (client or server side) with raw or structured bytes in
    random chunkings: without this, a parser change that raises something other than a
    protocol violation (which drops only that client), breaks an invariant the relay relies
    on (counted ReadyForQuery, relayed bytes) or hangs would surface only in production."""
    inputs = corpus(engine)
    assert len(inputs) >= 20, "the corpus is missing; run make fuzz"
    for path in inputs:
        try:
            HARNESSES[engine](path.read_bytes())
        except Exception as error:
            raise AssertionError(f"{path.name}: {error!r}") from error


async def test_hostile_clients_replaying_the_corpus_cost_a_postgres_bystander_nothing(
    proxy: RunningProxy,
) -> None:
    """Logged-in clients send the corpus's client streams (random Parse/Bind/Execute, bad
    headers, made-up names) while a bystander runs transactions: without isolation of one
    client's bad input, a parser error in the proxy would stall or drop everyone (and the
    autouse check fails on any unhandled exception the proxy logs)."""
    login = live.Login(proxy.host, proxy.port, APP_USER, APP_PASSWORD, APP_DB)
    inputs = [path.read_bytes() for path in corpus("postgres")]
    tally = await live.storm("postgres", login, inputs)
    assert tally.sessions == len(inputs) and tally.answered > 0
    assert not tally.hung, "the proxy neither answered nor closed"


async def test_hostile_clients_replaying_the_corpus_cost_a_mysql_bystander_nothing(
    my_proxy: MyProxy,  # noqa: F811
) -> None:
    """The same for MySQL: random commands (queries, statement commands with made-up ids and
    parameters, KILL, COM_FIELD_LIST...) from logged-in clients, a bystander's transactions
    keep completing."""
    login = live.Login(my_proxy.host, my_proxy.port, MY_USER, MY_PASSWORD, MY_DB)
    inputs = [path.read_bytes() for path in corpus("mysql")]
    tally = await live.storm("mysql", login, inputs)
    assert tally.sessions == len(inputs) and tally.answered > 0
    assert not tally.hung, "the proxy neither answered nor closed"


def test_a_server_naming_an_absurd_scram_iteration_count_is_refused() -> None:
    """Found by the fuzzer: a server (or whoever answers in its place) that asks for 2**31 or
    more PBKDF2 iterations made the proxy's login raise OverflowError, not ScramError, and
    one asking for a billion held the event loop for minutes."""
    for count in ("99999999999", "1000000000"):
        client = ScramClient("pencil", nonce="abc")
        client.client_first()
        with pytest.raises(ScramError, match="iteration count"):
            client.handle_server_first(f"r=abcdef,s=c2FsdA==,i={count}".encode())


def test_a_set_after_a_leading_form_feed_is_seen() -> None:
    """Found by the fuzzer: PostgreSQL reads a form feed (and from 16 on a vertical tab) as a
    blank, so "\\fSET work_mem = ..." runs the SET; the classifier's fast path does not strip
    it and calls the text harmless, so the setting stays on the pooled connection for the
    next client."""
    for blank in (b"\f", b"\v"):
        verdict = Classifier(replay_settings=True).verdict(blank + b"SET work_mem = 1234")
        assert verdict.settings == frozenset({"work_mem"})


def test_comments_after_a_semicolon_cost_the_classifier_linear_time() -> None:
    """Found by the fuzzer: the fast path's regex for a statement after a semicolon
    backtracks exponentially over line or block comments, so "SELECT 1;" and 30 "-- " (or
    "/**/ ") hold the event loop, and every client of the proxy, for hours. Run in a child
    process with a deadline, since a regex in C cannot be interrupted."""
    check = (
        "from dbmux.engines.postgres.pinning import might_pin\n"
        "might_pin(b'SELECT 1;' + b'-- ' * 40)\n"
        "might_pin(b'SELECT 1;' + b'/**/ ' * 40)\n"
    )
    try:
        subprocess.run([sys.executable, "-c", check], check=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("might_pin did not finish in 5 s")
