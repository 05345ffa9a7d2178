"""What a task request must look like before it is accepted.

The set of task types is open (workers announce theirs); the built-in ones below are known
even before their workers have announced themselves, so that a caller is told "no eligible
workers" rather than "unknown task type" while the fleet starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from enginedge.domain.errors import InvalidPayload, InvalidTaskType

TASK_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")
TASK_TYPE_MAX_LENGTH = 50
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Metadata:
    """The recognised fields of a request's ``metadata`` (others are kept as given)."""

    priority: int = 0
    correlation_id: str | None = None
    timeout: float | None = None
    callback_url: str | None = None


def check_task_type(task_type: str) -> None:
    if (
        not task_type
        or len(task_type) > TASK_TYPE_MAX_LENGTH
        or not TASK_TYPE_PATTERN.match(task_type)
    ):
        raise InvalidTaskType(
            f"taskType {task_type[:60]!r} is not a valid task type name "
            "(lower-case words joined by dots, at most 50 characters, e.g. 'data.sql')"
        )


def parse_metadata(metadata: Mapping[str, Any]) -> Metadata:
    """Validate the fields of ``metadata`` the orchestrator acts on."""
    priority = metadata.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -100 <= priority <= 100:
        raise InvalidPayload("metadata.priority must be an integer from -100 to 100")
    correlation_id = metadata.get("correlationId")
    if correlation_id is not None and (
        not isinstance(correlation_id, str) or not 0 < len(correlation_id) <= 128
    ):
        raise InvalidPayload("metadata.correlationId must be a string of 1 to 128 characters")
    timeout = metadata.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT_SECONDS
    ):
        raise InvalidPayload(
            "metadata.timeout must be a number of seconds above 0 and at most "
            f"{MAX_TIMEOUT_SECONDS}"
        )
    callback_url = metadata.get("callbackUrl")
    if callback_url is not None:
        parts = urlsplit(callback_url) if isinstance(callback_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidPayload("metadata.callbackUrl must be an http or https URL")
    return Metadata(
        priority=priority,
        correlation_id=correlation_id,
        timeout=float(timeout) if timeout is not None else None,
        callback_url=callback_url,
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidPayload(message)


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(row, dict) for row in value)


def _is_name_map(value: Any, item: Callable[[Any], bool]) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and k.isidentifier() and item(v) for k, v in value.items())
    )


def _check_data_sql(payload: Mapping[str, Any]) -> None:
    sql = payload.get("sql")
    _require(isinstance(sql, str) and sql.strip() != "", "payload.sql must be a non-empty string")
    tables, files = payload.get("tables"), payload.get("files")
    _require(
        tables is not None or files is not None,
        'payload needs "tables" (name -> list of row objects) or "files" (name -> path)',
    )
    if tables is not None:
        _require(
            _is_name_map(tables, _is_records),
            "payload.tables must map table names (identifiers) to lists of row objects",
        )
    if files is not None:
        _require(
            _is_name_map(files, lambda v: isinstance(v, str) and v.endswith((".csv", ".parquet"))),
            "payload.files must map table names (identifiers) to .csv or .parquet paths",
        )


def _check_data_describe(payload: Mapping[str, Any]) -> None:
    records, file = payload.get("records"), payload.get("file")
    _require(
        (records is None) != (file is None),
        'payload needs exactly one of "records" (list of row objects) or "file" (path)',
    )
    if records is not None:
        _require(_is_records(records), "payload.records must be a list of row objects")
    if file is not None:
        _require(
            isinstance(file, str) and file.endswith((".csv", ".parquet")),
            "payload.file must be a .csv or .parquet path",
        )
    columns = payload.get("columns")
    if columns is not None:
        _require(
            isinstance(columns, list) and all(isinstance(c, str) for c in columns),
            "payload.columns must be a list of column names",
        )


def _check_llm_chat(payload: Mapping[str, Any]) -> None:
    messages = payload.get("messages")
    _require(
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ),
        'payload.messages must be a non-empty list of {"role", "content"} strings',
    )
    max_tokens = payload.get("max_tokens")
    _require(
        max_tokens is None
        or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0),
        "payload.max_tokens must be a positive integer",
    )
    temperature = payload.get("temperature")
    _require(
        temperature is None
        or (
            isinstance(temperature, int | float)
            and not isinstance(temperature, bool)
            and 0 <= temperature <= 2
        ),
        "payload.temperature must be a number from 0 to 2",
    )
    model = payload.get("model")
    _require(model is None or isinstance(model, str), "payload.model must be a string")


@dataclass(frozen=True, slots=True)
class BuiltinTask:
    """A task type the project ships a worker for."""

    worker_type: str
    check: Callable[[Mapping[str, Any]], None]


def _check_echo(payload: Mapping[str, Any]) -> None:
    """Any object: the worker answers with it (a no-op, for benchmarks and smoke tests)."""


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "echo": BuiltinTask("data-processing", _check_echo),
    "data.sql": BuiltinTask("data-processing", _check_data_sql),
    "data.describe": BuiltinTask("data-processing", _check_data_describe),
    "llm.chat": BuiltinTask("llm", _check_llm_chat),
}


def check_payload(task_type: str, payload: Mapping[str, Any]) -> None:
    """Refuse a payload that the built-in worker for ``task_type`` could never run."""
    builtin = BUILTIN_TASKS.get(task_type)
    if builtin is not None:
        builtin.check(payload)
