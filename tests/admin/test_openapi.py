"""The admin API against its own OpenAPI document, property-based: every documented operation
is called with generated path parameters (real names and ids among them) against a dbmux
with live clients, and every answer must have a documented status and, as JSON, match the
documented schema (strict: no undocumented field either)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any
from urllib.parse import quote

import jsonschema
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbmux.admin.openapi import openapi_document
from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux
from tests.admin.answers import call
from tests.conftest import proxy_config

DOCUMENT = openapi_document()
OPERATIONS = [
    (path, method, operation)
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
    if method in ("get", "post")
]
# The life-cycle operations change the whole proxy (pause holds every new transaction for up
# to 30 s, drain ends it): called with generated names they would stop the other calls'
# proxy. Their answers are checked against the document in tests of their own.
LIFE_CYCLE = ("/api/reload", "/pause", "/resume", "/drain")
GENERATED = [o for o in OPERATIONS if not o[0].endswith(LIFE_CYCLE)]


@pytest.fixture(scope="module")
def running(pg: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A dbmux with a few clients: idle, pinned and in a transaction."""
    config = proxy_config(pg, tmp_path_factory.mktemp("openapi"), {}, [])
    with EmbeddedDbmux(config) as dbmux:
        host, port = dbmux.address()
        url = f"postgresql://app:app-secret@{host}:{port}/app"
        # (closing(): the API test may close them, and a closed one cannot commit on exit)
        with (
            closing(psycopg.connect(url, autocommit=True)) as idle,
            closing(psycopg.connect(url, autocommit=True)) as pinned,
            closing(psycopg.connect(url)) as busy,
        ):
            idle.execute("SELECT 1")
            pinned.execute("LISTEN news")
            busy.execute("SELECT 1")
            yield dbmux.admin_url


def test_the_document_is_valid_openapi_3_1_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(DOCUMENT["components"]["schemas"]["DBProxy"])
    for _path, _method, operation in OPERATIONS:
        assert operation["responses"], operation["summary"]
        for answer in operation["responses"].values():
            for content in answer.get("content", {}).values():
                jsonschema.Draft202012Validator.check_schema(content["schema"])


def segment(text: str) -> str:
    return quote(text, safe="")


names = st.one_of(st.just("test"), st.text(min_size=1, max_size=30).map(segment), st.just(".."))
ids = st.one_of(
    st.integers(min_value=-5, max_value=10**20).map(str),
    st.text(min_size=1, max_size=12).map(segment),
)


def check(url: str, path: str, method: str, operation: dict[str, Any]) -> None:
    answer = call(url, method.upper())
    documented = operation["responses"]
    assert str(answer.status) in documented, (method, path, answer.status, answer.body[:300])
    content = documented[str(answer.status)].get("content", {})
    media = answer.headers["Content-Type"].split(";")[0]
    assert media in content, (path, answer.status, media)
    if media == "application/json":
        schema = {**content[media]["schema"], "components": DOCUMENT["components"]}
        jsonschema.validate(answer.json, schema, cls=jsonschema.Draft202012Validator)


def test_real_clients_validate_against_the_schema(running):
    """(Before the generated calls below, which may close these clients.)"""
    (_, method, operation) = next(o for o in OPERATIONS if o[0] == "/api/proxies/{name}/clients")
    check(f"{running}/api/proxies/test/clients", "/clients", method, operation)
    rows = call(f"{running}/api/proxies/test/clients").json["Clients"]
    assert {row["State"] for row in rows} == {"idle", "pinned", "active"}


@pytest.mark.parametrize(
    ("path", "method", "operation"), GENERATED, ids=[f"{m} {p}" for p, m, _ in GENERATED]
)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=names, client_id=ids)
def test_every_answer_is_documented(running, path, method, operation, name, client_id):
    filled = path.replace("{name}", name).replace("{id}", client_id)
    check(f"{running}{filled}", path, method, operation)


@pytest.mark.parametrize("action", ["pause", "resume", "drain"])
def test_life_cycle_answers_are_documented(running, action):
    """An unknown proxy (404), and resume on the real one (pause waits for this proxy's open
    transaction, as PgBouncer's PAUSE does: tests/admin/test_api.py pauses one without)."""
    path = f"/api/proxies/{{name}}/{action}"
    operation = DOCUMENT["paths"][path]["post"]
    check(f"{running}/api/proxies/nobody/{action}", path, "post", operation)
    if action == "resume":
        check(f"{running}/api/proxies/test/{action}", path, "post", operation)


def test_a_refused_reload_is_documented(running):
    operation = DOCUMENT["paths"]["/api/reload"]["post"]
    check(f"{running}/api/reload", "/api/reload", "post", operation)
