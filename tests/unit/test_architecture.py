"""The hexagon's rule: the core (domain + application) imports no framework or driver."""

from __future__ import annotations

import ast
from pathlib import Path

import enginedge

PACKAGE = Path(enginedge.__file__).parent
FORBIDDEN = {
    "fastapi",
    "starlette",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "alembic",
    "aiokafka",
    "confluent_kafka",
    "redis",
    "httpx",
    "uvicorn",
    "duckdb",
    "prometheus_client",
    "structlog",
    "typer",
    "rich",
    "pydantic",
    "sse_starlette",
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
    return modules


def test_core_imports_no_framework_driver_or_client() -> None:
    for layer in ("domain", "application"):
        for path in (PACKAGE / layer).rglob("*.py"):
            bad = imported_roots(path) & FORBIDDEN
            assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_domain_depends_on_nothing_outside_itself() -> None:
    for path in (PACKAGE / "domain").rglob("*.py"):
        for module in imported_modules(path):
            if module.startswith("enginedge."):
                assert module.startswith("enginedge.domain"), f"{path.name} imports {module}"


def test_application_does_not_reach_into_adapters_or_entrypoints() -> None:
    for path in (PACKAGE / "application").rglob("*.py"):
        for module in imported_modules(path):
            assert not module.startswith(
                ("enginedge.adapters", "enginedge.entrypoints", "enginedge.bootstrap")
            ), (path.name, module)
