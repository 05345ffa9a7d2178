"""The data-processing worker's handlers, called directly (the API suite runs them too)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from enginedge.worker import Task, TaskFailed
from enginedge.worker.builtin.data_processing import describe, run_sql


def task(task_type: str, payload: dict[str, Any]) -> Task:
    return Task(uuid.uuid4(), 1, task_type, payload, {}, datetime(2999, 1, 1, tzinfo=UTC))


def test_sql_over_records_and_a_csv_file(tmp_path: Path) -> None:
    (tmp_path / "rates.csv").write_text("city,rate\nLyon,2\nOslo,3\n")
    result = run_sql(
        tmp_path,
        task(
            "data.sql",
            {
                "sql": "SELECT s.city, s.qty * r.rate AS cost FROM sales s "
                "JOIN rates r USING (city) ORDER BY cost",
                "tables": {"sales": [{"city": "Lyon", "qty": 5}, {"city": "Oslo", "qty": 1}]},
                "files": {"rates": "rates.csv"},
            },
        ),
    )
    assert result == {"columns": ["city", "cost"], "rows": [["Oslo", 3], ["Lyon", 10]]}


def test_values_become_json(tmp_path: Path) -> None:
    result = run_sql(
        tmp_path,
        task(
            "data.sql",
            {
                "sql": "SELECT DATE '2026-01-02' AS d, 1.5::DECIMAL(4,2) AS n, [1, 2] AS l, "
                "{'k': 'v'} AS s, 'nan'::DOUBLE AS f",
                "tables": {"t": [{"a": 1}]},
            },
        ),
    )
    assert result["rows"] == [["2026-01-02", 1.5, [1, 2], {"k": "v"}, None]]


@pytest.mark.parametrize("path", ["../outside.csv", "/etc/passwd.csv", "missing.csv"])
def test_files_outside_the_data_root_or_missing_are_refused(tmp_path: Path, path: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.csv").write_text("a\n1\n")
    with pytest.raises(TaskFailed, match="data directory"):
        run_sql(root, task("data.sql", {"sql": "select * from t", "files": {"t": path}}))


def test_queries_cannot_open_files_themselves(tmp_path: Path) -> None:
    (tmp_path / "secret.csv").write_text("a\n1\n")
    with pytest.raises(TaskFailed, match="SQL error"):
        run_sql(
            tmp_path,
            task(
                "data.sql",
                {
                    "sql": f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')",
                    "tables": {"t": [{"a": 1}]},
                },
            ),
        )


def test_payload_is_checked_on_the_worker_too(tmp_path: Path) -> None:
    with pytest.raises(TaskFailed, match=r"payload\.sql"):
        run_sql(tmp_path, task("data.sql", {"tables": {"t": [{"a": 1}]}}))


def test_describe_unknown_column(tmp_path: Path) -> None:
    with pytest.raises(TaskFailed, match="unknown column"):
        describe(tmp_path, task("data.describe", {"records": [{"a": 1}], "columns": ["b"]}))
