"""The README's Python example and its commands run as written, from a working directory of
their own with the relative paths the README uses, on sample photos, with the shipped model."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmret.cli.main import app
from mmret.demo import write_photos

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def code_blocks(language: str, after: str = "", path: Path = README) -> list[str]:
    """The fenced blocks in ``language`` of the README (or ``path``), from the heading ``after``
    on."""
    text = path.read_text()
    text = text[text.index(after) :] if after else text
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def python_blocks() -> list[str]:
    return code_blocks("python")


def use_it_commands() -> list[list[str]]:
    """The ``mmret`` command lines of the README's "Use it" block, split as a shell would
    (comments dropped, ``~`` still to expand)."""
    lines = code_blocks("bash", after="## Use it")[0].splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("mmret ")]


def test_readme_has_a_python_example_and_commands() -> None:
    assert python_blocks()
    assert [command[0] for command in use_it_commands()][:2] == ["index", "search"]


def test_readme_is_short() -> None:
    """The README fits on a few screens; everything else lives in the docs site (docs/)."""
    assert len(README.read_text().splitlines()) < 200


def test_readme_links_resolve() -> None:
    """Every relative link of the README names a file of the repository (the docs pages, read
    on GitHub as they are)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [t.split("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    assert relative
    assert [t for t in relative if not (ROOT / t).is_file()] == []


def test_docs_use_it_page_shows_the_readmes_tested_examples() -> None:
    """The docs' "Use it" page keeps the README's commands and Python example as they are,
    so what the docs show is what these tests run."""
    usage = DOCS / "usage.md"
    assert code_blocks("bash", "# Use it", usage)[0] == code_blocks("bash", "## Use it")[0]
    assert code_blocks("python", path=usage)[0] == python_blocks()[0]


def test_every_shipped_model_card_is_in_the_docs() -> None:
    """Each model card that ships in the package has a docs page that includes it (not a copy)
    and a place in the site's navigation."""
    nav = (ROOT / "mkdocs.yml").read_text()
    cards = sorted((ROOT / "src" / "mmret" / "weights").glob("*/MODEL_CARD.md"))
    assert cards
    for card in cards:
        page = Path("models") / card.parent.name / "MODEL_CARD.md"
        snippet = f'--8<-- "{card.relative_to(ROOT).as_posix()}"'
        assert (DOCS / page).read_text().strip() == snippet
        assert f": {page.as_posix()}\n" in nav


@pytest.mark.parametrize("number", range(len(python_blocks())))
def test_readme_python_example_runs(
    number: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    photos = write_photos(tmp_path / "photos")  # "photos/" in the example is relative
    shutil.copy(photos / "cat.png", tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    block = python_blocks()[number]
    exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    output = capsys.readouterr()
    assert output.err == ""  # no library's progress bars or warnings
    if "report = " not in block:
        return  # an example that is not about what indexing reports
    n_photos = len(list(photos.iterdir()))
    report = namespace["report"]
    assert getattr(report, "added", None) == n_photos  # it indexed nothing from a relative path
    assert f"{n_photos} nothing skipped" in output.out
    assert "/photos/cat.png" in output.out


def test_readme_python_example_reports_what_the_folder_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipped entries of ``read_items`` reach ``add()``'s report, which the example prints."""
    photos = write_photos(tmp_path / "photos")
    (photos / "broken.jpg").write_bytes(b"not an image")
    (photos / "cat.txt").write_bytes(b"\xff\xfe not UTF-8")
    shutil.copy(photos / "cat.png", tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(python_blocks()[0], "README.md python block 0", "exec"), namespace)
    summary = namespace["report"].skipped.summary()  # type: ignore[attr-defined]
    assert "skipped 2 entries" in summary
    assert "cat.txt: caption unreadable" in summary and "broken: " in summary


def expand_home(argument: str, home: Path) -> str:
    """What a shell makes of a leading ``~``."""
    return str(home) + argument[1:] if argument.startswith("~") else argument


@pytest.mark.parametrize("paths", ["as written", "relative source", "absolute"])
def test_readme_commands_run_as_written(
    paths: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command of the README's "Use it" block, from a working directory of its own:
    as written (``~/Pictures``, ``pictures.mmret`` and ``query.jpg`` in the working
    directory), with the source folder given relative to it, and with absolute paths."""
    home, work = tmp_path / "home", tmp_path / "work"
    pictures = write_photos(home / "Pictures")
    (pictures / "holidays").mkdir()
    for name in ("cat", "motorcycle"):
        (pictures / f"{name}.png").rename(pictures / "holidays" / f"{name}.png")
    (pictures / "holidays" / "cat.txt").write_text("our cat at the beach house")
    n_photos = len(list(pictures.rglob("*.png")))
    work.mkdir()
    shutil.copy(pictures / "holidays" / "cat.png", work / "query.jpg")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    rename = {
        "as written": {},
        "relative source": {"~/Pictures": "../home/Pictures/"},
        "absolute": {
            "~/Pictures": str(pictures),
            "pictures.mmret": str(work / "pictures.mmret"),
            "query.jpg": str(work / "query.jpg"),
        },
    }[paths]
    outputs = {}
    for command in use_it_commands():
        arguments = [expand_home(rename.get(a, a), home) for a in command]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, f"mmret {shlex.join(arguments)}\n{result.output}"
        outputs[shlex.join(command)] = result.output
    assert not any("Loading weights" in output for output in outputs.values())
    index, image_search, check = (
        next(output for command, output in outputs.items() if command.startswith(start))
        for start in ("index", "search pictures.mmret --image", "check")
    )
    assert f"indexed {n_photos} items" in index and "skipped" not in index
    assert "holidays/cat" in image_search  # the query image is a copy of it
    assert check.startswith("ok: ")


def test_a_plain_search_prints_only_mmrets_output(tmp_path: Path) -> None:
    """In a fresh process, where the model loads from scratch: nothing on stderr (no library
    progress bar or warning), the results table on stdout."""
    write_photos(tmp_path / "photos")
    index = CliRunner().invoke(
        app, ["index", str(tmp_path / "photos"), "--out", str(tmp_path / "p.mmret")]
    )
    assert index.exit_code == 0, index.output
    mmret = Path(sys.executable).with_name("mmret")
    done = subprocess.run(
        [str(mmret), "search", str(tmp_path / "p.mmret"), "a cat", "--k", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "100"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "cat" in done.stdout and "score" in done.stdout
