"""Errors that a parser swallowed but logged (a classifier that catches its own bug and pins)
still count as findings: the harness reads them here."""

from __future__ import annotations

import logging


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


_recorder = _Recorder()
logging.getLogger("dbmux").addHandler(_recorder)


def assert_nothing_logged() -> None:
    """Raise (with the logged exception as the cause) if dbmux logged an exception since the
    last call."""
    records, _recorder.records = _recorder.records, []
    if records:
        first = records[0]
        cause = first.exc_info[1] if first.exc_info else None
        raise AssertionError(f"dbmux logged: {first.getMessage()}") from cause
