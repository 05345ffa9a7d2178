"""The README stays true to the code: every variable and command it must mention."""

from __future__ import annotations

from pathlib import Path

from typer.main import get_command

from enginedge.config import VARIABLES
from enginedge.entrypoints.cli import app

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_configuration_variable_is_documented() -> None:
    missing = [v.name for v in VARIABLES if f"`{v.name}`" not in README]
    assert not missing


def test_every_cli_command_is_documented() -> None:
    commands = get_command(app).commands  # type: ignore[attr-defined]
    missing = [name for name in commands if f"enginedge {name}" not in README]
    assert not missing
