"""The data-processing reference worker: SQL and summary statistics with DuckDB.

Tables come from the payload (lists of row objects) or from CSV / Parquet files under the
worker's data root; after loading them DuckDB's file access is switched off, so a query can
read nothing but what the request named.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import uuid
from pathlib import Path
from typing import Any

import orjson

from enginedge.domain.errors import InvalidPayload
from enginedge.domain.tasks import check_payload
from enginedge.worker.app import JSON, Task, TaskFailed, WorkerApp

WORKER_TYPE = "data-processing"
MAX_RESULT_ROWS = 100_000


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class DataSession:
    """One request's private DuckDB database."""

    def __init__(self, data_root: Path, task: Task) -> None:
        self._root = data_root.resolve()
        # No progress bar: DuckDB would draw it on the worker's stdout.
        import duckdb  # here, not at the top: 24 MB that only data tasks need

        self.con = duckdb.connect(":memory:")
        self.con.execute("SET enable_progress_bar = false")
        task.on_cancel(self.con.interrupt)

    def load_records(self, name: str, records: list[JSON]) -> None:
        if not records:
            raise TaskFailed(f"table {name!r} has no rows, so its columns are unknown")
        self.con.execute(
            f"CREATE TABLE {_quote(name)} AS SELECT unnest(from_json($1, json_structure($1)), "
            "recursive := true)",
            [orjson.dumps(records).decode()],
        )

    def load_file(self, name: str, path: str) -> None:
        resolved = (self._root / path).resolve()
        if not resolved.is_relative_to(self._root):
            raise TaskFailed(f"file {path!r} is outside the worker's data directory")
        if not resolved.is_file():
            raise TaskFailed(f"file {path!r} does not exist in the worker's data directory")
        reader = "read_parquet" if resolved.suffix == ".parquet" else "read_csv_auto"
        self.con.execute(
            # The table name is a quoted identifier and the reader one of two constants.
            f"CREATE TABLE {_quote(name)} AS SELECT * FROM {reader}($1)",  # noqa: S608
            [str(resolved)],
        )

    def seal(self) -> None:
        """No file access from here on: the query sees only the loaded tables."""
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def query(self, sql: str) -> JSON:
        cursor = self.con.execute(sql)
        if cursor.description is None:
            return {"columns": [], "rows": []}
        columns = [d[0] for d in cursor.description]
        rows = cursor.fetchmany(MAX_RESULT_ROWS + 1)
        if len(rows) > MAX_RESULT_ROWS:
            raise TaskFailed(
                f"the query returned more than {MAX_RESULT_ROWS} rows; aggregate or add a LIMIT"
            )
        return {"columns": columns, "rows": [[_json_value(v) for v in row] for row in rows]}

    def columns(self, table: str) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.con.execute(f"DESCRIBE {_quote(table)}").fetchall()]

    def close(self) -> None:
        self.con.close()


def _numeric(duck_type: str) -> bool:
    base = duck_type.split("(")[0].upper()
    return base in {
        "TINYINT",
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "HUGEINT",
        "UTINYINT",
        "USMALLINT",
        "UINTEGER",
        "UBIGINT",
        "UHUGEINT",
        "FLOAT",
        "DOUBLE",
        "DECIMAL",
        "REAL",
    }


def _checked(task: Task) -> None:
    """The orchestrator validated the payload; a worker trusts no sender all the same."""
    try:
        check_payload(task.task_type, task.payload)
    except InvalidPayload as exc:
        raise TaskFailed(exc.message) from None


def run_sql(data_root: Path, task: Task) -> JSON:
    import duckdb

    _checked(task)
    session = DataSession(data_root, task)
    try:
        for name, records in (task.payload.get("tables") or {}).items():
            session.load_records(name, records)
        for name, path in (task.payload.get("files") or {}).items():
            session.load_file(name, path)
        session.seal()
        return session.query(task.payload["sql"])
    except duckdb.Error as exc:
        raise TaskFailed(f"SQL error: {exc}") from None
    finally:
        session.close()


def describe(data_root: Path, task: Task) -> JSON:
    import duckdb

    _checked(task)
    session = DataSession(data_root, task)
    try:
        if task.payload.get("records") is not None:
            session.load_records("data", task.payload["records"])
        else:
            session.load_file("data", task.payload["file"])
        session.seal()
        available = dict(session.columns("data"))
        wanted = task.payload.get("columns") or list(available)
        missing = [c for c in wanted if c not in available]
        if missing:
            raise TaskFailed(
                f"unknown column(s): {', '.join(missing)}; the data has {', '.join(available)}"
            )
        stats: JSON = {}
        for column in wanted:
            q = _quote(column)
            numeric = _numeric(available[column])
            mean = f"avg({q})" if numeric else "NULL"
            std = f"stddev_samp({q})" if numeric else "NULL"
            row = session.con.execute(
                # Only quoted identifiers and fixed function names are interpolated.
                f"SELECT count({q}), count(*) - count({q}), min({q}), max({q}), {mean}, {std} "  # noqa: S608
                "FROM data"
            ).fetchone()
            assert row is not None
            stats[column] = dict(
                zip(
                    ("count", "nulls", "min", "max", "mean", "std"),
                    (_json_value(v) for v in row),
                    strict=True,
                )
            )
            stats[column]["type"] = available[column]
        return {"columns": stats}
    except duckdb.Error as exc:
        raise TaskFailed(f"data error: {exc}") from None
    finally:
        session.close()


def data_processing_worker(data_root: Path, capacity: int = 4) -> WorkerApp:
    """The data-processing worker, reading files only under ``data_root``."""
    app = WorkerApp(WORKER_TYPE, capacity=capacity)

    @app.task("data.sql")
    def _sql(task: Task) -> JSON:
        return run_sql(data_root, task)

    @app.task("data.describe")
    def _describe(task: Task) -> JSON:
        return describe(data_root, task)

    @app.task("echo")
    async def _echo(task: Task) -> JSON:
        # On the event loop: no thread for work that is no work.
        return dict(task.payload)

    return app
