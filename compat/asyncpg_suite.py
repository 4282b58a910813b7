"""Run asyncpg's own test suite directly against PostgreSQL and through dbmux, and compare.

A test that passes directly but fails (or errors) through dbmux is a compatibility failure.
Tests that fail or are skipped directly are reported but never counted against dbmux.

    .venv/bin/python -m compat.asyncpg_suite                  # default module set
    .venv/bin/python -m compat.asyncpg_suite -m test_execute -m test_pool
    .venv/bin/python -m compat.asyncpg_suite -k "Prepare"     # pytest -k filter

Exit code: 0 when there are no compatibility failures, 1 when there are, 2 on setup errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

from compat.common import Sdist, Suite, clean_env, compare
from dbmux.testing import PostgresCluster

ASYNCPG = Sdist(
    "asyncpg",
    "0.32.0",
    "https://files.pythonhosted.org/packages/80/4e/"
    "59dc964f962f09e3ed472e5d2d3ba670a41a2be25080dc62ab3db507ff5e/asyncpg-0.32.0.tar.gz",
    "45e64e56714d888330b884aad1dfb363d0bf43fb343e3d1a8968525f3bade478",
)

# Modules that are relevant to a proxy and run against an existing (unmanaged) cluster.
DEFAULT_MODULES = [
    "test_execute",
    "test_prepare",
    "test_transaction",
    "test_cursor",
    "test_copy",
    "test_codecs",
    "test_record",
    "test_exceptions",
    "test_cache_invalidation",
    "test_introspection",
    "test_timeout",
    "test_cancellation",
    "test_listeners",
    "test_types",
    "test_pool",
    "test_adversity",
]
ABOUT_MODULES = (
    "test_connect is left out: most of it starts its own clusters or edits pg_hba; add it "
    "with -m test_connect (tests that fail directly are not counted anyway)."
)


def check_installed_asyncpg() -> None:
    import asyncpg

    if asyncpg.__version__ != ASYNCPG.version:
        print(
            f"warning: installed asyncpg is {asyncpg.__version__}, "
            f"the test suite is from {ASYNCPG.version}",
            file=sys.stderr,
        )
    if not (Path(asyncpg.__file__).parent / "_testbase").is_dir():
        raise SystemExit(
            "the installed asyncpg has no asyncpg._testbase; this harness needs a wheel "
            "that ships it (asyncpg 0.32.0 wheels do)"
        )


def start_cluster(work: Path, max_connections: int, password: str) -> PostgresCluster:
    return PostgresCluster(
        max_connections=max_connections, auth_method="scram-sha-256", password=password
    )


def pg_env(port: int, password: str) -> dict[str, str]:
    """PG* variables that make asyncpg's test base use the running cluster instead of
    starting its own."""
    return clean_env(
        "PG",
        PGHOST="127.0.0.1",
        PGPORT=str(port),
        PGUSER="postgres",
        PGPASSWORD=password,
        PGDATABASE="postgres",
    )


SUITE = Suite(
    sdist=ASYNCPG,
    engine_family="POSTGRESQL",
    default_modules=DEFAULT_MODULES,
    about_modules=ABOUT_MODULES,
    start_server=start_cluster,
    users=lambda password: {"postgres": password},
    env=pg_env,
    pytest_args=lambda modules, port: [f"tests/{m}.py" for m in modules],
    check_installed=check_installed_asyncpg,
)

if __name__ == "__main__":
    sys.exit(compare(SUITE))
