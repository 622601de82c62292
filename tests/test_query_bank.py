"""Query-bank normalisation: the discount is QB-Norm's log-mean-exp, a hub close to the bank's
queries is demoted in search and evaluation, banks round-trip and refuse other encoders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmret import InputError, Item, Retriever
from mmret.cache.embeddings import PairEmbeddings
from mmret.cli.main import app
from mmret.encoders.hashing import HashEncoder
from mmret.evaluation.ir import ir_metrics
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.query_bank import QueryBank, load_query_bank, shipped_query_bank
from mmret.training.query_bank import choose_settings


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_the_discount_is_the_weighted_log_mean_exp_over_the_bank() -> None:
    rng = np.random.default_rng(0)
    text, image, items = (unit(rng.normal(size=(n, 8))) for n in (7, 5, 3))
    bank = QueryBank("hash:8", text, image, beta=12.0, weight=0.5)
    for modality, queries in (("text", text), ("image", image)):
        want = [0.5 / 12.0 * np.log(np.mean(np.exp(12.0 * queries @ v))) for v in items]
        np.testing.assert_allclose(bank.discount(items, modality), want, rtol=1e-5)


def hub_index(folder: Path) -> tuple[Retriever, np.ndarray]:
    """An index of texts under hash:32 and a bank of text queries all near item 'hub'."""
    encoder = HashEncoder(32)
    words = ["dog", "cat", "beach", "snow", "red", "ball"]
    retriever = Retriever.create(folder, encoder=encoder)
    retriever.add([Item(f"{w}", text=f"a {w} here") for w in words])
    retriever.add([Item("hub", text="a dog and a cat and a beach")])
    hub = retriever.stored_vectors(["hub"])["hub"]
    return retriever, hub


def test_search_demotes_a_hub_close_to_the_banks_queries(tmp_path: Path) -> None:
    retriever, hub = hub_index(tmp_path / "index")
    with retriever:
        plain = retriever.search(["a dog"], k=7, query_bank=False)[0]
        assert retriever.search(["a dog"], k=7)[0] == plain  # no bank ships for hash:32
        assert plain[0].id == "hub" or plain[1].id == "hub"
        bank = QueryBank("hash:32", np.stack([hub] * 4), np.stack([hub] * 2), 10.0, 1.0)
        found = retriever.search(["a dog"], k=7, query_bank=bank)[0]
        stored = retriever.stored_vectors([hit.id for hit in plain])
        cosine = {hit.id: hit.score for hit in plain}
        want = {i: cosine[i] - float(bank.discount(stored[i][None], "text")[0]) for i in cosine}
        assert [hit.id for hit in found] == sorted(want, key=lambda i: -want[i])
        assert all(hit.score == pytest.approx(want[hit.id], abs=1e-5) for hit in found)
        assert found[-1].id == "hub"  # every bank query sits on it
        with pytest.raises(InputError, match="hash:64"):
            retriever.search(["a dog"], query_bank=QueryBank("hash:64", hub[None], hub[None], 1, 1))


def test_ir_metrics_subtract_each_querys_discounts() -> None:
    docs = unit(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]))
    queries = unit(np.array([[1.0, 0.1], [1.0, 0.1]]))
    qrels = {"a": {"d1": 1}, "b": {"d1": 1}}
    discounts = [np.array([0.5, 0.0, 0.0]), None]  # only query "a" is discounted
    report = ir_metrics(queries, docs, ["a", "b"], ["d0", "d1", "d2"], qrels, discounts=discounts)
    assert report.ranks.tolist() == [1, 2]


def test_a_bank_round_trips_and_bad_folders_are_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bank = QueryBank(
        "hash:8", unit(rng.normal(size=(4, 8))), unit(rng.normal(size=(2, 8))), 20, 0.75
    )
    bank.save(tmp_path / "bank")
    loaded = load_query_bank(tmp_path / "bank")
    assert (loaded.encoder, loaded.beta, loaded.weight) == ("hash:8", 20.0, 0.75)
    np.testing.assert_allclose(loaded.text, bank.text, atol=1e-3)
    np.testing.assert_array_equal(loaded.text, loaded.text.astype(np.float16))  # stored float16
    with pytest.raises(InputError, match="not a query bank"):
        load_query_bank(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "bank.safetensors").write_bytes(b"")
    with pytest.raises(Exception, match="not a readable query bank"):
        load_query_bank(tmp_path)


def test_settings_are_chosen_by_dev_rsum() -> None:
    rng = np.random.default_rng(2)
    image = unit(rng.normal(size=(12, 16)))
    text = unit(np.repeat(image, 2, axis=0) + 0.9 * rng.normal(size=(24, 16)))
    dev = PairEmbeddings(image, text, np.repeat(np.arange(12), 2))
    bank = choose_settings("hash:16", text[:10], image[:6], dev)
    assert bank.record is not None
    rsums = bank.record["dev_rsum"]
    assert rsums[f"beta {bank.beta:g}, weight {bank.weight:g}"] == max(rsums.values())
    plain = retrieval_metrics(image, text, dev.text_image).rsum
    assert rsums["beta 10, weight 0"] == pytest.approx(plain, abs=0.01)


def test_the_default_models_bank_ships() -> None:
    for spec, dim in (("starter-v3", 512), ("starter-v4", 1024)):
        bank = shipped_query_bank(spec)
        assert bank is not None and bank.encoder == spec and bank.weight > 0
        assert bank.text.shape[1] == bank.image.shape[1] == dim
    assert shipped_query_bank("starter") is None


def test_build_search_and_evaluate_with_a_bank_from_the_cli(manifest: Path, tmp_path: Path) -> None:
    bank, index = tmp_path / "bank", tmp_path / "index"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    built = CliRunner().invoke(
        app, ["train", "query-bank", str(manifest), "--dev", str(manifest), "--model", "hash:32",
              "--out", str(bank), "--texts", "6", "--images", "3", *cache],
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    assert "saved the query bank" in built.output and "dev RSUM" in built.output
    built_bank = load_query_bank(bank)
    assert built_bank.image.shape == (3, 32)
    record = tmp_path / "eval.json"
    evaluate = ["eval", "retrieval", str(manifest), "--model", "hash:32", "--json", str(record)]
    replace(built_bank, weight=0.0).save(bank)  # a zero weight: scores are left as they are
    off = CliRunner().invoke(app, [*evaluate, "--query-bank", str(bank), *cache])
    assert off.exit_code == 0 and "query_bank" not in json.loads(record.read_text())
    replace(built_bank, weight=0.5).save(bank)
    made = CliRunner().invoke(
        app, ["index", str(manifest), "--out", str(index), "--model", "hash:32"]
    )
    assert made.exit_code == 0, made.output
    found = CliRunner().invoke(
        app, ["search", str(index), "a red square", "--query-bank", str(bank), "--json"]
    )
    assert found.exit_code == 0, found.output
    assert json.loads(found.output)["results"]
    evaluated = CliRunner().invoke(
        app, ["eval", "retrieval", str(manifest), "--model", "hash:32", "--query-bank", str(bank),
              "--json", str(record), *cache],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    saved = load_query_bank(bank)
    assert json.loads(record.read_text())["query_bank"] == {
        "beta": saved.beta,
        "weight": saved.weight,
    }
    queries, qrels = tmp_path / "queries.jsonl", tmp_path / "qrels.tsv"
    queries.write_text('{"id": "q1", "text": "a red square"}\n{"id": "q2", "text": "blue"}\n')
    qrels.write_text("q1 0 red 1\nq2 0 blue 1\n")
    ir = CliRunner().invoke(
        app, ["eval", "ir", str(queries), str(manifest), str(qrels), "--model", "hash:32",
              "--query-bank", str(bank), "--json", str(record), *cache],
    )  # fmt: skip
    assert ir.exit_code == 0, ir.output
    assert json.loads(record.read_text())["model"] == "hash:32 + query bank"
    wrong = CliRunner().invoke(
        app, ["eval", "retrieval", str(manifest), "--model", "hash:16", "--query-bank", str(bank)]
    )
    assert wrong.exit_code != 0 and "hash:32" in wrong.output
