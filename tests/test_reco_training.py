"""Training the RECO fusion: own pairs excluded, the loss falls, seeded and resumable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmret.cache.embeddings import PairEmbeddings
from mmret.errors import InputError
from mmret.memory.store import Memory
from mmret.training.reco import RecoTrainingConfig, reco_data, train_reco

from .test_memory import DIM, synthetic_memory, unit

FAST = RecoTrainingConfig(k=4, heads=4, ff_dim=16, epochs=3, batch_size=32, learning_rate=3e-3)


def training_set(memory: Memory) -> tuple[PairEmbeddings, np.ndarray]:
    """The memory's own pairs, two noisy captions each, as a training set (memory = train)."""
    image = np.array(memory.vectors["image"])
    owner = np.repeat(np.arange(len(image)), 2)
    noise = 0.3 * np.random.default_rng(5).standard_normal((len(owner), DIM))
    text = unit(np.array(memory.vectors["text"])[owner] + noise)
    return PairEmbeddings(image, text, owner), memory.rows_of(memory.ids)


@pytest.fixture
def memory(tmp_path: Path) -> Memory:
    return Memory.open(synthetic_memory(tmp_path / "memory", n=120))


def test_training_items_never_see_their_own_pair(memory: Memory) -> None:
    embeddings, own = training_set(memory)
    data = reco_data(embeddings, memory, FAST, own_rows=own)
    assert not (data.image_neighbours == own[:, None]).any()
    assert not (data.text_neighbours == own[embeddings.text_image][:, None]).any()
    assert (data.image_neighbours >= 0).all()


def test_training_lowers_the_loss_and_is_seeded(memory: Memory) -> None:
    embeddings, own = training_set(memory)
    data = reco_data(embeddings, memory, FAST, own_rows=own)
    first, logs = train_reco(data, memory, data, FAST)
    assert logs[-1].loss < logs[0].loss
    assert logs[0].dev is not None
    second, _ = train_reco(data, memory, data, FAST)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert first.config.encoder == memory.manifest.encoder


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(memory: Memory, tmp_path: Path) -> None:
    embeddings, own = training_set(memory)
    data = reco_data(embeddings, memory, FAST, own_rows=own)
    whole, whole_logs = train_reco(data, memory, data, FAST)
    partial = tmp_path / "partial"
    _run_epochs(data, memory, FAST, partial, stop_after=2)
    other = RecoTrainingConfig(**{**FAST.to_dict(), "seed": 1})
    with pytest.raises(InputError, match="another config"):
        train_reco(data, memory, data, other, checkpoint_dir=partial)
    resumed, resumed_logs = train_reco(data, memory, data, FAST, checkpoint_dir=partial)
    assert [log.loss for log in resumed_logs] == pytest.approx([log.loss for log in whole_logs])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class _StopError(Exception):
    pass


def _run_epochs(data, memory, config, folder, stop_after):  # type: ignore[no-untyped-def]
    """Run with checkpoints and kill the run (an exception) after ``stop_after`` epochs."""

    def on_epoch(log):  # type: ignore[no-untyped-def]
        if log.epoch == stop_after:
            raise _StopError

    with pytest.raises(_StopError):
        train_reco(data, memory, data, config, checkpoint_dir=folder, on_epoch=on_epoch)
