"""Running the ``mmret`` CLI in-process from tests."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mmret.cli.main import app

runner = CliRunner()


def run(*args: str | Path, code: int = 0) -> str:
    """Standard output of a command that exits with ``code`` 0; everything it printed when
    another exit code is expected (errors go to standard error)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 else result.output
