"""The engine registry: engine_family -> the engine class that serves it (one line each).

Engines are imported only when a proxy uses them, so the core never imports one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dbmux.engines.base import Engine

ENGINES: dict[str, str] = {
    "POSTGRESQL": "dbmux.engines.postgres.engine:PostgresEngine",
    "MYSQL": "dbmux.engines.mysql.engine:MysqlEngine",
}


def engine_class(family: str) -> type[Engine]:
    """The class registered for `family` (a key of ENGINES)."""
    module, _, name = ENGINES[family].partition(":")
    engine: type[Engine] = getattr(importlib.import_module(module), name)
    return engine
