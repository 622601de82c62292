"""The demo and the shipped starter model, end to end on real photographs."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mmret.cli.main import app
from mmret.demo import run_demo


def test_demo_finds_the_right_photos(tmp_path: Path) -> None:
    run = run_demo(tmp_path, k=3)
    top = {label: hits[0].id for label, hits in run.queries}
    assert top["a cat"] == "cat"
    assert top["a person riding a motorcycle"] == "motorcycle"
    assert top["a man taking a picture"] == "cameraman"
    assert top["[image] a cropped, mirrored photo of the cat"] == "cat"
    mixed = dict(run.queries)["[image+text] the cat photo + 'a person riding a motorcycle'"]
    assert {hit.id for hit in mixed[:2]} == {"cat", "motorcycle"}
    assert all(len(hits) == 3 for _, hits in run.queries)
    # A second run reuses the index instead of re-encoding.
    assert run_demo(tmp_path, k=1).folder == run.folder


def test_demo_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "a man taking a picture" in result.stdout and "cameraman" in result.stdout
