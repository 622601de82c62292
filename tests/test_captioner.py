"""The retrieval-augmented caption decoder: vocabulary, sequence assembly, the model, training
and captioning from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmret import Retriever, read_items
from mmret.encoders.hashing import HashEncoder
from mmret.errors import InputError
from mmret.generation.captioner import (
    RetrievalCaptioner,
    Sample,
    assemble,
    generate,
    repeated_trigrams,
)
from mmret.generation.vocabulary import BOS, EOS, SEP, UNK, Vocabulary
from mmret.heads.captioner import (
    CAPTION,
    DOC_TEXT,
    DOC_VECTOR,
    PAD,
    QUERY,
    CaptionDecoder,
    CaptionDecoderConfig,
)
from mmret.training.captioner import (
    CaptionedImages,
    CaptionTrainingConfig,
    MemoryDocuments,
    caption_loss,
    neighbours,
    train_captioner,
)

from .cli import run
from .test_generation import memory, needs_caption_eval  # noqa: F401 - a shared fixture

DIM = 8


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _decoder(documents: int = 2, vocab: int = 12, seed: int = 0) -> CaptionDecoder:
    torch.manual_seed(seed)
    config = CaptionDecoderConfig(
        "hash:8", DIM, vocab, documents=documents, width=16, layers=2, heads=2, ff_dim=32
    )
    return CaptionDecoder(config).eval()


def test_vocabulary_keeps_frequent_words_and_round_trips() -> None:
    vocabulary = Vocabulary.build(["A dog runs.", "a dog sits", "a cat"], min_count=2)
    assert vocabulary.entries[5:] == ["a", "dog"]
    ids = vocabulary.encode("A dog, a zebra!", max_words=10)
    assert ids == [5, 6, 5, UNK]
    assert vocabulary.decode([*ids, EOS, 6]) == "a dog a"
    assert Vocabulary.from_dict(vocabulary.to_dict()).entries == vocabulary.entries
    with pytest.raises(InputError, match="no word occurs"):
        Vocabulary.build(["one"], min_count=2)


def test_assemble_lays_out_documents_query_and_caption() -> None:
    vector = np.ones(DIM, dtype=np.float32)
    samples = [
        Sample(vector, [(vector, [7, 8]), (None, [9])], caption=[10]),
        Sample(vector, [(vector, None)]),
    ]
    right = assemble(samples, prefix=2, left_pad=False)
    expected = [DOC_VECTOR, DOC_TEXT, DOC_TEXT, DOC_TEXT, DOC_TEXT, DOC_TEXT]
    assert right.kinds[0].tolist() == [*expected, QUERY, QUERY, CAPTION, CAPTION, CAPTION]
    assert right.tokens[0].tolist() == [0, 7, 8, SEP, 9, SEP, 0, 1, BOS, 10, EOS]
    assert right.kinds[1].tolist() == [DOC_VECTOR, QUERY, QUERY, CAPTION, *[PAD] * 7]
    assert right.vectors.shape == (4, DIM)  # per sample a document vector and the query
    left = assemble(samples, prefix=2, left_pad=True)
    assert left.kinds[1].tolist() == [*[PAD] * 7, DOC_VECTOR, QUERY, QUERY, CAPTION]


def test_padding_side_does_not_change_what_the_decoder_computes() -> None:
    model = _decoder()
    rng = np.random.default_rng(0)
    short = Sample(_unit(rng.normal(size=(1, DIM)))[0], [(None, [5])], caption=[6])
    long = Sample(_unit(rng.normal(size=(1, DIM)))[0], [(None, [5, 7, 8, 9])], caption=[6])
    with torch.inference_mode():
        right = model(assemble([short, long], 4, left_pad=False))
        left = model(assemble([short, long], 4, left_pad=True))
        alone = model(assemble([short], 4, left_pad=False))
    length = alone.shape[1]
    torch.testing.assert_close(right[0, :length], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(left[0, -length:], alone[0], atol=1e-5, rtol=1e-4)


def test_cached_steps_match_the_full_forward_pass() -> None:
    model = _decoder()
    rng = np.random.default_rng(4)
    vectors = _unit(rng.normal(size=(2, DIM)))
    contexts = [[(vectors[1], [5, 6, 7])], [(None, [8])]]
    prompts = [Sample(v, c) for v, c in zip(vectors, contexts, strict=True)]
    whole = [Sample(v, c, caption=[9, 10]) for v, c in zip(vectors, contexts, strict=True)]
    with torch.inference_mode():
        _, cache = model.prefill(assemble(prompts, 4, left_pad=True))
        first, cache = model.step(cache, torch.tensor([9, 9]))
        second, _ = model.step(cache, torch.tensor([10, 10]))
        full = model(assemble(whole, 4, left_pad=True))  # ends ... <bos> 9 10 <eos>
    torch.testing.assert_close(first, full[:, -3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, full[:, -2], atol=1e-5, rtol=1e-4)


def test_a_trigram_is_never_written_twice() -> None:
    written = torch.tensor([[BOS, 5, 6, 7, 5, 6], [BOS, 5, 6, 7, 8, 9]])
    assert repeated_trigrams(written) == [(0, 7)]


def test_the_decoder_is_causal() -> None:
    model = _decoder()
    vector = np.ones(DIM, dtype=np.float32)
    first = assemble([Sample(vector, [(vector, [5, 6])], caption=[7, 8])], 4, left_pad=False)
    second = assemble([Sample(vector, [(vector, [5, 6])], caption=[7, 9])], 4, left_pad=False)
    with torch.inference_mode():
        a, b = model(first), model(second)
    torch.testing.assert_close(a[0, :-2], b[0, :-2])  # everything before the changed word
    assert not torch.allclose(a[0, -2], b[0, -2])


def test_alpha_adds_the_documents_words_to_the_loss() -> None:
    model = _decoder()
    vector = np.ones(DIM, dtype=np.float32)
    batch = assemble([Sample(vector, [(vector, [5, 6, 7])], caption=[8, 9])], 4, left_pad=False)
    with torch.no_grad():
        plain, augmented = caption_loss(model, batch, 0.0), caption_loss(model, batch, 0.5)
    assert float(augmented) > float(plain) > 0


def _images(vectors: np.ndarray, words: list[str]) -> CaptionedImages:
    ids = [f"i{n}" for n in range(len(vectors))]
    images = [f"/nowhere/{i}.jpg" for i in ids]
    return CaptionedImages(ids, images, vectors, [[w] for w in words])


def test_neighbours_never_return_the_query_itself_or_a_near_copy() -> None:
    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(6, DIM)))
    queries = _images(vectors, ["x"] * 6)
    copy = np.vstack([vectors, vectors[2:3] * 0.999 + 0.001])
    documents = MemoryDocuments(
        [*queries.ids, "copy"],
        [*queries.images, None],
        _unit(copy),
        [[[5]] for _ in range(7)],
    )
    near = neighbours(queries, documents, count=6, duplicate_threshold=0.95)
    for query, row in enumerate(near):
        assert query not in row.tolist()
    assert 6 not in near[2].tolist()  # the near-copy of query 2
    assert (near[0] >= 0).sum() == 6  # the others all qualify for query 0


def _copy_task(n: int, seed: int) -> tuple[CaptionedImages, MemoryDocuments, Vocabulary]:
    """Images in pairs of near-identical vectors whose shared word only the memory tells: a
    query's nearest memory document (its twin) holds the word."""
    rng = np.random.default_rng(seed)
    names = ["red", "green", "blue", "pink", "gold", "grey"]
    centres = _unit(rng.normal(size=(n, 16)))
    # Similar (cosine about 0.93) but not near-copies, which the memory would leave out.
    twins = _unit(centres + 0.1 * rng.normal(size=centres.shape))
    words = [names[i % len(names)] for i in range(n)]
    vocabulary = Vocabulary.build(words, min_count=1)
    queries = _images(centres, words)
    documents = MemoryDocuments(
        [f"m{i}" for i in range(n)],
        [None] * n,
        twins,
        [[vocabulary.encode(w, 4)] for w in words],
    )
    return queries, documents, vocabulary


class _StopError(Exception):
    pass


def test_training_learns_to_read_the_retrieved_documents_and_resumes(tmp_path: Path) -> None:
    train, documents, vocabulary = _copy_task(400, seed=2)
    config = CaptionTrainingConfig(
        documents=1,
        sample_from=1,
        drop_vector=0.0,
        drop_text=0.0,
        width=32,
        layers=1,
        heads=2,
        ff_dim=64,
        dropout=0.0,
        epochs=6,
        batch_size=16,
        learning_rate=3e-3,
    )
    model, logs = train_captioner(
        train, documents, None, vocabulary, config, encoder="hash:8", checkpoint_dir=tmp_path / "a"
    )
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    dev, dev_documents, _ = _copy_task(24, seed=3)  # unseen vectors: only the document tells
    samples = [
        Sample(vector, [(dev_documents.vectors[i], dev_documents.lines[i][0])])
        for i, vector in enumerate(dev.vectors)
    ]
    written = [vocabulary.decode(ids) for ids in generate(model, samples)]
    right = sum(w == c[0] for w, c in zip(written, dev.captions, strict=True))
    assert right >= 0.8 * len(samples)
    searched = [vocabulary.decode(ids) for ids in generate(model, samples, beam=3)]
    assert sum(w == c[0] for w, c in zip(searched, dev.captions, strict=True)) >= right - 2

    # Killed after epoch 3 and run again: the same weights as the uninterrupted run.
    def stop_after_three(log: dict[str, object]) -> None:
        if log["epoch"] == 3:
            raise _StopError

    with pytest.raises(_StopError):
        train_captioner(
            train,
            documents,
            None,
            vocabulary,
            config,
            encoder="hash:8",
            checkpoint_dir=tmp_path / "b",
            on_epoch=stop_after_three,
        )
    resumed, resumed_logs = train_captioner(
        train, documents, None, vocabulary, config, encoder="hash:8", checkpoint_dir=tmp_path / "b"
    )
    assert [log["loss"] for log in resumed_logs] == [log["loss"] for log in logs]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor)


@needs_caption_eval
def test_train_caption_and_caption_from_the_cli(
    memory: Path,  # noqa: F811 - the fixture
    manifest: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "decoder"
    run(
        "train", "caption", manifest, "--memory", memory, "--dev", manifest, "--out", out,
        "--documents", "2", "--epochs", "2", "--width", "16", "--layers", "1",
        "--batch-size", "2", "--min-count", "1",
    )  # fmt: skip
    training = json.loads((out / "training.json").read_text())
    assert len(training["history"]) == 2 and "CIDEr" in training["history"][0]["dev"]
    captioner = RetrievalCaptioner.load(out)
    assert captioner.model.config.documents == 2 and captioner.policy.k == 2
    image = manifest.parent / "images" / "red.png"
    printed = run("caption", image, "--memory", memory, "--model", out, "--json")
    [made] = json.loads(printed)
    assert made["caption"] and "red" not in made["neighbours"]
    scores = tmp_path / "scores.json"
    run(
        "eval", "caption", manifest, "--memory", memory, "--model", out, "--read", "text",
        "--modality", "require", "--no-meteor", "--json", scores,
    )  # fmt: skip
    record = json.loads(scores.read_text())
    assert record["n_images"] == 4 and "read=text" in record["captioner"]
    assert "modality=require" in record["captioner"]
    printed = run("caption", image, "--memory", memory, "--model", out, "--k", "3", code=1)
    assert "reads the 2 documents it was trained with" in printed
    with Retriever.create(tmp_path / "other", encoder=HashEncoder(16)) as other:
        other.add(read_items(manifest))
    with (
        pytest.raises(InputError, match="was built with"),
        Retriever.open(tmp_path / "other", readonly=True) as opened,
    ):
        captioner.caption([image], opened)
