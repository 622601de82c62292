"""RECO memories: building, searching without the query's own pair, refining, and keeping an
index tied to the memory it was built with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mmret import InputError, Retriever, read_items
from mmret.encoders import DEFAULT_MODEL
from mmret.encoders.hashing import HashEncoder
from mmret.heads.reco import (
    SHIPPED_FUSIONS,
    FusionConfig,
    MeanFusion,
    TransformerFusion,
    load_fusion,
)
from mmret.items import Item
from mmret.memory.refine import Refiner, RefinerOptions, load_refiner
from mmret.memory.store import Memory, build_memory, write_memory

DIM = 32


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic_memory(folder: Path, n: int = 300, seed: int = 0) -> Path:
    """Pairs whose text vector is a noisy copy of their image vector."""
    rng = np.random.default_rng(seed)
    image = unit(rng.standard_normal((n, DIM)))
    text = unit(image + 0.6 * rng.standard_normal((n, DIM)))
    items = [Item(id=f"pair-{seed}-{i}", text=f"caption {i}") for i in range(n)]
    write_memory(folder, HashEncoder(DIM), items, {"image": image, "text": text}, source="test")
    return folder


def random_fusion(seed: int = 0) -> TransformerFusion:
    """A fusion with every weight random (an untrained one is the identity by design)."""
    torch.manual_seed(seed)
    fusion = TransformerFusion(FusionConfig(dim=DIM, heads=4, ff_dim=16, encoder=f"hash:{DIM}"))
    with torch.no_grad():
        for parameter in fusion.parameters():
            parameter.normal_(0.0, 0.3)
    return fusion.eval()


@pytest.fixture
def memory(tmp_path: Path) -> Memory:
    return Memory.open(synthetic_memory(tmp_path / "memory"))


@pytest.mark.parametrize("search", ["uni", "cross"])
def test_the_query_and_its_near_duplicates_never_come_back(memory: Memory, search: str) -> None:
    rng = np.random.default_rng(1)
    stored = np.array(memory.vectors["image"][:20])
    near = unit(stored + 0.01 * rng.standard_normal(stored.shape))  # cosine > 0.99
    queries = np.concatenate([stored, near])
    found = memory.neighbours(queries, "image", 10, search=search, threshold=0.95)  # type: ignore[arg-type]
    assert found.valid.all()
    own = np.concatenate([np.arange(20), np.arange(20)])
    assert not (found.rows == own[:, None]).any()
    similarity = np.einsum("qd,qkd->qk", queries, memory.gather(found.rows, "image"))
    assert (similarity < 0.95).all()
    # and without the threshold, uni-modal search finds the query's own pair first
    if search == "uni":
        plain = memory.neighbours(stored, "image", 1, threshold=1.01)
        assert plain.rows[:, 0].tolist() == list(range(20))


def test_excluded_rows_never_come_back(memory: Memory) -> None:
    texts = np.array(memory.vectors["text"][:50])
    own = np.arange(50)
    found = memory.neighbours(texts, "text", 5, threshold=1.01, exclude=own)
    assert not (found.rows == own[:, None]).any() and found.valid.all()


def test_more_neighbours_than_fetched_at_first(memory: Memory) -> None:
    queries = np.array(memory.vectors["image"][:3])
    found = memory.neighbours(queries, "image", 200, threshold=0.5)
    assert found.valid.sum(axis=1).min() > 100  # a second, wider search filled them in
    scores = np.einsum("qd,qkd->qk", queries, memory.gather(found.rows, "image"))
    assert (scores[found.valid] < 0.5).all()


@pytest.mark.parametrize("fusion", ["mean", "random"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_refined_embeddings_are_unit_norm(memory: Memory, fusion: str, modality: str) -> None:
    fuse = MeanFusion() if fusion == "mean" else random_fusion()
    refiner = Refiner(memory, fuse, RefinerOptions(k=7))
    vectors = unit(np.random.default_rng(2).standard_normal((40, DIM)))
    refined = refiner.refine(vectors, modality)
    assert refined.shape == vectors.shape
    np.testing.assert_allclose(np.linalg.norm(refined, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(refined, vectors, atol=1e-3)  # it did change them


def test_an_untrained_transformer_fusion_is_the_identity(memory: Memory) -> None:
    fusion = TransformerFusion(FusionConfig(dim=DIM, heads=4, ff_dim=16)).eval()
    vectors = unit(np.random.default_rng(3).standard_normal((10, DIM)))
    refined = Refiner(memory, fusion).refine(vectors, "image")
    np.testing.assert_allclose(refined, vectors, atol=1e-5)


def test_save_and_load_reproduce_scores_exactly(memory: Memory, tmp_path: Path) -> None:
    fusion = random_fusion()
    fusion.save(tmp_path / "fusion")
    loaded = load_fusion(tmp_path / "fusion", f"hash:{DIM}")
    vectors = unit(np.random.default_rng(4).standard_normal((30, DIM)))
    before = Refiner(memory, fusion).refine(vectors, "text")
    after = Refiner(memory, loaded).refine(vectors, "text")
    assert np.array_equal(before @ before.T, after @ after.T)


def test_float16_weights_load_back_exactly(tmp_path: Path) -> None:
    fusion = random_fusion()
    fusion.save(tmp_path / "half", dtype=torch.float16)
    first = load_fusion(tmp_path / "half", f"hash:{DIM}")
    first.save(tmp_path / "again", dtype=torch.float16)
    second = load_fusion(tmp_path / "again", f"hash:{DIM}")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert first.identity() == second.identity()


def test_a_fusion_refuses_another_encoders_memory(tmp_path: Path) -> None:
    random_fusion().save(tmp_path / "fusion")
    with pytest.raises(InputError, match=r"trained for encoder 'hash:32'.*starter-v2"):
        load_fusion(tmp_path / "fusion", "starter-v2")
    with pytest.raises(InputError, match="no trained fusion ships for encoder 'hash:32'"):
        load_fusion("transformer", f"hash:{DIM}")


def test_build_memory_from_a_manifest(tmp_path: Path, manifest: Path) -> None:
    folder = build_memory(
        manifest, tmp_path / "memory", encoder=HashEncoder(DIM), cache_dir=tmp_path / "cache"
    )
    with Memory.open(folder) as memory:
        assert len(memory) == 4 and memory.manifest.encoder == f"hash:{DIM}"
        assert memory.ids == ["red", "green", "blue", "yellow"]
        np.testing.assert_allclose(np.linalg.norm(memory.vectors["text"], axis=1), 1.0, atol=1e-5)
    with Retriever.open(folder / "texts", readonly=True) as texts:  # an ordinary index
        hits = texts.search(["a red square"], k=1)[0]
        assert hits[0].id == "red" and hits[0].text == "a red square\nsomething red"
    with pytest.raises(InputError, match="not empty"):
        build_memory(manifest, folder, encoder=HashEncoder(DIM))


def test_not_a_memory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not an mmret memory"):
        Memory.open(tmp_path)


def index_with(folder: Path, refiner: Refiner | None, manifest: Path) -> Retriever:
    retriever = Retriever.create(folder, encoder=HashEncoder(DIM), refiner=refiner)
    retriever.add(read_items(manifest))
    return retriever


def test_an_index_refuses_another_memory(tmp_path: Path, manifest: Path) -> None:
    first = load_refiner(synthetic_memory(tmp_path / "m1", seed=1), "mean", k=3)
    second = load_refiner(synthetic_memory(tmp_path / "m2", seed=2), "mean", k=3)
    index_with(tmp_path / "index", first, manifest).close()
    with pytest.raises(InputError, match=r"built with memory \w+ .*m1.*cannot be searched with"):
        Retriever.open(tmp_path / "index", readonly=True, refiner=second)
    other_k = load_refiner(tmp_path / "m1", "mean", k=4)
    with pytest.raises(InputError, match="k 3 \\(given 4\\)"):
        Retriever.open(tmp_path / "index", readonly=True, refiner=other_k)
    index_with(tmp_path / "plain", None, manifest).close()
    with pytest.raises(InputError, match="built without a memory"):
        Retriever.open(tmp_path / "plain", readonly=True, refiner=first)
    for refiner in (first, second, other_k):
        refiner.close()


def test_an_index_reopens_its_memory_and_scores_agree(tmp_path: Path, manifest: Path) -> None:
    refiner = load_refiner(synthetic_memory(tmp_path / "m1"), "mean", k=3)
    with index_with(tmp_path / "index", refiner, manifest) as retriever:
        assert retriever.info()["memory"]["memory"] == refiner.memory.identity
        before = retriever.search(["a red square", "something blue"], k=4)
    with Retriever.open(tmp_path / "index", readonly=True) as reopened:  # memory from its path
        assert reopened.refiner is not None
        after = reopened.search(["a red square", "something blue"], k=4)
    assert [[(h.id, h.score) for h in hits] for hits in before] == [
        [(h.id, h.score) for h in hits] for hits in after
    ]
    with index_with(tmp_path / "plain", None, manifest) as plain:
        unrefined = plain.search(["a red square"], k=4)[0]
    assert [h.score for h in unrefined] != [h.score for h in before[0]]
    refiner.close()


def test_an_index_whose_memory_is_gone(tmp_path: Path, manifest: Path) -> None:
    import shutil

    refiner = load_refiner(synthetic_memory(tmp_path / "m1"), "mean")
    index_with(tmp_path / "index", refiner, manifest).close()
    refiner.close()
    shutil.rmtree(tmp_path / "m1")
    with pytest.raises(Exception, match="which is gone"):
        Retriever.open(tmp_path / "index", readonly=True)


def test_first_captions_keeps_the_first_of_each_image(manifest: Path) -> None:
    from mmret.ingest.pairs import read_pairs
    from mmret.memory.pair_embeddings import first_captions

    pairs = read_pairs(manifest)
    kept = first_captions(pairs, 1)
    assert kept.texts == ["a red square", "a green square", "a blue square", "a yellow square"]
    assert kept.text_image.tolist() == [0, 1, 2, 3]
    assert first_captions(pairs, None) is pairs
    with pytest.raises(InputError, match="at least 1"):
        first_captions(pairs, 0)


def test_the_shipped_fusion_is_for_the_starter_model_only() -> None:
    folder = SHIPPED_FUSIONS["starter"]
    fusion = load_fusion("transformer", "starter")
    assert isinstance(fusion, TransformerFusion) and fusion.config.encoder == "starter"
    assert (folder / "MODEL_CARD.md").is_file()
    assert (folder / "model.safetensors").stat().st_size < 8 * 2**20  # float16
    with pytest.raises(InputError, match=r"trained for encoder 'starter'.*'starter-v2'"):
        load_fusion(folder, "starter-v2")


def test_a_fusion_ships_for_the_default_model() -> None:
    fusion = load_fusion("transformer", DEFAULT_MODEL)
    assert isinstance(fusion, TransformerFusion) and fusion.config.encoder == DEFAULT_MODEL
    folder = SHIPPED_FUSIONS[DEFAULT_MODEL]
    assert (folder / "MODEL_CARD.md").is_file()
    with safe_open(folder / "model.safetensors", "pt") as weights:
        names = weights.keys()  # a safetensors file is not iterable
        assert {weights.get_slice(name).get_dtype() for name in names} == {"F16"}
