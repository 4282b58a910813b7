"""Run aiomysql's own test suite directly against MariaDB and through dbmux, and compare.

A test that passes directly but fails (or errors) through dbmux is a compatibility failure.
Tests that fail or are skipped directly are reported but never counted against dbmux.

    .venv/bin/python -m compat.aiomysql_suite                 # default module set
    .venv/bin/python -m compat.aiomysql_suite -m test_pool -m test_issues
    .venv/bin/python -m compat.aiomysql_suite -k "uvloop"     # pytest -k filter

Exit code: 0 when there are no compatibility failures, 1 when there are, 2 on setup errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

from compat.common import Sdist, Suite, clean_env, compare
from dbmux.testing import MariaDBServer

AIOMYSQL = Sdist(
    "aiomysql",
    "0.3.2",
    "https://files.pythonhosted.org/packages/29/e0/"
    "302aeffe8d90853556f47f3106b89c16cc2ec2a4d269bdfd82e3f4ae12cc/aiomysql-0.3.2.tar.gz",
    "72d15ef5cfc34c03468eb41e1b90adb9fd9347b0b589114bd23ead569a02ac1a",
)

DEFAULT_MODULES = [
    "test_async_iter",
    "test_async_with",
    "test_basic",
    "test_bulk_inserts",
    "test_connection",
    "test_cursor",
    "test_deserialize_cursor",
    "test_dictcursor",
    "test_issues",
    "test_load_local",
    "test_nextset",
    "test_pool",
    "test_sha_connection",
    "test_sscursor",
    "test_ssl",
]
ABOUT_MODULES = (
    "tests/sa/ is left out, and so are the tests of aiomysql.sa in the modules above: "
    "aiomysql.sa needs SQLAlchemy 1.3 and the venv has 2.x."
)

# Tests of aiomysql.sa, the SQLAlchemy layer, which needs SQLAlchemy 1.3 (the venv has 2.x):
# they fail directly, and a failed one leaves a transaction open that makes the next test's
# DROP TABLE wait for its metadata lock. They test no wire behaviour, so they are not run.
NEEDS_SQLALCHEMY_13 = [
    "tests/test_async_iter.py::test_async_iter_over_sa_result",
    *(
        f"tests/test_async_with.py::{name}"
        for name in (
            "test_sa_connection",
            "test_sa_transaction",
            "test_sa_transaction_rollback",
            "test_create_engine",
            "test_engine",
            "test_transaction_context_manager",
            "test_transaction_context_manager_error",
            "test_transaction_context_manager_commit_once",
            "test_incompatible_cursor_fails",
            "test_compatible_cursor_correct",
        )
    ),
]

# Users the suite logs in as: root (every fixture) and the one test_issue_17 creates.
# dbmux knows a user only through a secret, as RDS Proxy does.
ISSUE17_USER = ("issue17user", "1234")

# The suite's mysql_server fixture connects with TLS for its setup and asserts that the
# session is TLS. dbmux has no TLS (config refuses require_tls), so through it the setup
# connection would be refused by PyMySQL (an explicit ssl context makes TLS required) and the
# assertion would fail: every test would error. The setup connection goes without TLS in both
# runs instead; the tests' own connections still ask for TLS (aiomysql falls back to plaintext
# when the server side offers none), and test_ssl shows the difference.
CONFTEST_PATCHES = [
    (
        "            cursorclass=pymysql.cursors.DictCursor,\n            **server_params)",
        "            cursorclass=pymysql.cursors.DictCursor,\n"
        '            **{**server_params, "ssl": None})  # dbmux compat: no TLS for setup',
    ),
    (
        "            if not unix_socket:\n"
        "                cursor.execute(\"SHOW STATUS LIKE 'Ssl_version%'\")",
        "            if False:  # dbmux compat: the setup connection is not TLS\n"
        "                cursor.execute(\"SHOW STATUS LIKE 'Ssl_version%'\")",
    ),
]


def check_installed_aiomysql() -> None:
    import aiomysql

    if aiomysql.__version__ != AIOMYSQL.version:
        print(
            f"warning: installed aiomysql is {aiomysql.__version__}, "
            f"the test suite is from {AIOMYSQL.version}",
            file=sys.stderr,
        )


def patch_conftest(work: Path) -> None:
    """Apply CONFTEST_PATCHES to the copied conftest; each must match exactly once."""
    conftest = work / "tests" / "conftest.py"
    text = conftest.read_text()
    for old, new in CONFTEST_PATCHES:
        if text.count(old) != 1:
            raise SystemExit(f"aiomysql's conftest.py changed; cannot patch:\n{old}")
        text = text.replace(old, new)
    conftest.write_text(text)


def start_mariadb(work: Path, max_connections: int, password: str) -> MariaDBServer:
    """MariaDB with root's password set to `password`, TLS with the certificates the suite
    ships (its CA signed them), as the suite's own docker setup does, and a lock wait that
    ends: a test that leaves a transaction open would otherwise make every later DROP TABLE
    wait for a year (the default), past pytest-timeout, which does not cover a failed test's
    teardown."""
    ssl = work / "tests" / "ssl_resources" / "ssl"
    settings = {
        "ssl_ca": str(ssl / "ca.pem"),
        "ssl_cert": str(ssl / "server-cert.pem"),
        "ssl_key": str(ssl / "server-key.pem"),
        "lock_wait_timeout": "20",
    }
    return MariaDBServer(max_connections=max_connections, root_password=password, settings=settings)


def suite_args(modules: list[str], port: int) -> list[str]:
    # The same label for both runs, so a test has the same id directly and via dbmux.
    args = [f"tests/{m}.py" for m in modules] + [f"--mysql-address=mysql=127.0.0.1:{port}"]
    return args + [f"--deselect={test}" for test in NEEDS_SQLALCHEMY_13]


SUITE = Suite(
    sdist=AIOMYSQL,
    engine_family="MYSQL",
    default_modules=DEFAULT_MODULES,
    about_modules=ABOUT_MODULES,
    start_server=start_mariadb,
    users=lambda password: {"root": password, ISSUE17_USER[0]: ISSUE17_USER[1]},
    env=lambda port, password: clean_env("MYSQL_", MYSQL_ROOT_PASSWORD=password),
    pytest_args=suite_args,
    check_installed=check_installed_aiomysql,
    prepare=patch_conftest,
)

if __name__ == "__main__":
    sys.exit(compare(SUITE))
