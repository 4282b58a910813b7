"""transaction_replay for PostgreSQL clients: a read that was in flight, outside any
transaction, when its server connection died runs again on the next writer, and the client
gets its answer as if nothing had happened.

Only what cannot have changed anything is run again: one statement (a simple Query, or an
unnamed Parse/Bind/Execute/Sync sent together) that reads (SELECT, WITH, VALUES, TABLE,
SHOW) with no data-modifying word in it and no function call but known built-ins (a
user's function may write, and the implicit transaction commit), of which the server had
answered nothing yet. A statement inside a transaction block, a write, or one whose answer
had begun gets the error it always got: its outcome is unknown, or the client saw part of
it. Replaying whole transactions, as the MySQL engine does, would need the extended
protocol's pipelines logged and matched per Sync; not done yet.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from dbmux.engines.postgres import wire
from dbmux.engines.postgres.pinning import Unclassifiable, function_name, split_statements

_READS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "SHOW"})
# Words that make a read something else: a data-modifying CTE, SELECT INTO (a new table),
# row locks (harmless, but not worth telling apart).
_NOT_READS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "FOR", "CALL"})
_WITHOUT_SIDE_EFFECTS = frozenset(
    """
    ALL AND ANY ARRAY AS EXISTS FROM IN JOIN NOT ON OR OVER ROW SELECT SOME USING VALUES WHERE
    WITH ABS ARRAY_AGG ARRAY_LENGTH AVG BOOL_AND BOOL_OR CASE CAST CEIL CEILING CHAR_LENGTH
    COALESCE CONCAT CONCAT_WS COUNT CURRENT_SETTING DATE_PART DATE_TRUNC EXTRACT FLOOR FORMAT
    GREATEST INET_SERVER_PORT INITCAP JSON_AGG JSON_BUILD_OBJECT JSONB_AGG JSONB_BUILD_OBJECT
    LEAST LEFT LENGTH LOWER LPAD LTRIM MAX MD5 MIN MOD NOW NULLIF PG_BACKEND_PID
    PG_IS_IN_RECOVERY PG_SLEEP POSITION REPLACE RIGHT ROUND RPAD RTRIM STRING_AGG SUBSTR
    SUBSTRING SUM TO_CHAR TO_JSON TO_JSONB TRIM TRUNC UPPER VERSION
    """.split()  # noqa: SIM905 (a word list reads better than a column)
)


def is_pure_read(sql: bytes) -> bool:
    """One statement that reads and calls nothing that could write."""
    try:
        statements = list(split_statements(sql.decode()))
    except (Unclassifiable, UnicodeDecodeError):
        return False
    if len(statements) != 1:
        return False
    tokens = statements[0]
    words = [t.text for t in tokens if t.kind == "word"]
    if not words or words[0] not in _READS or not _NOT_READS.isdisjoint(words):
        return False
    for token, after in itertools.pairwise(tokens):
        called = after.text == "(" and token.kind in ("word", "quoted")
        if called and function_name(token) not in _WITHOUT_SIDE_EFFECTS:
            return False
    return True


def rerunnable(request: bytes) -> bool:
    """`request` (all the client sent for its one unanswered Sync or Query) is a read that
    a fresh server connection can run as it is."""
    messages, _ = wire.take_messages(bytearray(request))
    if sum(len(body) + 5 for _, body in messages) != len(request):
        return False
    return rerunnable_messages(messages, {})


def rerunnable_messages(
    messages: Sequence[tuple[int, bytes]], prepared: dict[bytes, bytes]
) -> bool:
    """The messages of one request are a read a fresh server connection can run: a Query,
    or Parse/Bind/Describe/Execute ending in the one Sync, binding unnamed portals to
    statements that read. `prepared`: the text of the client's named statements, which the
    proxy prepares wherever they are missing; a named Parse in the request would meet its
    own earlier self, so it is not run again."""
    kinds = bytes(kind for kind, _ in messages)
    if kinds == b"Q":
        return is_pure_read(messages[0][1].rstrip(b"\0"))
    if not kinds.endswith(b"S") or kinds.count(b"S") != 1 or not set(kinds) <= set(b"PBDES"):
        return False
    texts = dict(prepared)
    for kind, body in messages:
        if kind == 80:  # Parse: name, text
            name, at = wire.split_name(body)
            if name:
                return False
            texts[b""] = body[at : body.find(b"\0", at)]
        elif kind == 66:  # Bind: portal, statement
            portal, at = wire.split_name(body)
            name, _ = wire.split_name(body, at)
            text = texts.get(name)
            if portal or text is None or not is_pure_read(text):
                return False
    return b"E" in kinds
