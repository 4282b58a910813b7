"""The log's two formats: text lines and one JSON object per line, fields included."""

from __future__ import annotations

import json
import logging
import sys

from dbmux.logs import JsonFormatter, TextFormatter


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("dbmux.debug", logging.INFO, __file__, 1, "client %d", (7,), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_time_level_logger_message_and_fields() -> None:
    line = JsonFormatter().format(_record(client=7, statement="SELECT 1", duration_ms=0.5))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["level"] == "info"
    assert parsed["logger"] == "dbmux.debug"
    assert parsed["message"] == "client 7"
    assert parsed["time"].endswith("Z")
    assert (parsed["client"], parsed["statement"], parsed["duration_ms"]) == (7, "SELECT 1", 0.5)


def test_json_lines_hold_an_exception_in_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    parsed = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in parsed["exception"]


def test_text_lines_append_fields_as_key_value() -> None:
    line = TextFormatter().format(_record(client=7, statement="SELECT 1"))
    assert line.endswith('dbmux.debug: client 7 client=7 statement="SELECT 1"')
