"""One engine's harness under atheris (libFuzzer): `python -m bench.fuzz.worker ENGINE
[libFuzzer flags] [corpus dirs]`. Run by `python -m bench.fuzz`, which reads its output."""

from __future__ import annotations

import importlib
import sys

import atheris


def main() -> None:
    engine, flags = sys.argv[1], sys.argv[2:]
    # Only dbmux's code is instrumented: coverage counts what the proxy's parsers reached.
    with atheris.instrument_imports(include=["dbmux"]):
        harness = importlib.import_module(f"bench.fuzz.{engine}")
    atheris.Setup([sys.argv[0], *flags], harness.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
