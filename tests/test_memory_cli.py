"""``mmret memory build``, ``mmret train reco`` and ``--memory`` on index, search and eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli import run


@pytest.fixture
def memory_dir(tmp_path: Path, manifest: Path) -> Path:
    out = tmp_path / "memory"
    cache = tmp_path / "cache"
    output = run(
        "memory", "build", manifest, "--out", out, "--model", "hash:32", "--cache-dir", cache
    )
    assert "built memory" in output and "4 pairs" in output
    return out


def test_memory_info(memory_dir: Path) -> None:
    details = json.loads(run("memory", "info", memory_dir, "--json"))
    assert details["pairs"] == 4 and details["encoder"] == "hash:32" and details["bytes"] > 0


def test_train_reco_then_use_it_everywhere(
    tmp_path: Path, manifest: Path, memory_dir: Path
) -> None:
    fusion = tmp_path / "fusion"
    cache = tmp_path / "cache"
    common = ["--cache-dir", cache, "--k", "2", "--epochs", "2", "--batch-size", "4"]
    output = run(
        "train",
        "reco",
        manifest,
        "--memory",
        memory_dir,
        "--dev",
        manifest,
        "--out",
        fusion,
        *common,
        "--ff-dim",
        "8",
        "--heads",
        "2",
    )
    assert "epoch   2" in output and "RSUM" in output
    assert (fusion / "model.safetensors").is_file() and not (fusion / "checkpoint").exists()
    history = json.loads((fusion / "training.json").read_text())
    assert history["training_items_with_own_pair_excluded"] == 4
    use = ["--memory", memory_dir, "--fusion", fusion, "--memory-k", "2"]
    index = tmp_path / "index"
    run("index", manifest, "--out", index, "--model", "hash:32", *use)
    hits = json.loads(run("search", index, "a red square", "--json", *use))["results"]
    assert hits[0]["id"] == "red"
    again = json.loads(run("search", index, "a red square", "--json"))["results"]  # recorded
    assert again == hits
    refused = run(
        "search", index, "a red square", "--memory", memory_dir, "--fusion", "mean", code=1
    )
    assert "cannot be searched with" in refused and "fusion" in refused
    report = tmp_path / "r.json"
    run(
        "eval",
        "retrieval",
        manifest,
        "--model",
        "hash:32",
        "--cache-dir",
        cache,
        "--json",
        report,
        *use,
    )
    record = json.loads(report.read_text())
    assert "memory" in record["model"] and record["memory"]["k"] == 2


def test_eval_with_a_memory_of_another_encoder(
    tmp_path: Path, manifest: Path, memory_dir: Path
) -> None:
    output = run(
        "eval",
        "retrieval",
        manifest,
        "--model",
        "hash:16",
        "--cache-dir",
        tmp_path / "cache",
        "--memory",
        memory_dir,
        "--fusion",
        "mean",
        code=1,
    )
    assert "built with encoder 'hash:32'" in output


def test_train_reco_refuses_to_overwrite_a_checkpoint(
    tmp_path: Path, manifest: Path, memory_dir: Path
) -> None:
    (tmp_path / "fusion" / "checkpoint").mkdir(parents=True)
    output = run(
        "train", "reco", manifest, "--memory", memory_dir, "--out", tmp_path / "fusion", code=1
    )
    assert "--resume" in output
