"""The engine registry and the line between the core and the engines: an engine is a folder
under dbmux/engines plus one registry line, it sees the core only through the interface
(engines/base.py, the session it extends, and the libraries: framing, auth, bounded maps,
the config models), and the core never imports an engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from dbmux.config import ConfigError, parse_config
from dbmux.engines import ENGINES, engine_class
from dbmux.engines.base import Engine, ErrorKind, ServerError

SRC = Path(__file__).resolve().parents[2] / "src" / "dbmux"
ENGINE_DIRS = sorted(p for p in (SRC / "engines").iterdir() if (p / "engine.py").exists())
# What of dbmux an engine may import besides its own folder.
INTERFACE = ("dbmux.engines.base", "dbmux.session", "dbmux.relay", "dbmux.bounded", "dbmux.config")
# Libraries that know no engine: auth, and the metrics an engine counts into.
LIBRARIES = ("dbmux.auth", "dbmux.metrics")
# Tools that drive engines from outside (a demo, throwaway servers) are not the core.
NOT_CORE = ("demo", "testing", "engines")


def imports_of(path: Path) -> set[str]:
    """The dbmux modules `path` imports, at run time or for type checking alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dbmux"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dbmux"))
    return found


def test_every_folder_with_an_engine_is_registered_and_every_registered_engine_exists() -> None:
    registered = {ENGINES[family].split(":")[0].split(".")[2] for family in ENGINES}
    assert registered == {p.name for p in ENGINE_DIRS}


@pytest.mark.parametrize("family", sorted(ENGINES))
def test_a_registered_engine_implements_the_interface(family: str) -> None:
    engine = engine_class(family)()
    assert isinstance(engine, Engine)
    assert engine.auth_types, "an engine names the client auth types it accepts"
    assert engine.read_only_statement
    assert engine.classify_error(ServerError("?", code="no such code")) is ErrorKind.OTHER
    kinds = {engine.classify_error(ServerError("", code=code)) for code in engine.error_kinds}
    assert {ErrorKind.AUTH, ErrorKind.BUSY, ErrorKind.GONE} <= kinds


@pytest.mark.parametrize("engine_dir", ENGINE_DIRS, ids=lambda p: p.name)
def test_an_engine_imports_only_the_interface_and_the_libraries(engine_dir: Path) -> None:
    own = f"dbmux.engines.{engine_dir.name}"
    allowed = (*INTERFACE, *LIBRARIES, own)
    for path in sorted(engine_dir.glob("*.py")):
        for module in imports_of(path):
            if module in ("dbmux", "dbmux.engines"):
                continue
            assert module.startswith(allowed) or module.rsplit(".", 1)[0] in INTERFACE, (
                f"{path.relative_to(SRC)} imports {module}"
            )


def test_the_core_never_imports_an_engine() -> None:
    engines = tuple(f"dbmux.engines.{p.name}" for p in ENGINE_DIRS)
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).parts
        if parts[0] in NOT_CORE:
            continue
        for module in imports_of(path):
            assert not module.startswith(engines), f"{path.relative_to(SRC)} imports {module}"


def test_an_auth_type_of_another_engine_is_refused_naming_the_field_and_the_choices() -> None:
    text = """
proxies:
  - name: shop
    engine_family: MYSQL
    listen: 127.0.0.1:0
    auth:
      - secret: env:X
        client_password_auth_type: POSTGRES_MD5
    target_group:
      targets: [{host: 127.0.0.1, port: 3306}]
"""
    with pytest.raises(ConfigError) as refused:
        parse_config(yaml.safe_load(text))
    message = str(refused.value)
    assert "proxies.0.auth.0.client_password_auth_type" in message
    assert "MYSQL_NATIVE_PASSWORD" in message


def test_an_unregistered_engine_family_is_refused_naming_the_registered_ones() -> None:
    text = """
proxies:
  - name: shop
    engine_family: ORACLE
    listen: 127.0.0.1:0
    auth: [{secret: env:X}]
    target_group:
      targets: [{host: 127.0.0.1, port: 1521}]
"""
    with pytest.raises(ConfigError) as refused:
        parse_config(yaml.safe_load(text))
    assert "proxies.0.engine_family" in str(refused.value)
    assert all(family in str(refused.value) for family in ENGINES)
