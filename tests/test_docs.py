"""The README's Python example runs as written, on sample photos, with the shipped model."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from mmret.demo import write_photos

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_a_python_example() -> None:
    assert python_blocks()


@pytest.mark.parametrize("number", range(len(python_blocks())))
def test_readme_python_example_runs(
    number: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = write_photos(tmp_path / "photos")
    shutil.copy(photos / "cat.png", tmp_path / "cat.jpg")
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        exec(compile(python_blocks()[number], f"README.md python block {number}", "exec"), {})
    finally:
        os.chdir(previous)
    if "read_items" in python_blocks()[number]:
        assert "nothing skipped" in capsys.readouterr().out
