"""The cross-encoder reranker: it only reorders the first stage's candidates, a hit's score is a
direct cross-encoder call on the pair, the stored token features round-trip through check and
repair, the model through save and load, and training is seeded and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmret import InputError, Item, Query, Retriever
from mmret.cli.main import app
from mmret.errors import IndexFormatError
from mmret.heads.cross_encoder import CrossEncoder, SideTokens
from mmret.index.token_store import TOKENS_DIR
from mmret.maintenance.integrity import check_index, repair_index
from mmret.memory.refine import load_refiner
from mmret.reranker import (
    FIRST_STAGE_FILE,
    Reranker,
    load_reranker,
    read_first_stage_weights,
    write_first_stage_weight,
)
from mmret.training.calibration import INTERPOLATION_WEIGHTS, best_weight

from .conftest import COLOURS, solid
from .rerank_fixtures import LayerHashEncoder, tiny_config, tiny_reranker, tiny_spec
from .test_encoders import tiny_hf
from .test_memory import synthetic_memory

WORDS = ["dog", "cat", "beach", "snow", "red", "ball", "child", "grass"]


def items(folder: Path, count: int = 16) -> list[Item]:
    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.values())
    made = []
    for number in range(count):
        path = folder / f"{number}.png"
        colour = colours[number % len(colours)]
        solid(tuple(min(255, c + 9 * number) for c in colour), size=(20, 20)).save(path)  # type: ignore[arg-type]
        text = f"a {WORDS[number % 8]} and a {WORDS[(3 * number + 1) % 8]}"
        # Some items are images only, some texts only, most both.
        if number % 5 == 3:
            made.append(Item(f"item-{number}", text=text))
        elif number % 5 == 4:
            made.append(Item(f"item-{number}", image=path))
        else:
            made.append(Item(f"item-{number}", text=text, image=path, metadata={"n": number}))
    return made


@pytest.fixture
def indexed(tmp_path: Path) -> tuple[Path, LayerHashEncoder]:
    encoder = LayerHashEncoder(32)
    folder = tmp_path / "index"
    with Retriever.create(folder, encoder=encoder, token_features=tiny_spec(encoder)) as index:
        index.add(items(tmp_path / "photos"))
    return folder, encoder


QUERIES = [Query(text="a dog on the beach"), Query(image=solid((200, 40, 40), size=(20, 20)))]


def test_rerank_only_reorders_the_first_stage_candidates(
    indexed: tuple[Path, LayerHashEncoder],
) -> None:
    folder, encoder = indexed
    reranker = tiny_reranker(encoder)
    with Retriever.open(folder, encoder=encoder, readonly=True) as index:
        for n, k in ((6, 6), (8, 3), (2, 4)):
            first = index.search(QUERIES, k=max(n, k))
            reranked = index.search(QUERIES, k=k, rerank=n, reranker=reranker)
            for before, after in zip(first, reranked, strict=True):
                assert len(after) == k
                assert {hit.id for hit in after} <= {hit.id for hit in before}
                scores = [hit.score for hit in after]
                assert scores == sorted(scores, reverse=True)
            full = index.search(QUERIES, k=max(n, k), rerank=n, reranker=reranker)
            assert [{h.id for h in hits} for hits in full] == [{h.id for h in b} for b in first]
        # A filter applies to the first stage, so reranking never brings in a filtered item.
        hits = index.search(QUERIES, k=5, rerank=5, reranker=reranker, filter={"n": [0, 1, 2]})
        assert all(hit.metadata.get("n") in (0, 1, 2) for query in hits for hit in query)


def test_a_candidates_score_is_a_direct_cross_encoder_call(
    indexed: tuple[Path, LayerHashEncoder], tmp_path: Path
) -> None:
    folder, encoder = indexed
    reranker = tiny_reranker(encoder)
    by_id = {item.id: item for item in items(tmp_path / "again")}
    with Retriever.open(folder, encoder=encoder, readonly=True) as index:
        reranked = index.search(QUERIES, k=8, rerank=8, reranker=reranker)
    orders = []
    for query, hits in zip(QUERIES, reranked, strict=True):
        query_side = reranker.features([query])
        for hit in hits:
            # Features are stored in float16: the direct call reads the same rounded values.
            candidate = half(reranker.features([by_id[hit.id]]))
            with torch.inference_mode():
                direct = float(reranker.model(query_side, candidate))
            assert hit.score == pytest.approx(direct, abs=1e-5)
        orders.append([hit.id for hit in hits])
    assert orders[0] != sorted(orders[0])  # the cross-encoder really reordered something


def test_a_calibrated_first_stage_adds_its_weighted_score(
    indexed: tuple[Path, LayerHashEncoder], tmp_path: Path
) -> None:
    folder, encoder = indexed
    plain = tiny_reranker(encoder)
    calibrated = Reranker(plain.model, encoder, {encoder.spec: 3.0, "another-model": 50.0})
    other = Reranker(plain.model, encoder, {"another-model": 50.0})
    with Retriever.open(folder, encoder=encoder, readonly=True) as index:
        first = {hit.id: hit.score for hit in index.search(QUERIES[:1], k=8)[0]}
        fused = index.search(QUERIES[:1], k=8, rerank=8, reranker=calibrated)[0]
        alone = {h.id: h.score for h in index.search(QUERIES[:1], k=8, rerank=8, reranker=other)[0]}
    assert {hit.id for hit in fused} == set(first) == set(alone)
    for hit in fused:  # the cross-encoder's score plus 3 x the first stage's, nothing else
        assert hit.score == pytest.approx(alone[hit.id] + 3.0 * first[hit.id], abs=1e-5)
    assert calibrated.first_stage_weight("never-calibrated") == 0.0


def test_a_refined_index_is_not_given_the_plain_models_weight(tmp_path: Path) -> None:
    encoder = LayerHashEncoder(32)
    refiner = load_refiner(synthetic_memory(tmp_path / "memory"), "mean", k=3)
    folder = tmp_path / "refined"
    with Retriever.create(
        folder, encoder=encoder, token_features=tiny_spec(encoder), refiner=refiner
    ) as index:
        index.add(items(tmp_path / "photos"))
        plain = tiny_reranker(encoder)
        calibrated = Reranker(plain.model, encoder, {encoder.spec: 3.0})
        fused = index.search(QUERIES[:1], k=8, rerank=8, reranker=calibrated)[0]
        alone = index.search(QUERIES[:1], k=8, rerank=8, reranker=plain)[0]
    assert [(h.id, h.score) for h in fused] == [(h.id, h.score) for h in alone]
    refiner.close()


def test_first_stage_weights_are_kept_per_model_and_bad_files_are_named(tmp_path: Path) -> None:
    write_first_stage_weight(tmp_path, "starter", 10.0, {"n": 20})
    write_first_stage_weight(tmp_path, "starter-v3", 15.0, {"n": 20})
    write_first_stage_weight(tmp_path, "starter", 5.0, {"n": 10})
    assert read_first_stage_weights(tmp_path) == {"starter": 5.0, "starter-v3": 15.0}
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / FIRST_STAGE_FILE).write_text('{"weights": [1, 2]}')
    with pytest.raises(IndexFormatError, match=FIRST_STAGE_FILE):
        read_first_stage_weights(tmp_path)


def half(side: SideTokens) -> SideTokens:
    return SideTokens(
        side.image.half().float(), side.image_mask, side.text.half().float(), side.text_mask
    )


def test_rerank_refuses_an_index_without_token_features(tmp_path: Path) -> None:
    encoder = LayerHashEncoder(32)
    with Retriever.create(tmp_path / "plain", encoder=encoder) as index:
        index.add(items(tmp_path / "photos", 4))
        with pytest.raises(InputError, match="stores no token features"):
            index.search(["a dog"], rerank=3, reranker=tiny_reranker(encoder))
        with pytest.raises(InputError, match="rerank must be"):
            index.search(["a dog"], rerank=-1)


def test_token_features_round_trip_through_check_and_repair(
    indexed: tuple[Path, LayerHashEncoder],
) -> None:
    folder, encoder = indexed
    reranker = tiny_reranker(encoder)

    def searched() -> list[list[tuple[str, float]]]:
        with Retriever.open(folder, encoder=encoder, readonly=True) as index:
            hits = index.search(QUERIES, k=6, rerank=6, reranker=reranker)
        return [[(hit.id, round(hit.score, 5)) for hit in query] for query in hits]

    assert check_index(folder).ok
    before = searched()
    with Retriever.open(folder, encoder=encoder) as index:  # removals keep the rest sound
        index.remove(["item-0", "item-7"])
        index.add(items(folder.parent / "more", 18)[16:])
    assert check_index(folder).ok
    image_file = folder / TOKENS_DIR / "image.f16"
    data = bytearray(image_file.read_bytes())
    data[60:90] = b"\x7f" * 30  # damage item-1's image tokens (item-0's are unused now)
    image_file.write_bytes(bytes(data))
    report = check_index(folder)
    assert not report.ok and report.damaged == {"tokens"}
    assert any("digest mismatch" in line for line in report.problems)
    repaired = repair_index(folder, encoder=encoder)
    assert any("token features of" in action for action in repaired.actions)
    assert check_index(folder).ok
    # Truncating the text file loses every later item's text tokens: all rebuilt.
    text_file = folder / TOKENS_DIR / "text.f16"
    text_file.write_bytes(text_file.read_bytes()[:100])
    assert check_index(folder).damaged == {"tokens"}
    repair_index(folder, encoder=encoder)
    assert check_index(folder).ok
    # Rebuilt features score as the originals did, for every item both searches found.
    for old, new in zip(before, searched(), strict=True):
        kept = dict(new)
        common = [(item_id, score) for item_id, score in old if item_id in kept]
        assert common and all(kept[i] == pytest.approx(score, abs=1e-4) for i, score in common)


def test_reranker_round_trips_through_save_and_load(tmp_path: Path) -> None:
    encoder = LayerHashEncoder(32)
    model = tiny_reranker(encoder).model
    model.save(tmp_path / "model", dtype=torch.float16)
    loaded = CrossEncoder.load(tmp_path / "model")
    assert loaded.config == tiny_config()
    query = Reranker(loaded, encoder).features(QUERIES[:1])
    candidates = Reranker(loaded, encoder).features(items(tmp_path / "photos", 5))
    with torch.inference_mode():
        rounded = CrossEncoder(tiny_config())
        rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        want = rounded.eval()(query, candidates)
        got = loaded(query, candidates)
    torch.testing.assert_close(got, want)


def test_scores_do_not_depend_on_which_side_asks(tmp_path: Path) -> None:
    encoder = LayerHashEncoder(32)
    reranker = tiny_reranker(encoder)
    texts = reranker.features([Query(text="a red dog"), Query(text="snow")])
    images = reranker.features(
        [Item("a", image=solid((200, 30, 30))), Item("b", image=solid((9, 9, 9)))]
    )
    with torch.inference_mode():
        one_way = reranker.model(texts, images)
        other_way = reranker.model(images, texts)
    torch.testing.assert_close(one_way, other_way, atol=1e-5, rtol=1e-5)
    assert np.isfinite(one_way.numpy()).all()


def test_train_index_search_and_evaluate_from_the_cli(manifest: Path, tmp_path: Path) -> None:
    backbone = tiny_hf(tmp_path / "clip", "clip")
    out, index = tmp_path / "reranker", tmp_path / "index"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    train = [
        "train", "rerank", str(manifest), "--dev", str(manifest), "--out", str(out),
        "--backbone", backbone.spec, "--image-layer", "-1", "--text-layer", "-1",
        "--image-grid", "2", "--warmup-epochs", "1", "--epochs", "1", "--negatives", "1",
        "--mine-top", "2", "--queries-per-epoch", "4", "--width", "16", "--layers", "1", *cache,
        "--first-stage", backbone.spec,
    ]  # fmt: skip
    result = CliRunner().invoke(app, train)
    assert result.exit_code == 0, result.output
    assert "reranked top 20" in " ".join(result.output.split())
    # Then calibrated for the named first stage, on the dev sample.
    assert "<- chosen" in result.output
    assert set(read_first_stage_weights(out)) == {backbone.spec}
    history = json.loads((out / "training.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [1, 2] and history[1]["dev_reranked"]
    assert history[1]["dev_reranked"]["cosine_weight"] in INTERPOLATION_WEIGHTS
    saved = CrossEncoder.load(out)
    assert float(saved.cosine_weight) == history[1]["dev_reranked"]["cosine_weight"]
    rerun = CliRunner().invoke(app, train)  # resumes after the last epoch: nothing to do
    assert rerun.exit_code == 0 and "epoch" not in rerun.output.split("saved")[0]
    calibrated = CliRunner().invoke(
        app, ["train", "rerank-calibrate", str(out), "--dev", str(manifest), "--first-stage",
              backbone.spec, "--n", "3", *cache],
    )  # fmt: skip
    assert calibrated.exit_code == 0, calibrated.output
    weight = load_reranker(out).first_stage_weight(backbone.spec)
    assert weight in INTERPOLATION_WEIGHTS and "<- chosen" in calibrated.output

    made = CliRunner().invoke(
        app, ["index", str(manifest), "--out", str(index), "--model", backbone.spec,
              "--token-features", "--reranker", str(out)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert check_index(index).ok
    found = CliRunner().invoke(
        app, ["search", str(index), "a red square", "--k", "2", "--rerank", "3",
              "--reranker", str(out), "--json"],
    )  # fmt: skip
    assert found.exit_code == 0, found.output
    hits = json.loads(found.output)["results"]
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]

    record = tmp_path / "eval.json"
    evaluated = CliRunner().invoke(
        app, ["eval", "retrieval", str(manifest), "--model", backbone.spec, "--rerank", "2",
              "--rerank", "4", "--reranker", str(out), "--json", str(record), *cache],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    reranked = json.loads(record.read_text())["reranked"]
    assert [entry["n"] for entry in reranked] == [2, 4]
    assert all(entry["first_stage_weight"] == weight for entry in reranked)
    assert "Reranked by the cross-encoder" in evaluated.output

    queries, qrels = tmp_path / "queries.jsonl", tmp_path / "qrels.tsv"
    queries.write_text('{"id": "q1", "text": "a red square"}\n{"id": "q2", "text": "blue"}\n')
    qrels.write_text("q1 0 red 1\nq2 0 blue 1\n")
    ir = CliRunner().invoke(
        app, ["eval", "ir", str(queries), str(manifest), str(qrels), "--model", backbone.spec,
              "--rerank", "3", "--reranker", str(out), "--json", str(record), *cache],
    )  # fmt: skip
    assert ir.exit_code == 0, ir.output
    assert "rerank top 3" in json.loads(record.read_text())["model"]


def test_the_shipped_reranker_serves_offline() -> None:
    reranker = load_reranker()
    assert reranker.spec.backbone == "starter" and reranker.model.config.joint
    images = reranker.features([Item("red", image=solid((220, 30, 30), size=(64, 64)))])
    texts = reranker.features([Query(text="a red wall"), Query(text="two dogs in the snow")])
    assert images.image.shape == (1, 16, 1280) and texts.text.shape[2] == 384
    scores = reranker.score(images, texts)
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_calibration_weighs_the_cosine_by_what_reranks_best() -> None:
    hits = np.zeros((4, 5), dtype=bool)
    hits[:, 2] = True  # every query's hit is third by the first stage
    cosine = np.tile(np.linspace(1.0, 0.6, 5), (4, 1))
    # A cross-encoder that knows the hit: the cosine only gets in its way.
    knowing = hits * 1.0
    assert best_weight([(knowing, cosine, hits)]) == 0.0
    # One that scores everything alike: weight 0 would tie the hit with every miss, which
    # counts against it, so the cosine's order (any weight above 0) is kept.
    constant = np.zeros((4, 5))
    assert best_weight([(constant, cosine, hits)]) == INTERPOLATION_WEIGHTS[1]
