"""JSON log lines: every field a record carries is rendered, whatever orjson accepts."""

from __future__ import annotations

import io
import logging
import uuid

import orjson


def test_a_line_carries_its_fields_as_json(log_lines: io.StringIO) -> None:
    request_id = uuid.uuid4()
    logging.getLogger("enginedge.test").info(
        "request finished", extra={"requestId": request_id, "attempts": 2, "error": None}
    )
    (line,) = [orjson.loads(x) for x in log_lines.getvalue().splitlines()]
    assert line["message"] == "request finished"
    assert line["level"] == "info"
    assert (line["requestId"], line["attempts"], line["error"]) == (str(request_id), 2, None)
    assert "timestamp" in line


def test_what_orjson_refuses_is_still_logged(log_lines: io.StringIO) -> None:
    # orjson takes neither integers over 64 bits nor, by default, keys that are not strings.
    logging.getLogger("enginedge.test").warning(
        "odd values", extra={"big": 2**70, "byNumber": {1: "one"}}
    )
    (line,) = [orjson.loads(x) for x in log_lines.getvalue().splitlines()]
    assert line["big"] == 2**70
    assert line["byNumber"] == {"1": "one"}
