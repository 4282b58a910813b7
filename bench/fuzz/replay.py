"""Replaying a corpus through an engine's harness: `python -m bench.fuzz.replay ENGINE` runs
the committed corpus (what coverage.py measures after a fuzzing run), and `minimize` picks
the inputs worth committing."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

CORPUS = Path(__file__).parent / "corpus"
SOURCE = str(Path(__file__).parent.parent.parent / "src" / "dbmux")


def harness(engine: str) -> Callable[[bytes], None]:
    return importlib.import_module(f"bench.fuzz.{engine}").one_input


def _branches(one_input: Callable[[bytes], None], data: bytes) -> set[tuple[str, int, int]]:
    """The (file, line, next line) steps one input takes through dbmux's own code."""
    steps: set[tuple[str, int, int]] = set()

    def trace_calls(frame: FrameType, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        if not filename.startswith(SOURCE):
            return None
        last = frame.f_lineno

        def trace_lines(frame: FrameType, event: str, arg: Any) -> Any:
            nonlocal last
            if event == "line":
                steps.add((filename, last, frame.f_lineno))
                last = frame.f_lineno
            return trace_lines

        return trace_lines

    sys.settrace(trace_calls)
    try:
        one_input(data)
    finally:
        sys.settrace(None)
    return steps


def minimize(engine: str, inputs: list[Path], limit: int) -> list[Path]:
    """Smallest inputs first, each kept if it takes a step through dbmux no kept input took;
    at most `limit` of them."""
    one_input = harness(engine)
    seen: set[tuple[str, int, int]] = set()
    kept = []
    for path in sorted(inputs, key=lambda p: (p.stat().st_size, p.name)):
        steps = _branches(one_input, path.read_bytes())
        if not steps <= seen:
            seen |= steps
            kept.append(path)
            if len(kept) == limit:
                break
    return kept


def main() -> None:
    one_input = harness(sys.argv[1])
    for path in sorted((CORPUS / sys.argv[1]).iterdir()):
        one_input(path.read_bytes())


if __name__ == "__main__":
    main()
