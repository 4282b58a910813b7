"""Deterministic choices read from fuzzer bytes (what atheris' FuzzedDataProvider does, but
importable without atheris, so `make test` replays the corpus with the same meaning)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class Draw:
    """Consumes an input from the front; once it runs out every choice is the smallest one,
    so any byte string is a valid input and shorter inputs mean simpler streams."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def below(self, limit: int) -> int:
        """An int in [0, limit), from as many bytes as the limit needs."""
        value = 0
        span = 1
        while span < limit:
            value = value << 8 | self.byte()
            span <<= 8
        return value % limit if limit > 0 else 0

    def chance(self, one_in: int) -> bool:
        """True one time in `one_in`; False once the input has run out."""
        return self.below(one_in) == one_in - 1

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def bytes(self, max_size: int) -> bytes:
        size = self.below(max_size + 1)
        piece = self.data[self.pos : self.pos + size]
        self.pos += len(piece)
        return piece

    def text(self, alphabet: Sequence[str], max_size: int) -> str:
        return "".join(self.pick(alphabet) for _ in range(self.below(max_size + 1)))

    def rest(self) -> bytes:
        piece = self.data[self.pos :]
        self.pos = len(self.data)
        return piece

    def chunked(self, stream: bytes) -> list[bytes]:
        """`stream` cut at drawn points: mostly tiny pieces (down to 1 byte), some larger, as
        TCP may deliver them; whatever is left after the draw runs out is one last piece."""
        pieces = []
        pos = 0
        while pos < len(stream) and self.pos < len(self.data):
            size = self.byte()
            size = size % 7 + 1 if size < 200 else (size - 199) * 13
            pieces.append(stream[pos : pos + size])
            pos += size
        if pos < len(stream):
            pieces.append(stream[pos:])
        return pieces


def sql_text(draw: Draw, vocabulary: Sequence[str]) -> bytes:
    """SQL-like text: words of the vocabulary, quotes, comments and separators in any order,
    often malformed on purpose (unterminated quotes and comments, stray bytes)."""
    parts = []
    for _ in range(draw.below(24)):
        choice = draw.below(8)
        if choice < 5:
            parts.append(draw.pick(vocabulary))
        elif choice == 5:
            parts.append(draw.pick(_SEPARATORS))
        elif choice == 6:
            parts.append(draw.text(_WORD_CHARS, 8))
        else:
            parts.append(draw.bytes(4).decode("latin-1"))
        if draw.below(3):
            parts.append(" ")
    return "".join(parts).encode("utf-8", "surrogatepass")


_SEPARATORS = (
    ";",
    ",",
    "(",
    ")",
    ".",
    "=",
    ":=",
    "'",
    '"',
    "`",
    "''",
    "\\",
    "\n",
    "\t",
    "/*",
    "*/",
    "/*!",
    "--",
    "-- ",
    "#",
    "$$",
    "$a$",
    "E'",
    "N'",
    "x'",
    "@",
    "@@",
    "?",
    "$1",
    "::",
    "\0",
    "\u00e9",
    "\U0001f600",
)
_WORD_CHARS = "abcdefghijklmnopqrstuvwxyz_0123456789$ABCXYZ"


def run_one(harnesses: Sequence[Callable[[Draw], None]], data: bytes) -> None:
    """A fuzzer input: its first byte picks the harness, the rest drives it."""
    draw = Draw(data)
    harnesses[draw.byte() % len(harnesses)](draw)
