"""Test tools: throwaway PostgreSQL and MariaDB servers (one module per kind), dbmux on a
thread (embedded), and a re-chunking TCP relay with the driver scenarios run through it.

This is the single way dbmux gets a real database to talk to, so it favours being boring. SQL
helpers shell out to ``psql`` / ``mariadb`` so the servers import without any database driver
(``dbmux demo`` uses them before drivers matter).
"""

from dbmux.testing.mariadb import MariaDBServer
from dbmux.testing.postgres import PostgresCluster
from dbmux.testing.process import CommandError, ServerStartError

__all__ = ["CommandError", "MariaDBServer", "PostgresCluster", "ServerStartError"]
